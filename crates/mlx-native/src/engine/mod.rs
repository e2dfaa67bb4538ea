//! The inference engine: sessions (prefill, decode loop, KV cache, sampling, stop rules).

pub mod session;

pub use session::{GenerateOptions, GenerateStats, Session};
