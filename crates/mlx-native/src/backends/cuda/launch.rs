//! What a resolved CUDA dispatch is: kernel launches (and cuBLAS products) whose arguments,
//! device pointers included, were fixed at record time, so running one (directly or while a
//! graph is being captured) is only the launch. Also the per-device kernel library the
//! planners draw on.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::{self, CudaBlas};

use cudarc::driver::sys::{self, CUfunction_attribute, CUlaunchAttributeID};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, LaunchConfig};
use cudarc::nvrtc::Ptx;

use super::compile::{self, Source};
use super::{address, device_ptr, driver_err};
use crate::core::dtype::DType;
pub(crate) use crate::core::op::operand_count;
use crate::core::op::Op;
use crate::core::tensor::Tensor;
use crate::{Error, Result};

/// Plans the launches of one dispatch (picks the compiled kernel for the operands, computes
/// the grid, fixes the arguments). Registered by (op family, variant, output dtype).
pub(crate) type Planner = fn(&KernelLibrary, &Op, &[Tensor], &[Tensor]) -> Result<CudaKernel>;

/// Shared memory a block may use without opting in.
const DEFAULT_SHARED_LIMIT: u32 = 48 * 1024;
/// The most blocks of a thread block cluster that every sm_90+ GPU runs (the portable size;
/// matmul_tc.cu's MAX_CLUSTER).
pub(crate) const MAX_CLUSTER: u32 = 8;

/// Token rows at most whose kernels let the next kernel of the stream launch as soon as they
/// have waited for theirs (`kernel_entry_early`), so that its blocks request their weights
/// meanwhile: decode's row and short prompts', whose grids are one wave each. Long prompts'
/// multi-wave grids lost up to 30% doing it (common.cuh).
pub(crate) const EARLY_LAUNCH_ROWS: usize = 16;

/// Whether a dispatch over `rows` token rows launches its successor early (EARLY_LAUNCH_ROWS).
pub(crate) fn early_launches(rows: usize) -> bool {
    rows <= EARLY_LAUNCH_ROWS
}

/// Kernel arguments, one 8-byte slot each. A slot holds the value's native bytes at its
/// start, which is what the driver copies for a parameter of that size.
#[derive(Default)]
pub(crate) struct Args(Vec<u64>);

impl Args {
    pub fn new() -> Self {
        Args::default()
    }

    fn push(mut self, bytes: &[u8]) -> Self {
        let mut slot = [0u8; 8];
        slot[..bytes.len()].copy_from_slice(bytes);
        self.0.push(u64::from_ne_bytes(slot));
        self
    }

    /// The device address of the tensor's first element.
    pub fn ptr(self, t: &Tensor) -> Result<Self> {
        let p = device_ptr(t)?;
        Ok(self.push(&p.to_ne_bytes()))
    }

    /// The tensor's address, or a null pointer.
    pub fn opt_ptr(self, t: Option<&Tensor>) -> Result<Self> {
        match t {
            Some(t) => self.ptr(t),
            None => Ok(self.push(&0u64.to_ne_bytes())),
        }
    }

    /// A 64-bit value (a device address, a seed).
    pub fn u64(self, v: u64) -> Self {
        self.push(&v.to_ne_bytes())
    }

    /// A size or index as a kernel `int`.
    pub fn int(self, v: usize) -> Result<Self> {
        let v = i32::try_from(v)
            .map_err(|_| Error::Invalid(format!("{v} exceeds a CUDA kernel's int argument")))?;
        Ok(self.push(&v.to_ne_bytes()))
    }

    /// A code (float type, function selector) as a kernel `int`.
    pub fn code(self, v: i32) -> Self {
        self.push(&v.to_ne_bytes())
    }

    /// A count as a kernel `i64`.
    pub fn long(self, v: usize) -> Self {
        self.push(&(v as i64).to_ne_bytes())
    }

    pub fn f32(self, v: f32) -> Self {
        self.push(&v.to_ne_bytes())
    }

    /// The `early` flag of `kernel_entry_early` (common.cuh) for a dispatch over `rows` token
    /// rows (`early_launches`).
    pub fn early_launch(self, rows: usize) -> Self {
        self.early(early_launches(rows))
    }

    /// The `early` flag of `kernel_entry_early`: let the next kernel launch at once.
    pub fn early(self, early: bool) -> Self {
        self.code(i32::from(early))
    }
}

/// One step of a dispatch: a kernel launch with fixed arguments, or a cuBLAS matrix product.
pub(crate) enum Launch {
    Kernel(KernelLaunch),
    Gemm(Gemm),
}

/// A kernel launch with fixed arguments.
pub(crate) struct KernelLaunch {
    func: CudaFunction,
    cfg: LaunchConfig,
    args: Vec<u64>,
    /// Launch with programmatic stream serialization (see `kernel_entry` in common.cuh).
    programmatic: bool,
    /// A cooperative launch: every block resident at once (grid-wide barriers), else an error.
    cooperative: bool,
    /// Blocks of a thread block cluster along z (1: no clusters).
    cluster_z: u32,
}

impl Launch {
    /// The same launch made cooperative: every block resident at once (for grid-wide
    /// barriers), else the driver refuses it.
    /// A cuBLAS product is left as it is.
    pub fn cooperative(self) -> Self {
        match self {
            Launch::Kernel(k) => Launch::Kernel(KernelLaunch {
                cooperative: true,
                ..k
            }),
            gemm => gemm,
        }
    }

    /// The same launch with its blocks in clusters of `cluster_z` blocks along z (at most
    /// MAX_CLUSTER, dividing the grid's z; where `KernelLibrary::clusters`): a cluster's blocks
    /// run at once and read each other's shared memory. A cuBLAS product cannot be.
    pub fn in_clusters(self, cluster_z: u32) -> Result<Self> {
        match self {
            Launch::Kernel(k) if cluster_z <= MAX_CLUSTER => {
                let z = k.cfg.grid_dim.2;
                if !z.is_multiple_of(cluster_z) {
                    return Err(Error::Cuda(format!(
                        "clusters of {cluster_z} blocks for a grid of {z} along z"
                    )));
                }
                Ok(Launch::Kernel(KernelLaunch { cluster_z, ..k }))
            }
            _ => Err(Error::Cuda(format!(
                "a launch in clusters of {cluster_z} blocks (at most {MAX_CLUSTER}, kernels only)"
            ))),
        }
    }

    /// An empty grid or product (an empty tensor) has nothing to compute and is not run.
    fn runs(&self) -> bool {
        match self {
            Launch::Kernel(k) => {
                let (x, y, z) = k.cfg.grid_dim;
                x > 0 && y > 0 && z > 0
            }
            Launch::Gemm(g) => g.m > 0 && g.n > 0 && g.k > 0,
        }
    }

    fn enqueue(&self, stream: &CudaStream) -> Result<()> {
        if !self.runs() {
            return Ok(());
        }
        stream
            .context()
            .bind_to_thread()
            .map_err(driver_err("binding the CUDA context"))?;
        match self {
            Launch::Kernel(k) => k.enqueue(stream),
            Launch::Gemm(g) => g.enqueue(stream),
        }
    }
}

impl KernelLaunch {
    fn enqueue(&self, stream: &CudaStream) -> Result<()> {
        let (x, y, z) = self.cfg.grid_dim;
        // SAFETY: an all-zero launch attribute is the valid "ignore" entry; ids and values are
        // set below. A cooperative kernel launches alone (it does not wait on the one before
        // it programmatically).
        let mut attrs: [sys::CUlaunchAttribute; 2] = unsafe { std::mem::zeroed() };
        let mut count = 0;
        if self.cooperative {
            attrs[0].id = CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_COOPERATIVE;
            attrs[0].value.cooperative = 1;
            count = 1;
        } else if self.programmatic {
            attrs[0].id =
                CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
            attrs[0].value.programmaticStreamSerializationAllowed = 1;
            count = 1;
        }
        if self.cluster_z > 1 {
            attrs[count].id = CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
            attrs[count].value.clusterDim.x = 1;
            attrs[count].value.clusterDim.y = 1;
            attrs[count].value.clusterDim.z = self.cluster_z;
            count += 1;
        }
        let (bx, by, bz) = self.cfg.block_dim;
        let config = sys::CUlaunchConfig {
            gridDimX: x,
            gridDimY: y,
            gridDimZ: z,
            blockDimX: bx,
            blockDimY: by,
            blockDimZ: bz,
            sharedMemBytes: self.cfg.shared_mem_bytes,
            hStream: stream.cu_stream(),
            attrs: attrs.as_mut_ptr(),
            numAttrs: count as u32,
        };
        let mut params: Vec<*mut std::ffi::c_void> = self
            .args
            .iter()
            .map(|slot| slot as *const u64 as *mut std::ffi::c_void)
            .collect();
        // SAFETY: the planner that built this launch matched the argument list to the kernel's
        // signature (each parameter's bytes at the start of its slot), and the grid to the
        // sizes of the tensors whose addresses it holds; the tensors are kept alive by the
        // dispatch (and by the graph that replays it). `params` and `attrs` outlive the call.
        unsafe {
            sys::cuLaunchKernelEx(
                &config,
                self.func.cu_function(),
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .map_err(driver_err("kernel launch"))?;
        Ok(())
    }
}

/// A cuBLAS handle bound to a library's stream (`KernelLibrary::cublas`).
#[derive(Clone)]
pub(crate) struct Cublas {
    blas: Arc<CudaBlas>,
    /// The handle's stream (`CUstream` as an address).
    stream: usize,
}

impl Cublas {
    /// The product `Gemm` of f16 w `[n, k]` and x `[m, k]` (rows of `ld` halves at `w` and `x`)
    /// into f32 out `[m, n]` at `out`.
    pub fn gemm(
        &self,
        (m, n, k): (usize, usize, usize),
        ld: usize,
        (w, x, out): (u64, u64, u64),
    ) -> Result<Launch> {
        let int = |v: usize| {
            i32::try_from(v).map_err(|_| Error::Invalid(format!("{v} exceeds a cuBLAS dimension")))
        };
        Ok(Launch::Gemm(Gemm {
            cublas: self.clone(),
            m: int(m)?,
            n: int(n)?,
            k: int(k)?,
            ld: int(ld)?,
            w,
            x,
            out,
        }))
    }
}

/// out `[m, n]` (f32, rows of n) = x `[m, k]` · wᵀ for w `[n, k]`, both f16 in rows of `ld`
/// halves, by cuBLAS (tensor-core GEMM, f32 accumulation) on the library's stream, to which
/// its handle is bound.
pub(crate) struct Gemm {
    cublas: Cublas,
    /// m, n, k and ld, checked to fit cuBLAS's ints when planned.
    m: i32,
    n: i32,
    k: i32,
    ld: i32,
    w: u64,
    x: u64,
    out: u64,
}

impl Gemm {
    fn enqueue(&self, stream: &CudaStream) -> Result<()> {
        if stream.cu_stream() as usize != self.cublas.stream {
            return Err(Error::Cuda(
                "a cuBLAS product enqueued on another stream than its library's".into(),
            ));
        }
        let (one, zero) = (1f32, 0f32);
        // Column-major, cuBLAS computes outᵀ [n, m] = w [n, k] · xᵀ [k, m]: w's rows of ld
        // halves are the columns of a k × n matrix (transposed), x's those of k × m, and out's
        // rows of n floats the columns of n × m.
        // SAFETY: the planner sized w [n, ld], x [m, ld] and out [m, n] and keeps them alive for
        // the dispatch; alpha and beta are host scalars (the handle's default pointer mode).
        unsafe {
            cublas::result::gemm_ex(
                *self.cublas.blas.handle(),
                cublas::sys::cublasOperation_t::CUBLAS_OP_T,
                cublas::sys::cublasOperation_t::CUBLAS_OP_N,
                self.n,
                self.m,
                self.k,
                &one as *const f32 as *const c_void,
                self.w as *const c_void,
                cublas::sys::cudaDataType::CUDA_R_16F,
                self.ld,
                self.x as *const c_void,
                cublas::sys::cudaDataType::CUDA_R_16F,
                self.ld,
                &zero as *const f32 as *const c_void,
                self.out as *mut c_void,
                cublas::sys::cudaDataType::CUDA_R_32F,
                self.n,
                cublas::sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublas::sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| {
            Error::Cuda(format!(
                "cuBLAS GEMM {}×{}×{}: {e:?}",
                self.m, self.n, self.k
            ))
        })
    }
}

/// The resolved form of one dispatch: its launches in order, and device scratch memory they
/// use (split-K partial results, staged operands), held here so it lives as long as the
/// dispatch.
pub(crate) struct CudaKernel {
    launches: Vec<Launch>,
    _scratch: Vec<Arc<CudaSlice<u8>>>,
}

impl CudaKernel {
    pub fn new(launches: Vec<Launch>, scratch: Option<CudaSlice<u8>>) -> Self {
        CudaKernel {
            launches,
            _scratch: scratch.map(Arc::new).into_iter().collect(),
        }
    }

    /// Launches that use the library's shared scratch (`KernelLibrary::shared_scratch`).
    pub fn sharing(launches: Vec<Launch>, scratch: Arc<CudaSlice<u8>>) -> Self {
        CudaKernel {
            launches,
            _scratch: vec![scratch],
        }
    }

    /// The same dispatch, also keeping `scratch` alive (its own, or the library's shared
    /// scratch).
    pub fn holding(mut self, scratch: impl Into<Arc<CudaSlice<u8>>>) -> Self {
        self._scratch.push(scratch.into());
        self
    }

    pub fn single(launch: Launch) -> Self {
        CudaKernel::new(vec![launch], None)
    }

    /// This dispatch's launches, then `next`'s, each keeping its scratch.
    pub fn then(mut self, next: CudaKernel) -> Self {
        self.launches.extend(next.launches);
        self._scratch.extend(next._scratch);
        self
    }

    /// Launches that run (an empty grid launches nothing).
    pub fn launch_count(&self) -> usize {
        self.launches.iter().filter(|l| l.runs()).count()
    }

    pub fn enqueue(&self, stream: &CudaStream) -> Result<()> {
        self.launches.iter().try_for_each(|l| l.enqueue(stream))
    }
}

/// The kernels of one device: sources compiled for its architecture, each module loaded once,
/// functions looked up once.
pub(crate) struct KernelLibrary {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Compute capability as major·10 + minor.
    arch: u32,
    sm_count: usize,
    /// Kernels launch with programmatic dependent launch (sm_90+, unless `MLXN_CUDA_PDL=0`).
    programmatic: bool,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<(&'static str, String), CudaFunction>>,
    /// Functions whose dynamic shared-memory limit has been raised, and to what.
    raised: Mutex<HashMap<(&'static str, String), u32>>,
    /// The largest shared scratch handed out so far (`shared_scratch`).
    shared: Mutex<Option<Arc<CudaSlice<u8>>>>,
    /// cuBLAS on `stream`, made on first use (`cublas`); None at once where it is not wanted.
    blas: OnceLock<Option<Cublas>>,
}

impl KernelLibrary {
    pub fn new(stream: Arc<CudaStream>, cublas: bool) -> Result<Self> {
        let ctx = stream.context().clone();
        let (major, minor) = ctx
            .compute_capability()
            .map_err(driver_err("compute capability"))?;
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(driver_err("multiprocessor count"))?;
        let arch = (major * 10 + minor) as u32;
        let pdl_off = std::env::var("MLXN_CUDA_PDL").is_ok_and(|v| v == "0");
        Ok(KernelLibrary {
            ctx,
            stream,
            arch,
            sm_count: sm_count.max(1) as usize,
            programmatic: arch >= 90 && !pdl_off,
            modules: Mutex::default(),
            functions: Mutex::default(),
            raised: Mutex::default(),
            shared: Mutex::default(),
            blas: match cublas {
                true => OnceLock::new(),
                false => OnceLock::from(None),
            },
        })
    }

    pub fn sm_count(&self) -> usize {
        self.sm_count
    }

    fn module(&self, source: &'static Source) -> Result<Arc<CudaModule>> {
        if let Some(m) = self
            .modules
            .lock()
            .map_err(|_| poisoned())?
            .get(source.name)
        {
            return Ok(m.clone());
        }
        // Compiled without holding the lock, so that other families load meanwhile.
        let cubin = compile::cubin(source, self.arch)?;
        let mut modules = self.modules.lock().map_err(|_| poisoned())?;
        if let Some(m) = modules.get(source.name) {
            return Ok(m.clone());
        }
        let module = self
            .ctx
            .load_module(Ptx::from_binary(cubin.as_ref().clone()))
            .map_err(driver_err(&format!("loading {}.cu", source.name)))?;
        modules.insert(source.name, module.clone());
        Ok(module)
    }

    fn function(&self, source: &'static Source, name: &str) -> Result<CudaFunction> {
        let key = (source.name, name.to_string());
        if let Some(f) = self.functions.lock().map_err(|_| poisoned())?.get(&key) {
            return Ok(f.clone());
        }
        let f = self
            .module(source)?
            .load_function(name)
            .map_err(driver_err(&format!("kernel {name} in {}.cu", source.name)))?;
        self.functions
            .lock()
            .map_err(|_| poisoned())?
            .insert(key, f.clone());
        Ok(f)
    }

    /// The dynamic shared memory a block of `threads` threads of kernel `name` can take with
    /// `blocks` such blocks resident an SM (its static shared memory and the SM's reserve
    /// accounted for).
    pub fn shared_budget(
        &self,
        source: &'static Source,
        name: &str,
        blocks: u32,
        threads: u32,
    ) -> Result<usize> {
        self.function(source, name)?
            .occupancy_available_dynamic_smem_per_block(blocks, threads)
            .map_err(driver_err(&format!(
                "{name}: shared memory for {blocks} blocks an SM"
            )))
    }

    /// A launch of kernel `name` of `source` with `shared` bytes of dynamic shared memory.
    pub fn launch(
        &self,
        source: &'static Source,
        name: &str,
        grid: (u32, u32, u32),
        block: u32,
        shared: u32,
        args: Args,
    ) -> Result<Launch> {
        let func = self.function(source, name)?;
        if shared > DEFAULT_SHARED_LIMIT {
            let mut raised = self.raised.lock().map_err(|_| poisoned())?;
            let limit = raised.entry((source.name, name.to_string())).or_insert(0);
            if shared > *limit {
                func.set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    shared as i32,
                )
                .map_err(driver_err(&format!(
                    "{name}: {shared} bytes of shared memory"
                )))?;
                *limit = shared;
            }
        }
        Ok(Launch::Kernel(KernelLaunch {
            func,
            cfg: LaunchConfig {
                grid_dim: grid,
                block_dim: (block, 1, 1),
                shared_mem_bytes: shared,
            },
            args: args.0,
            programmatic: self.programmatic,
            cooperative: false,
            cluster_z: 1,
        }))
    }

    /// Whether kernels may launch in thread block clusters (`Launch::in_clusters`: sm_90 and
    /// later).
    pub fn clusters(&self) -> bool {
        self.arch >= 90
    }

    /// cuBLAS on this library's stream, made on first use (at record time, never while a graph
    /// is being captured); None where its library cannot be loaded or a handle not made.
    pub fn cublas(&self) -> Option<Cublas> {
        self.blas
            .get_or_init(|| {
                // SAFETY: only tries to load the library; no other CUDA state is touched.
                if !unsafe { cublas::sys::is_culib_present() } {
                    return None;
                }
                let blas = CudaBlas::new(self.stream.clone()).ok()?;
                Some(Cublas {
                    blas: Arc::new(blas),
                    stream: self.stream.cu_stream() as usize,
                })
            })
            .clone()
    }

    /// Device memory for one dispatch's intermediate results, and its address (allocated at
    /// record time, never while a graph is being captured).
    pub fn scratch(&self, bytes: usize) -> Result<(CudaSlice<u8>, u64)> {
        // SAFETY: kernels write the scratch before reading it.
        let slice = unsafe { self.stream.alloc::<u8>(bytes.max(1)) }
            .map_err(driver_err("scratch allocation"))?;
        let address = address(&slice, &self.stream);
        Ok((slice, address))
    }

    /// Like `scratch`, zeroed (a memset on the stream, ahead of the dispatch's launches), for
    /// kernels that keep counters in it and leave them zeroed.
    pub fn zeroed_scratch(&self, bytes: usize) -> Result<(CudaSlice<u8>, u64)> {
        let slice = self
            .stream
            .alloc_zeros::<u8>(bytes.max(1))
            .map_err(driver_err("scratch allocation"))?;
        let address = address(&slice, &self.stream);
        Ok((slice, address))
    }

    /// Device memory of at least `bytes` that every dispatch of this device may use, and its
    /// address, for a dispatch whose launches write it before they read it: dispatches run in
    /// stream order, so one dispatch's use ends before the next begins. A larger request
    /// replaces it for later dispatches; earlier ones keep theirs alive (`CudaKernel::sharing`).
    pub fn shared_scratch(&self, bytes: usize) -> Result<(Arc<CudaSlice<u8>>, u64)> {
        let mut shared = self.shared.lock().map_err(|_| poisoned())?;
        if let Some(s) = shared.as_ref().filter(|s| s.len() >= bytes) {
            return Ok((s.clone(), address(s, &self.stream)));
        }
        let (slice, address) = self.scratch(bytes)?;
        let slice = Arc::new(slice);
        *shared = Some(slice.clone());
        Ok((slice, address))
    }
}

fn poisoned() -> Error {
    Error::Cuda("kernel library lock poisoned by a panic".into())
}

/// The kernels' code for a float storage type (FT_* in common.cuh).
pub(crate) fn float_type(op: &'static str, what: &str, dtype: DType) -> Result<i32> {
    match dtype {
        DType::F32 => Ok(0),
        DType::F16 => Ok(1),
        DType::BF16 => Ok(2),
        other => Err(Error::op(
            op,
            format!("{what}: dtype {other} is not a float type"),
        )),
    }
}

/// Number of blocks of `per_block` covering `n` items, as a grid dimension (0 launches
/// nothing).
pub(crate) fn blocks(n: usize, per_block: usize) -> Result<u32> {
    u32::try_from(n.div_ceil(per_block))
        .map_err(|_| Error::Invalid(format!("{n} items exceed a CUDA grid")))
}

/// A grid dimension from a count (0 launches nothing).
pub(crate) fn dim(n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::Invalid(format!("{n} exceeds a CUDA grid dimension")))
}

/// The error for a planner handed an op of another family (a registry mistake).
pub(crate) fn wrong_op(op: &Op) -> Error {
    Error::Invalid(format!(
        "CUDA planner registered for another op received {}",
        op.name()
    ))
}
