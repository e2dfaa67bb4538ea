//! (kernels land here)

use super::CpuKernel;
use crate::core::registry::Registry;

pub(super) fn register(_reg: &mut Registry<CpuKernel>) {}
