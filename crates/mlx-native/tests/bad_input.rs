//! Bad input reaching the engine from a user: each is a clear error naming what is wrong,
//! never a panic.

use std::path::{Path, PathBuf};

use mlx_native::engine::{load_model, GenerateOptions, Session};
use mlx_native::{Device, Error, SamplingParams};

fn shared() -> PathBuf {
    match std::env::var_os("MLXN_SHARED_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"),
    }
}

fn mlx_dir() -> PathBuf {
    shared().join("models/smollm2-135m-instruct-4bit")
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mlxn-bad-input-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A copy of the demo checkpoint directory with `config.json` replaced (shards linked).
fn checkpoint_with_config(name: &str, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let dir = temp_dir(name);
    for entry in std::fs::read_dir(mlx_dir()).unwrap() {
        let entry = entry.unwrap();
        let target = dir.join(entry.file_name());
        if entry.file_name() != "config.json" && !target.exists() {
            std::os::unix::fs::symlink(entry.path(), target).unwrap();
        }
    }
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(mlx_dir().join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec(&config).unwrap(),
    )
    .unwrap();
    dir
}

fn load_err(path: &Path) -> Error {
    match load_model(path, &Device::cpu(), &mut |_, _| {}) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e,
    }
}

#[test]
fn prompt_past_the_context_is_an_error() {
    let loaded = load_model(&mlx_dir(), &Device::cpu(), &mut |_, _| {}).unwrap();
    let mut session = Session::new(loaded.model, &Device::cpu(), 16).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 8,
        sampling: SamplingParams::default(),
        stop_ids: vec![],
        use_graph: true,
    };
    let prompt = vec![100u32; 12];
    let err = session.generate(&prompt, &opts, |_| true).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ContextOverflow {
                prompt: 12,
                max_new: 8,
                context: 16
            }
        ),
        "{err}"
    );
    let err = session
        .prefill(&[100u32; 17], SamplingParams::default())
        .unwrap_err();
    assert!(
        err.to_string().contains("exceeds the context length 16"),
        "{err}"
    );
}

#[test]
fn unsupported_model_type_names_the_supported_ones() {
    let dir = checkpoint_with_config("model-type", |c| c["model_type"] = "mamba".into());
    let msg = load_err(&dir).to_string();
    assert!(msg.contains("mamba") && msg.contains("llama"), "{msg}");
}

#[test]
fn config_disagreeing_with_the_weights_names_the_tensor() {
    let dir = checkpoint_with_config("hidden", |c| c["intermediate_size"] = 1600.into());
    let err = load_err(&dir);
    assert!(matches!(err, Error::TensorShape { .. }), "{err}");
    assert!(
        err.to_string().contains("model.layers.0.mlp.gate_proj"),
        "{err}"
    );
}

#[test]
fn unknown_quantization_is_an_error() {
    let dir = checkpoint_with_config("bits", |c| c["quantization"]["bits"] = 7.into());
    let err = load_err(&dir);
    assert!(err.to_string().contains("bits=7"), "{err}");
}

#[test]
fn missing_and_truncated_files_are_errors() {
    let err = load_err(Path::new("/nonexistent/model.gguf"));
    assert!(err.to_string().contains("/nonexistent/model.gguf"), "{err}");
    // The GGUF cut at a few points: header, metadata, tensor infos, data.
    let gguf = std::fs::read(shared().join("models/smollm2-135m-instruct-q4_1.gguf")).unwrap();
    let dir = temp_dir("truncated");
    for cut in [3, 100, 2_000_000, gguf.len() / 2, gguf.len() - 1] {
        let path = dir.join(format!("cut-{cut}.gguf"));
        std::fs::write(&path, &gguf[..cut]).unwrap();
        let msg = load_err(&path).to_string();
        assert!(
            msg.contains(&path.display().to_string()),
            "cut {cut}: {msg}"
        );
    }
    // A checkpoint whose shard lost its tail.
    let dir = checkpoint_with_config("shard", |_| {});
    let shard = "model-00002-of-00003.safetensors";
    let bytes = std::fs::read(mlx_dir().join(shard)).unwrap();
    std::fs::remove_file(dir.join(shard)).unwrap();
    std::fs::write(dir.join(shard), &bytes[..bytes.len() - 1000]).unwrap();
    let msg = load_err(&dir).to_string();
    assert!(msg.contains(shard), "{msg}");
}

#[test]
fn absent_gpu_is_a_clear_error() {
    if let Err(e) = Device::parse("cuda:7") {
        assert!(
            matches!(e, Error::DeviceUnavailable(_) | Error::Cuda(_)),
            "{e}"
        );
        assert!(e.to_string().contains("cuda:7"), "{e}");
    }
    let err = Device::parse("tpu").unwrap_err();
    assert!(err.to_string().contains("tpu"), "{err}");
}
