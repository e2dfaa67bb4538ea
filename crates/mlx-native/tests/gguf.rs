//! GGUF parsing and ggml block formats: the shared SmolLM2 file, synthetic files made by a
//! small writer (including malformed ones), and the block formats' reference math.

use std::path::PathBuf;

use half::f16;
use mlx_native::engine::load_model;
use mlx_native::formats::gguf::{GgufFile, GgufValue};
use mlx_native::quant::ggml::{dequantize_row, quantize_row};
use mlx_native::quant::GgmlType;
use mlx_native::{ops, CommandEncoder, DType, Device, Error};

mod common;
use common::k_scale_min;

fn shared_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/models/smollm2-135m-instruct-q4_1.gguf")
}

/// Deterministic values in [-1, 1) (splitmix64).
fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    random(n, seed)
        .iter()
        .map(|v| ((v + 1.0) * 128.0) as u8)
        .collect()
}

// ---------------------------------------------------------------------------------------
// The shared SmolLM2-135M-Instruct Q4_1 file.

#[test]
fn smollm2_metadata() {
    let f = GgufFile::open(shared_model()).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 32);
    assert_eq!(f.architecture().unwrap(), "llama");
    assert_eq!(f.get_u32("llama.block_count").unwrap(), 30);
    assert_eq!(f.get_u32("llama.embedding_length").unwrap(), 576);
    assert_eq!(f.get_u32("llama.feed_forward_length").unwrap(), 1536);
    assert_eq!(f.get_u32("llama.attention.head_count").unwrap(), 9);
    assert_eq!(f.get_u32("llama.attention.head_count_kv").unwrap(), 3);
    assert_eq!(f.get_u32("llama.context_length").unwrap(), 8192);
    assert_eq!(f.get_u32("llama.rope.dimension_count").unwrap(), 64);
    assert_eq!(f.get_f32("llama.rope.freq_base").unwrap(), 100000.0);
    let eps = f.get_f32("llama.attention.layer_norm_rms_epsilon").unwrap();
    assert!((eps - 1e-5).abs() < 1e-9, "{eps}");
    assert_eq!(
        f.metadata("general.languages"),
        Some(&GgufValue::Array(vec![GgufValue::String("en".into())]))
    );
    assert_eq!(f.opt_u32("llama.expert_count").unwrap(), None);

    let vocab = f.vocab().unwrap();
    assert_eq!(vocab.model, "gpt2");
    assert_eq!(vocab.pre.as_deref(), Some("smollm"));
    assert_eq!(vocab.tokens.len(), 49152);
    assert_eq!(
        &vocab.tokens[..3],
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    );
    assert_eq!(vocab.token_types.len(), 49152);
    assert_eq!(&vocab.token_types[..3], [3, 3, 3]);
    assert!(vocab.scores.is_empty());
    assert_eq!(vocab.merges.len(), 48900);
    assert_eq!(vocab.merges[0], "Ġ t");
    assert_eq!(
        (vocab.bos, vocab.eos, vocab.add_bos),
        (Some(1), Some(2), false)
    );

    let template = f.chat_template().unwrap();
    assert!(template.contains("<|im_start|>") && template.contains("add_generation_prompt"));
}

#[test]
fn smollm2_tensors() {
    let f = GgufFile::open(shared_model()).unwrap();
    assert_eq!(f.tensor_names().count(), 2 + 30 * 9);
    let info = |name: &str| f.tensor_info(name).unwrap();
    assert_eq!(info("token_embd.weight").ggml_type, GgmlType::Q8_0);
    assert_eq!(info("token_embd.weight").dims, [576, 49152]);
    assert_eq!(info("blk.0.attn_q.weight").ggml_type, GgmlType::Q4_1);
    assert_eq!(info("blk.0.attn_q.weight").dims, [576, 576]);
    assert_eq!(info("blk.0.attn_k.weight").dims, [576, 192]);
    assert_eq!(info("blk.29.ffn_down.weight").dims, [1536, 576]);
    for norm in [
        "blk.0.attn_norm.weight",
        "blk.17.ffn_norm.weight",
        "output_norm.weight",
    ] {
        assert_eq!(info(norm).ggml_type, GgmlType::F32);
        assert_eq!(info(norm).dims, [576]);
    }
    // Tied embeddings: no separate output matrix.
    assert!(f.tensor_info("output.weight").is_none());

    let device = Device::cpu();
    let embd = f.load_linear(&device, "token_embd.weight").unwrap();
    assert_eq!(
        (embd.n, embd.k, embd.ggml_type()),
        (49152, 576, Some(GgmlType::Q8_0))
    );
    assert_eq!(embd.weight_bytes(), 49152 * 576 / 32 * 34);
    let down = f.load_linear(&device, "blk.3.ffn_down.weight").unwrap();
    assert_eq!((down.n, down.k), (576, 1536));
    assert_eq!(
        down.tensors[0].to_vec::<u8>().unwrap(),
        f.tensor_data("blk.3.ffn_down.weight").unwrap()
    );

    let norm = f.load_vector_f32(&device, "output_norm.weight").unwrap();
    let raw = f.tensor_data("output_norm.weight").unwrap();
    let want: Vec<f32> = raw
        .chunks(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(norm.to_vec::<f32>().unwrap(), want);

    assert!(matches!(
        f.load_linear(&device, "output_norm.weight"),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        f.load_linear(&device, "no.such.tensor"),
        Err(Error::MissingTensor { .. })
    ));
}

/// llama.cpp's quantizers map each block's extremes onto the end codes, so requantizing
/// their dequantized values with ours must give back the file's bytes: a check of both
/// directions against real data.
#[test]
fn smollm2_blocks_requantize_to_the_same_bytes() {
    let f = GgufFile::open(shared_model()).unwrap();
    for (name, t, k) in [
        ("token_embd.weight", GgmlType::Q8_0, 576),
        ("blk.0.attn_q.weight", GgmlType::Q4_1, 576),
        ("blk.12.ffn_down.weight", GgmlType::Q4_1, 1536),
    ] {
        let data = f.tensor_data(name).unwrap();
        let mut row = vec![0.0; k];
        // Every 97th row, to keep the test short.
        for bytes in data.chunks(t.row_bytes(k)).step_by(97) {
            dequantize_row(t, bytes, &mut row).unwrap();
            assert!(row.iter().all(|v| v.is_finite()));
            assert_eq!(quantize_row(t, &row).unwrap(), bytes, "{name}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Block formats.

/// Largest |x − dequantize(quantize(x))| per block, with the bound the format guarantees.
fn roundtrip(t: GgmlType, x: &[f32]) -> Vec<f32> {
    let bytes = quantize_row(t, x).unwrap();
    assert_eq!(bytes.len(), t.row_bytes(x.len()));
    let mut back = vec![0.0; x.len()];
    dequantize_row(t, &bytes, &mut back).unwrap();
    x.iter().zip(&back).map(|(a, b)| (a - b).abs()).collect()
}

#[test]
fn simple_formats_roundtrip_within_their_bounds() {
    let x: Vec<f32> = random(32 * 7, 1).iter().map(|v| v * 3.0 + 0.5).collect();
    for t in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
    ] {
        let err = roundtrip(t, &x);
        for (block, err) in x.chunks(32).zip(err.chunks(32)) {
            let max = block.iter().copied().fold(f32::MIN, f32::max);
            let min = block.iter().copied().fold(f32::MAX, f32::min);
            let amax = max.max(-min);
            // Half a step, plus f16 rounding of the scales (2⁻¹¹ relative).
            let bound = match t {
                // The extreme value maps to −8 (−16), so the other side clips at 7 (15): up to
                // a step.
                GgmlType::Q4_0 => amax / 8.0,
                GgmlType::Q4_1 => (max - min) / 15.0 / 2.0 + amax * 2e-3,
                GgmlType::Q5_0 => amax / 16.0,
                GgmlType::Q5_1 => (max - min) / 31.0 / 2.0 + amax * 2e-3,
                _ => amax / 127.0 / 2.0 + amax * 1e-3,
            };
            let worst = err.iter().copied().fold(0.0, f32::max);
            assert!(worst <= bound * 1.001, "{t:?}: error {worst} > {bound}");
        }
    }
    for t in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
        let err = roundtrip(t, &x[..37]);
        let bound = match t {
            GgmlType::F32 => 0.0,
            GgmlType::F16 => 4.0 * 2f32.powi(-11),
            _ => 4.0 * 2f32.powi(-8),
        };
        assert!(err.iter().all(|&e| e <= bound), "{t:?}");
    }
}

#[test]
fn k_quants_roundtrip_within_their_bounds() {
    let x: Vec<f32> = random(256 * 3, 2).iter().map(|v| v * 2.0 - 0.3).collect();
    let rms = (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32).sqrt();
    // Uniform values over a range of 4 (rms ≈ 1.17): rounding error alone is step/√12 rms,
    // 0.066 for Q4_K's 15 steps per range, 0.032 for Q5_K's 31, 0.018 for Q6_K's ~63.
    for (t, rel_rms, step) in [
        (GgmlType::Q4K, 0.08, 15.0),
        (GgmlType::Q5K, 0.04, 31.0),
        (GgmlType::Q6K, 0.025, 63.0),
    ] {
        let err = roundtrip(t, &x);
        let err_rms = (err.iter().map(|e| e * e).sum::<f32>() / err.len() as f32).sqrt();
        assert!(
            err_rms / rms < rel_rms,
            "{t:?}: relative rms error {}",
            err_rms / rms
        );
        // No element off by more than ~a step of its sub-block's range.
        for (block, err) in x.chunks(16).zip(err.chunks(16)) {
            let range = block.iter().fold(0.0f32, |m, v| m.max(v.abs())) * 2.0;
            let worst = err.iter().copied().fold(0.0, f32::max);
            assert!(worst <= 1.5 * range / step + 0.02, "{t:?}: {worst}");
        }
    }
}

fn f16_bytes(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_le_bytes()
}

#[test]
fn simple_formats_decode_in_ggml_element_order() {
    // Byte j of qs holds element j (low nibble) and element j + 16 (high nibble).
    let qs: Vec<u8> = (0..16u8).map(|j| j | ((15 - j) << 4)).collect();
    let mut q4_0 = f16_bytes(0.5).to_vec();
    q4_0.extend(&qs);
    let mut q4_1 = [f16_bytes(0.5), f16_bytes(-2.0)].concat();
    q4_1.extend(&qs);
    let mut out = vec![0.0; 32];
    dequantize_row(GgmlType::Q4_0, &q4_0, &mut out).unwrap();
    for j in 0..16 {
        assert_eq!(out[j], 0.5 * (j as f32 - 8.0));
        assert_eq!(out[j + 16], 0.5 * (7.0 - j as f32));
    }
    dequantize_row(GgmlType::Q4_1, &q4_1, &mut out).unwrap();
    for j in 0..16 {
        assert_eq!(out[j], 0.5 * j as f32 - 2.0);
        assert_eq!(out[j + 16], 0.5 * (15 - j) as f32 - 2.0);
    }
    // Q5_0 / Q5_1: the same nibbles, and bit j of the little-endian word qh above element j.
    let qh: u32 = 0b1011_0000_1111_0000_0101_0011_1000_0001;
    let mut q5_0 = f16_bytes(0.5).to_vec();
    q5_0.extend(qh.to_le_bytes());
    q5_0.extend(&qs);
    let mut q5_1 = [f16_bytes(0.5), f16_bytes(-2.0)].concat();
    q5_1.extend(qh.to_le_bytes());
    q5_1.extend(&qs);
    let code = |j: usize| {
        let nibble = if j < 16 { j } else { 31 - j };
        (nibble + 16 * ((qh >> j) & 1) as usize) as f32
    };
    dequantize_row(GgmlType::Q5_0, &q5_0, &mut out).unwrap();
    for (j, &v) in out.iter().enumerate() {
        assert_eq!(v, 0.5 * (code(j) - 16.0), "Q5_0 element {j}");
    }
    dequantize_row(GgmlType::Q5_1, &q5_1, &mut out).unwrap();
    for (j, &v) in out.iter().enumerate() {
        assert_eq!(v, 0.5 * code(j) - 2.0, "Q5_1 element {j}");
    }
    let mut q8_0 = f16_bytes(0.25).to_vec();
    q8_0.extend((0..32).map(|j| (j as i8 * 4 - 64) as u8));
    dequantize_row(GgmlType::Q8_0, &q8_0, &mut out).unwrap();
    for (j, &v) in out.iter().enumerate() {
        assert_eq!(v, 0.25 * (j as f32 * 4.0 - 64.0));
    }
}

/// ggml's Q4_K and Q5_K decoding loops, restated independently of the library: Q5_K's bit `is`
/// (the sub-block) of qh[l] adds 16 to element l's code.
fn k_quant_reference(b: &[u8], five_bits: bool) -> Vec<f32> {
    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
    let dmin = f16::from_le_bytes([b[2], b[3]]).to_f32();
    let scale_min = |j: usize| {
        let (s, m) = k_scale_min(&b[4..16], j);
        (s as f32, m as f32)
    };
    let qh = &b[16..48];
    let fifth = |l: usize, bit: usize| match five_bits && qh[l] & (1 << bit) != 0 {
        true => 16,
        false => 0,
    };
    let mut y = Vec::new();
    let mut q = &b[if five_bits { 48 } else { 16 }..];
    let mut is = 0;
    for _ in (0..256).step_by(64) {
        let (s1, m1) = scale_min(is);
        let (s2, m2) = scale_min(is + 1);
        y.extend((0..32).map(|l| d * s1 * ((q[l] & 0xF) + fifth(l, is)) as f32 - dmin * m1));
        y.extend((0..32).map(|l| d * s2 * ((q[l] >> 4) + fifth(l, is + 1)) as f32 - dmin * m2));
        q = &q[32..];
        is += 2;
    }
    y
}

/// ggml's Q6_K decoding loop, restated independently of the library.
fn q6_k_reference(b: &[u8]) -> Vec<f32> {
    let d = f16::from_le_bytes([b[208], b[209]]).to_f32();
    let mut y = vec![0.0; 256];
    for half in 0..2 {
        let (ql, qh) = (&b[64 * half..], &b[128 + 32 * half..]);
        let sc = &b[192 + 8 * half..];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |i: usize| sc[i] as i8 as f32;
            let y = &mut y[128 * half..];
            y[l] = d * s(is) * q1 as f32;
            y[l + 32] = d * s(is + 2) * q2 as f32;
            y[l + 64] = d * s(is + 4) * q3 as f32;
            y[l + 96] = d * s(is + 6) * q4 as f32;
        }
    }
    y
}

#[test]
fn k_quants_decode_like_ggml_on_random_blocks() {
    for seed in 0..4 {
        let mut q4k = random_bytes(144, 10 + seed);
        q4k[..2].copy_from_slice(&f16_bytes(0.013));
        q4k[2..4].copy_from_slice(&f16_bytes(0.007));
        let mut q5k = random_bytes(176, 30 + seed);
        q5k[..2].copy_from_slice(&f16_bytes(0.011));
        q5k[2..4].copy_from_slice(&f16_bytes(0.005));
        let mut q6k = random_bytes(210, 20 + seed);
        q6k[208..].copy_from_slice(&f16_bytes(0.021));
        for (t, block, want) in [
            (GgmlType::Q4K, &q4k, k_quant_reference(&q4k, false)),
            (GgmlType::Q5K, &q5k, k_quant_reference(&q5k, true)),
            (GgmlType::Q6K, &q6k, q6_k_reference(&q6k)),
        ] {
            let mut got = vec![0.0; 256];
            dequantize_row(t, block, &mut got).unwrap();
            assert_eq!(got, want, "{t:?}");
        }
    }
}

/// Random Q5_0, Q5_1 and Q5_K blocks beside gguf-py's numpy dequantization of them
/// (tools/make_q5_blocks_fixture.py): read through the loader (type ids 6, 7 and 13), they
/// must decode to exactly gguf-py's values, and the CPU matmul over them must match an f64
/// product with those values.
#[test]
fn q5_blocks_decode_like_gguf_py() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/q5_blocks.gguf");
    let f = GgufFile::open(path).unwrap();
    let device = Device::cpu();
    for (name, t, k) in [
        ("q5_0", GgmlType::Q5_0, 96),
        ("q5_1", GgmlType::Q5_1, 160),
        ("q5_k", GgmlType::Q5K, 512),
    ] {
        let n = 5;
        let info = f.tensor_info(name).unwrap();
        assert_eq!((info.ggml_type, &info.dims[..]), (t, &[k, n][..]), "{name}");
        let want: Vec<f32> = f
            .tensor_data(&format!("{name}.dequantized"))
            .unwrap()
            .chunks(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(want.len(), n * k);
        let data = f.tensor_data(name).unwrap();
        let mut row = vec![0.0; k];
        for (r, bytes) in data.chunks(t.row_bytes(k)).enumerate() {
            dequantize_row(t, bytes, &mut row).unwrap();
            assert_eq!(row, want[r * k..(r + 1) * k], "{name} row {r}");
        }

        // x [3, k] · Wᵀ on the CPU backend, against f64 sums of gguf-py's values.
        let m = 3;
        let x = random(m * k, 40 + t.id() as u64);
        let w = f.load_linear(&device, name).unwrap();
        let xt = device.from_slice(&x, &[m, k]).unwrap();
        let out = device.zeros(&[m, n], DType::F32).unwrap();
        let mut enc = CommandEncoder::new(&device);
        ops::matmul(&mut enc, &xt, &w, &out).unwrap();
        enc.commit_and_wait().unwrap();
        let got = out.to_vec::<f32>().unwrap();
        for i in 0..m {
            for j in 0..n {
                let terms = (0..k).map(|e| x[i * k + e] as f64 * want[j * k + e] as f64);
                let (sum, size) = terms.fold((0.0, 0.0), |(s, a), p| (s + p, a + p.abs()));
                let g = got[i * n + j] as f64;
                assert!(
                    (g - sum).abs() <= 1e-5 * size,
                    "{name} matmul [{i}, {j}]: {g} vs {sum}"
                );
            }
        }
    }
}

#[test]
fn rows_of_the_wrong_length_are_errors() {
    let mut out = vec![0.0; 64];
    assert!(dequantize_row(GgmlType::Q4_0, &[0; 35], &mut out).is_err());
    assert!(dequantize_row(GgmlType::Q4K, &[0; 144], &mut out).is_err());
    assert!(quantize_row(GgmlType::Q8_0, &[0.0; 33]).is_err());
    assert_eq!(
        GgmlType::from_id(GgmlType::Q6K.id()).unwrap(),
        GgmlType::Q6K
    );
    // Q3_K: a ggml type mlx-native does not read.
    assert!(matches!(
        GgmlType::from_id(11),
        Err(Error::UnsupportedQuant(_))
    ));
}

// ---------------------------------------------------------------------------------------
// Synthetic files.

/// Builds GGUF bytes: metadata entries and tensors, laid out as llama.cpp does.
struct Writer {
    version: u32,
    alignment: usize,
    kv: Vec<u8>,
    kv_count: u64,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

impl Writer {
    fn new() -> Self {
        Writer {
            version: 3,
            alignment: 32,
            kv: Vec::new(),
            kv_count: 0,
            tensors: Vec::new(),
        }
    }

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    /// A metadata entry with an already-encoded value of type `ty`.
    fn raw(mut self, key: &str, ty: u32, value: &[u8]) -> Self {
        Self::string(&mut self.kv, key);
        self.kv.extend(ty.to_le_bytes());
        self.kv.extend(value);
        self.kv_count += 1;
        self
    }

    fn u32(self, key: &str, v: u32) -> Self {
        self.raw(key, 4, &v.to_le_bytes())
    }

    fn str(self, key: &str, v: &str) -> Self {
        let mut value = Vec::new();
        Self::string(&mut value, v);
        self.raw(key, 8, &value)
    }

    fn str_array(self, key: &str, items: &[&str]) -> Self {
        let mut value = 8u32.to_le_bytes().to_vec();
        value.extend((items.len() as u64).to_le_bytes());
        for s in items {
            Self::string(&mut value, s);
        }
        self.raw(key, 9, &value)
    }

    fn tensor(mut self, name: &str, dims: &[u64], t: GgmlType, data: Vec<u8>) -> Self {
        self.tensors
            .push((name.into(), dims.to_vec(), t.id(), data));
        self
    }

    fn bytes_with_offsets(&self, offsets: Option<&[u64]>) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend(self.kv_count.to_le_bytes());
        out.extend(&self.kv);
        let mut offset = 0u64;
        let mut placed = Vec::new();
        for (i, (name, dims, ty, data)) in self.tensors.iter().enumerate() {
            Self::string(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.to_le_bytes());
            let at = offsets.map_or(offset, |o| o[i]);
            out.extend(at.to_le_bytes());
            placed.push(at);
            offset = (offset + data.len() as u64).next_multiple_of(self.alignment as u64);
        }
        out.resize(out.len().next_multiple_of(self.alignment), 0);
        let start = out.len();
        for ((_, _, _, data), at) in self.tensors.iter().zip(placed) {
            let at = start + at as usize;
            if out.len() < at + data.len() {
                out.resize(at + data.len(), 0);
            }
            out[at..at + data.len()].copy_from_slice(data);
        }
        out
    }

    fn bytes(&self) -> Vec<u8> {
        self.bytes_with_offsets(None)
    }
}

/// Writes `bytes` to a temporary file, opens it, removes the file.
fn open_bytes(tag: &str, bytes: &[u8]) -> mlx_native::Result<GgufFile> {
    let path = std::env::temp_dir().join(format!("mlxn-gguf-{}-{tag}.gguf", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    let result = GgufFile::open(&path);
    std::fs::remove_file(&path).unwrap();
    result
}

/// Writes `w` to a temporary file, loads it as a model, removes the file, and returns the
/// field and reason of the config error the load must give (`what` names the case).
fn config_error(tag: &str, w: &Writer, what: &str) -> (String, String) {
    let path = std::env::temp_dir().join(format!("mlxn-gguf-{}-{tag}.gguf", std::process::id()));
    std::fs::write(&path, w.bytes()).unwrap();
    let result = load_model(&path, &Device::cpu(), &mut |_, _| {});
    std::fs::remove_file(&path).unwrap();
    match result {
        Err(Error::Config { field, reason, .. }) => (field, reason),
        Err(other) => panic!("{what}: expected a config error, got {other}"),
        Ok(_) => panic!("{what} loaded"),
    }
}

fn malformed_reason(result: mlx_native::Result<GgufFile>) -> String {
    match result {
        Err(Error::Malformed {
            format: "gguf",
            reason,
            ..
        }) => reason,
        Err(other) => panic!("expected a malformed-gguf error, got {other}"),
        Ok(_) => panic!("expected a malformed-gguf error, the file opened"),
    }
}

/// A small valid file: every value type, nested arrays, a vocabulary and three tensors.
fn sample() -> (Writer, Vec<f32>, Vec<f32>) {
    let weights = random(3 * 64, 5);
    let norm = random(64, 6);
    let q4: Vec<u8> = weights
        .chunks(64)
        .flat_map(|r| quantize_row(GgmlType::Q4_0, r).unwrap())
        .collect();
    let mut nested = 9u32.to_le_bytes().to_vec();
    nested.extend(2u64.to_le_bytes());
    for inner in [[1i16, -2].as_slice(), &[3]] {
        nested.extend(3u32.to_le_bytes());
        nested.extend((inner.len() as u64).to_le_bytes());
        inner.iter().for_each(|v| nested.extend(v.to_le_bytes()));
    }
    let mut floats = 6u32.to_le_bytes().to_vec();
    floats.extend(3u64.to_le_bytes());
    [0.0f32, -1.5, 2.25]
        .iter()
        .for_each(|v| floats.extend(v.to_le_bytes()));
    let mut types = 5u32.to_le_bytes().to_vec();
    types.extend(3u64.to_le_bytes());
    [3i32, 1, 1]
        .iter()
        .for_each(|v| types.extend(v.to_le_bytes()));
    let writer = Writer::new()
        .str("general.architecture", "llama")
        .u32("llama.block_count", 2)
        .raw("t.u8", 0, &[200])
        .raw("t.i8", 1, &[0xFF])
        .raw("t.u16", 2, &60000u16.to_le_bytes())
        .raw("t.i16", 3, &(-3i16).to_le_bytes())
        .raw("t.i32", 5, &(-7i32).to_le_bytes())
        .raw("t.f32", 6, &0.5f32.to_le_bytes())
        .raw("t.bool", 7, &[1])
        .raw("t.u64", 10, &(1u64 << 40).to_le_bytes())
        .raw("t.i64", 11, &(-9i64).to_le_bytes())
        .raw("t.f64", 12, &2.5f64.to_le_bytes())
        .raw("t.nested", 9, &nested)
        .str("tokenizer.ggml.model", "llama")
        .str_array("tokenizer.ggml.tokens", &["<unk>", "<s>", "hi"])
        .raw("tokenizer.ggml.scores", 9, &floats)
        .raw("tokenizer.ggml.token_type", 9, &types)
        .u32("tokenizer.ggml.bos_token_id", 1)
        .str("tokenizer.chat_template", "{{ messages }}")
        .tensor("w", &[64, 3], GgmlType::Q4_0, q4)
        .tensor(
            "norm",
            &[64],
            GgmlType::F16,
            quantize_row(GgmlType::F16, &norm).unwrap(),
        )
        .tensor("empty", &[0], GgmlType::F32, Vec::new());
    (writer, weights, norm)
}

#[test]
fn synthetic_file_roundtrips() {
    let (writer, weights, norm) = sample();
    let f = open_bytes("sample", &writer.bytes()).unwrap();
    let value = |k: &str| f.metadata(k).unwrap().clone();
    assert_eq!(value("t.u8"), GgufValue::U8(200));
    assert_eq!(value("t.i8"), GgufValue::I8(-1));
    assert_eq!(value("t.u16"), GgufValue::U16(60000));
    assert_eq!(value("t.i16"), GgufValue::I16(-3));
    assert_eq!(value("t.i32"), GgufValue::I32(-7));
    assert_eq!(value("t.f32"), GgufValue::F32(0.5));
    assert_eq!(value("t.bool"), GgufValue::Bool(true));
    assert_eq!(value("t.u64"), GgufValue::U64(1 << 40));
    assert_eq!(value("t.i64"), GgufValue::I64(-9));
    assert_eq!(value("t.f64"), GgufValue::F64(2.5));
    use GgufValue::{Array, I16};
    assert_eq!(
        value("t.nested"),
        Array(vec![Array(vec![I16(1), I16(-2)]), Array(vec![I16(3)])])
    );
    assert_eq!(f.metadata_keys().count(), 19);

    // Typed getters widen integers and floats; the wrong kind is a config error naming the key.
    assert_eq!(f.get_u32("t.u16").unwrap(), 60000);
    assert_eq!(f.get_u64("t.u64").unwrap(), 1 << 40);
    assert_eq!(f.get_f32("t.f64").unwrap(), 2.5);
    assert!(f.get_bool("t.bool").unwrap());
    for (result, key) in [
        (f.get_u32("t.i32").map(|_| ()), "t.i32"),
        (f.get_u32("t.u64").map(|_| ()), "t.u64"),
        (f.get_str("t.f32").map(|_| ()), "t.f32"),
        (f.get_str_array("t.nested").map(|_| ()), "t.nested"),
        (f.get_f32("missing.key").map(|_| ()), "missing.key"),
    ] {
        match result {
            Err(Error::Config { field, .. }) => assert_eq!(field, key),
            other => panic!("{key}: {other:?}"),
        }
    }

    let vocab = f.vocab().unwrap();
    assert_eq!(vocab.tokens, ["<unk>", "<s>", "hi"]);
    assert_eq!(vocab.scores, [0.0, -1.5, 2.25]);
    assert_eq!(vocab.token_types, [3, 1, 1]);
    assert_eq!(
        (vocab.bos, vocab.eos, vocab.pre.as_deref()),
        (Some(1), None, None)
    );
    // SentencePiece vocabularies add a BOS unless the file says otherwise.
    assert!(vocab.add_bos);
    assert!(vocab.merges.is_empty());
    assert_eq!(f.chat_template().as_deref(), Some("{{ messages }}"));

    let device = Device::cpu();
    let w = f.load_linear(&device, "w").unwrap();
    assert_eq!((w.n, w.k, w.ggml_type()), (3, 64, Some(GgmlType::Q4_0)));
    let bytes = w.tensors[0].to_vec::<u8>().unwrap();
    let mut row = vec![0.0; 64];
    for (i, want) in weights.chunks(64).enumerate() {
        dequantize_row(GgmlType::Q4_0, &bytes[i * 36..(i + 1) * 36], &mut row).unwrap();
        let amax = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(row
            .iter()
            .zip(want)
            .all(|(a, b)| (a - b).abs() <= amax / 8.0));
    }
    let got = f
        .load_vector_f32(&device, "norm")
        .unwrap()
        .to_vec::<f32>()
        .unwrap();
    assert!(got.iter().zip(&norm).all(|(a, b)| (a - b).abs() <= 1e-3));
    assert_eq!(f.tensor_info("empty").unwrap().range.len(), 0);
}

#[test]
fn custom_alignment_is_honoured() {
    let (mut writer, ..) = sample();
    writer = writer.u32("general.alignment", 64);
    writer.alignment = 64;
    let f = open_bytes("align64", &writer.bytes()).unwrap();
    assert_eq!(f.alignment(), 64);
    assert!(f.tensors().iter().all(|t| t.range.start % 64 == 0));
    assert_eq!(f.tensor_data("norm").unwrap().len(), 128);

    let bad = sample().0.u32("general.alignment", 48).bytes();
    assert!(malformed_reason(open_bytes("align48", &bad)).contains("general.alignment"));
    let huge = Writer::new()
        .raw("general.alignment", 10, &(1u64 << 63).to_le_bytes())
        .tensor("t", &[8], GgmlType::F32, vec![0; 32])
        .bytes();
    assert!(malformed_reason(open_bytes("align-huge", &huge)).contains("past the end"));
}

#[test]
fn every_truncation_is_a_clear_error() {
    let bytes = sample().0.bytes();
    for len in 0..bytes.len() {
        let reason = malformed_reason(open_bytes("cut", &bytes[..len]));
        assert!(
            reason.contains("truncated")
                || reason.contains("past the end")
                || reason.contains("cannot fit"),
            "cut at {len}: {reason}"
        );
    }
    assert!(open_bytes("whole", &bytes).is_ok());
}

/// Any single corrupted byte gives a file that opens or an error, never a panic, and what
/// opens can be used.
#[test]
fn corrupted_bytes_never_panic() {
    let bytes = sample().0.bytes();
    let device = Device::cpu();
    for i in 0..bytes.len() {
        for value in [0x00, 0x80, 0xFF] {
            let mut corrupt = bytes.clone();
            corrupt[i] = value;
            let Ok(f) = open_bytes("corrupt", &corrupt) else {
                continue;
            };
            let _ = f.vocab();
            let _ = f.chat_template();
            let _ = f.load_linear(&device, "w");
            let _ = f.load_vector_f32(&device, "norm");
        }
    }
}

#[test]
fn bad_headers_are_errors() {
    let mut bytes = sample().0.bytes();
    bytes[..4].copy_from_slice(b"GGUG");
    assert!(malformed_reason(open_bytes("magic", &bytes)).contains("magic"));

    for version in [1u32, 4, 3u32.swap_bytes()] {
        let mut writer = sample().0;
        writer.version = version;
        let reason = malformed_reason(open_bytes("version", &writer.bytes()));
        assert!(reason.contains(&format!("version {version}")), "{reason}");
    }
    let mut v2 = sample().0;
    v2.version = 2;
    assert_eq!(open_bytes("v2", &v2.bytes()).unwrap().version(), 2);

    // Counts the file cannot hold are rejected before anything is allocated for them.
    let mut bytes = sample().0.bytes();
    bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(malformed_reason(open_bytes("kv-count", &bytes)).contains("cannot fit"));
    let mut bytes = sample().0.bytes();
    bytes[8..16].copy_from_slice(&(1u64 << 50).to_le_bytes());
    assert!(malformed_reason(open_bytes("tensor-count", &bytes)).contains("cannot fit"));
}

#[test]
fn bad_metadata_is_an_error_naming_the_key() {
    let mut huge_array = 0u32.to_le_bytes().to_vec();
    huge_array.extend((1u64 << 60).to_le_bytes());
    let mut huge_string = (1u64 << 62).to_le_bytes().to_vec();
    huge_string.extend(b"abc");
    let mut deep = Vec::new();
    for _ in 0..64 {
        deep.extend(9u32.to_le_bytes());
        deep.extend(1u64.to_le_bytes());
    }
    deep.extend(0u32.to_le_bytes());
    deep.extend(0u64.to_le_bytes());
    for (tag, ty, value, expect) in [
        ("huge-array", 9, huge_array, "cannot fit"),
        ("huge-string", 8, huge_string, "cannot fit"),
        ("bad-type", 13, vec![0; 8], "unknown value type 13"),
        ("bad-bool", 7, vec![2], "bool"),
        (
            "not-utf8",
            8,
            [2u64.to_le_bytes().as_slice(), &[0xC3, 0x28]].concat(),
            "UTF-8",
        ),
        ("deep", 9, deep, "nested"),
    ] {
        let bytes = Writer::new().raw("the.key", ty, &value).bytes();
        let reason = malformed_reason(open_bytes(tag, &bytes));
        assert!(
            reason.contains("`the.key`") && reason.contains(expect),
            "{tag}: {reason}"
        );
    }
    let twice = Writer::new().u32("a", 1).u32("a", 2).bytes();
    assert!(malformed_reason(open_bytes("dup-key", &twice)).contains("`a` appears twice"));
}

#[test]
fn bad_tensor_records_are_errors_naming_the_tensor() {
    let data = vec![0u8; 36];
    let one = |dims: &[u64], t: GgmlType, data: Vec<u8>| {
        Writer::new().tensor("bad.weight", dims, t, data)
    };

    let reason = malformed_reason(open_bytes("past-eof", &{
        let mut b = one(&[64, 1], GgmlType::Q4_0, data.clone()).bytes();
        b.truncate(b.len() - 1);
        b
    }));
    assert!(
        reason.contains("`bad.weight`") && reason.contains("past the end"),
        "{reason}"
    );

    // The record of "bad.weight" (the only tensor): its type id, then its data offset.
    let type_at = 24 + 8 + "bad.weight".len() + 4 + 2 * 8;
    let mut far = one(&[64, 1], GgmlType::Q4_0, data.clone()).bytes();
    far[type_at + 4..type_at + 12].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let reason = malformed_reason(open_bytes("far", &far));
    assert!(
        reason.contains("`bad.weight`") && reason.contains("past the end"),
        "{reason}"
    );

    let reason = malformed_reason(open_bytes(
        "misaligned",
        &one(&[64, 1], GgmlType::Q4_0, data.clone()).bytes_with_offsets(Some(&[8])),
    ));
    assert!(
        reason.contains("`bad.weight`") && reason.contains("alignment"),
        "{reason}"
    );

    let reason = malformed_reason(open_bytes(
        "five-dims",
        &one(&[1, 1, 1, 1, 32], GgmlType::Q4_0, vec![0; 18]).bytes(),
    ));
    assert!(
        reason.contains("`bad.weight`") && reason.contains("5 dimensions"),
        "{reason}"
    );

    let reason = malformed_reason(open_bytes(
        "partial-block",
        &one(&[48, 1], GgmlType::Q4_0, data.clone()).bytes(),
    ));
    assert!(
        reason.contains("`bad.weight`") && reason.contains("block size"),
        "{reason}"
    );

    let reason = malformed_reason(open_bytes(
        "overflow",
        &one(&[1 << 62, 1 << 62], GgmlType::F32, vec![]).bytes(),
    ));
    assert!(
        reason.contains("`bad.weight`") && reason.contains("overflow"),
        "{reason}"
    );

    let two = Writer::new()
        .tensor("a", &[64], GgmlType::F32, vec![0; 256])
        .tensor("b", &[64], GgmlType::F32, vec![0; 256]);
    let reason = malformed_reason(open_bytes(
        "overlap",
        &two.bytes_with_offsets(Some(&[0, 128])),
    ));
    assert!(
        reason.contains("`a`") && reason.contains("`b`") && reason.contains("overlap"),
        "{reason}"
    );

    let same = Writer::new()
        .tensor("a", &[8], GgmlType::F32, vec![0; 32])
        .tensor("a", &[8], GgmlType::F32, vec![0; 32]);
    assert!(malformed_reason(open_bytes("dup-tensor", &same.bytes())).contains("`a` appears twice"));

    let mut unknown = one(&[64, 1], GgmlType::Q4_0, data).bytes();
    unknown[type_at..type_at + 4].copy_from_slice(&11u32.to_le_bytes()); // Q3_K
    match open_bytes("unknown-type", &unknown) {
        Err(Error::UnsupportedQuant(msg)) => {
            assert!(msg.contains("`bad.weight`") && msg.contains("11"), "{msg}")
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
}

#[test]
fn inconsistent_vocabularies_are_config_errors() {
    let base = || {
        Writer::new()
            .str("tokenizer.ggml.model", "gpt2")
            .str_array("tokenizer.ggml.tokens", &["a", "b"])
    };
    let mut types = 5u32.to_le_bytes().to_vec();
    types.extend(3u64.to_le_bytes());
    [1i32, 1, 1]
        .iter()
        .for_each(|v| types.extend(v.to_le_bytes()));
    for (tag, writer, field) in [
        (
            "types",
            base().raw("tokenizer.ggml.token_type", 9, &types),
            "tokenizer.ggml.token_type",
        ),
        (
            "eos",
            base().u32("tokenizer.ggml.eos_token_id", 2),
            "tokenizer.ggml.eos_token_id",
        ),
        (
            "model",
            Writer::new().str_array("tokenizer.ggml.tokens", &["a"]),
            "tokenizer.ggml.model",
        ),
    ] {
        match open_bytes(tag, &writer.bytes()).unwrap().vocab() {
            Err(Error::Config { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{tag}: {other:?}"),
        }
    }
    let ok = open_bytes("gpt2", &base().bytes())
        .unwrap()
        .vocab()
        .unwrap();
    assert!(!ok.add_bos);
}

/// A `rope_freqs.weight` (Llama 3.x files carry one period factor per rotated pair; tests/
/// families.rs loads such a file) of another length, or beside a RoPE scaling type, is a
/// config error naming the tensor.
#[test]
fn rope_freqs_that_do_not_fit_are_config_errors() {
    let f32_bytes = |v: f32| v.to_le_bytes();
    // Head dim 64 / 4 = 16: 8 rotated pairs.
    for (pairs, scaling, says) in [(7, None, "7 factors"), (8, Some("linear"), "together with")] {
        let mut w = Writer::new()
            .str("general.architecture", "llama")
            .u32("llama.embedding_length", 64)
            .u32("llama.block_count", 1)
            .u32("llama.attention.head_count", 4)
            .u32("llama.feed_forward_length", 96)
            .u32("llama.vocab_size", 10)
            .raw(
                "llama.attention.layer_norm_rms_epsilon",
                6,
                &f32_bytes(1e-5),
            );
        if let Some(kind) = scaling {
            w = w.str("llama.rope.scaling.type", kind).raw(
                "llama.rope.scaling.factor",
                6,
                &f32_bytes(2.0),
            );
        }
        let factors: Vec<u8> = (0..pairs).flat_map(|_| f32_bytes(1.0)).collect();
        let w = w.tensor("rope_freqs.weight", &[pairs as u64], GgmlType::F32, factors);
        let what = format!("{pairs} factors");
        let (field, reason) = config_error(&format!("rope-freqs-{pairs}"), &w, &what);
        assert_eq!(field, "rope_freqs.weight");
        assert!(reason.contains(says), "{reason}");
    }
}

/// Mixture-of-experts metadata that llama.cpp's qwen3moe and llama builders would not run as
/// mlx-native does (a token's experts past the count, shared experts, another gating function)
/// is a config error naming the key.
#[test]
fn moe_metadata_that_does_not_fit_is_a_config_error() {
    let cases = [
        ("qwen3moe.expert_used_count", 5, "5 experts a token of 4"),
        ("qwen3moe.expert_shared_count", 1, "shared experts"),
        ("qwen3moe.expert_gating_func", 2, "gating function 2"),
    ];
    for (key, value, says) in cases {
        let mut w = Writer::new()
            .str("general.architecture", "qwen3moe")
            .u32("qwen3moe.embedding_length", 64)
            .u32("qwen3moe.block_count", 1)
            .u32("qwen3moe.attention.head_count", 4)
            .u32("qwen3moe.feed_forward_length", 96)
            .u32("qwen3moe.vocab_size", 10)
            .u32("qwen3moe.expert_count", 4)
            .raw(
                "qwen3moe.attention.layer_norm_rms_epsilon",
                6,
                &1e-5f32.to_le_bytes(),
            );
        if key != "qwen3moe.expert_used_count" {
            w = w.u32("qwen3moe.expert_used_count", 2);
        }
        let what = format!("{key} = {value}");
        let (field, reason) = config_error(&format!("moe-{value}"), &w.u32(key, value), &what);
        assert_eq!(field, key);
        assert!(reason.contains(says), "{reason}");
    }
}

/// Stacked experts (`ffn_*_exps`, dims [k, n, experts]) load as one byte row an expert, each
/// expert a view of its own blocks; a tensor of other rank, or of no experts, is an error
/// naming it.
#[test]
fn stacked_experts_load_as_stored() {
    let (k, n, experts) = (64usize, 3usize, 4usize);
    let t = GgmlType::Q8_0;
    let rows: Vec<Vec<f32>> = (0..experts * n)
        .map(|r| random(k, 100 + r as u64))
        .collect();
    let blocks: Vec<u8> = rows
        .iter()
        .flat_map(|row| quantize_row(t, row).unwrap())
        .collect();
    let dims = [k as u64, n as u64, experts as u64];
    let file = Writer::new()
        .tensor("blk.0.ffn_up_exps.weight", &dims, t, blocks.clone())
        .tensor(
            "flat",
            &[k as u64, n as u64],
            t,
            blocks[..t.row_bytes(k) * n].to_vec(),
        )
        .tensor("none", &[k as u64, n as u64, 0], t, Vec::new());
    let file = open_bytes("experts", &file.bytes()).unwrap();
    let device = Device::cpu();
    let w = file
        .load_experts(&device, "blk.0.ffn_up_exps.weight")
        .unwrap();
    assert_eq!((w.experts, w.n, w.k), (experts, n, k));
    assert_eq!(w.expert_bytes(), n * t.row_bytes(k));
    let expert = w.expert(2).unwrap();
    let got = expert.tensors[0].to_vec::<u8>().unwrap();
    assert_eq!(got, blocks[2 * n * t.row_bytes(k)..3 * n * t.row_bytes(k)]);
    match file.load_experts(&device, "flat") {
        Err(Error::Invalid(reason)) => assert!(reason.contains("`flat`"), "{reason}"),
        Err(other) => panic!("expected an invalid-tensor error, got {other}"),
        Ok(_) => panic!("a matrix loaded as stacked experts"),
    }
    match file.load_experts(&device, "none") {
        Err(Error::Invalid(reason)) => assert!(reason.contains("stacks no experts"), "{reason}"),
        Err(other) => panic!("expected an invalid-tensor error, got {other}"),
        Ok(_) => panic!("a stack of no experts loaded"),
    }
}

/// A Gemma sliding-window pattern given as one bool a layer must have one for every layer.
#[test]
fn gemma_window_pattern_of_the_wrong_length_is_a_config_error() {
    let key = "gemma3.attention.sliding_window_pattern";
    // An array (type 9) of three bools (type 7) for two layers.
    let mut flags = 7u32.to_le_bytes().to_vec();
    flags.extend(3u64.to_le_bytes());
    flags.extend([1u8, 0, 1]);
    let w = Writer::new()
        .str("general.architecture", "gemma3")
        .u32("gemma3.embedding_length", 64)
        .u32("gemma3.block_count", 2)
        .u32("gemma3.attention.head_count", 4)
        .u32("gemma3.feed_forward_length", 96)
        .u32("gemma3.vocab_size", 10)
        .u32("gemma3.attention.sliding_window", 8)
        .raw(
            "gemma3.attention.layer_norm_rms_epsilon",
            6,
            &1e-6f32.to_le_bytes(),
        )
        .raw(key, 9, &flags);
    let what = "a pattern of 3 flags for 2 layers";
    let (field, reason) = config_error("gemma-pattern", &w, what);
    assert_eq!(field, key);
    assert!(reason.contains("3 flags for 2 layers"), "{reason}");
}

/// Phi-3's LongRoPE factors must be one a rotated pair, and a stated attention factor must be
/// the one LongRoPE implies (√(1 + ln 8 / ln 512) here), or the file is a config error naming
/// the tensor or key.
#[test]
fn long_rope_that_does_not_fit_is_a_config_error() {
    let f32_bytes = |v: f32| v.to_le_bytes();
    // Head dim 64 / 4 = 16, all rotated: 8 pairs.
    let cases = [
        (7, 1.1547, "rope_factors_long.weight", "7 factors"),
        (8, 1.0, "phi3.rope.scaling.attn_factor", "LongRoPE implies"),
    ];
    for (pairs, attn_factor, key, says) in cases {
        let factors: Vec<u8> = (0..pairs).flat_map(|_| f32_bytes(1.5)).collect();
        let w = Writer::new()
            .str("general.architecture", "phi3")
            .u32("phi3.embedding_length", 64)
            .u32("phi3.block_count", 1)
            .u32("phi3.attention.head_count", 4)
            .u32("phi3.feed_forward_length", 96)
            .u32("phi3.vocab_size", 10)
            .u32("phi3.context_length", 4096)
            .u32("phi3.rope.scaling.original_context_length", 512)
            .raw("phi3.rope.scaling.attn_factor", 6, &f32_bytes(attn_factor))
            .raw("phi3.attention.layer_norm_rms_epsilon", 6, &f32_bytes(1e-5))
            .tensor(
                "rope_factors_long.weight",
                &[pairs as u64],
                GgmlType::F32,
                factors,
            );
        let what = format!("{pairs} factors, attention factor {attn_factor}");
        let (field, reason) = config_error(&format!("long-rope-{pairs}"), &w, &what);
        assert_eq!(field, key);
        assert!(reason.contains(says), "{reason}");
    }
}
