//! Buffers (device memory with an identity) and tensors (a typed, shaped view of a buffer).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::core::backend::DeviceBuffer;
use crate::core::device::Device;
use crate::core::dtype::{DType, Element};
use crate::{Error, Result};

static NEXT_BUFFER_ID: AtomicU64 = AtomicU64::new(1);

pub(crate) struct BufferInner {
    pub(crate) id: u64,
    pub(crate) device: Device,
    /// `None` only while being dropped (the storage goes back to the pool).
    pub(crate) storage: Option<Box<dyn DeviceBuffer>>,
    pub(crate) pooled: bool,
}

impl Drop for BufferInner {
    fn drop(&mut self) {
        if let (true, Some(storage)) = (self.pooled, self.storage.take()) {
            self.device.pool().give_back(storage);
        }
    }
}

/// Shared handle to device memory; clones refer to the same memory.
#[derive(Clone)]
pub struct Buffer(pub(crate) Arc<BufferInner>);

impl Buffer {
    pub(crate) fn new(device: Device, storage: Box<dyn DeviceBuffer>, pooled: bool) -> Self {
        Buffer(Arc::new(BufferInner {
            id: NEXT_BUFFER_ID.fetch_add(1, Ordering::Relaxed),
            device,
            storage: Some(storage),
            pooled,
        }))
    }

    pub fn id(&self) -> u64 {
        self.0.id
    }

    pub fn device(&self) -> &Device {
        &self.0.device
    }

    pub fn storage(&self) -> &dyn DeviceBuffer {
        // Only `Drop` takes the storage out, after the last handle is gone.
        self.0
            .storage
            .as_deref()
            .expect("buffer storage present while referenced")
    }

    pub fn byte_len(&self) -> usize {
        self.storage().byte_len()
    }
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Buffer#{}({} bytes)", self.id(), self.byte_len())
    }
}

/// A contiguous, row-major typed view: `shape` elements of `dtype` from `offset` bytes into
/// `buffer`.
#[derive(Clone, Debug)]
pub struct Tensor {
    buffer: Buffer,
    offset: usize,
    shape: Vec<usize>,
    dtype: DType,
}

impl Tensor {
    pub fn from_buffer(
        buffer: Buffer,
        offset: usize,
        shape: Vec<usize>,
        dtype: DType,
    ) -> Result<Tensor> {
        let bytes = shape.iter().product::<usize>() * dtype.size_in_bytes();
        if offset + bytes > buffer.byte_len() {
            return Err(Error::Invalid(format!(
                "view of {bytes} bytes at offset {offset} exceeds buffer of {} bytes",
                buffer.byte_len()
            )));
        }
        Ok(Tensor {
            buffer,
            offset,
            shape,
            dtype,
        })
    }

    pub fn buffer(&self) -> &Buffer {
        &self.buffer
    }
    pub fn device(&self) -> &Device {
        self.buffer.device()
    }
    pub fn offset(&self) -> usize {
        self.offset
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn byte_len(&self) -> usize {
        self.elem_count() * self.dtype.size_in_bytes()
    }
    /// Size of the last dimension (1 for a scalar).
    pub fn last_dim(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }
    /// Product of all dims but the last: the number of rows.
    pub fn rows(&self) -> usize {
        let n = self.shape.len();
        if n == 0 {
            1
        } else {
            self.shape[..n - 1].iter().product()
        }
    }
    pub fn byte_range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.byte_len()
    }

    /// Same bytes, another shape with the same element count.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if shape.iter().product::<usize>() != self.elem_count() {
            return Err(Error::Invalid(format!(
                "cannot reshape {:?} to {shape:?}",
                self.shape
            )));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            ..self.clone()
        })
    }

    /// Rows `start..start+len` of the leading dimension.
    pub fn narrow_rows(&self, start: usize, len: usize) -> Result<Tensor> {
        let n = self.shape.first().copied().unwrap_or(1);
        if start + len > n {
            return Err(Error::Invalid(format!(
                "rows {start}..{} out of {n}",
                start + len
            )));
        }
        let row_bytes = self.byte_len() / n.max(1);
        let mut shape = self.shape.clone();
        if !shape.is_empty() {
            shape[0] = len;
        }
        Ok(Tensor {
            buffer: self.buffer.clone(),
            offset: self.offset + start * row_bytes,
            shape,
            dtype: self.dtype,
        })
    }

    /// True when the two views share at least one byte.
    pub fn overlaps(&self, other: &Tensor) -> bool {
        self.buffer.id() == other.buffer.id()
            && self.offset < other.offset + other.byte_len()
            && other.offset < self.offset + self.byte_len()
    }

    /// Copy host data into this tensor (waits for pending device work first).
    pub fn write<T: Element>(&self, data: &[T]) -> Result<()> {
        if T::DTYPE != self.dtype || data.len() != self.elem_count() {
            return Err(Error::Invalid(format!(
                "write of {} {} into tensor {:?} {}",
                data.len(),
                T::DTYPE,
                self.shape,
                self.dtype
            )));
        }
        self.device()
            .write_bytes(self, crate::core::dtype::as_bytes(data))
    }

    /// Copy the tensor to a host vector (waits for pending device work first).
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        self.check_read::<T>()?;
        host_vec(self.elem_count(), |bytes| {
            self.device().read_bytes(self, bytes)
        })
    }

    /// Start copying the tensor to the host behind the work submitted so far; the returned
    /// read's `finish` waits for it (`to_vec` without blocking the host meanwhile).
    pub fn read_later<T: Element>(&self) -> Result<PendingRead<T>> {
        self.check_read::<T>()?;
        let storage = self.buffer().storage();
        let inner = self
            .device()
            .backend()
            .read_later(storage, self.offset(), self.byte_len())?;
        Ok(PendingRead {
            inner,
            elems: self.elem_count(),
            _source: self.buffer.clone(),
            _elem: std::marker::PhantomData,
        })
    }

    fn check_read<T: Element>(&self) -> Result<()> {
        if T::DTYPE != self.dtype {
            return Err(Error::Invalid(format!(
                "read of {} from a {} tensor",
                T::DTYPE,
                self.dtype
            )));
        }
        Ok(())
    }

    /// The tensor's values converted to f32 (float dtypes and integers).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        Ok(match self.dtype {
            DType::F32 => self.to_vec::<f32>()?,
            DType::F16 => self
                .to_vec::<half::f16>()?
                .iter()
                .map(|v| v.to_f32())
                .collect(),
            DType::BF16 => self
                .to_vec::<half::bf16>()?
                .iter()
                .map(|v| v.to_f32())
                .collect(),
            DType::U8 => self.to_vec::<u8>()?.iter().map(|&v| v as f32).collect(),
            DType::U32 => self.to_vec::<u32>()?.iter().map(|&v| v as f32).collect(),
            DType::I32 => self.to_vec::<i32>()?.iter().map(|&v| v as f32).collect(),
        })
    }
}

/// A tensor's copy to the host in flight (`Tensor::read_later`).
pub struct PendingRead<T> {
    inner: Box<dyn crate::core::backend::PendingBytes>,
    elems: usize,
    /// Kept alive until the read is done: host-mapped memory is read in place.
    _source: Buffer,
    _elem: std::marker::PhantomData<T>,
}

impl<T: Element> PendingRead<T> {
    /// Waits for the copy and returns the elements.
    pub fn finish(self) -> Result<Vec<T>> {
        host_vec(self.elems, |bytes| self.inner.finish(bytes))
    }
}

/// A vector of `n` elements filled from their bytes by `fill`.
fn host_vec<T: Element>(n: usize, fill: impl FnOnce(&mut [u8]) -> Result<()>) -> Result<Vec<T>> {
    let mut out: Vec<T> = Vec::with_capacity(n);
    // SAFETY: Element types accept any bit pattern; `fill` writes every byte before `out` is
    // returned (on an error it is dropped, its elements never read).
    let bytes = unsafe {
        out.set_len(n);
        std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut u8, n * std::mem::size_of::<T>())
    };
    fill(bytes)?;
    Ok(out)
}
