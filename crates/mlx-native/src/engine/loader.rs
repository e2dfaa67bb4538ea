//! From a path to a runnable model: an MLX checkpoint directory or a GGUF file, with its
//! tokenizer, chat template and stop tokens.

use std::path::Path;

use crate::core::device::Device;
use crate::formats::config::LlamaConfig;
use crate::formats::gguf::GgufFile;
use crate::formats::mlx_checkpoint::MlxCheckpoint;
use crate::formats::tokenizer::{ChatTemplate, Message, Tokenizer, TokenizerConfig};
use crate::models::llama::Llama;
use crate::models::weights::{GgufWeights, MlxWeights};
use crate::{Error, Result};

/// The model types this build runs (config.json `model_type` / GGUF `general.architecture`).
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["llama", "mistral"];

pub struct LoadedModel {
    pub model: Llama,
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

fn unsupported(model_type: &str) -> Error {
    Error::UnsupportedModel {
        model_type: model_type.to_string(),
        supported: SUPPORTED_MODEL_TYPES.join(", "),
    }
}

/// Load the model at `path`; `progress(done, total)` is called as tensors are loaded.
pub fn load_model(
    path: &Path,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<LoadedModel> {
    if path.is_dir() {
        load_mlx(path, device, progress)
    } else if path.extension().is_some_and(|e| e == "gguf") {
        load_gguf(path, device, progress)
    } else if path.exists() {
        Err(Error::Invalid(format!(
            "{}: expected an MLX checkpoint directory or a .gguf file",
            path.display()
        )))
    } else {
        Err(Error::io(path, std::io::Error::from(std::io::ErrorKind::NotFound)))
    }
}
