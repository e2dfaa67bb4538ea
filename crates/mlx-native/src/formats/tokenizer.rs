//! Tokenizers: Hugging Face `tokenizer.json` files, or a GGUF vocabulary rebuilt as the
//! equivalent Hugging Face pipeline (byte-level BPE for `gpt2`, SentencePiece-style BPE for
//! `llama`), both run by the `tokenizers` crate. Also incremental decoding for streaming and
//! the special tokens of `tokenizer_config.json`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::{Error, Result};

/// A text ↔ token-id codec.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Prepended by `encode` with special tokens (GGUF `add_bos_token`; tokenizer.json files
    /// carry this in their own post-processor).
    bos_to_add: Option<u32>,
}

fn tokenizer_error(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Load a Hugging Face `tokenizer.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Tokenizer> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| Error::Malformed {
            path: path.to_path_buf(),
            format: "tokenizer.json",
            reason: e.to_string(),
        })?;
        Ok(Tokenizer {
            inner,
            bos_to_add: None,
        })
    }

    /// Build the tokenizer a GGUF file describes.
    pub fn from_gguf(vocab: GgufVocab) -> Result<Tokenizer> {
        vocab.check()?;
        let mut inner = match vocab.model.as_str() {
            "gpt2" => byte_level_bpe(&vocab)?,
            "llama" => sentencepiece_bpe(&vocab)?,
            other => {
                return Err(Error::Tokenizer(format!(
                    "unsupported GGUF tokenizer model `{other}` (supported: gpt2, llama)"
                )))
            }
        };
        // Control and unknown tokens are special: matched whole in the text and skippable
        // when decoding. User-defined tokens are matched whole but decode as text.
        let added: Vec<AddedToken> = vocab
            .tokens
            .iter()
            .enumerate()
            .filter_map(|(id, token)| match vocab.token_type(id) {
                TOKEN_TYPE_UNKNOWN | TOKEN_TYPE_CONTROL => Some((token, true)),
                TOKEN_TYPE_USER_DEFINED => Some((token, false)),
                _ => None,
            })
            .map(|(token, special)| AddedToken::from(token.clone(), special).normalized(false))
            .collect();
        inner.add_tokens(&added);
        Ok(Tokenizer {
            inner,
            bos_to_add: if vocab.add_bos { vocab.bos } else { None },
        })
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(tokenizer_error)?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if add_special_tokens {
            ids.extend(self.bos_to_add);
        }
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(tokenizer_error)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Number of tokens, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_NORMAL: i32 = 1;
const TOKEN_TYPE_UNKNOWN: i32 = 2;
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// The tokenizer metadata of a GGUF file (`tokenizer.ggml.*`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: `"gpt2"` (byte-level BPE) or `"llama"` (SentencePiece).
    pub model: String,
    /// `tokenizer.ggml.pre`: the pre-tokenizer of a `gpt2` vocabulary.
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    /// One per token; empty means all normal.
    pub token_types: Vec<i32>,
    /// One per token for `llama` (merge priority); may be empty for `gpt2`.
    pub scores: Vec<f32>,
    /// `"left right"` pairs in merge order (`gpt2`).
    pub merges: Vec<String>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
}

impl GgufVocab {
    fn check(&self) -> Result<()> {
        let n = self.tokens.len();
        let bad = |reason: String| Err(Error::Tokenizer(format!("GGUF vocabulary: {reason}")));
        if !self.token_types.is_empty() && self.token_types.len() != n {
            return bad(format!(
                "{} token types for {n} tokens",
                self.token_types.len()
            ));
        }
        if !self.scores.is_empty() && self.scores.len() != n {
            return bad(format!("{} scores for {n} tokens", self.scores.len()));
        }
        for (what, id) in [("bos", self.bos), ("eos", self.eos)] {
            if let Some(id) = id.filter(|&id| id as usize >= n) {
                return bad(format!("{what} token id {id} outside the {n} tokens"));
            }
        }
        if self.add_bos && self.bos.is_none() {
            return bad("add_bos_token is set but there is no bos token".into());
        }
        Ok(())
    }

    fn token_type(&self, id: usize) -> i32 {
        self.token_types
            .get(id)
            .copied()
            .unwrap_or(TOKEN_TYPE_NORMAL)
    }

    /// Token → id; a token listed twice keeps its first id.
    fn vocab(&self) -> Vocab {
        let mut vocab = Vocab::default();
        for (id, token) in self.tokens.iter().enumerate() {
            vocab.entry(token.clone()).or_insert(id as u32);
        }
        vocab
    }
}

/// GPT-2 style: split by a regex, map bytes to printable characters, merge by rank.
fn byte_level_bpe(vocab: &GgufVocab) -> Result<tokenizers::Tokenizer> {
    let merges = vocab
        .merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(l, r)| (l.to_string(), r.to_string()))
                .ok_or_else(|| Error::Tokenizer(format!("GGUF merge `{m}` is not two tokens")))
        })
        .collect::<Result<Vec<_>>>()?;
    let pre = vocab.pre.as_deref().ok_or_else(|| {
        Error::Tokenizer("GGUF gpt2 vocabulary without tokenizer.ggml.pre".into())
    })?;
    let (pre_tokenizer, ignore_merges) = byte_level_pre_tokenizer(pre)?;
    let model = BPE::builder()
        .vocab_and_merges(vocab.vocab(), merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(tokenizer_error)?;
    let mut tokenizer = tokenizers::Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    Ok(tokenizer)
}

const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer llama.cpp uses for a `tokenizer.ggml.pre` name, as the Hugging Face
/// pipeline those models ship with; and whether whole words in the vocabulary skip merging.
fn byte_level_pre_tokenizer(pre: &str) -> Result<(PreTokenizerWrapper, bool)> {
    let byte_level = |use_regex| ByteLevel::new(false, true, use_regex).into();
    let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
        Split::new(
            SplitPattern::Regex(pattern.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map(Into::into)
        .map_err(tokenizer_error)
    };
    let sequence = |parts| PreTokenizerSequence::new(parts).into();
    Ok(match pre {
        "gpt-2" | "gpt2" | "mpt" | "olmo" | "jais" => (byte_level(true), false),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" => (
            sequence(vec![Digits::new(true).into(), byte_level(true)]),
            false,
        ),
        "llama3" | "llama-v3" | "llama-bpe" | "dbrx" | "smaug-bpe" => {
            (sequence(vec![split(LLAMA3_PATTERN)?, byte_level(false)]), true)
        }
        "qwen2" | "stablelm2" | "deepseek-r1-qwen" => {
            (sequence(vec![split(QWEN2_PATTERN)?, byte_level(false)]), false)
        }
        other => {
            return Err(Error::Tokenizer(format!(
                "unsupported GGUF pre-tokenizer `{other}` (supported: gpt2, smollm, starcoder, llama3, qwen2 and their aliases)"
            )))
        }
    })
}

/// SentencePiece BPE (Llama 1/2, Mistral): spaces become `▁` with one prepended to every
/// text fragment (as llama.cpp does), pieces merge highest score first, characters outside
/// the vocabulary fall back to `<0xXX>` byte tokens.
fn sentencepiece_bpe(vocab: &GgufVocab) -> Result<tokenizers::Tokenizer> {
    if vocab.scores.len() != vocab.tokens.len() {
        return Err(Error::Tokenizer(
            "GGUF llama vocabulary without one score per token".into(),
        ));
    }
    let ids = vocab.vocab();
    // A pair merges when its concatenation is a normal token; the merge order of the
    // SentencePiece model is the merged token's score, highest first.
    let mut ranked: Vec<(f32, u32, String, String)> = Vec::new();
    for (id, (token, &score)) in vocab.tokens.iter().zip(&vocab.scores).enumerate() {
        if vocab.token_type(id) != TOKEN_TYPE_NORMAL {
            continue;
        }
        for (split, _) in token.char_indices().skip(1) {
            let (left, right) = token.split_at(split);
            if ids.contains_key(left) && ids.contains_key(right) {
                ranked.push((score, id as u32, left.to_string(), right.to_string()));
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let merges = ranked.into_iter().map(|(_, _, l, r)| (l, r)).collect();

    let mut builder = BPE::builder()
        .vocab_and_merges(ids, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = (0..vocab.tokens.len())
        .find(|&id| vocab.token_type(id) == TOKEN_TYPE_UNKNOWN)
        .and_then(|id| vocab.tokens.get(id))
    {
        builder = builder.unk_token(unk.clone());
    }
    let model = builder.build().map_err(tokenizer_error)?;
    let mut tokenizer = tokenizers::Tokenizer::new(model);
    tokenizer.with_normalizer(Some(NormalizerSequence::new(vec![
        Prepend::new("▁".into()).into(),
        Replace::new(" ", "▁").map_err(tokenizer_error)?.into(),
    ])));
    tokenizer.with_decoder(Some(DecoderSequence::new(vec![
        Replace::new("▁", " ").map_err(tokenizer_error)?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
        Strip::new(' ', 1, 0).into(),
    ])));
    Ok(tokenizer)
}

/// Incremental detokenization: push generated ids one at a time and get back the text they
/// complete. Text is held back while it ends in an incomplete UTF-8 sequence, so a character
/// spanning tokens comes out whole; the pieces concatenate to `decode(all ids)`.
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    skip_special: bool,
    ids: Vec<u32>,
    /// Start of the decoded window: tokens `prefix..read` were emitted and are decoded again
    /// only so that the decoder sees their context (leading-space rules, byte merging).
    prefix: usize,
    /// Tokens before `read` have been emitted.
    read: usize,
}

impl<'a> TextStream<'a> {
    pub fn new(tokenizer: &'a Tokenizer, skip_special: bool) -> TextStream<'a> {
        TextStream {
            tokenizer,
            skip_special,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    /// Add one token; returns the newly completed text (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let (context, text) = self.window()?;
        if text.len() <= context.len() || text.ends_with(char::REPLACEMENT_CHARACTER) {
            return Ok(String::new());
        }
        match text.get(context.len()..) {
            Some(new) => {
                let new = new.to_string();
                self.prefix = self.read;
                self.read = self.ids.len();
                Ok(new)
            }
            // The window's text changed inside its already emitted part: wait for more.
            None => Ok(String::new()),
        }
    }

    /// The text still held back (an incomplete character at the end decodes as U+FFFD).
    pub fn finish(&mut self) -> Result<String> {
        let (context, text) = self.window()?;
        let rest = text.get(context.len()..).ok_or_else(|| {
            Error::Tokenizer("decoded text changed before the stream position".into())
        })?;
        let rest = rest.to_string();
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(rest)
    }

    /// The decoded already-emitted context and the decoded whole window.
    fn window(&self) -> Result<(String, String)> {
        let decode = |ids: Option<&[u32]>| {
            let ids = ids.ok_or_else(|| Error::Tokenizer("stream offsets out of range".into()))?;
            self.tokenizer.decode(ids, self.skip_special)
        };
        Ok((
            decode(self.ids.get(self.prefix..self.read))?,
            decode(self.ids.get(self.prefix..))?,
        ))
    }
}

/// The parts of `tokenizer_config.json` generation needs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TokenizerConfig {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// The default chat template (the one named "default", else the first, of a list), or
    /// the directory's `chat_template.jinja` when the config has none.
    pub chat_template: Option<String>,
    pub add_bos_token: Option<bool>,
}

impl TokenizerConfig {
    /// Read `dir/tokenizer_config.json`; a directory without one gives the empty config.
    pub fn load(dir: impl AsRef<Path>) -> Result<TokenizerConfig> {
        let dir = dir.as_ref();
        let path = dir.join("tokenizer_config.json");
        let mut config = if path.is_file() {
            let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            let value: Value = serde_json::from_slice(&bytes).map_err(|e| Error::Malformed {
                path: path.clone(),
                format: "JSON",
                reason: e.to_string(),
            })?;
            Self::from_json(&value, &path)?
        } else {
            TokenizerConfig::default()
        };
        let template_file = dir.join("chat_template.jinja");
        if config.chat_template.is_none() && template_file.is_file() {
            let source = std::fs::read_to_string(&template_file)
                .map_err(|e| Error::io(&template_file, e))?;
            config.chat_template = Some(source);
        }
        Ok(config)
    }

    /// Parse the fields from tokenizer_config.json's JSON; `path` names it in errors.
    pub fn from_json(value: &Value, path: &Path) -> Result<TokenizerConfig> {
        let bad = |field: &str, reason: String| Error::Config {
            path: PathBuf::from(path),
            field: field.to_string(),
            reason,
        };
        let obj = value
            .as_object()
            .ok_or_else(|| bad("", "expected an object".into()))?;
        let field = |name: &str| obj.get(name).filter(|v| !v.is_null());
        // Special tokens are strings or AddedToken objects with a `content`.
        let token = |name: &str| -> Result<Option<String>> {
            field(name)
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    Value::Object(o) => o
                        .get("content")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                        .ok_or_else(|| bad(name, "token object without a string `content`".into())),
                    other => Err(bad(
                        name,
                        format!("expected a string or a token object, found {other}"),
                    )),
                })
                .transpose()
        };
        let chat_template = field("chat_template")
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                Value::Array(list) => {
                    let named: HashMap<&str, &str> = list
                        .iter()
                        .filter_map(|t| {
                            Some((t.get("name")?.as_str()?, t.get("template")?.as_str()?))
                        })
                        .collect();
                    let first = list
                        .first()
                        .and_then(|t| t.get("template"))
                        .and_then(Value::as_str);
                    named
                        .get("default")
                        .copied()
                        .or(first)
                        .map(str::to_string)
                        .ok_or_else(|| {
                            bad(
                                "chat_template",
                                "a list without a {name, template} entry".into(),
                            )
                        })
                }
                other => Err(bad(
                    "chat_template",
                    format!("expected a string or a list, found {other}"),
                )),
            })
            .transpose()?;
        let add_bos_token = field("add_bos_token")
            .map(|v| {
                v.as_bool().ok_or_else(|| {
                    bad(
                        "add_bos_token",
                        format!("expected true or false, found {v}"),
                    )
                })
            })
            .transpose()?;
        Ok(TokenizerConfig {
            bos_token: token("bos_token")?,
            eos_token: token("eos_token")?,
            chat_template,
            add_bos_token,
        })
    }
}
