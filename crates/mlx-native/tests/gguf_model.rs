//! The SmolLM2-135M Q4_1 GGUF file run end to end: its greedy chat reply must be the one
//! MLX computes in float32 on an exact MLX twin of the file (the same quantized values,
//! tests/fixtures/gguf, made by tools/mlx_gguf_twin_greedy.py), token for token.
//!
//! The first reply token wins by a logit margin of only 0.08 ("The" over "L"): rounding
//! activations to 8 bits, as ggml's CPU kernels do, flips it and the model answers
//! "L'Étoile, …"; exact f32 products keep MLX's answer.

use std::path::PathBuf;

use mlx_native::engine::{load_model, GenerateOptions, Session};
use mlx_native::{Device, SamplingParams};

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn gguf_chat_reply_equals_mlx_f32_on_the_exact_twin() {
    let fixture = manifest().join("tests/fixtures/gguf/smollm2_q4_1_chat_greedy.json");
    let want: serde_json::Value = serde_json::from_slice(&std::fs::read(fixture).unwrap()).unwrap();
    let gguf = manifest().join("../../../shared/models/smollm2-135m-instruct-q4_1.gguf");
    let loaded = load_model(&gguf, &Device::cpu(), &mut |_, _| {}).unwrap();

    let message = want["message"].as_str().unwrap();
    let prompt = loaded.encode_chat(&[("user", message)]).unwrap();
    assert_eq!(prompt, ids(&want["prompt_ids"]));

    let want_ids = ids(&want["greedy_ids"]);
    let opts = GenerateOptions {
        max_new_tokens: 12,
        sampling: SamplingParams::default(),
        stop_ids: loaded.stop_ids.clone(),
        use_graph: true,
    };
    let tokenizer = loaded.tokenizer;
    let mut session = Session::new(loaded.model, &Device::cpu(), 64).unwrap();
    let (got, _) = session.generate(&prompt, &opts, |_| true).unwrap();
    let text = tokenizer.decode(&got, true).unwrap();
    assert_eq!(got, want_ids, "reply {text:?}");
    assert!(text.contains("Paris"), "reply {text:?}");
}
