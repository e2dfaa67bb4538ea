//! Mixture-of-experts ops against f64 references on random non-zero inputs (odd sizes, dense,
//! MLX affine experts of several widths and scale dtypes, and ggml blocks of every quantized
//! type, one token and many), on the CPU
//! backend and, where there is a CUDA driver, on the GPU, whose results are also compared with
//! the CPU backend's. Outputs are poisoned before each run. Without a driver the GPU half
//! prints "skipped: ..." and the CPU half still runs.

use half::{bf16, f16};
use mlx_native::backends::cuda;
use mlx_native::core::dtype::Element;
use mlx_native::core::op::{PreNorm, Route, Routing, UnaryFn};
use mlx_native::ops::{self, ExpertLinear};
use mlx_native::quant::{ggml, mlx_affine, GgmlType, WeightLayout};
use mlx_native::{CommandEncoder, DType, Device, Error, Result, Tensor};

mod common;

use common::{assert_close, poisoned, run, Rng};

/// The CPU, then the CUDA device when this machine has one.
fn devices() -> Vec<Device> {
    let mut all = vec![Device::cpu()];
    if !cuda::driver_present() {
        println!("skipped on CUDA: no CUDA driver");
        return all;
    }
    match Device::parse("cuda") {
        Ok(d) => all.push(d),
        Err(Error::DeviceUnavailable(why)) => println!("skipped on CUDA: {why}"),
        Err(e) => panic!("{e}"),
    }
    all
}

/// `top_k` distinct expert ids for each of `m` rows.
fn expert_ids(rng: &mut Rng, m: usize, top_k: usize, experts: usize) -> Vec<u32> {
    let mut ids = Vec::with_capacity(m * top_k);
    for _ in 0..m {
        let mut row: Vec<u32> = Vec::new();
        while row.len() < top_k {
            let e = (rng.next_u64() % experts as u64) as u32;
            if !row.contains(&e) {
                row.push(e);
            }
        }
        ids.extend(row);
    }
    ids
}

fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Asserts one device's output against the reference and against the first device's output
/// (the CPU's, which `devices` lists first), kept in `first`.
fn check_device(what: &str, got: Vec<f32>, want: &[f64], first: &mut Option<Vec<f32>>, tol: f64) {
    assert_close(what, &got, want, tol);
    match first {
        None => *first = Some(got),
        Some(c) => assert_close(&format!("{what} (vs CPU)"), &got, &to_f64(c), tol),
    }
}

/// Asserts that two tensors hold the same values, bit for bit (two ways of one computation).
fn assert_same<T: Element + PartialEq + std::fmt::Debug>(what: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.to_vec::<T>().unwrap(), b.to_vec::<T>().unwrap(), "{what}");
}

// ---------------------------------------------------------------------------------------------
// Routing

/// f64 reference: descending scores, the lower id first among equals.
fn route_ref(row: &[f32], top_k: usize, routing: Routing) -> (Vec<u32>, Vec<f64>) {
    let x: Vec<f64> = to_f64(row);
    let softmax = |v: &[f64]| -> Vec<f64> {
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = v.iter().map(|a| (a - max).exp()).sum();
        v.iter().map(|a| (a - max).exp() / sum).collect()
    };
    let scores = match routing {
        Routing::TopKSoftmax => x.clone(),
        Routing::SoftmaxTopK { .. } => softmax(&x),
    };
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let ids: Vec<usize> = order[..top_k].to_vec();
    let picked: Vec<f64> = ids.iter().map(|&e| scores[e]).collect();
    let weights = match routing {
        Routing::TopKSoftmax => softmax(&picked),
        Routing::SoftmaxTopK { normalize: true } => {
            let sum: f64 = picked.iter().sum();
            picked.iter().map(|p| p / sum).collect()
        }
        Routing::SoftmaxTopK { normalize: false } => picked,
    };
    (ids.iter().map(|&e| e as u32).collect(), weights)
}

#[test]
fn routing_picks_the_top_experts_with_each_normalisation() {
    let mut rng = Rng(11);
    for dev in devices() {
        for (m, experts, top_k) in [
            (1, 8, 2),
            (5, 13, 3),
            (3, 128, 8),
            (2, 70, 1),
            (2, 2048, 32),
        ] {
            let mut logits = rng.vec(m * experts, 3.0);
            // Exact ties: the lower id must win, on every backend.
            logits[1] = logits[0].abs() + 5.0;
            logits[experts - 1] = logits[1];
            for routing in [
                Routing::TopKSoftmax,
                Routing::SoftmaxTopK { normalize: true },
                Routing::SoftmaxTopK { normalize: false },
            ] {
                let what = format!("{dev:?} route {routing:?} m={m} experts={experts} k={top_k}");
                let x = dev.from_slice(&logits, &[m, experts]).unwrap();
                let ids = dev
                    .from_slice(&vec![u32::MAX; m * top_k], &[m, top_k])
                    .unwrap();
                let w = poisoned(&dev, &[m, top_k]).unwrap();
                run(&dev, |enc| {
                    ops::moe_route(enc, &x, top_k, routing, &ids, &w)
                })
                .unwrap();
                let (got_ids, got_w) = (ids.to_vec::<u32>().unwrap(), w.to_vec::<f32>().unwrap());
                for r in 0..m {
                    let (want_ids, want_w) =
                        route_ref(&logits[r * experts..(r + 1) * experts], top_k, routing);
                    assert_eq!(&got_ids[r * top_k..(r + 1) * top_k], want_ids, "{what}");
                    assert_close(&what, &got_w[r * top_k..(r + 1) * top_k], &want_w, 1e-6);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Gathered matmuls

/// How host experts are stored: dense `[experts·n·k]` values, MLX words, scales, biases
/// (floats already rounded to the storage dtype), or ggml blocks.
enum Stored {
    Dense(Vec<f32>),
    Ggml(Vec<u8>),
    Mlx {
        words: Vec<u32>,
        scales: Vec<f32>,
        biases: Vec<f32>,
    },
}

/// Stacked experts as stored, and their values dequantized to f64.
struct HostExperts {
    layout: WeightLayout,
    stored: Stored,
    /// Storage dtype of dense values or of scales and biases.
    dtype: DType,
    values: Vec<f64>,
    experts: usize,
    n: usize,
    k: usize,
}

fn round_to(v: &[f32], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F16 => v.iter().map(|&x| f16::from_f32(x).to_f32()).collect(),
        DType::BF16 => v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect(),
        _ => v.to_vec(),
    }
}

fn host_experts(
    rng: &mut Rng,
    layout: WeightLayout,
    dtype: DType,
    experts: usize,
    n: usize,
    k: usize,
) -> HostExperts {
    let w = rng.vec(experts * n * k, 0.5);
    match layout {
        WeightLayout::MlxAffine { bits, group_size } => {
            let (q, s, b) = mlx_affine::quantize(&w, experts * n, k, bits, group_size).unwrap();
            let (s, b) = (round_to(&s, dtype), round_to(&b, dtype));
            let (words, groups) = (mlx_affine::packed_row_len(k, bits), k / group_size);
            let mut values = Vec::with_capacity(w.len());
            let mut row = vec![0f32; k];
            for r in 0..experts * n {
                mlx_affine::dequantize_row(
                    &q[r * words..(r + 1) * words],
                    &s[r * groups..(r + 1) * groups],
                    &b[r * groups..(r + 1) * groups],
                    bits,
                    group_size,
                    &mut row,
                )
                .unwrap();
                values.extend(to_f64(&row));
            }
            HostExperts {
                layout,
                stored: Stored::Mlx {
                    words: q,
                    scales: s,
                    biases: b,
                },
                dtype,
                values,
                experts,
                n,
                k,
            }
        }
        WeightLayout::Gguf(t) => {
            let blocks: Vec<u8> = w
                .chunks(k)
                .flat_map(|row| ggml::quantize_row(t, row).unwrap())
                .collect();
            let mut values = vec![0f32; w.len()];
            ggml::dequantize_row(t, &blocks, &mut values).unwrap();
            HostExperts {
                layout,
                values: to_f64(&values),
                stored: Stored::Ggml(blocks),
                dtype,
                experts,
                n,
                k,
            }
        }
        WeightLayout::Dense => {
            let w = round_to(&w, dtype);
            HostExperts {
                layout,
                values: to_f64(&w),
                stored: Stored::Dense(w),
                dtype,
                experts,
                n,
                k,
            }
        }
    }
}

fn floats(dev: &Device, v: &[f32], shape: &[usize], dtype: DType) -> Tensor {
    match dtype {
        DType::F16 => {
            let h: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
            dev.from_slice(&h, shape)
        }
        DType::BF16 => {
            let h: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
            dev.from_slice(&h, shape)
        }
        _ => dev.from_slice(v, shape),
    }
    .unwrap()
}

impl HostExperts {
    fn upload(&self, dev: &Device) -> ExpertLinear {
        let (e, n, k) = (self.experts, self.n, self.k);
        let tensors = match (&self.stored, self.layout) {
            (Stored::Dense(w), _) => vec![floats(dev, w, &[e, n, k], self.dtype)],
            (Stored::Ggml(blocks), _) => {
                vec![dev.from_slice(blocks, &[e, blocks.len() / e]).unwrap()]
            }
            (
                Stored::Mlx {
                    words,
                    scales,
                    biases,
                },
                WeightLayout::MlxAffine { bits, group_size },
            ) => {
                let row_words = mlx_affine::packed_row_len(k, bits);
                let groups = k / group_size;
                vec![
                    dev.from_slice(words, &[e, n, row_words]).unwrap(),
                    floats(dev, scales, &[e, n, groups], self.dtype),
                    floats(dev, biases, &[e, n, groups], self.dtype),
                ]
            }
            _ => unreachable!("MLX words come with an MLX layout"),
        };
        ExpertLinear::new("experts", self.layout, tensors, e, n, k).unwrap()
    }

    /// Σ_c W_e[r, c]·x[c] in f64.
    fn dot(&self, e: usize, r: usize, x: &[f64]) -> f64 {
        let row = &self.values[(e * self.n + r) * self.k..][..self.k];
        row.iter().zip(x).map(|(w, x)| w * x).sum()
    }

    fn describe(&self) -> String {
        let dtype = match self.stored {
            Stored::Ggml(_) => String::new(),
            _ => format!(" {}", self.dtype),
        };
        format!(
            "{}{dtype} [{}, {}, {}]",
            self.layout.variant(),
            self.experts,
            self.n,
            self.k
        )
    }
}

fn act_ref(f: UnaryFn, x: f64) -> f64 {
    match f {
        UnaryFn::Silu => x / (1.0 + (-x).exp()),
        UnaryFn::GeluTanh => {
            0.5 * x * (1.0 + (0.7978845608028654 * (x + 0.044715 * x * x * x)).tanh())
        }
        UnaryFn::GeluExact => unreachable!("not used here"),
    }
}

/// Every stored form the experts come in: dense f32/f16/bf16 (k a multiple of 32 or not),
/// MLX affine of several widths, groups and scale dtypes, and each quantized ggml type.
fn cases(rng: &mut Rng) -> Vec<HostExperts> {
    let mlx = |bits, group_size| WeightLayout::MlxAffine { bits, group_size };
    let ggml = |t| WeightLayout::Gguf(t);
    vec![
        host_experts(rng, WeightLayout::Dense, DType::F32, 5, 37, 64),
        host_experts(rng, WeightLayout::Dense, DType::F16, 5, 37, 72),
        host_experts(rng, WeightLayout::Dense, DType::BF16, 4, 19, 96),
        host_experts(rng, mlx(4, 64), DType::F16, 5, 37, 128),
        host_experts(rng, mlx(4, 32), DType::BF16, 6, 45, 96),
        host_experts(rng, mlx(8, 64), DType::F32, 5, 21, 192),
        host_experts(rng, mlx(3, 32), DType::F16, 3, 33, 64),
        host_experts(rng, mlx(6, 128), DType::BF16, 4, 17, 256),
        // One token: several blocks a slot, each tile's k split between warps.
        host_experts(rng, mlx(4, 64), DType::BF16, 4, 300, 2048),
        host_experts(rng, ggml(GgmlType::Q4_0), DType::F32, 5, 37, 96),
        host_experts(rng, ggml(GgmlType::Q4_1), DType::F32, 4, 21, 64),
        host_experts(rng, ggml(GgmlType::Q5_0), DType::F32, 3, 19, 96),
        host_experts(rng, ggml(GgmlType::Q5_1), DType::F32, 4, 23, 64),
        host_experts(rng, ggml(GgmlType::Q8_0), DType::F32, 5, 33, 128),
        host_experts(rng, ggml(GgmlType::Q4K), DType::F32, 4, 37, 256),
        host_experts(rng, ggml(GgmlType::Q5K), DType::F32, 3, 17, 512),
        host_experts(rng, ggml(GgmlType::Q6K), DType::F32, 4, 29, 256),
        // One token on tensor cores: Q4_K; Q6_K (plain only; rows of three super-blocks, as
        // Qwen3-30B-A3B's down experts); Q8_0 rows off quads (words).
        host_experts(rng, ggml(GgmlType::Q4K), DType::F32, 4, 300, 1024),
        host_experts(rng, ggml(GgmlType::Q6K), DType::F32, 4, 400, 768),
        host_experts(rng, ggml(GgmlType::Q8_0), DType::F32, 3, 300, 960),
    ]
}

/// One token (the decode path), 20 (on CUDA the grouped path's 16-slot tiles where the experts
/// hold at most 16 slots on average: all but the plain products of 3 experts; an expert may
/// take two tiles) and 70 (its 128-slot tiles).
const TOKENS: [usize; 3] = [1, 20, 70];

/// The relative tolerance of a gathered product on `dev`: `exact`, or on CUDA where tensor
/// cores multiply (x rounded to f16) `rounded`: many tokens (the tiles, which round the weights
/// to f16 as well; f32 weights stay on the f32 tiles), and one token of MLX 4- and 8-bit or
/// ggml experts of more than 2^18 − 1 weights, gate and up together (matvec_tc.cu's gathered
/// kernels, where they take the format: rounded is then an upper bound).
fn gather_tol(
    dev: &Device,
    w: &HostExperts,
    (m, gated): (usize, bool),
    (exact, rounded): (f64, f64),
) -> f64 {
    let f32_weights = w.layout == WeightLayout::Dense && w.dtype == DType::F32;
    let weights = w.n * w.k * if gated { 2 } else { 1 };
    let tc_format = matches!(
        w.layout,
        WeightLayout::MlxAffine { bits: 4 | 8, .. } | WeightLayout::Gguf(_)
    );
    let tc_matvec = tc_format && weights >= 1 << 18;
    if dev.is_cpu() || f32_weights || (m == 1 && !tc_matvec) {
        exact
    } else {
        rounded
    }
}

#[test]
fn gather_matmul_matches_reference() {
    let mut rng = Rng(21);
    let devices = devices();
    for w in cases(&mut rng) {
        for m in TOKENS {
            for per_slot in [false, true] {
                let top_k = 3.min(w.experts);
                let rows = if per_slot { m * top_k } else { m };
                let x = rng.vec(rows * w.k, 1.0);
                let x64 = to_f64(&x);
                let ids = expert_ids(&mut rng, m, top_k, w.experts);
                let mut want = Vec::with_capacity(m * top_k * w.n);
                for (s, &e) in ids.iter().enumerate() {
                    let xr = if per_slot { s } else { s / top_k };
                    for r in 0..w.n {
                        want.push(w.dot(e as usize, r, &x64[xr * w.k..(xr + 1) * w.k]));
                    }
                }
                let mut cpu: Option<Vec<f32>> = None;
                for dev in &devices {
                    let what = format!("{dev:?} gather {} m={m} per_slot={per_slot}", w.describe());
                    let weight = w.upload(dev);
                    let x_shape = if per_slot {
                        vec![m, top_k, w.k]
                    } else {
                        vec![m, w.k]
                    };
                    let xt = dev.from_slice(&x, &x_shape).unwrap();
                    let idt = dev.from_slice(&ids, &[m, top_k]).unwrap();
                    let out = poisoned(dev, &[m, top_k, w.n]).unwrap();
                    run(dev, |enc| ops::gather_matmul(enc, &xt, &idt, &weight, &out)).unwrap();
                    let got = out.to_vec::<f32>().unwrap();
                    let tol = gather_tol(dev, &w, (m, false), (2e-5, 1e-3));
                    check_device(&what, got, &want, &mut cpu, tol);
                }
            }
        }
    }
}

/// Every token's first slot routed to expert 0 of many: the grid's row tiles are planned for
/// an even share of the slots, so the blocks of expert 0 loop over several tiles of its slots,
/// while most experts get a few slots or none. Plain and gated products, against f64.
#[test]
fn skewed_routing_loops_over_an_experts_tiles() {
    let mut rng = Rng(41);
    let devices = devices();
    let (experts, n, k, m, top_k) = (40, 150, 128, 300, 2);
    let mlx4 = WeightLayout::MlxAffine {
        bits: 4,
        group_size: 64,
    };
    let gate = host_experts(&mut rng, mlx4, DType::F16, experts, n, k);
    let up = host_experts(&mut rng, mlx4, DType::F16, experts, n, k);
    let x = rng.vec(m * k, 1.0);
    let x64 = to_f64(&x);
    let mut ids = Vec::with_capacity(m * top_k);
    for _ in 0..m {
        ids.extend([0, 1 + (rng.next_u64() % (experts as u64 - 1)) as u32]);
    }
    let (mut plain, mut gated) = (Vec::new(), Vec::new());
    for (s, &e) in ids.iter().enumerate() {
        let xr = &x64[(s / top_k) * k..][..k];
        for r in 0..n {
            let g = gate.dot(e as usize, r, xr);
            plain.push(g);
            gated.push(act_ref(UnaryFn::Silu, g) * up.dot(e as usize, r, xr));
        }
    }
    let (mut cpu_plain, mut cpu_gated) = (None, None);
    for dev in &devices {
        let (gw, uw) = (gate.upload(dev), up.upload(dev));
        let xt = dev.from_slice(&x, &[m, k]).unwrap();
        let idt = dev.from_slice(&ids, &[m, top_k]).unwrap();
        let out = poisoned(dev, &[m, top_k, n]).unwrap();
        run(dev, |enc| ops::gather_matmul(enc, &xt, &idt, &gw, &out)).unwrap();
        let tol = gather_tol(dev, &gate, (m, false), (2e-5, 1e-3));
        let what = format!("{dev:?} skewed gather");
        check_device(&what, out.to_vec().unwrap(), &plain, &mut cpu_plain, tol);
        let out = poisoned(dev, &[m, top_k, n]).unwrap();
        run(dev, |enc| {
            ops::gather_gated_matmul(enc, &xt, None, &idt, &gw, &uw, UnaryFn::Silu, &out)
        })
        .unwrap();
        let tol = gather_tol(dev, &gate, (m, true), (5e-5, 2e-3));
        let what = format!("{dev:?} skewed gated gather");
        check_device(&what, out.to_vec().unwrap(), &gated, &mut cpu_gated, tol);
    }
}

/// The MoE block's input norms: none, and an RMSNorm with each weight offset.
const NORMS: [Option<bool>; 3] = [None, Some(false), Some(true)];
const NORM_EPS: f32 = 1e-5;

/// f64 RMSNorm of each row of x `[rows, k]`, weight g (+ 1 with `unit_offset`).
fn rms_norm_ref(x: &[f32], g: &[f32], unit_offset: bool) -> Vec<f64> {
    let offset = if unit_offset { 1.0 } else { 0.0 };
    x.chunks_exact(g.len())
        .flat_map(|row| {
            let row = to_f64(row);
            let ms = row.iter().map(|v| v * v).sum::<f64>() / g.len() as f64;
            let r = 1.0 / (ms + NORM_EPS as f64).sqrt();
            let scaled: Vec<f64> = row
                .iter()
                .zip(g)
                .map(|(v, &w)| v * r * (w as f64 + offset))
                .collect();
            scaled
        })
        .collect()
}

/// Each stored form, one token and many, without and with the folded input norm (the norm
/// weight after ids), against norm then product in f64 and, on CUDA, against the CPU.
#[test]
fn gather_gated_matmul_matches_reference() {
    let mut rng = Rng(31);
    let devices = devices();
    let all = cases(&mut rng);
    // Up weights stored like each gate.
    for (i, gate) in all.iter().enumerate() {
        let (dtype, layout) = (gate.dtype, gate.layout);
        let up = host_experts(&mut rng, layout, dtype, gate.experts, gate.n, gate.k);
        let f = if i % 2 == 0 {
            UnaryFn::Silu
        } else {
            UnaryFn::GeluTanh
        };
        for m in TOKENS {
            for unit_offset in NORMS {
                let top_k = 2;
                let x = rng.vec(m * gate.k, 1.0);
                let g = rng.vec(gate.k, 1.0);
                let x64 = match unit_offset {
                    Some(offset) => rms_norm_ref(&x, &g, offset),
                    None => to_f64(&x),
                };
                let ids = expert_ids(&mut rng, m, top_k, gate.experts);
                let mut want = Vec::new();
                for (s, &e) in ids.iter().enumerate() {
                    let xr = &x64[(s / top_k) * gate.k..][..gate.k];
                    let e = e as usize;
                    for r in 0..gate.n {
                        want.push(act_ref(f, gate.dot(e, r, xr)) * up.dot(e, r, xr));
                    }
                }
                let mut cpu: Option<Vec<f32>> = None;
                for dev in &devices {
                    let what = format!(
                        "{dev:?} gated {} {f:?} m={m} norm={unit_offset:?}",
                        gate.describe()
                    );
                    let (gw, uw) = (gate.upload(dev), up.upload(dev));
                    let xt = dev.from_slice(&x, &[m, gate.k]).unwrap();
                    let gt = dev.from_slice(&g, &[gate.k]).unwrap();
                    let norm = unit_offset.map(|unit_offset| {
                        let p = PreNorm {
                            eps: NORM_EPS,
                            unit_offset,
                        };
                        (&gt, p)
                    });
                    let idt = dev.from_slice(&ids, &[m, top_k]).unwrap();
                    let out = poisoned(dev, &[m, top_k, gate.n]).unwrap();
                    run(dev, |enc| {
                        ops::gather_gated_matmul(enc, &xt, norm, &idt, &gw, &uw, f, &out)
                    })
                    .unwrap();
                    let got = out.to_vec::<f32>().unwrap();
                    let tol = gather_tol(dev, gate, (m, true), (5e-5, 2e-3));
                    check_device(&what, got, &want, &mut cpu, tol);
                }
            }
        }
    }
}

/// On the CPU the folded norm is `rms_norm` followed by the plain op, bit for bit.
#[test]
fn folded_norm_equals_rms_norm_then_gather_on_cpu() {
    let mut rng = Rng(33);
    let dev = Device::cpu();
    let mlx = WeightLayout::MlxAffine {
        bits: 4,
        group_size: 32,
    };
    let (experts, top_k, n, k) = (6, 2, 45, 96);
    let gate = host_experts(&mut rng, mlx, DType::BF16, experts, n, k).upload(&dev);
    let up = host_experts(&mut rng, mlx, DType::BF16, experts, n, k).upload(&dev);
    for m in TOKENS {
        for unit_offset in [false, true] {
            let x = dev.from_slice(&rng.vec(m * k, 1.0), &[m, k]).unwrap();
            let g = dev.from_slice(&rng.vec(k, 1.0), &[k]).unwrap();
            let ids = expert_ids(&mut rng, m, top_k, experts);
            let ids = dev.from_slice(&ids, &[m, top_k]).unwrap();
            let norm = PreNorm {
                eps: NORM_EPS,
                unit_offset,
            };
            let normed = poisoned(&dev, &[m, k]).unwrap();
            let (fused, unfused) = (
                poisoned(&dev, &[m, top_k, n]).unwrap(),
                poisoned(&dev, &[m, top_k, n]).unwrap(),
            );
            run(&dev, |enc| {
                let f = UnaryFn::Silu;
                ops::gather_gated_matmul(enc, &x, Some((&g, norm)), &ids, &gate, &up, f, &fused)?;
                ops::rms_norm(enc, &x, &g, NORM_EPS, unit_offset, &normed)?;
                ops::gather_gated_matmul(enc, &normed, None, &ids, &gate, &up, f, &unfused)
            })
            .unwrap();
            let what = format!("m={m} unit_offset={unit_offset}");
            assert_same::<f32>(&what, &fused, &unfused);
        }
    }
}

#[test]
fn moe_combine_adds_weighted_slots_to_the_residual() {
    let mut rng = Rng(41);
    for dev in devices() {
        for (m, top_k, n) in [(1, 8, 2048), (7, 3, 45)] {
            let y = rng.vec(m * top_k * n, 1.0);
            let w = rng.vec(m * top_k, 1.0);
            let res = rng.vec(m * n, 1.0);
            let want: Vec<f64> = (0..m * n)
                .map(|i| {
                    let (row, c) = (i / n, i % n);
                    let sum: f64 = (0..top_k)
                        .map(|j| w[row * top_k + j] as f64 * y[(row * top_k + j) * n + c] as f64)
                        .sum();
                    res[i] as f64 + sum
                })
                .collect();
            let yt = dev.from_slice(&y, &[m, top_k, n]).unwrap();
            let wt = dev.from_slice(&w, &[m, top_k]).unwrap();
            let rt = dev.from_slice(&res, &[m, n]).unwrap();
            let out = poisoned(&dev, &[m, n]).unwrap();
            run(&dev, |enc| ops::moe_combine(enc, &yt, &wt, &rt, &out)).unwrap();
            assert_close(
                &format!("{dev:?} combine m={m}"),
                &out.to_vec::<f32>().unwrap(),
                &want,
                1e-6,
            );
        }
    }
}

/// The routing op's routing and product are `moe_route` then `gather_gated_matmul`, bit for
/// bit: one token and three (routed by a launch in front on CUDA), every routing, with and
/// without the folded norm, small experts (moe.cu's matvec) and large (matvec_tc.cu's, on CUDA
/// routing in the product's kernel).
#[test]
fn routed_gated_matmul_equals_route_then_gated() {
    let mut rng = Rng(45);
    let mlx = |group_size| WeightLayout::MlxAffine {
        bits: 4,
        group_size,
    };
    let shapes = [(mlx(32), 8, 45, 96, 3), (mlx(64), 6, 300, 2048, 4)];
    for (layout, experts, n, k, top_k) in shapes {
        let gate_h = host_experts(&mut rng, layout, DType::BF16, experts, n, k);
        let up_h = host_experts(&mut rng, layout, DType::BF16, experts, n, k);
        for dev in devices() {
            let (gate, up) = (gate_h.upload(&dev), up_h.upload(&dev));
            let g = dev.from_slice(&rng.vec(k, 1.0), &[k]).unwrap();
            for (m, routing, norm) in [
                (1, Routing::SoftmaxTopK { normalize: true }, true),
                (1, Routing::SoftmaxTopK { normalize: false }, false),
                (1, Routing::TopKSoftmax, true),
                (3, Routing::SoftmaxTopK { normalize: true }, true),
            ] {
                let what = format!("{dev:?} {experts}×{n}×{k} m={m} {routing:?} norm={norm}");
                let x = dev.from_slice(&rng.vec(m * k, 1.0), &[m, k]).unwrap();
                let logits = dev
                    .from_slice(&rng.vec(m * experts, 2.0), &[m, experts])
                    .unwrap();
                let norm = norm.then_some((
                    &g,
                    PreNorm {
                        eps: NORM_EPS,
                        unit_offset: false,
                    },
                ));
                let outputs = || {
                    let ids = dev
                        .from_slice(&vec![u32::MAX; m * top_k], &[m, top_k])
                        .unwrap();
                    let w = poisoned(&dev, &[m, top_k]).unwrap();
                    (ids, w, poisoned(&dev, &[m, top_k, n]).unwrap())
                };
                let (ids_a, w_a, out_a) = outputs();
                let (ids_b, w_b, out_b) = outputs();
                let f = UnaryFn::Silu;
                run(&dev, |enc| {
                    ops::moe_route(enc, &logits, top_k, routing, &ids_a, &w_a)?;
                    ops::gather_gated_matmul(enc, &x, norm, &ids_a, &gate, &up, f, &out_a)?;
                    let route = (&logits, Route { top_k, routing });
                    let routed = (&ids_b, &w_b);
                    ops::routed_gated_matmul(enc, &x, norm, route, routed, (&gate, &up), f, &out_b)
                })
                .unwrap();
                assert_same::<u32>(&what, &ids_a, &ids_b);
                assert_same::<f32>(&what, &w_a, &w_b);
                assert_same::<f32>(&what, &out_a, &out_b);
            }
        }
    }
}

/// The combining op is `gather_matmul` then `moe_combine`, bit for bit: one token (on CUDA
/// the down product's last slot block over each row tile sums the slots, for experts that take
/// tensor cores) and three, small and large experts, x shared by the slots or one a slot.
#[test]
fn gather_matmul_combine_equals_gather_then_combine() {
    let mut rng = Rng(47);
    let mlx = |bits, group_size| WeightLayout::MlxAffine { bits, group_size };
    let shapes = [(mlx(4, 32), 8, 45, 96, 3), (mlx(8, 64), 6, 1000, 768, 4)];
    for (layout, experts, n, k, top_k) in shapes {
        let w_h = host_experts(&mut rng, layout, DType::F16, experts, n, k);
        for dev in devices() {
            let w = w_h.upload(&dev);
            for (m, per_slot) in [(1, true), (1, false), (3, true)] {
                let what = format!("{dev:?} {experts}×{n}×{k} m={m} per_slot={per_slot}");
                let x_shape = if per_slot {
                    vec![m, top_k, k]
                } else {
                    vec![m, k]
                };
                let x_len = x_shape.iter().product();
                let x = dev.from_slice(&rng.vec(x_len, 1.0), &x_shape).unwrap();
                let ids = expert_ids(&mut rng, m, top_k, experts);
                let ids = dev.from_slice(&ids, &[m, top_k]).unwrap();
                let weights = dev
                    .from_slice(&rng.vec(m * top_k, 1.0), &[m, top_k])
                    .unwrap();
                let residual = dev.from_slice(&rng.vec(m * n, 1.0), &[m, n]).unwrap();
                let y = poisoned(&dev, &[m, top_k, n]).unwrap();
                let (a, b) = (
                    poisoned(&dev, &[m, n]).unwrap(),
                    poisoned(&dev, &[m, n]).unwrap(),
                );
                // Twice: the counters the first run leaves must serve the second.
                for round in 0..2 {
                    run(&dev, |enc| {
                        ops::gather_matmul(enc, &x, &ids, &w, &y)?;
                        ops::moe_combine(enc, &y, &weights, &residual, &a)?;
                        ops::gather_matmul_combine(enc, &x, &ids, &w, (&weights, &residual), &b)
                    })
                    .unwrap();
                    assert_same::<f32>(&format!("{what} round {round}"), &a, &b);
                }
            }
        }
    }
}

/// A captured route → gated experts → down → combine replays with the routing of new router
/// logits (ids live in a device buffer), bit-identical to recording it afresh: routed and
/// combined by launches of their own, and as the decoder runs them, by the gated product and
/// the down product (on CUDA the tensor-core kernels, gate and up of 2^18 weights routing
/// their token, down's blocks summing the slots).
#[test]
fn replayed_graph_follows_new_routing() {
    let mut rng = Rng(51);
    let mlx = WeightLayout::MlxAffine {
        bits: 4,
        group_size: 32,
    };
    let (experts, top_k, h, inter) = (8, 2, 1024, 256);
    let gate_h = host_experts(&mut rng, mlx, DType::F16, experts, inter, h);
    let up_h = host_experts(&mut rng, mlx, DType::F16, experts, inter, h);
    let down_h = host_experts(&mut rng, mlx, DType::F16, experts, h, inter);
    let x = rng.vec(h, 1.0);
    let logits_a = rng.vec(experts, 2.0);
    let logits_b: Vec<f32> = logits_a.iter().rev().copied().collect();
    for (dev, routed) in devices()
        .into_iter()
        .flat_map(|d| [(d.clone(), false), (d, true)])
    {
        let (gate, up, down) = (gate_h.upload(&dev), up_h.upload(&dev), down_h.upload(&dev));
        let xt = dev.from_slice(&x, &[1, h]).unwrap();
        let logits = dev.from_slice(&logits_a, &[1, experts]).unwrap();
        let ids = dev.zeros(&[1, top_k], DType::U32).unwrap();
        let weights = dev.zeros(&[1, top_k], DType::F32).unwrap();
        let act = dev.zeros(&[1, top_k, inter], DType::F32).unwrap();
        let y = dev.zeros(&[1, top_k, h], DType::F32).unwrap();
        let out = dev.zeros(&[1, h], DType::F32).unwrap();
        let routing = Routing::SoftmaxTopK { normalize: true };
        let record = |enc: &mut CommandEncoder| -> Result<()> {
            let f = UnaryFn::Silu;
            if routed {
                let route = (&logits, Route { top_k, routing });
                let experts = (&gate, &up);
                ops::routed_gated_matmul(
                    enc,
                    &xt,
                    None,
                    route,
                    (&ids, &weights),
                    experts,
                    f,
                    &act,
                )?;
            } else {
                ops::moe_route(enc, &logits, top_k, routing, &ids, &weights)?;
                ops::gather_gated_matmul(enc, &xt, None, &ids, &gate, &up, f, &act)?;
            }
            if routed {
                ops::gather_matmul_combine(enc, &act, &ids, &down, (&weights, &xt), &out)
            } else {
                ops::gather_matmul(enc, &act, &ids, &down, &y)?;
                ops::moe_combine(enc, &y, &weights, &xt, &out)
            }
        };
        let mut enc = CommandEncoder::new(&dev);
        enc.begin_capture().unwrap();
        record(&mut enc).unwrap();
        let mut graph = enc.end_capture().unwrap();
        let mut replayed = Vec::new();
        for l in [&logits_a, &logits_b] {
            logits.write(l).unwrap();
            graph.replay().unwrap();
            dev.synchronize().unwrap();
            replayed.push((ids.to_vec::<u32>().unwrap(), out.to_vec::<f32>().unwrap()));
        }
        assert_ne!(
            replayed[0].0, replayed[1].0,
            "the two logit rows route alike"
        );
        for (l, (ids_replayed, out_replayed)) in [&logits_a, &logits_b].iter().zip(&replayed) {
            logits.write(l).unwrap();
            run(&dev, record).unwrap();
            assert_eq!(
                ids.to_vec::<u32>().unwrap(),
                *ids_replayed,
                "{dev:?} ids routed={routed}"
            );
            assert_eq!(
                out.to_vec::<f32>().unwrap(),
                *out_replayed,
                "{dev:?} output routed={routed}"
            );
        }
    }
}

#[test]
fn mismatched_operands_are_errors() {
    let dev = Device::cpu();
    let mut rng = Rng(61);
    let w = host_experts(&mut rng, WeightLayout::Dense, DType::F32, 4, 8, 32).upload(&dev);
    let x = dev.zeros(&[2, 32], DType::F32).unwrap();
    let ids = dev.zeros(&[2, 3], DType::U32).unwrap();
    let mut enc = CommandEncoder::new(&dev);
    let bad_out = dev.zeros(&[2, 2, 8], DType::F32).unwrap();
    assert!(ops::gather_matmul(&mut enc, &x, &ids, &w, &bad_out).is_err());
    let bad_x = dev.zeros(&[2, 2, 32], DType::F32).unwrap();
    let out = dev.zeros(&[2, 3, 8], DType::F32).unwrap();
    assert!(ops::gather_matmul(&mut enc, &bad_x, &ids, &w, &out).is_err());
    let logits = dev.zeros(&[2, 4], DType::F32).unwrap();
    let (ids5, w5) = (
        dev.zeros(&[2, 5], DType::U32).unwrap(),
        dev.zeros(&[2, 5], DType::F32).unwrap(),
    );
    assert!(ops::moe_route(&mut enc, &logits, 5, Routing::TopKSoftmax, &ids5, &w5).is_err());
    // An expert id past the last expert is an error on the CPU backend.
    let out_ok = dev.zeros(&[2, 3, 8], DType::F32).unwrap();
    ids.write(&[0u32, 1, 9, 2, 3, 0]).unwrap();
    ops::gather_matmul(&mut enc, &x, &ids, &w, &out_ok).unwrap();
    assert!(enc.commit().is_err());
    // A folded norm's weight must be f32 over x's columns.
    let gated_out = dev.zeros(&[2, 3, 8], DType::F32).unwrap();
    let p = PreNorm {
        eps: NORM_EPS,
        unit_offset: false,
    };
    for bad_norm in [
        dev.zeros(&[31], DType::F32).unwrap(),
        dev.zeros(&[32], DType::F16).unwrap(),
    ] {
        let norm = Some((&bad_norm, p));
        let f = UnaryFn::Silu;
        assert!(ops::gather_gated_matmul(&mut enc, &x, norm, &ids, &w, &w, f, &gated_out).is_err());
    }
    // Stacked tensors whose leading dimension is not the expert count.
    let flat = dev.zeros(&[32, 32], DType::F32).unwrap();
    assert!(ExpertLinear::new("w", WeightLayout::Dense, vec![flat], 4, 8, 32).is_err());
}
