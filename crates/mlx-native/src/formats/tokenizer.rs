//! Tokenizers and chat templates.

/// The tokenizer a GGUF file embeds (`tokenizer.ggml.*` metadata), as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: "gpt2" (byte-level BPE), "llama" (SentencePiece), …
    pub model: String,
    /// `tokenizer.ggml.pre`: the pre-tokenizer name (BPE vocabularies).
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    /// Per token (empty when the file has none): 1 normal, 2 unknown, 3 control,
    /// 4 user-defined, 5 unused, 6 byte.
    pub token_types: Vec<i32>,
    /// Per token (empty when the file has none): SentencePiece scores.
    pub scores: Vec<f32>,
    /// BPE merges, "left right" (empty when the file has none).
    pub merges: Vec<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
}
