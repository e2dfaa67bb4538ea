//! (kernels land here)
