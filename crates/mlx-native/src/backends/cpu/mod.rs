//! The CPU backend: host memory, kernels written in Rust (f32 accumulation, rayon threads).
//! It is the reference every other backend is tested against.

mod attention;
mod elementwise;
mod embedding;
mod matmul;
mod norm;
mod qmatmul_gguf;
mod qmatmul_mlx;
mod rope;
mod sampling;

use std::any::Any;
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::core::backend::{Backend, DeviceBuffer, Executable, HostBytes, KernelHandle};
use crate::core::dtype::Element;
use crate::core::encoder::Dispatch;
use crate::core::op::Op;
use crate::core::registry::Registry;
use crate::core::tensor::Tensor;
use crate::{Error, Result};

/// A CPU kernel: reads `inputs`, writes `outputs`. Shapes were checked by `ops`.
pub(crate) type CpuKernel = fn(&Op, &[Tensor], &[Tensor]) -> Result<()>;

enum Memory {
    /// 64-byte-aligned chunks so that every dtype and SIMD load is aligned.
    Owned(UnsafeCell<Vec<Align64>>),
    /// Read-only bytes owned elsewhere (a memory-mapped file).
    Host(HostBytes, std::ops::Range<usize>),
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Align64([u8; 64]);

pub struct CpuBuffer {
    memory: Memory,
    len: usize,
}

// SAFETY: mutation happens only through `slice_mut`, whose callers (kernels run one dispatch
// at a time by the encoder, which rejects outputs overlapping inputs) hold the only access.
unsafe impl Sync for CpuBuffer {}
unsafe impl Send for CpuBuffer {}

impl CpuBuffer {
    fn ptr(&self) -> *const u8 {
        match &self.memory {
            // SAFETY: reading the pointer does not create a reference to the contents.
            Memory::Owned(cell) => unsafe { (*cell.get()).as_ptr() as *const u8 },
            Memory::Host(bytes, range) => (**bytes).as_ref()[range.start..].as_ptr(),
        }
    }
}

impl DeviceBuffer for CpuBuffer {
    fn byte_len(&self) -> usize {
        self.len
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

fn cpu_buffer(t: &Tensor) -> Result<&CpuBuffer> {
    t.buffer()
        .storage()
        .as_any()
        .downcast_ref::<CpuBuffer>()
        .ok_or_else(|| Error::Invalid("tensor is not in CPU memory".into()))
}

/// The tensor's elements as a slice.
pub(crate) fn slice<T: Element>(t: &Tensor) -> Result<&[T]> {
    check_dtype::<T>(t)?;
    let buf = cpu_buffer(t)?;
    // SAFETY: bounds were checked when the tensor was made; alignment holds (owned memory is
    // 64-aligned, host memory is copied unless 4-aligned, and offsets are element multiples).
    Ok(unsafe {
        std::slice::from_raw_parts(buf.ptr().add(t.offset()) as *const T, t.elem_count())
    })
}

/// The tensor's elements as a mutable slice (outputs of the running kernel only).
#[allow(clippy::mut_from_ref)]
pub(crate) fn slice_mut<T: Element>(t: &Tensor) -> Result<&mut [T]> {
    check_dtype::<T>(t)?;
    let buf = cpu_buffer(t)?;
    if matches!(buf.memory, Memory::Host(..)) {
        return Err(Error::Invalid("write into read-only mapped memory".into()));
    }
    // SAFETY: see `CpuBuffer`'s Sync impl; bounds and alignment as in `slice`.
    Ok(unsafe {
        std::slice::from_raw_parts_mut(buf.ptr().add(t.offset()) as *mut T, t.elem_count())
    })
}

fn check_dtype<T: Element>(t: &Tensor) -> Result<()> {
    if T::DTYPE != t.dtype() {
        return Err(Error::Invalid(format!(
            "kernel expected {} but tensor is {}",
            T::DTYPE,
            t.dtype()
        )));
    }
    if t.offset() % std::mem::align_of::<T>() != 0 {
        return Err(Error::Invalid("misaligned tensor offset".into()));
    }
    Ok(())
}

pub struct CpuBackend {
    registry: Registry<CpuKernel>,
    allocated: Arc<AtomicUsize>,
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuBackend {
    pub fn new() -> Self {
        let mut registry = Registry::new("cpu");
        attention::register(&mut registry);
        elementwise::register(&mut registry);
        embedding::register(&mut registry);
        matmul::register(&mut registry);
        norm::register(&mut registry);
        rope::register(&mut registry);
        sampling::register(&mut registry);
        CpuBackend {
            registry,
            allocated: Arc::new(AtomicUsize::new(0)),
        }
    }
}

fn kernel_of(d: &Dispatch) -> Result<CpuKernel> {
    d.kernel
        .downcast_ref::<CpuKernel>()
        .copied()
        .ok_or_else(|| Error::Invalid("dispatch was not resolved by the CPU backend".into()))
}

struct CpuGraph {
    steps: Vec<(CpuKernel, Dispatch)>,
}

impl Executable for CpuGraph {
    fn run(&mut self) -> Result<()> {
        for (kernel, d) in &self.steps {
            kernel(&d.op, &d.inputs, &d.outputs)?;
        }
        Ok(())
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn alloc(&self, bytes: usize) -> Result<Box<dyn DeviceBuffer>> {
        let chunks = bytes.div_ceil(64);
        self.allocated.fetch_add(chunks * 64, Ordering::Relaxed);
        Ok(Box::new(CpuBuffer {
            memory: Memory::Owned(UnsafeCell::new(vec![Align64([0; 64]); chunks])),
            len: bytes,
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
        if (src.as_ptr() as usize) % 4 == 0 {
            return Ok(Box::new(CpuBuffer {
                len: src.len(),
                memory: Memory::Host(bytes, range),
            }));
        }
        // Unaligned data (some safetensors headers): copy once into aligned memory.
        let buf = self.alloc(src.len())?;
        self.write(buf.as_ref(), 0, src)?;
        Ok(buf)
    }

    fn write(&self, dst: &dyn DeviceBuffer, offset: usize, src: &[u8]) -> Result<()> {
        let buf = dst
            .as_any()
            .downcast_ref::<CpuBuffer>()
            .ok_or_else(|| Error::Invalid("not a CPU buffer".into()))?;
        if matches!(buf.memory, Memory::Host(..)) || offset + src.len() > buf.len {
            return Err(Error::Invalid("write outside a writable CPU buffer".into()));
        }
        // SAFETY: bounds checked above; no kernel runs concurrently with host writes.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), (buf.ptr() as *mut u8).add(offset), src.len())
        };
        Ok(())
    }

    fn read(&self, src: &dyn DeviceBuffer, offset: usize, dst: &mut [u8]) -> Result<()> {
        let buf = src
            .as_any()
            .downcast_ref::<CpuBuffer>()
            .ok_or_else(|| Error::Invalid("not a CPU buffer".into()))?;
        if offset + dst.len() > buf.len {
            return Err(Error::Invalid("read outside a CPU buffer".into()));
        }
        // SAFETY: bounds checked above.
        unsafe { std::ptr::copy_nonoverlapping(buf.ptr().add(offset), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn resolve(&self, op: &Op, _inputs: &[Tensor], outputs: &[Tensor]) -> Result<KernelHandle> {
        let dtype = outputs
            .first()
            .map(|t| t.dtype())
            .ok_or_else(|| Error::op(op.name(), "no output"))?;
        let kernel: CpuKernel = self.registry.lookup(op, dtype)?;
        Ok(Arc::new(kernel))
    }

    fn run(&self, dispatches: &[Dispatch]) -> Result<()> {
        for d in dispatches {
            kernel_of(d)?(&d.op, &d.inputs, &d.outputs)?;
        }
        Ok(())
    }

    fn instantiate(&self, dispatches: &[Dispatch]) -> Result<Box<dyn Executable>> {
        let steps = dispatches
            .iter()
            .map(|d| Ok((kernel_of(d)?, d.clone())))
            .collect::<Result<Vec<_>>>()?;
        Ok(Box::new(CpuGraph { steps }))
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn allocated_bytes(&self) -> usize {
        self.allocated.load(Ordering::Relaxed)
    }
}

/// A float tensor's values as f32 (borrowed when already f32).
pub(crate) fn floats(t: &Tensor) -> Result<std::borrow::Cow<'_, [f32]>> {
    use crate::core::dtype::DType;
    Ok(match t.dtype() {
        DType::F32 => std::borrow::Cow::Borrowed(slice::<f32>(t)?),
        DType::F16 => slice::<half::f16>(t)?.iter().map(|v| v.to_f32()).collect(),
        DType::BF16 => slice::<half::bf16>(t)?.iter().map(|v| v.to_f32()).collect(),
        other => {
            return Err(Error::Invalid(format!("expected a float tensor, found {other}")));
        }
    })
}

/// The u32 scalar at the start of `t` (positions, token ids).
pub(crate) fn scalar_u32(t: &Tensor) -> Result<usize> {
    Ok(*slice::<u32>(t)?
        .first()
        .ok_or_else(|| Error::Invalid("empty scalar tensor".into()))? as usize)
}

/// The error for a kernel handed an op of another family (a registry mistake).
pub(crate) fn wrong_op(op: &Op) -> Error {
    Error::Invalid(format!("CPU kernel registered for another op received {}", op.name()))
}
