//! Model architectures: a config and weights become "encode one forward pass onto an
//! encoder". Every family is one `decoder::Decoder` with family-specific parameters, read
//! from config.json by the family's module (`family::decoder_params` picks it by
//! `model_type`). Weights come through `WeightSource`, so a model loads from an MLX
//! checkpoint or a GGUF file alike.

pub mod decoder;
pub mod family;
pub mod gemma2;
pub mod gemma3;
pub mod llama;
pub mod mixtral;
pub mod phi3;
pub mod qwen2;
pub mod qwen3;
pub mod qwen3_moe;
pub mod synthetic;
pub mod weights;

use crate::core::tensor::Tensor;
use crate::ops::{ExpertLinear, Linear};
use crate::Result;

/// Where a model's tensors come from, addressed by Hugging Face names
/// (`model.layers.0.self_attn.q_proj`), whatever the file calls them.
pub trait WeightSource {
    /// A matrix `[n, k]` stored as the file stores it (dense or quantized), with its bias
    /// `{name}.bias` when `bias` is set.
    fn linear(&self, name: &str, n: usize, k: usize, bias: bool) -> Result<Linear>;
    /// A 1-D tensor `{name}` of `len` values (norm weights), in its stored float dtype.
    fn vector(&self, name: &str, len: usize) -> Result<Tensor>;
    /// `experts` matrices `[n, k]` stacked along a leading dimension, as mlx-lm's
    /// `SwitchLinear` stores a mixture-of-experts projection (`{name}.weight`).
    fn experts(&self, name: &str, experts: usize, n: usize, k: usize) -> Result<ExpertLinear>;
    /// Whether a matrix `name` exists (e.g. an untied `lm_head`).
    fn has_linear(&self, name: &str) -> bool;
}
