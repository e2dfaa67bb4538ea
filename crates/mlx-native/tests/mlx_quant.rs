//! MLX affine quantization and the CPU matmul / embedding kernels, checked against MLX
//! (fixtures made by tools/mlx_fixtures_quant.py with mlx.core) and against f64 references.
//!
//! Tolerances, relative to s = Σ|xⱼ·wⱼ| of each output (the size of the terms summed):
//! - our f32 kernels vs an f64 reference: 1e-5·s (f32 accumulation over a few hundred
//!   terms, in an order that differs from the reference's).
//! - vs MLX in f32: the same (MLX's CPU kernel also accumulates in f32).
//! - vs MLX in f16: 4e-3·s. MLX rounds each dequantized weight to f16 and, for bit widths
//!   without its SIMD path, accumulates in f16; we dequantize and accumulate in f32.

use half::{bf16, f16};
use mlx_native::core::encoder::CommandEncoder;
use mlx_native::core::op::{PreNorm, UnaryFn};
use mlx_native::ops::{
    embedding, gated_matmul, matmul, matmul_add, normed_matmul, rms_norm_add, scaled_embedding,
    Linear, ResidualUpdate,
};
use mlx_native::quant::mlx_affine::{dequantize_row, quantize, unpack};
use mlx_native::quant::{GgmlType, WeightLayout};
use mlx_native::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

/// A tensor read from a safetensors fixture: dtype name, shape, little-endian bytes.
struct Raw {
    dtype: String,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl Raw {
    fn f32s(&self) -> Vec<f32> {
        match self.dtype.as_str() {
            "F32" => self
                .bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            "F16" => self.f16s().iter().map(|v| v.to_f32()).collect(),
            other => panic!("not a float tensor: {other}"),
        }
    }
    fn f16s(&self) -> Vec<f16> {
        assert_eq!(self.dtype, "F16");
        self.bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]))
            .collect()
    }
    fn u32s(&self) -> Vec<u32> {
        assert_eq!(self.dtype, "U32");
        self.bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }
    /// The tensor on `dev` in its stored dtype.
    fn tensor(&self, dev: &Device) -> Tensor {
        match self.dtype.as_str() {
            "F32" => dev.from_slice(&self.f32s(), &self.shape).unwrap(),
            "F16" => dev.from_slice(&self.f16s(), &self.shape).unwrap(),
            "U32" => dev.from_slice(&self.u32s(), &self.shape).unwrap(),
            other => panic!("unexpected dtype {other}"),
        }
    }
}

/// Minimal safetensors reader: 8-byte header length, JSON header, data.
fn read_safetensors(path: &PathBuf) -> HashMap<String, Raw> {
    let data = std::fs::read(path).unwrap();
    let len = u64::from_le_bytes(data[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&data[8..8 + len]).unwrap();
    let body = &data[8 + len..];
    let mut out = HashMap::new();
    for (name, info) in header.as_object().unwrap() {
        if name == "__metadata__" {
            continue;
        }
        let offsets = &info["data_offsets"];
        let (start, end) = (
            offsets[0].as_u64().unwrap() as usize,
            offsets[1].as_u64().unwrap() as usize,
        );
        out.insert(
            name.clone(),
            Raw {
                dtype: info["dtype"].as_str().unwrap().to_string(),
                shape: info["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect(),
                bytes: body[start..end].to_vec(),
            },
        );
    }
    out
}

struct Case {
    bits: u32,
    group_size: usize,
    f16: bool,
    t: HashMap<String, Raw>,
}

impl Case {
    fn name(&self) -> String {
        format!(
            "b{}_g{}_{}",
            self.bits,
            self.group_size,
            if self.f16 { "f16" } else { "f32" }
        )
    }
    fn nk(&self) -> (usize, usize) {
        let s = &self.t["w"].shape;
        (s[0], s[1])
    }
    fn layout(&self) -> WeightLayout {
        WeightLayout::MlxAffine {
            bits: self.bits,
            group_size: self.group_size,
        }
    }
    fn linear(&self, dev: &Device, bias: Option<Tensor>) -> Linear {
        let (n, k) = self.nk();
        let tensors = ["wq", "scales", "biases"]
            .iter()
            .map(|name| self.t[*name].tensor(dev))
            .collect();
        Linear::new(&self.name(), self.layout(), tensors, bias, n, k).unwrap()
    }
}

fn cases() -> Vec<Case> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mlx_quant");
    let mut out = Vec::new();
    for bits in [2, 3, 4, 5, 6, 8] {
        for group_size in [32, 64, 128] {
            for f16 in [false, true] {
                let file = format!(
                    "b{bits}_g{group_size}_{}.safetensors",
                    if f16 { "f16" } else { "f32" }
                );
                out.push(Case {
                    bits,
                    group_size,
                    f16,
                    t: read_safetensors(&dir.join(file)),
                });
            }
        }
    }
    out
}

/// Deterministic pseudo-random numbers in [-1, 1) (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn vec(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.next()).collect()
    }
}

/// An f32 output tensor filled with NaN, so that unwritten elements fail every comparison.
fn poisoned(dev: &Device, shape: &[usize]) -> Tensor {
    dev.from_slice(&vec![f32::NAN; shape.iter().product()], shape)
        .unwrap()
}

fn run_matmul(dev: &Device, x: &[f32], m: usize, w: &Linear) -> Vec<f32> {
    let xt = dev.from_slice(x, &[m, w.k]).unwrap();
    let out = poisoned(dev, &[m, w.n]);
    let mut enc = CommandEncoder::new(dev);
    matmul(&mut enc, &xt, w, &out).unwrap();
    enc.commit_and_wait().unwrap();
    out.to_vec::<f32>().unwrap()
}

/// x `[m, k]` · wᵀ (`w` `[n, k]`) in f64, plus Σ|x·w| per output.
fn reference(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    m: usize,
    n: usize,
    k: usize,
) -> (Vec<f64>, Vec<f64>) {
    let mut y = vec![0f64; m * n];
    let mut size = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            for l in 0..k {
                let p = x[i * k + l] as f64 * w[j * k + l] as f64;
                y[i * n + j] += p;
                size[i * n + j] += p.abs();
            }
            if let Some(b) = bias {
                y[i * n + j] += b[j] as f64;
                size[i * n + j] += (b[j] as f64).abs();
            }
        }
    }
    (y, size)
}

fn assert_close(what: &str, got: &[f32], want: &[f64], size: &[f64], rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, ((&g, &w), &s)) in got.iter().zip(want).zip(size).enumerate() {
        let tol = rel * s + 1e-30;
        assert!(
            (g as f64 - w).abs() <= tol,
            "{what}[{i}]: got {g}, want {w} (tolerance {tol:e})"
        );
    }
}

/// The MLX weight dequantized by our reference code from MLX's packed words, scales, biases.
fn our_dequantized(c: &Case) -> Vec<f32> {
    let (n, k) = c.nk();
    let (wq, s, b) = (c.t["wq"].u32s(), c.t["scales"].f32s(), c.t["biases"].f32s());
    let (words, groups) = (k * c.bits as usize / 32, k / c.group_size);
    let mut out = vec![0f32; n * k];
    for r in 0..n {
        dequantize_row(
            &wq[r * words..(r + 1) * words],
            &s[r * groups..(r + 1) * groups],
            &b[r * groups..(r + 1) * groups],
            c.bits,
            c.group_size,
            &mut out[r * k..(r + 1) * k],
        )
        .unwrap();
    }
    out
}

#[test]
fn quantize_matches_mlx_bit_for_bit() {
    for c in cases() {
        let (n, k) = c.nk();
        let (packed, scales, biases) =
            quantize(&c.t["w"].f32s(), n, k, c.bits, c.group_size).unwrap();
        assert_eq!(packed, c.t["wq"].u32s(), "{}: packed words", c.name());
        if c.f16 {
            let round = |v: &[f32]| v.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>();
            assert_eq!(round(&scales), c.t["scales"].f16s(), "{}: scales", c.name());
            assert_eq!(round(&biases), c.t["biases"].f16s(), "{}: biases", c.name());
        } else {
            assert_eq!(scales, c.t["scales"].f32s(), "{}: scales", c.name());
            assert_eq!(biases, c.t["biases"].f32s(), "{}: biases", c.name());
        }
    }
}

/// MLX dequantizes in the stored dtype as scale·q, rounded, + bias, rounded: bit-exact with
/// ours in f32. In f16 each rounding errs by up to 2⁻¹¹ of its operands' size, so we allow
/// 2⁻¹⁰·(|scale·q| + |bias|) (our f32 result is exact to far below that).
#[test]
fn dequantize_matches_mlx() {
    for c in cases() {
        let (n, k) = c.nk();
        let (wq, s, b) = (c.t["wq"].u32s(), c.t["scales"].f32s(), c.t["biases"].f32s());
        let (words, groups) = (k * c.bits as usize / 32, k / c.group_size);
        let ours = our_dequantized(&c);
        let mlx = c.t["deq"].f32s();
        for r in 0..n {
            for j in 0..k {
                let (o, m) = (ours[r * k + j], mlx[r * k + j]);
                if c.f16 {
                    let q = unpack(&wq[r * words..(r + 1) * words], c.bits, j) as f32;
                    let g = r * groups + j / c.group_size;
                    let tol = (s[g] * q).abs() + b[g].abs();
                    assert!(
                        (o - m).abs() <= tol / 1024.0,
                        "{} [{r}, {j}]: {o} vs {m}",
                        c.name()
                    );
                } else {
                    assert_eq!(
                        o.to_bits(),
                        m.to_bits(),
                        "{} [{r}, {j}]: {o} vs {m}",
                        c.name()
                    );
                }
            }
        }
    }
}

#[test]
fn unpack_reads_each_element() {
    for c in cases() {
        let (n, k) = c.nk();
        let (wq, s, b) = (c.t["wq"].u32s(), c.t["scales"].f32s(), c.t["biases"].f32s());
        let (words, groups) = (k * c.bits as usize / 32, k / c.group_size);
        let deq = our_dequantized(&c);
        for r in 0..n {
            for j in 0..k {
                let q = unpack(&wq[r * words..(r + 1) * words], c.bits, j);
                assert!(q < 1 << c.bits);
                let g = r * groups + j / c.group_size;
                assert_eq!(
                    s[g] * q as f32 + b[g],
                    deq[r * k + j],
                    "{} [{r}, {j}]",
                    c.name()
                );
            }
        }
    }
}

#[test]
fn matmul_matches_mlx_quantized_matmul() {
    let dev = Device::cpu();
    for c in cases() {
        let (n, k) = c.nk();
        let w = c.linear(&dev, None);
        let deq = our_dequantized(&c);
        for (xname, yname) in [("x1", "y1"), ("x3", "y3")] {
            let x = c.t[xname].f32s();
            let m = x.len() / k;
            let got = run_matmul(&dev, &x, m, &w);
            let what = format!("{} {xname}", c.name());
            let (want, size) = reference(&x, &deq, None, m, n, k);
            assert_close(&format!("{what} vs f64"), &got, &want, &size, 1e-5);
            let mlx: Vec<f64> = c.t[yname].f32s().iter().map(|&v| v as f64).collect();
            let rel = if c.f16 { 4e-3 } else { 1e-5 };
            assert_close(&format!("{what} vs MLX"), &got, &mlx, &size, rel);
        }
    }
}

/// Rows of x beyond the fixtures' 1 and 3 (every tile height and the loop over row
/// groups), with an f16 bias.
#[test]
fn matmul_more_rows_with_bias() {
    let dev = Device::cpu();
    let mut rng = Rng(7);
    for c in cases().into_iter().filter(|c| c.f16 == (c.bits % 2 == 1)) {
        let (n, k) = c.nk();
        let bias: Vec<f32> = rng
            .vec(n)
            .iter()
            .map(|&v| f16::from_f32(v).to_f32())
            .collect();
        let bias16: Vec<f16> = bias.iter().map(|&v| f16::from_f32(v)).collect();
        let w = c.linear(&dev, Some(dev.from_slice(&bias16, &[n]).unwrap()));
        let deq = our_dequantized(&c);
        for m in [2, 4, 5, 7] {
            let x = rng.vec(m * k);
            let got = run_matmul(&dev, &x, m, &w);
            let (want, size) = reference(&x, &deq, Some(&bias), m, n, k);
            assert_close(&format!("{} m={m}", c.name()), &got, &want, &size, 1e-5);
        }
    }
}

/// The gate and up weights of a decode row's gated matmul (the 4-bit, group-64, f16-scaled
/// fixture, twice) and their (n, k).
fn gated_pair(dev: &Device) -> (Linear, Linear, usize, usize) {
    let c = cases()
        .into_iter()
        .find(|c| c.name() == "b4_g64_f16")
        .unwrap();
    let (n, k) = c.nk();
    (c.linear(dev, None), c.linear(dev, None), n, k)
}

/// Dispatches recorded by a closure.
type Record<'a> = dyn Fn(&mut CommandEncoder) -> mlx_native::Result<()> + 'a;

/// Records `f` on `dev` and runs it.
fn record(dev: &Device, f: &Record<'_>) -> mlx_native::Result<()> {
    let mut enc = CommandEncoder::new(dev);
    f(&mut enc).and_then(|_| enc.commit_and_wait())
}

/// The f16 copies of a decode row: the gated matmul's `out_h` holds its output rounded to
/// nearest; matmul_add's `x_h` (which the CUDA tensor-core kernels stage) changes nothing on
/// the CPU, which reads x; a copy of the wrong dtype or length is an error naming it.
#[test]
fn half_copies_of_a_decode_row() {
    let dev = Device::cpu();
    let mut rng = Rng(11);
    let (w, up, n, k) = gated_pair(&dev);
    let x = dev.from_slice(&rng.vec(k), &[1, k]).unwrap();
    let run = |f: &Record<'_>| record(&dev, f);
    let out = poisoned(&dev, &[1, n]);
    let out_h = dev.from_slice(&vec![f16::NAN; n], &[1, n]).unwrap();
    run(&|enc| {
        gated_matmul(
            enc,
            &x,
            None,
            None,
            &w,
            &up,
            UnaryFn::Silu,
            &out,
            Some(&out_h),
        )
    })
    .unwrap();
    let halves = out_h.to_vec::<f16>().unwrap();
    for (v, h) in out.to_vec::<f32>().unwrap().iter().zip(&halves) {
        assert_eq!(f16::from_f32(*v).to_bits(), h.to_bits(), "copy of {v}");
    }

    let residual = dev.from_slice(&rng.vec(n), &[1, n]).unwrap();
    let x_h: Vec<f16> = x
        .to_vec::<f32>()
        .unwrap()
        .iter()
        .map(|&v| f16::from_f32(v))
        .collect();
    let x_h = dev.from_slice(&x_h, &[1, k]).unwrap();
    let (plain, with_copy) = (poisoned(&dev, &[1, n]), poisoned(&dev, &[1, n]));
    run(&|enc| matmul_add(enc, &x, None, &w, &residual, &plain)).unwrap();
    run(&|enc| matmul_add(enc, &x, Some(&x_h), &w, &residual, &with_copy)).unwrap();
    assert_eq!(
        plain.to_vec::<f32>().unwrap(),
        with_copy.to_vec::<f32>().unwrap()
    );

    let wrong_dtype = dev.from_slice(&vec![0f32; k], &[1, k]).unwrap();
    let wrong_len = dev.from_slice(&vec![f16::ZERO; n], &[1, n]).unwrap();
    for bad in [&wrong_dtype, &wrong_len] {
        let err = run(&|enc| matmul_add(enc, &x, Some(bad), &w, &residual, &plain)).unwrap_err();
        assert!(err.to_string().contains("x_h"), "{err}");
    }
    let err = run(&|enc| gated_matmul(enc, &x, None, None, &w, &up, UnaryFn::Silu, &out, Some(&x)))
        .unwrap_err();
    assert!(err.to_string().contains("out_h"), "{err}");
}

/// A residual update folded into a decode matmul (`ResidualUpdate`: Gemma's block output norm
/// and residual add, done by the next normed matmul) computes, on the CPU backend, exactly the
/// two dispatches it replaces: `rms_norm_add`, then the normed matmul of its output; and it
/// writes that output. Misused, it is an error naming what is wrong.
#[test]
fn residual_update_in_front_of_a_normed_matmul() {
    let dev = Device::cpu();
    let mut rng = Rng(12);
    let (w, up, n, k) = gated_pair(&dev);
    let row = |rng: &mut Rng| dev.from_slice(&rng.vec(k), &[1, k]).unwrap();
    let (x, y) = (row(&mut rng), row(&mut rng));
    let (wu, g) = (
        dev.from_slice(&rng.vec(k), &[k]).unwrap(),
        dev.from_slice(&rng.vec(k), &[k]).unwrap(),
    );
    let pre = PreNorm {
        eps: 1e-6,
        unit_offset: true,
    };
    let run = |f: &Record<'_>| record(&dev, f);
    let values = |t: &Tensor| t.to_vec::<f32>().unwrap();

    let settled = poisoned(&dev, &[1, k]);
    run(&|enc| rms_norm_add(enc, &y, &wu, pre.eps, true, &x, &settled)).unwrap();
    let (want, want_gated) = (poisoned(&dev, &[1, n]), poisoned(&dev, &[1, n]));
    run(&|enc| normed_matmul(enc, &settled, None, (&g, pre), &w, &want)).unwrap();
    let norm = Some((&g, pre));
    let f = UnaryFn::Silu;
    run(&|enc| gated_matmul(enc, &settled, None, norm, &w, &up, f, &want_gated, None)).unwrap();

    let updated = poisoned(&dev, &[1, k]);
    let update = ResidualUpdate {
        y: &y,
        weight: &wu,
        out: &updated,
    };
    let got = poisoned(&dev, &[1, n]);
    run(&|enc| normed_matmul(enc, &x, Some(update), (&g, pre), &w, &got)).unwrap();
    assert_eq!(values(&updated), values(&settled), "updated x");
    assert_eq!(values(&got), values(&want), "normed matmul");
    let (updated, got) = (poisoned(&dev, &[1, k]), poisoned(&dev, &[1, n]));
    let update = ResidualUpdate {
        out: &updated,
        ..update
    };
    run(&|enc| gated_matmul(enc, &x, Some(update), norm, &w, &up, f, &got, None)).unwrap();
    assert_eq!(values(&updated), values(&settled), "updated x (gated)");
    assert_eq!(values(&got), values(&want_gated), "gated matmul");

    let in_place = ResidualUpdate { out: &x, ..update };
    let err = run(&|enc| normed_matmul(enc, &x, Some(in_place), (&g, pre), &w, &got)).unwrap_err();
    assert!(err.to_string().contains("overlap"), "{err}");
    let err =
        run(&|enc| gated_matmul(enc, &x, Some(update), None, &w, &up, f, &got, None)).unwrap_err();
    assert!(err.to_string().contains("input norm"), "{err}");
    let short = dev.from_slice(&rng.vec(k - 1), &[1, k - 1]).unwrap();
    let bad_y = ResidualUpdate {
        y: &short,
        ..update
    };
    let err = run(&|enc| normed_matmul(enc, &x, Some(bad_y), (&g, pre), &w, &got)).unwrap_err();
    assert!(err.to_string().contains("y"), "{err}");
}

#[test]
fn embedding_gathers_dequantized_rows() {
    let dev = Device::cpu();
    for c in cases() {
        let (n, k) = c.nk();
        let table = c.linear(&dev, None);
        let ids: Vec<u32> = vec![3, 0, n as u32 - 1, n as u32, 3, u32::MAX];
        let ids_t = dev.from_slice(&ids, &[ids.len()]).unwrap();
        let out = poisoned(&dev, &[ids.len(), k]);
        record(&dev, &|enc| embedding(enc, &ids_t, &table, &out)).unwrap();
        let got = out.to_vec::<f32>().unwrap();
        // Scaled in the gather (Gemma's √hidden): each value times the scale, as an f32 product.
        let scaled = poisoned(&dev, &[ids.len(), k]);
        record(&dev, &|enc| {
            scaled_embedding(enc, &ids_t, &table, 5.25, &scaled)
        })
        .unwrap();
        let times: Vec<f32> = got.iter().map(|v| v * 5.25).collect();
        assert_eq!(
            scaled.to_vec::<f32>().unwrap(),
            times,
            "{} scaled",
            c.name()
        );
        let deq = our_dequantized(&c);
        for (i, &id) in ids.iter().enumerate() {
            let row = &got[i * k..(i + 1) * k];
            if (id as usize) < n {
                assert_eq!(
                    row,
                    &deq[id as usize * k..(id as usize + 1) * k],
                    "{} id {id}",
                    c.name()
                );
            } else {
                assert!(
                    row.iter().all(|&v| v == 0.0),
                    "{} id {id}: not a zero row",
                    c.name()
                );
            }
        }
    }
}

/// Dense weights in every float dtype, odd sizes, with and without bias.
#[test]
fn dense_matmul_matches_f64() {
    let dev = Device::cpu();
    let mut rng = Rng(11);
    let (n, k) = (37, 67);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let w_f32 = rng.vec(n * k);
        let (w_t, w_vals): (Tensor, Vec<f32>) = match dtype {
            DType::F32 => (dev.from_slice(&w_f32, &[n, k]).unwrap(), w_f32.clone()),
            DType::F16 => {
                let v: Vec<f16> = w_f32.iter().map(|&v| f16::from_f32(v)).collect();
                (
                    dev.from_slice(&v, &[n, k]).unwrap(),
                    v.iter().map(|v| v.to_f32()).collect(),
                )
            }
            _ => {
                let v: Vec<bf16> = w_f32.iter().map(|&v| bf16::from_f32(v)).collect();
                (
                    dev.from_slice(&v, &[n, k]).unwrap(),
                    v.iter().map(|v| v.to_f32()).collect(),
                )
            }
        };
        let bias: Vec<f32> = rng
            .vec(n)
            .iter()
            .map(|&v| bf16::from_f32(v).to_f32())
            .collect();
        let bias16: Vec<bf16> = bias.iter().map(|&v| bf16::from_f32(v)).collect();
        for with_bias in [false, true] {
            let b = with_bias.then(|| dev.from_slice(&bias16, &[n]).unwrap());
            let w = Linear::new("dense", WeightLayout::Dense, vec![w_t.clone()], b, n, k).unwrap();
            for m in [1, 3, 6] {
                let x = rng.vec(m * k);
                let got = run_matmul(&dev, &x, m, &w);
                let (want, size) = reference(&x, &w_vals, with_bias.then_some(&bias[..]), m, n, k);
                assert_close(
                    &format!("dense {dtype} m={m} bias={with_bias}"),
                    &got,
                    &want,
                    &size,
                    1e-5,
                );
            }
        }
    }
}

/// Dense and GGUF float tables: embedding rows and matmul through the GGUF layouts.
#[test]
fn float_tables_embedding_and_gguf_matmul() {
    let dev = Device::cpu();
    let mut rng = Rng(5);
    let (n, k) = (11, 40);
    let vals: Vec<f32> = rng
        .vec(n * k)
        .iter()
        .map(|&v| bf16::from_f32(v).to_f32())
        .collect();
    let f16s: Vec<f16> = vals.iter().map(|&v| f16::from_f32(v)).collect();
    let bf16s: Vec<bf16> = vals.iter().map(|&v| bf16::from_f32(v)).collect();
    let f32_bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    let f16_bytes: Vec<u8> = f16s.iter().flat_map(|v| v.to_le_bytes()).collect();
    let bf16_bytes: Vec<u8> = bf16s.iter().flat_map(|v| v.to_le_bytes()).collect();
    let tables = [
        (WeightLayout::Dense, dev.from_slice(&f16s, &[n, k]).unwrap()),
        (
            WeightLayout::Dense,
            dev.from_slice(&bf16s, &[n, k]).unwrap(),
        ),
        (
            WeightLayout::Gguf(GgmlType::F32),
            dev.from_slice(&f32_bytes, &[f32_bytes.len()]).unwrap(),
        ),
        (
            WeightLayout::Gguf(GgmlType::F16),
            dev.from_slice(&f16_bytes, &[f16_bytes.len()]).unwrap(),
        ),
        (
            WeightLayout::Gguf(GgmlType::BF16),
            dev.from_slice(&bf16_bytes, &[bf16_bytes.len()]).unwrap(),
        ),
    ];
    // Values are bf16-exact, so every layout holds exactly `vals` (f16 covers their range
    // and precision: |v| < 1 with 8 significant bits).
    let ids: Vec<u32> = vec![10, 0, 11, 4];
    for (layout, t) in tables {
        let w = Linear::new("table", layout, vec![t], None, n, k).unwrap();
        let ids_t = dev.from_slice(&ids, &[ids.len()]).unwrap();
        let out = poisoned(&dev, &[ids.len(), k]);
        let mut enc = CommandEncoder::new(&dev);
        embedding(&mut enc, &ids_t, &w, &out).unwrap();
        enc.commit_and_wait().unwrap();
        let got = out.to_vec::<f32>().unwrap();
        for (i, &id) in ids.iter().enumerate() {
            let want: Vec<f32> = match (id as usize) < n {
                true => vals[id as usize * k..(id as usize + 1) * k].to_vec(),
                false => vec![0.0; k],
            };
            assert_eq!(
                &got[i * k..(i + 1) * k],
                &want[..],
                "{} id {id}",
                layout.variant()
            );
        }
        let x = rng.vec(3 * k);
        let got = run_matmul(&dev, &x, 3, &w);
        let (want, size) = reference(&x, &vals, None, 3, n, k);
        assert_close(
            &format!("matmul {}", layout.variant()),
            &got,
            &want,
            &size,
            1e-5,
        );
    }
}

/// Decode throughput on SmolLM2-135M's shapes (MLX 4-bit, group 64, f16 scales):
/// `cargo test -p mlx-native --test mlx_quant -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_smollm2_decode() {
    let dev = Device::cpu();
    let mut rng = Rng(3);
    let shapes = [
        (576, 576),
        (192, 576),
        (1536, 576),
        (576, 1536),
        (49152, 576),
    ];
    let (bits, group_size) = (4u32, 64usize);
    let mut total = (0usize, 0f64);
    for (n, k) in shapes {
        let (packed, scales, biases) = quantize(&rng.vec(n * k), n, k, bits, group_size).unwrap();
        let half = |v: &[f32]| v.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>();
        let groups = [n, k / group_size];
        let w = Linear::new(
            "bench",
            WeightLayout::MlxAffine { bits, group_size },
            vec![
                dev.from_slice(&packed, &[n, k * bits as usize / 32])
                    .unwrap(),
                dev.from_slice(&half(&scales), &groups).unwrap(),
                dev.from_slice(&half(&biases), &groups).unwrap(),
            ],
            None,
            n,
            k,
        )
        .unwrap();
        for m in [1, 16] {
            let x = dev.from_slice(&rng.vec(m * k), &[m, k]).unwrap();
            let out = dev.zeros(&[m, n], DType::F32).unwrap();
            let mut enc = CommandEncoder::new(&dev);
            let iters = (30_000_000 / (n * k * m)).clamp(3, 5_000);
            for _ in 0..iters.min(50) {
                matmul(&mut enc, &x, &w, &out).unwrap();
                enc.commit().unwrap();
            }
            // The best of several rounds: the machine is shared.
            let mut secs = f64::INFINITY;
            for _ in 0..7 {
                let start = std::time::Instant::now();
                for _ in 0..iters {
                    matmul(&mut enc, &x, &w, &out).unwrap();
                    enc.commit().unwrap();
                }
                secs = secs.min(start.elapsed().as_secs_f64() / iters as f64);
            }
            let gbs = w.weight_bytes() as f64 / secs / 1e9;
            let gflops = 2.0 * (m * n * k) as f64 / secs / 1e9;
            println!(
                "{n:>6}x{k:<5} m={m:<3} {:>9.1} us  {gbs:>6.1} GB/s  {gflops:>6.1} GFLOP/s",
                secs * 1e6
            );
            if m == 1 {
                total.0 += w.weight_bytes();
                total.1 += secs;
            }
        }
    }
    println!("m=1 all shapes: {:.1} GB/s", total.0 as f64 / total.1 / 1e9);
}

/// Dense decode throughput on the 1536×576 shape, for each weight dtype:
/// `cargo test --release -p mlx-native --test mlx_quant -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_dense_decode() {
    let dev = Device::cpu();
    let mut rng = Rng(4);
    let (n, k) = (1536, 576);
    let vals = rng.vec(n * k);
    let weights = [
        dev.from_slice(&vals, &[n, k]).unwrap(),
        dev.from_slice(
            &vals.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>(),
            &[n, k],
        )
        .unwrap(),
        dev.from_slice(
            &vals.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>(),
            &[n, k],
        )
        .unwrap(),
    ];
    for t in weights {
        let dtype = t.dtype();
        let w = Linear::new("bench", WeightLayout::Dense, vec![t], None, n, k).unwrap();
        for m in [1, 16] {
            let x = dev.from_slice(&rng.vec(m * k), &[m, k]).unwrap();
            let out = dev.zeros(&[m, n], DType::F32).unwrap();
            let mut enc = CommandEncoder::new(&dev);
            let mut secs = f64::INFINITY;
            for _ in 0..7 {
                let start = std::time::Instant::now();
                for _ in 0..20 {
                    matmul(&mut enc, &x, &w, &out).unwrap();
                    enc.commit().unwrap();
                }
                secs = secs.min(start.elapsed().as_secs_f64() / 20.0);
            }
            let gbs = w.weight_bytes() as f64 / secs / 1e9;
            let gflops = 2.0 * (m * n * k) as f64 / secs / 1e9;
            println!(
                "dense {dtype} m={m:<3} {:>8.1} us  {gbs:>6.1} GB/s  {gflops:>6.1} GFLOP/s",
                secs * 1e6
            );
        }
    }
}
