//! The `mlxn` binary end to end: JSON output with the reference tokens, a chat's turns reusing
//! the cache, and bad input reported as an error (exit 1), never a panic (exit 101).

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

fn mlxn(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mlxn"))
        .args(args)
        .output()
        .unwrap()
}

/// The JSON object a run printed, which must have succeeded.
fn success_json(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `mlxn bench` of `model` (`--model PATH` or `--synthetic NAME`): a 4-token prompt, 3 decode
/// steps, once, as JSON, with `extra` flags.
fn short_bench(model: &[&str], extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["bench"];
    args.extend(model);
    args.extend([
        "--prompt-lens",
        "4",
        "--decode",
        "3",
        "--reps",
        "1",
        "--json",
    ]);
    args.extend(extra);
    success_json(&mlxn(&args))
}

#[test]
fn generate_json_matches_the_mlx_lm_reference() {
    let reference: serde_json::Value = serde_json::from_slice(
        &std::fs::read(shared().join("reference/smollm2-135m-instruct-4bit.json")).unwrap(),
    )
    .unwrap();
    let case = &reference["cases"][2]; // "def fibonacci(n):", no near ties
    let model = shared().join("models/smollm2-135m-instruct-4bit");
    let out = mlxn(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        case["prompt"].as_str().unwrap(),
        "--max-tokens",
        "24",
        "--output",
        "json",
    ]);
    let json = success_json(&out);
    assert_eq!(json["prompt_ids"], case["prompt_ids"]);
    assert_eq!(json["generated_ids"], case["greedy_ids"]);
    assert_eq!(json["text"], case["greedy_text"]);
    assert!(json["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
}

/// `mlxn chat`: the second turn's prompt (the conversation rendered again) reuses the first
/// turn's prompt and the reply tokens it fed: each turn reports `prompt P tokens, R of them
/// cached` on stderr, with R = 0 first and then at least the first prompt's P.
#[test]
fn chat_turns_reuse_the_cache() {
    let model = shared().join("models/smollm2-135m-instruct-4bit");
    let mut child = Command::new(env!("CARGO_BIN_EXE_mlxn"))
        .args([
            "chat",
            "--model",
            model.to_str().unwrap(),
            "--max-tokens",
            "6",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"What is the capital of France?\nAnd of Italy?\n")
        .unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let turns: Vec<(usize, usize)> = stderr
        .lines()
        .filter_map(|l| {
            let (_, rest) = l.split_once("prompt ")?;
            let (prompt, rest) = rest.split_once(" tokens, ")?;
            let (cached, _) = rest.split_once(' ')?;
            Some((prompt.parse().ok()?, cached.parse().ok()?))
        })
        .collect();
    assert_eq!(turns.len(), 2, "{stderr}");
    let ((first, none), (second, reused)) = (turns[0], turns[1]);
    assert_eq!(none, 0, "{stderr}");
    assert!(reused >= first && reused < second, "{stderr}");
}

#[test]
fn bench_samples_when_given_a_temperature() {
    let json = short_bench(
        &["--synthetic", "smollm2-135m"],
        &["--temp", "0.8", "--top-k", "40"],
    );
    assert_eq!(json["temperature"].as_f64(), Some(0.8f32 as f64));
    assert_eq!(json["top_k"], 40);
    assert_eq!(json["decode_tokens"], 3);
    assert!(json["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    // Decode as a fraction of the bound: its bytes a second over the measured copy bandwidth.
    let field = |name: &str| json[name].as_f64().unwrap();
    let copy = field("copy_gb_per_s");
    assert!(copy.is_finite() && copy > 0.0, "copy bandwidth {copy}");
    let fraction = field("decode_bound_fraction");
    assert!((fraction - field("decode_gb_per_s") / copy).abs() <= 1e-9 * fraction);
    // Recording the prefill's forward pass is part of the prefill's time.
    let prefill_ms = 1e3 * field("prompt_tokens") / field("prefill_tokens_per_s");
    let record_ms = field("prefill_record_ms");
    assert!(
        record_ms > 0.0 && record_ms <= prefill_ms,
        "{record_ms} of {prefill_ms} ms"
    );
}

/// `bench` loads the network alone: a GGUF file with no tokenizer (llama.cpp's random-weight
/// files, here mlx-native's K-quant fixture) runs, and its weight bytes are the file's.
#[test]
fn bench_runs_a_gguf_file_without_a_tokenizer() {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../mlx-native/tests/fixtures/kquants/q4_k_m.gguf");
    let json = short_bench(&["--model", model.to_str().unwrap()], &[]);
    assert_eq!(json["decode_tokens"], 3);
    // One token reads every matrix once (the tied embedding as the lm head): less than the
    // file with its metadata, more than half of it.
    let bytes = json["weight_bytes_per_token"].as_f64().unwrap();
    let file = std::fs::metadata(&model).unwrap().len() as f64;
    assert!(bytes < file && bytes > file / 2.0, "{bytes} of {file}");
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let dir = std::env::temp_dir().join(format!("mlxn-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let garbage = dir.join("garbage.gguf");
    std::fs::write(&garbage, b"GGUF\x03\x00\x00\x00garbage").unwrap();
    let model = shared().join("models/smollm2-135m-instruct-4bit");
    let cases: Vec<Vec<&str>> = vec![
        vec![
            "generate",
            "--model",
            garbage.to_str().unwrap(),
            "--prompt",
            "hi",
        ],
        vec!["generate", "--model", "/nonexistent", "--prompt", "hi"],
        vec!["generate", "--model", model.to_str().unwrap()],
        vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "hi",
            "--device",
            "cuda:9",
        ],
        vec!["bench", "--synthetic", "llama-9000"],
    ];
    for args in cases {
        let out = mlxn(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
    }
}
