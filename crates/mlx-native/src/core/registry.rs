//! Kernel registry: kernels are found by (op family, variant, dtype). Each backend keeps one,
//! filled at start-up; a missing combination is an error naming the backend and the key.

use std::collections::HashMap;

use crate::core::dtype::DType;
use crate::core::op::Op;
use crate::{Error, Result};

pub struct Registry<K> {
    backend: &'static str,
    kernels: HashMap<(&'static str, String, DType), K>,
}

impl<K: Clone> Registry<K> {
    pub fn new(backend: &'static str) -> Self {
        Registry {
            backend,
            kernels: HashMap::new(),
        }
    }

    /// Register `kernel` for op family `op`, `variant` (see `Op::variant`) and `dtype` (the
    /// dtype of the op's activations).
    pub fn insert(&mut self, op: &'static str, variant: &str, dtype: DType, kernel: K) {
        self.kernels
            .insert((op, variant.to_string(), dtype), kernel);
    }

    pub fn lookup(&self, op: &Op, dtype: DType) -> Result<K> {
        let variant = op.variant();
        self.kernels
            .get(&(op.name(), variant.clone(), dtype))
            .cloned()
            .ok_or_else(|| Error::NoKernel {
                backend: self.backend,
                op: op.name(),
                variant: if variant.is_empty() {
                    dtype.to_string()
                } else {
                    format!("{variant}, {dtype}")
                },
            })
    }
}
