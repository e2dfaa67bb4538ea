//! The CUDA backend (cudarc: driver API, NVRTC). The driver is loaded at run time, so the crate
//! builds and runs where CUDA is absent; `Device::parse("cuda")` then reports it unavailable.
//!
//! One context and one stream per device; every copy and kernel goes through the stream, so
//! the context's cross-stream event tracking is switched off. Kernel sources are compiled by
//! NVRTC for the device's architecture on first use (compile.rs). At record time a dispatch is
//! resolved into launches with fixed arguments (launch.rs, planned per op family in kernels/);
//! values that change per token are read by kernels from device buffers, so `instantiate` can
//! capture one pass over a recording into a CUDA graph that replays with new positions.

mod compile;
mod kernels;
mod launch;

use std::any::Any;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{
    cuMemHostGetDevicePointer_v2, CUgraphInstantiate_flags, CUstreamCaptureMode,
    CU_MEMHOSTALLOC_DEVICEMAP,
};
use cudarc::driver::{
    result as driver, CudaContext, CudaEvent, CudaGraph, CudaSlice, CudaStream, DevicePtr,
    DriverError, PinnedHostSlice,
};

use crate::core::backend::{
    Backend, DeviceBuffer, Executable, HostBytes, KernelHandle, PendingBytes,
};
use crate::core::device::Device;
use crate::core::encoder::Dispatch;
use crate::core::op::Op;
use crate::core::registry::Registry;
use crate::core::tensor::Tensor;
use crate::quant::WeightLayout;
use crate::{Error, Result};

use launch::{CudaKernel, KernelLibrary, Planner};

/// Whether a CUDA driver library can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: only tries to load the library; no other CUDA state is touched.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Choices a CUDA device is made with (`cuda_device_with`).
#[derive(Clone, Copy, Debug)]
pub struct CudaOptions {
    /// Long prompts' products through cuBLAS where its library loads (matmul.rs
    /// `dequant_gemm`); off, they stay on this crate's tensor-core tiles, which need no f16 copy
    /// of a weight.
    pub cublas: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions { cublas: true }
    }
}

/// The device `cuda:ordinal`, or `DeviceUnavailable` when there is no driver or no such GPU.
pub fn cuda_device(ordinal: usize) -> Result<Device> {
    cuda_device_with(ordinal, CudaOptions::default())
}

/// `cuda_device` with `options`.
pub fn cuda_device_with(ordinal: usize, options: CudaOptions) -> Result<Device> {
    if !driver_present() {
        return Err(Error::DeviceUnavailable(format!(
            "cuda:{ordinal}: no CUDA driver library found on this machine"
        )));
    }
    let backend = CudaBackend::new(ordinal, options)?;
    Ok(Device::new(Box::new(backend), format!("cuda:{ordinal}")))
}

/// A driver error as the crate's: `OutOfMemory` where the device had no memory for what was
/// being done (any allocation: buffers, scratch, graphs), `Cuda` otherwise.
pub(crate) fn driver_err(what: &str) -> impl Fn(DriverError) -> Error + '_ {
    move |e| match e.0 {
        cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
            Error::OutOfMemory(what.to_string())
        }
        _ => Error::Cuda(format!("{what}: {e}")),
    }
}

/// Memory kernels address: device memory (freed stream-ordered when the last handle goes), or
/// page-locked host memory mapped into the device's address space (`alloc_host_mapped`).
pub struct CudaBuffer {
    memory: Memory,
    /// The address kernels and copies use.
    ptr: u64,
    allocated: Arc<AtomicUsize>,
}

enum Memory {
    Device(CudaSlice<u8>),
    /// With the stream whose kernels may write it: freed only after they are done.
    HostMapped(PinnedHostSlice<u8>, Arc<CudaStream>),
}

impl CudaBuffer {
    fn len(&self) -> usize {
        match &self.memory {
            Memory::Device(slice) => slice.len(),
            Memory::HostMapped(host, _) => host.len(),
        }
    }
}

impl Drop for CudaBuffer {
    fn drop(&mut self) {
        match &self.memory {
            Memory::Device(slice) => {
                self.allocated.fetch_sub(slice.len(), Ordering::Relaxed);
            }
            // Errors have nowhere to go here; the stream reports them on its next use.
            Memory::HostMapped(_, stream) => {
                let _ = stream.synchronize();
            }
        }
    }
}

impl DeviceBuffer for CudaBuffer {
    fn byte_len(&self) -> usize {
        self.len()
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

fn cuda_buffer(b: &dyn DeviceBuffer) -> Result<&CudaBuffer> {
    b.as_any()
        .downcast_ref::<CudaBuffer>()
        .ok_or_else(|| Error::Invalid("buffer is not in CUDA device memory".into()))
}

/// The device address of an allocation. (Event tracking is off, so this records nothing.)
pub(crate) fn address(slice: &CudaSlice<u8>, stream: &CudaStream) -> u64 {
    let (ptr, _no_event) = slice.device_ptr(stream);
    ptr
}

/// The device address of a tensor's first byte.
pub(crate) fn device_ptr(t: &Tensor) -> Result<u64> {
    Ok(cuda_buffer(t.buffer().storage())?.ptr + t.offset() as u64)
}

pub struct CudaBackend {
    stream: Arc<CudaStream>,
    library: KernelLibrary,
    registry: Registry<Planner>,
    allocated: Arc<AtomicUsize>,
    /// Page-locked staging for `read_later`, reused (a decode step's token read each step).
    read_slots: Arc<Mutex<Vec<ReadSlot>>>,
}

/// Page-locked host memory a device-to-host copy lands in, and the event after that copy.
struct ReadSlot {
    host: PinnedHostSlice<u8>,
    copied: CudaEvent,
}

impl Drop for ReadSlot {
    fn drop(&mut self) {
        // A copy may still be landing (its read was dropped unfinished): wait before the memory
        // is freed. Errors have nowhere to go here; the stream reports them on its next use.
        let _ = self.copied.synchronize();
    }
}

/// A `read_later` in flight; its slot goes back to the backend's when it is done with.
struct CudaPendingBytes {
    slot: Option<ReadSlot>,
    /// Where the bytes are once the slot's event has passed.
    source: ReadSource,
    len: usize,
    slots: Arc<Mutex<Vec<ReadSlot>>>,
}

enum ReadSource {
    /// Copied into the slot's own page-locked memory.
    Staging,
    /// Written by kernels into host-mapped memory, read in place: the address of the first
    /// byte (`Tensor::read_later` keeps the buffer alive until the read is finished).
    HostMapped(*const u8),
}

// SAFETY: the pointer is only read, after the event that orders it behind the kernels writing
// it; the memory outlives the read (see `ReadSource::HostMapped`).
unsafe impl Send for ReadSource {}

impl PendingBytes for CudaPendingBytes {
    fn finish(self: Box<Self>, dst: &mut [u8]) -> Result<()> {
        let slot = self
            .slot
            .as_ref()
            .ok_or_else(|| Error::Invalid("a device read without its staging memory".into()))?;
        slot.copied
            .synchronize()
            .map_err(driver_err("waiting for a device-to-host read"))?;
        match self.source {
            ReadSource::Staging => {
                let host = slot
                    .host
                    .as_slice()
                    .map_err(driver_err("reading page-locked memory"))?;
                dst.copy_from_slice(&host[..self.len]);
            }
            // SAFETY: `len` bytes at the address lie in the live host-mapped buffer (checked by
            // `range_ptr`), and the kernels that wrote them are done (the event above).
            ReadSource::HostMapped(from) => unsafe {
                std::ptr::copy_nonoverlapping(from, dst.as_mut_ptr(), self.len)
            },
        }
        Ok(())
    }
}

impl Drop for CudaPendingBytes {
    fn drop(&mut self) {
        if let (Some(slot), Ok(mut slots)) = (self.slot.take(), self.slots.lock()) {
            slots.push(slot);
        }
    }
}

impl CudaBackend {
    pub fn new(ordinal: usize, options: CudaOptions) -> Result<Self> {
        let unavailable = |e: DriverError| Error::DeviceUnavailable(format!("cuda:{ordinal}: {e}"));
        let count = CudaContext::device_count().map_err(unavailable)?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::DeviceUnavailable(format!(
                "cuda:{ordinal}: this machine has {count} CUDA device(s)"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(unavailable)?;
        // SAFETY: all memory of this backend is used on the one stream below, in order, so the
        // per-buffer events that order work across streams are not needed; they would also
        // put event waits into captured graphs. Switched off before anything is allocated.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(driver_err("creating a stream"))?;
        let mut registry = Registry::new("cuda");
        kernels::register(&mut registry);
        Ok(CudaBackend {
            library: KernelLibrary::new(stream.clone(), options.cublas)?,
            stream,
            registry,
            allocated: Arc::new(AtomicUsize::new(0)),
            read_slots: Arc::new(Mutex::new(Vec::new())),
        })
    }

    /// A staging slot of at least `len` bytes: a free one, else a new one.
    fn read_slot(&self, len: usize) -> Result<ReadSlot> {
        let mut slots = self
            .read_slots
            .lock()
            .map_err(|_| Error::Invalid("a device read panicked".into()))?;
        if let Some(i) = slots.iter().position(|s| s.host.len() >= len) {
            return Ok(slots.swap_remove(i));
        }
        drop(slots);
        let ctx = self.stream.context();
        // SAFETY: the memory is written by the copy before it is read.
        let host = unsafe { ctx.alloc_pinned_with_flags::<u8>(len.max(64), 0) }
            .map_err(driver_err("allocating page-locked memory"))?;
        let copied = ctx
            .new_event(None)
            .map_err(driver_err("creating an event"))?;
        Ok(ReadSlot { host, copied })
    }

    fn new_buffer(&self, bytes: usize) -> Result<CudaBuffer> {
        // SAFETY: the contents are unspecified until written, as `Backend::alloc` allows.
        let slice = unsafe { self.stream.alloc::<u8>(bytes.max(1)) }
            .map_err(driver_err(&format!("allocating {bytes} bytes")))?;
        let ptr = address(&slice, &self.stream);
        self.allocated.fetch_add(slice.len(), Ordering::Relaxed);
        Ok(CudaBuffer {
            memory: Memory::Device(slice),
            ptr,
            allocated: self.allocated.clone(),
        })
    }

    /// Checks that `offset..offset+len` lies inside the buffer and returns its address.
    fn range_ptr(&self, b: &CudaBuffer, offset: usize, len: usize) -> Result<u64> {
        if offset.checked_add(len).is_none_or(|end| end > b.len()) {
            return Err(Error::Invalid(format!(
                "copy of {len} bytes at offset {offset} outside a device buffer of {} bytes",
                b.len()
            )));
        }
        Ok(b.ptr + offset as u64)
    }
}

fn kernel_of(d: &Dispatch) -> Result<&CudaKernel> {
    d.kernel
        .downcast_ref::<CudaKernel>()
        .ok_or_else(|| Error::Invalid("dispatch was not resolved by the CUDA backend".into()))
}

/// A captured recording: one CUDA graph launch replays every kernel (`kernels` of them).
struct CudaGraphExec {
    graph: Option<CudaGraph>,
    kernels: usize,
}

// SAFETY: CUDA graphs may be used from any thread as long as calls do not overlap; this one
// is only reached through `&mut self`.
unsafe impl Send for CudaGraphExec {}

impl Executable for CudaGraphExec {
    fn kernel_count(&self) -> usize {
        self.kernels
    }

    fn run(&mut self) -> Result<()> {
        match &self.graph {
            Some(graph) => graph.launch().map_err(driver_err("graph launch")),
            None => Ok(()),
        }
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn matvec_reads_half_x(&self, layout: WeightLayout, n: usize, k: usize) -> bool {
        kernels::matvec_reads_half_x(self.library.sm_count(), layout, n, k)
    }

    fn matmul_reads_half_x(&self, layout: WeightLayout, m: usize, n: usize, k: usize) -> bool {
        kernels::matmul_reads_half_x(&self.library, layout, (m, k, n))
    }

    fn matvec_folds_norm(&self, layout: WeightLayout, n: usize, k: usize) -> bool {
        kernels::matvec_folds_norm(self.library.sm_count(), layout, n, k)
    }

    fn asynchronous(&self) -> bool {
        true
    }

    fn alloc(&self, bytes: usize) -> Result<Box<dyn DeviceBuffer>> {
        Ok(Box::new(self.new_buffer(bytes)?))
    }

    fn alloc_host_mapped(&self, bytes: usize) -> Result<Box<dyn DeviceBuffer>> {
        let what = format!("allocating {bytes} bytes of host-mapped memory");
        let ctx = self.stream.context();
        // SAFETY: the contents are unspecified until written, as `Backend::alloc` allows.
        let host =
            unsafe { ctx.alloc_pinned_with_flags::<u8>(bytes.max(1), CU_MEMHOSTALLOC_DEVICEMAP) }
                .map_err(driver_err(&what))?;
        let host_ptr = host.as_ptr().map_err(driver_err(&what))?;
        let mut ptr = 0;
        // SAFETY: `host_ptr` was allocated with DEVICEMAP in this (current) context.
        unsafe { cuMemHostGetDevicePointer_v2(&mut ptr, host_ptr as *mut _, 0) }
            .result()
            .map_err(driver_err(&what))?;
        Ok(Box::new(CudaBuffer {
            memory: Memory::HostMapped(host, self.stream.clone()),
            ptr,
            allocated: self.allocated.clone(),
        }))
    }

    fn host_buffer(
        &self,
        bytes: HostBytes,
        range: std::ops::Range<usize>,
    ) -> Result<Box<dyn DeviceBuffer>> {
        let all = (*bytes).as_ref();
        let src = all.get(range.clone()).ok_or_else(|| {
            Error::Invalid(format!("host range {range:?} outside {} bytes", all.len()))
        })?;
        let buf = self.new_buffer(src.len())?;
        self.write(&buf, 0, src)?;
        Ok(Box::new(buf))
    }

    fn write(&self, dst: &dyn DeviceBuffer, offset: usize, src: &[u8]) -> Result<()> {
        let ptr = self.range_ptr(cuda_buffer(dst)?, offset, src.len())?;
        self.stream
            .context()
            .bind_to_thread()
            .map_err(driver_err("binding the context"))?;
        // SAFETY: the range was checked; the copy is finished before `src` is released.
        unsafe { driver::memcpy_htod_async(ptr, src, self.stream.cu_stream()) }
            .map_err(driver_err("host-to-device copy"))?;
        self.synchronize()
    }

    fn read(&self, src: &dyn DeviceBuffer, offset: usize, dst: &mut [u8]) -> Result<()> {
        let ptr = self.range_ptr(cuda_buffer(src)?, offset, dst.len())?;
        self.stream
            .context()
            .bind_to_thread()
            .map_err(driver_err("binding the context"))?;
        // SAFETY: the range was checked; `dst` is filled before the stream synchronizes.
        unsafe { driver::memcpy_dtoh_async(dst, ptr, self.stream.cu_stream()) }
            .map_err(driver_err("device-to-host copy"))?;
        self.synchronize()
    }

    fn read_later(
        &self,
        src: &dyn DeviceBuffer,
        offset: usize,
        len: usize,
    ) -> Result<Box<dyn PendingBytes>> {
        let buffer = cuda_buffer(src)?;
        let ptr = self.range_ptr(buffer, offset, len)?;
        // Host-mapped memory is read in place: its slot serves for the event alone.
        let staged = match &buffer.memory {
            Memory::HostMapped(..) => 0,
            Memory::Device(_) => len,
        };
        let mut slot = self.read_slot(staged)?;
        self.stream
            .context()
            .bind_to_thread()
            .map_err(driver_err("binding the context"))?;
        // Host-mapped memory needs no copy, only the event: a copy between replayed decode
        // steps cost ~10 µs of the device's time a token (H100, 2026-11-27), the event nothing
        // measurable.
        let source = match &buffer.memory {
            Memory::HostMapped(host, _) => ReadSource::HostMapped(
                // SAFETY: `offset + len` lies inside the buffer (`range_ptr` above).
                unsafe {
                    host.as_ptr()
                        .map_err(driver_err("host-mapped memory"))?
                        .add(offset)
                },
            ),
            Memory::Device(_) => {
                let host = slot
                    .host
                    .as_mut_slice()
                    .map_err(driver_err("page-locked memory"))?;
                // SAFETY: the range was checked; the slot's memory stays allocated until the
                // copy is done (ReadSlot waits for it before freeing).
                unsafe {
                    driver::memcpy_dtoh_async(&mut host[..len], ptr, self.stream.cu_stream())
                }
                .map_err(driver_err("device-to-host copy"))?;
                ReadSource::Staging
            }
        };
        slot.copied
            .record(&self.stream)
            .map_err(driver_err("recording an event"))?;
        Ok(Box::new(CudaPendingBytes {
            slot: Some(slot),
            source,
            len,
            slots: self.read_slots.clone(),
        }))
    }

    fn copy(
        &self,
        (src, src_offset): (&dyn DeviceBuffer, usize),
        (dst, dst_offset): (&dyn DeviceBuffer, usize),
        len: usize,
    ) -> Result<()> {
        let from = self.range_ptr(cuda_buffer(src)?, src_offset, len)?;
        let to = self.range_ptr(cuda_buffer(dst)?, dst_offset, len)?;
        self.stream
            .context()
            .bind_to_thread()
            .map_err(driver_err("binding the context"))?;
        // SAFETY: both ranges were checked and are device memory of this stream's context.
        unsafe { driver::memcpy_dtod_async(to, from, len, self.stream.cu_stream()) }
            .map_err(driver_err("device-to-device copy"))
    }

    fn resolve(&self, op: &Op, inputs: &[Tensor], outputs: &[Tensor]) -> Result<KernelHandle> {
        let dtype = outputs
            .first()
            .map(|t| t.dtype())
            .ok_or_else(|| Error::op(op.name(), "no output"))?;
        let planner = self.registry.lookup(op, dtype)?;
        Ok(Arc::new(planner(&self.library, op, inputs, outputs)?))
    }

    fn run(&self, dispatches: &[Dispatch]) -> Result<()> {
        dispatches
            .iter()
            .try_for_each(|d| kernel_of(d)?.enqueue(&self.stream))
    }

    fn instantiate(&self, dispatches: &[Dispatch]) -> Result<Box<dyn Executable>> {
        let kernels = dispatches
            .iter()
            .map(kernel_of)
            .collect::<Result<Vec<_>>>()?;
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(driver_err("begin stream capture"))?;
        let launched = kernels.iter().try_for_each(|k| k.enqueue(&self.stream));
        // Always end the capture, so that a failed launch leaves the stream usable.
        let graph = self
            .stream
            .end_capture(CUgraphInstantiate_flags(0))
            .map_err(driver_err("end stream capture"));
        launched?;
        Ok(Box::new(CudaGraphExec {
            graph: graph?,
            kernels: kernels.iter().map(|k| k.launch_count()).sum(),
        }))
    }

    fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(driver_err("stream synchronize"))
    }

    fn allocated_bytes(&self) -> usize {
        self.allocated.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An allocation the device has no memory for is `OutOfMemory`, naming what was allocated
    /// (`mlxn bench` halves its bandwidth probe on it). Not formatted: other driver errors are,
    /// through the driver library, which a machine without CUDA lacks.
    #[test]
    fn out_of_memory_is_its_own_error() {
        let oom = DriverError(cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY);
        match driver_err("allocating 8 bytes")(oom) {
            Error::OutOfMemory(what) => assert_eq!(what, "allocating 8 bytes"),
            other => panic!("{other:?}"),
        }
    }
}
