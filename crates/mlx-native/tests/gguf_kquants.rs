//! Files made by llama.cpp's own `llama-quantize` against their twins: the same tensors
//! dequantized by gguf-py's reference dequantizer, in F32 (tools/make_kquant_fixture.py). Read
//! by mlx-native, both must give the same logits and greedy tokens: its block decoding checked
//! against llama.cpp's bytes and an independent dequantizer, on the CPU and (when a driver is
//! present) on CUDA. The files: Q4_K_M (Q4_K matrices; Q6_K for the tied embedding, attn_v and
//! ffn_down); Q5_K_M of a llama with rows of 64 as well as 256 (Q5_K and Q6_K, and the
//! fallbacks Q5_1 and Q8_0); Q5_0 of the same llama (a Q6_K embedding).

use std::path::{Path, PathBuf};

use mlx_native::engine::{load_decoder, Session};
use mlx_native::{DType, Device, SamplingParams};

/// Both runs keep f32 activations, so only the order of the sums may differ: on the CPU the
/// two read bit-identical logits (2026-11-28). CUDA's kernels for matrices this small
/// (matvec.cu, the tiled prefill) keep x in f32 as well.
const TOLERANCE: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/kquants")
        .join(name)
}

/// Logits after a prompt, then after each of `steps` greedy decode steps, and the tokens.
fn run(model: &Path, device: &Device, steps: usize) -> (Vec<Vec<f32>>, Vec<u32>) {
    let prompt = [1u32, 17, 42, 99, 200, 3, 250, 77];
    let greedy = SamplingParams::default();
    let decoder = load_decoder(model, device, &mut |_, _| {}).unwrap();
    let mut session = Session::with_kv_dtype(decoder, device, 32, DType::F32).unwrap();
    let mut tokens = vec![session.prefill(&prompt, greedy).unwrap()];
    let mut logits = vec![session.logits().unwrap()];
    for step in 1..=steps {
        let pos = prompt.len() + step - 1;
        tokens.push(session.decode_step(pos, greedy, true).unwrap());
        logits.push(session.logits().unwrap());
    }
    (logits, tokens)
}

/// The quantized file `name` against its twin `twin`, for a vocabulary of `vocab`.
fn check(device: &Device, name: &str, twin: &str, vocab: usize) {
    let (quantized, tokens) = run(&fixture(name), device, 6);
    let (twin, twin_tokens) = run(&fixture(twin), device, 6);
    let mut worst = 0f32;
    for (step, (q, t)) in quantized.iter().zip(&twin).enumerate() {
        assert_eq!(q.len(), vocab);
        let diff = q
            .iter()
            .zip(t)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            diff <= TOLERANCE,
            "{name} step {step}: max |file − twin| = {diff}"
        );
        worst = worst.max(diff);
    }
    assert_eq!(tokens, twin_tokens, "{name}: greedy tokens");
    // The logits must move with the input, or equal runs of nothing would pass.
    let spread = quantized[0].iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(spread > 1e-3, "{name}: logits of order {spread}");
    println!(
        "{device:?} {name}: max |file − twin| {worst:.2e} over 7 positions, logits up to {spread:.3}"
    );
}

/// Every fixture, as (file, twin, vocabulary).
const FIXTURES: [(&str, &str, usize); 3] = [
    ("q4_k_m.gguf", "twin.gguf", 256),
    ("q5_k_m.gguf", "q5_k_m_twin.gguf", 64),
    ("q5_0.gguf", "q5_0_twin.gguf", 64),
];

fn check_all(device: &Device) {
    for (name, twin, vocab) in FIXTURES {
        check(device, name, twin, vocab);
    }
}

#[test]
fn quantized_files_match_their_f32_twins() {
    check_all(&Device::cpu());
}

#[test]
fn quantized_files_match_their_f32_twins_on_cuda() {
    match Device::parse("cuda") {
        Ok(device) => check_all(&device),
        Err(e) => println!("skipped: {e}"),
    }
}
