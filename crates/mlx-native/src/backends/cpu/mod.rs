//! The CPU backend: host memory, kernels written in Rust (f32 accumulation, rayon threads).
//! It is the reference every other backend is tested against.

mod attention;
mod elementwise;
mod embedding;
mod matmul;
mod moe;
mod norm;
mod qmatmul_gguf;
mod qmatmul_mlx;
mod rope;
mod sampling;

use std::any::Any;
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use crate::core::backend::{Backend, DeviceBuffer, Executable, HostBytes, KernelHandle};
use crate::core::dtype::{DType, Element};
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

fn as_cpu(b: &dyn DeviceBuffer) -> Result<&CpuBuffer> {
    b.as_any()
        .downcast_ref::<CpuBuffer>()
        .ok_or_else(|| Error::Invalid("not a CPU buffer".into()))
}

fn cpu_buffer(t: &Tensor) -> Result<&CpuBuffer> {
    as_cpu(t.buffer().storage())
}

/// The tensor's elements as a slice.
pub(crate) fn slice<T: Element>(t: &Tensor) -> Result<&[T]> {
    check_dtype::<T>(t)?;
    let buf = cpu_buffer(t)?;
    // SAFETY: bounds were checked when the tensor was made; alignment holds (owned memory is
    // 64-aligned, host memory is copied unless 4-aligned, and offsets are element multiples).
    Ok(
        unsafe {
            std::slice::from_raw_parts(buf.ptr().add(t.offset()) as *const T, t.elem_count())
        },
    )
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

/// `kernel` (an op on f32 outputs) writing its one output as f16: it runs into an f32 stand-in,
/// which is then rounded into the output (f16 activations, `ops::ACTIVATIONS`).
pub(crate) fn into_half(
    op: &Op,
    inputs: &[Tensor],
    outputs: &[Tensor],
    kernel: CpuKernel,
) -> Result<()> {
    let [out] = outputs else {
        return Err(Error::op(op.name(), "one f16 output expected"));
    };
    let wide = out.device().empty(out.shape(), DType::F32)?;
    kernel(op, inputs, std::slice::from_ref(&wide))?;
    write_half_copy(&wide, Some(out))
}

/// `x` as f32: x itself, or its f16 values widened into a new tensor.
pub(crate) fn widened(x: &Tensor) -> Result<Tensor> {
    if x.dtype() == DType::F32 {
        return Ok(x.clone());
    }
    let wide = x.device().empty(x.shape(), DType::F32)?;
    wide.write(&x.to_f32_vec()?)?;
    Ok(wide)
}

/// Writes `copy` (f16, if given) = `values` (f32) rounded to nearest: the f16 copy of a row
/// some ops write beside their output (`GatedMatMul::half_out`, `RopeAttention::half_out`).
pub(crate) fn write_half_copy(values: &Tensor, copy: Option<&Tensor>) -> Result<()> {
    let Some(copy) = copy else { return Ok(()) };
    let halves = slice_mut::<half::f16>(copy)?;
    for (h, &v) in halves.iter_mut().zip(slice::<f32>(values)?) {
        *h = half::f16::from_f32(v);
    }
    Ok(())
}

/// An element type of KV caches: f32, or f16 (stores rounded to nearest, reads widened to
/// f32). Cache kernels are written once over it.
pub(crate) trait CacheElement: Element {
    /// `x` as the cache stores it.
    fn store(x: f32) -> Self;
    /// `src` as f32: `src` itself for f32 caches, else widened into `scratch`.
    fn as_f32<'a>(src: &'a [Self], scratch: &'a mut Vec<f32>) -> &'a [f32];
}

impl CacheElement for f32 {
    #[inline(always)]
    fn store(x: f32) -> f32 {
        x
    }
    fn as_f32<'a>(src: &'a [f32], _: &'a mut Vec<f32>) -> &'a [f32] {
        src
    }
}

impl CacheElement for half::f16 {
    #[inline(always)]
    fn store(x: f32) -> half::f16 {
        half::f16::from_f32(x)
    }
    fn as_f32<'a>(src: &'a [half::f16], scratch: &'a mut Vec<f32>) -> &'a [f32] {
        use half::slice::HalfFloatSliceExt;
        scratch.clear();
        scratch.resize(src.len(), 0.0);
        src.convert_to_f32_slice(scratch);
        scratch
    }
}

fn check_dtype<T: Element>(t: &Tensor) -> Result<()> {
    if T::DTYPE != t.dtype() {
        return Err(Error::Invalid(format!(
            "kernel expected {} but tensor is {}",
            T::DTYPE,
            t.dtype()
        )));
    }
    if !t.offset().is_multiple_of(std::mem::align_of::<T>()) {
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
        moe::register(&mut registry);
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

/// Runs `f` on a thread of the kernels' pool (rayon's default size, `RAYON_NUM_THREADS`),
/// so that every kernel's parallel loop starts inside the pool: other threads join it by
/// stealing, and the caller hands work over and waits once per submission, not once per
/// kernel. Without a pool (threads could not be started) kernels use rayon's global one.
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    match POOL.get_or_init(|| rayon::ThreadPoolBuilder::new().build().ok()) {
        Some(pool) => pool.install(f),
        None => f(),
    }
}

struct CpuGraph {
    steps: Vec<(CpuKernel, Dispatch)>,
}

impl Executable for CpuGraph {
    fn kernel_count(&self) -> usize {
        self.steps.len()
    }

    fn run(&mut self) -> Result<()> {
        let steps = &self.steps;
        on_pool(|| {
            for (kernel, d) in steps {
                kernel(&d.op, &d.inputs, &d.outputs)?;
            }
            Ok(())
        })
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
        if (src.as_ptr() as usize).is_multiple_of(4) {
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
        let buf = as_cpu(dst)?;
        if matches!(buf.memory, Memory::Host(..)) || offset + src.len() > buf.len {
            return Err(Error::Invalid("write outside a writable CPU buffer".into()));
        }
        // SAFETY: bounds checked above; no kernel runs concurrently with host writes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr(),
                (buf.ptr() as *mut u8).add(offset),
                src.len(),
            )
        };
        Ok(())
    }

    fn read(&self, src: &dyn DeviceBuffer, offset: usize, dst: &mut [u8]) -> Result<()> {
        let buf = as_cpu(src)?;
        if offset + dst.len() > buf.len {
            return Err(Error::Invalid("read outside a CPU buffer".into()));
        }
        // SAFETY: bounds checked above.
        unsafe {
            std::ptr::copy_nonoverlapping(buf.ptr().add(offset), dst.as_mut_ptr(), dst.len())
        };
        Ok(())
    }

    fn copy(
        &self,
        (src, src_offset): (&dyn DeviceBuffer, usize),
        (dst, dst_offset): (&dyn DeviceBuffer, usize),
        len: usize,
    ) -> Result<()> {
        let (from, to) = (as_cpu(src)?, as_cpu(dst)?);
        let within =
            |b: &CpuBuffer, offset: usize| offset.checked_add(len).is_some_and(|e| e <= b.len);
        let writable = !matches!(to.memory, Memory::Host(..));
        if !within(from, src_offset) || !within(to, dst_offset) || !writable {
            return Err(Error::Invalid(
                "copy outside CPU buffers or into read-only bytes".into(),
            ));
        }
        // SAFETY: both ranges checked above (they may overlap: `copy` is memmove); no kernel
        // runs concurrently with host-side copies.
        unsafe {
            std::ptr::copy(
                from.ptr().add(src_offset),
                (to.ptr() as *mut u8).add(dst_offset),
                len,
            )
        };
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
        on_pool(|| {
            for d in dispatches {
                kernel_of(d)?(&d.op, &d.inputs, &d.outputs)?;
            }
            Ok(())
        })
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

/// A float tensor's elements in their stored type, for kernels that convert to f32 a range
/// at a time (weights too large to convert whole on every call).
#[derive(Clone, Copy)]
pub(crate) enum FloatSlice<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
    BF16(&'a [half::bf16]),
}

impl<'a> FloatSlice<'a> {
    pub(crate) fn of(t: &'a Tensor) -> Result<Self> {
        use crate::core::dtype::DType;
        Ok(match t.dtype() {
            DType::F32 => FloatSlice::F32(slice(t)?),
            DType::F16 => FloatSlice::F16(slice(t)?),
            DType::BF16 => FloatSlice::BF16(slice(t)?),
            other => {
                return Err(Error::Invalid(format!(
                    "expected a float tensor, found {other}"
                )));
            }
        })
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            FloatSlice::F32(s) => s.len(),
            FloatSlice::F16(s) => s.len(),
            FloatSlice::BF16(s) => s.len(),
        }
    }

    /// Elements `start..start + scratch.len()` as f32: borrowed when stored as f32, else
    /// converted into `scratch`.
    pub(crate) fn f32_range<'s>(
        &'s self,
        start: usize,
        scratch: &'s mut [f32],
    ) -> Result<&'s [f32]> {
        if let FloatSlice::F32(s) = self {
            let range = start..start + scratch.len();
            return s
                .get(range.clone())
                .ok_or_else(|| Error::Invalid(format!("elements {range:?} of {}", s.len())));
        }
        self.convert(start, scratch)?;
        Ok(scratch)
    }

    /// Elements `start..start + out.len()` converted into `out`.
    pub(crate) fn convert(&self, start: usize, out: &mut [f32]) -> Result<()> {
        let range = start..start + out.len();
        let outside = || Error::Invalid(format!("elements {range:?} of {}", self.len()));
        match self {
            FloatSlice::F32(s) => out.copy_from_slice(s.get(range.clone()).ok_or_else(outside)?),
            FloatSlice::F16(s) => f16_to_f32(s.get(range.clone()).ok_or_else(outside)?, out),
            FloatSlice::BF16(s) => {
                // bf16 is the high half of an f32.
                let src = s.get(range.clone()).ok_or_else(outside)?;
                for (o, v) in out.iter_mut().zip(src) {
                    *o = f32::from_bits((v.to_bits() as u32) << 16);
                }
            }
        }
        Ok(())
    }
}

fn f16_to_f32(src: &[half::f16], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("f16c") {
        // SAFETY: the CPU has F16C (which implies AVX).
        return unsafe { f16_to_f32_f16c(src, out) };
    }
    for (o, v) in out.iter_mut().zip(src) {
        *o = v.to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
unsafe fn f16_to_f32_f16c(src: &[half::f16], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let mut src_chunks = src.chunks_exact(8);
    let mut out_chunks = out.chunks_exact_mut(8);
    for (s, o) in (&mut src_chunks).zip(&mut out_chunks) {
        let v = _mm256_cvtph_ps(_mm_loadu_si128(s.as_ptr() as *const __m128i));
        _mm256_storeu_ps(o.as_mut_ptr(), v);
    }
    for (o, v) in out_chunks
        .into_remainder()
        .iter_mut()
        .zip(src_chunks.remainder())
    {
        *o = v.to_f32();
    }
}

/// The u32 scalar at the start of `t` (positions, token ids).
pub(crate) fn scalar_u32(t: &Tensor) -> Result<usize> {
    Ok(*slice::<u32>(t)?
        .first()
        .ok_or_else(|| Error::Invalid("empty scalar tensor".into()))? as usize)
}

/// The error for a kernel handed an op of another family (a registry mistake).
pub(crate) fn wrong_op(op: &Op) -> Error {
    Error::Invalid(format!(
        "CPU kernel registered for another op received {}",
        op.name()
    ))
}
