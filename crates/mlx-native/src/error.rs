//! The one error type of the library. Every fallible path returns `Result<T>`.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file whose bytes do not follow its format (truncated, corrupted, bad header).
    #[error("{path}: malformed {format} file: {reason}")]
    Malformed {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },
    /// A configuration field that is missing, of the wrong type or out of range.
    #[error("{path}: field `{field}`: {reason}")]
    Config {
        path: PathBuf,
        field: String,
        reason: String,
    },
    #[error("tensor `{name}` not found in {path}")]
    MissingTensor { path: PathBuf, name: String },
    #[error("tensor `{name}`: expected shape {expected:?}, found {found:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor `{name}`: unsupported dtype {dtype}")]
    UnsupportedDType { name: String, dtype: String },
    #[error("unsupported quantization: {0}")]
    UnsupportedQuant(String),
    #[error("unsupported model_type `{model_type}`; supported: {supported}")]
    UnsupportedModel {
        model_type: String,
        supported: String,
    },
    /// An op call whose operands disagree (shapes, dtypes, devices, aliasing).
    #[error("{op}: {reason}")]
    Op { op: &'static str, reason: String },
    /// The backend has no kernel for this op/dtype/variant combination.
    #[error("backend `{backend}` has no kernel for {op} ({variant})")]
    NoKernel {
        backend: &'static str,
        op: &'static str,
        variant: String,
    },
    #[error(
        "prompt of {prompt} tokens plus {max_new} new tokens exceeds the context length {context}"
    )]
    ContextOverflow {
        prompt: usize,
        max_new: usize,
        context: usize,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("device unavailable: {0}")]
    DeviceUnavailable(String),
    #[error("CUDA: {0}")]
    Cuda(String),
    /// A device allocation the device had no memory for (what was being allocated).
    #[error("out of device memory: {0}")]
    OutOfMemory(String),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn op(op: &'static str, reason: impl Into<String>) -> Self {
        Error::Op {
            op,
            reason: reason.into(),
        }
    }
}
