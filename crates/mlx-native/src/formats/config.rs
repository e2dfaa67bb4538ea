//! Model hyper-parameters from config.json, with mlx-lm's defaults (`mlx_lm/models/llama.py`
//! `ModelArgs`, `rope_utils.initialize_rope`), and `ConfigFields`, the typed field access the
//! other families' readers (`models::*`) use. A `null` field counts as absent, as in Python.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::ops::RopeScaling;
use crate::{Error, Result};

/// The Llama family (llama, mistral and other models sharing its config fields).
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    pub model_type: String,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Defaults to `num_attention_heads`.
    pub num_key_value_heads: usize,
    /// Defaults to `hidden_size / num_attention_heads`.
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub vocab_size: usize,
    pub rope_theta: f32,
    pub rope_traditional: bool,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: Option<usize>,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    /// `eos_token_id` as an integer or a list; empty when absent.
    pub eos_token_ids: Vec<u32>,
}

impl LlamaConfig {
    /// Read the config from parsed config.json; `path` names the file in errors.
    pub fn from_json(config: &Value, path: &Path) -> Result<LlamaConfig> {
        let f = ConfigFields::new(config, path)?;
        let hidden_size = f.required(ConfigFields::positive, "hidden_size")?;
        let num_attention_heads = f.required(ConfigFields::positive, "num_attention_heads")?;
        let num_key_value_heads = f
            .get(ConfigFields::positive, "num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        if !num_attention_heads.is_multiple_of(num_key_value_heads) {
            return Err(f.error(
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"),
            ));
        }
        let head_dim = match f.get(ConfigFields::positive, "head_dim")? {
            Some(d) => d,
            None if hidden_size.is_multiple_of(num_attention_heads) => hidden_size / num_attention_heads,
            None => {
                return Err(f.error(
                    "head_dim",
                    format!("missing, and hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads}"),
                ))
            }
        };
        Ok(LlamaConfig {
            model_type: f.required(ConfigFields::string, "model_type")?,
            hidden_size,
            intermediate_size: f.required(ConfigFields::positive, "intermediate_size")?,
            num_hidden_layers: f.required(ConfigFields::positive, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: f.required(ConfigFields::float, "rms_norm_eps")?,
            vocab_size: f.required(ConfigFields::positive, "vocab_size")?,
            rope_theta: f.get(ConfigFields::float, "rope_theta")?.unwrap_or(10000.0),
            rope_traditional: f
                .get(ConfigFields::bool, "rope_traditional")?
                .unwrap_or(false),
            rope_scaling: rope_scaling(f.nested("rope_scaling")?.as_ref())?,
            max_position_embeddings: f.get(ConfigFields::positive, "max_position_embeddings")?,
            tie_word_embeddings: f
                .get(ConfigFields::bool, "tie_word_embeddings")?
                .unwrap_or(true),
            attention_bias: f
                .get(ConfigFields::bool, "attention_bias")?
                .unwrap_or(false),
            mlp_bias: f.get(ConfigFields::bool, "mlp_bias")?.unwrap_or(false),
            sliding_window: f.get(ConfigFields::positive, "sliding_window")?,
            bos_token_id: f.get(ConfigFields::token_id, "bos_token_id")?,
            eos_token_ids: f
                .get(ConfigFields::token_ids, "eos_token_id")?
                .unwrap_or_default(),
        })
    }
}

/// A `rope_scaling` object (absent: none): its `type` (or `rope_type`) picks the variant;
/// defaults as in mlx-lm's `initialize_rope`.
pub fn rope_scaling(scaling: Option<&ConfigFields>) -> Result<RopeScaling> {
    let Some(s) = scaling else {
        return Ok(RopeScaling::None);
    };
    let kind = match s.get(ConfigFields::string, "type")? {
        Some(t) => t,
        None => s
            .get(ConfigFields::string, "rope_type")?
            .unwrap_or_else(|| "default".into()),
    };
    Ok(match kind.as_str() {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: s.required(ConfigFields::float, "factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: s.required(ConfigFields::float, "factor")?,
            low_freq_factor: s
                .get(ConfigFields::float, "low_freq_factor")?
                .unwrap_or(1.0),
            high_freq_factor: s
                .get(ConfigFields::float, "high_freq_factor")?
                .unwrap_or(4.0),
            original_max_position_embeddings: s
                .get(ConfigFields::positive, "original_max_position_embeddings")?
                .unwrap_or(8192),
        },
        "yarn" => RopeScaling::Yarn {
            factor: s.required(ConfigFields::float, "factor")?,
            original_max_position_embeddings: s
                .get(ConfigFields::positive, "original_max_position_embeddings")?
                .unwrap_or(4096),
            beta_fast: s.get(ConfigFields::float, "beta_fast")?.unwrap_or(32.0),
            beta_slow: s.get(ConfigFields::float, "beta_slow")?.unwrap_or(1.0),
            mscale: s.get(ConfigFields::float, "mscale")?.unwrap_or(1.0),
            mscale_all_dim: s.get(ConfigFields::float, "mscale_all_dim")?.unwrap_or(0.0),
        },
        other => {
            return Err(s.error(
                "type",
                format!(
                    "unsupported RoPE scaling `{other}` (supported: default, linear, llama3, yarn)"
                ),
            ))
        }
    })
}

/// Typed access to the fields of one JSON object, with errors naming file and field.
pub struct ConfigFields<'a> {
    obj: &'a Map<String, Value>,
    path: &'a Path,
    /// Dotted prefix of nested objects (`rope_scaling.`).
    prefix: String,
}

/// Parses one JSON value, or says what was wrong with it.
pub type Parse<T> = fn(&Value) -> std::result::Result<T, String>;

impl<'a> ConfigFields<'a> {
    /// The top-level object of a config read from `path` (named in errors).
    pub fn new(value: &'a Value, path: &'a Path) -> Result<ConfigFields<'a>> {
        ConfigFields::with_prefix(value, path, "")
    }

    fn with_prefix(value: &'a Value, path: &'a Path, prefix: &str) -> Result<ConfigFields<'a>> {
        let obj = value.as_object().ok_or_else(|| Error::Config {
            path: PathBuf::from(path),
            field: prefix.trim_end_matches('.').to_string(),
            reason: format!("expected an object, found {value}"),
        })?;
        Ok(ConfigFields {
            obj,
            path,
            prefix: prefix.to_string(),
        })
    }

    /// A config error about `field` of this object.
    pub fn error(&self, field: &str, reason: String) -> Error {
        Error::Config {
            path: self.path.to_path_buf(),
            field: format!("{}{field}", self.prefix),
            reason,
        }
    }

    pub fn get<T>(&self, parse: Parse<T>, field: &str) -> Result<Option<T>> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => parse(v)
                .map(Some)
                .map_err(|reason| self.error(field, reason)),
        }
    }

    pub fn required<T>(&self, parse: Parse<T>, field: &str) -> Result<T> {
        self.get(parse, field)?
            .ok_or_else(|| self.error(field, "missing".into()))
    }

    /// The object at `field`, if present.
    pub fn nested(&self, field: &str) -> Result<Option<ConfigFields<'a>>> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => ConfigFields::with_prefix(v, self.path, &format!("{}{field}.", self.prefix))
                .map(Some),
        }
    }

    pub fn positive(v: &Value) -> std::result::Result<usize, String> {
        v.as_u64()
            .filter(|&n| n > 0)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| format!("expected a positive integer, found {v}"))
    }

    pub fn float(v: &Value) -> std::result::Result<f32, String> {
        v.as_f64()
            .map(|x| x as f32)
            .filter(|x| x.is_finite())
            .ok_or_else(|| format!("expected a number, found {v}"))
    }

    pub fn floats(v: &Value) -> std::result::Result<Vec<f32>, String> {
        match v {
            Value::Array(items) => items.iter().map(ConfigFields::float).collect(),
            other => Err(format!("expected a list of numbers, found {other}")),
        }
    }

    pub fn bool(v: &Value) -> std::result::Result<bool, String> {
        v.as_bool()
            .ok_or_else(|| format!("expected true or false, found {v}"))
    }

    pub fn string(v: &Value) -> std::result::Result<String, String> {
        v.as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("expected a string, found {v}"))
    }

    pub fn strings(v: &Value) -> std::result::Result<Vec<String>, String> {
        match v {
            Value::Array(items) => items.iter().map(ConfigFields::string).collect(),
            other => Err(format!("expected a list of strings, found {other}")),
        }
    }

    pub fn token_id(v: &Value) -> std::result::Result<u32, String> {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| format!("expected a token id, found {v}"))
    }

    /// An integer or a list of them (`eos_token_id`).
    pub fn token_ids(v: &Value) -> std::result::Result<Vec<u32>, String> {
        match v {
            Value::Array(items) => items.iter().map(ConfigFields::token_id).collect(),
            single => ConfigFields::token_id(single).map(|id| vec![id]),
        }
    }
}
