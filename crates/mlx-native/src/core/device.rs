//! A `Device` is a cheap handle to one backend instance plus its buffer pool.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::core::backend::{Backend, DeviceBuffer, HostBytes};
use crate::core::dtype::{DType, Element};
use crate::core::tensor::{Buffer, Tensor};
use crate::{Error, Result};

/// Reuses freed allocations of the same byte size (LLM inference repeats a few shapes).
#[derive(Default)]
pub struct BufferPool {
    free: Mutex<HashMap<usize, Vec<Box<dyn DeviceBuffer>>>>,
}

impl BufferPool {
    fn take(&self, bytes: usize) -> Option<Box<dyn DeviceBuffer>> {
        self.free.lock().ok()?.get_mut(&bytes)?.pop()
    }

    pub(crate) fn give_back(&self, storage: Box<dyn DeviceBuffer>) {
        if let Ok(mut free) = self.free.lock() {
            free.entry(storage.byte_len()).or_default().push(storage);
        }
    }

    /// Number of buffers waiting for reuse.
    pub fn idle_count(&self) -> usize {
        self.free
            .lock()
            .map(|f| f.values().map(Vec::len).sum())
            .unwrap_or(0)
    }
}

struct DeviceInner {
    backend: Box<dyn Backend>,
    pool: BufferPool,
    label: String,
}

#[derive(Clone)]
pub struct Device(Arc<DeviceInner>);

/// Bytes of a whole tensor's storage (at least one: allocators take no empty requests).
fn storage_bytes(shape: &[usize], dtype: DType) -> usize {
    (shape.iter().product::<usize>() * dtype.size_in_bytes()).max(1)
}

impl Device {
    pub fn new(backend: Box<dyn Backend>, label: String) -> Device {
        Device(Arc::new(DeviceInner {
            backend,
            pool: BufferPool::default(),
            label,
        }))
    }

    /// The CPU device (always available; one per process, so tensors made through any
    /// handle to it can meet in one dispatch).
    pub fn cpu() -> Device {
        static CPU: std::sync::OnceLock<Device> = std::sync::OnceLock::new();
        CPU.get_or_init(|| {
            Device::new(
                Box::new(crate::backends::cpu::CpuBackend::new()),
                "cpu".into(),
            )
        })
        .clone()
    }

    /// Parse "cpu", "cuda" or "cuda:N".
    pub fn parse(spec: &str) -> Result<Device> {
        match spec {
            "cpu" => Ok(Device::cpu()),
            s if s == "cuda" || s.starts_with("cuda:") => {
                let ordinal = match s.strip_prefix("cuda:") {
                    Some(n) => n.parse().map_err(|_| {
                        Error::Invalid(format!("device `{s}`: expected cuda:N with N a number"))
                    })?,
                    None => 0,
                };
                crate::backends::cuda::cuda_device(ordinal)
            }
            other => Err(Error::Invalid(format!(
                "unknown device `{other}` (expected cpu, cuda or cuda:N)"
            ))),
        }
    }

    pub fn backend(&self) -> &dyn Backend {
        self.0.backend.as_ref()
    }
    pub fn label(&self) -> &str {
        &self.0.label
    }
    pub fn is_cpu(&self) -> bool {
        self.backend().name() == "cpu"
    }
    pub fn pool(&self) -> &BufferPool {
        &self.0.pool
    }
    pub fn same(&self, other: &Device) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// An uninitialised tensor from the pool (contents unspecified).
    pub fn empty(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let bytes = storage_bytes(shape, dtype);
        let storage = match self.pool().take(bytes) {
            Some(s) => s,
            None => self.backend().alloc(bytes)?,
        };
        self.tensor_in(storage, true, shape, dtype)
    }

    pub fn zeros(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.zeroed(self.empty(shape, dtype)?)
    }

    /// A zeroed tensor in host-mapped memory (`Backend::alloc_host_mapped`), outside the pool:
    /// what kernels put there, `Tensor::read_later` reads without a device-side copy.
    pub fn zeros_host_mapped(&self, shape: &[usize], dtype: DType) -> Result<Tensor> {
        let storage = self
            .backend()
            .alloc_host_mapped(storage_bytes(shape, dtype))?;
        self.zeroed(self.tensor_in(storage, false, shape, dtype)?)
    }

    /// A whole-buffer tensor over `storage` (given back to the pool when dropped if `pooled`).
    fn tensor_in(
        &self,
        storage: Box<dyn DeviceBuffer>,
        pooled: bool,
        shape: &[usize],
        dtype: DType,
    ) -> Result<Tensor> {
        let buffer = Buffer::new(self.clone(), storage, pooled);
        Tensor::from_buffer(buffer, 0, shape.to_vec(), dtype)
    }

    fn zeroed(&self, t: Tensor) -> Result<Tensor> {
        self.write_bytes(&t, &vec![0u8; t.byte_len()])?;
        Ok(t)
    }

    pub fn from_slice<T: Element>(&self, data: &[T], shape: &[usize]) -> Result<Tensor> {
        let t = self.empty(shape, T::DTYPE)?;
        t.write(data)?;
        Ok(t)
    }

    /// A tensor over `bytes[range]` of host memory that outlives it (mmapped weights):
    /// used in place by the CPU backend, uploaded once by others.
    pub fn from_host(
        &self,
        bytes: HostBytes,
        range: std::ops::Range<usize>,
        shape: &[usize],
        dtype: DType,
    ) -> Result<Tensor> {
        let storage = self.backend().host_buffer(bytes, range)?;
        Tensor::from_buffer(
            Buffer::new(self.clone(), storage, false),
            0,
            shape.to_vec(),
            dtype,
        )
    }

    pub(crate) fn write_bytes(&self, t: &Tensor, bytes: &[u8]) -> Result<()> {
        self.backend().synchronize()?;
        self.backend()
            .write(t.buffer().storage(), t.offset(), bytes)
    }

    /// Copies all of `src` into `dst` from byte `dst_offset` of `dst` on, on the device.
    pub(crate) fn copy_bytes(&self, src: &Tensor, dst: &Tensor, dst_offset: usize) -> Result<()> {
        if !Arc::ptr_eq(&src.device().0, &self.0) || !Arc::ptr_eq(&dst.device().0, &self.0) {
            return Err(Error::Invalid(format!(
                "copy between devices ({} and {})",
                src.device().label(),
                dst.device().label()
            )));
        }
        self.backend().copy(
            (src.buffer().storage(), src.offset()),
            (dst.buffer().storage(), dst.offset() + dst_offset),
            src.byte_len(),
        )
    }

    pub(crate) fn read_bytes(&self, t: &Tensor, out: &mut [u8]) -> Result<()> {
        self.backend().synchronize()?;
        self.backend().read(t.buffer().storage(), t.offset(), out)
    }

    pub fn synchronize(&self) -> Result<()> {
        self.backend().synchronize()
    }

    /// The memory bandwidth of this device's own copies, in bytes read and written a second:
    /// the ceiling that the bytes a decode step reads are compared against (`mlxn bench`).
    /// Copies `bytes` back and forth between two buffers allocated for the purpose (freed
    /// after, not pooled), timed over enough copies (~20 ms) that the launches and the
    /// synchronisation around them do not count.
    pub fn copy_bandwidth(&self, bytes: usize) -> Result<f64> {
        const MIN_SECONDS: f64 = 0.02;
        if bytes == 0 {
            return Err(Error::Invalid(
                "a copy bandwidth needs copies of at least one byte".into(),
            ));
        }
        let buffer = || -> Result<Tensor> {
            let storage = self.backend().alloc(bytes)?;
            Tensor::from_buffer(
                Buffer::new(self.clone(), storage, false),
                0,
                vec![bytes],
                DType::U8,
            )
        };
        let (a, b) = (buffer()?, buffer()?);
        let time = |copies: usize| -> Result<f64> {
            self.synchronize()?;
            let start = std::time::Instant::now();
            for i in 0..copies {
                let (src, dst) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
                self.copy_bytes(src, dst, 0)?;
            }
            self.synchronize()?;
            Ok(start.elapsed().as_secs_f64().max(1e-9))
        };
        time(1)?; // first touch
        let per_copy = time(2)? / 2.0;
        let copies = ((MIN_SECONDS / per_copy).ceil() as usize).clamp(2, 1000);
        Ok(2.0 * (bytes * copies) as f64 / time(copies)?)
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A copy bandwidth is bytes over time, so it needs bytes; of real copies it is finite and
    /// positive, and the probe's buffers do not go to the pool.
    #[test]
    fn copy_bandwidth_of_real_copies() {
        let dev = Device::cpu();
        assert!(dev.copy_bandwidth(0).is_err());
        let bandwidth = dev.copy_bandwidth(1 << 20).unwrap();
        assert!(bandwidth.is_finite() && bandwidth > 0.0, "{bandwidth}");
        assert!(dev.pool().take(1 << 20).is_none());
    }
}
