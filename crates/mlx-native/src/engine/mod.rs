//! The inference engine: sessions (prefill, decode loop, KV cache, sampling, stop rules).

pub mod loader;
pub mod session;

pub use loader::{load_decoder, load_model, LoadedModel, SUPPORTED_MODEL_TYPES};
pub use session::{GenerateOptions, GenerateStats, Session};
