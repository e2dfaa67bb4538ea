//! The CUDA backend against references: every op on random non-zero inputs (odd sizes, every
//! weight layout), outputs poisoned before each run, and captured-graph replay against plain
//! launches. References are computed here in f64; where the CPU backend has the kernel too,
//! the CUDA result is also compared with it. Without a CUDA driver every test prints
//! "skipped: no CUDA driver" and passes.

use half::{bf16, f16};
use mlx_native::backends::cuda;
use mlx_native::core::op::{BinaryFn, PreNorm, UnaryFn, LONG_ROW_KEYS};
use mlx_native::engine::Session;
use mlx_native::models::decoder::Decoder;
use mlx_native::models::synthetic::{self, SyntheticQuant, SyntheticWeights};
use mlx_native::ops::{self, AttentionShape, Linear, RopeTable};
use mlx_native::quant::{GgmlType, WeightLayout};
use mlx_native::{CommandEncoder, DType, Device, Error, Result, SamplingParams, Tensor};

mod common;

use common::{assert_close, k_scale_min, poisoned, run, Rng};

// ---------------------------------------------------------------------------------------------
// Harness

/// The CUDA device, or None (after saying why) when this machine has none.
fn gpu() -> Option<Device> {
    if !cuda::driver_present() {
        println!("skipped: no CUDA driver");
        return None;
    }
    match Device::parse("cuda") {
        Ok(d) => Some(d),
        Err(Error::DeviceUnavailable(why)) => {
            println!("skipped: no CUDA device ({why})");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

/// The GPU with cuBLAS off: prompts of 17 rows and more stay on the crate's tensor-core tiles
/// (where cuBLAS does not load, or `CudaOptions::cublas` is false).
fn gpu_without_cublas() -> Option<Device> {
    gpu()?;
    Some(cuda::cuda_device_with(0, cuda::CudaOptions { cublas: false }).unwrap())
}

/// Floats stored as `dtype` on `dev`, and the values as stored (after rounding).
fn floats(dev: &Device, data: &[f32], shape: &[usize], dtype: DType) -> Result<(Tensor, Vec<f64>)> {
    Ok(match dtype {
        DType::F16 => {
            let h: Vec<f16> = data.iter().map(|&v| f16::from_f32(v)).collect();
            let vals = h.iter().map(|v| v.to_f64()).collect();
            (dev.from_slice(&h, shape)?, vals)
        }
        DType::BF16 => {
            let h: Vec<bf16> = data.iter().map(|&v| bf16::from_f32(v)).collect();
            let vals = h.iter().map(|v| v.to_f64()).collect();
            (dev.from_slice(&h, shape)?, vals)
        }
        _ => (
            dev.from_slice(data, shape)?,
            data.iter().map(|&v| v as f64).collect(),
        ),
    })
}

/// The KV cache dtypes every attention kernel takes.
const KV_TYPES: [DType; 2] = [DType::F32, DType::F16];

/// A cache's or activation's values (f32 or f16) as f32.
fn cache_values(t: &Tensor) -> Result<Vec<f32>> {
    match t.dtype() {
        DType::F16 => Ok(t.to_vec::<f16>()?.iter().map(|v| v.to_f32()).collect()),
        _ => t.to_vec::<f32>(),
    }
}

/// f64 values as an f16 cache holds them (`DType::F16`), else unchanged.
fn stored_as(kv: DType, x: Vec<f64>) -> Vec<f64> {
    match kv {
        DType::F16 => x.iter().map(|&v| f16::from_f64(v).to_f64()).collect(),
        _ => x,
    }
}

/// A cache of `kv` holding `x` (rounded as it stores them) on `dev`, and the values it holds.
fn cache_of(dev: &Device, kv: DType, x: &[f32], shape: &[usize]) -> Result<(Tensor, Vec<f32>)> {
    let (t, vals) = floats(dev, x, shape, kv)?;
    Ok((t, vals.iter().map(|&v| v as f32).collect()))
}

/// An f16 output (f16 activations) filled with NaN.
fn poisoned_half(dev: &Device, shape: &[usize]) -> Result<Tensor> {
    dev.from_slice(&vec![f16::NAN; shape.iter().product()], shape)
}

fn poisoned_u32(dev: &Device, shape: &[usize]) -> Result<Tensor> {
    dev.from_slice(&vec![0xdead_beef_u32; shape.iter().product()], shape)
}

/// Runs `compute` on the GPU and checks it against `want` and against the CPU backend (the
/// reference every GPU kernel answers to).
fn check(
    what: &str,
    dev: &Device,
    compute: impl Fn(&Device) -> Result<Vec<f32>>,
    want: &[f64],
    tol: f64,
) {
    let got = compute(dev).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_close(what, &got, want, tol);
    let cpu = compute(&Device::cpu()).unwrap_or_else(|e| panic!("{what} on the CPU backend: {e}"));
    let cpu: Vec<f64> = cpu.iter().map(|&v| v as f64).collect();
    assert_close(&format!("{what} (vs CPU backend)"), &got, &cpu, tol);
}

const FLOAT_TYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

// ---------------------------------------------------------------------------------------------
// Memory

#[test]
fn device_parse_reports_a_missing_driver() {
    if cuda::driver_present() {
        println!("skipped: a CUDA driver is present");
        return;
    }
    match Device::parse("cuda:0") {
        Err(Error::DeviceUnavailable(msg)) => assert!(msg.contains("no CUDA driver"), "{msg}"),
        other => panic!(
            "expected DeviceUnavailable, got {:?}",
            other.map(|d| d.label().to_string())
        ),
    }
}

#[test]
fn copies_round_trip_at_offsets() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng(1);
    let before = dev.backend().allocated_bytes();
    let data = rng.vec(1001, 3.0);
    let t = dev.from_slice(&data, &[7, 143]).unwrap();
    assert!(dev.backend().allocated_bytes() >= before + 1001 * 4);
    assert_eq!(t.to_vec::<f32>().unwrap(), data);
    let rows = t.narrow_rows(2, 3).unwrap();
    let patch = rng.vec(3 * 143, 1.0);
    rows.write(&patch).unwrap();
    let mut expect = data.clone();
    expect[2 * 143..5 * 143].copy_from_slice(&patch);
    assert_eq!(t.to_vec::<f32>().unwrap(), expect);
    assert_eq!(rows.to_vec::<f32>().unwrap(), patch);

    let host: std::sync::Arc<Vec<u8>> = std::sync::Arc::new(rng.bytes(999));
    let range = 17..17 + 4 * 50;
    let up = dev
        .from_host(host.clone(), range.clone(), &[200], DType::U8)
        .unwrap();
    assert_eq!(up.to_vec::<u8>().unwrap(), host[range].to_vec());
}

// ---------------------------------------------------------------------------------------------
// Norms, RoPE, elementwise

#[test]
fn rms_norm_matches_reference() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng(2);
    let (m, d, eps) = (5, 1537, 1e-5f32);
    let x = rng.vec(m * d, 2.0);
    let w = rng.vec(d, 1.5);
    for dtype in FLOAT_TYPES {
        for unit_offset in [false, true] {
            let wq = floats(&Device::cpu(), &w, &[d], dtype).unwrap().1;
            let mut want = vec![0.0; m * d];
            for r in 0..m {
                let row = &x[r * d..(r + 1) * d];
                let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64;
                let inv = 1.0 / (ms + eps as f64).sqrt();
                for i in 0..d {
                    want[r * d + i] = row[i] as f64 * inv * (wq[i] + unit_offset as u8 as f64);
                }
            }
            let compute = |dev: &Device| {
                let xt = dev.from_slice(&x, &[m, d])?;
                let wt = floats(dev, &w, &[d], dtype)?.0;
                let out = poisoned(dev, &[m, d])?;
                run(dev, |enc| {
                    ops::rms_norm(enc, &xt, &wt, eps, unit_offset, &out)
                })?;
                out.to_vec::<f32>()
            };
            check(
                &format!("rms_norm {dtype} offset={unit_offset}"),
                &dev,
                compute,
                &want,
                1e-6,
            );
            // Into f16 activations: the same values, each rounded once (a value within an ulp
            // of a rounding boundary may round the other way from the f64 reference).
            let want_h = stored_as(DType::F16, want.clone());
            let compute = |dev: &Device| {
                let xt = dev.from_slice(&x, &[m, d])?;
                let wt = floats(dev, &w, &[d], dtype)?.0;
                let out = poisoned_half(dev, &[m, d])?;
                run(dev, |enc| {
                    ops::rms_norm(enc, &xt, &wt, eps, unit_offset, &out)
                })?;
                cache_values(&out)
            };
            let what = format!("rms_norm {dtype} offset={unit_offset} into f16");
            check(&what, &dev, compute, &want_h, 1e-4);
            // A residual add in front (`add_rms_norm`): x = a + b, the sum written too.
            let a = rng.vec(m * d, 1.0);
            let b: Vec<f32> = x.iter().zip(&a).map(|(&x, &a)| x - a).collect();
            let sums: Vec<f64> = a.iter().zip(&b).map(|(&a, &b)| (a + b) as f64).collect();
            for normed_dtype in [DType::F32, DType::F16] {
                let want = match normed_dtype {
                    DType::F16 => want_h.clone(),
                    _ => want.clone(),
                };
                let want: Vec<f64> = sums.iter().chain(&want).copied().collect();
                let compute = |dev: &Device| {
                    let (at, bt) = (dev.from_slice(&a, &[m, d])?, dev.from_slice(&b, &[m, d])?);
                    let wt = floats(dev, &w, &[d], dtype)?.0;
                    let sum = poisoned(dev, &[m, d])?;
                    let normed = match normed_dtype {
                        DType::F16 => poisoned_half(dev, &[m, d])?,
                        _ => poisoned(dev, &[m, d])?,
                    };
                    run(dev, |enc| {
                        ops::add_rms_norm(enc, &at, &bt, &wt, eps, unit_offset, &sum, &normed)
                    })?;
                    Ok([cache_values(&sum)?, cache_values(&normed)?].concat())
                };
                let what = format!("add_rms_norm {dtype} offset={unit_offset} into {normed_dtype}");
                check(&what, &dev, compute, &want, 1e-4);
            }
            // With a residual added in the same dispatch (a block output norm).
            let residual = rng.vec(m * d, 3.0);
            let want: Vec<f64> = want
                .iter()
                .zip(&residual)
                .map(|(&w, &r)| w + r as f64)
                .collect();
            let compute = |dev: &Device| {
                let xt = dev.from_slice(&x, &[m, d])?;
                let wt = floats(dev, &w, &[d], dtype)?.0;
                let rt = dev.from_slice(&residual, &[m, d])?;
                let out = poisoned(dev, &[m, d])?;
                run(dev, |enc| {
                    ops::rms_norm_add(enc, &xt, &wt, eps, unit_offset, &rt, &out)
                })?;
                out.to_vec::<f32>()
            };
            check(
                &format!("rms_norm_add {dtype} offset={unit_offset}"),
                &dev,
                compute,
                &want,
                2e-6,
            );
        }
    }
}

#[test]
fn layer_norm_matches_reference() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng(3);
    let (m, d, eps) = (3, 999, 1e-5f32);
    // An offset mean checks the two-pass variance.
    let x: Vec<f32> = rng.vec(m * d, 1.0).iter().map(|v| v + 3.0).collect();
    let (w, b) = (rng.vec(d, 1.5), rng.vec(d, 0.5));
    for dtype in FLOAT_TYPES {
        let wq = floats(&Device::cpu(), &w, &[d], dtype).unwrap().1;
        let bq = floats(&Device::cpu(), &b, &[d], dtype).unwrap().1;
        let mut want = vec![0.0; m * d];
        for r in 0..m {
            let row: Vec<f64> = x[r * d..(r + 1) * d].iter().map(|&v| v as f64).collect();
            let mean = row.iter().sum::<f64>() / d as f64;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d as f64;
            let inv = 1.0 / (var + eps as f64).sqrt();
            for i in 0..d {
                want[r * d + i] = (row[i] - mean) * inv * wq[i] + bq[i];
            }
        }
        let compute = |dev: &Device| {
            let xt = dev.from_slice(&x, &[m, d])?;
            let wt = floats(dev, &w, &[d], dtype)?.0;
            let bt = floats(dev, &b, &[d], dtype)?.0;
            let out = poisoned(dev, &[m, d])?;
            run(dev, |enc| ops::layer_norm(enc, &xt, &wt, &bt, eps, &out))?;
            out.to_vec::<f32>()
        };
        check(&format!("layer_norm {dtype}"), &dev, compute, &want, 1e-5);
    }
}

/// RoPE in f64 of `x` `[m, heads*head_dim]`, row r at position pos + r (angles formed in
/// f32, as every backend forms them); dims past 2·inv_freq.len() pass through.
fn rope_ref(
    x: &[f32],
    heads: usize,
    hd: usize,
    inv_freq: &[f32],
    pos: u32,
    trad: bool,
    mscale: f32,
) -> Vec<f64> {
    let half = inv_freq.len();
    let mut want: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    for (i, head) in want.chunks_exact_mut(hd).enumerate() {
        let p = pos + (i / heads) as u32;
        for (j, &freq) in inv_freq.iter().enumerate() {
            let (s, c) = ((p as f32 * freq) as f64).sin_cos();
            let (s, c) = (s * mscale as f64, c * mscale as f64);
            let (i0, i1) = if trad {
                (2 * j, 2 * j + 1)
            } else {
                (j, j + half)
            };
            let (x0, x1) = (head[i0], head[i1]);
            head[i0] = x0 * c - x1 * s;
            head[i1] = x0 * s + x1 * c;
        }
    }
    want
}

fn inv_freq_table(rotary_dims: usize) -> Vec<f32> {
    (0..rotary_dims / 2)
        .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / rotary_dims as f32))
        .collect()
}

#[test]
fn rope_matches_reference() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng(4);
    let (m, n_heads, head_dim, pos) = (3, 5, 22, 1234u32);
    let x = rng.vec(m * n_heads * head_dim, 2.0);
    for rotary_dims in [22, 10] {
        for traditional in [false, true] {
            for mscale in [1.0f32, 1.3] {
                let inv_freq = inv_freq_table(rotary_dims);
                let want = rope_ref(&x, n_heads, head_dim, &inv_freq, pos, traditional, mscale);
                let compute = |dev: &Device| {
                    let xt = dev.from_slice(&x, &[m, n_heads * head_dim])?;
                    let table = RopeTable {
                        inv_freq: dev.from_slice(&inv_freq, &[rotary_dims / 2])?,
                        rotary_dims,
                        mscale,
                    };
                    let post = dev.from_slice(&[pos], &[1])?;
                    let out = poisoned(dev, &[m, n_heads * head_dim])?;
                    run(dev, |enc| {
                        ops::rope(
                            enc,
                            &xt,
                            &table,
                            n_heads,
                            head_dim,
                            traditional,
                            &post,
                            &out,
                        )
                    })?;
                    out.to_vec::<f32>()
                };
                let what =
                    format!("rope dims={rotary_dims} traditional={traditional} mscale={mscale}");
                check(&what, &dev, compute, &want, 1e-5);
            }
        }
    }
}

/// A RoPE + cache append case (`rope_kv_append`, `rope_attention`): q `[m, n_heads·hd]`, k
/// and v `[m, n_kv·hd]`, caches `[n_kv, capacity, hd]`, rows at positions pos….
struct RopeAppendCase {
    n_heads: usize,
    n_kv: usize,
    hd: usize,
    capacity: usize,
    pos: u32,
    rotary_dims: usize,
    traditional: bool,
    qkv: [Vec<f32>; 3],
    caches: [Vec<f32>; 2],
    /// The caches' dtype (f32 or f16).
    kv: DType,
}

/// A `RopeAppendCase`'s operands on a device.
struct RopeAppendOperands {
    qkv: [Tensor; 3],
    table: RopeTable,
    pos: Tensor,
    caches: [Tensor; 2],
}

impl RopeAppendCase {
    fn m(&self) -> usize {
        self.qkv[0].len() / (self.n_heads * self.hd)
    }

    /// q rotated, and the caches with the rotated k rows and the v rows stored at pos.., in
    /// f64 (the caches' values as their dtype holds them).
    fn want(&self) -> (Vec<f64>, [Vec<f64>; 2]) {
        let (hd, n_kv) = (self.hd, self.n_kv);
        let inv_freq = inv_freq_table(self.rotary_dims);
        let rope =
            |x: &[f32], heads| rope_ref(x, heads, hd, &inv_freq, self.pos, self.traditional, 1.0);
        let [q, k, v] = &self.qkv;
        let rows = [rope(k, n_kv), v.iter().map(|&x| x as f64).collect()];
        let filled = [0, 1].map(|i| {
            let mut cache: Vec<f64> = self.caches[i].iter().map(|&x| x as f64).collect();
            for r in 0..self.m() {
                for g in 0..n_kv {
                    let at = (g * self.capacity + self.pos as usize + r) * hd;
                    cache[at..at + hd].copy_from_slice(&rows[i][(r * n_kv + g) * hd..][..hd]);
                }
            }
            stored_as(self.kv, cache)
        });
        (rope(q, self.n_heads), filled)
    }

    fn upload(&self, dev: &Device) -> Result<RopeAppendOperands> {
        let (m, hd) = (self.m(), self.hd);
        let up = |x: &[f32], shape: &[usize]| dev.from_slice(x, shape);
        let [q, k, v] = &self.qkv;
        let (q_shape, kv_shape) = ([m, self.n_heads * hd], [m, self.n_kv * hd]);
        let qkv = [up(q, &q_shape)?, up(k, &kv_shape)?, up(v, &kv_shape)?];
        let cache_shape = [self.n_kv, self.capacity, hd];
        let cache =
            |i: usize| Ok::<_, Error>(floats(dev, &self.caches[i], &cache_shape, self.kv)?.0);
        let caches = [cache(0)?, cache(1)?];
        Ok(RopeAppendOperands {
            qkv,
            table: RopeTable {
                inv_freq: dev
                    .from_slice(&inv_freq_table(self.rotary_dims), &[self.rotary_dims / 2])?,
                rotary_dims: self.rotary_dims,
                mscale: 1.0,
            },
            pos: dev.from_slice(&[self.pos], &[1])?,
            caches,
        })
    }
}

/// The fused attention input stage: q rotated, k rotated into its cache rows, v appended; the
/// cache rows around them untouched. Outputs concatenated as q, k cache, v cache.
#[test]
fn rope_kv_append_matches_reference() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng(14);
    let (m, n_heads, n_kv, hd, capacity, pos) = (3, 6, 2, 22, 13, 9u32);
    let qkv = [
        rng.vec(m * n_heads * hd, 2.0),
        rng.vec(m * n_kv * hd, 2.0),
        rng.vec(m * n_kv * hd, 2.0),
    ];
    let caches = [
        rng.vec(n_kv * capacity * hd, 1.0),
        rng.vec(n_kv * capacity * hd, 1.0),
    ];
    for ((rotary_dims, traditional), kv) in [(22, false), (10, true)]
        .into_iter()
        .flat_map(|r| KV_TYPES.map(|kv| (r, kv)))
    {
        let case = RopeAppendCase {
            n_heads,
            n_kv,
            hd,
            capacity,
            pos,
            rotary_dims,
            traditional,
            qkv: qkv.clone(),
            caches: caches.clone(),
            kv,
        };
        let (mut want, filled) = case.want();
        want.extend(filled.concat());
        let compute = |dev: &Device| {
            let o = case.upload(dev)?;
            let q_out = poisoned(dev, &[m, n_heads * hd])?;
            let [kc, vc] = &o.caches;
            run(dev, |enc| {
                let [q, k, v] = &o.qkv;
                ops::rope_kv_append(
                    enc,
                    [q, k, v],
                    &o.table,
                    n_heads,
                    traditional,
                    &o.pos,
                    &q_out,
                    (kc, vc),
                )
            })?;
            let mut got = q_out.to_vec::<f32>()?;
            got.extend(cache_values(kc)?);
            got.extend(cache_values(vc)?);
            Ok(got)
        };
        let what =
            format!("rope_kv_append dims={rotary_dims} traditional={traditional} caches {kv}");
        check(&what, &dev, compute, &want, 1e-5);
    }
}

fn activation_ref(f: UnaryFn, x: f64) -> f64 {
    match f {
        UnaryFn::Silu => x / (1.0 + (-x).exp()),
        UnaryFn::GeluExact => 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2)),
        UnaryFn::GeluTanh => {
            0.5 * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
        }
    }
}

/// erf by its Maclaurin series (|x| ≤ 6 here converges in f64 well below test tolerance).
fn erf(x: f64) -> f64 {
    if x.abs() > 6.0 {
        return x.signum();
    }
    let (mut term, mut sum, mut n) = (x, x, 0.0);
    while term.abs() > 1e-17 * sum.abs().max(1e-300) {
        n += 1.0;
        term *= -x * x / n;
        sum += term / (2.0 * n + 1.0);
    }
    sum * 2.0 / std::f64::consts::PI.sqrt()
}

#[test]
fn elementwise_ops_match_reference() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng(5);
    let shape = [7, 1001];
    let n = 7 * 1001;
    let (a, b) = (rng.vec(n, 5.0), rng.vec(n, 3.0));
    for f in [UnaryFn::Silu, UnaryFn::GeluExact, UnaryFn::GeluTanh] {
        let want: Vec<f64> = a.iter().map(|&v| activation_ref(f, v as f64)).collect();
        let compute = |dev: &Device| {
            let (x, out) = (dev.from_slice(&a, &shape)?, poisoned(dev, &shape)?);
            run(dev, |enc| ops::unary(enc, f, &x, &out))?;
            out.to_vec::<f32>()
        };
        check(&format!("unary {f:?}"), &dev, compute, &want, 1e-6);

        let want: Vec<f64> = a
            .iter()
            .zip(&b)
            .map(|(&g, &u)| activation_ref(f, g as f64) * u as f64)
            .collect();
        let compute = |dev: &Device| {
            let (g, u) = (dev.from_slice(&a, &shape)?, dev.from_slice(&b, &shape)?);
            let out = poisoned(dev, &shape)?;
            run(dev, |enc| ops::gated_activation(enc, f, &g, &u, &out))?;
            out.to_vec::<f32>()
        };
        check(&format!("gated {f:?}"), &dev, compute, &want, 1e-6);
        let want_h = stored_as(DType::F16, want);
        let compute = |dev: &Device| {
            let (g, u) = (dev.from_slice(&a, &shape)?, dev.from_slice(&b, &shape)?);
            let out = poisoned_half(dev, &shape)?;
            run(dev, |enc| ops::gated_activation(enc, f, &g, &u, &out))?;
            cache_values(&out)
        };
        check(
            &format!("gated {f:?} into f16"),
            &dev,
            compute,
            &want_h,
            1e-4,
        );
    }
    for f in [BinaryFn::Add, BinaryFn::Mul] {
        let want: Vec<f64> = a
            .iter()
            .zip(&b)
            .map(|(&x, &y)| match f {
                BinaryFn::Add => x as f64 + y as f64,
                BinaryFn::Mul => x as f64 * y as f64,
            })
            .collect();
        let compute = |dev: &Device| {
            let (x, y) = (dev.from_slice(&a, &shape)?, dev.from_slice(&b, &shape)?);
            let out = poisoned(dev, &shape)?;
            run(dev, |enc| ops::binary(enc, f, &x, &y, &out))?;
            out.to_vec::<f32>()
        };
        check(&format!("binary {f:?}"), &dev, compute, &want, 1e-7);
    }
    let cap = 3.5f32;
    let want: Vec<f64> = a
        .iter()
        .map(|&v| cap as f64 * (v as f64 / cap as f64).tanh())
        .collect();
    let compute = |dev: &Device| {
        let (x, out) = (dev.from_slice(&a, &shape)?, poisoned(dev, &shape)?);
        run(dev, |enc| ops::softcap(enc, cap, &x, &out))?;
        out.to_vec::<f32>()
    };
    check("softcap", &dev, compute, &want, 1e-6);

    let logits: Vec<f32> = rng.vec(n, 8.0);
    let mut want = vec![0.0; n];
    for r in 0..7 {
        let row = &logits[r * 1001..(r + 1) * 1001];
        let mx = row.iter().fold(f64::MIN, |m, &v| m.max(v as f64));
        let sum: f64 = row.iter().map(|&v| (v as f64 - mx).exp()).sum();
        for (i, &v) in row.iter().enumerate() {
            want[r * 1001 + i] = (v as f64 - mx).exp() / sum;
        }
    }
    let compute = |dev: &Device| {
        let (x, out) = (dev.from_slice(&logits, &shape)?, poisoned(dev, &shape)?);
        run(dev, |enc| ops::softmax(enc, &x, &out))?;
        out.to_vec::<f32>()
    };
    check("softmax", &dev, compute, &want, 1e-6);
}

// ---------------------------------------------------------------------------------------------
// Weights: random stored data for every layout and its f64 dequantization

/// Host data of one weight matrix `[n, k]` in some layout, uploadable to any device.
struct HostWeight {
    layout: WeightLayout,
    /// (bytes or values, shape, dtype) per stored tensor.
    parts: Vec<(Vec<u8>, Vec<usize>, DType)>,
    /// The dequantized matrix, row-major.
    dense: Vec<f64>,
    n: usize,
    k: usize,
}

impl HostWeight {
    fn upload(&self, dev: &Device, bias: Option<&Tensor>) -> Result<Linear> {
        let tensors = self
            .parts
            .iter()
            .map(|(bytes, shape, dtype)| {
                let t = dev.empty(shape, *dtype)?;
                upload_bytes(&t, bytes)?;
                Ok(t)
            })
            .collect::<Result<Vec<_>>>()?;
        Linear::new("test", self.layout, tensors, bias.cloned(), self.n, self.k)
    }
}

/// Writes raw little-endian bytes into a tensor of any dtype.
fn upload_bytes(t: &Tensor, bytes: &[u8]) -> Result<()> {
    match t.dtype() {
        DType::U8 => t.write(bytes),
        DType::U32 => t.write(
            &bytes
                .chunks(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
                .collect::<Vec<_>>(),
        ),
        DType::F32 => t.write(
            &bytes
                .chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect::<Vec<_>>(),
        ),
        DType::F16 => t.write(
            &bytes
                .chunks(2)
                .map(|c| f16::from_le_bytes(c.try_into().unwrap()))
                .collect::<Vec<_>>(),
        ),
        DType::BF16 => t.write(
            &bytes
                .chunks(2)
                .map(|c| bf16::from_le_bytes(c.try_into().unwrap()))
                .collect::<Vec<_>>(),
        ),
        DType::I32 => unreachable!("no weight is stored as i32"),
    }
}

/// Random floats as stored bytes of `dtype`, and the stored values.
fn float_bytes(rng: &mut Rng, n: usize, scale: f32, dtype: DType) -> (Vec<u8>, Vec<f64>) {
    let v = rng.vec(n, scale);
    match dtype {
        DType::F16 => {
            let h: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
            (
                h.iter().flat_map(|x| x.to_le_bytes()).collect(),
                h.iter().map(|x| x.to_f64()).collect(),
            )
        }
        DType::BF16 => {
            let h: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
            (
                h.iter().flat_map(|x| x.to_le_bytes()).collect(),
                h.iter().map(|x| x.to_f64()).collect(),
            )
        }
        _ => (
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            v.iter().map(|&x| x as f64).collect(),
        ),
    }
}

fn dense_weight(rng: &mut Rng, n: usize, k: usize, dtype: DType) -> HostWeight {
    let (bytes, dense) = float_bytes(rng, n * k, 1.0, dtype);
    HostWeight {
        layout: WeightLayout::Dense,
        parts: vec![(bytes, vec![n, k], dtype)],
        dense,
        n,
        k,
    }
}

fn mlx_weight(
    rng: &mut Rng,
    n: usize,
    k: usize,
    bits: u32,
    group_size: usize,
    scale_type: DType,
) -> HostWeight {
    let words_per_row = k * bits as usize / 32;
    let words = rng.bytes(n * words_per_row * 4);
    let groups = n * (k / group_size);
    let (scale_bytes, scales) = float_bytes(rng, groups, 0.05, scale_type);
    let (bias_bytes, biases) = float_bytes(rng, groups, 0.2, scale_type);
    let word = |i: usize| u32::from_le_bytes(words[4 * i..4 * i + 4].try_into().unwrap()) as u64;
    let mut dense = vec![0.0; n * k];
    for r in 0..n {
        for j in 0..k {
            let bit = j * bits as usize;
            let (w, off) = (r * words_per_row + bit / 32, bit % 32);
            let hi = if bit / 32 + 1 < words_per_row {
                word(w + 1)
            } else {
                0
            };
            let q = ((word(w) | hi << 32) >> off) & ((1u64 << bits) - 1);
            let g = r * (k / group_size) + j / group_size;
            dense[r * k + j] = scales[g] * q as f64 + biases[g];
        }
    }
    HostWeight {
        layout: WeightLayout::MlxAffine { bits, group_size },
        parts: vec![
            (words, vec![n, words_per_row], DType::U32),
            (scale_bytes, vec![n, k / group_size], scale_type),
            (bias_bytes, vec![n, k / group_size], scale_type),
        ],
        dense,
        n,
        k,
    }
}

fn f16_at(b: &[u8], at: usize) -> f64 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f64()
}

fn put_f16(b: &mut [u8], at: usize, v: f32) {
    b[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// Random ggml blocks (random quants, sane f16 scales) and their dequantization, as
/// ggml-quants.c's dequantize_row_* computes it.
fn ggml_weight(rng: &mut Rng, n: usize, k: usize, ty: GgmlType) -> HostWeight {
    let nb = n * k / ty.block_size();
    let mut bytes = Vec::with_capacity(nb * ty.block_bytes());
    let mut dense = Vec::with_capacity(n * k);
    for _ in 0..nb {
        let mut b = match ty {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
                let dtype = match ty {
                    GgmlType::F32 => DType::F32,
                    GgmlType::F16 => DType::F16,
                    _ => DType::BF16,
                };
                let (b, v) = float_bytes(rng, 1, 1.0, dtype);
                dense.extend(v);
                bytes.extend(b);
                continue;
            }
            _ => rng.bytes(ty.block_bytes()),
        };
        match ty {
            GgmlType::Q4_0 => {
                put_f16(&mut b, 0, rng.sym(0.1));
                let d = f16_at(&b, 0);
                let (lo, hi): (Vec<f64>, Vec<f64>) = (0..16)
                    .map(|j| {
                        (
                            d * ((b[2 + j] & 15) as f64 - 8.0),
                            d * ((b[2 + j] >> 4) as f64 - 8.0),
                        )
                    })
                    .unzip();
                dense.extend(lo.into_iter().chain(hi));
            }
            GgmlType::Q4_1 => {
                put_f16(&mut b, 0, rng.sym(0.1));
                put_f16(&mut b, 2, rng.sym(0.5));
                let (d, m) = (f16_at(&b, 0), f16_at(&b, 2));
                let (lo, hi): (Vec<f64>, Vec<f64>) = (0..16)
                    .map(|j| {
                        (
                            d * (b[4 + j] & 15) as f64 + m,
                            d * (b[4 + j] >> 4) as f64 + m,
                        )
                    })
                    .unzip();
                dense.extend(lo.into_iter().chain(hi));
            }
            GgmlType::Q5_0 | GgmlType::Q5_1 => {
                // Q5_1 has m after d; then the word qh (bit j: element j's fifth bit) and qs.
                let affine = ty == GgmlType::Q5_1;
                put_f16(&mut b, 0, rng.sym(0.1));
                if affine {
                    put_f16(&mut b, 2, rng.sym(0.5));
                }
                let at = if affine { 4 } else { 2 };
                let d = f16_at(&b, 0);
                let (m, offset) = if affine {
                    (f16_at(&b, 2), 0.0)
                } else {
                    (0.0, 16.0)
                };
                let qh = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
                dense.extend((0..32).map(|j| {
                    let nibble = (b[at + 4 + j % 16] >> (4 * (j / 16))) & 15;
                    let q = nibble as f64 + 16.0 * ((qh >> j) & 1) as f64;
                    d * (q - offset) + m
                }));
            }
            GgmlType::Q8_0 => {
                put_f16(&mut b, 0, rng.sym(0.02));
                let d = f16_at(&b, 0);
                dense.extend((0..32).map(|j| d * (b[2 + j] as i8) as f64));
            }
            GgmlType::Q4K | GgmlType::Q5K => {
                // d, dmin, eight 6-bit scales and mins; Q5_K: then qh[32] (bit j of qh[l]: the
                // fifth bit of element l of sub-block j); then the nibbles, sub-blocks 2p and
                // 2p + 1 in the low and high halves of qs[32p ..].
                put_f16(&mut b, 0, rng.sym(0.01).abs());
                put_f16(&mut b, 2, rng.sym(0.01).abs());
                let (d, dmin) = (f16_at(&b, 0), f16_at(&b, 2));
                let scale_min = |j: usize| {
                    let (s, m) = k_scale_min(&b[4..16], j);
                    (s as f64, m as f64)
                };
                let five = ty == GgmlType::Q5K;
                let qs_at = if five { 48 } else { 16 };
                for j in 0..8 {
                    let qs = &b[qs_at + 32 * (j / 2)..qs_at + 32 * (j / 2) + 32];
                    let (s, m) = scale_min(j);
                    dense.extend((0..32).map(|l| {
                        let high = if five { ((b[16 + l] >> j) & 1) << 4 } else { 0 };
                        let q = ((qs[l] >> (4 * (j % 2))) & 15) | high;
                        d * s * q as f64 - dmin * m
                    }));
                }
            }
            GgmlType::Q6K => {
                put_f16(&mut b, 208, rng.sym(0.002));
                let d = f16_at(&b, 208);
                let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
                let mut y = [0.0; 256];
                for half in 0..2 {
                    let (ql, qh, sc) = (&ql[64 * half..], &qh[32 * half..], &sc[8 * half..]);
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        let s = |i: usize| sc[i] as i8 as f64;
                        y[128 * half + l] = d * s(is) * q1 as f64;
                        y[128 * half + l + 32] = d * s(is + 2) * q2 as f64;
                        y[128 * half + l + 64] = d * s(is + 4) * q3 as f64;
                        y[128 * half + l + 96] = d * s(is + 6) * q4 as f64;
                    }
                }
                dense.extend(y);
            }
            _ => unreachable!(),
        }
        bytes.extend(b);
    }
    HostWeight {
        layout: WeightLayout::Gguf(ty),
        parts: vec![(bytes.clone(), vec![bytes.len()], DType::U8)],
        dense,
        n,
        k,
    }
}

const GGML_TYPES: [GgmlType; 11] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4K,
    GgmlType::Q5K,
    GgmlType::Q6K,
];

/// Every layout at one size: dense in each float type, MLX at every bits × group size (scale
/// types rotating), every ggml type. `k` must be a multiple of 256.
fn every_layout(rng: &mut Rng, n: usize, k: usize) -> Vec<HostWeight> {
    let mut all: Vec<HostWeight> = FLOAT_TYPES
        .iter()
        .map(|&t| dense_weight(rng, n, k, t))
        .collect();
    let mut st = FLOAT_TYPES.iter().cycle();
    for bits in [2, 3, 4, 5, 6, 8] {
        for group_size in [32, 64, 128] {
            all.push(mlx_weight(rng, n, k, bits, group_size, *st.next().unwrap()));
        }
    }
    all.extend(GGML_TYPES.iter().map(|&t| ggml_weight(rng, n, k, t)));
    all
}

/// Another random weight of `w`'s shape, layout and stored types (a gated pair's up).
fn stored_like(rng: &mut Rng, w: &HostWeight) -> HostWeight {
    match w.layout {
        WeightLayout::MlxAffine { bits, group_size } => {
            mlx_weight(rng, w.n, w.k, bits, group_size, w.parts[1].2)
        }
        WeightLayout::Gguf(t) => ggml_weight(rng, w.n, w.k, t),
        WeightLayout::Dense => dense_weight(rng, w.n, w.k, w.parts[0].2),
    }
}

fn describe(w: &HostWeight) -> String {
    let dtypes: Vec<String> = w.parts.iter().map(|p| p.2.to_string()).collect();
    format!("{} [{}]", w.layout.variant(), dtypes.join(","))
}

// ---------------------------------------------------------------------------------------------
// Matmul and embedding

fn matmul_ref(x: &[f32], w: &HostWeight, bias: Option<&[f64]>, m: usize) -> Vec<f64> {
    let (n, k) = (w.n, w.k);
    let mut out = vec![0.0; m * n];
    for r in 0..m {
        for c in 0..n {
            let row = &w.dense[c * k..(c + 1) * k];
            let dot: f64 = x[r * k..(r + 1) * k]
                .iter()
                .zip(row)
                .map(|(&a, &b)| a as f64 * b)
                .sum();
            out[r * n + c] = dot + bias.map_or(0.0, |b| b[c]);
        }
    }
    out
}

fn check_matmul(dev: &Device, rng: &mut Rng, w: &HostWeight, m: usize, with_bias: bool) {
    check_matmul_of(dev, rng, w, (m, DType::F32), with_bias);
}

/// `check_matmul` of x stored as `x_dtype` (f16: f16 activations, the reference taking the
/// rounded values).
fn check_matmul_of(
    dev: &Device,
    rng: &mut Rng,
    w: &HostWeight,
    (m, x_dtype): (usize, DType),
    with_bias: bool,
) {
    let x = rng.vec(m * w.k, 1.0);
    let x = match x_dtype {
        DType::F16 => x.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
        _ => x,
    };
    let (bias_bytes, bias) = float_bytes(rng, w.n, 0.5, DType::BF16);
    let bias = with_bias.then_some(bias);
    let want = matmul_ref(&x, w, bias.as_deref(), m);
    let compute = |dev: &Device| {
        let b = match with_bias {
            true => {
                let t = dev.empty(&[w.n], DType::BF16)?;
                upload_bytes(&t, &bias_bytes)?;
                Some(t)
            }
            false => None,
        };
        let lin = w.upload(dev, b.as_ref())?;
        let xt = floats(dev, &x, &[m, w.k], x_dtype)?.0;
        let out = poisoned(dev, &[m, w.n])?;
        run(dev, |enc| ops::matmul(enc, &xt, &lin, &out))?;
        out.to_vec::<f32>()
    };
    let what = format!(
        "matmul {} m={m} n={} k={} bias={with_bias} x={x_dtype}",
        describe(w),
        w.n,
        w.k
    );
    // From 9 rows the tensor-core kernels and cuBLAS multiply f16 operands (f32 weights and rows
    // of k not a multiple of 4 excepted), MLX 4/8-bit and ggml block weights from 2 rows (the
    // short staged-f16 kernels, or the generic tiles where those do not take the rows): x and
    // the dequantized weight each rounded with unit roundoff 2^−11 give a relative error of
    // about 2^−11·√(2/3) ≈ 4e-4 on these random inputs; 1e-3 leaves room, and a wrong fragment
    // or tile edge is off by O(1).
    let f32_weight = match w.layout {
        WeightLayout::Dense => w.parts[0].2 == DType::F32,
        layout => layout == WeightLayout::Gguf(GgmlType::F32),
    };
    let tc_rows = match w.layout {
        WeightLayout::MlxAffine { bits: 4 | 8, .. } => 2,
        WeightLayout::Gguf(GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) => 9,
        WeightLayout::Gguf(_) => 2,
        _ => 9,
    };
    let tol = if m >= tc_rows && !f32_weight && w.k.is_multiple_of(4) {
        1e-3
    } else if m == 1 {
        matvec_tol(w)
    } else {
        2e-5
    };
    check(&what, dev, compute, &want, tol);
}

/// The single-row tolerance: MLX 4- and 8-bit and the ggml block formats may run on the
/// tensor-core matvec, which rounds x to f16 (the weights' integers are exact in f16,
/// accumulation is f32): about 2^−11·√(1/3) ≈ 3e-4 on these inputs, 1e-3 allowed as for the
/// prefill tensor-core path.
fn matvec_tol(w: &HostWeight) -> f64 {
    match w.layout {
        WeightLayout::MlxAffine { bits: 4 | 8, .. } => 1e-3,
        WeightLayout::Gguf(
            GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::Q4K
            | GgmlType::Q5K
            | GgmlType::Q6K,
        ) => 1e-3,
        _ => 2e-5,
    }
}

/// `ops::matmul_add` on one row: the residual rides in as the bias; without and with x's f16
/// copy (`x_h`, which the tensor-core kernels stage instead of x).
fn check_matmul_add(dev: &Device, rng: &mut Rng, w: &HostWeight) {
    let x = rng.vec(w.k, 1.0);
    let residual = rng.vec(w.n, 2.0);
    let res64: Vec<f64> = residual.iter().map(|&v| v as f64).collect();
    let want = matmul_ref(&x, w, Some(&res64), 1);
    for half in [false, true] {
        let x_h = half.then_some(&x[..]);
        let compute = |dev: &Device| matmul_add_row(dev, w, &x, x_h, &residual);
        let what = format!("matmul_add {} n={} k={} x_h {half}", describe(w), w.n, w.k);
        check(&what, dev, compute, &want, matvec_tol(w));
    }
}

/// `ops::matmul_add` of one row x with the residual, given the f16 copy of `x_h` (if any) as
/// x's copy.
fn matmul_add_row(
    dev: &Device,
    w: &HostWeight,
    x: &[f32],
    x_h: Option<&[f32]>,
    residual: &[f32],
) -> Result<Vec<f32>> {
    let lin = w.upload(dev, None)?;
    let xt = dev.from_slice(x, &[1, w.k])?;
    let x_h = x_h.map(|v| halves(dev, v)).transpose()?;
    let rt = dev.from_slice(residual, &[1, w.n])?;
    let out = poisoned(dev, &[1, w.n])?;
    run(dev, |enc| {
        ops::matmul_add(enc, &xt, x_h.as_ref(), &lin, &rt, &out)
    })?;
    out.to_vec::<f32>()
}

/// A row of f16 values `[1, len]`.
fn halves(dev: &Device, v: &[f32]) -> Result<Tensor> {
    let h: Vec<half::f16> = v.iter().map(|&v| half::f16::from_f32(v)).collect();
    dev.from_slice(&h, &[1, v.len()])
}

/// An f16 copy must hold exactly the f32 values rounded to nearest.
fn assert_half_copy(what: &str, out: &Tensor, out_h: &Tensor) -> Result<()> {
    let (out, out_h) = (out.to_vec::<f32>()?, out_h.to_vec::<half::f16>()?);
    for (i, (&v, &h)) in out.iter().zip(&out_h).enumerate() {
        let want = half::f16::from_f32(v);
        assert_eq!(h.to_bits(), want.to_bits(), "{what}: f16 copy [{i}] of {v}");
    }
    Ok(())
}

/// The gated product f(gate)·up from the two reference matvecs, and its condition: how much
/// larger than ‖f(gate)·up‖ an error of one part in a unit of each matvec's rms grows in it.
/// Where every gate saturates f near zero but one near its root, the product's norm is that
/// one element and the kernel's rounding of that gate dominates (f32 as much as f16): the
/// tolerance scales by the condition, never below 1.
fn gated_ref(f: UnaryFn, gate: &[f64], up: &[f64]) -> (Vec<f64>, f64) {
    let rms = |v: &[f64]| (v.iter().map(|a| a * a).sum::<f64>() / v.len() as f64).sqrt();
    let (gate_rms, up_rms) = (rms(gate), rms(up));
    let mut sensitivity = 0.0;
    let want: Vec<f64> = gate
        .iter()
        .zip(up)
        .map(|(&g, &u)| {
            let h = 1e-6 * g.abs().max(1.0);
            let slope = (activation_ref(f, g + h) - activation_ref(f, g - h)) / (2.0 * h);
            let e = slope.abs() * u.abs() * gate_rms + activation_ref(f, g).abs() * up_rms;
            sensitivity += e * e;
            activation_ref(f, g) * u
        })
        .collect();
    let norm = want.iter().map(|w| w * w).sum::<f64>().sqrt();
    (want, (sensitivity.sqrt() / norm.max(1e-30)).max(1.0))
}

/// `ops::gated_matmul` on one row: act(x·gate)·(x·up).
fn check_gated(dev: &Device, rng: &mut Rng, f: UnaryFn, gate: &HostWeight, up: &HostWeight) {
    let x = rng.vec(gate.k, 1.0);
    let g = matmul_ref(&x, gate, None, 1);
    let u = matmul_ref(&x, up, None, 1);
    let (want, condition) = gated_ref(f, &g, &u);
    let what = format!(
        "gated_matmul {f:?} {} n={} k={}",
        describe(gate),
        gate.n,
        gate.k
    );
    // With the output's f16 copy (for a tensor-core down projection), poisoned first.
    let compute = |dev: &Device| {
        let (gl, ul) = (gate.upload(dev, None)?, up.upload(dev, None)?);
        let xt = dev.from_slice(&x, &[1, gate.k])?;
        let out = poisoned(dev, &[1, gate.n])?;
        let out_h = dev.from_slice(&vec![half::f16::NAN; gate.n], &[1, gate.n])?;
        run(dev, |enc| {
            ops::gated_matmul(enc, &xt, None, None, &gl, &ul, f, &out, Some(&out_h))
        })?;
        assert_half_copy(&what, &out, &out_h)?;
        out.to_vec::<f32>()
    };
    // Where x is rounded (tensor cores), two rounded dot products multiply: twice the tolerance.
    let tol = match matvec_tol(gate) {
        t if t > 2e-5 => 2.0 * t,
        t => t,
    };
    check(&what, dev, compute, &want, tol * condition);
}

#[test]
fn matvec_every_layout() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng(6);
    // n not a multiple of the rows per block; k = 1280 (matvec.cu's short shape, up to 1,536)
    // gives lanes 1 or 2 units.
    for w in every_layout(&mut rng, 37, 1280) {
        check_matmul(&dev, &mut rng, &w, 1, w.n % 2 == 1);
    }
    // Long rows (the long shape): 1, 2 and 4 warps share a row group (136 and 264 units leave
    // lanes uneven).
    for k in [2048, 4352, 8448] {
        let ws = [
            mlx_weight(&mut rng, 23, k, 4, 128, DType::F16),
            mlx_weight(&mut rng, 23, k, 5, 32, DType::F32),
            ggml_weight(&mut rng, 23, k, GgmlType::Q4K),
            ggml_weight(&mut rng, 23, k, GgmlType::Q5K),
            ggml_weight(&mut rng, 23, k, GgmlType::Q6K),
            ggml_weight(&mut rng, 23, k, GgmlType::Q5_0),
            dense_weight(&mut rng, 23, k, DType::BF16),
        ];
        for w in ws {
            check_matmul(&dev, &mut rng, &w, 1, true);
        }
    }
    // Every MLX scale type at one size, and bias in the epilogue.
    for st in FLOAT_TYPES {
        let w = mlx_weight(&mut rng, 19, 256, 4, 64, st);
        check_matmul(&dev, &mut rng, &w, 1, true);
    }
    // Dense rows of odd length take the tiled kernel.
    for st in FLOAT_TYPES {
        let w = dense_weight(&mut rng, 21, 333, st);
        check_matmul(&dev, &mut rng, &w, 1, false);
    }
}

#[test]
fn matmul_add_takes_the_residual_as_bias() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng(15);
    for w in [
        mlx_weight(&mut rng, 41, 576, 4, 64, DType::BF16),
        ggml_weight(&mut rng, 29, 1536, GgmlType::Q4_0),
    ] {
        check_matmul_add(&dev, &mut rng, &w);
    }
}

#[test]
fn gated_matmul_matches_reference() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng(16);
    let cases = [
        (
            UnaryFn::Silu,
            mlx_weight(&mut rng, 37, 1280, 4, 64, DType::BF16),
            mlx_weight(&mut rng, 37, 1280, 4, 64, DType::BF16),
        ),
        (
            UnaryFn::GeluTanh,
            ggml_weight(&mut rng, 23, 8224, GgmlType::Q4_0),
            ggml_weight(&mut rng, 23, 8224, GgmlType::Q4_0),
        ),
        (
            UnaryFn::GeluExact,
            ggml_weight(&mut rng, 19, 512, GgmlType::Q6K),
            ggml_weight(&mut rng, 19, 512, GgmlType::Q6K),
        ),
        (
            UnaryFn::Silu,
            ggml_weight(&mut rng, 19, 2048, GgmlType::Q5K),
            ggml_weight(&mut rng, 19, 2048, GgmlType::Q5K),
        ),
        (
            UnaryFn::Silu,
            ggml_weight(&mut rng, 27, 896, GgmlType::Q5_1),
            ggml_weight(&mut rng, 27, 896, GgmlType::Q5_1),
        ),
        (
            UnaryFn::Silu,
            dense_weight(&mut rng, 21, 4352, DType::F16),
            dense_weight(&mut rng, 21, 4352, DType::F16),
        ),
    ];
    for (f, gate, up) in cases {
        check_gated(&dev, &mut rng, f, &gate, &up);
    }
}

/// The tensor-core matvec (matvec_tc.cu) at every width, group size and scale type it takes:
/// plain, with a bias, with the residual, and gated; rows not a multiple of the 16-row tile;
/// k of three groups (a partial step of four chunks) and long (several warps per tile with
/// uneven stage counts). Every matrix holds just over 2^24 weights, far above the planner's
/// minimum for tensor cores.
#[test]
fn matvec_tensor_cores_mlx() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng(18);
    for bits in [4, 8] {
        for group_size in [32, 64, 128] {
            for (i, &st) in FLOAT_TYPES.iter().enumerate() {
                let k = if i == 0 { 4352 } else { 3 * group_size };
                let n = (1 << 24) / k + 5;
                let w = mlx_weight(&mut rng, n, k, bits, group_size, st);
                check_matmul(&dev, &mut rng, &w, 1, i != 1);
                check_matmul_add(&dev, &mut rng, &w);
                let up = mlx_weight(&mut rng, n, k, bits, group_size, st);
                check_gated(&dev, &mut rng, UnaryFn::Silu, &w, &up);
            }
        }
    }
    // The kernel stages x from its f16 copy where given: a copy of another row gives that
    // row's product (the CPU backend reads x, which the copy must equal).
    let w = mlx_weight(&mut rng, (1 << 22) / 2048 + 3, 2048, 4, 64, FLOAT_TYPES[2]);
    let (x, other) = (rng.vec(w.k, 1.0), rng.vec(w.k, 1.0));
    let out = matmul_add_row(&dev, &w, &x, Some(&other), &vec![0.0; w.n]).unwrap();
    let want = matmul_ref(&other, &w, None, 1);
    assert_close("matvec_tc from x_h", &out, &want, matvec_tol(&w));
    // The Llama-3.1-8B q/k/v and gate/up shapes: on a 132-SM GPU their plans split a tile's k
    // over 5 warps, and give a block 7 tiles of 2 warps (matvec_tc_plan).
    let st = FLOAT_TYPES[2];
    let w = mlx_weight(&mut rng, 6144, 4096, 4, 64, st);
    check_matmul(&dev, &mut rng, &w, 1, true);
    let gate = mlx_weight(&mut rng, 14336, 4096, 4, 64, st);
    let up = mlx_weight(&mut rng, 14336, 4096, 4, 64, st);
    check_gated(&dev, &mut rng, UnaryFn::Silu, &gate, &up);
}

/// The decode matvec for ggml Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K over 2^24
/// weights (matvec_tc.cu's `MtQ4_0` and `MtQ8_0` where rows start 8-byte aligned, `MtQ4_1`,
/// `MtQ5_1`, `MtQ4K`, `MtQ5K`; `MtQ5_0`, `MtQ4_0Words`, `MtQ8_0Words` and `MtQ6K` for rows of an
/// even number of blocks, whose blocks alternate 4- and 2-byte alignment, and `MtQ6K` for
/// matrices of an even number of super-blocks, rows of an odd number included (k = 4,352 and
/// Qwen3-30B-A3B's experts' 768: rows alternate in alignment); Q6_K's gated pairs as two plain
/// matvecs and the activation):
/// plain, with a bias, with the residual, and gated; rows not a multiple of the 16-row tile; k
/// of one quad of Q4_0, Q5_0 or Q8_0 blocks (one step), of three Q4_1 or Q5_1 blocks (a partial
/// step), of 130 Q4_0, Q5_0 or Q8_0 blocks (a partial last step; Q4_0 and Q8_0 off quads, as
/// SmolLM2's 576), of one K-quant super-block (two steps: the pairs of sub-blocks 0–3, then
/// 4–7), long k (several warps per tile); and Q4_0, Q5_0 and Q8_0 rows that start only 2-byte
/// aligned (k of three blocks, an odd number of blocks, and k = 4,128), which matvec.cu
/// multiplies.
#[test]
fn matvec_tensor_cores_ggml() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng(23);
    let cases = [
        (
            GgmlType::Q4_0,
            [4352, 128, 2048, 96, 4128, 4160, 576].as_slice(),
        ),
        (GgmlType::Q4_1, [4352, 96, 2048, 4128].as_slice()),
        (GgmlType::Q5_0, [4352, 128, 2048, 96, 4128, 4160].as_slice()),
        (GgmlType::Q5_1, [4352, 96, 2048, 4128].as_slice()),
        (
            GgmlType::Q8_0,
            [4352, 128, 2048, 4128, 4160, 576].as_slice(),
        ),
        (GgmlType::Q4K, [4352, 256, 2048, 8448].as_slice()),
        (GgmlType::Q5K, [4352, 256, 2048].as_slice()),
        (GgmlType::Q6K, [2048, 6144, 4352, 1536, 768].as_slice()),
    ];
    for (ty, ks) in cases {
        for (i, &k) in ks.iter().enumerate() {
            let n = (1 << 24) / k + 5;
            let w = ggml_weight(&mut rng, n, k, ty);
            check_matmul(&dev, &mut rng, &w, 1, i != 1);
            check_matmul_add(&dev, &mut rng, &w);
            let up = ggml_weight(&mut rng, n, k, ty);
            check_gated(&dev, &mut rng, UnaryFn::Silu, &w, &up);
        }
    }
}

/// The RMSNorm folded into the decode matvec (plain, with a bias, gated; Gemma's unit offset),
/// against the f64 norm-then-matmul, for x of ordinary size, past f16's range (a residual
/// stream can be), and small enough that x·g would be subnormal in f16 (the tensor-core kernels
/// stage x·g at a power of two a chunk and apply the norm's scale at the end).
#[test]
fn normed_matvec_matches_reference() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng(17);
    // (weight, unit offset, bias, tolerance): k up to 1024 folds the norm into matvec.cu's
    // kernel; wider MLX 4/8-bit weights take the tensor cores (f16 x), which fold the norm too,
    // as do MLX, Q4_0 and Q8_0 (quads), Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K from 2^18 weights;
    // other wide ones run the norm first.
    // MLX 8-bit at k = 8704 has more 16-element chunks than the block has threads (the staging
    // loop).
    let cases = [
        (
            mlx_weight(&mut rng, 37, 1280, 4, 64, DType::BF16),
            false,
            true,
            2e-3,
        ),
        (
            mlx_weight(&mut rng, 21, 576, 8, 32, DType::F32),
            true,
            false,
            2e-5,
        ),
        (
            ggml_weight(&mut rng, 23, 4352, GgmlType::Q4K),
            false,
            false,
            2e-5,
        ),
        (
            dense_weight(&mut rng, 19, 2048, DType::F16),
            true,
            true,
            2e-5,
        ),
        // Rows of no whole 32-element units: the norm first, then the tiled kernel.
        (
            dense_weight(&mut rng, 21, 1000, DType::F16),
            false,
            false,
            2e-5,
        ),
        (
            mlx_weight(&mut rng, 4101, 4096, 4, 64, DType::BF16),
            false,
            false,
            2e-3,
        ),
        (
            ggml_weight(&mut rng, 4101, 4096, GgmlType::Q4_0),
            false,
            false,
            2e-3,
        ),
        (
            ggml_weight(&mut rng, 4101, 4096, GgmlType::Q4K),
            true,
            false,
            2e-3,
        ),
        (
            ggml_weight(&mut rng, 4101, 4096, GgmlType::Q4_1),
            false,
            false,
            2e-3,
        ),
        (
            ggml_weight(&mut rng, 4101, 4096, GgmlType::Q8_0),
            false,
            false,
            2e-3,
        ),
        (
            ggml_weight(&mut rng, 4101, 4096, GgmlType::Q5_0),
            true,
            false,
            2e-3,
        ),
        (
            ggml_weight(&mut rng, 4101, 4096, GgmlType::Q5_1),
            false,
            true,
            2e-3,
        ),
        (
            ggml_weight(&mut rng, 4101, 4160, GgmlType::Q8_0),
            false,
            false,
            2e-3,
        ),
        (
            ggml_weight(&mut rng, 4101, 4160, GgmlType::Q4_0),
            true,
            false,
            2e-3,
        ),
        (
            ggml_weight(&mut rng, 4101, 1536, GgmlType::Q6K),
            true,
            false,
            2e-3,
        ),
        (
            ggml_weight(&mut rng, 4101, 4096, GgmlType::Q5K),
            true,
            false,
            2e-3,
        ),
        (
            ggml_weight(&mut rng, 4101, 4096, GgmlType::Q6K),
            false,
            false,
            2e-3,
        ),
        (
            mlx_weight(&mut rng, 29, 8704, 8, 64, DType::F16),
            true,
            true,
            2e-3,
        ),
    ];
    let magnitudes = [1.0, 3e4, 1e-3];
    for ((w, unit_offset, with_bias, tol), magnitude) in
        cases.iter().flat_map(|case| magnitudes.map(|m| (case, m)))
    {
        let (unit_offset, with_bias, tol) = (*unit_offset, *with_bias, *tol);
        let k = w.k;
        let x: Vec<f32> = rng.vec(k, 3.0).iter().map(|v| v * magnitude).collect();
        let g = rng.vec(k, 1.0);
        let offset = if unit_offset { 1.0 } else { 0.0 };
        let eps = 1e-5f32;
        let ms = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / k as f64;
        let r = 1.0 / (ms + eps as f64).sqrt();
        let xn: Vec<f32> = x
            .iter()
            .zip(&g)
            .map(|(&x, &g)| (x as f64 * r * (g as f64 + offset)) as f32)
            .collect();
        let bias = rng.vec(w.n, 0.5);
        let bias64: Vec<f64> = bias.iter().map(|&b| b as f64).collect();
        let want = matmul_ref(&xn, w, with_bias.then_some(&bias64[..]), 1);
        let pre = PreNorm { eps, unit_offset };
        let compute = |dev: &Device, shifted: bool| {
            let b = with_bias
                .then(|| dev.from_slice(&bias, &[w.n]))
                .transpose()?;
            let lin = w.upload(dev, b.as_ref())?;
            let (xt, gt) = (row_at(dev, &x, shifted)?, dev.from_slice(&g, &[k])?);
            let out = poisoned(dev, &[1, w.n])?;
            run(dev, |enc| {
                ops::normed_matmul(enc, &xt, None, (&gt, pre), &lin, &out)
            })?;
            out.to_vec::<f32>()
        };
        for shifted in [false, true] {
            let what = format!(
                "normed matvec {} unit_offset={unit_offset} |x| ~{magnitude} shifted={shifted}",
                describe(w)
            );
            check(&what, &dev, |dev| compute(dev, shifted), &want, tol);
        }
        if with_bias {
            continue;
        }
        let up = stored_like(&mut rng, w);
        let (gate_ref, up_ref) = (matmul_ref(&xn, w, None, 1), matmul_ref(&xn, &up, None, 1));
        let (want, condition) = gated_ref(UnaryFn::Silu, &gate_ref, &up_ref);
        let compute = |dev: &Device, shifted: bool| {
            let (gl, ul) = (w.upload(dev, None)?, up.upload(dev, None)?);
            let (xt, gt) = (row_at(dev, &x, shifted)?, dev.from_slice(&g, &[k])?);
            let out = poisoned(dev, &[1, w.n])?;
            let norm = Some((&gt, pre));
            run(dev, |enc| {
                ops::gated_matmul(enc, &xt, None, norm, &gl, &ul, UnaryFn::Silu, &out, None)
            })?;
            out.to_vec::<f32>()
        };
        for shifted in [false, true] {
            let what = format!(
                "normed gated matvec {} unit_offset={unit_offset} |x| ~{magnitude} \
                 shifted={shifted}",
                describe(w)
            );
            check(
                &what,
                &dev,
                |dev| compute(dev, shifted),
                &want,
                tol * condition,
            );
        }
    }
}

/// A residual update folded into a decode matvec (`ops::ResidualUpdate`, Gemma's block output
/// norm and residual add): the product of the normed updated x and the updated x itself, against
/// an f64 reference and the CPU backend. MLX 4/8-bit weights on the tensor cores apply the
/// update in the kernel (`matvec_tc_normup_…`); the others (matvec.cu, Q4_0 quads, the tiled
/// kernel) launch `rms_norm_add` in front. Gated pairs alike.
#[test]
fn residual_updated_normed_matvec_matches_reference() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng(29);
    let cases = [
        mlx_weight(&mut rng, 1001, 1152, 4, 64, DType::F16),
        mlx_weight(&mut rng, 700, 2048, 8, 32, DType::BF16),
        mlx_weight(&mut rng, 37, 1280, 4, 64, DType::BF16),
        ggml_weight(&mut rng, 515, 1024, GgmlType::Q4_0),
        dense_weight(&mut rng, 21, 1000, DType::F16),
    ];
    for w in &cases {
        let k = w.k;
        let (x, y) = (rng.vec(k, 3.0), rng.vec(k, 40.0));
        let (wu, g) = (rng.vec(k, 1.0), rng.vec(k, 1.0));
        let eps = 1e-6f32;
        let rms =
            |v: &[f64]| 1.0 / (v.iter().map(|v| v * v).sum::<f64>() / k as f64 + eps as f64).sqrt();
        let y64: Vec<f64> = y.iter().map(|&v| v as f64).collect();
        let ry = rms(&y64);
        let updated: Vec<f64> = (0..k)
            .map(|i| x[i] as f64 + y64[i] * ry * (wu[i] as f64 + 1.0))
            .collect();
        let r = rms(&updated);
        let xn: Vec<f32> = (0..k)
            .map(|i| (updated[i] * r * (g[i] as f64 + 1.0)) as f32)
            .collect();
        let up = stored_like(&mut rng, w);
        let plain = matmul_ref(&xn, w, None, 1);
        let (gated, condition) = gated_ref(UnaryFn::Silu, &plain, &matmul_ref(&xn, &up, None, 1));
        let pre = PreNorm {
            eps,
            unit_offset: true,
        };
        // (product, updated x) of the plain or the gated matvec.
        let compute = |dev: &Device, gated: bool| -> Result<(Vec<f32>, Vec<f32>)> {
            let (gl, ul) = (w.upload(dev, None)?, up.upload(dev, None)?);
            let row = |v: &[f32]| dev.from_slice(v, &[1, k]);
            let (xt, yt) = (row(&x)?, row(&y)?);
            let (wut, gt) = (dev.from_slice(&wu, &[k])?, dev.from_slice(&g, &[k])?);
            let (out, updated) = (poisoned(dev, &[1, w.n])?, poisoned(dev, &[1, k])?);
            let update = Some(ops::ResidualUpdate {
                y: &yt,
                weight: &wut,
                out: &updated,
            });
            run(dev, |enc| match gated {
                false => ops::normed_matmul(enc, &xt, update, (&gt, pre), &gl, &out),
                true => {
                    let (norm, f) = (Some((&gt, pre)), UnaryFn::Silu);
                    ops::gated_matmul(enc, &xt, update, norm, &gl, &ul, f, &out, None)
                }
            })?;
            Ok((out.to_vec::<f32>()?, updated.to_vec::<f32>()?))
        };
        for (is_gated, want, tol) in [(false, &plain, 2e-3), (true, &gated, 2e-3 * condition)] {
            let what = format!("updated normed matvec {} gated={is_gated}", describe(w));
            let product = |dev: &Device| compute(dev, is_gated).map(|(out, _)| out);
            check(&what, &dev, product, want, tol);
            let x_out = |dev: &Device| compute(dev, is_gated).map(|(_, x)| x);
            check(&format!("{what}: updated x"), &dev, x_out, &updated, 1e-6);
        }
    }
}

/// `Linear::concat_rows` copies the parts into one weight on the device: a matvec over the
/// concatenation equals the parts' references, on the GPU and the CPU backend.
#[test]
fn concatenated_rows_match_the_parts() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng(23);
    let k = 256;
    let parts = [5, 7, 3].map(|n| mlx_weight(&mut rng, n, k, 4, 64, DType::BF16));
    let x = rng.vec(k, 1.0);
    let want: Vec<f64> = parts
        .iter()
        .flat_map(|w| matmul_ref(&x, w, None, 1))
        .collect();
    let compute = |dev: &Device| {
        let linears = parts
            .iter()
            .map(|w| w.upload(dev, None))
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&Linear> = linears.iter().collect();
        let qkv = Linear::concat_rows("qkv", &refs)?;
        let xt = dev.from_slice(&x, &[1, k])?;
        let out = poisoned(dev, &[1, want.len()])?;
        run(dev, |enc| ops::matmul(enc, &xt, &qkv, &out))?;
        out.to_vec::<f32>()
    };
    check("concatenated rows", &dev, compute, &want, 2e-5);
}

/// x as a `[1, len]` tensor at the start of its buffer or (`shifted`) one element in, so not
/// 16-byte aligned.
fn row_at(dev: &Device, x: &[f32], shifted: bool) -> Result<Tensor> {
    let skip = shifted as usize;
    let mut data = vec![7.0f32; skip];
    data.extend_from_slice(x);
    let column = dev.from_slice(&data, &[data.len(), 1])?;
    column.narrow_rows(skip, x.len())?.reshape(&[1, x.len()])
}

#[test]
fn matmul_every_layout() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng(7);
    // Both dims past one 64-wide tile, neither a multiple of it.
    for w in every_layout(&mut rng, 70, 512) {
        check_matmul(&dev, &mut rng, &w, 67, true);
    }
    for w in every_layout(&mut rng, 13, 256) {
        check_matmul(&dev, &mut rng, &w, 3, false);
    }
    for st in FLOAT_TYPES {
        let w = dense_weight(&mut rng, 45, 77, st);
        check_matmul(&dev, &mut rng, &w, 9, true);
    }
}

/// Short prompts, every layout: 2 to 8 rows on matvec_rows.cu, with rows of x not a multiple of
/// a block's 4 (the last block's rows past m are not stored), n not a multiple of a block's 16
/// weight rows, short and long k (1 to 4 warps sharing a row group); MLX 4/8-bit and the ggml
/// blocks at 2–16 rows on their short staged-f16 kernels (`matmul_tcq_rows_mlx*` or
/// `matmul_tcq16_*`; and a last half step: k = 1,312 in groups of 32, 300 rows in three blocks;
/// A rows 8–15 loaded past 8 rows; k split until a block's range of x fits its shared memory),
/// MLX 4/8-bit at 17–32 on `matmul_tcq_rows32_mlx*`; 9 and 16 rows of the other layouts on the
/// tensor-core tiles (f32 weights on the f32 tiles), 17–32 on cuBLAS. And matmul.cu's f32
/// tiles split in k where they would leave SMs idle: f32 weights at 20 rows (one tile; k = 640
/// in 5 splits of 128 columns, summed in order).
#[test]
fn matmul_short_prompts_every_layout() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng(31);
    // Up to 16 rows the short kernels; 17–32 MLX 4/8-bit `matmul_tcq_rows32_*` (its second
    // fragment's upper half empty up to 24 rows), the other layouts cuBLAS. One 128-column tile
    // splits k into steps/4: MLX 4/8-bit's 2–16-row kernel sums 5 splits (k = 1,280) and 8
    // (2,048) in a cluster of them, 17 (4,352: past the cluster's 8) through `splitk_sum`.
    // 70 × 4,352 is past 2^18 weights: 2 rows of the decode kernel's layouts run on it
    // (`matvec_tc_x2_*`), 3–4 rows of MLX 4/8-bit too (`matvec_tc_x4_*`).
    let shapes = [
        (37, 256, 2),
        (70, 4352, 2),
        (70, 4352, 3),
        (70, 4352, 4),
        (37, 1280, 5),
        (70, 4352, 8),
        (70, 1280, 9),
        (40, 2048, 12),
        (45, 4352, 16),
        (37, 1280, 17),
        (70, 4352, 24),
        (45, 1280, 32),
    ];
    for (n, k, m) in shapes {
        for (i, w) in every_layout(&mut rng, n, k).iter().enumerate() {
            check_matmul(&dev, &mut rng, w, m, i % 2 == 0);
        }
    }
    for (bits, st) in [(4, DType::BF16), (8, DType::F32)] {
        let w = mlx_weight(&mut rng, 300, 1312, bits, 32, st);
        check_matmul(&dev, &mut rng, &w, 7, bits == 4);
        // Two to four rows on the decode kernel (`matvec_tc_x2_*`, `matvec_tc_x4_*`: matrices
        // of 2^18 weights and more; 3 rows with the third repeated as the fourth, not stored).
        check_matmul(&dev, &mut rng, &w, 2, bits == 8);
        check_matmul(&dev, &mut rng, &w, 3, bits == 4);
    }
    for bits in [4, 8] {
        let w = mlx_weight(&mut rng, 520, 2048, bits, 64, DType::F16);
        check_matmul(&dev, &mut rng, &w, 2, true);
        check_matmul(&dev, &mut rng, &w, 4, false);
    }
    // 133 tiles of 128 columns take every block the GPU holds unsplit, and 58 steps of 12 rows
    // of x (k = 3,712) fill more shared memory than a block of `matmul_tcq_rows_*` has: it
    // splits k so that its range of x fits; 24 rows on `matmul_tcq_rows32_*` unsplit.
    let w = mlx_weight(&mut rng, 16_900, 3712, 4, 64, DType::F16);
    check_matmul(&dev, &mut rng, &w, 12, false);
    check_matmul(&dev, &mut rng, &w, 24, true);
    let w = dense_weight(&mut rng, 45, 640, DType::F32);
    check_matmul(&dev, &mut rng, &w, 20, true);
}

/// 2–16 rows of MLX 4/8-bit weights with x one element past a 16-byte boundary: the short
/// kernel reads x in 16-byte words, as every tensor-core kernel does, so such x takes the f32
/// tiles (`tensor_core_tiles`); x at the boundary, the short kernel. Both against the reference
/// and the CPU backend.
#[test]
fn matmul_short_prompts_of_unaligned_x() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng(43);
    for (bits, m) in [(4, 5), (8, 16)] {
        let w = mlx_weight(&mut rng, 150, 1280, bits, 64, DType::F16);
        let x = rng.vec(m * w.k, 1.0);
        let want = matmul_ref(&x, &w, None, m);
        for shifted in [false, true] {
            let compute = |dev: &Device| {
                let lin = w.upload(dev, None)?;
                let xt = row_at(dev, &x, shifted)?.reshape(&[m, w.k])?;
                let out = poisoned(dev, &[m, w.n])?;
                run(dev, |enc| ops::matmul(enc, &xt, &lin, &out))?;
                out.to_vec::<f32>()
            };
            let what = format!("matmul {} m={m} shifted={shifted}", describe(&w));
            check(&what, &dev, compute, &want, 1e-3);
        }
    }
}

/// Products of f16 activations (a norm's or the gated activation's f16 output): read in place
/// (cuBLAS with rows of whole 64-column steps, no staging launch), staged from f16 (the short
/// kernels, the tensor-core tiles, cuBLAS's x of other rows), and widened to f32 for the
/// kernels that read f32 x (one row, 2–4 rows, matvec_rows.cu, the generic tiles, f32 weights).
/// Each against the product of the same (rounded) values in f64 and on the CPU backend; and
/// `matmul_reads_half` true only where they are read in place.
#[test]
fn matmul_of_f16_activations() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng(41);
    for m in [1, 3, 12, 24, 40] {
        for (i, w) in every_layout(&mut rng, 70, 4352).iter().enumerate() {
            check_matmul_of(&dev, &mut rng, w, (m, DType::F16), i % 2 == 0);
        }
    }
    // Rows of k not whole 64-column steps: cuBLAS's x staged from f16 with zeros past k.
    let ragged = [
        mlx_weight(&mut rng, 77, 1312, 4, 32, DType::F16),
        mlx_weight(&mut rng, 77, 1312, 6, 32, DType::BF16),
        ggml_weight(&mut rng, 77, 1312, GgmlType::Q8_0),
    ];
    for w in ragged {
        check_matmul_of(&dev, &mut rng, &w, (40, DType::F16), true);
    }
    // Worth writing f16 activations for: cuBLAS's products of whole 64-column steps (MLX
    // 4/8-bit past the 32-row kernel), which read them in place.
    let mlx4 = mlx_weight(&mut rng, 70, 4352, 4, 64, DType::F16);
    let lin = mlx4.upload(&dev, None).unwrap();
    let reads = |m| ops::matmul_reads_half(&dev, &lin, m);
    assert!(!reads(1) && !reads(16) && !reads(32) && reads(33));
    let q6k = ggml_weight(&mut rng, 70, 4352, GgmlType::Q6K)
        .upload(&dev, None)
        .unwrap();
    assert!(!ops::matmul_reads_half(&dev, &q6k, 16) && ops::matmul_reads_half(&dev, &q6k, 17));
    let ragged = ggml_weight(&mut rng, 70, 1312, GgmlType::Q8_0)
        .upload(&dev, None)
        .unwrap();
    assert!(!ops::matmul_reads_half(&dev, &ragged, 40));
    assert!(!ops::matmul_reads_half(&Device::cpu(), &lin, 40));
}

#[test]
fn matmul_mlx_tensor_cores_at_tile_edges() {
    let Some(dev) = gpu_without_cublas() else {
        return;
    };
    let mut rng = Rng(21);
    // MLX 4/8-bit prefill weights take the staged-f16 kernel where cuBLAS does not (here: off):
    // columns past one 128-tile and short of the next, rows short of one, steps of 64 columns
    // with a last half step (k = 288: 9 units) and an odd number of groups per row (scale words
    // not 4-byte aligned), every group size and scale type, more steps than pipeline stages.
    for bits in [4, 8] {
        for (k, group_size, st) in [
            (288, 32, DType::F32),
            (288, 32, DType::BF16),
            (384, 64, DType::F16),
            (640, 128, DType::BF16),
            (576, 64, DType::F32),
        ] {
            let w = mlx_weight(&mut rng, 135, k, bits, group_size, st);
            check_matmul(&dev, &mut rng, &w, 95, k == 384);
        }
    }
    // 33 rows (a tile mostly empty) and one column tile.
    let w = mlx_weight(&mut rng, 128, 256, 4, 64, DType::BF16);
    check_matmul(&dev, &mut rng, &w, 33, true);
    // Few output tiles and long rows: blocks split k (25 steps in 3 splits of 9, 9 and 7;
    // 32 steps in 4) and `splitk_sum` adds the slices and the bias.
    for bits in [4, 8] {
        let w = mlx_weight(&mut rng, 135, 1600, bits, 64, DType::BF16);
        check_matmul(&dev, &mut rng, &w, 95, true);
        let w = mlx_weight(&mut rng, 100, 2048, bits, 128, DType::F16);
        check_matmul(&dev, &mut rng, &w, 33, false);
    }
}

#[test]
fn matmul_ggml_tensor_cores_at_tile_edges() {
    let Some(dev) = gpu_without_cublas() else {
        return;
    };
    let mut rng = Rng(24);
    // Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / Q4_K / Q5_K / Q6_K prefill weights with whole 64-column
    // steps take the staged-f16 kernels where cuBLAS does not (here: off): columns past one
    // 128-tile and short of the next, rows short of one, one step, more steps than pipeline stages; k = 288 (a half
    // step) stays on the
    // generic tensor-core kernel.
    let blocks_of_32 = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
    ];
    for ty in blocks_of_32 {
        for (k, with_bias) in [(64, false), (320, true), (576, false), (288, true)] {
            let w = ggml_weight(&mut rng, 135, k, ty);
            check_matmul(&dev, &mut rng, &w, 95, with_bias);
        }
        // 17 rows (a tile mostly empty) and one column tile.
        let w = ggml_weight(&mut rng, 128, 256, ty);
        check_matmul(&dev, &mut rng, &w, 17, true);
        // Few output tiles and long rows: split k (25 steps in 3 splits).
        let w = ggml_weight(&mut rng, 135, 1600, ty);
        check_matmul(&dev, &mut rng, &w, 95, true);
    }
    // Q4_K and Q5_K (`matmul_tcq_{q4_k,q5_k}`: a step is a sub-block pair): one super-block (as
    // many steps as Q4_K's pipeline stages), three, 17 rows, and a split k (28 steps in 3
    // splits).
    for ty in [GgmlType::Q4K, GgmlType::Q5K] {
        for (n, k, m, with_bias) in [
            (135, 256, 95, false),
            (135, 768, 95, true),
            (128, 256, 17, true),
            (135, 1792, 95, false),
        ] {
            let w = ggml_weight(&mut rng, n, k, ty);
            check_matmul(&dev, &mut rng, &w, m, with_bias);
        }
    }
    // Q6_K (`matmul_tcq_q6_k`, rows of k % 2,048 == 0: super-blocks at every offset mod 8), 17
    // rows, and a split k (96 steps); k = 1,792 stays on the generic tiles.
    for (n, k, m, with_bias) in [
        (135, 2048, 95, false),
        (128, 4096, 17, true),
        (135, 6144, 95, false),
        (135, 1792, 95, true),
    ] {
        let w = ggml_weight(&mut rng, n, k, GgmlType::Q6K);
        check_matmul(&dev, &mut rng, &w, m, with_bias);
    }
}

/// Prompts of 17 rows and more (MLX 4/8-bit: 33) go through cuBLAS where it loads (matmul.rs `dequant_gemm`):
/// every layout dequantized into f16 rows, x staged as f16, their GEMM, and the bias added after
/// it; rows short of a 64-column step (k = 288, dense k = 333: the rows padded with zeros) and
/// columns not a multiple of any tile.
#[test]
fn matmul_long_prompts_through_cublas() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng(26);
    for (i, w) in every_layout(&mut rng, 135, 768).iter().enumerate() {
        check_matmul(&dev, &mut rng, w, 300, i % 2 == 0);
    }
    let short = [
        mlx_weight(&mut rng, 77, 288, 4, 32, DType::BF16),
        ggml_weight(&mut rng, 77, 288, GgmlType::Q8_0),
        dense_weight(&mut rng, 77, 333, DType::F16),
        dense_weight(&mut rng, 77, 333, DType::BF16),
    ];
    for w in short {
        check_matmul(&dev, &mut rng, &w, 257, true);
    }
}

/// The generic tensor-core tiles (layouts without a staged-f16 kernel) split k where few
/// output tiles leave SMs idle, as `matmul_tcq_*` do: 95 rows of 135 columns (two tiles) over
/// 25 to 28 steps of 64 in three splits of unequal length, a partial last step (dense k =
/// 1,636), and the bias added once, by `splitk_sum`.
#[test]
fn matmul_generic_tensor_cores_split_k() {
    let Some(dev) = gpu_without_cublas() else {
        return;
    };
    let mut rng = Rng(25);
    let weights = [
        ggml_weight(&mut rng, 135, 1600, GgmlType::Q5_1),
        ggml_weight(&mut rng, 135, 1792, GgmlType::Q6K),
        ggml_weight(&mut rng, 135, 1600, GgmlType::Q4_1),
        mlx_weight(&mut rng, 135, 1600, 6, 64, DType::F16),
        ggml_weight(&mut rng, 135, 1600, GgmlType::Q5_0),
        mlx_weight(&mut rng, 135, 1600, 3, 64, DType::BF16),
        dense_weight(&mut rng, 135, 1636, DType::F16),
    ];
    for (i, w) in weights.iter().enumerate() {
        check_matmul(&dev, &mut rng, w, 95, i % 2 == 0);
    }
}

#[test]
fn staged_x_is_shared_by_dispatches_in_order() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng(22);
    // Three quantized prefill matmuls recorded together: the second (200 rows: through cuBLAS
    // where it loads, its f16 weight copy in the same scratch) needs a larger staging buffer
    // than the first, the third reuses it. Each must read its own x.
    let cases = [(40, 256, 4), (200, 512, 8), (40, 256, 4)];
    let weights: Vec<HostWeight> = cases
        .iter()
        .map(|&(_, k, bits)| mlx_weight(&mut rng, 72, k, bits, 64, DType::BF16))
        .collect();
    let xs: Vec<Vec<f32>> = cases.iter().map(|&(m, k, _)| rng.vec(m * k, 1.0)).collect();
    let outs: Vec<Tensor> = cases
        .iter()
        .map(|&(m, ..)| poisoned(&dev, &[m, 72]).unwrap())
        .collect();
    let lins: Vec<Linear> = weights
        .iter()
        .map(|w| w.upload(&dev, None).unwrap())
        .collect();
    let xts: Vec<Tensor> = cases
        .iter()
        .zip(&xs)
        .map(|(&(m, k, _), x)| dev.from_slice(x, &[m, k]).unwrap())
        .collect();
    run(&dev, |enc| {
        (0..cases.len()).try_for_each(|i| ops::matmul(enc, &xts[i], &lins[i], &outs[i]))
    })
    .unwrap();
    for (i, &(m, ..)) in cases.iter().enumerate() {
        let want = matmul_ref(&xs[i], &weights[i], None, m);
        let got = outs[i].to_vec::<f32>().unwrap();
        assert_close(&format!("dispatch {i}"), &got, &want, 1e-3);
    }
}

#[test]
fn embedding_every_layout() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng(8);
    let vocab = 29;
    let mut tables = every_layout(&mut rng, vocab, 256);
    tables.extend(
        FLOAT_TYPES
            .iter()
            .map(|&t| dense_weight(&mut rng, vocab, 45, t)),
    );
    for table in tables {
        // The last id is past the vocabulary: a zero row.
        let ids: Vec<u32> = (0..6)
            .map(|_| rng.below(vocab) as u32)
            .chain([vocab as u32 + 3])
            .collect();
        let k = table.k;
        let mut want = vec![0.0; ids.len() * k];
        for (t, &id) in ids.iter().enumerate() {
            if (id as usize) < vocab {
                want[t * k..(t + 1) * k]
                    .copy_from_slice(&table.dense[id as usize * k..(id as usize + 1) * k]);
            }
        }
        // Unscaled, and scaled in the gather (Gemma's √hidden).
        for scale in [1.0f32, 5.25] {
            let compute = |dev: &Device| {
                let lin = table.upload(dev, None)?;
                let idt = dev.from_slice(&ids, &[ids.len()])?;
                let out = poisoned(dev, &[ids.len(), k])?;
                run(dev, |enc| match scale {
                    1.0 => ops::embedding(enc, &idt, &lin, &out),
                    _ => ops::scaled_embedding(enc, &idt, &lin, scale, &out),
                })?;
                out.to_vec::<f32>()
            };
            let want: Vec<f64> = want.iter().map(|v| v * scale as f64).collect();
            check(
                &format!("embedding {} k={k} ×{scale}", describe(&table)),
                &dev,
                compute,
                &want,
                1e-7,
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Attention and the KV cache

struct AttnCase {
    rows: usize,
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
    capacity: usize,
    pos: usize,
    window: Option<usize>,
    softcap: Option<f32>,
}

/// An `AttnCase` from (rows, heads, kv heads, head dim, capacity, pos, window, softcap).
type AttnFields = (
    usize,
    usize,
    usize,
    usize,
    usize,
    usize,
    Option<usize>,
    Option<f32>,
);
fn attn_case(f: AttnFields) -> AttnCase {
    let (rows, n_heads, n_kv, head_dim, capacity, pos, window, softcap) = f;
    AttnCase {
        rows,
        n_heads,
        n_kv,
        head_dim,
        capacity,
        pos,
        window,
        softcap,
    }
}

impl AttnCase {
    fn shape(&self, scale: f32) -> AttentionShape {
        AttentionShape {
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv,
            head_dim: self.head_dim,
            scale,
            window: self.window,
            softcap: self.softcap,
            // Every row sits at pos or after: the planner may take a kernel for long rows.
            min_keys: self.pos + 1,
        }
    }
}

/// Whether decode attention takes the tensor-core kernel (attention.rs's `flash_decodes`): one
/// row over f16 caches (16-byte aligned, as these tests' are), head dim 64 or 128, a group of 2
/// to 8 heads, rows of 1,024 keys or more at head dim 64 and 4,096 at 128 (`AttnCase::shape`
/// gives the planner pos + 1 as `min_keys`). It rounds q·scale and the probabilities to f16, as
/// the flash prefill does.
fn flash_decodes(c: &AttnCase, kv: DType) -> bool {
    let group = c.n_heads / c.n_kv;
    let keys = c.window.map_or(c.pos + 1, |w| w.min(c.pos + 1));
    c.rows == 1
        && kv == DType::F16
        && [64, 128].contains(&c.head_dim)
        && (2..=8).contains(&group)
        && keys >= LONG_ROW_KEYS[if c.head_dim <= 64 { 0 } else { 1 }]
}

fn attention_ref(c: &AttnCase, q: &[f32], kc: &[f32], vc: &[f32], scale: f32) -> Vec<f64> {
    let hd = c.head_dim;
    let mut out = vec![0.0; c.rows * c.n_heads * hd];
    for r in 0..c.rows {
        let qpos = c.pos + r;
        let hi = (qpos + 1).min(c.capacity);
        let lo = c.window.map_or(0, |w| (qpos + 1).saturating_sub(w));
        for h in 0..c.n_heads {
            let g = h / (c.n_heads / c.n_kv);
            let qv = &q[(r * c.n_heads + h) * hd..][..hd];
            let scores: Vec<f64> = (lo..hi)
                .map(|j| {
                    let kv = &kc[(g * c.capacity + j) * hd..][..hd];
                    let s = scale as f64
                        * qv.iter()
                            .zip(kv)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>();
                    c.softcap
                        .map_or(s, |cap| cap as f64 * (s / cap as f64).tanh())
                })
                .collect();
            let mx = scores.iter().cloned().fold(f64::MIN, f64::max);
            let sum: f64 = scores.iter().map(|s| (s - mx).exp()).sum();
            for (i, j) in (lo..hi).enumerate() {
                let p = (scores[i] - mx).exp() / sum;
                let vv = &vc[(g * c.capacity + j) * hd..][..hd];
                for d in 0..hd {
                    out[(r * c.n_heads + h) * hd + d] += p * vv[d] as f64;
                }
            }
        }
    }
    out
}

#[test]
fn attention_matches_reference() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng(9);
    let cases = [
        // Decode: one split, several splits (long cache), several rows, GQA, odd head dims.
        attn_case((1, 6, 2, 40, 37, 20, None, None)),
        // Decode with GQA groups of 4 to 20 heads.
        attn_case((1, 16, 2, 64, 2000, 1500, None, None)),
        attn_case((2, 12, 1, 80, 300, 100, Some(50), None)),
        attn_case((4, 32, 2, 128, 256, 200, None, Some(10.0))),
        attn_case((1, 20, 1, 64, 90, 60, None, None)),
        attn_case((1, 8, 2, 32, 5, 2, None, None)),
        attn_case((1, 4, 4, 64, 1500, 1200, None, None)),
        attn_case((1, 8, 2, 128, 700, 650, Some(100), Some(30.0))),
        attn_case((3, 6, 3, 96, 64, 10, Some(5), None)),
        attn_case((2, 2, 1, 256, 300, 299 - 1, None, Some(20.0))),
        // A short context in a large cache: of the grid's splits only as many take keys as
        // hold 256 each (128 at head dim 64; one below 512 keys: that block writes the output),
        // per row.
        attn_case((1, 8, 2, 64, 4096, 40, None, None)),
        attn_case((1, 9, 3, 64, 2048, 0, None, None)),
        attn_case((2, 8, 2, 64, 4096, 31, None, None)),
        attn_case((1, 4, 1, 128, 4096, 700, Some(40), None)),
        // Long contexts: many active splits, merged by the block that finishes last; splits
        // of several passes (32 heads leave a wave of blocks 4 splits on 132 SMs); head dims
        // that are no multiple of 4 (scalar K loads) or need 7 chunks.
        attn_case((1, 9, 3, 64, 4096, 3000, None, None)),
        attn_case((1, 32, 8, 64, 4096, 3000, None, None)),
        attn_case((2, 8, 2, 128, 8192, 7000, None, Some(30.0))),
        attn_case((1, 6, 2, 50, 1000, 900, None, None)),
        attn_case((1, 4, 2, 200, 600, 550, None, None)),
        // More active splits (32) than the merging block reads at a time (16).
        attn_case((1, 2, 1, 64, 8192, 6000, None, None)),
        // A grid of many heads at head dim 64 (attention.rs's `decode_splitting`): a row of
        // 701 keys unsplit (three passes); one of 901 split over f32 caches, unsplit (four
        // passes) over f16 ones.
        attn_case((1, 32, 8, 64, 1200, 700, None, None)),
        attn_case((1, 32, 8, 64, 1200, 900, None, None)),
        // Long rows at head dim 128 (with f16 caches: on tensor cores), softcap, a window.
        attn_case((1, 8, 2, 128, 6000, 5000, None, Some(30.0))),
        attn_case((1, 16, 4, 128, 6000, 5500, Some(4500), None)),
        // Prefill: several blocks of rows, tiles of keys, window and softcap.
        attn_case((21, 6, 2, 40, 50, 13, None, None)),
        attn_case((37, 4, 1, 64, 100, 0, None, None)),
        attn_case((19, 4, 2, 128, 120, 70, Some(16), Some(25.0))),
        attn_case((17, 2, 2, 256, 40, 5, None, None)),
        attn_case((9, 3, 1, 200, 20, 2, Some(3), None)),
        // Tensor-core prefill: several 64-row blocks and 64-key tiles, GQA groups of 4.
        attn_case((150, 8, 2, 128, 200, 30, None, None)),
        attn_case((70, 4, 1, 80, 100, 20, Some(40), None)),
    ];
    for (c, kv) in cases.iter().flat_map(|c| KV_TYPES.map(|kv| (c, kv))) {
        let hd = c.head_dim;
        let scale = 1.0 / (hd as f32).sqrt();
        let q = rng.vec(c.rows * c.n_heads * hd, 1.5);
        let cache_shape = [c.n_kv, c.capacity, hd];
        let kc = rng.vec(c.n_kv * c.capacity * hd, 1.5);
        let vc = rng.vec(c.n_kv * c.capacity * hd, 1.0);
        let kc = cache_of(&Device::cpu(), kv, &kc, &cache_shape).unwrap().1;
        let vc = cache_of(&Device::cpu(), kv, &vc, &cache_shape).unwrap().1;
        let want = attention_ref(c, &q, &kc, &vc, scale);
        let compute = |dev: &Device| {
            let qt = dev.from_slice(&q, &[c.rows, c.n_heads * hd])?;
            let kt = cache_of(dev, kv, &kc, &cache_shape)?.0;
            let vt = cache_of(dev, kv, &vc, &cache_shape)?.0;
            let pos = dev.from_slice(&[c.pos as u32], &[1])?;
            let out = poisoned(dev, &[c.rows, c.n_heads * hd])?;
            let shape = c.shape(scale);
            run(dev, |enc| {
                ops::attention(enc, shape, &qt, &kt, &vt, &pos, &out)
            })?;
            out.to_vec::<f32>()
        };
        let what = format!(
            "attention rows={} heads={}/{} hd={hd} pos={} cap={} window={:?} softcap={:?} \
             caches {kv}",
            c.rows, c.n_heads, c.n_kv, c.pos, c.capacity, c.window, c.softcap
        );
        // Prefill rows at head dims 64/80/96/128 take the tensor-core kernel: q·scale, k, v
        // and the probabilities rounded to f16 (unit roundoff 2^−11) each add ~3e-4 relative
        // error to the output on these inputs. The f32 kernels sum the keys in another order
        // than the CPU (splits, passes, warps): held to 2e-6, or √keys·2^−24 for long rows
        // (7,000 keys: 5e-6).
        let flash = c.rows > 4 && [64, 80, 96, 128].contains(&hd) || flash_decodes(c, kv);
        let keys = (c.pos + c.rows) as f64;
        let f32_tol = f64::max(2e-6, keys.sqrt() * 2f64.powi(-24));
        check(
            &what,
            &dev,
            compute,
            &want,
            if flash { 3e-3 } else { f32_tol },
        );
    }
}

/// Decode attention loads a lane's head dims as vectors where rows are whole chunks of 32, and
/// the planner refuses caches less aligned than those loads (attention.rs's
/// `decode_cache_alignment`, which repeats attention.cu's `dims_run`). Caches placed at every
/// element offset past a 16-byte boundary must each be refused with an error naming the
/// alignment or attended correctly: a rule weaker than the kernel's loads fails here with a
/// misaligned-address fault, one that refuses 16-byte aligned caches fails at offset 0.
#[test]
fn decode_attention_takes_caches_at_the_alignment_it_checks() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng(29);
    for (hd, kv) in [32, 40, 64, 96, 128, 256]
        .into_iter()
        .flat_map(|hd| KV_TYPES.map(|kv| (hd, kv)))
    {
        let c = attn_case((1, 4, 2, hd, 48, 40, None, None));
        let scale = 1.0 / (hd as f32).sqrt();
        let q = rng.vec(c.n_heads * hd, 1.5);
        let cache_len = c.n_kv * c.capacity * hd;
        let stored = |x: Vec<f32>| cache_of(&Device::cpu(), kv, &x, &[cache_len]).unwrap().1;
        let kc = stored(rng.vec(cache_len, 1.5));
        let vc = stored(rng.vec(cache_len, 1.0));
        let want = attention_ref(&c, &q, &kc, &vc, scale);
        let mut accepted = Vec::new();
        let elem = kv.size_in_bytes();
        for offset in 0..16 / elem {
            // The cache `offset` elements into a buffer whose start is 256-byte aligned.
            let placed = |data: &[f32]| -> Result<Tensor> {
                let mut padded = vec![f32::NAN; offset];
                padded.extend_from_slice(data);
                cache_of(&dev, kv, &padded, &[offset + cache_len])?
                    .0
                    .narrow_rows(offset, cache_len)?
                    .reshape(&[c.n_kv, c.capacity, hd])
            };
            let what = format!(
                "decode attention hd={hd}, {kv} caches {} bytes past 16",
                elem * offset
            );
            let attend = || -> Result<Vec<f32>> {
                let (kt, vt) = (placed(&kc)?, placed(&vc)?);
                let qt = dev.from_slice(&q, &[1, c.n_heads * hd])?;
                let pos = dev.from_slice(&[c.pos as u32], &[1])?;
                let out = poisoned(&dev, &[1, c.n_heads * hd])?;
                run(&dev, |enc| {
                    ops::attention(enc, c.shape(scale), &qt, &kt, &vt, &pos, &out)
                })?;
                out.to_vec::<f32>()
            };
            match attend() {
                Ok(got) => {
                    assert_close(&what, &got, &want, 2e-6);
                    accepted.push(offset);
                }
                Err(e) if e.to_string().contains("aligned") => {}
                Err(e) => panic!("{what}: {e}"),
            }
        }
        assert!(
            accepted.contains(&0),
            "hd={hd}: 16-byte aligned caches refused"
        );
        println!("hd={hd}: {kv} caches taken at element offsets {accepted:?}");
    }
}

/// RoPE of q and k, the cache append and attention in one dispatch (`rope_attention`):
/// decode rows (one kernel, several splits merged by the last block) and prefill rows (two),
/// partial and traditional rotation, GQA, windows and softcap; with head norms of q and k
/// (plain and unit-offset weights) folded into the decode kernel for one row, launched first
/// for more. Outputs concatenated as the attention output, k cache, v cache.
#[test]
fn rope_attention_matches_reference() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng(19);
    // (case, rotary dims, traditional, head norms: Some(unit_offset)).
    let cases = [
        (
            attn_case((1, 9, 3, 64, 2048, 130, None, None)),
            64,
            false,
            None,
        ),
        (attn_case((1, 6, 2, 40, 37, 0, None, None)), 40, false, None),
        (
            attn_case((4, 8, 2, 128, 1000, 700, Some(300), Some(20.0))),
            64,
            true,
            None,
        ),
        (
            attn_case((3, 12, 4, 80, 300, 296, None, None)),
            80,
            true,
            None,
        ),
        (
            attn_case((2, 4, 4, 256, 500, 1, Some(2), None)),
            128,
            false,
            None,
        ),
        (
            attn_case((40, 8, 2, 64, 200, 100, None, None)),
            64,
            false,
            None,
        ),
        (
            attn_case((21, 6, 3, 40, 60, 13, Some(9), None)),
            20,
            true,
            None,
        ),
        // Head norms: one decode row (several splits; hd 40 leaves lanes of a warp out)…
        (
            attn_case((1, 16, 8, 128, 2048, 900, None, None)),
            128,
            false,
            Some(false),
        ),
        (
            attn_case((1, 8, 2, 64, 300, 17, None, None)),
            64,
            false,
            Some(true),
        ),
        (
            attn_case((1, 6, 2, 40, 37, 20, None, None)),
            20,
            true,
            Some(false),
        ),
        (
            attn_case((1, 4, 1, 256, 1200, 1000, Some(512), Some(30.0))),
            256,
            false,
            Some(true),
        ),
        // Long rows (with f16 caches: on tensor cores): head norms at head dim 128, a
        // traditional rotation at 64.
        (
            attn_case((1, 16, 8, 128, 4608, 4500, None, None)),
            128,
            false,
            Some(false),
        ),
        (
            attn_case((1, 8, 2, 64, 2048, 1500, None, None)),
            64,
            true,
            None,
        ),
        // … a few decode rows, prefill with flash attention and with key tiles.
        (
            attn_case((3, 8, 2, 64, 300, 200, None, None)),
            64,
            false,
            Some(true),
        ),
        (
            attn_case((2, 16, 8, 128, 100, 5, None, None)),
            128,
            false,
            Some(false),
        ),
        (
            attn_case((40, 16, 8, 128, 200, 100, None, None)),
            128,
            false,
            Some(false),
        ),
        (
            attn_case((24, 8, 4, 64, 90, 30, Some(20), None)),
            64,
            true,
            Some(true),
        ),
        (
            attn_case((21, 4, 2, 256, 60, 13, None, None)),
            256,
            false,
            Some(true),
        ),
        // … head norms with partial rotations whose pairs lie in other lanes: a short prompt's
        // (normed apart) and a longer one's (normed in the rope pass).
        (
            attn_case((8, 6, 2, 128, 100, 10, None, None)),
            96,
            false,
            Some(false),
        ),
        (
            attn_case((20, 4, 2, 80, 64, 3, None, None)),
            40,
            true,
            Some(true),
        ),
    ];
    for ((c, rotary_dims, traditional, unit_offset), kv) in
        cases.iter().flat_map(|case| KV_TYPES.map(|kv| (case, kv)))
    {
        let (c, rotary_dims, traditional, unit_offset) =
            (c, *rotary_dims, *traditional, *unit_offset);
        let (m, hd) = (c.rows, c.head_dim);
        let scale = 1.0 / (hd as f32).sqrt();
        let case = RopeAppendCase {
            n_heads: c.n_heads,
            n_kv: c.n_kv,
            hd,
            capacity: c.capacity,
            pos: c.pos as u32,
            rotary_dims,
            traditional,
            qkv: [
                rng.vec(m * c.n_heads * hd, 1.5),
                rng.vec(m * c.n_kv * hd, 1.5),
                rng.vec(m * c.n_kv * hd, 1.0),
            ],
            caches: [
                rng.vec(c.n_kv * c.capacity * hd, 1.5),
                rng.vec(c.n_kv * c.capacity * hd, 1.0),
            ],
            kv,
        };
        let eps = 1e-6;
        let norm_weights = [rng.vec(hd, 1.0), rng.vec(hd, 1.0)];
        // The reference rotates the normed q and k.
        let normed = unit_offset.map(|unit_offset| {
            let [q, k, v] = &case.qkv;
            let offset = if unit_offset { 1.0 } else { 0.0 };
            let [qw, kw] = &norm_weights;
            RopeAppendCase {
                qkv: [
                    head_norm_ref(q, qw, eps, offset),
                    head_norm_ref(k, kw, eps, offset),
                    v.clone(),
                ],
                caches: case.caches.clone(),
                ..case
            }
        });
        let (q_rot, filled) = normed.as_ref().unwrap_or(&case).want();
        let as_f32 = |x: &[f64]| x.iter().map(|&v| v as f32).collect::<Vec<f32>>();
        let mut want = attention_ref(
            c,
            &as_f32(&q_rot),
            &as_f32(&filled[0]),
            &as_f32(&filled[1]),
            scale,
        );
        want.extend(filled.concat());
        let compute = |dev: &Device| {
            let o = case.upload(dev)?;
            let out = poisoned(dev, &[m, c.n_heads * hd])?;
            // One query row also writes the output's f16 copy (for the o projection).
            let out_h = match m {
                1 => Some(
                    dev.from_slice(&vec![half::f16::NAN; c.n_heads * hd], &[1, c.n_heads * hd])?,
                ),
                _ => None,
            };
            let [kc, vc] = &o.caches;
            let shape = c.shape(scale);
            let [qw, kw] = [0, 1].map(|i| dev.from_slice(&norm_weights[i], &[hd]));
            let (qw, kw) = (qw?, kw?);
            let head_norms = unit_offset.map(|unit_offset| ops::HeadNorms {
                q: &qw,
                k: &kw,
                norm: PreNorm { eps, unit_offset },
            });
            run(dev, |enc| {
                let [q, k, v] = &o.qkv;
                ops::rope_attention(
                    enc,
                    [q, k, v],
                    head_norms,
                    &o.table,
                    traditional,
                    shape,
                    &o.pos,
                    (kc, vc),
                    (&out, out_h.as_ref()),
                )
            })?;
            if let Some(out_h) = &out_h {
                assert_half_copy(&format!("rope_attention m=1 {hd}"), &out, out_h)?;
            }
            let mut got = out.to_vec::<f32>()?;
            got.extend(cache_values(kc)?);
            got.extend(cache_values(vc)?);
            Ok(got)
        };
        let what = format!(
            "rope_attention rows={m} heads={}/{} hd={hd} rot={rotary_dims} trad={traditional} \
             pos={} cap={} window={:?} softcap={:?} head norms unit_offset={unit_offset:?} \
             caches {kv}",
            c.n_heads, c.n_kv, c.pos, c.capacity, c.window, c.softcap
        );
        let flash = m > 4 && [64, 80, 96, 128].contains(&hd) || flash_decodes(c, kv);
        check(&what, &dev, compute, &want, if flash { 3e-3 } else { 1e-5 });
    }
}

/// RMSNorm of each `w.len()`-dim head of `x` with weight `w` (+ `offset`), in f64, rounded to
/// f32 (the reference's normed q and k).
fn head_norm_ref(x: &[f32], w: &[f32], eps: f32, offset: f64) -> Vec<f32> {
    x.chunks(w.len())
        .flat_map(|head| {
            let ms = head.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / w.len() as f64;
            let r = 1.0 / (ms + eps as f64).sqrt();
            head.iter()
                .zip(w)
                .map(move |(&v, &w)| (v as f64 * r * (w as f64 + offset)) as f32)
        })
        .collect()
}

/// Rows stored at pos.., rounded to nearest in an f16 cache; the rows around them untouched.
#[test]
fn kv_append_writes_rows_at_pos() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng(10);
    let (rows, n_kv, hd, capacity, pos) = (3, 2, 40, 11, 7);
    let x = rng.vec(rows * n_kv * hd, 1.0);
    let cache = rng.vec(n_kv * capacity * hd, 1.0);
    for kv in KV_TYPES {
        let mut want: Vec<f64> = cache.iter().map(|&v| v as f64).collect();
        for r in 0..rows {
            for g in 0..n_kv {
                for d in 0..hd {
                    want[(g * capacity + pos + r) * hd + d] = x[(r * n_kv + g) * hd + d] as f64;
                }
            }
        }
        let want = stored_as(kv, want);
        let compute = |dev: &Device| {
            let xt = dev.from_slice(&x, &[rows, n_kv * hd])?;
            let ct = cache_of(dev, kv, &cache, &[n_kv, capacity, hd])?.0;
            let post = dev.from_slice(&[pos as u32], &[1])?;
            run(dev, |enc| ops::kv_append(enc, &xt, &post, &ct))?;
            cache_values(&ct)
        };
        check(&format!("kv_append {kv}"), &dev, compute, &want, 0.0);
    }
}

// ---------------------------------------------------------------------------------------------
// Token choice

#[test]
fn argmax_picks_lowest_id_of_the_last_row() {
    let Some(dev) = gpu() else { return };
    // (rows, vocab, tied ids): a last row off 16-byte alignment (scalar loads), an aligned one
    // (float4 loads), and an aligned one with a scalar tail holding the tie's lower id.
    let cases: [(usize, usize, [usize; 2]); 3] = [
        (2, 50_001, [31_337, 777]),
        (2, 50_004, [31_337, 777]),
        (1, 50_003, [50_002, 50_001]),
    ];
    for (case, (rows, vocab, tie)) in cases.into_iter().enumerate() {
        let mut rng = Rng(11 + case as u64);
        let mut logits = rng.vec(rows * vocab, 10.0);
        let last = (rows - 1) * vocab;
        // A tie for the maximum in the last row, and a larger value in the first row (ignored
        // where there are two).
        logits[last + tie[0]] = 20.0;
        logits[last + tie[1]] = 20.0;
        if rows > 1 {
            logits[5] = 50.0;
        }
        let compute = |dev: &Device| {
            let lt = dev.from_slice(&logits, &[rows, vocab])?;
            let token = poisoned_u32(dev, &[1])?;
            run(dev, |enc| ops::argmax(enc, &lt, &token))?;
            Ok(token.to_vec::<u32>()?.iter().map(|&t| t as f32).collect())
        };
        check("argmax", &dev, compute, &[tie[1] as f64], 0.0);
        // The greedy step's end: the same pick, also in ring slot 42 % 5 (host-mapped memory,
        // read in place), and the position moved on by one.
        let compute = |dev: &Device| {
            let lt = dev.from_slice(&logits, &[rows, vocab])?;
            let token = poisoned_u32(dev, &[1])?;
            let pos = dev.from_slice(&[41u32], &[1])?;
            let ring = dev.zeros_host_mapped(&[5], DType::U32)?;
            ring.write(&[u32::MAX; 5])?;
            run(dev, |enc| {
                ops::argmax_end_step(enc, &lt, &token, &pos, &ring)
            })?;
            let mut got = token.to_vec::<u32>()?;
            got.extend(pos.to_vec::<u32>()?);
            got.extend(ring.read_later::<u32>()?.finish()?);
            Ok(got.iter().map(|&t| t as f32).collect())
        };
        let m = u32::MAX as f32 as f64;
        let want = [tie[1] as f64, 42.0, m, m, tie[1] as f64, m, m];
        check("argmax_end_step", &dev, compute, &want, 0.0);
    }
}

#[test]
fn greedy_sampling_with_repetition_penalty() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng(12);
    let (vocab, capacity, pos) = (3001, 40, 20usize);
    let history: Vec<u32> = (0..capacity).map(|_| rng.below(vocab) as u32).collect();
    for (penalty, window) in [(1.0f32, 0usize), (1.5, 6), (0.7, 6), (2.0, 64)] {
        let mut logits = rng.vec(vocab, 4.0);
        // Make a recent token the unpenalised winner, so the penalty decides.
        let recent = history[pos - 1] as usize;
        logits[recent] = 4.5;
        let seen: std::collections::HashSet<u32> = history[(pos + 1).saturating_sub(window)..=pos]
            .iter()
            .copied()
            .collect();
        let adjusted = |i: usize| {
            let v = logits[i] as f64;
            if penalty != 1.0 && seen.contains(&(i as u32)) {
                if v < 0.0 {
                    v * penalty as f64
                } else {
                    v / penalty as f64
                }
            } else {
                v
            }
        };
        let best = (0..vocab).fold(0, |b, i| if adjusted(i) > adjusted(b) { i } else { b });
        let params = SamplingParams {
            temperature: 0.0,
            repetition_penalty: penalty,
            repetition_window: window,
            ..SamplingParams::default()
        };
        let compute = |dev: &Device| {
            let lt = dev.from_slice(&logits, &[1, vocab])?;
            let post = dev.from_slice(&[pos as u32], &[1])?;
            let token = poisoned_u32(dev, &[1])?;
            let hist = dev.from_slice(&history, &[capacity])?;
            run(dev, |enc| {
                ops::sample(enc, params, &lt, &post, &token, &hist)
            })?;
            let h = hist.to_vec::<u32>()?;
            Ok(vec![
                token.to_vec::<u32>()?[0] as f32,
                h[pos + 1] as f32,
                h[pos] as f32,
            ])
        };
        let want = [best as f64, best as f64, history[pos] as f64];
        check(
            &format!("sample penalty={penalty} window={window}"),
            &dev,
            compute,
            &want,
            0.0,
        );
    }
}

#[test]
fn sampling_matches_the_cpu_semantics() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng(15);
    let (vocab, capacity) = (5003, 64);
    let history: Vec<u32> = (0..capacity).map(|_| rng.below(vocab) as u32).collect();
    let base = SamplingParams {
        temperature: 0.8,
        ..SamplingParams::default()
    };
    let param_sets = [
        base,
        SamplingParams {
            temperature: 1.3,
            top_k: 40,
            ..base
        },
        SamplingParams { top_p: 0.9, ..base },
        SamplingParams {
            temperature: 0.6,
            min_p: 0.05,
            ..base
        },
        SamplingParams {
            temperature: 1.0,
            top_k: 300,
            top_p: 0.95,
            min_p: 0.01,
            ..base
        },
        SamplingParams {
            repetition_penalty: 1.2,
            repetition_window: 20,
            top_k: 7,
            ..base
        },
        SamplingParams { top_k: 1, ..base },
        SamplingParams {
            temperature: 2.0,
            top_k: 5000,
            top_p: 0.5,
            ..base
        },
    ];
    for (case, params) in param_sets.iter().enumerate() {
        for round in 0..12 {
            // Every other round quantizes the logits, so that many tie (top-k cuts, top-p
            // extension and the draw inside a tie group); some are −∞. Every third is nearly
            // flat, so that top-p and min-p keep thousands of tokens: the sampler's selection
            // path, where the others take its candidates' path.
            let spread = if round % 3 == 2 { 0.3 } else { 6.0 };
            let mut logits = rng.vec(vocab, spread);
            if round % 2 == 1 {
                logits
                    .iter_mut()
                    .for_each(|v| *v = (*v * 2.0).round() / 2.0);
            }
            for _ in 0..10 {
                logits[rng.below(vocab)] = f32::NEG_INFINITY;
            }
            let pos = rng.below(capacity - 1);
            let params = SamplingParams {
                seed: rng.next_u64(),
                ..*params
            };
            let want = common::sample_ref(&logits, &history, pos, &params);
            let compute = |dev: &Device| {
                let lt = dev.from_slice(&logits, &[1, vocab])?;
                let post = dev.from_slice(&[pos as u32], &[1])?;
                let token = poisoned_u32(dev, &[1])?;
                let hist = dev.from_slice(&history, &[capacity])?;
                run(dev, |enc| {
                    ops::sample(enc, params, &lt, &post, &token, &hist)
                })?;
                Ok(vec![
                    token.to_vec::<u32>()?[0] as f32,
                    hist.to_vec::<u32>()?[pos + 1] as f32,
                ])
            };
            let what = format!("sample case {case} round {round} {params:?}");
            check(&what, &dev, compute, &[want as f64, want as f64], 0.0);
        }
    }
    // Parameters out of the CPU sampler's ranges are refused when recorded.
    let lt = dev.from_slice(&rng.vec(vocab, 1.0), &[1, vocab]).unwrap();
    let post = dev.from_slice(&[3u32], &[1]).unwrap();
    let token = dev.zeros(&[1], DType::U32).unwrap();
    let hist = dev.zeros(&[capacity], DType::U32).unwrap();
    let mut enc = CommandEncoder::new(&dev);
    let bad = SamplingParams { top_p: 0.0, ..base };
    let err = ops::sample(&mut enc, bad, &lt, &post, &token, &hist).unwrap_err();
    assert!(matches!(err, Error::Op { op: "sample", .. }), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Graph capture

/// A decode step of a small model (gather, norm, projections, RoPE, cache append, attention,
/// logits, a tensor-core matvec folding a residual update, greedy sampling) captured once and
/// replayed at several positions gives the very bits of plain launches.
#[test]
fn graph_replay_is_bit_identical_to_plain_launches() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng(13);
    let (vocab, hidden, n_heads, n_kv, hd, capacity) = (301, 256, 4, 2, 64, 900);
    let embed = mlx_weight(&mut rng, vocab, hidden, 4, 64, DType::BF16)
        .upload(&dev, None)
        .unwrap();
    let wq = ggml_weight(&mut rng, n_heads * hd, hidden, GgmlType::Q4K)
        .upload(&dev, None)
        .unwrap();
    let wk = mlx_weight(&mut rng, n_kv * hd, hidden, 6, 32, DType::F16)
        .upload(&dev, None)
        .unwrap();
    let wv = ggml_weight(&mut rng, n_kv * hd, hidden, GgmlType::Q8_0)
        .upload(&dev, None)
        .unwrap();
    let head = dense_weight(&mut rng, vocab, n_heads * hd, DType::BF16)
        .upload(&dev, None)
        .unwrap();
    // A tensor-core matvec (over 2^18 weights) folding a residual update and a norm.
    let w_tc = mlx_weight(&mut rng, 1040, hidden, 4, 64, DType::F16)
        .upload(&dev, None)
        .unwrap();
    let norm_w = dev.from_slice(&rng.vec(hidden, 1.0), &[hidden]).unwrap();
    let rope = RopeTable::new(&dev, hd, 10000.0, &ops::RopeScaling::None).unwrap();
    let k_cache = dev
        .from_slice(&rng.vec(n_kv * capacity * hd, 1.0), &[n_kv, capacity, hd])
        .unwrap();
    let v_cache = dev
        .from_slice(&rng.vec(n_kv * capacity * hd, 1.0), &[n_kv, capacity, hd])
        .unwrap();
    // rope_attention's own caches, alike at first.
    let (k_cache2, v_cache2) = (
        dev.from_slice(&k_cache.to_vec::<f32>().unwrap(), &[n_kv, capacity, hd])
            .unwrap(),
        dev.from_slice(&v_cache.to_vec::<f32>().unwrap(), &[n_kv, capacity, hd])
            .unwrap(),
    );
    let history: Vec<u32> = (0..capacity).map(|_| rng.below(vocab) as u32).collect();
    let history = dev.from_slice(&history, &[capacity]).unwrap();
    let pos = dev.from_slice(&[0u32], &[1]).unwrap();
    let ring = dev.zeros_host_mapped(&[3], DType::U32).unwrap();
    let ids = dev.from_slice(&[17u32], &[1]).unwrap();
    let t = |n| dev.empty(&[1, n], DType::F32).unwrap();
    let (x, xn, q, qr, k, kr, v, att, att2, logits) = (
        t(hidden),
        t(hidden),
        t(n_heads * hd),
        t(n_heads * hd),
        t(n_kv * hd),
        t(n_kv * hd),
        t(n_kv * hd),
        t(n_heads * hd),
        t(n_heads * hd),
        t(vocab),
    );
    let (x_updated, tc_out) = (t(hidden), t(1040));
    let pre = PreNorm {
        eps: 1e-6,
        unit_offset: true,
    };
    let token = dev.empty(&[1], DType::U32).unwrap();
    let shape = AttentionShape {
        n_heads,
        n_kv_heads: n_kv,
        head_dim: hd,
        scale: 0.125,
        window: None,
        softcap: None,
        min_keys: 0,
    };
    let params = SamplingParams {
        repetition_penalty: 1.3,
        repetition_window: 16,
        ..SamplingParams::default()
    };
    let record = |enc: &mut CommandEncoder| -> Result<()> {
        ops::embedding(enc, &ids, &embed, &x)?;
        ops::rms_norm(enc, &x, &norm_w, 1e-5, false, &xn)?;
        ops::matmul(enc, &xn, &wq, &q)?;
        ops::matmul(enc, &xn, &wk, &k)?;
        ops::matmul(enc, &xn, &wv, &v)?;
        ops::rope(enc, &q, &rope, n_heads, hd, false, &pos, &qr)?;
        ops::rope(enc, &k, &rope, n_kv, hd, false, &pos, &kr)?;
        ops::kv_append(enc, &kr, &pos, &k_cache)?;
        ops::kv_append(enc, &v, &pos, &v_cache)?;
        ops::attention(enc, shape, &qr, &k_cache, &v_cache, &pos, &att)?;
        let caches2 = (&k_cache2, &v_cache2);
        let qkv = [&q, &k, &v];
        ops::rope_attention(
            enc,
            qkv,
            None,
            &rope,
            false,
            shape,
            &pos,
            caches2,
            (&att2, None),
        )?;
        ops::matmul(enc, &att, &head, &logits)?;
        let update = ops::ResidualUpdate {
            y: &xn,
            weight: &norm_w,
            out: &x_updated,
        };
        ops::normed_matmul(enc, &x, Some(update), (&norm_w, pre), &w_tc, &tc_out)?;
        ops::sample(enc, params, &logits, &pos, &token, &history)?;
        ops::end_step(enc, &token, &pos, &ring)
    };
    let outputs = |p: usize| -> Vec<u32> {
        let mut bits: Vec<u32> = [
            &x, &xn, &q, &qr, &k, &kr, &v, &att, &att2, &logits, &x_updated, &tc_out,
        ]
        .iter()
        .flat_map(|t| t.to_vec::<f32>().unwrap().into_iter().map(f32::to_bits))
        .collect();
        bits.push(token.to_vec::<u32>().unwrap()[0]);
        bits.push(history.to_vec::<u32>().unwrap()[p + 1]);
        // The step's end: the token in its ring slot (host-mapped, read in place), pos moved.
        let slot = ring.narrow_rows((p + 1) % 3, 1).unwrap();
        bits.push(slot.read_later::<u32>().unwrap().finish().unwrap()[0]);
        bits.push(pos.to_vec::<u32>().unwrap()[0]);
        bits
    };
    let poison = || {
        for t in [
            &x, &xn, &q, &qr, &k, &kr, &v, &att, &att2, &logits, &x_updated, &tc_out,
        ] {
            t.write(&vec![f32::NAN; t.elem_count()]).unwrap();
        }
        token.write(&[u32::MAX]).unwrap();
        ring.write(&[u32::MAX; 3]).unwrap();
    };

    let mut enc = CommandEncoder::new(&dev);
    enc.begin_capture().unwrap();
    record(&mut enc).unwrap();
    let mut graph = enc.end_capture().unwrap();
    assert_eq!(graph.len(), 15);
    // Several active splits from 700 on: their merge counters must be back at 0 after each
    // replay.
    for p in [5usize, 6, 700, 701, 898] {
        pos.write(&[p as u32]).unwrap();
        poison();
        run(&dev, record).unwrap();
        let plain = outputs(p);
        assert!(plain
            .iter()
            .take(plain.len() - 4)
            .all(|&b| f32::from_bits(b).is_finite()));
        let n = plain.len();
        assert_eq!(
            plain[n - 4],
            plain[n - 2],
            "pos {p}: the ring slot holds the token"
        );
        assert_eq!(
            plain[n - 1],
            p as u32 + 1,
            "pos {p}: the step's end moves pos on"
        );
        // The fused RoPE + append + attention agrees with its three steps.
        let fused = att2.to_vec::<f32>().unwrap();
        let steps: Vec<f64> = att
            .to_vec::<f32>()
            .unwrap()
            .iter()
            .map(|&v| v as f64)
            .collect();
        assert_close(&format!("rope_attention at pos {p}"), &fused, &steps, 1e-6);
        poison();
        pos.write(&[p as u32]).unwrap();
        graph.replay().unwrap();
        dev.synchronize().unwrap();
        assert!(
            plain == outputs(p),
            "pos {p}: graph replay differs from plain launches"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Benchmark (run with `--ignored` on a GPU): decode-shaped kernels timed by graph replay, each
// dispatch over another copy of its data so that the bytes come from device memory, not L2.

/// Copies of `bytes`-sized data that together exceed any L2 cache.
fn copies(bytes: usize) -> usize {
    (256usize << 20).div_ceil(bytes).clamp(1, 64)
}

/// Median seconds per dispatch over replays of `count` dispatches (`record(enc, i)` makes the
/// i-th).
fn time_replays(
    dev: &Device,
    count: usize,
    record: &dyn Fn(&mut CommandEncoder, usize) -> Result<()>,
) -> f64 {
    let mut enc = CommandEncoder::new(dev);
    enc.begin_capture().unwrap();
    for i in 0..count {
        record(&mut enc, i).unwrap();
    }
    let mut graph = enc.end_capture().unwrap();
    graph.replay().unwrap();
    dev.synchronize().unwrap();
    let mut times: Vec<f64> = (0..7)
        .map(|_| {
            let t0 = std::time::Instant::now();
            graph.replay().unwrap();
            dev.synchronize().unwrap();
            t0.elapsed().as_secs_f64() / count as f64
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[3]
}

fn attention_bench(
    dev: &Device,
    rng: &mut Rng,
    rows: usize,
    n_heads: usize,
    n_kv: usize,
    hd: usize,
    ctx: usize,
) {
    attention_bench_kv(dev, rng, DType::F32, (rows, n_heads, n_kv, hd, ctx));
}

/// `attention_bench` over caches of `kv`: (rows, heads, kv heads, head dim, context).
fn attention_bench_kv(
    dev: &Device,
    rng: &mut Rng,
    kv: DType,
    (rows, n_heads, n_kv, hd, ctx): (usize, usize, usize, usize, usize),
) {
    let cache_bytes = 2 * n_kv * ctx * hd * kv.size_in_bytes();
    let caches: Vec<(Tensor, Tensor)> = (0..copies(cache_bytes).min(8))
        .map(|_| {
            let x = rng.vec(n_kv * ctx * hd, 1.0);
            (
                cache_of(dev, kv, &x, &[n_kv, ctx, hd]).unwrap().0,
                cache_of(dev, kv, &x, &[n_kv, ctx, hd]).unwrap().0,
            )
        })
        .collect();
    let q = dev
        .from_slice(&rng.vec(rows * n_heads * hd, 1.0), &[rows, n_heads * hd])
        .unwrap();
    let pos = dev.from_slice(&[(ctx - rows) as u32], &[1]).unwrap();
    let o = dev.empty(&[rows, n_heads * hd], DType::F32).unwrap();
    let shape = AttentionShape {
        n_heads,
        n_kv_heads: n_kv,
        head_dim: hd,
        scale: 0.1,
        window: None,
        softcap: None,
        min_keys: ctx - rows + 1,
    };
    let secs = time_replays(dev, 16, &|enc, i| {
        let (k, v) = &caches[i % caches.len()];
        ops::attention(enc, shape, &q, k, v, &pos, &o)
    });
    if rows == 1 {
        println!(
            "attention decode heads={n_heads}/{n_kv} hd={hd} ctx={ctx} {kv}: {:7.1} us  {:6.0} GB/s of KV",
            secs * 1e6,
            cache_bytes as f64 / secs / 1e9
        );
    } else {
        let flops = 4.0 * (n_heads * hd) as f64 * (rows * (rows + 1) / 2) as f64;
        println!(
            "attention prefill rows={rows} heads={n_heads}/{n_kv} hd={hd}: {:8.1} us  {:5.1} TFLOP/s",
            secs * 1e6,
            flops / secs / 1e12
        );
    }
    assert!(o.to_vec::<f32>().unwrap().iter().all(|v| v.is_finite()));
}

#[test]
#[ignore]
fn bench_decode_kernels() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng(14);
    let (n, k) = (4096, 4096);
    let x = dev.from_slice(&rng.vec(k, 1.0), &[1, k]).unwrap();
    let out = dev.empty(&[1, n], DType::F32).unwrap();
    let rows = 2048; // one prefill chunk (engine/session.rs)
    let xm = dev.from_slice(&rng.vec(rows * k, 1.0), &[rows, k]).unwrap();
    let om = dev.empty(&[rows, n], DType::F32).unwrap();
    let mut weights = vec![
        mlx_weight(&mut rng, n, k, 4, 64, DType::BF16),
        mlx_weight(&mut rng, n, k, 8, 64, DType::BF16),
        mlx_weight(&mut rng, n, k, 3, 64, DType::BF16),
        dense_weight(&mut rng, n, k, DType::BF16),
    ];
    weights.extend(
        [GgmlType::Q4_0, GgmlType::Q8_0, GgmlType::Q4K, GgmlType::Q6K]
            .map(|t| ggml_weight(&mut rng, n, k, t)),
    );
    for w in &weights {
        let first = w.upload(&dev, None).unwrap();
        let bytes = first.weight_bytes();
        let mut lins = vec![first];
        lins.extend((1..copies(bytes)).map(|_| w.upload(&dev, None).unwrap()));
        let secs = time_replays(&dev, 64, &|enc, i| {
            ops::matmul(enc, &x, &lins[i % lins.len()], &out)
        });
        println!(
            "matvec {:>10} {n}x{k}: {:6.1} us  {:6.0} GB/s of weights",
            w.layout.variant(),
            secs * 1e6,
            bytes as f64 / secs / 1e9
        );
        if matches!(
            w.layout,
            WeightLayout::MlxAffine { bits: 4 | 8, .. }
                | WeightLayout::Gguf(GgmlType::Q4_0 | GgmlType::Q8_0 | GgmlType::Q4K)
                | WeightLayout::Dense
        ) {
            let secs = time_replays(&dev, 3, &|enc, i| {
                ops::matmul(enc, &xm, &lins[i % lins.len()], &om)
            });
            println!(
                "matmul {:>10} {rows}x{n}x{k}: {:8.1} us  {:5.1} TFLOP/s",
                w.layout.variant(),
                secs * 1e6,
                2.0 * (rows * n * k) as f64 / secs / 1e12
            );
        }
    }
    assert!(out.to_vec::<f32>().unwrap().iter().all(|v| v.is_finite()));
    attention_bench(&dev, &mut rng, 1, 32, 8, 128, 4096);
    attention_bench(&dev, &mut rng, 1, 9, 3, 64, 2048);
    attention_bench(&dev, &mut rng, 1, 9, 3, 64, 256);
    attention_bench(&dev, &mut rng, 1, 32, 8, 64, 256);
    attention_bench(&dev, &mut rng, 1, 32, 8, 64, 1024);
    attention_bench(&dev, &mut rng, 1, 32, 8, 64, 2048);
    attention_bench(&dev, &mut rng, 1, 32, 8, 64, 8192);
    attention_bench(&dev, &mut rng, 1, 32, 8, 128, 1024);
    attention_bench(&dev, &mut rng, 1, 16, 8, 128, 4096);
    for shape in [
        (1, 32, 8, 64, 1024),
        (1, 32, 8, 64, 2048),
        (1, 32, 8, 128, 1024),
        (1, 32, 8, 128, 2048),
        (1, 32, 8, 128, 4096),
        (1, 16, 8, 128, 1024),
        (1, 16, 8, 128, 2048),
        (1, 16, 8, 128, 8192),
    ] {
        attention_bench_kv(&dev, &mut rng, DType::F16, shape);
    }
    attention_bench(&dev, &mut rng, 1, 32, 8, 128, 32768);
    attention_bench(&dev, &mut rng, 1024, 32, 8, 128, 1024);
    attention_bench(&dev, &mut rng, 2048, 32, 8, 128, 2048);
    attention_bench(&dev, &mut rng, 512, 9, 3, 64, 512);

    let vocab = 151_936;
    let flat = rng.vec(vocab, 8.0);
    // A confident model's row: a head of 30 logits 10 to 20 above the flat rest, so that the
    // filters keep few tokens (the sampler's candidates' path).
    let mut peaked = flat.clone();
    for v in 10..20 {
        for _ in 0..3 {
            peaked[rng.below(vocab)] = 8.0 + v as f32 + rng.sym(0.5);
        }
    }
    let logits = dev.from_slice(&flat, &[1, vocab]).unwrap();
    let pos = dev.from_slice(&[100u32], &[1]).unwrap();
    let token = dev.empty(&[1], DType::U32).unwrap();
    let history = dev.zeros(&[4096], DType::U32).unwrap();
    let secs = time_replays(&dev, 16, &|enc, _| ops::argmax(enc, &logits, &token));
    println!("argmax vocab={vocab}: {:6.1} us", secs * 1e6);
    let base = SamplingParams {
        temperature: 0.7,
        seed: 5,
        ..SamplingParams::default()
    };
    let peaked = dev.from_slice(&peaked, &[1, vocab]).unwrap();
    for (row, params) in [
        ("flat", base),
        (
            "flat",
            SamplingParams {
                top_k: 40,
                top_p: 0.95,
                repetition_penalty: 1.1,
                ..base
            },
        ),
        (
            "flat",
            SamplingParams {
                top_p: 0.9,
                min_p: 0.05,
                ..base
            },
        ),
        ("peaked", SamplingParams { top_p: 0.9, ..base }),
        ("peaked", SamplingParams { top_k: 40, ..base }),
    ] {
        let logits = if row == "peaked" { &peaked } else { &logits };
        let secs = time_replays(&dev, 16, &|enc, _| {
            ops::sample(enc, params, logits, &pos, &token, &history)
        });
        println!(
            "sample {row} vocab={vocab} top_k={} top_p={} min_p={} penalty={}: {:6.1} us",
            params.top_k,
            params.top_p,
            params.min_p,
            params.repetition_penalty,
            secs * 1e6
        );
    }
}

/// Random stored MLX affine data (words, scales, biases) without the dense reference, for
/// benchmark shapes too large to dequantize on the host.
fn mlx_bench_weight(rng: &mut Rng, n: usize, k: usize, bits: u32, group_size: usize) -> HostWeight {
    let groups = n * (k / group_size);
    let (scale_bytes, _) = float_bytes(rng, groups, 0.05, DType::BF16);
    let (bias_bytes, _) = float_bytes(rng, groups, 0.2, DType::BF16);
    HostWeight {
        layout: WeightLayout::MlxAffine { bits, group_size },
        parts: vec![
            (
                rng.bytes(n * k * bits as usize / 8),
                vec![n, k * bits as usize / 32],
                DType::U32,
            ),
            (scale_bytes, vec![n, k / group_size], DType::BF16),
            (bias_bytes, vec![n, k / group_size], DType::BF16),
        ],
        dense: Vec::new(),
        n,
        k,
    }
}

/// Uploads of `w` that together exceed the L2 cache (one when a single copy does).
fn bench_copies(dev: &Device, w: &HostWeight) -> Vec<Linear> {
    let first = w.upload(dev, None).unwrap();
    let bytes = first.weight_bytes();
    let mut lins = vec![first];
    lins.extend((1..copies(bytes)).map(|_| w.upload(dev, None).unwrap()));
    lins
}

#[test]
#[ignore]
fn bench_matvec_shapes() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng(17);
    // (n, k, gated): SmolLM2-135M q/o and up; Llama-3.2-1B o, q/k/v, down, gate/up, lm head;
    // Llama-3 8B q/o, down, gate/up, lm head.
    let shapes = [
        (576, 576, false),
        (1536, 576, false),
        (2048, 2048, false),
        (3072, 2048, false),
        (2048, 8192, false),
        (8192, 2048, true),
        (128_256, 2048, false),
        (4096, 4096, false),
        (4096, 14336, false),
        (14336, 4096, true),
        (128_256, 4096, false),
    ];
    for (n, k, gated) in shapes {
        let x = dev.from_slice(&rng.vec(k, 1.0), &[1, k]).unwrap();
        let out = dev.empty(&[1, n], DType::F32).unwrap();
        let mut weights = vec![mlx_bench_weight(&mut rng, n, k, 4, 64)];
        if n * k <= 4096 * 14336 && n >= 4096 {
            weights.push(mlx_bench_weight(&mut rng, n, k, 8, 64));
            weights.extend(
                [GgmlType::Q4_0, GgmlType::Q8_0, GgmlType::Q4K, GgmlType::Q6K]
                    .map(|t| ggml_weight(&mut rng, n, k, t)),
            );
        }
        for w in &weights {
            let gates = bench_copies(&dev, w);
            let ups = match gated {
                true => bench_copies(&dev, w),
                false => Vec::new(),
            };
            let bytes = gates[0].weight_bytes() * if gated { 2 } else { 1 };
            let secs = time_replays(&dev, 64, &|enc, i| match gated {
                true => {
                    let j = i % gates.len();
                    ops::gated_matmul(
                        enc,
                        &x,
                        None,
                        None,
                        &gates[j],
                        &ups[j],
                        UnaryFn::Silu,
                        &out,
                        None,
                    )
                }
                false => ops::matmul(enc, &x, &gates[i % gates.len()], &out),
            });
            println!(
                "matvec{} {:>10} {n}x{k}: {:7.1} us  {:6.0} GB/s of weights",
                if gated { " gated" } else { "" },
                w.layout.variant(),
                secs * 1e6,
                bytes as f64 / secs / 1e9
            );
        }
    }
}

/// A prompt of 40 tokens, whose norms and gated activations write f16 activations for the
/// products through cuBLAS (read in place), and one of 12 (f32 activations, the short kernels),
/// give the CPU backend's last logits within the f16 rounding of those products.
#[test]
fn prefill_of_f16_activations_matches_the_cpu() {
    let Some(dev) = gpu() else { return };
    let params = synthetic::preset("smollm2-135m").unwrap();
    let quant = SyntheticQuant::parse("mlx4g64", &params).unwrap();
    let logits = |dev: &Device, prompt: &[u32]| {
        let weights = SyntheticWeights::new(dev, quant, 5);
        let model = Decoder::load(params.clone(), &weights, dev).unwrap();
        let mut session = Session::with_kv_dtype(model, dev, 64, DType::F32).unwrap();
        session.prefill(prompt, SamplingParams::default()).unwrap();
        session.logits().unwrap()
    };
    for len in [12, 40] {
        let prompt: Vec<u32> = (0..len).map(|i| i * 131 % 4096 + 3).collect();
        let want: Vec<f64> = logits(&Device::cpu(), &prompt)
            .iter()
            .map(|&v| v as f64)
            .collect();
        let got = logits(&dev, &prompt);
        assert_close(&format!("{len}-token prefill"), &got, &want, 1e-2);
    }
}

/// A session records its decode steps apart once rows pass each of LONG_ROW_KEYS (the planner
/// takes tensor-core decode attention for f16 caches at head dim 64 from 1,024 keys), and
/// across that boundary the replayed steps give the very bits of plain launches.
#[test]
fn decode_graphs_follow_the_row_length() {
    let Some(dev) = gpu() else { return };
    let params = synthetic::preset("smollm2-135m").unwrap();
    let quant = SyntheticQuant::parse("mlx4g64", &params).unwrap();
    let weights = SyntheticWeights::new(&dev, quant, 3);
    let model = Decoder::load(params, &weights, &dev).unwrap();
    let mut session = Session::with_kv_dtype(model, &dev, 1100, DType::F16).unwrap();
    let greedy = SamplingParams::default();
    let prompt: Vec<u32> = (0..LONG_ROW_KEYS[0] as u32 - 4)
        .map(|i| i * 7 % 4096)
        .collect();
    let mut runs = Vec::new();
    for use_graph in [false, true] {
        let mut token = session.prefill(&prompt, greedy).unwrap();
        let mut logits = Vec::new();
        for step in 0..8 {
            let pos = prompt.len() + step;
            token = session
                .step_with_token(token, pos, greedy, use_graph)
                .unwrap();
            logits.push(session.logits().unwrap());
        }
        runs.push(logits);
    }
    // Steps 3 on are past 1,024 keys: replayed from the second graph.
    for (step, (plain, replayed)) in runs[0].iter().zip(&runs[1]).enumerate() {
        assert!(
            plain
                .iter()
                .map(|x| x.to_bits())
                .eq(replayed.iter().map(|x| x.to_bits())),
            "step {step} (position {}): replayed logits differ from plain launches",
            prompt.len() + step
        );
    }
}
