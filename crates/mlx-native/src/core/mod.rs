//! Compute core: dtypes, buffers and tensors, devices, the command encoder and its graphs,
//! the op description and the kernel registry.

pub mod backend;
pub mod device;
pub mod dtype;
pub mod encoder;
pub mod op;
pub mod registry;
pub mod tensor;
