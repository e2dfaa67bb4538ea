//! File formats: MLX checkpoints (config.json + safetensors shards), GGUF, tokenizers and
//! chat templates.

pub mod chat_template;
pub mod config;
pub mod gguf;
pub mod mlx_checkpoint;
pub mod safetensors;
pub mod tokenizer;
