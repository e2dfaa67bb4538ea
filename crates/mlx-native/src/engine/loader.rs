//! From a path to a runnable model: an MLX checkpoint directory or a GGUF file, with its
//! tokenizer, chat template and stop tokens.

use std::path::Path;

use crate::core::device::Device;
use crate::core::op::{Routing, UnaryFn};
use crate::formats::chat_template::{ChatTemplate, Message};
use crate::formats::config::ConfigFields;
use crate::formats::gguf::{GgufFile, GgufValue};
use crate::formats::mlx_checkpoint::MlxCheckpoint;
use crate::formats::tokenizer::{Tokenizer, TokenizerConfig};
use crate::models::decoder::{Architecture, Decoder, DecoderParams, MoeParams, RopeParams};
use crate::models::family::{self, DEFAULT_CONTEXT};
use crate::models::weights::{GgufWeights, MlxWeights, Prefixed, Progress};
use crate::ops::{inv_freq, RopeScaling};
use crate::{Error, Result};

/// The config.json `model_type`s of MLX checkpoints this build runs.
pub const SUPPORTED_MODEL_TYPES: &[&str] = family::MODEL_TYPES;

/// The GGUF `general.architecture`s this build runs (llama.cpp's Llama tensor layout, with
/// q/k/v biases for qwen2, per-head q/k norms for qwen3, mixture-of-experts MLPs for qwen3moe
/// and for llama files with experts, such as Mixtral's, Gemma's blocks for gemma2 and gemma3,
/// and phi3's fused projections and LongRoPE).
pub const SUPPORTED_GGUF_ARCHITECTURES: &[&str] = &[
    "llama", "mistral", "qwen2", "qwen3", "qwen3moe", "gemma2", "gemma3", "phi3",
];
/// GGUF's per-pair RoPE period factors (`RopeScaling::PeriodFactors`).
const ROPE_FREQS: &str = "rope_freqs.weight";
/// Phi-3's LongRoPE factors for long contexts (`RopeScaling::LongRope`).
const ROPE_FACTORS_LONG: &str = "rope_factors_long.weight";

pub struct LoadedModel {
    pub model: Decoder,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    /// Generation stops after any of these ids.
    pub stop_ids: Vec<u32>,
}

impl LoadedModel {
    /// Token ids of a raw prompt, special tokens added as the tokenizer defines.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        self.tokenizer.encode(text, true)
    }

    /// Token ids of a conversation rendered with the chat template, ready for the reply.
    pub fn encode_chat(&self, messages: &[(&str, &str)]) -> Result<Vec<u32>> {
        let template = self
            .chat_template
            .as_ref()
            .ok_or_else(|| Error::Template("the model has no chat template".into()))?;
        let messages: Vec<Message> = messages
            .iter()
            .map(|(role, content)| Message {
                role: role.to_string(),
                content: content.to_string(),
            })
            .collect();
        let text = template.render(&messages, true)?;
        self.tokenizer.encode(&text, true)
    }
}

fn unsupported(model_type: &str, supported: &[&str]) -> Error {
    Error::UnsupportedModel {
        model_type: model_type.to_string(),
        supported: supported.join(", "),
    }
}

/// The two kinds of model path.
enum ModelPath {
    MlxDir,
    Gguf,
}

fn model_path(path: &Path) -> Result<ModelPath> {
    if path.is_dir() {
        Ok(ModelPath::MlxDir)
    } else if path.extension().is_some_and(|e| e == "gguf") {
        Ok(ModelPath::Gguf)
    } else if path.exists() {
        Err(Error::Invalid(format!(
            "{}: expected an MLX checkpoint directory or a .gguf file",
            path.display()
        )))
    } else {
        Err(Error::io(
            path,
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ))
    }
}

/// Load the model at `path` with its tokenizer; `progress(done, total)` is called as
/// tensors are loaded.
pub fn load_model(
    path: &Path,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<LoadedModel> {
    match model_path(path)? {
        ModelPath::MlxDir => load_mlx(path, device, progress),
        ModelPath::Gguf => load_gguf(path, device, progress),
    }
}

/// Load only the network at `path` (an MLX checkpoint directory needs no tokenizer files).
pub fn load_decoder(
    path: &Path,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Decoder> {
    match model_path(path)? {
        ModelPath::MlxDir => mlx_decoder(&MlxCheckpoint::open(path)?, device, progress),
        ModelPath::Gguf => gguf_decoder(&GgufFile::open(path)?, device, progress),
    }
}

fn mlx_decoder(
    checkpoint: &MlxCheckpoint,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Decoder> {
    let config_path = checkpoint.config_path();
    let f = ConfigFields::new(checkpoint.config(), &config_path)?;
    let model_type = f.required(ConfigFields::string, "model_type")?;
    let params = family::decoder_params(&model_type, checkpoint.config(), &config_path)?
        .ok_or_else(|| unsupported(&model_type, SUPPORTED_MODEL_TYPES))?;
    let weights = MlxWeights {
        checkpoint,
        device,
        progress: Progress::new(Decoder::tensor_count(&params), progress),
    };
    let weights = Prefixed {
        inner: &weights,
        prefix: family::weight_prefix(&model_type),
    };
    Decoder::load(params, &weights, device)
}

fn load_mlx(
    dir: &Path,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<LoadedModel> {
    let checkpoint = MlxCheckpoint::open(dir)?;
    let model = mlx_decoder(&checkpoint, device, progress)?;
    let config_path = checkpoint.config_path();
    let config = ConfigFields::new(checkpoint.config(), &config_path)?;
    let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))?;
    let tok_config = TokenizerConfig::load(dir)?;
    let mut stop_ids = config
        .get(ConfigFields::token_ids, "eos_token_id")?
        .unwrap_or_default();
    if let Some(id) = tok_config
        .eos_token
        .as_deref()
        .and_then(|t| tokenizer.token_id(t))
    {
        stop_ids.push(id);
    }
    stop_ids.sort_unstable();
    stop_ids.dedup();
    let chat_template = match &tok_config.chat_template {
        Some(source) => Some(ChatTemplate::new(
            source,
            tok_config.bos_token.as_deref().unwrap_or(""),
            tok_config.eos_token.as_deref().unwrap_or(""),
        )?),
        None => None,
    };
    Ok(LoadedModel {
        model,
        tokenizer,
        chat_template,
        stop_ids,
    })
}

/// Llama-layout hyper-parameters from GGUF metadata (`{arch}.*` keys, llama.cpp's names).
fn gguf_params(file: &GgufFile, arch: &str) -> Result<DecoderParams> {
    let key = |k: &str| format!("{arch}.{k}");
    let usize_of = |k: &str| -> Result<usize> { Ok(file.get_u32(&key(k))? as usize) };
    let hidden_size = usize_of("embedding_length")?;
    let num_heads = usize_of("attention.head_count")?;
    let num_kv_heads = file
        .opt_u32(&key("attention.head_count_kv"))?
        .map_or(num_heads, |v| v as usize);
    if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
        return Err(Error::Config {
            path: file.path().to_path_buf(),
            field: key("attention.head_count_kv"),
            reason: format!("{num_kv_heads} kv heads for {num_heads} heads"),
        });
    }
    // As llama.cpp reads them: the head dim is the key length (Qwen3 states its own), else
    // hidden / heads; the rotated dims `rope.dimension_count` (Phi-3's partial rotation), else
    // the head dim.
    let head_dim = file
        .opt_u32(&key("attention.key_length"))?
        .map_or(hidden_size / num_heads, |d| d as usize);
    let rotary_dims = file
        .opt_u32(&key("rope.dimension_count"))?
        .map_or(head_dim, |d| d as usize);
    let rope_scaling = match file.opt_str(&key("rope.scaling.type"))? {
        None | Some("none") => RopeScaling::None,
        Some("linear") => RopeScaling::Linear {
            factor: file.get_f32(&key("rope.scaling.factor"))?,
        },
        Some(other) => {
            return Err(Error::Config {
                path: file.path().to_path_buf(),
                field: key("rope.scaling.type"),
                reason: format!("unsupported RoPE scaling `{other}` (supported: none, linear)"),
            })
        }
    };
    // Llama 3.x scaling comes as one period factor per rotated pair (llama.cpp's converter
    // writes no scaling keys for it), Phi-3's LongRoPE as its long factors.
    let rope_scaling = scaling_from_tensor(file, ROPE_FREQS, rope_scaling, || {
        let factors = pair_factors(file, ROPE_FREQS, rotary_dims)?;
        Ok(RopeScaling::PeriodFactors { factors })
    })?;
    let rope_scaling = scaling_from_tensor(file, ROPE_FACTORS_LONG, rope_scaling, || {
        long_rope(file, arch, rotary_dims)
    })?;
    let vocab_size = match file.opt_u32(&key("vocab_size"))? {
        Some(v) => v as usize,
        None => file.get_str_array("tokenizer.ggml.tokens")?.len(),
    };
    let num_layers = usize_of("block_count")?;
    let intermediate_size = usize_of("feed_forward_length")?;
    let moe = gguf_moe(file, arch, num_layers, intermediate_size)?;
    let attention_bias = file.tensor_info("blk.0.attn_q.bias").is_some();
    let params = DecoderParams {
        arch: Architecture {
            qkv_bias: attention_bias,
            o_bias: file.tensor_info("blk.0.attn_output.bias").is_some(),
            qk_norm: matches!(arch, "qwen3" | "qwen3moe"),
            // Phi-3: q, k and v in one `attn_qkv`, gate and up in one `ffn_up` (gate first).
            fused_qkv: file.tensor_info("blk.0.attn_qkv.weight").is_some(),
            fused_gate_up: arch == "phi3",
            ..Architecture::LLAMA
        },
        hidden_size,
        intermediate_size,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        vocab_size,
        rms_norm_eps: file.get_f32(&key("attention.layer_norm_rms_epsilon"))?,
        rope: RopeParams {
            theta: file.opt_f32(&key("rope.freq_base"))?.unwrap_or(10000.0),
            scaling: rope_scaling,
            // llama.cpp's converter permutes llama q/k rows for interleaved-pair RoPE and
            // keeps Qwen's as they are (rotate-half, NEOX in llama.cpp).
            traditional: matches!(arch, "llama" | "mistral"),
            rotary_dims,
        },
        local_rope: None,
        layer_windows: vec![None; num_layers],
        attention_scale: 1.0 / (head_dim as f32).sqrt(),
        tie_word_embeddings: file.tensor_info("output.weight").is_none(),
        max_position_embeddings: file
            .opt_u32(&key("context_length"))?
            .map_or(DEFAULT_CONTEXT, |v| v as usize),
        moe,
    };
    match arch {
        "gemma2" | "gemma3" => gemma_params(file, arch, params),
        _ => Ok(params),
    }
}

/// Gemma 2 and 3 as llama.cpp reads their files: RMSNorm weights stored with Gemma's + 1
/// already added (its converter adds it), so no unit offset; sandwich norms, GELU-tanh,
/// embeddings scaled by √hidden in f32; Gemma 3's q/k norms. Attention soft-capping (Gemma 2,
/// default 50) and final-logit soft-capping (Gemma 2 default 30, Gemma 3 none) from the
/// metadata. Sliding-window layers: all but every `attention.sliding_window_pattern`-th
/// (defaults 2 and 6; or one bool a layer), of `attention.sliding_window` (Gemma 2 default
/// 4096; Gemma 3 has none without it), their RoPE base `rope.freq_base_swa` (Gemma 3 default
/// 10000, unscaled; Gemma 2 the global one). The files state no query scale: llama.cpp takes
/// 1/√head_dim, or 1/√(hidden/heads) for the 27B models, which it tells by their layer counts
/// (46, 62), and so does this.
fn gemma_params(file: &GgufFile, arch: &str, p: DecoderParams) -> Result<DecoderParams> {
    let key = |k: &str| format!("{arch}.{k}");
    let gemma2 = arch == "gemma2";
    let softcap = |k: &str, default: Option<f32>| -> Result<Option<f32>> {
        Ok(file.opt_f32(&key(k))?.or(default).filter(|&c| c != 0.0))
    };
    let attn_softcap = match gemma2 {
        true => softcap("attn_logit_softcapping", Some(50.0))?,
        false => None,
    };
    let a = Architecture {
        qk_norm: !gemma2,
        sandwich_norms: true,
        activation: UnaryFn::GeluTanh,
        embed_scale: Some((p.hidden_size as f32).sqrt()),
        attn_softcap,
        final_softcap: softcap("final_logit_softcapping", gemma2.then_some(30.0))?,
        ..p.arch
    };
    let window = file
        .opt_u32(&key("attention.sliding_window"))?
        .map(|w| w as usize)
        .or(gemma2.then_some(4096))
        .filter(|&w| w > 0);
    let pattern_key = key("attention.sliding_window_pattern");
    let sliding: Vec<bool> = match file.metadata(&pattern_key).and_then(GgufValue::as_array) {
        Some(_) => {
            let flags = file.opt_bool_array(&pattern_key)?.unwrap_or_default();
            if flags.len() != p.num_layers {
                return Err(Error::Config {
                    path: file.path().to_path_buf(),
                    field: pattern_key,
                    reason: format!("{} flags for {} layers", flags.len(), p.num_layers),
                });
            }
            flags
        }
        None => {
            let n = file
                .opt_u32(&pattern_key)?
                .unwrap_or(if gemma2 { 2 } else { 6 }) as usize;
            (0..p.num_layers).map(|l| n == 0 || l % n < n - 1).collect()
        }
    };
    let layer_windows = sliding.iter().map(|&s| window.filter(|_| s)).collect();
    let swa_base = file.opt_f32(&key("rope.freq_base_swa"))?;
    let local_rope = match (gemma2, swa_base) {
        (true, None) => None,
        (true, Some(theta)) => Some(RopeParams {
            theta,
            ..p.rope.clone()
        }),
        (false, base) => Some(RopeParams {
            theta: base.unwrap_or(10000.0),
            scaling: RopeScaling::None,
            ..p.rope.clone()
        }),
    };
    let is_27b = p.num_layers == if gemma2 { 46 } else { 62 };
    let query_dim = match is_27b {
        true => p.hidden_size / p.num_heads,
        false => p.head_dim,
    };
    Ok(DecoderParams {
        arch: a,
        local_rope,
        layer_windows,
        attention_scale: 1.0 / (query_dim as f32).sqrt(),
        ..p
    })
}

/// `scaling` (from the metadata), or where the file holds RoPE factor tensor `name`, the
/// scaling `from_tensor` makes of it, which no scaling from the metadata may accompany.
fn scaling_from_tensor(
    file: &GgufFile,
    name: &str,
    scaling: RopeScaling,
    from_tensor: impl FnOnce() -> Result<RopeScaling>,
) -> Result<RopeScaling> {
    match (file.tensor_info(name), scaling) {
        (None, scaling) => Ok(scaling),
        (Some(_), RopeScaling::None) => from_tensor(),
        (Some(_), _) => Err(Error::Config {
            path: file.path().to_path_buf(),
            field: name.into(),
            reason: "its factors together with other RoPE scaling (a `rope.scaling.type` or \
                     another factor tensor) are not supported"
                .into(),
        }),
    }
}

/// The one-a-pair factors of RoPE tensor `name` for `rotary_dims` rotated dims.
fn pair_factors(file: &GgufFile, name: &str, rotary_dims: usize) -> Result<Vec<f32>> {
    let factors = file.vector_f32(name)?;
    if factors.len() != rotary_dims / 2 {
        return Err(Error::Config {
            path: file.path().to_path_buf(),
            field: name.into(),
            reason: format!(
                "{} factors for {rotary_dims} rotated dims (one per rotated pair expected)",
                factors.len()
            ),
        });
    }
    Ok(factors)
}

/// Phi-3's LongRoPE: the long factors at every length, as mlx-lm (and this library's MLX
/// path) applies them; llama.cpp takes the short ones (`rope_factors_short`) where the context
/// it is given is no longer than `rope.scaling.original_context_length`, which only shorter
/// contexts than the model's would do. The attention factor that llama.cpp's converter writes
/// must be the one LongRoPE implies.
fn long_rope(file: &GgufFile, arch: &str, rotary_dims: usize) -> Result<RopeScaling> {
    let key = |k: &str| format!("{arch}.{k}");
    let scaling = RopeScaling::LongRope {
        long_factor: pair_factors(file, ROPE_FACTORS_LONG, rotary_dims)?,
        max_position_embeddings: file.get_u32(&key("context_length"))? as usize,
        original_max_position_embeddings: file
            .get_u32(&key("rope.scaling.original_context_length"))?
            as usize,
    };
    // The multiplier of the rotated dims; the base does not enter it.
    let implied = inv_freq(rotary_dims, 10000.0, &scaling).1;
    if let Some(stated) = file.opt_f32(&key("rope.scaling.attn_factor"))? {
        if (stated - implied).abs() > 1e-4 * implied {
            return Err(Error::Config {
                path: file.path().to_path_buf(),
                field: key("rope.scaling.attn_factor"),
                reason: format!("{stated}, where LongRoPE implies {implied}"),
            });
        }
    }
    Ok(scaling)
}

/// The mixture-of-experts MLP of a GGUF file with `{arch}.expert_count` experts, as llama.cpp
/// builds it: the layers holding a router (`blk.N.ffn_gate_inp`) are sparse; Qwen3-MoE takes a
/// softmax over all experts and normalises the top k, Mixtral-style llama files take a softmax
/// over the top k logits (the same weights).
fn gguf_moe(
    file: &GgufFile,
    arch: &str,
    num_layers: usize,
    intermediate_size: usize,
) -> Result<Option<MoeParams>> {
    let key = |k: &str| format!("{arch}.{k}");
    let experts = match file.opt_u32(&key("expert_count"))? {
        None | Some(0) => return Ok(None),
        Some(e) => e as usize,
    };
    let config_error = |k: &str, reason: String| Error::Config {
        path: file.path().to_path_buf(),
        field: key(k),
        reason,
    };
    let top_k = file.get_u32(&key("expert_used_count"))? as usize;
    if top_k == 0 || top_k > experts {
        let reason = format!("{top_k} experts a token of {experts}");
        return Err(config_error("expert_used_count", reason));
    }
    // What llama.cpp's builders for these architectures leave at their defaults.
    if let Some(shared) = file
        .opt_u32(&key("expert_shared_count"))?
        .filter(|&s| s > 0)
    {
        let reason = format!("{shared} shared experts are not supported");
        return Err(config_error("expert_shared_count", reason));
    }
    if let Some(scale) = file.opt_f32(&key("expert_weights_scale"))? {
        if scale != 0.0 && scale != 1.0 {
            let reason = format!("routing weights scaled by {scale} are not supported");
            return Err(config_error("expert_weights_scale", reason));
        }
    }
    if let Some(gating) = file
        .opt_u32(&key("expert_gating_func"))?
        .filter(|&g| g != 1)
    {
        let reason = format!("gating function {gating} (only 1, softmax, is supported)");
        return Err(config_error("expert_gating_func", reason));
    }
    let routing = match arch {
        "qwen3moe" => Routing::SoftmaxTopK { normalize: true },
        _ => Routing::TopKSoftmax,
    };
    let sparse_layers = (0..num_layers)
        .map(|l| {
            file.tensor_info(&format!("blk.{l}.ffn_gate_inp.weight"))
                .is_some()
        })
        .collect();
    Ok(Some(MoeParams {
        experts,
        top_k,
        intermediate_size: file
            .opt_u32(&key("expert_feed_forward_length"))?
            .map_or(intermediate_size, |v| v as usize),
        routing,
        sparse_layers,
        block: "mlp",
    }))
}

fn gguf_decoder(
    file: &GgufFile,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Decoder> {
    let arch = file.architecture()?;
    if !SUPPORTED_GGUF_ARCHITECTURES.contains(&arch) {
        return Err(unsupported(arch, SUPPORTED_GGUF_ARCHITECTURES));
    }
    let params = gguf_params(file, arch)?;
    let weights = GgufWeights {
        file,
        device,
        progress: Progress::new(Decoder::tensor_count(&params), progress),
        sandwich_norms: params.arch.sandwich_norms,
    };
    Decoder::load(params, &weights, device)
}

fn load_gguf(
    path: &Path,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<LoadedModel> {
    let file = GgufFile::open(path)?;
    let model = gguf_decoder(&file, device, progress)?;
    let vocab = file.vocab()?;
    let token_str = |id: Option<u32>| {
        id.and_then(|i| vocab.tokens.get(i as usize).cloned())
            .unwrap_or_default()
    };
    let (bos, eos) = (token_str(vocab.bos), token_str(vocab.eos));
    let mut stop_ids: Vec<u32> = vocab.eos.into_iter().collect();
    if let Some(eot) = file.opt_u32("tokenizer.ggml.eot_token_id")? {
        stop_ids.push(eot);
    }
    stop_ids.sort_unstable();
    stop_ids.dedup();
    let chat_template = match file.chat_template() {
        Some(source) => Some(ChatTemplate::new(&source, &bos, &eos)?),
        None => None,
    };
    let tokenizer = Tokenizer::from_gguf(vocab)?;
    Ok(LoadedModel {
        model,
        tokenizer,
        chat_template,
        stop_ids,
    })
}
