//! MLX checkpoint, config, tokenizer and chat-template loading, checked against the shared
//! SmolLM2 checkpoint and its mlx-lm reference, plus malformed-input cases on tiny files.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use half::f16;
use mlx_native::core::dtype::{as_bytes, Element};
use mlx_native::formats::chat_template::{ChatTemplate, Message};
use mlx_native::formats::config::LlamaConfig;
use mlx_native::formats::mlx_checkpoint::MlxCheckpoint;
use mlx_native::formats::safetensors::SafetensorsFile;
use mlx_native::formats::tokenizer::{GgufVocab, TextStream, Tokenizer, TokenizerConfig};
use mlx_native::ops::RopeScaling;
use mlx_native::quant::WeightLayout;
use mlx_native::{DType, Device, Error};
use serde_json::{json, Value};

fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
}

fn model_dir() -> PathBuf {
    shared().join("models/smollm2-135m-instruct-4bit")
}

fn reference() -> Value {
    let path = shared().join("reference/smollm2-135m-instruct-4bit.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The first three elements of a float tensor, as f64 to compare with printed f16 values.
fn first3(t: &mlx_native::Tensor) -> Vec<f64> {
    t.to_f32_vec().unwrap()[..3]
        .iter()
        .map(|&x| x as f64)
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// A fresh directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("mlxn-formats-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One tensor for `safetensors_bytes`: name, file dtype, shape, raw little-endian bytes.
struct Raw {
    name: &'static str,
    dtype: &'static str,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn raw<T: Element>(name: &'static str, dtype: &'static str, shape: &[usize], values: &[T]) -> Raw {
    Raw {
        name,
        dtype,
        shape: shape.to_vec(),
        data: as_bytes(values).to_vec(),
    }
}

/// A safetensors file: tensors stored back to back after a header padded with spaces to
/// `header_len` bytes (so tests can choose aligned or unaligned data).
fn safetensors_bytes(tensors: &[Raw], header_len: Option<usize>) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "mlx"}));
    let mut offset = 0;
    for t in tensors {
        header.insert(
            t.name.into(),
            json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + t.data.len()]}),
        );
        offset += t.data.len();
    }
    let mut header = serde_json::to_vec(&Value::Object(header)).unwrap();
    let len = header_len.unwrap_or(header.len().div_ceil(8) * 8);
    assert!(len >= header.len());
    header.resize(len, b' ');
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    for t in tensors {
        out.extend_from_slice(&t.data);
    }
    out
}

/// A file with the given header length field, header text and data.
fn file_bytes(header_len: u64, header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = header_len.to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn f16s(values: &[f32]) -> Vec<f16> {
    values.iter().map(|&v| f16::from_f32(v)).collect()
}

/// Non-zero values that differ per element.
fn values(n: usize, seed: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 + seed) * 0.37).sin() + 0.01)
        .collect()
}

#[track_caller]
fn malformed_reason(err: Error) -> String {
    match err {
        Error::Malformed { format, reason, .. } => {
            assert_eq!(format, "safetensors");
            reason
        }
        other => panic!("expected Malformed, got {other:?}"),
    }
}

// ---------------------------------------------------------------- the shared checkpoint

#[test]
fn shared_checkpoint_tensors_and_quantization() {
    let dev = Device::cpu();
    let ckpt = MlxCheckpoint::open(model_dir()).unwrap();
    assert_eq!(
        ckpt.quant_for("model.layers.0.mlp.down_proj"),
        Some((4, 64))
    );
    let q = ckpt.quantization().unwrap();
    assert_eq!((q.bits, q.group_size), (4, 64));
    assert!(q.overrides.is_empty());

    // Values from mlx.core.load of the same shards.
    let w = ckpt
        .tensor(&dev, "model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    assert_eq!((w.dtype(), w.shape()), (DType::U32, &[576, 72][..]));
    let words = w.to_vec::<u32>().unwrap();
    assert_eq!(&words[..3], &[1235286666, 1519254424, 3197745531]);
    assert_eq!(&words[words.len() - 2..], &[2311834566, 4257876651]);
    let s = ckpt
        .tensor(&dev, "model.layers.0.self_attn.q_proj.scales")
        .unwrap();
    assert_eq!((s.dtype(), s.shape()), (DType::F16, &[576, 9][..]));
    assert_eq!(
        first3(&s),
        &[-0.1302490234375, 0.1258544921875, -0.1455078125]
    );
    let b = ckpt
        .tensor(&dev, "model.layers.0.self_attn.q_proj.biases")
        .unwrap();
    assert_eq!(first3(&b), &[1.171875, -1.1328125, 1.1640625]);
    // Other shards.
    let down = ckpt
        .tensor(&dev, "model.layers.29.mlp.down_proj.weight")
        .unwrap();
    assert_eq!(down.shape(), &[576, 192]);
    assert_eq!(
        &down.to_vec::<u32>().unwrap()[..3],
        &[1103928514, 1460197419, 2810959007]
    );
    let norm = ckpt.tensor(&dev, "model.norm.weight").unwrap();
    assert_eq!((norm.dtype(), norm.shape()), (DType::F16, &[576][..]));
    assert_eq!(first3(&norm), &[1.7578125, 1.8203125, 1.78125]);
    assert!(ckpt.has("model.layers.29.post_attention_layernorm.weight"));
    assert!(!ckpt.has("lm_head.weight"));

    let q_proj = ckpt
        .linear(&dev, "model.layers.0.self_attn.q_proj", 576, 576, false)
        .unwrap();
    assert_eq!(
        q_proj.layout,
        WeightLayout::MlxAffine {
            bits: 4,
            group_size: 64
        }
    );
    assert_eq!(q_proj.tensors.len(), 3);
    let down_proj = ckpt
        .linear(&dev, "model.layers.29.mlp.down_proj", 576, 1536, false)
        .unwrap();
    assert_eq!(down_proj.weight_bytes(), 576 * 192 * 4 + 2 * 576 * 24 * 2);
    let embed = ckpt
        .linear(&dev, "model.embed_tokens", 49152, 576, false)
        .unwrap();
    assert_eq!(embed.tensors[1].shape(), &[49152, 9]);
    assert_eq!(
        first3(&embed.tensors[1]),
        &[0.035797119140625, 0.037841796875, 0.0419921875]
    );

    // k that disagrees with the packed width.
    match ckpt.linear(&dev, "model.layers.0.self_attn.q_proj", 576, 512, false) {
        Err(Error::TensorShape {
            name,
            expected,
            found,
        }) => {
            assert_eq!(name, "model.layers.0.self_attn.q_proj.weight");
            assert_eq!((expected, found), (vec![576, 64], vec![576, 72]));
        }
        other => panic!("expected TensorShape, got {other:?}"),
    }
    match ckpt.tensor(&dev, "model.layers.30.mlp.up_proj.weight") {
        Err(Error::MissingTensor { path, name }) => {
            assert_eq!(path, model_dir());
            assert_eq!(name, "model.layers.30.mlp.up_proj.weight");
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }
    match ckpt.linear(&dev, "model.layers.0.self_attn.q_proj", 576, 576, true) {
        Err(Error::MissingTensor { name, .. }) => {
            assert_eq!(name, "model.layers.0.self_attn.q_proj.bias")
        }
        other => panic!("expected MissingTensor for the bias, got {other:?}"),
    }
}

#[test]
fn shared_config() {
    let ckpt = MlxCheckpoint::open(model_dir()).unwrap();
    let c = LlamaConfig::from_json(ckpt.config(), &ckpt.config_path()).unwrap();
    let expected = LlamaConfig {
        model_type: "llama".into(),
        hidden_size: 576,
        intermediate_size: 1536,
        num_hidden_layers: 30,
        num_attention_heads: 9,
        num_key_value_heads: 3,
        head_dim: 64,
        // config.json's 9.999999747378752e-06 is the f32 nearest 1e-5.
        rms_norm_eps: 1e-5,
        vocab_size: 49152,
        rope_theta: 100000.0,
        rope_traditional: false,
        rope_scaling: RopeScaling::None,
        max_position_embeddings: Some(8192),
        tie_word_embeddings: true,
        attention_bias: false,
        mlp_bias: false,
        sliding_window: None,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    };
    assert_eq!(c, expected);
}

// ---------------------------------------------------------------- config parsing

fn base_config() -> Value {
    json!({
        "model_type": "mistral", "hidden_size": 96, "intermediate_size": 200,
        "num_hidden_layers": 3, "num_attention_heads": 6, "rms_norm_eps": 1e-5,
        "vocab_size": 300
    })
}

fn config_error(config: &Value) -> (String, String) {
    match LlamaConfig::from_json(config, Path::new("x/config.json")) {
        Err(Error::Config {
            path,
            field,
            reason,
        }) => {
            assert_eq!(path, Path::new("x/config.json"));
            (field, reason)
        }
        other => panic!("expected Config error, got {other:?}"),
    }
}

#[test]
fn config_defaults_and_variants() {
    let path = Path::new("config.json");
    let c = LlamaConfig::from_json(&base_config(), path).unwrap();
    assert_eq!(c.model_type, "mistral");
    assert_eq!((c.num_key_value_heads, c.head_dim), (6, 16));
    assert_eq!((c.rope_theta, c.rope_traditional), (10000.0, false));
    assert_eq!(c.rope_scaling, RopeScaling::None);
    assert!(c.tie_word_embeddings && !c.attention_bias && !c.mlp_bias);
    assert_eq!(
        (c.max_position_embeddings, c.sliding_window, c.bos_token_id),
        (None, None, None)
    );
    assert!(c.eos_token_ids.is_empty());

    let mut v = base_config();
    let o = v.as_object_mut().unwrap();
    o.insert("num_key_value_heads".into(), json!(2));
    o.insert("head_dim".into(), json!(32));
    o.insert("rope_theta".into(), json!(500000));
    o.insert("rope_traditional".into(), json!(true));
    o.insert("tie_word_embeddings".into(), json!(false));
    o.insert("attention_bias".into(), json!(true));
    o.insert("sliding_window".into(), json!(4096));
    o.insert("eos_token_id".into(), json!([128001, 128008, 128009]));
    o.insert("bos_token_id".into(), json!(128000));
    o.insert(
        "rope_scaling".into(),
        json!({"rope_type": "llama3", "factor": 32.0, "high_freq_factor": 4.5}),
    );
    let c = LlamaConfig::from_json(&v, path).unwrap();
    assert_eq!(
        (c.num_key_value_heads, c.head_dim, c.rope_theta),
        (2, 32, 500000.0)
    );
    assert!(c.rope_traditional && !c.tie_word_embeddings && c.attention_bias);
    assert_eq!(c.sliding_window, Some(4096));
    assert_eq!(
        (c.bos_token_id, c.eos_token_ids),
        (Some(128000), vec![128001, 128008, 128009])
    );
    assert_eq!(
        c.rope_scaling,
        RopeScaling::Llama3 {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.5,
            original_max_position_embeddings: 8192
        }
    );

    let with_scaling = |s: Value| {
        let mut v = base_config();
        v.as_object_mut().unwrap().insert("rope_scaling".into(), s);
        v
    };
    let c = LlamaConfig::from_json(&with_scaling(json!({"type": "linear", "factor": 2})), path)
        .unwrap();
    assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 2.0 });
    let c = LlamaConfig::from_json(
        &with_scaling(
            json!({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
        ),
        path,
    )
    .unwrap();
    assert_eq!(
        c.rope_scaling,
        RopeScaling::Yarn {
            factor: 4.0,
            original_max_position_embeddings: 32768,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale: 1.0,
            mscale_all_dim: 0.0
        }
    );
    let c = LlamaConfig::from_json(&with_scaling(json!({"rope_type": "default"})), path).unwrap();
    assert_eq!(c.rope_scaling, RopeScaling::None);

    let (field, reason) = config_error(&with_scaling(json!({"type": "dynamic", "factor": 2.0})));
    assert_eq!(field, "rope_scaling.type");
    assert!(reason.contains("dynamic"), "{reason}");
    let (field, _) = config_error(&with_scaling(json!({"type": "linear"})));
    assert_eq!(field, "rope_scaling.factor");
}

#[test]
fn config_errors_name_the_field() {
    let mut v = base_config();
    v.as_object_mut().unwrap().remove("hidden_size");
    let (field, reason) = config_error(&v);
    assert_eq!(
        (field.as_str(), reason.as_str()),
        ("hidden_size", "missing")
    );

    let mut v = base_config();
    v.as_object_mut()
        .unwrap()
        .insert("num_hidden_layers".into(), json!("3"));
    let (field, reason) = config_error(&v);
    assert_eq!(field, "num_hidden_layers");
    assert!(reason.contains("positive integer"), "{reason}");

    let mut v = base_config();
    v.as_object_mut()
        .unwrap()
        .insert("tie_word_embeddings".into(), json!(1));
    assert_eq!(config_error(&v).0, "tie_word_embeddings");

    let mut v = base_config();
    v.as_object_mut()
        .unwrap()
        .insert("num_key_value_heads".into(), json!(4));
    assert_eq!(config_error(&v).0, "num_key_value_heads");

    let mut v = base_config();
    v.as_object_mut()
        .unwrap()
        .insert("eos_token_id".into(), json!([2, -1]));
    assert_eq!(config_error(&v).0, "eos_token_id");

    assert_eq!(config_error(&json!([1, 2])).0, "");
}

// ---------------------------------------------------------------- safetensors

#[test]
fn safetensors_loads_exact_values_aligned_and_not() {
    let dev = Device::cpu();
    let a = values(7 * 3, 1.0);
    let b = f16s(&values(5, 2.0));
    let c: Vec<i32> = vec![-3, 7, 1 << 20];
    let tensors = [
        raw("a", "F32", &[7, 3], &a),
        raw("b", "F16", &[5], &b),
        raw("c", "I32", &[3], &c),
        raw("scalar", "U32", &[], &[42u32]),
    ];
    let dir = TempDir::new("st-ok");
    // A 403-byte header puts every tensor at an odd address (copied, not mapped).
    for (name, header_len) in [
        ("aligned.safetensors", None),
        ("odd.safetensors", Some(403)),
    ] {
        let path = dir.write(name, &safetensors_bytes(&tensors, header_len));
        let f = SafetensorsFile::open(&path).unwrap();
        assert_eq!(f.names().collect::<Vec<_>>(), ["a", "b", "c", "scalar"]);
        let info = f.info("b").unwrap();
        assert_eq!(
            (info.dtype, info.dtype_name.as_str()),
            (Some(DType::F16), "F16")
        );
        let data_start = f.info("a").unwrap().range.start;
        if let Some(len) = header_len {
            assert_eq!(data_start, 8 + len);
        }
        assert_eq!(info.range, data_start + 84..data_start + 94);
        assert_eq!(f.load(&dev, "a").unwrap().to_vec::<f32>().unwrap(), a);
        assert_eq!(f.load(&dev, "b").unwrap().to_vec::<f16>().unwrap(), b);
        assert_eq!(f.load(&dev, "c").unwrap().to_vec::<i32>().unwrap(), c);
        let s = f.load(&dev, "scalar").unwrap();
        assert_eq!((s.shape(), s.to_vec::<u32>().unwrap()), (&[][..], vec![42]));
        match f.load(&dev, "d") {
            Err(Error::MissingTensor { path: p, name }) => {
                assert_eq!((p, name.as_str()), (path, "d"))
            }
            other => panic!("expected MissingTensor, got {other:?}"),
        }
    }
}

#[test]
fn safetensors_rejects_malformed_files() {
    let dir = TempDir::new("st-bad");
    let open = |name: &str, bytes: Vec<u8>| SafetensorsFile::open(dir.write(name, &bytes));

    let reason = malformed_reason(open("short", vec![1, 0, 0, 0, 0]).err().unwrap());
    assert!(reason.contains("too short"), "{reason}");

    let reason = malformed_reason(open("len", file_bytes(1000, "{}", &[])).err().unwrap());
    assert!(reason.contains("header length 1000"), "{reason}");
    let reason = malformed_reason(open("huge", file_bytes(u64::MAX, "{}", &[])).err().unwrap());
    assert!(reason.contains("header length"), "{reason}");

    let reason = malformed_reason(open("json", file_bytes(5, "{\"a\":", &[])).err().unwrap());
    assert!(reason.contains("JSON"), "{reason}");

    let entry = |name: &str, dtype: &str, shape: &str, begin: usize, end: usize| {
        format!("\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":{shape},\"data_offsets\":[{begin},{end}]}}")
    };
    let file = |entries: &[String], data: usize| {
        let header = format!("{{{}}}", entries.join(","));
        file_bytes(header.len() as u64, &header, &vec![0u8; data])
    };

    let reason = malformed_reason(
        open("range", file(&[entry("w", "F32", "[4]", 0, 16)], 12))
            .err()
            .unwrap(),
    );
    assert!(
        reason.contains("`w`") && reason.contains("outside"),
        "{reason}"
    );
    let reason = malformed_reason(
        open("rev", file(&[entry("w", "U8", "[0]", 8, 4)], 12))
            .err()
            .unwrap(),
    );
    assert!(reason.contains("`w`"), "{reason}");
    let reason = malformed_reason(
        open(
            "overlap",
            file(
                &[
                    entry("w", "F32", "[2]", 0, 8),
                    entry("v", "F32", "[2]", 4, 12),
                ],
                12,
            ),
        )
        .err()
        .unwrap(),
    );
    assert!(
        reason.contains("overlap") && reason.contains("`v`") && reason.contains("`w`"),
        "{reason}"
    );
    let reason = malformed_reason(
        open("size", file(&[entry("w", "F16", "[3, 2]", 0, 8)], 12))
            .err()
            .unwrap(),
    );
    assert!(
        reason.contains("`w`") && reason.contains("8 bytes"),
        "{reason}"
    );
    let reason = malformed_reason(
        open("dtype", file(&[entry("w", "Q9", "[2]", 0, 8)], 8))
            .err()
            .unwrap(),
    );
    assert!(reason.contains("`w`") && reason.contains("Q9"), "{reason}");
    let reason = malformed_reason(
        open("entry", file(&["\"w\":{\"dtype\":\"F32\"}".into()], 8))
            .err()
            .unwrap(),
    );
    assert!(reason.contains("`w`"), "{reason}");

    // Known to the format but not to the library: opens, fails on load.
    let f = open(
        "f64",
        file(
            &[
                entry("d", "F64", "[2]", 0, 16),
                entry("x", "U8", "[3]", 16, 19),
            ],
            19,
        ),
    )
    .unwrap();
    assert_eq!(f.info("d").unwrap().dtype, None);
    assert_eq!(f.load(&Device::cpu(), "x").unwrap().shape(), &[3]);
    match f.load(&Device::cpu(), "d") {
        Err(Error::UnsupportedDType { name, dtype }) => {
            assert_eq!((name.as_str(), dtype.as_str()), ("d", "F64"))
        }
        other => panic!("expected UnsupportedDType, got {other:?}"),
    }

    match SafetensorsFile::open(dir.path("absent.safetensors")) {
        Err(Error::Io { path, .. }) => assert_eq!(path, dir.path("absent.safetensors")),
        other => panic!("expected Io, got {:?}", other.err()),
    }
}

// ---------------------------------------------------------------- checkpoint layouts

const N: usize = 6;
const K: usize = 128;

/// Tensors of an MLX affine linear `prefix` with `bits` and `group_size`.
fn affine(prefix: &'static str, bits: usize, group_size: usize, seed: f32) -> Vec<Raw> {
    let words: Vec<u32> = (0..N * K * bits / 32)
        .map(|i| (i as u32).wrapping_mul(2654435761))
        .collect();
    let groups = N * K / group_size;
    let name =
        |part: &str| -> &'static str { Box::leak(format!("{prefix}.{part}").into_boxed_str()) };
    vec![
        raw(name("weight"), "U32", &[N, K * bits / 32], &words),
        raw(
            name("scales"),
            "F16",
            &[N, K / group_size],
            &f16s(&values(groups, seed)),
        ),
        raw(
            name("biases"),
            "F16",
            &[N, K / group_size],
            &f16s(&values(groups, seed + 1.0)),
        ),
    ]
}

fn checkpoint(tag: &str, config: Value, tensors: &[Raw]) -> TempDir {
    let dir = TempDir::new(tag);
    dir.write("config.json", &serde_json::to_vec(&config).unwrap());
    dir.write("model.safetensors", &safetensors_bytes(tensors, None));
    dir
}

#[test]
fn checkpoint_per_layer_quantization() {
    let dev = Device::cpu();
    let mut tensors = affine("q", 4, 64, 0.0);
    tensors.extend(affine("eight", 8, 32, 3.0));
    let dense = values(N * K, 5.0);
    tensors.push(raw("dense.weight", "F32", &[N, K], &dense));
    let bias = f16s(&values(N, 6.0));
    tensors.push(raw("dense.bias", "F16", &[N], &bias));
    let config = json!({"quantization": {"bits": 4, "group_size": 64, "dense": false,
                                         "eight": {"bits": 8, "group_size": 32}, "half": {"bits": 6}}});
    let dir = checkpoint("ckpt-layers", config, &tensors);
    let ckpt = MlxCheckpoint::open(&dir.0).unwrap();
    assert_eq!(ckpt.quant_for("q"), Some((4, 64)));
    assert_eq!(ckpt.quant_for("eight"), Some((8, 32)));
    assert_eq!(ckpt.quant_for("dense"), None);
    // A partial override takes MLX's defaults for what it omits (group size 64).
    assert_eq!(ckpt.quant_for("half"), Some((6, 64)));

    let q = ckpt.linear(&dev, "q", N, K, false).unwrap();
    assert_eq!(
        q.layout,
        WeightLayout::MlxAffine {
            bits: 4,
            group_size: 64
        }
    );
    assert_eq!(
        q.tensors[1].to_vec::<f16>().unwrap(),
        f16s(&values(N * K / 64, 0.0))
    );
    let e = ckpt.linear(&dev, "eight", N, K, false).unwrap();
    assert_eq!(
        e.layout,
        WeightLayout::MlxAffine {
            bits: 8,
            group_size: 32
        }
    );
    let d = ckpt.linear(&dev, "dense", N, K, true).unwrap();
    assert_eq!(d.layout, WeightLayout::Dense);
    assert_eq!(d.tensors[0].to_vec::<f32>().unwrap(), dense);
    assert_eq!(d.bias.unwrap().to_vec::<f16>().unwrap(), bias);
}

#[test]
fn checkpoint_quantization_errors() {
    let dev = Device::cpu();
    // Scales in the file but no quantization section.
    let dir = checkpoint("ckpt-noquant", json!({}), &affine("q", 4, 64, 0.0));
    match MlxCheckpoint::open(&dir.0)
        .unwrap()
        .linear(&dev, "q", N, K, false)
    {
        Err(Error::Config { field, path, .. }) => {
            assert_eq!(field, "quantization");
            assert_eq!(path, dir.path("config.json"));
        }
        other => panic!("expected Config, got {other:?}"),
    }
    // Scales for a module the config leaves dense.
    let dir = checkpoint(
        "ckpt-false",
        json!({"quantization": {"bits": 4, "group_size": 64, "q": false}}),
        &affine("q", 4, 64, 0.0),
    );
    match MlxCheckpoint::open(&dir.0)
        .unwrap()
        .linear(&dev, "q", N, K, false)
    {
        Err(Error::Config { field, .. }) => assert_eq!(field, "quantization.q"),
        other => panic!("expected Config, got {other:?}"),
    }
    // Packed width that disagrees with the config's bits (8-bit data, 4-bit config).
    let dir = checkpoint(
        "ckpt-shape",
        json!({"quantization_config": {"bits": 4, "group_size": 64}}),
        &affine("q", 8, 64, 0.0),
    );
    match MlxCheckpoint::open(&dir.0)
        .unwrap()
        .linear(&dev, "q", N, K, false)
    {
        Err(Error::TensorShape {
            name,
            expected,
            found,
        }) => {
            assert_eq!(name, "q.weight");
            assert_eq!((expected, found), (vec![N, K / 8], vec![N, K / 4]));
        }
        other => panic!("expected TensorShape, got {other:?}"),
    }
    // Malformed or unsupported quantization sections fail at open.
    let open = |tag: &str, q: Value| {
        MlxCheckpoint::open(&checkpoint(tag, json!({"quantization": q}), &[]).0)
    };
    match open("ckpt-nobits", json!({"group_size": 64})) {
        Err(Error::Config { field, .. }) => assert_eq!(field, "quantization.bits"),
        other => panic!("expected Config, got {:?}", other.err()),
    }
    match open(
        "ckpt-badover",
        json!({"bits": 4, "group_size": 64, "x": {"bits": "8"}}),
    ) {
        Err(Error::Config { field, .. }) => assert_eq!(field, "quantization.x.bits"),
        other => panic!("expected Config, got {:?}", other.err()),
    }
    assert!(matches!(
        open(
            "ckpt-mode",
            json!({"bits": 4, "group_size": 32, "mode": "mxfp4"})
        ),
        Err(Error::UnsupportedQuant(_))
    ));
    let dir = checkpoint(
        "ckpt-gptq",
        json!({"quantization_config": {"quant_method": "gptq", "bits": 4}}),
        &[],
    );
    assert!(matches!(
        MlxCheckpoint::open(&dir.0),
        Err(Error::UnsupportedQuant(_))
    ));
}

#[test]
fn checkpoint_weight_file_layouts() {
    let dev = Device::cpu();
    let a = values(4, 1.0);
    let b = values(6, 2.0);
    let shard1 = safetensors_bytes(&[raw("a", "F32", &[4], &a)], None);
    let shard2 = safetensors_bytes(&[raw("b", "F32", &[2, 3], &b)], None);

    // Index + shards.
    let dir = TempDir::new("ckpt-index");
    dir.write("config.json", b"{}");
    dir.write("s1.safetensors", &shard1);
    dir.write("s2.safetensors", &shard2);
    let index =
        json!({"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}});
    dir.write(
        "model.safetensors.index.json",
        &serde_json::to_vec(&index).unwrap(),
    );
    let ckpt = MlxCheckpoint::open(&dir.0).unwrap();
    assert_eq!(ckpt.tensor(&dev, "a").unwrap().to_vec::<f32>().unwrap(), a);
    assert_eq!(ckpt.tensor(&dev, "b").unwrap().to_vec::<f32>().unwrap(), b);
    assert_eq!(ckpt.quantization(), None);
    let dense = ckpt.linear(&dev, "b", 2, 3, false);
    assert!(matches!(dense, Err(Error::MissingTensor { ref name, .. }) if name == "b.weight"));

    // An index naming a tensor its shard lacks.
    let index = json!({"weight_map": {"a": "s1.safetensors", "c": "s2.safetensors"}});
    dir.write(
        "model.safetensors.index.json",
        &serde_json::to_vec(&index).unwrap(),
    );
    match MlxCheckpoint::open(&dir.0) {
        Err(Error::Malformed { format, reason, .. }) => {
            assert_eq!(format, "safetensors index");
            assert!(reason.contains("`c`"), "{reason}");
        }
        other => panic!("expected Malformed, got {:?}", other.err()),
    }
    let index = json!({"weight_map": {"a": "../s1.safetensors"}});
    dir.write(
        "model.safetensors.index.json",
        &serde_json::to_vec(&index).unwrap(),
    );
    assert!(matches!(
        MlxCheckpoint::open(&dir.0),
        Err(Error::Malformed { .. })
    ));

    // No index, no model.safetensors: every *.safetensors.
    std::fs::remove_file(dir.path("model.safetensors.index.json")).unwrap();
    let ckpt = MlxCheckpoint::open(&dir.0).unwrap();
    assert_eq!(ckpt.tensor(&dev, "b").unwrap().to_vec::<f32>().unwrap(), b);
    dir.write("s3.safetensors", &shard1);
    match MlxCheckpoint::open(&dir.0) {
        Err(Error::Malformed { path, reason, .. }) => {
            assert_eq!(path, dir.path("s3.safetensors"));
            assert!(reason.contains("`a`"), "{reason}");
        }
        other => panic!("expected Malformed, got {:?}", other.err()),
    }

    // model.safetensors wins over other files.
    dir.write("model.safetensors", &shard2);
    let ckpt = MlxCheckpoint::open(&dir.0).unwrap();
    assert!(ckpt.has("b") && !ckpt.has("a"));

    // Missing or broken config.json.
    std::fs::remove_file(dir.path("config.json")).unwrap();
    assert!(matches!(MlxCheckpoint::open(&dir.0), Err(Error::Io { .. })));
    dir.write("config.json", b"{not json");
    assert!(matches!(
        MlxCheckpoint::open(&dir.0),
        Err(Error::Malformed { .. })
    ));
    let empty = TempDir::new("ckpt-empty");
    empty.write("config.json", b"{}");
    assert!(matches!(
        MlxCheckpoint::open(&empty.0),
        Err(Error::Io { .. })
    ));
}

// ---------------------------------------------------------------- tokenizers

/// Text whose multi-byte characters span several byte-level tokens.
const MIXED_TEXT: &str = "héllo wörld, 日本語 🦀🦀 x=12345;\n\tdone";

fn check_reference_encodings(tok: &Tokenizer) {
    for case in reference()["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let expected = ids(&case["prompt_ids"]);
        assert_eq!(tok.encode(text, true).unwrap(), expected, "{text:?}");
        assert_eq!(tok.decode(&expected, false).unwrap(), text);
    }
}

#[test]
fn tokenizer_json_matches_mlx_lm() {
    let tok = Tokenizer::from_file(model_dir().join("tokenizer.json")).unwrap();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.token_id("<|im_end|>"), Some(2));
    assert_eq!(tok.token_id("not-a-token"), None);
    check_reference_encodings(&tok);
    for case in reference()["cases"].as_array().unwrap() {
        let greedy = ids(&case["greedy_ids"]);
        assert_eq!(
            tok.decode(&greedy, true).unwrap(),
            case["greedy_text"].as_str().unwrap()
        );
    }
    let ids = tok.encode(MIXED_TEXT, false).unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), MIXED_TEXT);
}

#[test]
fn streaming_decode_matches_full_decode() {
    let tok = Tokenizer::from_file(model_dir().join("tokenizer.json")).unwrap();
    let mut sequences: Vec<Vec<u32>> = reference()["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| ids(&c["greedy_ids"]))
        .collect();
    let mut mixed = tok.encode(MIXED_TEXT, false).unwrap();
    mixed.extend([2, 1]); // <|im_end|><|im_start|>
    sequences.push(mixed.clone());
    for skip_special in [false, true] {
        for seq in &sequences {
            let mut stream = TextStream::new(&tok, skip_special);
            let mut held_back = 0;
            let mut text = String::new();
            for &id in seq {
                let piece = stream.push(id).unwrap();
                assert!(!piece.contains(char::REPLACEMENT_CHARACTER), "{piece:?}");
                held_back += piece.is_empty() as usize;
                text.push_str(&piece);
            }
            text.push_str(&stream.finish().unwrap());
            assert_eq!(text, tok.decode(seq, skip_special).unwrap());
            if seq == &mixed {
                // The emoji and CJK characters span tokens: some pushes must wait.
                assert!(held_back >= 2, "{held_back}");
            }
        }
    }
    // An incomplete character at the very end comes out of `finish`.
    let crab = tok.encode("🦀", false).unwrap();
    assert!(crab.len() > 1);
    let mut stream = TextStream::new(&tok, false);
    assert_eq!(stream.push(crab[0]).unwrap(), "");
    assert_eq!(stream.finish().unwrap(), "\u{FFFD}");
}

/// The SmolLM2 GGUF vocabulary, reconstructed from the tokenizer.json made from it.
fn smollm2_gguf_vocab() -> GgufVocab {
    let json: Value =
        serde_json::from_slice(&std::fs::read(model_dir().join("tokenizer.json")).unwrap())
            .unwrap();
    let vocab = json["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (token, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = token.clone();
    }
    let mut token_types = vec![1; tokens.len()];
    for added in json["added_tokens"].as_array().unwrap() {
        token_types[added["id"].as_u64().unwrap() as usize] = 3;
    }
    let merges = json["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            Value::String(s) => s.clone(),
            pair => format!(
                "{} {}",
                pair[0].as_str().unwrap(),
                pair[1].as_str().unwrap()
            ),
        })
        .collect();
    GgufVocab {
        model: "gpt2".into(),
        pre: Some("smollm".into()),
        tokens,
        token_types,
        scores: Vec::new(),
        merges,
        bos: Some(1),
        eos: Some(2),
        add_bos: false,
    }
}

#[test]
fn gguf_byte_level_vocab_matches_tokenizer_json() {
    let vocab = smollm2_gguf_vocab();
    let tok = Tokenizer::from_gguf(vocab.clone()).unwrap();
    assert_eq!(tok.vocab_size(), 49152);
    check_reference_encodings(&tok);
    let reference = Tokenizer::from_file(model_dir().join("tokenizer.json")).unwrap();
    let ids = reference.encode(MIXED_TEXT, false).unwrap();
    assert_eq!(tok.encode(MIXED_TEXT, false).unwrap(), ids);
    assert_eq!(tok.decode(&ids, false).unwrap(), MIXED_TEXT);
    let special = [1, 9690, 2];
    assert_eq!(tok.decode(&special, true).unwrap(), "system");
    assert_eq!(
        tok.decode(&special, false).unwrap(),
        "<|im_start|>system<|im_end|>"
    );

    let with_bos = Tokenizer::from_gguf(GgufVocab {
        add_bos: true,
        ..vocab.clone()
    })
    .unwrap();
    assert_eq!(with_bos.encode("The", true).unwrap(), [1, 504]);
    assert_eq!(with_bos.encode("The", false).unwrap(), [504]);

    // Other pre-tokenizers on the same vocabulary. Expected ids from Python `tokenizers` on
    // this tokenizer.json with the pre-tokenizer replaced: gpt2 = ByteLevel(use_regex=True);
    // llama3 / qwen2 = Sequence([Split(Regex(their tokenizer.json pattern), "isolated"),
    // ByteLevel(use_regex=False)]) (llama3 also with model.ignore_merges = true).
    let text = "Hello (world)!!\n\n  x 12345 IT'S ok";
    let gpt2_ids: &[u32] = &[
        19556, 365, 6693, 25, 10095, 8866, 1792, 216, 33, 34, 35, 36, 37, 9627, 23, 67, 10907,
    ];
    let llama3_ids: &[u32] = &[
        19556, 365, 6693, 25, 10095, 1116, 216, 1792, 216, 33, 34, 35, 36, 37, 9627, 23, 67, 10907,
    ];
    for (pre, expected) in [
        ("gpt2", gpt2_ids),
        ("llama-bpe", llama3_ids),
        ("qwen2", llama3_ids),
    ] {
        let tok = Tokenizer::from_gguf(GgufVocab {
            pre: Some(pre.into()),
            ..vocab.clone()
        })
        .unwrap();
        assert_eq!(tok.encode(text, false).unwrap(), expected, "{pre}");
        assert_eq!(tok.decode(expected, false).unwrap(), text);
    }

    for bad in [
        GgufVocab {
            pre: Some("mystery".into()),
            ..vocab.clone()
        },
        GgufVocab {
            pre: None,
            ..vocab.clone()
        },
        GgufVocab {
            model: "t5".into(),
            ..vocab.clone()
        },
        GgufVocab {
            token_types: vec![1; 3],
            ..vocab.clone()
        },
        GgufVocab {
            eos: Some(49152),
            ..vocab.clone()
        },
        GgufVocab {
            merges: vec!["Ġt".into()],
            ..vocab
        },
    ] {
        assert!(matches!(
            Tokenizer::from_gguf(bad),
            Err(Error::Tokenizer(_))
        ));
    }
}

#[test]
fn gguf_sentencepiece_vocab() {
    // <unk>, <s>, </s>, the 256 byte tokens, then pieces whose scores fix the merge order.
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut token_types = vec![2, 3, 3];
    tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    token_types.extend([6; 256]);
    let pieces = [
        ("▁", -100.0),
        ("h", -100.0),
        ("e", -100.0),
        ("l", -100.0),
        ("o", -100.0),
        ("w", -100.0),
        ("r", -100.0),
        ("d", -100.0),
        ("ll", -1.0),
        ("▁w", -2.0),
        ("or", -3.0),
        ("he", -4.0),
        ("▁he", -5.0),
        ("llo", -6.0),
        ("▁hello", -7.0),
        ("▁wor", -8.0),
        ("ld", -9.0),
    ];
    let first_piece = tokens.len() as u32; // 259
    let mut scores = vec![0.0; tokens.len()];
    for (piece, score) in pieces {
        tokens.push(piece.into());
        token_types.push(1);
        scores.push(score);
    }
    let id = |piece: &str| first_piece + pieces.iter().position(|p| p.0 == piece).unwrap() as u32;
    let tok = Tokenizer::from_gguf(GgufVocab {
        model: "llama".into(),
        pre: None,
        tokens,
        token_types,
        scores,
        merges: Vec::new(),
        bos: Some(1),
        eos: Some(2),
        add_bos: true,
    })
    .unwrap();
    // "▁hello" merges ll, he, ▁he, llo, ▁hello; "▁world" stops at ▁wor + ld; "é" is not a
    // piece, so it falls back to its UTF-8 bytes C3 A9 (ids 3 + byte).
    let expected = [
        1,
        id("▁hello"),
        id("▁wor"),
        id("ld"),
        id("▁"),
        3 + 0xC3,
        3 + 0xA9,
    ];
    assert_eq!(tok.encode("hello world é", true).unwrap(), expected);
    assert_eq!(tok.decode(&expected, true).unwrap(), "hello world é");
    // A space prefix goes before the text after a special token too (as in llama.cpp).
    assert_eq!(tok.encode("</s>hello", false).unwrap(), [2, id("▁hello")]);
    assert_eq!(tok.token_id("<0x0A>"), Some(3 + 0x0A));
    assert_eq!(tok.vocab_size(), 259 + pieces.len());
}

// ---------------------------------------------------------------- chat templates

#[test]
fn chat_template_matches_mlx_lm_prompt() {
    let config = TokenizerConfig::load(model_dir()).unwrap();
    assert_eq!(config.bos_token.as_deref(), Some("<|im_start|>"));
    assert_eq!(config.eos_token.as_deref(), Some("<|im_end|>"));
    let template = ChatTemplate::new(
        config.chat_template.as_deref().unwrap(),
        config.bos_token.as_deref().unwrap(),
        config.eos_token.as_deref().unwrap(),
    )
    .unwrap();
    let cases = reference();
    let chat = cases["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["prompt"].as_str().unwrap().starts_with("chat:"))
        .unwrap();
    let user = chat["prompt"]
        .as_str()
        .unwrap()
        .strip_prefix("chat:")
        .unwrap();
    let rendered = template
        .render(&[Message::new("user", user)], true)
        .unwrap();
    assert_eq!(rendered, chat["text"].as_str().unwrap());

    let rendered = template
        .render(
            &[
                Message::new("system", "Be brief."),
                Message::new("user", "Hi"),
            ],
            false,
        )
        .unwrap();
    assert_eq!(
        rendered,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    );
}

#[test]
fn chat_template_features_of_hf_templates() {
    let render = |source: &str, messages: &[Message]| {
        ChatTemplate::new(source, "<s>", "</s>")?.render(messages, true)
    };
    let msgs = [
        Message::new("user", "  a <b> ü  "),
        Message::new("assistant", "x"),
    ];
    // Python string methods, loop controls, trimmed blocks, the special tokens.
    let source = "{% for m in messages %}\n  {% if loop.index > 1 %}{% break %}{% endif %}\n{{ bos_token }}{{ m.content.strip() }}|{{ m.role.upper() }}\n{% endfor %}\n{{ eos_token }}";
    assert_eq!(render(source, &msgs).unwrap(), "<s>a <b> ü|USER\n</s>");
    // tojson as Python's json.dumps writes it, without HTML escaping.
    let source = "{{ {'a': 1, 'b': [1, 2.5], 'c': messages[0].content} | tojson }}";
    assert_eq!(
        render(source, &msgs).unwrap(),
        r#"{"a": 1, "b": [1, 2.5], "c": "  a <b> ü  "}"#
    );
    let source = "{{ {'a': [1]} | tojson(indent=2) }}";
    assert_eq!(
        render(source, &msgs).unwrap(),
        "{\n  \"a\": [\n    1\n  ]\n}"
    );
    // raise_exception and syntax errors are template errors.
    let source = "{% if messages[1].role != 'user' %}{{ raise_exception('roles must alternate') }}{% endif %}";
    match render(source, &msgs) {
        Err(Error::Template(msg)) => assert!(msg.contains("roles must alternate"), "{msg}"),
        other => panic!("expected Template error, got {other:?}"),
    }
    assert!(matches!(
        render("{% for %}", &msgs),
        Err(Error::Template(_))
    ));
}

#[test]
fn tokenizer_config_forms() {
    let path = Path::new("tokenizer_config.json");
    let c = TokenizerConfig::from_json(
        &json!({
            "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false},
            "eos_token": "</s>",
            "add_bos_token": true,
            "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
        }),
        path,
    )
    .unwrap();
    assert_eq!(
        c,
        TokenizerConfig {
            bos_token: Some("<s>".into()),
            eos_token: Some("</s>".into()),
            chat_template: Some("D".into()),
            add_bos_token: Some(true),
        }
    );
    let c = TokenizerConfig::from_json(
        &json!({"chat_template": [{"name": "rag", "template": "R"}], "eos_token": null}),
        path,
    )
    .unwrap();
    assert_eq!((c.chat_template.as_deref(), c.eos_token), (Some("R"), None));
    for (bad, field) in [
        (json!({"eos_token": 2}), "eos_token"),
        (json!({"bos_token": {"id": 1}}), "bos_token"),
        (json!({"chat_template": 3}), "chat_template"),
        (json!({"add_bos_token": "yes"}), "add_bos_token"),
    ] {
        match TokenizerConfig::from_json(&bad, path) {
            Err(Error::Config { field: f, .. }) => assert_eq!(f, field),
            other => panic!("expected Config error for {bad}, got {other:?}"),
        }
    }

    // A directory with only chat_template.jinja.
    let dir = TempDir::new("tokcfg");
    dir.write("chat_template.jinja", b"{{ messages[0].content }}");
    let c = TokenizerConfig::load(&dir.0).unwrap();
    assert_eq!(
        c.chat_template.as_deref(),
        Some("{{ messages[0].content }}")
    );
    assert_eq!(c.bos_token, None);
}
