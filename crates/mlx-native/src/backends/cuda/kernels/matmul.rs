//! out = x·Wᵀ (+ bias) for every weight layout, weights read as stored: matvec.cu for a single
//! row (decode), matmul_tc.cu's 128×128 tensor-core tiles (f16 operands, f32 accumulation)
//! for prefill-sized row counts, matmul.cu's 64×64 f32 tiles otherwise.

use super::weights::{all_layouts, float_name, Weight};
use super::{COMMON, LAYOUTS, MMA};
use crate::backends::cuda::compile::Source;
use crate::backends::cuda::device_ptr;
use crate::backends::cuda::launch::{
    blocks, float_type, operand_count, wrong_op, Args, CudaKernel, KernelLibrary, Planner,
};
use crate::core::dtype::DType;
use crate::core::op::Op;
use crate::core::registry::Registry;
use crate::core::tensor::Tensor;
use crate::{Error, Result};

pub(super) static MATVEC: Source = Source {
    name: "matvec",
    parts: &[COMMON, LAYOUTS, include_str!("matvec.cu")],
};

pub(super) static MATMUL: Source = Source {
    name: "matmul",
    parts: &[COMMON, LAYOUTS, include_str!("matmul.cu")],
};

pub(super) static MATMUL_TC: Source = Source {
    name: "matmul_tc",
    parts: &[COMMON, LAYOUTS, MMA, include_str!("matmul_tc.cu")],
};

/// MV_WARPS·32 threads, MV_ROWS rows per warp group (matvec.cu).
const MATVEC_THREADS: u32 = 128;
const MATVEC_WARPS: usize = 4;
const MATVEC_ROWS: usize = 4;
/// MM_BM = MM_BN, 256 threads (matmul.cu).
const MATMUL_TILE: usize = 64;
const MATMUL_THREADS: u32 = 256;
/// TC_BM = TC_BN (matmul_tc.cu), 256 threads.
const MATMUL_TC_TILE: usize = 128;
/// Fewer rows leave most of a 128-row tensor-core tile idle; the f32 tiles then do as well and
/// keep f32 operands.
const MATMUL_TC_MIN_ROWS: usize = 17;
pub(super) fn register(reg: &mut Registry<Planner>) {
    for layout in all_layouts() {
        reg.insert("matmul", &layout.variant(), DType::F32, matmul);
    }
}

fn matmul(
    lib: &KernelLibrary,
    op: &Op,
    inputs: &[Tensor],
    outputs: &[Tensor],
) -> Result<CudaKernel> {
    let Op::MatMul { layout, has_bias } = *op else {
        return Err(wrong_op(op));
    };
    let n_weight = layout.tensor_count();
    let ([out], Some(x)) = (outputs, inputs.first()) else {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    };
    if inputs.len() != 1 + n_weight + has_bias as usize {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    }
    let bias = inputs.get(1 + n_weight).filter(|_| has_bias);
    let bias_type = bias.map_or(Ok(0), |b| float_type("matmul", "bias", b.dtype()))?;
    let (m, k, n) = (x.rows(), x.last_dim(), out.last_dim());
    let (weight, rows) = Weight::parse("matmul", layout, &inputs[1..1 + n_weight], k)?;
    if rows < n {
        return Err(Error::op(
            "matmul",
            format!("the weight holds {rows} rows of {k}, the output needs {n}"),
        ));
    }
    weight.check_alignment("matmul")?;

    let vector_ready = m == 1
        && device_ptr(x)? % 16 == 0
        && match weight {
            Weight::Dense { w, .. } => k % 32 == 0 && device_ptr(w)? % 16 == 0,
            _ => true,
        };
    let launch = if vector_ready {
        // Warps sharing a row group: one per 32 units of the row (lane-sized steps), up to 4.
        let kgroups = match k / 32 {
            u if u >= 128 => 4,
            u if u >= 64 => 2,
            _ => 1,
        };
        let (name, args) = match weight {
            Weight::Mlx {
                w,
                scales,
                biases,
                bits,
                group_shift,
                scale_type,
            } => (
                format!("matvec_mlx{bits}_{}", float_name(scale_type)),
                Args::new()
                    .ptr(x)?
                    .ptr(w)?
                    .ptr(scales)?
                    .ptr(biases)?
                    .opt_ptr(bias)?
                    .code(bias_type)
                    .ptr(out)?
                    .int(n)?
                    .int(k)?
                    .code(group_shift)
                    .int(kgroups)?,
            ),
            Weight::Ggml { data, ty } => (
                format!("matvec_{}", ty.name()),
                Args::new()
                    .ptr(x)?
                    .ptr(data)?
                    .opt_ptr(bias)?
                    .code(bias_type)
                    .ptr(out)?
                    .int(n)?
                    .int(k)?
                    .int(kgroups)?,
            ),
            Weight::Dense { w, ft } => (
                format!("matvec_dense_{}", float_name(ft)),
                Args::new()
                    .ptr(x)?
                    .ptr(w)?
                    .opt_ptr(bias)?
                    .code(bias_type)
                    .ptr(out)?
                    .int(n)?
                    .int(k)?
                    .int(kgroups)?,
            ),
        };
        let grid = (blocks(n, MATVEC_ROWS * MATVEC_WARPS / kgroups)?, 1, 1);
        lib.launch(&MATVEC, &name, grid, MATVEC_THREADS, 0, args)?
    } else {
        // Tensor cores for many rows (float4 loads of x), unless the weight is f32: f16
        // operands would drop its precision and range.
        let tensor_cores = m >= MATMUL_TC_MIN_ROWS
            && k % 4 == 0
            && device_ptr(x)? % 16 == 0
            && !matches!(weight, Weight::Dense { ft: 0, .. });
        let (source, prefix, tile) = match tensor_cores {
            true => (&MATMUL_TC, "matmul_tc", MATMUL_TC_TILE),
            false => (&MATMUL, "matmul", MATMUL_TILE),
        };
        let (name, args) = match weight {
            Weight::Mlx {
                w,
                scales,
                biases,
                bits,
                group_shift,
                scale_type,
            } => (
                format!("{prefix}_mlx{bits}"),
                Args::new()
                    .ptr(x)?
                    .ptr(w)?
                    .ptr(scales)?
                    .ptr(biases)?
                    .code(scale_type)
                    .opt_ptr(bias)?
                    .code(bias_type)
                    .ptr(out)?
                    .int(m)?
                    .int(n)?
                    .int(k)?
                    .code(group_shift),
            ),
            Weight::Ggml { data, ty } => (
                format!("{prefix}_{}", ty.name()),
                Args::new()
                    .ptr(x)?
                    .ptr(data)?
                    .opt_ptr(bias)?
                    .code(bias_type)
                    .ptr(out)?
                    .int(m)?
                    .int(n)?
                    .int(k)?,
            ),
            Weight::Dense { w, ft } => (
                format!("{prefix}_dense"),
                Args::new()
                    .ptr(x)?
                    .ptr(w)?
                    .code(ft)
                    .opt_ptr(bias)?
                    .code(bias_type)
                    .ptr(out)?
                    .int(m)?
                    .int(n)?
                    .int(k)?,
            ),
        };
        let grid = (blocks(n, tile)?, blocks(m, tile)?, 1);
        lib.launch(source, &name, grid, MATMUL_THREADS, 0, args)?
    };
    Ok(CudaKernel::single(launch))
}
