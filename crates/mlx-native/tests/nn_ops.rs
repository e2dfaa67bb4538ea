//! The CPU neural-net kernels against MLX (fixtures made by tools/mlx_fixtures_nn.py) and
//! against f64 references written here. Every output starts poisoned with NaN.

use std::collections::HashMap;
use std::path::PathBuf;

use half::f16;
use mlx_native::core::op::{BinaryFn, PreNorm, UnaryFn};
use mlx_native::ops::{self, AttentionShape, HeadNorms, RopeScaling, RopeTable};
use mlx_native::quant::WeightLayout;
use mlx_native::{CommandEncoder, DType, Device, SamplingParams, Tensor};
use serde_json::Value;

mod common;

// ---------------------------------------------------------------------------------------
// fixtures

/// The f32 tensors and per-case parameters of one fixture file.
struct Fixture {
    name: String,
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    cases: Vec<(String, Value)>,
}

/// A minimal safetensors reader: u64 LE header length, JSON header, raw little-endian data.
fn fixture(name: &str) -> Fixture {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/mlx_nn")
        .join(format!("{name}.safetensors"));
    let bytes = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: HashMap<String, Value> = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let data = &bytes[8 + header_len..];
    let mut tensors = HashMap::new();
    let mut cases = Vec::new();
    for (key, entry) in header {
        if key == "__metadata__" {
            for (case, params) in entry.as_object().unwrap() {
                let params = serde_json::from_str(params.as_str().unwrap()).unwrap();
                cases.push((case.clone(), params));
            }
            continue;
        }
        assert_eq!(entry["dtype"], "F32", "{key}");
        let shape = entry["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        let [start, end] = [0, 1].map(|i| entry["data_offsets"][i].as_u64().unwrap() as usize);
        let values = data[start..end]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        tensors.insert(key, (shape, values));
    }
    cases.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(!cases.is_empty(), "{name}: no cases");
    Fixture {
        name: name.into(),
        tensors,
        cases,
    }
}

impl Fixture {
    fn get(&self, key: &str) -> &(Vec<usize>, Vec<f32>) {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("{}: no tensor {key}", self.name))
    }
    fn values(&self, key: &str) -> &[f32] {
        &self.get(key).1
    }
    /// The tensor on the device, with its fixture shape.
    fn tensor(&self, dev: &Device, key: &str) -> Tensor {
        let (shape, values) = self.get(key);
        dev.from_slice(values, shape).unwrap()
    }
}

fn usize_of(v: &Value, key: &str) -> usize {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} in {v}")) as usize
}

fn f32_of(v: &Value, key: &str) -> f32 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key} in {v}")) as f32
}

// ---------------------------------------------------------------------------------------
// helpers

fn nan_tensor(dev: &Device, shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    dev.from_slice(&vec![f32::NAN; n], shape).unwrap()
}

fn pos_tensor(dev: &Device, pos: usize) -> Tensor {
    dev.from_slice(&[pos as u32], &[1]).unwrap()
}

/// Largest |a − b|; a NaN on either side counts as infinite.
fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = (x - y).abs();
            if d.is_nan() {
                f32::INFINITY
            } else {
                d
            }
        })
        .fold(0.0, f32::max)
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let err = max_abs_diff(got, want);
    assert!(err <= tol, "{what}: max abs error {err} > {tol}");
}

/// splitmix64: deterministic test data.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f32 {
        let (u, v) = (1.0 - self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
    fn normals(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * scale).collect()
    }
}

// ---------------------------------------------------------------------------------------
// rope

fn rope_scaling(v: &Value) -> RopeScaling {
    if v.is_null() {
        return RopeScaling::None;
    }
    let f = |k: &str| f32_of(v, k);
    match v["rope_type"].as_str().unwrap() {
        "linear" => RopeScaling::Linear {
            factor: f("factor"),
        },
        "llama3" => RopeScaling::Llama3 {
            factor: f("factor"),
            low_freq_factor: f("low_freq_factor"),
            high_freq_factor: f("high_freq_factor"),
            original_max_position_embeddings: usize_of(v, "original_max_position_embeddings"),
        },
        "yarn" => RopeScaling::Yarn {
            factor: f("factor"),
            original_max_position_embeddings: usize_of(v, "original_max_position_embeddings"),
            beta_fast: f("beta_fast"),
            beta_slow: f("beta_slow"),
            mscale: f("mscale"),
            mscale_all_dim: f("mscale_all_dim"),
        },
        other => panic!("rope type {other}"),
    }
}

/// mx.fast.rope through mlx-lm's rope classes: both layouts, partial rotation, offsets,
/// bases 1e4 and 5e5, linear, llama3 and yarn scaling. Max abs error 2e-4 on unit-normal
/// inputs at positions up to ~1000 (f32 angles: MLX and we round p·inv_freq alike, the
/// tables differ by an ulp), 1e-6 relative on the frequency tables themselves.
#[test]
fn rope_matches_mlx() {
    let dev = Device::cpu();
    let fx = fixture("rope");
    for (name, p) in &fx.cases {
        let (n_heads, head_dim, dims) = (
            usize_of(p, "n_heads"),
            usize_of(p, "head_dim"),
            usize_of(p, "dims"),
        );
        let scaling = rope_scaling(&p["scaling"]);
        let table = RopeTable::new(&dev, dims, f32_of(p, "base"), &scaling).unwrap();
        let mscale = f32_of(p, "mscale");
        assert!(
            (table.mscale - mscale).abs() <= 1e-6 * mscale,
            "{name}: mscale {} vs {mscale}",
            table.mscale
        );
        if let Some((_, freqs)) = fx.tensors.get(&format!("{name}.freqs")) {
            let ours = table.inv_freq.to_vec::<f32>().unwrap();
            for (i, (&inv, &f)) in ours.iter().zip(freqs).enumerate() {
                let want = 1.0 / f as f64;
                let rel = ((inv as f64 - want) / want).abs();
                assert!(
                    rel <= 1e-6,
                    "{name}: inv_freq[{i}] = {inv}, mlx-lm 1/freqs = {want}"
                );
            }
        }
        let x = fx.tensor(&dev, &format!("{name}.x"));
        let out = nan_tensor(&dev, x.shape());
        let pos = pos_tensor(&dev, usize_of(p, "offset"));
        let mut enc = CommandEncoder::new(&dev);
        ops::rope(
            &mut enc,
            &x,
            &table,
            n_heads,
            head_dim,
            p["traditional"].as_bool().unwrap(),
            &pos,
            &out,
        )
        .unwrap();
        enc.commit().unwrap();
        let got = out.to_vec::<f32>().unwrap();
        assert_close(
            &format!("rope {name}"),
            &got,
            fx.values(&format!("{name}.out")),
            2e-4,
        );
    }
}

/// The YaRN scaling the fused input stage's tests rotate with (an mscale other than 1).
fn yarn_scaling() -> RopeScaling {
    RopeScaling::Yarn {
        factor: 4.0,
        original_max_position_embeddings: 512,
        beta_fast: 32.0,
        beta_slow: 1.0,
        mscale: 1.0,
        mscale_all_dim: 0.0,
    }
}

/// Random rows `[m, heads·hd]` (normal, standard deviation `sd`) for each of `heads` (q, k, v).
fn qkv_rows(
    dev: &Device,
    rng: &mut Rng,
    m: usize,
    heads: [usize; 3],
    hd: usize,
    sd: f32,
) -> [Tensor; 3] {
    heads.map(|h| {
        dev.from_slice(&rng.normals(m * h * hd, sd), &[m, h * hd])
            .unwrap()
    })
}

/// The fused attention input stage is `rope` of q and k and `kv_append` of k and v (both
/// checked against MLX here), bit for bit, for both layouts, partial rotation and a YaRN
/// mscale; cache rows outside pos..pos+m stay untouched. `rope_attention` is that stage
/// followed by `attention` (GQA, a sliding window), bit for bit, caches included.
#[test]
fn rope_kv_append_equals_rope_then_kv_append() {
    let dev = Device::cpu();
    let mut rng = Rng(21);
    let (m, n_heads, n_kv, hd, capacity, pos) = (3, 6, 2, 24, 11, 5);
    let scaling = yarn_scaling();
    for (dims, traditional) in [(24, false), (10, true)] {
        let table = RopeTable::new(&dev, dims, 10000.0, &scaling).unwrap();
        let [q, k, v] = qkv_rows(&dev, &mut rng, m, [n_heads, n_kv, n_kv], hd, 1.0);
        let cache_data = rng.normals(n_kv * capacity * hd, 1.0);
        let cache = || dev.from_slice(&cache_data, &[n_kv, capacity, hd]).unwrap();
        let pos_t = pos_tensor(&dev, pos);
        let mut enc = CommandEncoder::new(&dev);
        let (q_want, k_rot) = (nan_tensor(&dev, q.shape()), nan_tensor(&dev, k.shape()));
        let (k_want, v_want) = (cache(), cache());
        ops::rope(
            &mut enc,
            &q,
            &table,
            n_heads,
            hd,
            traditional,
            &pos_t,
            &q_want,
        )
        .unwrap();
        ops::rope(&mut enc, &k, &table, n_kv, hd, traditional, &pos_t, &k_rot).unwrap();
        ops::kv_append(&mut enc, &k_rot, &pos_t, &k_want).unwrap();
        ops::kv_append(&mut enc, &v, &pos_t, &v_want).unwrap();
        let (q_got, k_got, v_got) = (nan_tensor(&dev, q.shape()), cache(), cache());
        ops::rope_kv_append(
            &mut enc,
            [&q, &k, &v],
            &table,
            n_heads,
            traditional,
            &pos_t,
            &q_got,
            (&k_got, &v_got),
        )
        .unwrap();
        let shape = AttentionShape {
            n_heads,
            n_kv_heads: n_kv,
            head_dim: hd,
            scale: 0.3,
            window: Some(6),
            softcap: None,
            min_keys: 0,
        };
        let attn_want = nan_tensor(&dev, q.shape());
        ops::attention(&mut enc, shape, &q_got, &k_got, &v_got, &pos_t, &attn_want).unwrap();
        let (attn_got, k_fused, v_fused) = (nan_tensor(&dev, q.shape()), cache(), cache());
        ops::rope_attention(
            &mut enc,
            [&q, &k, &v],
            None,
            &table,
            traditional,
            shape,
            &pos_t,
            (&k_fused, &v_fused),
            (&attn_got, None),
        )
        .unwrap();
        enc.commit().unwrap();
        for (what, got, want) in [
            ("q", &q_got, &q_want),
            ("k cache", &k_got, &k_want),
            ("v cache", &v_got, &v_want),
            ("rope_attention out", &attn_got, &attn_want),
            ("rope_attention k cache", &k_fused, &k_want),
            ("rope_attention v cache", &v_fused, &v_want),
        ] {
            let (got, want) = (got.to_vec::<f32>().unwrap(), want.to_vec::<f32>().unwrap());
            assert_eq!(got, want, "rope_kv_append dims={dims}: {what}");
        }
    }
}

/// Attention of every visible key (no window, no soft-cap), scaled by 0.25.
fn full_attention(n_heads: usize, n_kv_heads: usize, head_dim: usize) -> AttentionShape {
    AttentionShape {
        n_heads,
        n_kv_heads,
        head_dim,
        scale: 0.25,
        window: None,
        softcap: None,
        min_keys: 0,
    }
}

/// `rope_attention` of one query row writes its output's f16 copy where asked (for the o
/// projection's `x_h`), rounded to nearest; a copy of many rows or of the wrong dtype is an
/// error naming it.
#[test]
fn rope_attention_writes_the_f16_copy_of_one_row() {
    let dev = Device::cpu();
    let mut rng = Rng(22);
    let (n_heads, n_kv, hd, capacity, pos) = (4, 2, 16, 9, 3);
    let table = RopeTable::new(&dev, hd, 10000.0, &RopeScaling::None).unwrap();
    let tensor = |rng: &mut Rng, m: usize, heads: usize| {
        dev.from_slice(&rng.normals(m * heads * hd, 1.0), &[m, heads * hd])
            .unwrap()
    };
    let cache = || dev.zeros(&[n_kv, capacity, hd], DType::F32).unwrap();
    let shape = full_attention(n_heads, n_kv, hd);
    let pos_t = pos_tensor(&dev, pos);
    let run = |m: usize, rng: &mut Rng, out_h: &Tensor| {
        let qkv = [n_heads, n_kv, n_kv].map(|heads| tensor(rng, m, heads));
        let out = nan_tensor(&dev, &[m, n_heads * hd]);
        let (kc, vc) = (cache(), cache());
        let mut enc = CommandEncoder::new(&dev);
        let [q, k, v] = &qkv;
        ops::rope_attention(
            &mut enc,
            [q, k, v],
            None,
            &table,
            false,
            shape,
            &pos_t,
            (&kc, &vc),
            (&out, Some(out_h)),
        )
        .and_then(|_| enc.commit_and_wait())
        .map(|_| out)
    };
    let half_nan = vec![half::f16::NAN; n_heads * hd];
    let out_h = dev.from_slice(&half_nan, &[1, n_heads * hd]).unwrap();
    let out = run(1, &mut rng, &out_h).unwrap();
    let copy = out_h.to_vec::<half::f16>().unwrap();
    for (v, h) in out.to_vec::<f32>().unwrap().iter().zip(&copy) {
        assert_eq!(
            half::f16::from_f32(*v).to_bits(),
            h.to_bits(),
            "copy of {v}"
        );
    }
    let wrong_dtype = nan_tensor(&dev, &[1, n_heads * hd]);
    for (m, bad) in [(2, &out_h), (1, &wrong_dtype)] {
        let err = run(m, &mut rng, bad).unwrap_err().to_string();
        assert!(err.contains("out_h") || err.contains("f16 copy"), "{err}");
    }
}

/// `rope_attention` with head norms is `rms_norm` over each head of q and of k (plain and
/// unit-offset weights), then `rope_attention` without them, bit for bit, caches included; a
/// norm weight of the wrong dtype or length is an error.
#[test]
fn rope_attention_head_norms_equal_rms_norm_then_rope_attention() {
    let dev = Device::cpu();
    let mut rng = Rng(23);
    let (m, n_heads, n_kv, hd, capacity, pos, eps) = (3, 4, 2, 16, 9, 4, 1e-6);
    let table = RopeTable::new(&dev, hd, 10000.0, &RopeScaling::None).unwrap();
    let shape = full_attention(n_heads, n_kv, hd);
    let pos_t = pos_tensor(&dev, pos);
    let cache_data = rng.normals(n_kv * capacity * hd, 1.0);
    let cache = || dev.from_slice(&cache_data, &[n_kv, capacity, hd]).unwrap();
    for unit_offset in [false, true] {
        let mut tensor = |rows: usize, cols: usize, scale: f32| {
            dev.from_slice(&rng.normals(rows * cols, scale), &[rows, cols])
                .unwrap()
        };
        let (q, k, v) = (
            tensor(m, n_heads * hd, 2.0),
            tensor(m, n_kv * hd, 2.0),
            tensor(m, n_kv * hd, 1.0),
        );
        let (q_w, k_w) = (
            tensor(1, hd, 0.5).reshape(&[hd]).unwrap(),
            tensor(1, hd, 0.5).reshape(&[hd]).unwrap(),
        );
        let mut enc = CommandEncoder::new(&dev);
        let (q_normed, k_normed) = (nan_tensor(&dev, q.shape()), nan_tensor(&dev, k.shape()));
        for (x, w, out, heads) in [(&q, &q_w, &q_normed, n_heads), (&k, &k_w, &k_normed, n_kv)] {
            let per_head = [m * heads, hd];
            ops::rms_norm(
                &mut enc,
                &x.reshape(&per_head).unwrap(),
                w,
                eps,
                unit_offset,
                &out.reshape(&per_head).unwrap(),
            )
            .unwrap();
        }
        let (attn_want, k_want, v_want) = (nan_tensor(&dev, q.shape()), cache(), cache());
        ops::rope_attention(
            &mut enc,
            [&q_normed, &k_normed, &v],
            None,
            &table,
            false,
            shape,
            &pos_t,
            (&k_want, &v_want),
            (&attn_want, None),
        )
        .unwrap();
        let (attn_got, k_got, v_got) = (nan_tensor(&dev, q.shape()), cache(), cache());
        let norm = PreNorm { eps, unit_offset };
        let head_norms = |q, k| Some(HeadNorms { q, k, norm });
        ops::rope_attention(
            &mut enc,
            [&q, &k, &v],
            head_norms(&q_w, &k_w),
            &table,
            false,
            shape,
            &pos_t,
            (&k_got, &v_got),
            (&attn_got, None),
        )
        .unwrap();
        let short = dev.from_slice(&vec![1f32; hd - 1], &[hd - 1]).unwrap();
        let half = dev.from_slice(&vec![half::f16::ONE; hd], &[hd]).unwrap();
        for (q_w, k_w, what) in [
            (&short, &k_w, "q norm weight"),
            (&q_w, &half, "k norm weight"),
        ] {
            let err = ops::rope_attention(
                &mut enc,
                [&q, &k, &v],
                head_norms(q_w, k_w),
                &table,
                false,
                shape,
                &pos_t,
                (&k_got, &v_got),
                (&attn_got, None),
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains(what), "{err}");
        }
        enc.commit().unwrap();
        for (what, got, want) in [
            ("out", &attn_got, &attn_want),
            ("k cache", &k_got, &k_want),
            ("v cache", &v_got, &v_want),
        ] {
            let (got, want) = (got.to_vec::<f32>().unwrap(), want.to_vec::<f32>().unwrap());
            assert!(got.iter().all(|x| x.is_finite()), "{what}: not finite");
            assert_eq!(got, want, "head norms unit_offset={unit_offset}: {what}");
        }
    }
}

/// Invalid scaling parameters are reported, not turned into NaN frequencies.
#[test]
fn rope_rejects_degenerate_scaling() {
    let dev = Device::cpu();
    let bad = RopeScaling::Llama3 {
        factor: 0.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    };
    assert!(RopeTable::new(&dev, 64, 500000.0, &bad).is_err());
    assert!(RopeTable::new(&dev, 64, 0.0, &RopeScaling::None).is_err());
    assert!(RopeTable::new(&dev, 63, 10000.0, &RopeScaling::None).is_err());
}

// ---------------------------------------------------------------------------------------
// norms

/// A norm with its residual in one dispatch gives the bits of a norm followed by an add.
#[test]
fn rms_norm_add_is_the_norm_then_the_add() {
    let dev = Device::cpu();
    let fx = fixture("norm");
    for (name, p) in fx.cases.iter().filter(|(name, _)| name.starts_with("rms")) {
        let x = fx.tensor(&dev, &format!("{name}.x"));
        let w = fx.tensor(&dev, &format!("{name}.weight"));
        let residual = fx.tensor(&dev, &format!("{name}.out"));
        let (eps, unit_offset) = (f32_of(p, "eps"), p["unit_offset"].as_bool().unwrap());
        let (normed, sum, fused) = (
            nan_tensor(&dev, x.shape()),
            nan_tensor(&dev, x.shape()),
            nan_tensor(&dev, x.shape()),
        );
        let mut enc = CommandEncoder::new(&dev);
        ops::rms_norm(&mut enc, &x, &w, eps, unit_offset, &normed).unwrap();
        ops::binary(&mut enc, BinaryFn::Add, &residual, &normed, &sum).unwrap();
        ops::rms_norm_add(&mut enc, &x, &w, eps, unit_offset, &residual, &fused).unwrap();
        enc.commit().unwrap();
        assert_eq!(
            fused.to_vec::<f32>().unwrap(),
            sum.to_vec::<f32>().unwrap(),
            "{name}"
        );
        // A residual of another shape is refused when recorded.
        let short = nan_tensor(&dev, &[1, x.last_dim()]);
        if x.rows() > 1 {
            let err = ops::rms_norm_add(&mut enc, &x, &w, eps, unit_offset, &short, &fused);
            assert!(err.is_err(), "{name}: a residual of one row");
        }
    }
}

/// mx.fast.rms_norm (plain and with Gemma's 1 + w) and mx.fast.layer_norm: max abs error
/// 1e-6 on outputs of magnitude up to ~10.
/// f16 activations (`ops::ACTIVATIONS`: a norm's or the gated activation's output for a matmul
/// that rounds x to f16) are the f32 results rounded once, and a matmul of f16 x is the matmul
/// of those values widened. The residual stream and a folded norm's input stay f32.
#[test]
fn f16_activations_are_the_f32_values_rounded() {
    let dev = Device::cpu();
    let (m, d, n) = (3, 96, 5);
    let value = |i: usize| ((i * 37 % 101) as f32 - 50.0) / 17.0;
    let x = dev
        .from_slice(&(0..m * d).map(value).collect::<Vec<_>>(), &[m, d])
        .unwrap();
    let up = dev
        .from_slice(
            &(0..m * d).map(|i| value(i + 7)).collect::<Vec<_>>(),
            &[m, d],
        )
        .unwrap();
    let w = dev
        .from_slice(&(0..d).map(|i| value(i + 3)).collect::<Vec<_>>(), &[d])
        .unwrap();
    let (wide, half) = (
        nan_tensor(&dev, &[m, d]),
        dev.empty(&[m, d], DType::F16).unwrap(),
    );
    let rounded = |t: &Tensor| -> Vec<f16> {
        let v = t.to_vec::<f32>().unwrap();
        v.iter().map(|&v| f16::from_f32(v)).collect()
    };
    let mut enc = CommandEncoder::new(&dev);
    ops::rms_norm(&mut enc, &x, &w, 1e-5, true, &wide).unwrap();
    ops::rms_norm(&mut enc, &x, &w, 1e-5, true, &half).unwrap();
    enc.commit().unwrap();
    assert_eq!(half.to_vec::<f16>().unwrap(), rounded(&wide), "rms_norm");
    for f in [UnaryFn::Silu, UnaryFn::GeluTanh] {
        ops::gated_activation(&mut enc, f, &x, &up, &wide).unwrap();
        ops::gated_activation(&mut enc, f, &x, &up, &half).unwrap();
        enc.commit().unwrap();
        assert_eq!(half.to_vec::<f16>().unwrap(), rounded(&wide), "{f:?}");
    }

    let weights: Vec<f32> = (0..n * d).map(|i| value(i + 11)).collect();
    let weight = dev.from_slice(&weights, &[n, d]).unwrap();
    let lin = ops::Linear::new("w", WeightLayout::Dense, vec![weight], None, n, d).unwrap();
    let widened: Vec<f32> = half
        .to_vec::<f16>()
        .unwrap()
        .iter()
        .map(|v| v.to_f32())
        .collect();
    let widened = dev.from_slice(&widened, &[m, d]).unwrap();
    let (from_half, from_wide) = (nan_tensor(&dev, &[m, n]), nan_tensor(&dev, &[m, n]));
    ops::matmul(&mut enc, &half, &lin, &from_half).unwrap();
    ops::matmul(&mut enc, &widened, &lin, &from_wide).unwrap();
    enc.commit().unwrap();
    assert_eq!(
        from_half.to_vec::<f32>().unwrap(),
        from_wide.to_vec::<f32>().unwrap()
    );
    assert!(
        !ops::matmul_reads_half(&dev, &lin, m),
        "the CPU rounds no x"
    );

    // The residual stream is f32: refused, naming the operand.
    let err = ops::rms_norm_add(&mut enc, &x, &w, 1e-5, false, &up, &half).unwrap_err();
    assert!(err.to_string().contains("out: dtype f16"), "{err}");
    let row = dev.empty(&[1, d], DType::F16).unwrap();
    let out = nan_tensor(&dev, &[1, n]);
    let norm = (
        &w,
        PreNorm {
            eps: 1e-5,
            unit_offset: false,
        },
    );
    let err = ops::normed_matmul(&mut enc, &row, None, norm, &lin, &out).unwrap_err();
    assert!(err.to_string().contains("x: dtype f16"), "{err}");
}

/// A residual add and the next norm in one dispatch (`add_rms_norm`, prompts) give the very
/// values of `binary` then `rms_norm`, into f32 and into f16.
#[test]
fn add_rms_norm_is_the_add_then_the_norm() {
    let dev = Device::cpu();
    let fx = fixture("norm");
    for (name, p) in fx.cases.iter().filter(|(name, _)| name.starts_with("rms")) {
        let x = fx.tensor(&dev, &format!("{name}.x"));
        let w = fx.tensor(&dev, &format!("{name}.weight"));
        let y = fx.tensor(&dev, &format!("{name}.out"));
        let (eps, unit_offset) = (f32_of(p, "eps"), p["unit_offset"].as_bool().unwrap());
        let [sum, normed, fused_sum, fused] = [0; 4].map(|_| nan_tensor(&dev, x.shape()));
        let fused_h = dev.empty(x.shape(), DType::F16).unwrap();
        let mut enc = CommandEncoder::new(&dev);
        ops::binary(&mut enc, BinaryFn::Add, &x, &y, &sum).unwrap();
        ops::rms_norm(&mut enc, &sum, &w, eps, unit_offset, &normed).unwrap();
        let both = |enc: &mut CommandEncoder, out: &Tensor| {
            ops::add_rms_norm(enc, &x, &y, &w, eps, unit_offset, &fused_sum, out)
        };
        both(&mut enc, &fused).unwrap();
        enc.commit().unwrap();
        let values = |t: &Tensor| t.to_vec::<f32>().unwrap();
        assert_eq!(values(&fused_sum), values(&sum), "{name}: sum");
        assert_eq!(values(&fused), values(&normed), "{name}: normed");
        both(&mut enc, &fused_h).unwrap();
        enc.commit().unwrap();
        let rounded: Vec<f16> = values(&normed).iter().map(|&v| f16::from_f32(v)).collect();
        assert_eq!(
            fused_h.to_vec::<f16>().unwrap(),
            rounded,
            "{name}: into f16"
        );
        // The sum is the residual stream: f32, and not where the norm goes.
        let err = ops::add_rms_norm(&mut enc, &x, &y, &w, eps, unit_offset, &fused, &fused);
        assert!(err.unwrap_err().to_string().contains("overlap"), "{name}");
        let err = ops::add_rms_norm(&mut enc, &x, &y, &w, eps, unit_offset, &fused_h, &fused);
        assert!(
            err.unwrap_err().to_string().contains("sum: dtype f16"),
            "{name}"
        );
    }
}

#[test]
fn norms_match_mlx() {
    let dev = Device::cpu();
    let fx = fixture("norm");
    for (name, p) in &fx.cases {
        let x = fx.tensor(&dev, &format!("{name}.x"));
        let w = fx.tensor(&dev, &format!("{name}.weight"));
        let out = nan_tensor(&dev, x.shape());
        let mut enc = CommandEncoder::new(&dev);
        let eps = f32_of(p, "eps");
        if name.starts_with("rms") {
            ops::rms_norm(
                &mut enc,
                &x,
                &w,
                eps,
                p["unit_offset"].as_bool().unwrap(),
                &out,
            )
            .unwrap();
        } else {
            let b = fx.tensor(&dev, &format!("{name}.bias"));
            ops::layer_norm(&mut enc, &x, &w, &b, eps, &out).unwrap();
        }
        enc.commit().unwrap();
        let got = out.to_vec::<f32>().unwrap();
        assert_close(
            &format!("norm {name}"),
            &got,
            fx.values(&format!("{name}.out")),
            1e-6,
        );
    }
}

// ---------------------------------------------------------------------------------------
// attention

/// A cache `[n_kv_heads, capacity, head_dim]` holding `keys` `[n_kv_heads, filled, head_dim]`
/// at positions 0..filled and NaN after (the kernel must never read there).
fn cache_with(
    dev: &Device,
    keys: &[f32],
    n_kv_heads: usize,
    filled: usize,
    capacity: usize,
    head_dim: usize,
) -> Tensor {
    let mut data = vec![f32::NAN; n_kv_heads * capacity * head_dim];
    for h in 0..n_kv_heads {
        let src = &keys[h * filled * head_dim..(h + 1) * filled * head_dim];
        data[h * capacity * head_dim..][..filled * head_dim].copy_from_slice(src);
    }
    dev.from_slice(&data, &[n_kv_heads, capacity, head_dim])
        .unwrap()
}

/// Rows pos..pos+m of `[n_kv_heads, s, head_dim]` as `[m, n_kv_heads*head_dim]`.
fn rows_of(
    cache: &[f32],
    n_kv_heads: usize,
    s: usize,
    head_dim: usize,
    pos: usize,
    m: usize,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(m * n_kv_heads * head_dim);
    for r in pos..pos + m {
        for h in 0..n_kv_heads {
            out.extend_from_slice(&cache[(h * s + r) * head_dim..][..head_dim]);
        }
    }
    out
}

/// mx.fast.scaled_dot_product_attention with GQA (6 query heads on 2 kv heads), head dims 64
/// and 40, a cached prefix (queries at pos..pos+m against keys 0..pos+m), a prefill from 0,
/// and sliding windows (MLX given the explicit mask). The new keys and values go through
/// kv_append first (checked exactly). Max abs error 2e-6.
#[test]
fn attention_matches_mlx() {
    let dev = Device::cpu();
    let fx = fixture("attention");
    for (name, p) in &fx.cases {
        let (n_heads, n_kv_heads, head_dim) = (
            usize_of(p, "n_heads"),
            usize_of(p, "n_kv_heads"),
            usize_of(p, "head_dim"),
        );
        let (pos, m) = (usize_of(p, "pos"), usize_of(p, "m"));
        let s = pos + m;
        let capacity = s + 5;
        let k = fx.values(&format!("{name}.k"));
        let v = fx.values(&format!("{name}.v"));
        // the prefix is already cached; the m new rows are appended by the kernel
        let k_cache = cache_with(&dev, k, n_kv_heads, s, capacity, head_dim);
        let v_cache = cache_with(&dev, v, n_kv_heads, s, capacity, head_dim);
        let poison = |c: &Tensor| {
            let mut data = c.to_vec::<f32>().unwrap();
            for h in 0..n_kv_heads {
                data[(h * capacity + pos) * head_dim..][..m * head_dim].fill(f32::NAN);
            }
            c.write(&data).unwrap();
        };
        poison(&k_cache);
        poison(&v_cache);
        let k_new = dev
            .from_slice(
                &rows_of(k, n_kv_heads, s, head_dim, pos, m),
                &[m, n_kv_heads * head_dim],
            )
            .unwrap();
        let v_new = dev
            .from_slice(
                &rows_of(v, n_kv_heads, s, head_dim, pos, m),
                &[m, n_kv_heads * head_dim],
            )
            .unwrap();
        let q = fx.tensor(&dev, &format!("{name}.q"));
        let out = nan_tensor(&dev, q.shape());
        let pos_t = pos_tensor(&dev, pos);
        let shape = AttentionShape {
            n_heads,
            n_kv_heads,
            head_dim,
            scale: f32_of(p, "scale"),
            window: p["window"].as_u64().map(|w| w as usize),
            softcap: None,
            min_keys: 0,
        };
        let mut enc = CommandEncoder::new(&dev);
        ops::kv_append(&mut enc, &k_new, &pos_t, &k_cache).unwrap();
        ops::kv_append(&mut enc, &v_new, &pos_t, &v_cache).unwrap();
        ops::attention(&mut enc, shape, &q, &k_cache, &v_cache, &pos_t, &out).unwrap();
        enc.commit().unwrap();

        let filled = rows_of(
            &k_cache.to_vec::<f32>().unwrap(),
            n_kv_heads,
            capacity,
            head_dim,
            0,
            s,
        );
        assert_eq!(
            filled,
            rows_of(k, n_kv_heads, s, head_dim, 0, s),
            "kv_append {name}"
        );
        let got = out.to_vec::<f32>().unwrap();
        assert_close(
            &format!("attention {name}"),
            &got,
            fx.values(&format!("{name}.out")),
            2e-6,
        );
    }
}

/// One attention call: q `[m, n_heads*head_dim]` at positions pos..pos+m over caches
/// `[n_kv_heads, capacity, head_dim]`.
struct AttentionCall {
    shape: AttentionShape,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    capacity: usize,
    pos: usize,
}

impl AttentionCall {
    fn rows(&self) -> usize {
        self.q.len() / (self.shape.n_heads * self.shape.head_dim)
    }
}

/// The f64 reference.
fn attention_f64(c: &AttentionCall) -> Vec<f32> {
    let AttentionCall {
        shape,
        q,
        k,
        v,
        capacity,
        pos,
    } = c;
    let (capacity, pos, m) = (*capacity, *pos, c.rows());
    let hd = shape.head_dim;
    let group = shape.n_heads / shape.n_kv_heads;
    let mut out = vec![0f32; q.len()];
    for i in 0..m {
        let qp = pos + i;
        for h in 0..shape.n_heads {
            let qv = &q[(i * shape.n_heads + h) * hd..][..hd];
            let base = (h / group) * capacity * hd;
            let keys: Vec<usize> = (0..=qp)
                .filter(|&j| shape.window.is_none_or(|w| j + w > qp))
                .collect();
            let scores: Vec<f64> = keys
                .iter()
                .map(|&j| {
                    let s = (0..hd)
                        .map(|d| qv[d] as f64 * k[base + j * hd + d] as f64)
                        .sum::<f64>()
                        * shape.scale as f64;
                    shape
                        .softcap
                        .map_or(s, |c| c as f64 * (s / c as f64).tanh())
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for d in 0..hd {
                let o: f64 = keys
                    .iter()
                    .zip(&e)
                    .map(|(&j, p)| p * v[base + j * hd + d] as f64)
                    .sum();
                out[(i * shape.n_heads + h) * hd + d] = (o / sum) as f32;
            }
        }
    }
    out
}

fn run_attention(dev: &Device, c: &AttentionCall) -> Vec<f32> {
    let shape = c.shape;
    let dims = [shape.n_kv_heads, c.capacity, shape.head_dim];
    let q = dev
        .from_slice(&c.q, &[c.rows(), shape.n_heads * shape.head_dim])
        .unwrap();
    let k = dev.from_slice(&c.k, &dims).unwrap();
    let v = dev.from_slice(&c.v, &dims).unwrap();
    let out = nan_tensor(dev, q.shape());
    let pos = pos_tensor(dev, c.pos);
    let mut enc = CommandEncoder::new(dev);
    ops::attention(&mut enc, shape, &q, &k, &v, &pos, &out).unwrap();
    enc.commit().unwrap();
    out.to_vec::<f32>().unwrap()
}

/// Soft-capping and sliding windows (with and without each other, MQA and GQA, odd head
/// dim) against the f64 reference; scores are scaled up so that the cap bends them.
/// Max abs error 2e-6.
#[test]
fn attention_softcap_and_window_match_f64() {
    let dev = Device::cpu();
    let mut rng = Rng(7);
    let (capacity, pos, m, hd) = (40, 13, 6, 24);
    for (n_heads, n_kv_heads, window, softcap) in [
        (4, 1, None, Some(3.0)),
        (4, 2, Some(5), None),
        (6, 3, Some(1), Some(2.0)),
        (6, 2, Some(9), Some(50.0)),
    ] {
        let shape = AttentionShape {
            n_heads,
            n_kv_heads,
            head_dim: hd,
            scale: 0.6,
            window,
            softcap,
            min_keys: 0,
        };
        let mut call = AttentionCall {
            shape,
            q: rng.normals(m * n_heads * hd, 1.0),
            k: rng.normals(n_kv_heads * capacity * hd, 1.0),
            v: rng.normals(n_kv_heads * capacity * hd, 1.0),
            capacity,
            pos,
        };
        // slots past the last query position must stay unread
        for h in 0..n_kv_heads {
            call.k[(h * capacity + pos + m) * hd..(h + 1) * capacity * hd].fill(f32::NAN);
        }
        let got = run_attention(&dev, &call);
        assert_close(
            &format!("attention {shape:?}"),
            &got,
            &attention_f64(&call),
            2e-6,
        );
    }
}

/// Decode over 3000 cached positions (the engine's long-context case) against f64.
#[test]
fn attention_long_decode_matches_f64() {
    let dev = Device::cpu();
    let mut rng = Rng(11);
    let (capacity, hd) = (3001, 64);
    let call = AttentionCall {
        shape: AttentionShape {
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: hd,
            scale: 0.125,
            window: None,
            softcap: None,
            min_keys: 0,
        },
        q: rng.normals(9 * hd, 2.0),
        k: rng.normals(3 * capacity * hd, 1.0),
        v: rng.normals(3 * capacity * hd, 1.0),
        capacity,
        pos: 3000,
    };
    assert_close(
        "long decode",
        &run_attention(&dev, &call),
        &attention_f64(&call),
        2e-6,
    );
}

/// Positions past the cache are an error from the kernel, for both append and attention.
#[test]
fn cache_overflow_is_an_error() {
    let dev = Device::cpu();
    let cache = nan_tensor(&dev, &[2, 8, 4]);
    let x = dev.from_slice(&[1f32; 16], &[2, 8]).unwrap();
    let mut enc = CommandEncoder::new(&dev);
    ops::kv_append(&mut enc, &x, &pos_tensor(&dev, 7), &cache).unwrap();
    assert!(enc.commit().is_err());

    let shape = AttentionShape {
        n_heads: 2,
        n_kv_heads: 2,
        head_dim: 4,
        scale: 0.5,
        window: None,
        softcap: None,
        min_keys: 0,
    };
    let q = dev.from_slice(&[1f32; 16], &[2, 8]).unwrap();
    let out = nan_tensor(&dev, &[2, 8]);
    let mut enc = CommandEncoder::new(&dev);
    ops::attention(
        &mut enc,
        shape,
        &q,
        &cache,
        &cache.clone(),
        &pos_tensor(&dev, 7),
        &out,
    )
    .unwrap();
    assert!(enc.commit().is_err());
}

// ---------------------------------------------------------------------------------------
// f16 KV caches

fn halves(x: &[f32]) -> Vec<f16> {
    x.iter().map(|&v| f16::from_f32(v)).collect()
}

/// `x` rounded to nearest f16, back in f32.
fn f16_rounded(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| f16::from_f32(v).to_f32()).collect()
}

fn bits(x: &[f16]) -> Vec<u16> {
    x.iter().map(|h| h.to_bits()).collect()
}

/// `kv_append` into an f16 cache stores f16::from_f32 of each value (large, small and
/// subnormal magnitudes) at rows pos..pos+m of every head, and leaves the other rows as they
/// were; a u32 cache is refused, naming its dtype.
#[test]
fn kv_append_into_f16_cache_rounds_to_nearest() {
    let dev = Device::cpu();
    let mut rng = Rng(31);
    let (n_kv, hd, capacity) = (3, 20, 10);
    for (pos, m, scale) in [(4, 3, 3.0), (0, 2, 1e-5), (9, 1, 300.0), (0, 10, 1.0)] {
        let before = halves(&rng.normals(n_kv * capacity * hd, 1.0));
        let cache = dev.from_slice(&before, &[n_kv, capacity, hd]).unwrap();
        let x = rng.normals(m * n_kv * hd, scale);
        let x_t = dev.from_slice(&x, &[m, n_kv * hd]).unwrap();
        let mut enc = CommandEncoder::new(&dev);
        ops::kv_append(&mut enc, &x_t, &pos_tensor(&dev, pos), &cache).unwrap();
        enc.commit().unwrap();
        let mut want = before.clone();
        for r in 0..m {
            for h in 0..n_kv {
                let src = &x[(r * n_kv + h) * hd..][..hd];
                want[(h * capacity + pos + r) * hd..][..hd].copy_from_slice(&halves(src));
            }
        }
        assert_ne!(bits(&want), bits(&before), "pos {pos}: nothing appended");
        let got = cache.to_vec::<f16>().unwrap();
        assert_eq!(bits(&got), bits(&want), "kv_append f16 pos={pos} m={m}");
    }
    let u32_cache = dev.zeros(&[n_kv, capacity, hd], DType::U32).unwrap();
    let x = dev
        .from_slice(&rng.normals(n_kv * hd, 1.0), &[1, n_kv * hd])
        .unwrap();
    let mut enc = CommandEncoder::new(&dev);
    let err = ops::kv_append(&mut enc, &x, &pos_tensor(&dev, 0), &u32_cache)
        .unwrap_err()
        .to_string();
    assert!(err.contains("cache") && err.contains("u32"), "{err}");
}

/// `rope_kv_append` with f16 caches writes the f32-cache result rounded to f16, bit for bit
/// (both layouts, partial rotation, a YaRN mscale; untouched rows stay), and the same rotated q.
#[test]
fn rope_kv_append_f16_caches_are_the_f32_result_rounded() {
    let dev = Device::cpu();
    let mut rng = Rng(32);
    let (m, n_heads, n_kv, hd, capacity, pos) = (3, 6, 2, 24, 11, 5);
    let scaling = yarn_scaling();
    for (dims, traditional, m) in [(24, false, m), (10, true, m), (24, false, 1)] {
        let table = RopeTable::new(&dev, dims, 10000.0, &scaling).unwrap();
        let [q, k, v] = qkv_rows(&dev, &mut rng, m, [n_heads, n_kv, n_kv], hd, 2.0);
        // f16-representable, so the untouched rows of both runs hold the same values
        let cache_data = f16_rounded(&rng.normals(n_kv * capacity * hd, 1.0));
        let dims3 = [n_kv, capacity, hd];
        let f32_cache = || dev.from_slice(&cache_data, &dims3).unwrap();
        let f16_cache = || dev.from_slice(&halves(&cache_data), &dims3).unwrap();
        let pos_t = pos_tensor(&dev, pos);
        let (q32, k32, v32) = (nan_tensor(&dev, q.shape()), f32_cache(), f32_cache());
        let (q16, k16, v16) = (nan_tensor(&dev, q.shape()), f16_cache(), f16_cache());
        let mut enc = CommandEncoder::new(&dev);
        for (q_out, kc, vc) in [(&q32, &k32, &v32), (&q16, &k16, &v16)] {
            ops::rope_kv_append(
                &mut enc,
                [&q, &k, &v],
                &table,
                n_heads,
                traditional,
                &pos_t,
                q_out,
                (kc, vc),
            )
            .unwrap();
        }
        enc.commit().unwrap();
        let what = format!("dims={dims} m={m}");
        assert_eq!(
            q16.to_vec::<f32>().unwrap(),
            q32.to_vec::<f32>().unwrap(),
            "{what}: q"
        );
        for (name, c32, c16) in [("k", &k32, &k16), ("v", &v32, &v16)] {
            let want = halves(&c32.to_vec::<f32>().unwrap());
            assert_ne!(want, halves(&cache_data), "{what}: {name} cache unchanged");
            let got = c16.to_vec::<f16>().unwrap();
            assert_eq!(bits(&got), bits(&want), "{what}: {name} cache");
        }
    }
}

/// Attention over f16 caches equals attention over f32 caches holding the same (rounded)
/// values, and the f64 reference over them: decode and a few rows, GQA and MQA, windows,
/// a soft-cap, head dims 40 and 64, a long decode (the threaded path). Slots past the last
/// query position are NaN in both caches.
#[test]
fn attention_over_f16_caches_equals_f32_over_the_rounded_values() {
    let dev = Device::cpu();
    let mut rng = Rng(33);
    for (m, pos, n_heads, n_kv_heads, hd, window, softcap) in [
        (1, 12, 6, 2, 40, None, None),
        (1, 12, 6, 2, 64, Some(5), None),
        (4, 9, 6, 3, 40, None, None),
        (4, 9, 4, 1, 64, Some(3), Some(2.0)),
        (1, 400, 8, 2, 64, None, None),
    ] {
        let capacity = pos + m + 3;
        let shape = AttentionShape {
            n_heads,
            n_kv_heads,
            head_dim: hd,
            scale: 0.3,
            window,
            softcap,
            min_keys: 0,
        };
        let cache = |rng: &mut Rng| {
            let mut c = f16_rounded(&rng.normals(n_kv_heads * capacity * hd, 1.0));
            for h in 0..n_kv_heads {
                c[(h * capacity + pos + m) * hd..(h + 1) * capacity * hd].fill(f32::NAN);
            }
            c
        };
        let call = AttentionCall {
            shape,
            q: rng.normals(m * n_heads * hd, 1.0),
            k: cache(&mut rng),
            v: cache(&mut rng),
            capacity,
            pos,
        };
        let dims = [n_kv_heads, capacity, hd];
        let q = dev.from_slice(&call.q, &[m, n_heads * hd]).unwrap();
        let k = dev.from_slice(&halves(&call.k), &dims).unwrap();
        let v = dev.from_slice(&halves(&call.v), &dims).unwrap();
        let out = nan_tensor(&dev, q.shape());
        let mut enc = CommandEncoder::new(&dev);
        ops::attention(&mut enc, shape, &q, &k, &v, &pos_tensor(&dev, pos), &out).unwrap();
        enc.commit().unwrap();
        let got = out.to_vec::<f32>().unwrap();
        let what = format!("f16 attention m={m} pos={pos} {shape:?}");
        assert_close(&what, &got, &run_attention(&dev, &call), 1e-6);
        assert_close(&what, &got, &attention_f64(&call), 2e-6);
    }
}

/// `rope_attention` with no head norms, rotate-half RoPE and no f16 copy of the output.
fn rope_attention_plain(
    enc: &mut CommandEncoder,
    qkv: [&Tensor; 3],
    table: &RopeTable,
    shape: AttentionShape,
    pos: &Tensor,
    caches: (&Tensor, &Tensor),
    out: &Tensor,
) -> mlx_native::Result<()> {
    ops::rope_attention(
        enc,
        qkv,
        None,
        table,
        false,
        shape,
        pos,
        caches,
        (out, None),
    )
}

/// `rope_attention` with f16 caches: the caches are the f32 run's rounded to f16, bit for
/// bit, and the output is attention of the rotated q over those rounded caches (decode and
/// three rows, GQA, a window or not).
#[test]
fn rope_attention_f16_caches_match_attention_over_the_rounded_caches() {
    let dev = Device::cpu();
    let mut rng = Rng(34);
    let (n_heads, n_kv, hd, capacity, pos) = (6, 2, 32, 12, 7);
    let table = RopeTable::new(&dev, hd, 10000.0, &RopeScaling::None).unwrap();
    let pos_t = pos_tensor(&dev, pos);
    let dims3 = [n_kv, capacity, hd];
    for (m, window) in [(1, None), (3, Some(4)), (1, Some(2)), (3, None)] {
        let shape = AttentionShape {
            window,
            ..full_attention(n_heads, n_kv, hd)
        };
        let [q, k, v] = qkv_rows(&dev, &mut rng, m, [n_heads, n_kv, n_kv], hd, 1.5);
        let cache_data = f16_rounded(&rng.normals(n_kv * capacity * hd, 1.0));
        let f32_cache = || dev.from_slice(&cache_data, &dims3).unwrap();
        let f16_cache = || dev.from_slice(&halves(&cache_data), &dims3).unwrap();
        let (out32, k32, v32) = (nan_tensor(&dev, q.shape()), f32_cache(), f32_cache());
        let (out16, k16, v16) = (nan_tensor(&dev, q.shape()), f16_cache(), f16_cache());
        let mut enc = CommandEncoder::new(&dev);
        for (out, kc, vc) in [(&out32, &k32, &v32), (&out16, &k16, &v16)] {
            rope_attention_plain(&mut enc, [&q, &k, &v], &table, shape, &pos_t, (kc, vc), out)
                .unwrap();
        }
        let q_rot = nan_tensor(&dev, q.shape());
        ops::rope(&mut enc, &q, &table, n_heads, hd, false, &pos_t, &q_rot).unwrap();
        enc.commit().unwrap();
        let what = format!("rope_attention f16 m={m} window={window:?}");
        let mut rounded = Vec::new();
        for (name, c32, c16) in [("k", &k32, &k16), ("v", &v32, &v16)] {
            let want = halves(&c32.to_vec::<f32>().unwrap());
            let got = c16.to_vec::<f16>().unwrap();
            assert_eq!(bits(&got), bits(&want), "{what}: {name} cache");
            rounded.push(got.iter().map(|h| h.to_f32()).collect::<Vec<f32>>());
        }
        let (kr, vr) = (
            dev.from_slice(&rounded[0], &dims3).unwrap(),
            dev.from_slice(&rounded[1], &dims3).unwrap(),
        );
        let want = nan_tensor(&dev, q.shape());
        let mut enc = CommandEncoder::new(&dev);
        ops::attention(&mut enc, shape, &q_rot, &kr, &vr, &pos_t, &want).unwrap();
        enc.commit().unwrap();
        let got = out16.to_vec::<f32>().unwrap();
        assert_close(&what, &got, &want.to_vec::<f32>().unwrap(), 1e-5);
        // rounding the caches moves the output, but only a little
        assert_close(&what, &got, &out32.to_vec::<f32>().unwrap(), 2e-2);
    }
}

/// Caches of two dtypes (f16 k with f32 v, f32 k with f16 v, f16 k with u32 v) or both of
/// an unsupported dtype are refused by every op that takes the pair, naming both dtypes.
#[test]
fn mixed_cache_dtypes_are_refused() {
    let dev = Device::cpu();
    let mut rng = Rng(35);
    let (m, n_heads, n_kv, hd, capacity, pos) = (2, 4, 2, 8, 6, 1);
    let table = RopeTable::new(&dev, hd, 10000.0, &RopeScaling::None).unwrap();
    let shape = full_attention(n_heads, n_kv, hd);
    let pos_t = pos_tensor(&dev, pos);
    let [q, k, v] = qkv_rows(&dev, &mut rng, m, [n_heads, n_kv, n_kv], hd, 1.0);
    let dims3 = [n_kv, capacity, hd];
    let mut cache = |dtype: DType| {
        let x = rng.normals(n_kv * capacity * hd, 1.0);
        match dtype {
            DType::F32 => dev.from_slice(&x, &dims3).unwrap(),
            DType::F16 => dev.from_slice(&halves(&x), &dims3).unwrap(),
            DType::BF16 => {
                let b: Vec<half::bf16> = x.iter().map(|&v| half::bf16::from_f32(v)).collect();
                dev.from_slice(&b, &dims3).unwrap()
            }
            _ => dev.from_slice(&vec![7u32; x.len()], &dims3).unwrap(),
        }
    };
    let out = nan_tensor(&dev, q.shape());
    for (kd, vd) in [
        (DType::F16, DType::F32),
        (DType::F32, DType::F16),
        (DType::F16, DType::U32),
        (DType::BF16, DType::BF16),
    ] {
        let (kc, vc) = (cache(kd), cache(vd));
        let mut enc = CommandEncoder::new(&dev);
        let errors = [
            ops::attention(&mut enc, shape, &q, &kc, &vc, &pos_t, &out),
            ops::rope_kv_append(
                &mut enc,
                [&q, &k, &v],
                &table,
                n_heads,
                false,
                &pos_t,
                &out,
                (&kc, &vc),
            ),
            rope_attention_plain(
                &mut enc,
                [&q, &k, &v],
                &table,
                shape,
                &pos_t,
                (&kc, &vc),
                &out,
            ),
        ];
        for err in errors {
            let err = err.unwrap_err().to_string();
            assert!(
                err.contains(&format!("k_cache is {kd}"))
                    && err.contains(&format!("v_cache is {vd}")),
                "{kd}/{vd}: {err}"
            );
        }
        assert_eq!(enc.dispatch_count(), 0);
    }
}

// ---------------------------------------------------------------------------------------
// elementwise

fn run_unary(dev: &Device, f: UnaryFn, x: &Tensor) -> Vec<f32> {
    let out = nan_tensor(dev, x.shape());
    let mut enc = CommandEncoder::new(dev);
    ops::unary(&mut enc, f, x, &out).unwrap();
    enc.commit().unwrap();
    out.to_vec::<f32>().unwrap()
}

const ACTIVATIONS: [(UnaryFn, &str); 3] = [
    (UnaryFn::Silu, "silu"),
    (UnaryFn::GeluExact, "geluexact"),
    (UnaryFn::GeluTanh, "gelutanh"),
];

/// nn.silu, nn.gelu (erf) and nn.gelu_approx (tanh) over [-12, 12] and random inputs, alone
/// and gated (f(gate)·up); mx.softmax over rows of large logits (100 ± 8·N(0,1), where a
/// softmax without the max subtraction overflows). Max abs error 2e-6 (activations, values
/// up to 12) and 2.5e-7 (softmax, 2 ulp near 1).
#[test]
fn activations_and_softmax_match_mlx() {
    let dev = Device::cpu();
    let fx = fixture("activations");
    let x = fx.tensor(&dev, "unary.x");
    let (gate, up) = (fx.tensor(&dev, "gated.gate"), fx.tensor(&dev, "gated.up"));
    for (f, name) in ACTIVATIONS {
        assert_close(
            name,
            &run_unary(&dev, f, &x),
            fx.values(&format!("unary.{name}")),
            2e-6,
        );
        let out = nan_tensor(&dev, gate.shape());
        let mut enc = CommandEncoder::new(&dev);
        ops::gated_activation(&mut enc, f, &gate, &up, &out).unwrap();
        enc.commit().unwrap();
        let got = out.to_vec::<f32>().unwrap();
        assert_close(
            &format!("gated {name}"),
            &got,
            fx.values(&format!("gated.{name}")),
            2e-6,
        );
    }
    let x = fx.tensor(&dev, "softmax.x");
    let out = nan_tensor(&dev, x.shape());
    let mut enc = CommandEncoder::new(&dev);
    ops::softmax(&mut enc, &x, &out).unwrap();
    enc.commit().unwrap();
    assert_close(
        "softmax",
        &out.to_vec::<f32>().unwrap(),
        fx.values("softmax.out"),
        2.5e-7,
    );
}

/// The exact GELU's negative tail keeps relative precision (erfc is not 1 − erf there):
/// against f64 x·Φ(x) with Φ from a 200-term series, relative error 1e-5 down to x = −9.
#[test]
fn gelu_exact_tail_is_precise() {
    let dev = Device::cpu();
    let xs: Vec<f32> = (0..60).map(|i| -0.5 - 0.15 * i as f32).collect();
    let got = run_unary(
        &dev,
        UnaryFn::GeluExact,
        &dev.from_slice(&xs, &[60]).unwrap(),
    );
    for (&x, &g) in xs.iter().zip(&got) {
        // Φ(x) = e^(−x²/2)/√(2π) · Σ over the continued fraction of Mills' ratio
        let a = -(x as f64);
        let mut t = a;
        for n in (1..=200).rev() {
            t = a + n as f64 / t;
        }
        let phi = (-a * a / 2.0).exp() / ((2.0 * std::f64::consts::PI).sqrt() * t);
        let want = x as f64 * phi;
        assert!(
            ((g as f64 - want) / want).abs() < 1e-5,
            "gelu({x}) = {g}, want {want}"
        );
    }
}

/// Softcap, add and mul against f64 (odd size over several rayon chunks): softcap to 4e-6
/// (2 ulp at |out| < 15),
/// add and mul exactly (one correctly rounded operation each).
#[test]
fn softcap_and_binary_match_f64() {
    let dev = Device::cpu();
    let mut rng = Rng(3);
    let n = 3 * 16384 + 77;
    let a = rng.normals(n, 20.0);
    let b = rng.normals(n, 1.0);
    let (a_t, b_t) = (
        dev.from_slice(&a, &[n]).unwrap(),
        dev.from_slice(&b, &[n]).unwrap(),
    );

    let out = nan_tensor(&dev, &[n]);
    let mut enc = CommandEncoder::new(&dev);
    ops::softcap(&mut enc, 15.0, &a_t, &out).unwrap();
    enc.commit().unwrap();
    let want: Vec<f32> = a
        .iter()
        .map(|&x| (15.0 * (x as f64 / 15.0).tanh()) as f32)
        .collect();
    assert_close("softcap", &out.to_vec::<f32>().unwrap(), &want, 4e-6);

    for (f, op) in [
        (BinaryFn::Add, (|x, y| x + y) as fn(f64, f64) -> f64),
        (BinaryFn::Mul, |x, y| x * y),
    ] {
        let out = nan_tensor(&dev, &[n]);
        let mut enc = CommandEncoder::new(&dev);
        ops::binary(&mut enc, f, &a_t, &b_t, &out).unwrap();
        enc.commit().unwrap();
        let want: Vec<f32> = a
            .iter()
            .zip(&b)
            .map(|(&x, &y)| op(x as f64, y as f64) as f32)
            .collect();
        assert_eq!(out.to_vec::<f32>().unwrap(), want, "{f:?}");
    }
}

// ---------------------------------------------------------------------------------------
// sampling

struct Sampler {
    dev: Device,
    logits: Tensor,
    pos: Tensor,
    token: Tensor,
    history: Tensor,
}

impl Sampler {
    /// `logits` `[m, vocab]`; `history` the token history buffer.
    fn new(logits: &[f32], vocab: usize, history: &[u32]) -> Sampler {
        let dev = Device::cpu();
        Sampler {
            logits: dev
                .from_slice(logits, &[logits.len() / vocab, vocab])
                .unwrap(),
            pos: pos_tensor(&dev, 0),
            token: dev.from_slice(&[u32::MAX], &[1]).unwrap(),
            history: dev.from_slice(history, &[history.len()]).unwrap(),
            dev,
        }
    }

    fn sample(&self, params: SamplingParams, pos: usize) -> u32 {
        self.pos.write(&[pos as u32]).unwrap();
        self.token.write(&[u32::MAX]).unwrap();
        let mut enc = CommandEncoder::new(&self.dev);
        ops::sample(
            &mut enc,
            params,
            &self.logits,
            &self.pos,
            &self.token,
            &self.history,
        )
        .unwrap();
        enc.commit().unwrap();
        self.token.to_vec::<u32>().unwrap()[0]
    }

    fn argmax(&self) -> u32 {
        self.token.write(&[u32::MAX]).unwrap();
        let mut enc = CommandEncoder::new(&self.dev);
        ops::argmax(&mut enc, &self.logits, &self.token).unwrap();
        enc.commit().unwrap();
        self.token.to_vec::<u32>().unwrap()[0]
    }
}

/// The documented draw: splitmix64's output function on seed ⊕ pos·φ, top 53 bits.
fn uniform_spec(seed: u64, pos: usize) -> f64 {
    Rng(seed ^ (pos as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)).uniform()
}

/// f64 reference of the whole sampler on one row of logits: repetition penalty, then
/// mlx-lm's top-p, min-p, top-k on the untempered distribution, then the inverse-CDF draw
/// at the temperature. `None` when the draw lands within 1e-9 of a bucket boundary.
fn sample_f64(logits: &[f32], history: &[u32], pos: usize, p: &SamplingParams) -> Option<u32> {
    let mut l: Vec<f64> = logits.iter().map(|&x| x as f64).collect();
    let first = (pos + 1).saturating_sub(p.repetition_window);
    let mut seen: Vec<u32> = history[first..=pos].to_vec();
    seen.sort();
    seen.dedup();
    if p.repetition_window > 0 {
        for t in seen {
            let x = &mut l[t as usize];
            *x = if *x < 0.0 {
                *x * p.repetition_penalty as f64
            } else {
                *x / p.repetition_penalty as f64
            };
            *x = *x as f32 as f64;
        }
    }
    let mut order: Vec<usize> = (0..l.len()).collect();
    order.sort_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
    if p.temperature == 0.0 {
        return Some(order[0] as u32);
    }
    let max = l[order[0]];
    let prob: Vec<f64> = l.iter().map(|x| (x - max).exp()).collect();
    let total: f64 = prob.iter().sum();
    let mut kept = Vec::new();
    let mut above = 0.0;
    for (rank, &i) in order.iter().enumerate() {
        let in_top_p = p.top_p >= 1.0 || above < p.top_p as f64 * total;
        let in_min_p = prob[i] >= p.min_p as f64;
        let in_top_k = p.top_k == 0 || rank < p.top_k;
        if in_top_p && in_min_p && in_top_k {
            kept.push(i);
        }
        above += prob[i];
    }
    let w: Vec<f64> = kept
        .iter()
        .map(|&i| ((l[i] - max) / p.temperature as f64).exp())
        .collect();
    let target = uniform_spec(p.seed, pos) * w.iter().sum::<f64>();
    let mut acc = 0.0;
    for (&i, w) in kept.iter().zip(&w) {
        acc += w;
        if (acc - target).abs() < 1e-9 * acc {
            return None;
        }
        if acc > target {
            return Some(i as u32);
        }
    }
    kept.last().map(|&i| i as u32)
}

fn params(temperature: f32) -> SamplingParams {
    SamplingParams {
        temperature,
        ..SamplingParams::default()
    }
}

/// Argmax reads the last row only, picks the lowest id among ties, never a NaN.
#[test]
fn argmax_last_row_ties_and_nan() {
    let vocab = 37;
    let mut logits = vec![0.5f32; 2 * vocab];
    logits[3] = 100.0; // row 0 must be ignored
    let row = &mut logits[vocab..];
    row[0] = f32::NAN;
    row[5] = 7.0;
    row[20] = 7.0;
    row[30] = f32::NAN;
    let s = Sampler::new(&logits, vocab, &[0; 4]);
    assert_eq!(s.argmax(), 5);
    assert_eq!(s.sample(params(0.0), 0), 5);
    let all_nan = Sampler::new(&[f32::NAN; 9], 9, &[0; 4]);
    assert_eq!(all_nan.argmax(), 0);
}

/// The greedy step's end: argmax's pick, also into ring slot (pos + 1) % r, and pos += 1 in the
/// same dispatch; `end_step` alone does the same with a given token.
#[test]
fn argmax_end_step_picks_publishes_and_moves_the_position_on() {
    let mut logits = vec![0.25f32; 2 * 11];
    logits[11 + 7] = 3.0;
    let s = Sampler::new(&logits, 11, &[0; 4]);
    let ring = s.dev.zeros_host_mapped(&[4], DType::U32).unwrap();
    ring.write(&[u32::MAX; 4]).unwrap();
    s.pos.write(&[9u32]).unwrap();
    s.token.write(&[u32::MAX]).unwrap();
    let mut enc = CommandEncoder::new(&s.dev);
    ops::argmax_end_step(&mut enc, &s.logits, &s.token, &s.pos, &ring).unwrap();
    enc.commit().unwrap();
    assert_eq!(s.token.to_vec::<u32>().unwrap(), [7]);
    assert_eq!(s.pos.to_vec::<u32>().unwrap(), [10]);
    assert_eq!(
        ring.to_vec::<u32>().unwrap(),
        [u32::MAX, u32::MAX, 7, u32::MAX]
    );

    s.token.write(&[5u32]).unwrap();
    let mut enc = CommandEncoder::new(&s.dev);
    ops::end_step(&mut enc, &s.token, &s.pos, &ring).unwrap();
    enc.commit().unwrap();
    assert_eq!(s.pos.to_vec::<u32>().unwrap(), [11]);
    assert_eq!(ring.to_vec::<u32>().unwrap(), [u32::MAX, u32::MAX, 7, 5]);

    let wrong = s.dev.zeros(&[2], DType::U32).unwrap();
    let mut enc = CommandEncoder::new(&s.dev);
    let err = ops::argmax_end_step(&mut enc, &s.logits, &s.token, &wrong, &ring).unwrap_err();
    assert!(err.to_string().contains("pos"), "{err}");
    for bad in [
        s.dev.zeros(&[0], DType::U32).unwrap(),
        s.dev.zeros(&[2, 2], DType::U32).unwrap(),
        s.dev.zeros(&[4], DType::F32).unwrap(),
    ] {
        let err = ops::end_step(&mut enc, &s.token, &s.pos, &bad).unwrap_err();
        assert!(err.to_string().contains("end_step: ring"), "{err}");
    }
}

/// The sampler equals the f64 reference draw for draw over many (seed, pos) and every
/// filter, alone and combined; top-k 1 is argmax; the pick lands in history[pos + 1].
#[test]
fn sample_matches_f64_reference() {
    let mut rng = Rng(5);
    let vocab = 301;
    let logits: Vec<f32> = (0..2 * vocab).map(|_| rng.normal() * 2.5).collect();
    let history: Vec<u32> = (0..64)
        .map(|_| (rng.next_u64() % vocab as u64) as u32)
        .collect();
    let s = Sampler::new(&logits, vocab, &history);
    let last = &logits[vocab..];
    let argmax = s.argmax();
    let settings = [
        SamplingParams {
            temperature: 1.0,
            ..Default::default()
        },
        SamplingParams {
            temperature: 0.7,
            top_k: 12,
            ..Default::default()
        },
        SamplingParams {
            temperature: 1.3,
            top_p: 0.6,
            ..Default::default()
        },
        SamplingParams {
            temperature: 0.9,
            min_p: 0.05,
            ..Default::default()
        },
        SamplingParams {
            temperature: 1.0,
            top_k: 40,
            top_p: 0.9,
            min_p: 0.02,
            ..Default::default()
        },
        SamplingParams {
            temperature: 0.8,
            repetition_penalty: 1.5,
            repetition_window: 10,
            ..Default::default()
        },
        SamplingParams {
            temperature: 0.0,
            repetition_penalty: 1.3,
            repetition_window: 64,
            ..Default::default()
        },
    ];
    let mut compared = 0;
    for (n, base) in settings.iter().enumerate() {
        for draw in 0..40 {
            let p = SamplingParams {
                seed: 1000 * n as u64 + draw,
                ..*base
            };
            let pos = (draw as usize * 7) % 60;
            let got = s.sample(p, pos);
            assert_eq!(
                s.history.to_vec::<u32>().unwrap()[pos + 1],
                got,
                "history write"
            );
            s.history.write(&history).unwrap();
            if let Some(want) = sample_f64(last, &history, pos, &p) {
                assert_eq!(got, want, "{p:?} at pos {pos}");
                compared += 1;
            }
            let top1 = SamplingParams {
                top_k: 1,
                temperature: 1.0,
                ..p
            };
            if top1.repetition_penalty == 1.0 {
                assert_eq!(s.sample(top1, pos), argmax, "top_k = 1 is argmax");
                s.history.write(&history).unwrap();
            }
        }
    }
    assert!(compared > 270, "only {compared} draws compared");
}

/// The sampler equals the sorting reference (tests/common: every kept token sorted, then the
/// walks) token for token, though it ranks only the prefix its walks reach: confident, flat
/// and quantized rows (ties where the ranked prefix grows), every filter.
#[test]
fn sample_matches_the_sorting_reference() {
    let mut rng = Rng(21);
    let vocab = 5003;
    let history: Vec<u32> = (0..64)
        .map(|_| (rng.next_u64() % vocab as u64) as u32)
        .collect();
    let settings = [
        params(0.8),
        SamplingParams {
            top_p: 0.9,
            ..params(0.7)
        },
        SamplingParams {
            top_p: 0.5,
            ..params(2.0)
        },
        SamplingParams {
            min_p: 0.05,
            ..params(0.6)
        },
        SamplingParams {
            top_k: 300,
            top_p: 0.95,
            ..params(1.0)
        },
        SamplingParams {
            top_k: 7,
            repetition_penalty: 1.2,
            repetition_window: 20,
            ..params(0.8)
        },
    ];
    for round in 0..9 {
        // Spreads: a confident row, a nearly flat one (top-p keeps thousands), between.
        let spread = [6.0, 0.3, 2.0][round % 3];
        let mut logits = rng.normals(vocab, spread);
        if round % 2 == 1 {
            logits
                .iter_mut()
                .for_each(|v| *v = (*v * 2.0).round() / 2.0);
        }
        let s = Sampler::new(&logits, vocab, &history);
        for (n, base) in settings.iter().enumerate() {
            for draw in 0..6 {
                let p = SamplingParams {
                    seed: rng.next_u64(),
                    ..*base
                };
                let pos = (7 * draw + n) % 60;
                let got = s.sample(p, pos);
                s.history.write(&history).unwrap();
                let want = common::sample_ref(&logits, &history, pos, &p);
                assert_eq!(got, want, "round {round}, {p:?} at pos {pos}");
            }
        }
    }
}

/// Same seed and position: same token. Different seeds (or positions) over a flat
/// distribution: many different tokens, with frequencies close to the probabilities.
#[test]
fn sample_is_deterministic_and_spreads() {
    let vocab = 8;
    let logits: Vec<f32> = (0..vocab).map(|i| 0.3 * i as f32).collect();
    let s = Sampler::new(&logits, vocab, &[0; 16]);
    let p = |seed| SamplingParams {
        temperature: 0.8,
        seed,
        ..Default::default()
    };
    for seed in [0, 1, 99, u64::MAX] {
        assert_eq!(s.sample(p(seed), 3), s.sample(p(seed), 3));
    }
    let draws = 3000;
    let mut counts = [0usize; 8];
    for seed in 0..draws {
        counts[s.sample(p(seed), 5) as usize] += 1;
    }
    let w: Vec<f64> = logits.iter().map(|&l| (l as f64 / 0.8).exp()).collect();
    let total: f64 = w.iter().sum();
    for (i, &c) in counts.iter().enumerate() {
        let freq = c as f64 / draws as f64;
        assert!(
            (freq - w[i] / total).abs() < 0.03,
            "token {i}: {freq} vs {}",
            w[i] / total
        );
    }
    let by_pos: std::collections::HashSet<u32> = (0..14).map(|pos| s.sample(p(42), pos)).collect();
    assert!(by_pos.len() >= 4, "positions give {by_pos:?}");
}

/// min-p, top-p and top-k never return a token outside their f64-computed sets, and every
/// token of the set shows up over many draws.
#[test]
fn sample_filters_exclude_unlikely_tokens() {
    // probabilities ∝ 8, 4, 2, 1, 0.5, 0.25, … (logits ln 2 apart)
    let vocab = 12;
    let logits: Vec<f32> = (0..vocab)
        .map(|i| -(i as f32) * std::f32::consts::LN_2)
        .collect();
    let s = Sampler::new(&logits, vocab, &[0; 4]);
    let cases = [
        // p_i ≥ 0.1·p_0 keeps 8, 4, 2, 1 (0.5 < 0.8)
        (
            SamplingParams {
                min_p: 0.1,
                ..params(1.0)
            },
            4,
        ),
        // cumulative 8/16 = 0.5, 12/16 = 0.75, 14/16 = 0.875 ≥ 0.8
        (
            SamplingParams {
                top_p: 0.8,
                ..params(1.0)
            },
            3,
        ),
        (
            SamplingParams {
                top_k: 2,
                ..params(1.0)
            },
            2,
        ),
        // filters at temperature 1 even when sampling hotter (mlx-lm)
        (
            SamplingParams {
                top_p: 0.8,
                ..params(3.0)
            },
            3,
        ),
    ];
    for (p, allowed) in cases {
        let mut seen = [false; 12];
        for seed in 0..400 {
            let t = s.sample(SamplingParams { seed, ..p }, 1) as usize;
            assert!(t < allowed, "{p:?} drew token {t}");
            seen[t] = true;
        }
        assert!(
            seen[..allowed].iter().all(|&x| x),
            "{p:?}: not all allowed tokens drawn: {seen:?}"
        );
    }
}

/// The repetition penalty flips the greedy pick exactly when the repeated token is inside
/// the window, for positive and negative logits.
#[test]
fn repetition_penalty_changes_argmax_when_it_should() {
    let greedy = |window| SamplingParams {
        repetition_penalty: 1.5,
        repetition_window: window,
        ..params(0.0)
    };
    // token 2 leads (2.0 vs 1.8); 2.0 / 1.5 < 1.8
    let positive = Sampler::new(&[0.1, 1.8, 2.0, -1.0], 4, &[2, 0, 0, 3, 3, 0]);
    assert_eq!(positive.sample(params(0.0), 4), 2);
    assert_eq!(
        positive.sample(greedy(5), 4),
        1,
        "token 2 at position 0 is in a 5-token window"
    );
    assert_eq!(
        positive.sample(greedy(4), 4),
        2,
        "token 2 at position 0 is outside a 4-token window"
    );
    // all negative: token 0 leads (−0.10 vs −0.12); −0.10 · 1.5 < −0.12
    let negative = Sampler::new(&[-0.10, -0.12, -3.0], 3, &[1, 0, 0, 0]);
    assert_eq!(negative.sample(greedy(1), 2), 1);
    assert_eq!(
        negative.sample(greedy(0), 2),
        0,
        "an empty window changes nothing"
    );
}

/// A position whose token is past the history is an error; a pick at the history's last
/// slot is not written, without error.
#[test]
fn sample_history_bounds() {
    let s = Sampler::new(&[0.0, 1.0, 0.5], 3, &[0; 4]);
    assert_eq!(s.sample(params(0.0), 3), 1);
    assert_eq!(s.history.to_vec::<u32>().unwrap(), vec![0; 4]);
    s.pos.write(&[4u32]).unwrap();
    let mut enc = CommandEncoder::new(&s.dev);
    ops::sample(
        &mut enc,
        params(0.0),
        &s.logits,
        &s.pos,
        &s.token,
        &s.history,
    )
    .unwrap();
    assert!(enc.commit().is_err());
}

/// A linear layer with no input columns is refused when it is made, naming it.
#[test]
fn linear_without_columns_is_an_error() {
    let dev = Device::cpu();
    let w = dev.zeros(&[4, 0], mlx_native::DType::F32).unwrap();
    let layout = mlx_native::quant::WeightLayout::Dense;
    let err = ops::Linear::new("proj", layout, vec![w], None, 4, 0).unwrap_err();
    assert!(
        err.to_string().contains("`proj`: rows of 0 columns"),
        "{err}"
    );
}
