//! mlx-native: MLX-compatible LLM inference in Rust.
//!
//! Layers, each a module, arrows pointing down only:
//! `engine` → `models` → `formats` → `ops` → `core` ← `backends`, with `quant` a leaf
//! (layouts and reference math) used by all. See `docs/architecture.md`.

pub mod backends;
pub mod core;
pub mod engine;
pub mod error;
pub mod formats;
pub mod models;
pub mod ops;
pub mod quant;

pub use crate::core::device::Device;
pub use crate::core::dtype::DType;
pub use crate::core::encoder::{CommandEncoder, Graph};
pub use crate::core::op::{Op, SamplingParams};
pub use crate::core::tensor::Tensor;
pub use error::{Error, Result};
