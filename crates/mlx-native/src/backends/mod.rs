//! Backends implement `core::backend::Backend`. CPU is always built and is the reference;
//! CUDA loads the driver at run time, so it builds (and reports itself unavailable) anywhere.

pub mod cpu;
pub mod cuda;
