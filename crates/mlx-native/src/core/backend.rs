//! The boundary every backend implements. Small on purpose: memory, one way to run a list
//! of dispatches, one way to turn a recorded list into something replayable, and what a
//! model's encoder may ask of the backend's plans.

use std::any::Any;
use std::sync::Arc;

use crate::core::encoder::Dispatch;
use crate::core::op::Op;
use crate::core::tensor::Tensor;
use crate::quant::WeightLayout;
use crate::Result;

/// Device memory owned by a backend. Backends downcast through `as_any` to their own type.
pub trait DeviceBuffer: Any + Send + Sync {
    fn byte_len(&self) -> usize;
    fn as_any(&self) -> &dyn Any;
}

/// Bytes on the host that outlive any buffer made from them (a memory-mapped file, say).
pub type HostBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// A backend's resolved kernel for one dispatch (registry lookup done at record time).
pub type KernelHandle = Arc<dyn Any + Send + Sync>;

/// A recorded list made runnable (CPU: the list itself; CUDA: an instantiated graph).
pub trait Executable: Send {
    fn run(&mut self) -> Result<()>;
    /// Kernels one run launches on the device (CPU: its dispatches).
    fn kernel_count(&self) -> usize;
}

/// Bytes on their way to the host behind the submitted work (`Backend::read_later`).
pub trait PendingBytes: Send {
    /// Waits for the copy and writes its bytes to `dst` (as many as were asked for).
    fn finish(self: Box<Self>, dst: &mut [u8]) -> Result<()>;
}

/// Bytes read already (backends that run synchronously).
struct ReadDone(Vec<u8>);

impl PendingBytes for ReadDone {
    fn finish(self: Box<Self>, dst: &mut [u8]) -> Result<()> {
        dst.copy_from_slice(&self.0);
        Ok(())
    }
}

pub trait Backend: Send + Sync {
    fn name(&self) -> &'static str;
    /// Whether `run` and graph replays return before the device finishes (so that the host can
    /// submit more work meanwhile).
    fn asynchronous(&self) -> bool {
        false
    }
    fn alloc(&self, bytes: usize) -> Result<Box<dyn DeviceBuffer>>;
    /// Memory that kernels write and the host reads without a copy, so that `read_later` of
    /// it waits for the work before it and copies nothing on the device (CUDA: page-locked
    /// host memory mapped into the device's address space). By default `alloc`: where the
    /// device runs synchronously on the host, its memory is the host's.
    fn alloc_host_mapped(&self, bytes: usize) -> Result<Box<dyn DeviceBuffer>> {
        self.alloc(bytes)
    }
    /// A buffer holding `bytes[range]`. Backends that can read host memory use it in place.
    fn host_buffer(
        &self,
        bytes: HostBytes,
        range: std::ops::Range<usize>,
    ) -> Result<Box<dyn DeviceBuffer>>;
    fn write(&self, dst: &dyn DeviceBuffer, offset: usize, src: &[u8]) -> Result<()>;
    fn read(&self, src: &dyn DeviceBuffer, offset: usize, dst: &mut [u8]) -> Result<()>;
    /// Starts copying `len` bytes of `src` from `offset` to the host after the work submitted
    /// so far, without waiting for it (by default: waits, and reads at once). Host-mapped
    /// memory (`alloc_host_mapped`) needs no copy: the read only waits for that work.
    fn read_later(
        &self,
        src: &dyn DeviceBuffer,
        offset: usize,
        len: usize,
    ) -> Result<Box<dyn PendingBytes>> {
        let mut bytes = vec![0; len];
        self.synchronize()?;
        self.read(src, offset, &mut bytes)?;
        Ok(Box::new(ReadDone(bytes)))
    }
    /// Copy `len` bytes from `src` at `src_offset` to `dst` at `dst_offset` without a trip
    /// through host memory (in order with the work submitted before it).
    fn copy(
        &self,
        src: (&dyn DeviceBuffer, usize),
        dst: (&dyn DeviceBuffer, usize),
        len: usize,
    ) -> Result<()>;
    /// Look up the kernel for `op` on these operands (an error if there is none).
    fn resolve(&self, op: &Op, inputs: &[Tensor], outputs: &[Tensor]) -> Result<KernelHandle>;
    /// Run dispatches in order (may return before the device finishes).
    fn run(&self, dispatches: &[Dispatch]) -> Result<()>;
    /// Make a recorded list replayable.
    fn instantiate(&self, dispatches: &[Dispatch]) -> Result<Box<dyn Executable>>;
    /// Wait until all submitted work is finished.
    fn synchronize(&self) -> Result<()>;
    /// Bytes of device memory currently allocated through this backend.
    fn allocated_bytes(&self) -> usize;
    /// Whether a one-row `Op::MatMul` without a norm of a weight (`layout`, `[n, k]`) reads x's
    /// f16 copy (`half_x`) where given: only then is it worth having the producer write one.
    fn matvec_reads_half_x(&self, _layout: WeightLayout, _n: usize, _k: usize) -> bool {
        false
    }
    /// Whether a plain `Op::MatMul` of `m` rows of x and a weight (`layout`, `[n, k]`) reads f16
    /// x where it lies, sparing the pass that would round x to f16 for its products: only then
    /// is it worth having x's producer write f16.
    fn matmul_reads_half_x(&self, _layout: WeightLayout, _m: usize, _n: usize, _k: usize) -> bool {
        false
    }
    /// Whether a one-row `Op::MatMul` with `pre_norm` of a weight (`layout`, `[n, k]`) computes the norm
    /// in its own kernel rather than launching one in front: only then do several normed
    /// matmuls of one x cost no more launches than one norm and plain matmuls.
    fn matvec_folds_norm(&self, _layout: WeightLayout, _n: usize, _k: usize) -> bool {
        true
    }
}
