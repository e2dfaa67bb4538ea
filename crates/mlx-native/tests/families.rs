//! Every supported architecture against mlx-lm itself. Each fixture in
//! `tests/fixtures/families/<model_type>_<bits>bit` is a tiny random-weight model built,
//! quantized and saved by mlx-lm (tools/make_family_fixtures.py), with mlx-lm's logits for
//! a 12-token prompt followed by its 8-token greedy continuation, teacher-forced (19 rows).
//!
//! The reference ran in float32 (float parameters cast up, quantized values unchanged), so
//! our float32 forward pass is held to a tight tolerance: through the prefill (12 rows at
//! once: batched matmuls, causal and sliding-window masks inside one chunk), through graph-
//! replayed decode steps along the greedy path (tokens must equal mlx-lm's), and one token at
//! a time from position 0 (every position through the decode path). The reference from the
//! checkpoint's own dtype (float16/bfloat16) is only reported: its rounding, not ours,
//! dominates that difference.

use std::path::{Path, PathBuf};
use std::time::Duration;

use mlx_native::core::encoder::CommandEncoder;
use mlx_native::engine::{load_decoder, GenerateOptions, Session, SUPPORTED_MODEL_TYPES};
use mlx_native::formats::safetensors::SafetensorsFile;
use mlx_native::models::family::decoder_params;
use mlx_native::ops::{matmul, Linear, RopeScaling, RopeTable};
use mlx_native::quant::{ggml, mlx_affine, GgmlType, WeightLayout};
use mlx_native::{DType, Device, Error, SamplingParams, Tensor};

/// Largest |ours − mlx-lm float32| allowed on any logit. Measured (2026-11-26): at most
/// 1.0e-5 over all fixtures (logits of order 1–10). Kept tight on purpose: Gemma 3's
/// bfloat16-rounded embedding scale, if left unrounded, moves logits by 5e-4.
const LOGIT_TOLERANCE: f32 = 1e-4;
/// The same on the CUDA backend: other reduction orders, fast-math intrinsics, and a prompt of
/// 9 rows or more (these are 12) multiplied on tensor cores, x and the dequantized weights
/// rounded to f16 (unit roundoff 2^−11). With the f32 tiles the fixtures' prompts took before,
/// 1e-3 held; on the tensor cores the MLX fixtures' worst errors read 4.0e-4 (gemma3_text_4bit)
/// to 8.95e-3 (phi3_4bit; H200, 2026-11-28), the GGUF twins' (f32 weights, f32 tiles) at most
/// 1.8e-5. A wrong tile or fragment is off by O(1), and the greedy tokens must agree.
const LOGIT_TOLERANCE_CUDA: f32 = 2e-2;

/// `tests/fixtures/families/{name}` of this crate, or of `$MLXN_CRATE_DIR` where the test
/// binary was moved (the GPU machine).
fn fixture_dir(name: &str) -> PathBuf {
    let crate_dir = match std::env::var_os("MLXN_CRATE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")),
    };
    crate_dir.join("tests/fixtures/families").join(name)
}

struct Reference {
    prompt: Vec<u32>,
    greedy: Vec<u32>,
    /// Teacher-forced logits of prompt + greedy[..7], one row per position.
    logits_f32: Vec<Vec<f32>>,
    /// The same from mlx-lm run in the checkpoint's dtype.
    logits_native: Vec<Vec<f32>>,
}

fn rows(file: &SafetensorsFile, name: &str) -> Vec<Vec<f32>> {
    let t = file.load(&Device::cpu(), name).unwrap();
    let vocab = t.last_dim();
    t.to_f32_vec()
        .unwrap()
        .chunks(vocab)
        .map(<[f32]>::to_vec)
        .collect()
}

fn reference(dir: &Path) -> Reference {
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    let ids = |key: &str| -> Vec<u32> {
        meta[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };
    let file = SafetensorsFile::open(dir.join("reference.safetensors")).unwrap();
    Reference {
        prompt: ids("prompt_ids"),
        greedy: ids("greedy_ids"),
        logits_f32: rows(&file, "logits_f32"),
        logits_native: rows(&file, "logits_native"),
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// Runs one fixture on the CPU; returns the largest logit error against the float32 reference.
fn check(name: &str) -> f32 {
    check_on(name, &Device::cpu(), LOGIT_TOLERANCE)
}

fn check_on(name: &str, device: &Device, tolerance: f32) -> f32 {
    check_model(name, &fixture_dir(name), device, tolerance)
}

/// Runs `model` (a checkpoint directory or GGUF file) against fixture `name`'s references.
fn check_model(name: &str, model: &Path, device: &Device, tolerance: f32) -> f32 {
    let device = device.clone();
    let r = reference(&fixture_dir(name));
    let greedy = SamplingParams::default();
    let n = r.prompt.len();
    let mut worst = 0f32;
    let mut worst_native = 0f32;
    let mut compare = |what: &str, pos: usize, logits: &[f32]| {
        let err = max_abs_diff(logits, &r.logits_f32[pos]);
        worst = worst.max(err);
        worst_native = worst_native.max(max_abs_diff(logits, &r.logits_native[pos]));
        assert!(
            err <= tolerance,
            "{name} {what}, position {pos}: max |logit - mlx-lm| = {err}"
        );
    };

    // f32 KV caches, as the float32 run keeps them (the default for f16 and bf16 checkpoints
    // with head dims over 64 is f16: reference_smollm2.rs checks those against mlx-lm).
    // Prefill the prompt, then decode greedily (graph replay) along mlx-lm's path.
    let decoder = load_decoder(model, &device, &mut |_, _| {}).unwrap();
    let mut session = Session::with_kv_dtype(decoder, &device, 32, DType::F32).unwrap();
    let mut tokens = vec![session.prefill(&r.prompt, greedy).unwrap()];
    compare("prefill", n - 1, &session.logits().unwrap());
    for step in 1..r.greedy.len() {
        let pos = n + step - 1;
        tokens.push(session.decode_step(pos, greedy, true).unwrap());
        compare("decode", pos, &session.logits().unwrap());
    }
    assert_eq!(tokens, r.greedy, "{name}: greedy continuation");

    // Every position one token at a time, from a fresh session (direct execution).
    let decoder = load_decoder(model, &device, &mut |_, _| {}).unwrap();
    let mut session = Session::with_kv_dtype(decoder, &device, 32, DType::F32).unwrap();
    let seq: Vec<u32> = r.prompt.iter().chain(&r.greedy).copied().collect();
    for (pos, &token) in seq[..r.logits_f32.len()].iter().enumerate() {
        let next = session.step_with_token(token, pos, greedy, false).unwrap();
        let logits = session.logits().unwrap();
        assert_eq!(next, argmax(&logits));
        compare("token by token", pos, &logits);
    }
    let file = model
        .file_name()
        .map(|f| f.to_string_lossy())
        .unwrap_or_default();
    println!(
        "{name} ({file}): max |logit - mlx-lm| {worst:.2e} (float32 run), {worst_native:.3} (run in the checkpoint's dtype)"
    );
    worst
}

macro_rules! family_tests {
    ($($test:ident => $fixture:literal,)*) => {$(
        #[test]
        fn $test() {
            check($fixture);
        }
    )*};
}

/// Every fixture on the GPU, against the same mlx-lm references (skipped without a driver).
#[test]
fn every_fixture_on_cuda() {
    let device = match Device::parse("cuda") {
        Ok(d) => d,
        Err(e) => {
            println!("skipped: {e}");
            return;
        }
    };
    for entry in std::fs::read_dir(fixture_dir("")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        check_on(&name, &device, LOGIT_TOLERANCE_CUDA);
        let twin = fixture_dir(&name).join("twin.gguf");
        if twin.exists() {
            check_model(&name, &twin, &device, LOGIT_TOLERANCE_CUDA);
        }
    }
}

/// GGUF files: the twins (tools/make_gguf_family_twins.py) hold a fixture's weights as MLX
/// dequantizes them, in F32 under llama.cpp's tensor names and metadata (qwen2: q/k/v biases;
/// qwen3: its own head dim and per-head q/k norms; both rotate-half RoPE; llama: q/k rows in
/// interleaved pairs, and Llama 3 RoPE scaling as `rope_freqs.weight`, one period factor a
/// pair; qwen3moe and a Mixtral-style llama: routers and stacked experts as `ffn_*_exps`;
/// gemma2 and gemma3: norm weights with Gemma's + 1 added, sandwich norms under llama.cpp's
/// names, soft-caps, sliding windows and local RoPE base from the metadata; phi3: fused
/// `attn_qkv` and gate/up `ffn_up`, partial rotation, LongRoPE factor tensors), and must give
/// the fixture's mlx-lm logits.
#[test]
fn gguf_twins_match_mlx_lm() {
    let names = [
        "qwen2_4bit",
        "qwen3_4bit",
        "llama_8bit",
        "qwen3_moe_4bit",
        "mixtral_4bit",
        "gemma2_8bit",
        "gemma3_text_8bit",
        "phi3_4bit",
    ];
    for name in names {
        let twin = fixture_dir(name).join("twin.gguf");
        check_model(name, &twin, &Device::cpu(), LOGIT_TOLERANCE);
    }
}

/// Prefix reuse (a conversation's turns): a prompt that extends what the cache holds runs only
/// its new tokens and must give the logits of a full prefill. llama_4bit's teacher-forced
/// sequence (prompt, then mlx-lm's greedy tokens): a first turn on its first 5 tokens (3 new
/// tokens, the first 2 of which reach the cache), then the 12-token prompt (at least 5 reused),
/// then 15 tokens (exactly the 12 reused), against mlx-lm's logits; then a prompt that differs
/// at position 3 (3 reused) against a fresh session's full prefill; and no reuse when off.
fn check_prefix_reuse(device: &Device, tolerance: f32) {
    let name = "llama_4bit";
    let r = reference(&fixture_dir(name));
    let new_session = |reuse: bool| {
        let decoder = load_decoder(&fixture_dir(name), device, &mut |_, _| {}).unwrap();
        let mut session = Session::with_kv_dtype(decoder, device, 32, DType::F32).unwrap();
        session.set_prefix_reuse(reuse);
        session
    };
    let greedy = SamplingParams::default();
    let seq: Vec<u32> = r.prompt.iter().chain(&r.greedy).copied().collect();
    let mut session = new_session(true);
    let opts = GenerateOptions {
        max_new_tokens: 3,
        sampling: greedy,
        stop_ids: vec![],
        use_graph: true,
    };
    let (_, first) = session.generate(&seq[..5], &opts, |_| true).unwrap();
    assert_eq!(first.reused_tokens, 0);
    assert!(session.reusable_prefix(&seq[..12]) >= 5);
    for (len, reused) in [(12, None), (15, Some(12))] {
        if let Some(reused) = reused {
            assert_eq!(session.reusable_prefix(&seq[..len]), reused);
        }
        let token = session.prefill(&seq[..len], greedy).unwrap();
        let err = max_abs_diff(&session.logits().unwrap(), &r.logits_f32[len - 1]);
        assert!(
            err <= tolerance,
            "{len} tokens: max |logit - mlx-lm| = {err}"
        );
        assert_eq!(token, seq[len], "{len} tokens: greedy token");
    }
    let mut other = seq[..10].to_vec();
    other[3] = (other[3] + 1) % r.logits_f32[0].len() as u32;
    assert_eq!(session.reusable_prefix(&other), 3);
    let token = session.prefill(&other, greedy).unwrap();
    let reused_logits = session.logits().unwrap();
    let mut fresh = new_session(false);
    assert_eq!(fresh.prefill(&other, greedy).unwrap(), token);
    let err = max_abs_diff(&reused_logits, &fresh.logits().unwrap());
    assert!(
        err <= tolerance,
        "changed at 3: max |logit - full prefill| = {err}"
    );
    assert_eq!(fresh.reusable_prefix(&other), 0, "reuse off");
}

#[test]
fn prefix_reuse_matches_full_prefills() {
    check_prefix_reuse(&Device::cpu(), LOGIT_TOLERANCE);
}

/// The same on the GPU (skipped without a driver): the prefills from a reused prefix run at a
/// position past 0 with 3 to 7 rows.
#[test]
fn prefix_reuse_matches_full_prefills_on_cuda() {
    match Device::parse("cuda") {
        Ok(device) => check_prefix_reuse(&device, LOGIT_TOLERANCE_CUDA),
        Err(e) => println!("skipped: {e}"),
    }
}

/// `Session::prefill_device_time` replays the prompt's recorded forward pass: it leaves the
/// prompt's last logits (mlx-lm's), and a prefill after it runs as before.
fn check_prefill_replay(device: &Device, tolerance: f32) {
    let name = "llama_4bit";
    let r = reference(&fixture_dir(name));
    let decoder = load_decoder(&fixture_dir(name), device, &mut |_, _| {}).unwrap();
    let mut session = Session::with_kv_dtype(decoder, device, 32, DType::F32).unwrap();
    let len = r.prompt.len();
    assert!(session.prefill_device_time(&r.prompt, 3).unwrap() > Duration::ZERO);
    let err = max_abs_diff(&session.logits().unwrap(), &r.logits_f32[len - 1]);
    assert!(err <= tolerance, "replayed: max |logit - mlx-lm| = {err}");
    let token = session
        .prefill(&r.prompt, SamplingParams::default())
        .unwrap();
    assert_eq!(token, r.greedy[0]);
    assert!(session.prefill_device_time(&[], 1).is_err());
    assert!(session.prefill_device_time(&[1; 33], 1).is_err());
}

#[test]
fn prefill_replay_computes_the_prompt() {
    check_prefill_replay(&Device::cpu(), LOGIT_TOLERANCE);
}

#[test]
fn prefill_replay_computes_the_prompt_on_cuda() {
    match Device::parse("cuda") {
        Ok(device) => check_prefill_replay(&device, LOGIT_TOLERANCE_CUDA),
        Err(e) => println!("skipped: {e}"),
    }
}

family_tests! {
    llama_4bit_sliding_layers_biases_llama3_rope => "llama_4bit",
    llama_8bit_llama3_rope => "llama_8bit",
    mistral_4bit_unused_sliding_window => "mistral_4bit",
    mistral_8bit => "mistral_8bit",
    qwen2_4bit => "qwen2_4bit",
    qwen2_8bit => "qwen2_8bit",
    qwen3_4bit => "qwen3_4bit",
    qwen3_8bit => "qwen3_8bit",
    gemma2_4bit => "gemma2_4bit",
    gemma2_8bit => "gemma2_8bit",
    gemma3_text_4bit_tied => "gemma3_text_4bit",
    gemma3_text_8bit_untied => "gemma3_text_8bit",
    gemma3_multimodal_4bit_defaults => "gemma3_4bit",
    phi3_4bit => "phi3_4bit",
    phi3_8bit => "phi3_8bit",
    mixtral_4bit_top2_of_8_experts => "mixtral_4bit",
    mixtral_8bit => "mixtral_8bit",
    qwen3_moe_4bit_dense_layer_normalized_top3 => "qwen3_moe_4bit",
    qwen3_moe_8bit => "qwen3_moe_8bit",
}

#[test]
fn every_supported_model_type_has_a_fixture() {
    for model_type in SUPPORTED_MODEL_TYPES {
        assert!(
            fixture_dir(&format!("{model_type}_4bit")).is_dir(),
            "no fixture for {model_type}"
        );
    }
}

#[test]
fn unsupported_model_type_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("mlxn-families-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = fixture_dir("qwen2_4bit");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    config["model_type"] = "mamba".into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(src.join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    let err = load_decoder(&dir, &Device::cpu(), &mut |_, _| {}).err();
    std::fs::remove_dir_all(&dir).unwrap();
    match err {
        Some(Error::UnsupportedModel {
            model_type,
            supported,
        }) => {
            assert_eq!(model_type, "mamba");
            assert_eq!(supported, SUPPORTED_MODEL_TYPES.join(", "));
            for t in [
                "llama",
                "mistral",
                "qwen2",
                "qwen3",
                "gemma2",
                "gemma3_text",
                "gemma3",
                "phi3",
                "mixtral",
                "qwen3_moe",
            ] {
                assert!(supported.contains(t), "{supported}");
            }
        }
        other => panic!("expected UnsupportedModel, got {other:?}"),
    }
}

/// `n` values in [-1, 1) from a fixed LCG.
fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn run_matmul(device: &Device, x: &Tensor, w: &Linear) -> Vec<f32> {
    let out = device
        .from_slice(&vec![f32::NAN; x.rows() * w.n], &[x.rows(), w.n])
        .unwrap();
    let mut enc = CommandEncoder::new(device);
    matmul(&mut enc, x, w, &out).unwrap();
    enc.commit().unwrap();
    out.to_vec::<f32>().unwrap()
}

/// A fused projection split by `Linear::narrow_rows` (Phi-3's qkv_proj, gate_up_proj) gives
/// the same outputs as the matching columns of the whole product, in every weight layout.
#[test]
fn narrowed_rows_of_a_linear_match_the_whole_product() {
    let device = Device::cpu();
    let (m, n, k) = (3, 37, 64);
    let w = random(n * k, 1);
    let bias = device.from_slice(&random(n, 2), &[n]).unwrap();
    let x = device.from_slice(&random(m * k, 3), &[m, k]).unwrap();
    let dense: Vec<half::f16> = w.iter().map(|&v| half::f16::from_f32(v)).collect();
    let (q, scales, biases) = mlx_affine::quantize(&w, n, k, 4, 32).unwrap();
    let groups = k / 32;
    let ggml_type = GgmlType::Q4_0;
    let blocks: Vec<u8> = w
        .chunks(k)
        .flat_map(|row| ggml::quantize_row(ggml_type, row).unwrap())
        .collect();
    let linears = [
        (
            WeightLayout::Dense,
            vec![device.from_slice(&dense, &[n, k]).unwrap()],
        ),
        (
            WeightLayout::MlxAffine {
                bits: 4,
                group_size: 32,
            },
            vec![
                device.from_slice(&q, &[n, k / 8]).unwrap(),
                device.from_slice(&scales, &[n, groups]).unwrap(),
                device.from_slice(&biases, &[n, groups]).unwrap(),
            ],
        ),
        (
            WeightLayout::Gguf(ggml_type),
            vec![device.from_slice(&blocks, &[blocks.len()]).unwrap()],
        ),
    ];
    for (layout, tensors) in linears {
        let whole = Linear::new("w", layout, tensors, Some(bias.clone()), n, k).unwrap();
        let full = run_matmul(&device, &x, &whole);
        for (start, len) in [(0, 13), (13, 11), (24, 13), (5, 1)] {
            let part = whole.narrow_rows(start, len).unwrap();
            assert_eq!((part.n, part.k), (len, k));
            let got = run_matmul(&device, &x, &part);
            for row in 0..m {
                for j in 0..len {
                    let want = full[row * n + start + j];
                    let err = (got[row * len + j] - want).abs();
                    assert!(
                        err <= 1e-5 * want.abs().max(1.0),
                        "{layout:?} rows {start}..{}: [{row}, {j}] {} vs {want}",
                        start + len,
                        got[row * len + j]
                    );
                }
            }
        }
        assert!(whole.narrow_rows(30, 8).is_err());
    }
}

/// A fixture's config.json with `edit` applied, read as `model_type` would be.
fn edited_params(fixture: &str, edit: impl Fn(&mut serde_json::Value)) -> mlx_native::Result<()> {
    let path = fixture_dir(fixture).join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut config);
    let model_type = config["model_type"].as_str().unwrap().to_string();
    decoder_params(&model_type, &config, &path).map(|p| assert!(p.is_some()))
}

fn assert_config_error(result: mlx_native::Result<()>, field: &str, reason_part: &str) {
    match result {
        Err(Error::Config {
            field: f, reason, ..
        }) => {
            assert_eq!(f, field);
            assert!(reason.contains(reason_part), "{reason}");
        }
        other => panic!("expected a config error on {field}, got {other:?}"),
    }
}

#[test]
fn family_config_errors_name_the_field() {
    assert!(edited_params("llama_4bit", |_| {}).is_ok());
    assert_config_error(
        edited_params("llama_4bit", |c| {
            c["layer_types"] = serde_json::json!(["full_attention"])
        }),
        "layer_types",
        "1 entries for 2 layers",
    );
    assert_config_error(
        edited_params("llama_4bit", |c| {
            c["layer_types"][0] = "chunked_attention".into()
        }),
        "layer_types",
        "unknown layer type `chunked_attention`",
    );
    assert_config_error(
        edited_params("llama_4bit", |c| {
            c["sliding_window"] = serde_json::Value::Null
        }),
        "sliding_window",
        "missing",
    );
    assert_config_error(
        edited_params("qwen3_4bit", |c| {
            c.as_object_mut().unwrap().remove("head_dim");
        }),
        "head_dim",
        "missing",
    );
    assert_config_error(
        edited_params("phi3_4bit", |c| c["rope_scaling"]["type"] = "yarn".into()),
        "rope_scaling.type",
        "unsupported RoPE scaling `yarn`",
    );
    assert_config_error(
        edited_params("gemma2_4bit", |c| c["num_key_value_heads"] = 3.into()),
        "num_key_value_heads",
        "does not divide",
    );
    // transformers >= 5 puts qwen3's rope_theta in rope_parameters.
    assert!(edited_params("qwen3_4bit", |c| {
        let theta = c.as_object_mut().unwrap().remove("rope_theta").unwrap();
        c["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": theta});
    })
    .is_ok());
}

#[test]
fn per_pair_factors_need_one_factor_per_rotated_pair() {
    let long_rope = |pairs: usize| RopeScaling::LongRope {
        long_factor: vec![1.5; pairs],
        max_position_embeddings: 4096,
        original_max_position_embeddings: 512,
    };
    let period_factors = |pairs: usize| RopeScaling::PeriodFactors {
        factors: vec![1.5; pairs],
    };
    let device = Device::cpu();
    for scaling in [long_rope, period_factors] {
        assert!(RopeTable::new(&device, 18, 1e4, &scaling(9)).is_ok());
        assert!(RopeTable::new(&device, 18, 1e4, &scaling(8)).is_err());
    }
}
