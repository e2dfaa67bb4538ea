//! out = x·Wᵀ (+ bias) for every weight layout, weights read as stored: matvec.cu for a single
//! row (decode; matvec_tc.cu's tensor-core kernel for MLX 4- and 8-bit and the ggml layouts),
//! short prompts on matmul_tc.cu's short kernels (MLX 4/8-bit 2–32 rows, the ggml blocks 2–16)
//! or matvec_rows.cu (the other layouts, 2–8 rows), matmul_tc.cu's 128×128 tensor-core tiles
//! (f16 operands, f32 accumulation) for more rows, and from GEMM_MIN_ROWS rows cuBLAS on the
//! weight dequantized into f16 scratch, where it loads (else the tiles); matmul.cu's 64×64 f32
//! tiles otherwise; and the decode-only gated pair (`Op::GatedMatMul`) on matvec.cu.

use super::elementwise::unary_code;
use super::norm::{rms_norm_rows, RmsNormRows};
use super::weights::Weight;
use super::{COMMON, LAYOUTS, MMA, ROUTE, TILES_TC};
use crate::backends::cuda::compile::Source;
use crate::backends::cuda::device_ptr;
use crate::backends::cuda::launch::{
    blocks, dim, early_launches, float_type, operand_count, wrong_op, Args, Cublas, CudaKernel,
    KernelLibrary, Launch, Planner, MAX_CLUSTER,
};
use crate::core::dtype::DType;
use crate::core::op::{optional_last, Op, PreNorm, UnaryFn};
use crate::core::registry::Registry;
use crate::core::tensor::Tensor;
use crate::quant::{GgmlType, WeightLayout};
use crate::{Error, Result};
use cudarc::driver::CudaSlice;
use std::borrow::Cow;
use std::sync::Arc;

/// matvec.cuh: the SIMT matvec loop that matvec.cu (one row) and matvec_rows.cu (short
/// prompts) instantiate.
const MATVEC_LOOP: &str = include_str!("matvec.cuh");

pub(super) static MATVEC: Source = Source {
    name: "matvec",
    parts: &[COMMON, LAYOUTS, MATVEC_LOOP, include_str!("matvec.cu")],
};

pub(super) static MATVEC_ROWS: Source = Source {
    name: "matvec_rows",
    parts: &[COMMON, LAYOUTS, MATVEC_LOOP, include_str!("matvec_rows.cu")],
};

pub(super) static MATVEC_TC: Source = Source {
    name: "matvec_tc",
    parts: &[COMMON, MMA, ROUTE, include_str!("matvec_tc.cu")],
};

pub(super) static MATMUL: Source = Source {
    name: "matmul",
    parts: &[COMMON, LAYOUTS, include_str!("matmul.cu")],
};

pub(super) static MATMUL_TC: Source = Source {
    name: "matmul_tc",
    parts: &[COMMON, LAYOUTS, MMA, TILES_TC, include_str!("matmul_tc.cu")],
};

/// MV_WARPS·32 threads (matvec.cu).
const MATVEC_THREADS: u32 = 128;
const MATVEC_WARPS: usize = 4;
/// Warps per SM that keep enough weight bytes in flight (MV_MIN_BLOCKS·MV_WARPS).
const MATVEC_WARPS_PER_SM: usize = 16;
/// Warps of a block (at most MT_WARPS), 16-row tiles, one block an SM (matvec_tc.cu): one
/// block of 16 warps rather than two of 8 reads x from L2 once an SM (H100, 2026-11-26: 1B
/// shape 1,637 → 1,710 tok/s, 8B 390 → 405).
const MATVEC_TC_WARPS: usize = 16;
const MATVEC_TC_TILE: usize = 16;
/// The fewest warps of a tensor-core matvec block (`matvec_tc_plan`).
const MATVEC_TC_MIN_WARPS: usize = 4;
/// MLX and ggml weights (gate and up together) up to this many stay on matvec.cu,
/// which keeps x in f32, unless an MLX matrix follows an RMSNorm over more than `FOLD_NORM_MAX_K`:
/// matvec_tc folds it, where matvec.cu needs a launch in front (H200, 2026-11-26: Llama-3.2-1B
/// shape 1,388 → 1,451 tok/s, Gemma-3-1B 398 → 438). Until the sixteenth session's cheaper
/// dequantization the threshold was 2^21 (SmolLM2's gate/up pair, 1.8 M, lost 8% on tensor
/// cores). Since it, all of SmolLM2's matrices (o, 0.33 M, the smallest) run better there
/// (H100, 2026-11-27, decode after 128 tokens: 2,374 → 2,521 tok/s), though its gate/up pair
/// alone still loses (−6%): the tensor-core kernels hand each other f16 copies of x and fold
/// the norms. Smaller matrices were not measured.
const SIMT_MAX_WEIGHTS: usize = (1 << 18) - 1;
/// Shared memory per block (staged x, and the norm weight where the kernel folds the norm): x
/// up to ~50,000 elements, ~17,000 behind a folded norm (the launch raises the block's limit
/// past the default 48 KB).
const MATVEC_TC_MAX_SHARED: usize = 100 << 10;
/// The most dynamic shared memory of the few-row kernels (`matvec_tc_rows`: four rows of x of
/// k = 14,336 take 129 KB); one block an SM.
const MATVEC_TC_ROWS_MAX_SHARED: usize = 200 << 10;
/// MM_BM = MM_BN, 256 threads (matmul.cu).
const MATMUL_TILE: usize = 64;
const MATMUL_THREADS: u32 = 256;
/// TC_BM = TC_BN (tiles_tc.cuh), 256 threads.
pub(super) const MATMUL_TC_TILE: usize = 128;
/// TC_BK: columns of k per step of the tensor-core kernels.
const MATMUL_TC_STEP: usize = 64;
/// Fewer rows leave most of a 128-row tensor-core tile idle; the f32 tiles then do as well and
/// keep f32 operands (the MoE experts' tiles).
pub(super) const MATMUL_TC_MIN_ROWS: usize = 17;
/// Up to this many rows of x (a short prompt) the layouts without a short tensor-core kernel
/// (MLX 2/3/5/6-bit, the other ggml types, dense) run on matvec_rows.cu where it reads the
/// weight, from one more on the tensor-core tiles. The tiles cost about the same for any row
/// count up to 128, matvec_rows.cu about a decode matvec for each row of x: H200, 2026-11-28,
/// prefill tok/s of matvec_rows.cu against the tiles (at 24 and 32 rows) and the f32 tiles
/// before, measured on MLX 4-bit before it had its short kernels: 8B at 2 / 4 / 8 / 16 rows 194 /
/// 382 / 451 / 482 (f32 tiles 28 / 44 / 107 / 210; the tensor-core tiles at 24 and 32 rows 995
/// and 1,500); 1B 850 / 1,671 / 2,267 / 2,786 (121 / 190 / 467 / 907; tiles 5,067 and 6,793).
const MATVEC_ROWS_MAX: usize = 8;
/// Up to this many rows the staged-f16 layouts take their short kernels (an A fragment's 16
/// rows: `matmul_tcq_rows_mlx*`, `matmul_tcq16_*`), from one more the ring or cuBLAS.
const MATMUL_TCQ_ROWS_MAX: usize = 16;
/// Up to this many rows MLX 4/8-bit weights take `matmul_tcq_rows32_mlx*` (two A fragments)
/// from one more than MATMUL_TCQ_ROWS_MAX, from one more cuBLAS (matmul_tc.cu has the numbers).
const MATMUL_TCQ_ROWS32_MAX: usize = 32;
/// matvec_rows.cu's shape: weight rows a warp (MVR_ROWS) and rows of x a block (MV_XROWS).
const MATVEC_ROWS_SHAPE: (usize, usize) = (4, 4);
/// From this many rows (MLX 4/8-bit: from MATMUL_TCQ_ROWS32_MAX + 1) the product goes through
/// cuBLAS on a dequantized f16 copy of the weight (`dequant_gemm`), where cuBLAS loads
/// (`CudaOptions::cublas`): the copy's writes and reads cost less than the tensor-core tiles
/// lose to cuBLAS's GEMMs, whose tiles suit a few rows as well. H200, 2026-11-28, prefill tok/s
/// of the tiles against cuBLAS, the forty-third session: at 17 / 32 / 64 rows 8B MLX 4-bit 749
/// / 1,425 / 3,344 → 1,429 / 2,638 / 5,065, 1B 3,413 / 7,399 / 15,089 → 6,024 / 11,528 /
/// 21,899, 8B Q4_K_M 734 / 1,512 / 3,355 → 1,458 / 2,706 / 5,248; the forty-second session at
/// 96 / 128 / 160 rows 8B MLX 4-bit 6,251 / 8,597 / 5,284 → 7,372 / 9,614 / 11,383, 1B 25,408
/// / 31,261 / 22,946 → 30,895 / 40,172 / 47,874, Qwen3-30B-A3B MLX 4-bit (attention
/// projections) 4,512 / 5,035 / 5,657 → 4,822 / 5,364 / 6,522 (at 128 rows the tiles had won in
/// the thirty-seventh, before the copy's stores were coalesced); at 2,048 rows 8B 13,442 →
/// 27,381, 1B 82,369 → 144,359.
const GEMM_MIN_ROWS: usize = 17;
pub(super) fn register(reg: &mut Registry<Planner>) {
    for layout in WeightLayout::all() {
        reg.insert("matmul", &layout.variant(), DType::F32, matmul);
        reg.insert("gated_matmul", &layout.variant(), DType::F32, gated_matmul);
    }
}

fn matmul(
    lib: &KernelLibrary,
    op: &Op,
    inputs: &[Tensor],
    outputs: &[Tensor],
) -> Result<CudaKernel> {
    let Op::MatMul {
        layout,
        has_bias,
        pre_norm,
        half_x,
        residual_update,
    } = *op
    else {
        return Err(wrong_op(op));
    };
    let n_weight = layout.tensor_count();
    // x's f16 copy (last), read by the tensor-core matvec only.
    let (inputs, x_h) = optional_last(half_x, inputs);
    let (update, inputs, outputs) = split_update(op, (residual_update, pre_norm), inputs, outputs)?;
    let ([out], Some(x)) = (outputs, inputs.first()) else {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    };
    let (norm, inputs) = split_norm(op, pre_norm, &inputs)?;
    let inputs = &inputs[..];
    if inputs.len() != 1 + n_weight + has_bias as usize {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    }
    let bias = Bias::new(inputs.get(1 + n_weight).filter(|_| has_bias))?;
    let (m, k, n) = (x.rows(), x.last_dim(), out.last_dim());
    let (weight, rows) = Weight::parse("matmul", layout, &inputs[1..1 + n_weight], k)?;
    if rows < n {
        return Err(Error::op(
            "matmul",
            format!("the weight holds {rows} rows of {k}, the output needs {n}"),
        ));
    }
    weight.check_alignment("matmul")?;

    // One row goes to the matvec kernels where they can read the weight; a folded norm gives
    // them an aligned x whatever x is (`MatvecInput`). Otherwise the norm, if any, runs first
    // into a scratch row that the tiled kernel reads.
    // f16 x (f16 activations) goes to the kernels that stage x as f16 (`StagedX`); the others
    // read it widened to f32 (`widened_x`).
    let f16_x = x.dtype() == DType::F16;
    let vector_ready = !f16_x
        && m == 1
        && matvec_reads(&weight, k)?
        && (norm.is_some() || device_ptr(x)? % 16 == 0);
    if let (false, Some(_)) = (vector_ready, norm) {
        let input = MatvecInput::new(lib, x, update, norm, 0, false)?;
        let matmul = tiled(
            lib,
            &weight,
            input.x,
            (1, k, n),
            bias,
            device_ptr(out)?,
            (false, 1),
        )?;
        return Ok(input.then(vec![matmul]));
    }
    if vector_ready {
        let plan = DecodePlan::new(lib, (&weight, None), x, n, update, norm)?;
        // The plain tensor-core kernels take x's f16 copy last (null: none; with a norm they
        // read x, or the normed row).
        let half = match (plan.kernel, x_h) {
            (MatvecKernel::TensorCores(_), Some(x_h)) if norm.is_none() => {
                Some(half_copy_ptr(op, x_h, k)?)
            }
            (MatvecKernel::TensorCores(_), _) => Some(0),
            _ => None,
        };
        return plan.plain(lib, &weight, (k, n), bias, device_ptr(out)?, half);
    }
    // Short prompts: 2–4 rows on the decode kernel where its plan takes the weight
    // (`matvec_tc_rows`); else up to 16 rows the staged-f16 layouts on tensor cores (MLX
    // 4/8-bit on `matmul_tcq_rows_*`, the ggml ones on `matmul_tcq16_*`), other layouts with
    // the weights read about once for every 4 rows of x (matvec_rows.cu, 2–8 rows).
    if let Some(kernel) = (!f16_x)
        .then(|| matvec_tc_rows(lib, &weight, x, (m, k, n), bias, out))
        .transpose()?
        .flatten()
    {
        return Ok(kernel);
    }
    let short = (2..=MATMUL_TCQ_ROWS_MAX).contains(&m);
    let tc_rows = match short && short_rows_staged(layout, k) {
        true => 2,
        false => MATVEC_ROWS_MAX + 1,
    };
    let tensor_cores = tensor_core_tiles((m, k), device_ptr(x)?, &weight, tc_rows);
    let rows_ready =
        !f16_x && m <= MATVEC_ROWS_MAX && short && !tensor_cores && matvec_reads(&weight, k)?;
    if rows_ready && device_ptr(x)? % 16 == 0 {
        let x = device_ptr(x)?;
        return Ok(CudaKernel::single(matvec_rows(
            lib,
            &weight,
            x,
            (m, k, n),
            bias,
            device_ptr(out)?,
        )?));
    }
    let mlx_rows = mlx_short_rows(layout, (m, k, n));
    // (cuBLAS is loaded only when a prompt this long first comes.)
    let blas = (tensor_cores && m >= GEMM_MIN_ROWS && !mlx_rows)
        .then(|| lib.cublas())
        .flatten();
    if let Some(blas) = blas {
        return dequant_gemm(lib, &blas, &weight, x, (n, bias), out);
    }
    // The MLX 4/8-bit kernel addresses its staged x with 32-bit element offsets.
    let staged_offsets_fit = m * k.next_multiple_of(MATMUL_TC_STEP) <= u32::MAX as usize;
    if let (
        true,
        Weight::Mlx {
            w,
            scales,
            biases,
            bits: bits @ (4 | 8),
            group_shift,
            scale_type,
        },
    ) = (tensor_cores && staged_offsets_fit, &weight)
    {
        let order = if *bits == 4 { TCQ_MLX4 } else { TCQ_BYTES };
        // (Short kernels: blocks resident an SM, their launch bounds.)
        let (name, shared, resident) = match (mlx_rows, short) {
            (true, true) => (
                format!("matmul_tcq_rows_mlx{bits}"),
                TcqShared::XRange(16),
                Some(2),
            ),
            (true, false) => (
                format!("matmul_tcq_rows32_mlx{bits}"),
                TcqShared::Fixed(0),
                Some(1),
            ),
            (false, _) => (
                format!("matmul_tcq_mlx{bits}"),
                TcqShared::Fixed(tcq_shared_bytes(*bits)),
                None,
            ),
        };
        let kernel = (name.as_str(), shared, resident);
        return tcq_matmul(lib, x, order, kernel, (n, bias), out, |x_args, dst| {
            Ok(x_args
                .ptr(w)?
                .ptr(scales)?
                .ptr(biases)?
                .code(*scale_type)
                .bias(bias)?
                .u64(dst)
                .int(m)?
                .int(n)?
                .int(k)?
                .code(*group_shift))
        });
    }
    // The ggml layouts take `matmul_tcq_{q4_0,q4_1,q5_0,q5_1,q8_0,q4_k,q5_k,q6_k}`: whole
    // 64-column steps of rows 4-byte aligned (two blocks of 32: 36 to 68 bytes) or 16-byte
    // aligned (a K-quant header, a sub-block pair's nibbles and Q5_K's qh: 48 resp. 80
    // bytes; Q6_K rows of k % 2,048 == 0, 8-byte words around a half's ql, qh and scales).
    if let (true, Weight::Ggml { data, ty }) = (tensor_cores && staged_offsets_fit, &weight) {
        let (order, align) = match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 => {
                (Some(TCQ_Q4_0), 4)
            }
            GgmlType::Q8_0 => (Some(TCQ_BYTES), 4),
            GgmlType::Q4K | GgmlType::Q5K => (Some(TCQ_Q4K), 16),
            GgmlType::Q6K if k.is_multiple_of(2048) => (Some(TCQ_Q4K), 16),
            _ => (None, 1),
        };
        if let Some(order) = order.filter(|_| k.is_multiple_of(MATMUL_TC_STEP)) {
            if device_ptr(data)? % align == 0 {
                let prefix = if short {
                    "matmul_tcq16_"
                } else {
                    "matmul_tcq_"
                };
                let name = format!("{prefix}{}", ty.name());
                let shared = TcqShared::Fixed(tcq_ggml_shared_bytes(*ty));
                return tcq_matmul(
                    lib,
                    x,
                    order,
                    (&name, shared, short.then_some(2)),
                    (n, bias),
                    out,
                    |x_args, dst| {
                        x_args
                            .ptr(data)?
                            .bias(bias)?
                            .u64(dst)
                            .int(m)?
                            .int(n)?
                            .int(k)
                    },
                );
            }
        }
    }
    // The generic tensor-core tiles split k where their tiles leave SMs idle, as
    // `matmul_tcq_*` do. H100, 2026-11-28, prefill of a 128-token prompt: Q4_K 8B shape
    // 2,335 → 5,720 tok/s, 1B 8,454 → 23,391, Q6_K 8B 1,777 → 4,336; of 512 tokens, Q4_K 8B
    // 6,870 → 8,340; of 2,048, within ±1.0%.
    let splits = match tensor_cores {
        true => tc_k_splits(lib, (m, k, n)),
        false => f32_k_splits(lib.sm_count(), (m, k, n)),
    };
    let (x, widen) = widened_x(lib, x)?;
    if splits > 1 {
        let (scratch, partial) = lib.shared_scratch(splits * m * n * 4)?;
        let split = (tensor_cores, splits);
        let matmul = tiled(lib, &weight, x, (m, k, n), bias, partial, split)?;
        let sum = splitk_sum(lib, partial, splits, bias, out)?;
        return Ok(widen.then(CudaKernel::sharing(vec![matmul, sum], scratch)));
    }
    let out = device_ptr(out)?;
    let matmul = tiled(lib, &weight, x, (m, k, n), bias, out, (tensor_cores, 1))?;
    Ok(widen.then(CudaKernel::single(matmul)))
}

/// Whether 2–16 rows of a weight of `layout` with k columns run on the short tensor-core
/// kernels, which stage x as f16: MLX 4/8-bit (`matmul_tcq_rows_*`), and the ggml layouts of
/// `matmul_tcq16_*` in whole 64-column steps (Q6_K: rows of k % 2,048). Other rows of these
/// layouts keep matvec_rows.cu, as the generic tiles' empty rows would cost more.
fn short_rows_staged(layout: WeightLayout, k: usize) -> bool {
    match layout {
        WeightLayout::MlxAffine { bits: 4 | 8, .. } => true,
        WeightLayout::Gguf(GgmlType::Q6K) => k.is_multiple_of(2048),
        WeightLayout::Gguf(
            GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::Q4K
            | GgmlType::Q5K,
        ) => k.is_multiple_of(MATMUL_TC_STEP),
        _ => false,
    }
}

/// Whether 2–32 rows of an MLX 4/8-bit weight `[n, k]` run on the short kernels
/// (`matmul_tcq_rows{,32}_*`), which address the weight's words and groups with 32-bit offsets.
fn mlx_short_rows(layout: WeightLayout, (m, k, n): (usize, usize, usize)) -> bool {
    (2..=MATMUL_TCQ_ROWS32_MAX).contains(&m)
        && matches!(layout, WeightLayout::MlxAffine { bits: bits @ (4 | 8), .. }
            if n * (k / 32) * bits as usize <= u32::MAX as usize)
}

/// Whether a plain matmul of m rows of a weight of `layout` `[n, k]` reads f16 x where it lies,
/// with no staging launch of its own (`Backend::matmul_reads_half_x`): the planner's products
/// through cuBLAS (from GEMM_MIN_ROWS, not on the short kernels, not of dense weights, whose
/// f32 form the layout does not tell), of rows of whole 64-column steps (`StagedX`'s in-place
/// rule), where cuBLAS loads. The short kernels stage f16 x as they stage f32 x (one launch
/// either way, and from f16 it took 3.24 µs against 2.70, H200, 2026-11-29), so f16
/// activations would spare them nothing. Rows and x are taken as aligned.
pub(crate) fn matmul_reads_half_x(
    lib: &KernelLibrary,
    layout: WeightLayout,
    (m, k, n): (usize, usize, usize),
) -> bool {
    m >= GEMM_MIN_ROWS
        && !mlx_short_rows(layout, (m, k, n))
        && k.is_multiple_of(MATMUL_TC_STEP)
        && !matches!(layout, WeightLayout::Dense)
        && lib.cublas().is_some()
}

/// x's address as f32 for the kernels that read f32 x, and the launches before them: none for
/// f32 x, else f16 x widened into a scratch copy.
fn widened_x(lib: &KernelLibrary, x: &Tensor) -> Result<(u64, CudaKernel)> {
    if x.dtype() != DType::F16 {
        return Ok((device_ptr(x)?, CudaKernel::new(Vec::new(), None)));
    }
    let n = x.elem_count();
    let (scratch, wide) = lib.scratch(n * 4)?;
    let widen = super::elementwise::widen_f16_at(lib, device_ptr(x)?, wide, n)?;
    Ok((wide, CudaKernel::new(vec![widen], Some(scratch))))
}

/// Whether matvec.cu / matvec_tc.cu read `weight` with k columns: dense rows only as whole
/// 16-byte aligned units of 32 (a view may be neither).
pub(super) fn matvec_reads(weight: &Weight, k: usize) -> Result<bool> {
    Ok(match weight {
        Weight::Dense { w, .. } => k.is_multiple_of(32) && device_ptr(w)? % 16 == 0,
        _ => true,
    })
}

/// matvec_rows.cu's product of x `[m, k]` at `x` (2 ≤ m ≤ MATVEC_ROWS_MAX, rows 16-byte
/// aligned) and `weight` into out `[m, n]` at `out`: kgroups planned as for a matvec of the
/// blocks' rows of x times n weight rows.
fn matvec_rows(
    lib: &KernelLibrary,
    weight: &Weight,
    x: u64,
    (m, k, n): (usize, usize, usize),
    bias: Bias,
    out: u64,
) -> Result<Launch> {
    let (weight_rows, x_rows) = MATVEC_ROWS_SHAPE;
    let x_blocks = m.div_ceil(x_rows);
    let kgroups = matvec_kgroups(n * x_blocks, k, lib.sm_count(), (weight_rows, 1));
    let name = format!("matvec_rows_{}", weight.typed_layout_name());
    let args = weight.tensor_args(Args::new().u64(x))?;
    let args = args.bias(bias)?.u64(out).int(n)?.int(k)?;
    let args = weight.group_args(args).int(kgroups)?.int(m)?;
    let grid = (
        blocks(n, weight_rows * MATVEC_WARPS / kgroups)?,
        dim(x_blocks)?,
        1,
    );
    lib.launch(&MATVEC_ROWS, &name, grid, MATVEC_THREADS, 0, args)
}

/// The tiled matmul (matmul.cu's f32 tiles, or matmul_tc.cu's generic tensor-core tiles) of x
/// `[m, k]` at `x` and `weight` into out `[m, n]` at `out`; with `splits` > 1, block z of the
/// grid takes the z-th part of k and stores its partial tile as slice z of `[splits, m, n]` at
/// `out`, for `splitk_sum`.
fn tiled(
    lib: &KernelLibrary,
    weight: &Weight,
    x: u64,
    (m, k, n): (usize, usize, usize),
    bias: Bias,
    out: u64,
    (tensor_cores, splits): (bool, usize),
) -> Result<Launch> {
    let (source, prefix, tile) = match tensor_cores {
        true => (&MATMUL_TC, "matmul_tc", MATMUL_TC_TILE),
        false => (&MATMUL, "matmul", MATMUL_TILE),
    };
    let name = format!("{prefix}_{}", weight.layout_name());
    let args = weight.typed_tensor_args(Args::new().u64(x))?;
    let args = args.bias(bias)?.u64(out).int(m)?.int(n)?.int(k)?;
    let args = weight.group_args(args);
    let grid = (blocks(n, tile)?, blocks(m, tile)?, splits as u32);
    lib.launch(source, &name, grid, MATMUL_THREADS, 0, args)
}

/// `splitk_sum`: out `[m, n]` = the sum of the `splits` slices at `partial` (+ bias).
fn splitk_sum(
    lib: &KernelLibrary,
    partial: u64,
    splits: usize,
    bias: Bias,
    out: &Tensor,
) -> Result<Launch> {
    let (m, n) = (out.rows(), out.last_dim());
    let args = Args::new()
        .u64(partial)
        .int(splits)?
        .bias(bias)?
        .ptr(out)?
        .int(m)?
        .int(n)?
        .early_launch(m);
    let grid = (blocks(m * n, MATMUL_THREADS as usize)?, 1, 1);
    lib.launch(&MATMUL_TC, "splitk_sum", grid, MATMUL_THREADS, 0, args)
}

/// Column orders of `stage_x_f16` (matmul_tc.cu's TCQ_*): how the kernel's fragments take the
/// fields of MLX 4-bit words, of bytes (MLX 8-bit, Q8_0), of Q4_0 blocks, of a Q4_K sub-block
/// pair.
const TCQ_MLX4: i32 = 0;
const TCQ_BYTES: i32 = 1;
const TCQ_Q4_0: i32 = 2;
const TCQ_Q4K: i32 = 3;
/// x as it lies (`dequant_gemm`).
const TCQ_NATURAL: i32 = 4;

/// Whether the tensor-core tiles (`tiles_tc.cuh` and the rings) take an `[m, k]` x at address
/// `x` times `weight`: at least `min_rows` rows, float4 loads of x, and a weight that f16
/// operands carry (not f32: f16 would drop its precision and range). The MoE tiles ask the same.
pub(super) fn tensor_core_tiles(
    (m, k): (usize, usize),
    x: u64,
    weight: &Weight,
    min_rows: usize,
) -> bool {
    m >= min_rows
        && k.is_multiple_of(4)
        && x.is_multiple_of(16)
        && !matches!(weight, Weight::Dense { ft: 0, .. })
}

/// Steps of k (MATMUL_TC_STEP columns) a split-K block takes at the least, and the rows long
/// enough to split where more than half the SMs already work.
const SPLIT_K_MIN_STEPS: usize = 8;
const SPLIT_K_LONG_STEPS: usize = 128;

/// Splits of k for a `matmul_tcq_*` whose output tiles leave SMs idle (short prompts: few row
/// tiles), up to a wave of blocks (two an SM): where at most half the SMs would work, or fewer
/// than all over long rows. Each split's partial tile costs a write and a read, which short
/// rows do not repay once most SMs work (H100, 2026-11-26: Qwen3-0.6B's o projection at 2,048
/// rows, 128 tiles of 32 steps, lost 5–6% split in two; the 8B shape's down projection at 512
/// rows, 128 tiles of 224 steps, gained).
fn tcq_k_splits(tiles: usize, steps: usize, sm_count: usize) -> usize {
    let idle = tiles <= sm_count / 2 || (tiles < sm_count && steps >= SPLIT_K_LONG_STEPS);
    match idle {
        true => splits_to_fill(tiles, steps / SPLIT_K_MIN_STEPS, 2 * sm_count),
        false => 1,
    }
}

/// Splits of k that bring `tiles` output blocks up to `resident` blocks (the GPU's at once),
/// at most `most` (the splits the k loop allows) and at least one: the split-K rule of every
/// tiled kernel here, each with its own test of whether it splits at all.
fn splits_to_fill(tiles: usize, most: usize, resident: usize) -> usize {
    (resident / tiles.max(1)).min(most).max(1)
}

/// `tcq_k_splits` of a tensor-core prefill matmul of x `[m, k]` into `[m, n]`: its 128×128
/// output tiles and 64-column steps on this GPU.
fn tc_k_splits(lib: &KernelLibrary, (m, k, n): (usize, usize, usize)) -> usize {
    let tiles = n.div_ceil(MATMUL_TC_TILE) * m.div_ceil(MATMUL_TC_TILE);
    tcq_k_splits(tiles, k.div_ceil(MATMUL_TC_STEP), lib.sm_count())
}

/// Steps of k a split of a short prompt's kernel takes at the least: two for each warp half.
const SHORT_SPLIT_MIN_STEPS: usize = 4;

/// Splits of k for a short prompt's kernel (`matmul_tcq_rows*`, `matmul_tcq16_*`: one row of
/// `tiles` 128-column blocks) up to the blocks the GPU holds at once (`resident`): those
/// kernels stream weights through registers or a ring, so the bytes in flight scale with the
/// blocks resident, and the partial slices of a few rows cost little.
fn short_k_splits(tiles: usize, steps: usize, resident: usize) -> usize {
    splits_to_fill(tiles, steps / SHORT_SPLIT_MIN_STEPS, resident)
}

/// Columns of k a split of matmul.cu's f32 tiles takes at the least: a 64×64 tile does 4,096
/// FMAs a column of k, so even short splits repay their partial tile's write and read.
const F32_SPLIT_MIN_COLUMNS: usize = 128;

/// Splits of k for matmul.cu's f32 tiles of x `[m, k]` into `[m, n]`, where the tiles would
/// leave most SMs idle, up to two blocks an SM. An F32 MoE router at 128 tokens (128 × 128
/// outputs, four tiles, k = 2,048) otherwise ran on four SMs: ~190 µs a layer of Qwen3-30B-A3B.
/// H200, 2026-11-28, the Q4_K_M mix's prefill of 128 tokens: 2,895 → 3,566 tok/s split.
fn f32_k_splits(sm_count: usize, (m, k, n): (usize, usize, usize)) -> usize {
    let tiles = n.div_ceil(MATMUL_TILE) * m.div_ceil(MATMUL_TILE);
    match tiles > sm_count / 2 {
        true => 1,
        false => splits_to_fill(tiles, k / F32_SPLIT_MIN_COLUMNS, 2 * sm_count),
    }
}

/// Dynamic shared memory of a `matmul_tcq_*` kernel.
#[derive(Clone, Copy)]
enum TcqShared {
    /// These bytes, however k is split (the rings' stages).
    Fixed(u32),
    /// A block's k range of this many rows of x, which the kernel reads as it lies (f32 or f16,
    /// its type the argument after x) and writes as f16 in its order (`matmul_tcq_rows_*`: 4
    /// bytes a pair of a row's columns and ROWS_X_PAD words after each row).
    XRange(usize),
}

/// Words of padding after a row of x in `matmul_tcq_rows_*`' shared memory (matmul_tc.cu).
const ROWS_X_PAD: usize = 4;
/// Shared memory of a partial tile (16 rows of 128 floats) that `matmul_tcq_rows_*` sums across
/// the cluster of its k splits, over its x range.
const CLUSTER_TILE_BYTES: u32 = 16 * 128 * 4;

/// Splits of `steps` 64-column steps (at least `splits`) such that a split's range of `rows`
/// rows of x fits `budget` bytes of shared memory, and the bytes it takes (`TcqShared::XRange`).
fn x_range_splits(splits: usize, steps: usize, rows: usize, budget: usize) -> (usize, u32) {
    let step_words = MATMUL_TC_STEP / 2;
    let most = ((budget / (4 * rows)).saturating_sub(ROWS_X_PAD) / step_words).max(1);
    let splits = splits.max(steps.div_ceil(most));
    let words = steps.div_ceil(splits) * step_words + ROWS_X_PAD;
    (splits, (4 * rows * words) as u32)
}

/// The launches of `matmul_tcq_*` kernel `name` (with `shared` dynamic shared memory; `short`:
/// a short prompt's kernel, with its blocks resident an SM) for x `[m, k]` staged in `order`
/// (by the kernel itself where `shared` is an x range): `args(x_args, dst)` lists its arguments
/// after x's (`x_args`: the staged x, or x and its type) for the output address `dst`. Where the
/// output tiles leave SMs idle (`tcq_k_splits`, `short_k_splits`), or a block's k range of x
/// would not fit its shared memory, blocks split k (grid z), write partial tiles to scratch
/// after the staged x, and `splitk_sum` adds them and the bias into `out`.
fn tcq_matmul(
    lib: &KernelLibrary,
    x: &Tensor,
    order: i32,
    (name, shared, short): (&str, TcqShared, Option<usize>),
    (n, bias): (usize, Bias),
    out: &Tensor,
    args: impl Fn(Args, u64) -> Result<Args>,
) -> Result<CudaKernel> {
    let (m, k) = (x.rows(), x.last_dim());
    let steps = k.div_ceil(MATMUL_TC_STEP);
    let per_sm = short.unwrap_or(1);
    let mut splits = match short {
        Some(_) => short_k_splits(n.div_ceil(MATMUL_TC_TILE), steps, per_sm * lib.sm_count()),
        None => tc_k_splits(lib, (m, k, n)),
    };
    let shared_x = matches!(shared, TcqShared::XRange(_));
    let shared = match shared {
        TcqShared::Fixed(bytes) => bytes,
        TcqShared::XRange(rows) => {
            let budget = lib.shared_budget(&MATMUL_TC, name, per_sm as u32, MATMUL_THREADS)?;
            let (fitting, bytes) = x_range_splits(splits, steps, rows, budget);
            splits = fitting;
            bytes
        }
    };
    // The 2–16-row kernel sums its k splits inside a cluster of them where clusters run; other
    // splits write partial slices that `splitk_sum` adds.
    let cluster = (shared_x && lib.clusters())
        .then(|| cluster_sum(splits, n.div_ceil(MATMUL_TC_TILE), lib.sm_count()))
        .flatten();
    let shared = match cluster {
        Some(_) => shared.max(CLUSTER_TILE_BYTES),
        None => shared,
    };
    let partial_bytes = match (splits > 1, cluster) {
        (true, None) => splits * m * n * 4,
        _ => 0,
    };
    let staged = match shared_x {
        true => StagedX::as_it_lies(lib, x, partial_bytes)?,
        false => StagedX::new(lib, x, order, partial_bytes)?,
    };
    let grid = (
        blocks(n, MATMUL_TC_TILE)?,
        blocks(m, MATMUL_TC_TILE)?,
        splits as u32,
    );
    // The 2–16-row kernel lets the next kernel launch early where its grid is one wave.
    let one_wave = (grid.0 * grid.1 * grid.2) as usize <= per_sm * lib.sm_count();
    let x_args = match shared_x {
        true => Args::new()
            .u64(staged.xh)
            .code(float_type("matmul", "x", x.dtype())?)
            .early(one_wave && early_launches(m)),
        false => Args::new().u64(staged.xh),
    };
    let dst = match partial_bytes > 0 {
        true => staged.after,
        false => device_ptr(out)?,
    };
    let args = args(x_args, dst)?;
    let matmul = lib.launch(&MATMUL_TC, name, grid, MATMUL_THREADS, shared, args)?;
    let matmul = match cluster {
        Some(z) => matmul.in_clusters(z)?,
        None => matmul,
    };
    let mut launches: Vec<Launch> = staged.launch.into_iter().chain([matmul]).collect();
    if partial_bytes > 0 {
        launches.push(splitk_sum(lib, dst, splits, bias, out)?);
    }
    Ok(CudaKernel::sharing(launches, staged.scratch))
}

/// A long prompt's product through cuBLAS: the weight dequantized into f16 rows of kp columns
/// (`dequant_f16_*`, scratch after the staged x), x staged as f16 as it lies (`stage_x_f16`),
/// their product by cuBLAS (`Gemm`: Hopper's tensor-core GEMMs, which mma.sync tiles do not
/// reach) into out, or with a bias into scratch that `splitk_sum` (one slice) adds it to.
fn dequant_gemm(
    lib: &KernelLibrary,
    blas: &Cublas,
    weight: &Weight,
    x: &Tensor,
    (n, bias): (usize, Bias),
    out: &Tensor,
) -> Result<CudaKernel> {
    let (m, k) = (x.rows(), x.last_dim());
    let kp = k.next_multiple_of(MATMUL_TC_STEP);
    let w_bytes = (n * kp * 2).next_multiple_of(256);
    let sum_bytes = if bias.0.is_some() { m * n * 4 } else { 0 };
    let staged = StagedX::new(lib, x, TCQ_NATURAL, w_bytes + sum_bytes)?;
    let w_h = staged.after;
    let args = weight.typed_tensor_args(Args::new())?;
    let args = weight.group_args(args.u64(w_h).int(n)?.int(k)?.int(kp)?);
    let name = format!("dequant_f16_{}", weight.layout_name());
    let grid = (blocks(n * kp / 32, MATMUL_THREADS as usize)?, 1, 1);
    let dequant = lib.launch(&MATMUL_TC, &name, grid, MATMUL_THREADS, 0, args)?;
    let dst = match bias.0 {
        Some(_) => w_h + w_bytes as u64,
        None => device_ptr(out)?,
    };
    let gemm = blas.gemm((m, n, kp), kp, (w_h, staged.xh, dst))?;
    let mut launches: Vec<Launch> = staged.launch.into_iter().chain([dequant, gemm]).collect();
    if bias.0.is_some() {
        launches.push(splitk_sum(lib, dst, 1, bias, out)?);
    }
    Ok(CudaKernel::sharing(launches, staged.scratch))
}

/// x as `matmul_tcq_*` and `dequant_gemm` read it: f16 rows padded to whole steps, columns in
/// the kernel's `order`, written by `stage_x_f16` (`launch`) to the library's shared scratch,
/// followed by `extra` bytes of scratch at `after` (16-byte aligned). f16 x that already lies so
/// (rows of whole steps in natural order, 16-byte aligned: f16 activations for cuBLAS) is read
/// where it is, with no launch.
struct StagedX {
    launch: Option<Launch>,
    scratch: Arc<CudaSlice<u8>>,
    xh: u64,
    after: u64,
}

impl StagedX {
    fn new(lib: &KernelLibrary, x: &Tensor, order: i32, extra: usize) -> Result<Self> {
        let (m, k) = (x.rows(), x.last_dim());
        let kp = k.div_ceil(MATMUL_TC_STEP) * MATMUL_TC_STEP;
        let xt = float_type("matmul", "x", x.dtype())?;
        let in_place =
            x.dtype() == DType::F16 && order == TCQ_NATURAL && kp == k && device_ptr(x)? % 16 == 0;
        if in_place {
            return Self::as_it_lies(lib, x, extra);
        }
        let staged_bytes = (m * kp * 2).next_multiple_of(256);
        let (scratch, xh) = lib.shared_scratch(staged_bytes + extra)?;
        let args = Args::new()
            .ptr(x)?
            .u64(xh)
            .int(m)?
            .int(k)?
            .int(kp)?
            .code(order)
            .code(xt);
        let grid = (blocks(m * kp / 8, MATMUL_THREADS as usize)?, 1, 1);
        let launch = lib.launch(&MATMUL_TC, "stage_x_f16", grid, MATMUL_THREADS, 0, args)?;
        Ok(StagedX {
            launch: Some(launch),
            scratch,
            xh,
            after: xh + staged_bytes as u64,
        })
    }

    /// x where it lies (no launch), for a kernel that reads it so, and `extra` bytes of scratch.
    fn as_it_lies(lib: &KernelLibrary, x: &Tensor, extra: usize) -> Result<Self> {
        let (scratch, after) = lib.shared_scratch(extra)?;
        Ok(StagedX {
            launch: None,
            scratch,
            xh: device_ptr(x)?,
            after,
        })
    }
}

/// The cluster in which `matmul_tcq_rows_*` sums its `splits` k splits of `tiles` 128-column
/// tiles: at most MAX_CLUSTER splits (the portable size), in grids of at most a block an SM;
/// None where `splitk_sum` adds them. H200, 2026-11-29, serialized µs a product of an 8-token
/// prefill, `splitk_sum` (2.66 µs) against clusters of every size: 1B q 6.40 → 8.12 in clusters
/// of 8 (128 blocks), k and v 5.9 → 6.75 (32 blocks); gate and up 10.44 → 16.5 in clusters of 4
/// but 256 blocks, down 10.99 → 18.21 in clusters of 16; Qwen3-0.6B q/k/v/o, gate and up 5.7–6.0
/// → 6.6–6.8 in clusters of 4 (32–96 blocks), down 6.19 → 8.15 in clusters of 12.
fn cluster_sum(splits: usize, tiles: usize, sm_count: usize) -> Option<u32> {
    let fits = (2..=MAX_CLUSTER as usize).contains(&splits) && tiles * splits <= sm_count;
    fits.then_some(splits as u32)
}

/// Dynamic shared memory of `matmul_tcq_mlx{bits}`: Tcq<bits>::STAGES slots of Tcq::BYTES (an
/// x tile of 128 rows × 72 halves, 128 rows of 8·bits raw bytes, 2 × 2 × 136 scale words).
fn tcq_shared_bytes(bits: u32) -> u32 {
    let stages = if bits == 4 { 4 } else { 3 };
    stages * (128 * 72 * 2 + 128 * 8 * bits + 2 * 2 * 136 * 4)
}

/// Dynamic shared memory of `matmul_tcq_{q4_0,…,q6_k}`: the layout's STAGES (TcqGgml, TcqK,
/// TcqQ6K) slots of an x tile (128 rows × 72 halves) and 128 rows of a step's bytes (two blocks;
/// a K-quant header, sub-block pair and Q5_K's qh; Q6_K's 17 words).
fn tcq_ggml_shared_bytes(ty: GgmlType) -> u32 {
    let (stages, row) = match ty {
        GgmlType::Q4_0 => (4, 36),
        GgmlType::Q4_1 => (4, 40),
        GgmlType::Q5_0 => (4, 44),
        GgmlType::Q5_1 => (4, 48),
        GgmlType::Q4K => (4, 48),
        GgmlType::Q5K => (3, 80),
        GgmlType::Q6K => (3, 136),
        _ => (3, 68),
    };
    stages * (128 * 72 * 2 + 128 * row)
}

/// `Op::GatedMatMul`: matvec.cu's gated kernels (matvec_tc.cu's for MLX 4/8-bit, Q4_0, Q8_0,
/// Q4_1, Q5_0, Q5_1, Q4_K and Q5_K), gate and up rows side by side in one pass; for Q6_K two
/// plain tensor-core matvecs and the activation (`gated_plain_pair`); `gated_tiled` where they
/// cannot read the operands.
fn gated_matmul(
    lib: &KernelLibrary,
    op: &Op,
    inputs: &[Tensor],
    outputs: &[Tensor],
) -> Result<CudaKernel> {
    let Op::GatedMatMul {
        layout,
        act,
        pre_norm,
        half_out,
        residual_update,
    } = *op
    else {
        return Err(wrong_op(op));
    };
    let count = layout.tensor_count();
    let (outs, out_h) = optional_last(half_out, outputs);
    let (update, inputs, outs) = split_update(op, (residual_update, pre_norm), inputs, outs)?;
    let [out] = outs else {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    };
    let out_h = match out_h {
        Some(t) => half_copy_ptr(op, t, out.last_dim())?,
        None => 0,
    };
    let Some(x) = inputs.first() else {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    };
    let (norm, inputs) = split_norm(op, pre_norm, &inputs)?;
    let inputs = &inputs[..];
    if inputs.len() != 1 + 2 * count {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    }
    let (m, k, n) = (x.rows(), x.last_dim(), out.last_dim());
    if m != 1 {
        return Err(Error::op("gated_matmul", "x must be a single row"));
    }
    let (gate, gate_rows) = Weight::parse("gated_matmul", layout, &inputs[1..1 + count], k)?;
    let (up, up_rows) = Weight::parse("gated_matmul", layout, &inputs[1 + count..], k)?;
    if gate_rows.min(up_rows) < n {
        return Err(Error::op(
            "gated_matmul",
            format!("the weights hold {gate_rows} and {up_rows} rows of {k}, the output needs {n}"),
        ));
    }
    gate.check_alignment("gated_matmul")?;
    up.check_alignment("gated_matmul")?;
    let vector_ready = matvec_reads(&gate, k)?
        && matvec_reads(&up, k)?
        && (norm.is_some() || device_ptr(x)? % 16 == 0);
    if !vector_ready {
        let input = MatvecInput::new(lib, x, update, norm, 0, false)?;
        return gated_tiled(lib, input, (&gate, &up), (k, n), act, (out, out_h));
    }
    let plan = DecodePlan::new(lib, (&gate, Some(&up)), x, n, update, norm)?;
    if let (MatvecKernel::Simt { .. }, None) = (plan.kernel, update) {
        let pair = (&gate, &up);
        if let Some(kernel) = gated_plain_pair(lib, x, norm, pair, (k, n), act, (out, out_h))? {
            return Ok(kernel);
        }
    }
    let (kgroups, prefix) = (plan.kgroups(), plan.prefix());
    let layout = gate.typed_layout_name();
    if up.typed_layout_name() != layout {
        return Err(Error::op(
            "gated_matmul",
            "gate and up are stored differently",
        ));
    }
    let name = format!("{prefix}gated_{layout}{}", plan.layout_suffix());
    let args = up.tensor_args(gate.tensor_args(Args::new().u64(plan.input.x))?)?;
    let args = args.ptr(out)?.int(n)?.int(k)?;
    let args = gate.group_args(args).int(kgroups)?.code(unary_code(act));
    plan.launch(lib, &name, args, n, Some(out_h))
}

/// A gated pair whose layout the tensor-core matvec takes only as plain matvecs (`MtQ6K`, whose
/// stage holds too many registers for two weights): gate and up as two plain tensor-core
/// matvecs (each folding the norm) into scratch rows, then the activation, instead of
/// matvec.cu's gated kernel (and, for k > 1,024, a norm launch in front). None where either
/// plain matvec would not take the tensor cores.
fn gated_plain_pair(
    lib: &KernelLibrary,
    x: &Tensor,
    norm: Norm,
    (gate, up): (&Weight, &Weight),
    (k, n): (usize, usize),
    act: UnaryFn,
    (out, out_h): (&Tensor, u64),
) -> Result<Option<CudaKernel>> {
    let gate_plan = DecodePlan::new(lib, (gate, None), x, n, None, norm)?;
    let up_plan = DecodePlan::new(lib, (up, None), x, n, None, norm)?;
    let on_tensor_cores = |p: &DecodePlan| matches!(p.kernel, MatvecKernel::TensorCores(_));
    if !on_tensor_cores(&gate_plan) || !on_tensor_cores(&up_plan) {
        return Ok(None);
    }
    let (scratch, gate_out, up_out) = gate_up_rows(lib, n)?;
    let gate_rows = gate_plan.plain(lib, gate, (k, n), Bias::NONE, gate_out, Some(0))?;
    let up_rows = up_plan.plain(lib, up, (k, n), Bias::NONE, up_out, Some(0))?;
    let outs = (device_ptr(out)?, out_h);
    let activation =
        super::elementwise::gated_activation_at(lib, (gate_out, up_out), outs, (n, 1), act)?;
    Ok(Some(
        gate_rows
            .then(up_rows)
            .then(CudaKernel::single(activation))
            .holding(scratch),
    ))
}

/// Whether a one-row matmul of this weight without a norm runs on the tensor-core matvec, which
/// stages x's f16 copy where given (`Backend::matvec_reads_half_x`). Rows are taken as aligned
/// (unaligned Q4_0 rows run on matvec.cu, which reads x: the copy is then only unused).
pub(crate) fn matvec_reads_half_x(
    sm_count: usize,
    layout: WeightLayout,
    n: usize,
    k: usize,
) -> bool {
    let matvec = DecodeMatvec::aligned(layout, n, k, false);
    matches!(tensor_core_plan(matvec, sm_count), Ok(Some(_)))
}

/// Whether a one-row normed matmul of this weight computes the norm in its own kernel
/// (`Backend::matvec_folds_norm`): matvec.cu up to `FOLD_NORM_MAX_K`, the tensor-core matvec
/// at any width; rows and x taken as aligned.
pub(crate) fn matvec_folds_norm(sm_count: usize, layout: WeightLayout, n: usize, k: usize) -> bool {
    let matvec = DecodeMatvec::aligned(layout, n, k, true);
    k <= FOLD_NORM_MAX_K || matches!(tensor_core_plan(matvec, sm_count), Ok(Some(_)))
}

/// A decode matvec as the choice of its kernel sees it: a weight of `layout` `[n, k]` (the
/// gate of a gated pair where `gated`), and what its input asks.
#[derive(Clone, Copy)]
pub(super) struct DecodeMatvec {
    layout: WeightLayout,
    n: usize,
    k: usize,
    gated: bool,
    /// The kernel folds a norm.
    folds: bool,
    /// A residual update precedes the norm (`Op::MatMul::residual_update`).
    updates: bool,
    /// Q4_0 and Q8_0 rows of k % 128 == 0 from 8-byte aligned data: `MtQ4_0` and `MtQ8_0` load
    /// quads of blocks.
    quads: bool,
    /// Blocks paired from 4-byte aligned data (`paired_blocks`): the aligned 4-byte words
    /// around a 2-byte aligned block that `MtQ5_0`, `MtQ4_0Words`, `MtQ8_0Words` and `MtQ6K`
    /// load never pass the matrix.
    paired_rows: bool,
    /// A norm that matvec.cu would launch in front (k > FOLD_NORM_MAX_K), which sends smaller
    /// MLX matrices to the tensor cores too, since their kernel folds it.
    wide_norm: bool,
}

impl DecodeMatvec {
    /// The product of `weight` `[n, k]` (and `up`, a gated pair) as stored in buffers of `rows`
    /// such rows (more than n for stacked experts), folding a norm where `folds`, with no
    /// update. Formats read in aligned words: MtQ4_0 and MtQ8_0 load a quad's four blocks (72
    /// or 136 bytes) of rows of k % 128 == 0 from 8-byte aligned data; MtQ5_0, MtQ6K and, off
    /// quads, MtQ4_0Words and MtQ8_0Words paired blocks (`paired_blocks`) from 4-byte aligned
    /// data; other rows of these formats stay on the SIMT kernels.
    pub(super) fn of(
        (weight, up): (&Weight, Option<&Weight>),
        (n, rows): (usize, usize),
        k: usize,
        folds: bool,
    ) -> Result<Self> {
        let aligned = |align: u64| -> Result<bool> {
            let base = |w: &Weight| -> Result<bool> { Ok(device_ptr(w.data())? % align == 0) };
            Ok(base(weight)? && up.map_or(Ok(true), base)?)
        };
        Ok(DecodeMatvec {
            layout: weight.layout(),
            n,
            k,
            gated: up.is_some(),
            folds,
            updates: false,
            quads: k.is_multiple_of(128) && aligned(8)?,
            paired_rows: paired_blocks(weight.layout(), rows, k) && aligned(4)?,
            wide_norm: false,
        })
    }

    /// A plain matvec, normed where `norm`, of rows and x aligned as the tensor-core kernels
    /// ask (the planner's view before the data's addresses are known).
    fn aligned(layout: WeightLayout, n: usize, k: usize, norm: bool) -> Self {
        DecodeMatvec {
            layout,
            n,
            k,
            gated: false,
            folds: norm,
            updates: false,
            quads: k.is_multiple_of(128),
            paired_rows: paired_blocks(layout, n, k),
            wide_norm: norm && k > FOLD_NORM_MAX_K,
        }
    }
}

/// Whether the blocks of a matrix of `rows` rows of `k` pair up: from 4-byte aligned data, the
/// matrix's last block then starts 2 bytes past a word (each block's size is 2 mod 4), so that
/// the aligned words around it end with it. The 32-element formats need every row to hold an
/// even number of blocks (their loads take rows from 4-byte aligned starts); Q6_K only the
/// matrix (`MtQ6K` realigns each super-block's words itself), so that rows of an odd number of
/// super-blocks (Qwen3-30B-A3B's experts' k = 768) run on tensor cores too.
fn paired_blocks(layout: WeightLayout, rows: usize, k: usize) -> bool {
    match layout {
        WeightLayout::Gguf(GgmlType::Q6K) => (rows * (k / 256)).is_multiple_of(2),
        _ => k.is_multiple_of(64),
    }
}

/// How matvec_tc.cu cuts a format's rows: elements a chunk, and bytes of a chunk's staged sums
/// (`F::Fold`: Σx and Σ offset·x; for Q4_K, whose chunk holds two sub-blocks' runs, both of
/// each).
#[derive(Clone, Copy)]
struct TcChunks {
    elems: usize,
    fold_bytes: usize,
}

const TC_CHUNKS_32: TcChunks = TcChunks {
    elems: 32,
    fold_bytes: 8,
};
const TC_CHUNKS_16: TcChunks = TcChunks {
    elems: 16,
    fold_bytes: 8,
};
/// K-quants (`MtQ4K`, `MtQ5K`, `MtQ6K`): chunks of 32 whose staged sums are four floats (two
/// runs' Σx and Σ offset·x, or four groups' Σ offset·x).
const TC_CHUNKS_KQUANT: TcChunks = TcChunks {
    elems: 32,
    fold_bytes: 16,
};

/// The tensor-core matvec's plan for `m`, or None where matvec.cu multiplies it: formats
/// matvec_tc.cu has (`MtMlx` 4- and 8-bit, `MtQ4_0` and `MtQ8_0` on quads, `MtQ4_1`, `MtQ5_1`,
/// `MtQ4K`, `MtQ5K`; on paired rows `MtQ5_0`, `MtQ4_0Words`, `MtQ8_0Words` and `MtQ6K`, the
/// last for plain matvecs; Q4_1 and Q5_1 data is 4-byte aligned, Q4_K and Q5_K data 16-byte
/// aligned, `Weight::check_alignment`, and a K-quant row is whole super-blocks of 256).
fn tensor_core_plan(m: DecodeMatvec, sm_count: usize) -> Result<Option<TcPlan>> {
    let mlx_simt_weights = if m.wide_norm { 0 } else { SIMT_MAX_WEIGHTS };
    let ggml = SIMT_MAX_WEIGHTS;
    // (chunking, matrices that stay on matvec.cu, the kernel name's suffix after the layout)
    let (chunks, simt_weights, layout_suffix) = match m.layout {
        WeightLayout::MlxAffine { bits: 4, .. } => (TC_CHUNKS_32, mlx_simt_weights, ""),
        WeightLayout::MlxAffine { bits: 8, .. } => (TC_CHUNKS_16, mlx_simt_weights, ""),
        WeightLayout::Gguf(GgmlType::Q4_0 | GgmlType::Q8_0) if m.quads => (TC_CHUNKS_32, ggml, ""),
        WeightLayout::Gguf(GgmlType::Q4_1 | GgmlType::Q5_1) => (TC_CHUNKS_32, ggml, ""),
        WeightLayout::Gguf(GgmlType::Q5_0) if m.paired_rows => (TC_CHUNKS_32, ggml, ""),
        WeightLayout::Gguf(GgmlType::Q4_0 | GgmlType::Q8_0) if m.paired_rows => {
            (TC_CHUNKS_32, ggml, "_words")
        }
        WeightLayout::Gguf(GgmlType::Q4K | GgmlType::Q5K) => (TC_CHUNKS_KQUANT, ggml, ""),
        WeightLayout::Gguf(GgmlType::Q6K) if m.paired_rows && !m.gated => {
            (TC_CHUNKS_KQUANT, ggml, "")
        }
        _ => return Ok(None),
    };
    // The update is staged with x in parts (`mt_stage_x_parts`): MLX only.
    let updates = m.updates && m.folds && matches!(m.layout, WeightLayout::MlxAffine { .. });
    let folding = Folding {
        norm: m.folds,
        update: updates,
    };
    let plan = matvec_tc_plan(m.n, m.k, chunks, m.gated, folding, sm_count, simt_weights)?;
    Ok(plan.map(|p| TcPlan { layout_suffix, ..p }))
}

/// Two rows of x (a short prompt) on matvec_tc.cu's decode kernel (`matvec_tc_x2_*`: each B
/// column that repeats a lane's chunk of x holds the second row's), and three or four of MLX
/// 4/8-bit weights (`matvec_tc_x4_*`: a second mma set a fragment), planned as the one-row product
/// with the other rows' staged x and sums in shared memory as well; None where that kernel
/// does not take the weight or x (16-byte aligned rows).
fn matvec_tc_rows(
    lib: &KernelLibrary,
    weight: &Weight,
    x: &Tensor,
    (m, k, n): (usize, usize, usize),
    bias: Bias,
    out: &Tensor,
) -> Result<Option<CudaKernel>> {
    let x_rows = match (m, weight) {
        (2, Weight::Mlx { .. } | Weight::Ggml { .. }) => 2,
        (3 | 4, Weight::Mlx { .. }) => 4,
        _ => return Ok(None),
    };
    if device_ptr(x)? % 16 != 0 || !k.is_multiple_of(4) {
        return Ok(None);
    }
    let matvec = DecodeMatvec::of((weight, None), (n, n), k, false)?;
    let Some(plan) = tensor_core_plan(matvec, lib.sm_count())? else {
        return Ok(None);
    };
    let plan = plan.with_shared(((x_rows - 1) * plan.staged_row_bytes) as u32);
    if plan.shared as usize > MATVEC_TC_ROWS_MAX_SHARED {
        return Ok(None);
    }
    let name = format!(
        "matvec_tc_x{x_rows}_{}{}",
        weight.typed_layout_name(),
        plan.layout_suffix()
    );
    let args = weight.tensor_args(Args::new().ptr(x)?)?;
    let args = args.bias(bias)?.ptr(out)?.int(n)?.int(k)?;
    let args = weight.group_args(args).int(plan.kgroups())?;
    let args = if x_rows == 4 { args.int(m)? } else { args };
    Ok(Some(CudaKernel::single(plan.launch(lib, &name, args)?)))
}

/// The address of an f16 copy of a row of `len` values (`x_h`, `out_h`) for `op`, which the
/// kernels read and write with 16-byte and 2-byte accesses.
pub(super) fn half_copy_ptr(op: &Op, t: &Tensor, len: usize) -> Result<u64> {
    let ptr = device_ptr(t)?;
    if t.dtype() != DType::F16 || t.elem_count() != len || ptr % 16 != 0 {
        return Err(Error::op(
            op.name(),
            format!("an f16 copy of a row of {len} must be f16 [1, {len}], 16-byte aligned"),
        ));
    }
    Ok(ptr)
}

/// Two f32 scratch rows of `n` (each 16-byte aligned) for a gated pair's gate and up outputs:
/// the allocation and the two addresses.
fn gate_up_rows(lib: &KernelLibrary, n: usize) -> Result<(CudaSlice<u8>, u64, u64)> {
    let np = n.next_multiple_of(4);
    let (scratch, gate_out) = lib.scratch(2 * np * 4)?;
    Ok((scratch, gate_out, gate_out + 4 * np as u64))
}

/// The gated pair where the matvec kernels cannot read a weight (dense rows that are not
/// whole aligned units) or x: after `input`'s launches (the norm, if any, into a scratch row),
/// gate and up by the tiled kernel into two more, then act(gate)·up (and its f16 copy at `out_h`
/// unless 0).
fn gated_tiled(
    lib: &KernelLibrary,
    input: MatvecInput,
    (gate, up): (&Weight, &Weight),
    (k, n): (usize, usize),
    act: UnaryFn,
    (out, out_h): (&Tensor, u64),
) -> Result<CudaKernel> {
    let (scratch, gate_out, up_out) = gate_up_rows(lib, n)?;
    let launches = vec![
        tiled(
            lib,
            gate,
            input.x,
            (1, k, n),
            Bias::NONE,
            gate_out,
            (false, 1),
        )?,
        tiled(lib, up, input.x, (1, k, n), Bias::NONE, up_out, (false, 1))?,
        super::elementwise::gated_activation_at(
            lib,
            (gate_out, up_out),
            (device_ptr(out)?, out_h),
            (n, 1),
            act,
        )?,
    ];
    Ok(input.then(launches).holding(scratch))
}

/// A kernel shape of matvec.cu (`MATVEC_SHAPES`): rows a warp, units of 32 elements a lane
/// takes per step, and the kernel name prefixes without and with the folded RMSNorm.
#[derive(Clone, Copy)]
struct SimtShape {
    rows: usize,
    units: usize,
    prefix: &'static str,
    norm_prefix: &'static str,
}

const SIMT_LONG: SimtShape = SimtShape {
    rows: 4,
    units: 2,
    prefix: "matvec_",
    norm_prefix: "matvec_norm_",
};
const SIMT_SHORT: SimtShape = SimtShape {
    rows: 2,
    units: 1,
    prefix: "matvec_short_",
    norm_prefix: "matvec_short_norm_",
};

/// Rows up to this long take `SIMT_SHORT`: twice the warps, each lane's chain of work halved.
/// H100, 2026-11-26, decode after a 128-token prompt: SmolLM2 shape (k = 576 and 1,536)
/// 1,596 → 2,035 tok/s; at k = 2,048 and 8,192 (Llama-3.2-1B's o and down) the short shape
/// lost (1,610 → 1,340), as at 4,096 (8B's o: 369 → 348), where x is re-read for fewer rows.
const SIMT_SHORT_MAX_K: usize = 1536;

/// The kernel a decode matvec runs on.
#[derive(Clone, Copy)]
enum MatvecKernel {
    TensorCores(TcPlan),
    /// matvec.cu, `kgroups` warps sharing a row group.
    Simt {
        shape: SimtShape,
        kgroups: usize,
    },
}

/// How one row (decode) is multiplied: the kernel, and where x comes from.
struct DecodePlan<'a> {
    kernel: MatvecKernel,
    input: MatvecInput<'a>,
}

impl<'a> DecodePlan<'a> {
    /// `weight` (the gate, when `up` is given) `[n, x.last_dim()]`.
    fn new(
        lib: &KernelLibrary,
        (weight, up): (&Weight, Option<&Weight>),
        x: &'a Tensor,
        n: usize,
        update: Update<'a>,
        norm: Norm<'a>,
    ) -> Result<Self> {
        let (k, sm_count) = (x.last_dim(), lib.sm_count());
        // Whether the tensor-core kernel would fold the norm (and stage its weight): it folds
        // at any width.
        let tc_folds = MatvecInput::folds(x, norm, usize::MAX)?;
        let matvec = DecodeMatvec {
            updates: update.is_some(),
            wide_norm: norm.is_some() && k > FOLD_NORM_MAX_K,
            ..DecodeMatvec::of((weight, up), (n, n), k, tc_folds)?
        };
        let tensor_cores = tensor_core_plan(matvec, sm_count)?;
        let kernel = match tensor_cores {
            Some(p) => MatvecKernel::TensorCores(p),
            None => {
                let shape = if k <= SIMT_SHORT_MAX_K {
                    SIMT_SHORT
                } else {
                    SIMT_LONG
                };
                MatvecKernel::Simt {
                    shape,
                    kgroups: matvec_kgroups(n, k, sm_count, (shape.rows, shape.units)),
                }
            }
        };
        // matvec_tc folds the norm at any width (H200, 2026-11-26: MLX
        // Llama-3.2-1B shape 1,322 → 1,387 tok/s, 8B 350 → 365; Q4_0 then lost, 8B 331 → 325,
        // but since its staging reads x once, with the norm weight copied before the wait:
        // H100, 2026-11-26, Q4_0 1B 1,305 → 1,457, 8B 351 → 393).
        let (max_fold_k, update_folds) = match tensor_cores {
            Some(p) => (usize::MAX, p.folds_update),
            None => (FOLD_NORM_MAX_K, false),
        };
        let input = MatvecInput::new(lib, x, update, norm, max_fold_k, update_folds)?;
        Ok(DecodePlan { kernel, input })
    }

    /// The kernel name prefix: matvec_tc.cu's, or matvec.cu's for the shape, plain or normed
    /// (matvec_tc.cu's also with the update).
    fn prefix(&self) -> &'static str {
        let input = &self.input;
        match (self.kernel, input.fold.is_some()) {
            (MatvecKernel::TensorCores(_), true) if input.fold_update.is_some() => {
                "matvec_tc_normup_"
            }
            (MatvecKernel::TensorCores(_), true) => "matvec_tc_norm_",
            (MatvecKernel::TensorCores(_), false) => "matvec_tc_",
            (MatvecKernel::Simt { shape, .. }, true) => shape.norm_prefix,
            (MatvecKernel::Simt { shape, .. }, false) => shape.prefix,
        }
    }

    /// The kernel name's suffix after the layout (`TcPlan::layout_suffix`).
    fn layout_suffix(&self) -> &'static str {
        match self.kernel {
            MatvecKernel::TensorCores(p) => p.layout_suffix,
            MatvecKernel::Simt { .. } => "",
        }
    }

    /// Warps sharing a row group (a 16-row tile on the tensor cores).
    fn kgroups(&self) -> usize {
        match self.kernel {
            MatvecKernel::TensorCores(p) => p.kgroups,
            MatvecKernel::Simt { kgroups, .. } => kgroups,
        }
    }

    /// The dispatch of a plain (not gated) matvec of `weight` `[n, k]` into the row at `out`,
    /// with `half` as `launch` takes it.
    fn plain(
        self,
        lib: &KernelLibrary,
        weight: &Weight,
        (k, n): (usize, usize),
        bias: Bias,
        out: u64,
        half: Option<u64>,
    ) -> Result<CudaKernel> {
        let (kgroups, prefix) = (self.kgroups(), self.prefix());
        let name = format!(
            "{prefix}{}{}",
            weight.typed_layout_name(),
            self.layout_suffix()
        );
        let args = weight.tensor_args(Args::new().u64(self.input.x))?;
        let args = args.bias(bias)?.u64(out).int(n)?.int(k)?;
        let args = weight.group_args(args).int(kgroups)?;
        self.launch(lib, &name, args, n, half)
    }

    /// The dispatch for kernel `name` with `args` (x's address first); both kernel families
    /// take the norm arguments, then the kernels that have one the address of an f16 copy of a
    /// row (`half`: the plain tensor-core kernels' x_h, the gated kernels' out_h; 0 for none),
    /// and the tensor-core kernels the update's (MATVEC_UPDATE_ARGS).
    fn launch(
        self,
        lib: &KernelLibrary,
        name: &str,
        args: Args,
        n: usize,
        half: Option<u64>,
    ) -> Result<CudaKernel> {
        let mut args = args.norm(self.input.fold)?;
        if let Some(half) = half {
            args = args.u64(half);
        }
        let launch = match self.kernel {
            MatvecKernel::TensorCores(p) => {
                let args = match self.input.fold_update {
                    Some(u) => args.ptr(u.y)?.ptr(u.weight)?.ptr(u.out)?,
                    None => args.u64(0).u64(0).u64(0),
                };
                p.launch(lib, name, args)?
            }
            MatvecKernel::Simt { shape, kgroups } => {
                let grid = (blocks(n, shape.rows * MATVEC_WARPS / kgroups)?, 1, 1);
                lib.launch(&MATVEC, name, grid, MATVEC_THREADS, 0, args)?
            }
        };
        Ok(self.input.then(vec![launch]))
    }
}

/// The widest input whose RMSNorm the matvec computes itself. Folded, every warp re-reads the
/// norm weight beside x from L1, which already limits the kernel: measured on an H200 the fold
/// gained 16% of SmolLM2's decode speed (k = 576: one launch fewer per norm) and lost 9–17%
/// at k = 2048 and 4096, where the norm runs better as a launch of its own.
const FOLD_NORM_MAX_K: usize = 1024;

/// Where a one-row kernel reads x from: the input itself, with the RMSNorm (if any) folded
/// into the kernel, or, for matvec.cu and inputs wider than `FOLD_NORM_MAX_K` (and for the
/// tiled fallbacks, which fold nothing), a row the norm kernel writes first.
struct MatvecInput<'a> {
    x: u64,
    fold: Norm<'a>,
    /// The residual update the kernel applies itself (with the norm it folds).
    fold_update: Update<'a>,
    /// Launches in front of the kernel: the update and the norm where it does not fold them.
    first: Vec<Launch>,
    /// The row the norm launched in front writes.
    scratch: Option<CudaSlice<u8>>,
}

impl<'a> MatvecInput<'a> {
    /// `max_fold_k`: the widest x whose norm the kernel that follows computes itself (0:
    /// none); an x not 16-byte aligned (the kernels' float4 loads) is always normalised into
    /// the aligned scratch row first. `update_folds`: whether that kernel also applies the
    /// residual update, if any, where it folds the norm; otherwise the update is launched in
    /// front (as `rms_norm_add`), and its output is the x that the rest reads.
    fn new(
        lib: &KernelLibrary,
        x: &'a Tensor,
        update: Update<'a>,
        norm: Norm<'a>,
        max_fold_k: usize,
        update_folds: bool,
    ) -> Result<Self> {
        let k = x.last_dim();
        let mut first = Vec::new();
        let (x, fold_update) = match (update, norm) {
            (None, _) => (x, None),
            (Some(u), Some(_))
                if update_folds && Self::folds(x, norm, max_fold_k)? && u.aligned()? =>
            {
                (x, Some(u))
            }
            (Some(u), Some((_, p))) => {
                let rows = RmsNormRows {
                    x: device_ptr(u.y)?,
                    residual: device_ptr(x)?,
                    out: device_ptr(u.out)?,
                    rows: 1,
                    d: k,
                    tokens: 1,
                };
                first.push(rms_norm_rows(lib, rows, u.weight, p)?);
                (u.out, None)
            }
            (Some(_), None) => {
                return Err(Error::Invalid("a residual update without a norm".into()))
            }
        };
        match norm {
            Some((g, p)) if !Self::folds(x, norm, max_fold_k)? => {
                let (scratch, row) = lib.scratch(k * 4)?;
                let rows = RmsNormRows {
                    x: device_ptr(x)?,
                    residual: 0,
                    out: row,
                    rows: 1,
                    d: k,
                    tokens: 1,
                };
                first.push(rms_norm_rows(lib, rows, g, p)?);
                Ok(MatvecInput {
                    x: row,
                    fold: None,
                    fold_update,
                    first,
                    scratch: Some(scratch),
                })
            }
            _ => Ok(MatvecInput {
                x: device_ptr(x)?,
                fold: norm,
                fold_update,
                first,
                scratch: None,
            }),
        }
    }

    /// Whether the kernel that follows computes `norm` itself: there is one, x is no wider
    /// than `max_fold_k`, and 16-byte aligned.
    fn folds(x: &Tensor, norm: Norm, max_fold_k: usize) -> Result<bool> {
        Ok(norm.is_some() && x.last_dim() <= max_fold_k && device_ptr(x)? % 16 == 0)
    }

    /// The dispatch: the launches in front, if any, then `launches` (which read x at
    /// `self.x`).
    fn then(self, launches: Vec<Launch>) -> CudaKernel {
        let launches = self.first.into_iter().chain(launches).collect();
        CudaKernel::new(launches, self.scratch)
    }
}

/// A decode matmul's residual update (`Op::MatMul::residual_update`): y, its norm weight, and
/// the updated x.
#[derive(Clone, Copy)]
struct UpdateOperands<'a> {
    y: &'a Tensor,
    weight: &'a Tensor,
    out: &'a Tensor,
}

type Update<'a> = Option<UpdateOperands<'a>>;

/// `split_update`'s result: the update, the other inputs, the other outputs.
type UpdateSplit<'a> = (Update<'a>, Cow<'a, [Tensor]>, &'a [Tensor]);

impl UpdateOperands<'_> {
    /// Whether matvec_tc.cu can apply it: y and out 16-byte aligned (float4 accesses), the
    /// weight f32 and 16-byte aligned (copied by 16-byte cp.async).
    fn aligned(&self) -> Result<bool> {
        let aligned = |t: &Tensor| -> Result<bool> { Ok(device_ptr(t)? % 16 == 0) };
        Ok(aligned(self.y)?
            && aligned(self.out)?
            && aligned(self.weight)?
            && self.weight.dtype() == DType::F32)
    }
}

/// With `present`, separates the update's operands (y and its norm weight, after x; the
/// updated x, the second output) from the others. An update needs the input norm it precedes.
fn split_update<'a>(
    op: &Op,
    (present, norm): (bool, Option<PreNorm>),
    inputs: &'a [Tensor],
    outputs: &'a [Tensor],
) -> Result<UpdateSplit<'a>> {
    match (present, inputs, outputs) {
        (false, _, _) => Ok((None, Cow::Borrowed(inputs), outputs)),
        (true, _, _) if norm.is_none() => Err(Error::op(
            op.name(),
            "a residual update without an input norm",
        )),
        (true, [x, y, weight, rest @ ..], [out, updated]) => {
            let operands: Vec<Tensor> = std::iter::once(x).chain(rest).cloned().collect();
            let update = UpdateOperands {
                y,
                weight,
                out: updated,
            };
            Ok((
                Some(update),
                Cow::Owned(operands),
                std::slice::from_ref(out),
            ))
        }
        _ => Err(operand_count(op, inputs.len(), outputs.len())),
    }
}

/// The RMSNorm folded into a matmul: its weight and parameters.
pub(super) type Norm<'a> = Option<(&'a Tensor, PreNorm)>;

/// Separates the folded norm's weight (the operand after x) from the other operands.
fn split_norm<'a>(
    op: &Op,
    pre_norm: Option<PreNorm>,
    inputs: &'a [Tensor],
) -> Result<(Norm<'a>, Vec<Tensor>)> {
    match (pre_norm, inputs) {
        (None, _) => Ok((None, inputs.to_vec())),
        (Some(p), [x, g, rest @ ..]) => {
            check_norm_weight(op, g)?;
            let operands = std::iter::once(x).chain(rest).cloned().collect();
            Ok((Some((g, p)), operands))
        }
        _ => Err(operand_count(op, inputs.len(), 1)),
    }
}

/// The kernels read a folded norm's weight as f32 with 16-byte loads.
pub(super) fn check_norm_weight(op: &Op, g: &Tensor) -> Result<()> {
    if g.dtype() != DType::F32 || device_ptr(g)? % 16 != 0 {
        return Err(Error::op(
            op.name(),
            "the folded norm's weight must be f32, 16-byte aligned",
        ));
    }
    Ok(())
}

/// A matmul's optional bias `[n]` and its float type (0 without one).
#[derive(Clone, Copy)]
struct Bias<'a>(Option<&'a Tensor>, i32);

impl<'a> Bias<'a> {
    const NONE: Bias<'static> = Bias(None, 0);

    fn new(bias: Option<&'a Tensor>) -> Result<Self> {
        let ty = bias.map_or(Ok(0), |b| float_type("matmul", "bias", b.dtype()))?;
        Ok(Bias(bias, ty))
    }
}

trait MatmulArgs: Sized {
    /// The matvec kernels' trailing norm arguments (g or null, g_offset, eps).
    fn norm(self, norm: Norm) -> Result<Self>;
    /// The bias pointer (or null) and its float type.
    fn bias(self, bias: Bias) -> Result<Self>;
}

impl MatmulArgs for Args {
    fn bias(self, Bias(bias, ty): Bias) -> Result<Self> {
        Ok(self.opt_ptr(bias)?.code(ty))
    }

    fn norm(self, norm: Norm) -> Result<Self> {
        norm_args(self, norm)
    }
}

/// `args` then the trailing norm arguments of a kernel taking MATVEC_NORM_ARGS (g or null,
/// g_offset, eps).
pub(super) fn norm_args(args: Args, norm: Norm) -> Result<Args> {
    Ok(match norm {
        Some((g, p)) => args.ptr(g)?.f32(p.w_offset()).f32(p.eps),
        None => args.opt_ptr(None)?.f32(0.0).f32(0.0),
    })
}

/// The tensor-core plan of a gathered decode matvec (matvec_tc.cu's `gather_matvec_tc_…`):
/// `slots` products with the `[n, k]` matrices of `matvec`, stacks of `experts`, each
/// slot's blocks planned on an even share of the SMs. The formats and sizes are the dense
/// matvec's (`tensor_core_plan`); None where the gathered SIMT kernels multiply, as the dense
/// SIMT kernels do: other layouts and rows, experts of up to `SIMT_MAX_WEIGHTS` (gate and up
/// together), a stack of 2^32 elements or more (the 32-bit offsets), x too long to stage.
pub(super) fn gather_matvec_tc_plan(
    matvec: DecodeMatvec,
    (experts, slots): (usize, usize),
    sm_count: usize,
) -> Result<Option<TcPlan>> {
    if (experts as u64) * (matvec.n as u64) * (matvec.k as u64) >= 1 << 32 {
        return Ok(None);
    }
    let Some(plan) = tensor_core_plan(matvec, sm_count.div_ceil(slots.max(1)))? else {
        return Ok(None);
    };
    let grid = (plan.grid.0, dim(slots)?, 1);
    Ok(Some(TcPlan { grid, ..plan }))
}

/// A launch of matvec_tc.cu.
#[derive(Clone, Copy)]
pub(super) struct TcPlan {
    /// Warps sharing a 16-row tile's k.
    kgroups: usize,
    /// 32 per warp of the block.
    threads: u32,
    grid: (u32, u32, u32),
    /// Bytes of staged x (dynamic shared memory), and of the norm weights where the kernel folds
    /// the norm and the update.
    shared: u32,
    /// The kernel applies the residual update (`matvec_tc_normup_…`).
    folds_update: bool,
    /// After the layout in the kernel's name: `_words` for Q4_0 and Q8_0 off quads
    /// (`MtQ4_0Words`, `MtQ8_0Words`).
    layout_suffix: &'static str,
    /// Bytes of shared memory one row of x takes staged (f16 and its chunks' sums).
    staged_row_bytes: usize,
}

impl TcPlan {
    /// Warps sharing a 16-row tile's k (the kernels' `kgroups` argument).
    pub(super) fn kgroups(&self) -> usize {
        self.kgroups
    }

    /// After the layout in the kernel's name: `_words` for Q4_0 and Q8_0 off quads.
    pub(super) fn layout_suffix(&self) -> &'static str {
        self.layout_suffix
    }

    /// The grid: blocks over the rows, then (gathered) the slots.
    pub(super) fn grid(&self) -> (u32, u32, u32) {
        self.grid
    }

    /// The plan with `bytes` more dynamic shared memory (after what the kernel stages).
    pub(super) fn with_shared(self, bytes: u32) -> Self {
        let shared = self.shared + bytes;
        TcPlan { shared, ..self }
    }

    /// matvec_tc.cu's kernel `name` with `args`, launched as planned.
    pub(super) fn launch(&self, lib: &KernelLibrary, name: &str, args: Args) -> Result<Launch> {
        lib.launch(&MATVEC_TC, name, self.grid, self.threads, self.shared, args)
    }
}

/// What a tensor-core matvec folds in front of its product: the input norm, and the residual
/// update before it (MLX formats, staged in parts).
#[derive(Clone, Copy)]
struct Folding {
    norm: bool,
    update: bool,
}

#[cfg(test)]
impl Folding {
    const NONE: Folding = Folding {
        norm: false,
        update: false,
    };
    const NORM: Folding = Folding {
        norm: true,
        update: false,
    };
    const UPDATE: Folding = Folding {
        norm: true,
        update: true,
    };
}

/// The tensor-core matvec for weights `[n, k]` whose format (matvec_tc.cu's `MtMlx` for MLX 4-
/// and 8-bit, `MtQ4_0`, …) cuts rows as `chunking` says, or None where matvec.cu runs:
/// matrices of up to `simt_weights`, matrices of 2^32 elements or more, and x too long to stage
/// in shared memory (with the norm weight where the kernel folds a norm). The update is folded
/// where its weight fits beside and x's parts fill one round of the block's threads.
fn matvec_tc_plan(
    n: usize,
    k: usize,
    chunking: TcChunks,
    gated: bool,
    folding: Folding,
    sm_count: usize,
    simt_weights: usize,
) -> Result<Option<TcPlan>> {
    let (chunk, weights) = (chunking.elems, n * k * if gated { 2 } else { 1 });
    // The kernel indexes a matrix's loads, scales and biases with 32-bit offsets (MtStream):
    // at least 14 elements a unit, so fewer than 2^32 elements suffice.
    if weights <= simt_weights || !k.is_multiple_of(chunk) || (n as u64) * (k as u64) >= 1 << 32 {
        return Ok(None);
    }
    // x is staged as f16 with its f32 sums per chunk (`cfold`) and a chunk of zeros, after the
    // norm weight in f32 and followed by each chunk's f32 scale where the kernel folds a norm
    // (matvec_tc.cu's mt_stage_x_parts and mt_stage_x_chunks).
    let chunks = k / chunk;
    let shared = if folding.norm { 4 * k + 4 * chunks } else { 0 }
        + 2 * k
        + 2 * chunk
        + chunking.fold_bytes * chunks;
    if shared > MATVEC_TC_MAX_SHARED {
        return Ok(None);
    }
    // Four chunks per step; a stage is two chunks per row (F::STAGE), one in the gated kernel.
    let stage = if gated { 1 } else { 2 };
    let steps = chunks.div_ceil(4);
    let tiles = n.div_ceil(MATVEC_TC_TILE);
    // One block per SM. Tiles per block: the fewest that keep the grid within one wave, so
    // that every SM streams (all a block holds where even that needs several waves: blocks
    // that took groups of tiles in turns, staging x once, were slower); then as many warps per
    // tile as the block holds, each keeping at least a stage of its row's chunks. H100,
    // 2026-11-26: the 8B shape's q/k/v on 128 SMs instead of 96 and its gate/up on 128 instead
    // of 112: 8B decode +1% (docs/cuda-backend.md).
    // Matrices with more tiles than one wave of such blocks holds (lm heads) run blocks of half
    // the warps, two an SM, so that one block's tail overlaps the other's work (H100,
    // 2026-11-26: the 128256×4096 lm head 115.9 → 112.3 µs, Gemma-3-1B decode +1.7%, SmolLM2
    // +1.7%).
    let sm_count = sm_count.max(1);
    let warps = if tiles > sm_count * MATVEC_TC_WARPS {
        MATVEC_TC_WARPS / 2
    } else {
        MATVEC_TC_WARPS
    };
    let per_block = tiles.div_ceil(sm_count).clamp(1, warps);
    // At most one warp a stage of steps, so that a short row's stages are all requested before
    // the wait (SmolLM2's k = 576, 5 steps: 3 k slices of 2, 2 and 1 steps, not 2 of 3 and 2,
    // whose second stage started after x was staged). H100, 2026-11-27, decode after 128
    // tokens: SmolLM2 shape +0.9 to +1.5%, Gemma-3-1B +1.1% (k = 1,152); other shapes' plans
    // are unchanged.
    let kgroups = (warps / per_block).min(steps.div_ceil(stage)).max(1);
    // A block whose tiles and k slices leave at least half its warps idle (short rows: too few
    // steps to split further) runs only the warps it uses, at least MATVEC_TC_MIN_WARPS to stage
    // x. H100, 2026-11-27, decode after 128 tokens, two rounds: SmolLM2 shape +4.3% (2 of 16
    // warps busy), the 1B shape +3.2% (its o projections, 8 of 16), Qwen3-0.6B +5.0%; trimming
    // the 8B shape's blocks of 14 and 15 busy warps as well read −0.7%.
    let busy = per_block * kgroups;
    let block_warps = if 2 * busy <= warps {
        busy.max(MATVEC_TC_MIN_WARPS)
    } else {
        warps
    };
    let grid = (blocks(n, MATVEC_TC_TILE * per_block)?, 1, 1);
    // mt_update_parts: R = 4 parts of 8 elements a thread, all in one round.
    let update_shared = shared + 4 * k;
    let folds_update =
        folding.update && k <= 32 * 32 * block_warps && update_shared <= MATVEC_TC_MAX_SHARED;
    Ok(Some(TcPlan {
        kgroups,
        threads: 32 * block_warps as u32,
        grid,
        shared: if folds_update { update_shared } else { shared } as u32,
        folds_update,
        layout_suffix: "",
        staged_row_bytes: 2 * k + chunking.fold_bytes * chunks,
    }))
}

/// Warps sharing a row group of the matvec: the fewest (longest streams of loads per warp)
/// that still give every SM `MATVEC_WARPS_PER_SM` warps, and never more than leave each lane
/// a full step of units.
fn matvec_kgroups(n: usize, k: usize, sm_count: usize, (rows, units): (usize, usize)) -> usize {
    let row_groups = n.div_ceil(rows);
    let lane_steps = (k / 32).div_ceil(32 * units);
    let mut kgroups = 1;
    while kgroups < MATVEC_WARPS
        && row_groups * kgroups < sm_count * MATVEC_WARPS_PER_SM
        && lane_steps >= 2 * kgroups
    {
        kgroups *= 2;
    }
    kgroups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mlx_short_kernels_take_2_to_32_rows_of_4_and_8_bits() {
        let mlx = |bits| WeightLayout::MlxAffine {
            bits,
            group_size: 64,
        };
        for (layout, (m, k, n), want) in [
            (mlx(4), (2, 4096, 4096), true),
            (mlx(8), (32, 14336, 4096), true),
            (mlx(4), (1, 4096, 4096), false),
            (mlx(4), (33, 4096, 4096), false),
            (mlx(6), (16, 4096, 4096), false),
            (WeightLayout::Gguf(GgmlType::Q4_0), (16, 4096, 4096), false),
            // n · (k / 32) · bits = 2^34 words past the 32-bit offsets.
            (mlx(4), (16, 4096, 1 << 25), false),
        ] {
            assert_eq!(mlx_short_rows(layout, (m, k, n)), want, "{layout:?} m={m}");
        }
    }

    #[test]
    fn short_prompts_sum_splits_in_clusters_of_up_to_8_in_one_wave() {
        // An 8-token prefill of the 1B on 132 SMs: q (16 tiles, 8 splits) and k (4, 8) in
        // clusters; gate (64 tiles, 4 splits: 256 blocks) and down (16 tiles, 16 splits) not.
        assert_eq!(cluster_sum(8, 16, 132), Some(8));
        assert_eq!(cluster_sum(8, 4, 132), Some(8));
        assert_eq!(cluster_sum(4, 64, 132), None);
        assert_eq!(cluster_sum(16, 16, 132), None);
        assert_eq!(cluster_sum(1, 16, 132), None);
    }

    #[test]
    fn f32_tiles_split_k_only_where_they_leave_sms_idle() {
        // (m, k, n, splits) on 132 SMs: an F32 MoE router at 128 tokens (4 tiles) splits into
        // 16 of 128 columns; at 2,048 tokens (64 tiles) into 4; 8 rows of an f32 4,096 × 4,096
        // matrix (64 tiles) into 4; a 2,048-token dense product's 2,048 tiles not; short rows
        // not (k < 256).
        for (m, k, n, want) in [
            (128, 2048, 128, 16),
            (2048, 2048, 128, 4),
            (8, 4096, 4096, 4),
            (2048, 2048, 4096, 1),
            (3, 200, 13, 1),
            (3, 256, 13, 2),
        ] {
            assert_eq!(f32_k_splits(132, (m, k, n)), want, "m={m} k={k} n={n}");
        }
    }

    #[test]
    fn tcq_splits_k_only_where_tiles_leave_sms_idle() {
        // (tiles, steps, splits) on 132 SMs: a 2,048-token prompt's tiles fill them; a
        // 128-token prompt's Llama-3.1-8B down and o projections (32 tiles, k = 14,336 and
        // 4,096) split into a wave of 264 blocks, its gate/up (112 tiles, 64 steps) not; at
        // 512 tokens the down projection (128 tiles) in two, Qwen3-0.6B's o projection at
        // 2,048 (128 tiles, 32 steps) not; a split keeps 8 steps or more.
        for (tiles, steps, want) in [
            (512, 224, 1),
            (32, 224, 8),
            (32, 64, 8),
            (112, 64, 1),
            (128, 224, 2),
            (128, 32, 1),
            (4, 5, 1),
            (4, 25, 3),
        ] {
            assert_eq!(
                tcq_k_splits(tiles, steps, 132),
                want,
                "{tiles} tiles, {steps} steps"
            );
        }
    }

    #[test]
    fn short_prompts_split_k_to_two_blocks_an_sm() {
        // (tiles, steps, splits) on 132 SMs, two blocks an SM: Llama-3.1-8B's q (32 tiles, 64
        // steps) into 8 (256 blocks), its k/v (8 tiles) into 16 of 4 steps, gate/up (112 tiles)
        // into 2, down (224 steps) into 8; Llama-3.2-1B's q (16 tiles, 32 steps) into 8; a split
        // keeps 4 steps.
        for (tiles, steps, want) in [
            (32, 64, 8),
            (8, 64, 16),
            (112, 64, 2),
            (32, 224, 8),
            (16, 32, 8),
            (1002, 64, 1),
            (4, 3, 1),
        ] {
            assert_eq!(
                short_k_splits(tiles, steps, 264),
                want,
                "{tiles} tiles, {steps} steps"
            );
        }
    }

    #[test]
    fn short_prompts_split_k_until_x_fits_shared_memory() {
        // (splits, steps, rows, budget, want splits, want bytes): the 8B's gate/up (2 splits of
        // 32 steps) and down (8 of 28) at 2–16 rows as split; down unsplit (224 steps of 16
        // rows take 459,008 bytes) in 5; one step over a budget.
        let cases = [
            (2, 64, 16, 100 << 10, 2, 65_792),
            (8, 224, 16, 100 << 10, 8, 57_600),
            (1, 224, 16, 100 << 10, 5, 92_416),
            (1, 3, 16, 4_000, 3, 2_304),
        ];
        for (splits, steps, rows, budget, want, bytes) in cases {
            assert_eq!(
                x_range_splits(splits, steps, rows, budget),
                (want, bytes),
                "{steps} steps of {rows} rows in {budget} bytes"
            );
        }
    }

    /// The tensor-core matvec plan for a 132-SM GPU: one wave of blocks where that can hold
    /// every tile (else blocks of 8 warps), each block's tiles (matvec_tc.cu's rule) in the
    /// warps it has.
    #[test]
    fn matvec_tc_plan_fills_one_wave() {
        // (n, k, gated, grid, kgroups): Llama-3.1-8B q/k/v, gate/up, down, lm head; Llama-3.2-1B
        // q/k/v; the lm heads of SmolLM2 (1.45 waves of 264 blocks) and Qwen3-0.6B (4.5);
        // SmolLM2's q/k/v, gate/up and down (a stage of steps a warp). Blocks
        // of fewer tiles, their warps splitting k, to end the waves evenly were slower (H100,
        // 2026-11-26, decode: SmolLM2 shape −0.6% with 4 tiles of 2 warps; the 1B −11% and
        // the 8B −4% with 1 tile of 8).
        let cases = [
            (6144, 4096, false, 128, 5),
            (14336, 4096, true, 128, 2),
            (4096, 14336, false, 128, 8),
            (128_256, 4096, false, 1002, 1),
            (3072, 2048, false, 96, 8),
            (49_152, 576, false, 384, 1),
            (960, 576, false, 60, 3),
            (1536, 576, true, 96, 5),
            (576, 1536, false, 36, 6),
            (151_936, 1024, false, 1187, 1),
        ];
        for (n, k, gated, grid, kgroups) in cases {
            let plan = matvec_tc_plan(n, k, TC_CHUNKS_32, gated, Folding::NORM, 132, 0)
                .unwrap()
                .unwrap();
            assert_eq!((plan.grid.0, plan.kgroups), (grid, kgroups), "{n}×{k}");
            let tiles = n.div_ceil(MATVEC_TC_TILE).div_ceil(grid as usize);
            assert!(tiles * kgroups * 32 <= plan.threads as usize, "{n}×{k}");
        }
    }

    /// Which weights' matvecs read x's f16 copy (so that the decoder asks producers for one):
    /// the tensor-core ones (SmolLM2's smallest too), not smaller matrices or layouts matvec.cu
    /// multiplies.
    #[test]
    fn matvec_reads_half_x_on_tensor_cores_only() {
        let mlx = |bits| WeightLayout::MlxAffine {
            bits,
            group_size: 64,
        };
        let cases = [
            (mlx(4), 2048, 2048, true),
            (mlx(8), 4096, 14336, true),
            (WeightLayout::Gguf(GgmlType::Q4_0), 4096, 4096, true),
            (mlx(4), 576, 576, true),
            (mlx(4), 256, 512, false),
            (mlx(6), 4096, 4096, false),
            (WeightLayout::Gguf(GgmlType::Q4_1), 4096, 4096, true),
            (WeightLayout::Gguf(GgmlType::Q4K), 4096, 4096, true),
            (WeightLayout::Gguf(GgmlType::Q6K), 4096, 4096, true),
            (WeightLayout::Gguf(GgmlType::Q6K), 4096, 4352, true),
            (WeightLayout::Gguf(GgmlType::Q6K), 4095, 4352, false),
            (WeightLayout::Gguf(GgmlType::Q6K), 4096, 1536, true),
            (WeightLayout::Gguf(GgmlType::Q8_0), 4096, 4160, true),
            (WeightLayout::Gguf(GgmlType::Q8_0), 4096, 4128, false),
            (WeightLayout::Gguf(GgmlType::Q4_0), 4096, 4160, true),
            (WeightLayout::Gguf(GgmlType::Q5_0), 4096, 4096, true),
            (WeightLayout::Gguf(GgmlType::Q5_0), 4096, 4128, false),
            (WeightLayout::Gguf(GgmlType::Q5_1), 4096, 4096, true),
            (WeightLayout::Gguf(GgmlType::Q5K), 4096, 4096, true),
            (WeightLayout::Dense, 4096, 4096, false),
        ];
        for (layout, n, k, reads) in cases {
            assert_eq!(
                matvec_reads_half_x(132, layout, n, k),
                reads,
                "{layout:?} {n}×{k}"
            );
        }
    }

    /// Q4_0 and Q8_0 rows off quads (k % 128 == 64) take the word-loaded kernels
    /// (`matvec_tc_*_words`); whole quads and the other layouts keep their plain names.
    #[test]
    fn tensor_core_plan_names_the_word_loaded_kernels() {
        let suffix = |ty, k| {
            let m = DecodeMatvec::aligned(WeightLayout::Gguf(ty), 4096, k, false);
            tensor_core_plan(m, 132).unwrap().map(|p| p.layout_suffix)
        };
        assert_eq!(suffix(GgmlType::Q4_0, 4160), Some("_words"));
        assert_eq!(suffix(GgmlType::Q8_0, 4160), Some("_words"));
        assert_eq!(suffix(GgmlType::Q4_0, 4096), Some(""));
        assert_eq!(suffix(GgmlType::Q8_0, 4096), Some(""));
        assert_eq!(suffix(GgmlType::Q5_0, 4160), Some(""));
        assert_eq!(suffix(GgmlType::Q8_0, 4128), None);
    }

    /// Blocks that would leave half their warps or more idle run only the busy ones (at least
    /// four); fuller blocks keep all sixteen.
    #[test]
    fn matvec_tc_plan_trims_idle_warps() {
        // (n, k, gated, threads): SmolLM2 o (1 tile, 2 k slices), the 1B o (1 tile, 8 slices),
        // the 8B gate/up (7 tiles, 2 slices) and q/k/v (3 tiles, 5 slices).
        for (n, k, gated, threads) in [
            (576, 576, false, 128),
            (2048, 2048, false, 256),
            (14336, 4096, true, 512),
            (6144, 4096, false, 512),
        ] {
            let plan = matvec_tc_plan(n, k, TC_CHUNKS_32, gated, Folding::NONE, 132, 0)
                .unwrap()
                .unwrap();
            assert_eq!(plan.threads, threads, "{n}×{k}");
        }
    }

    /// Shared memory holds the norm weights only where the kernel folds the norm (and the
    /// update), and a plan whose bytes would pass the limit falls back to matvec.cu (an update
    /// that would pass it, to a launch in front).
    #[test]
    fn matvec_tc_plan_sizes_shared_memory_by_the_fold() {
        let shared = |k, folding| {
            matvec_tc_plan(4096, k, TC_CHUNKS_32, false, folding, 132, 0)
                .unwrap()
                .map(|p| (p.shared, p.folds_update))
        };
        // f16 x (2k), a chunk of zeros (64), two sums per chunk (k/4); the f32 norm weight (4k)
        // and a scale per chunk (k/8); the update's f32 weight (4k).
        assert_eq!(shared(4096, Folding::NONE), Some((9_280, false)));
        assert_eq!(shared(4096, Folding::NORM), Some((26_176, false)));
        assert_eq!(shared(4096, Folding::UPDATE), Some((42_560, true)));
        assert_eq!(shared(12_288, Folding::UPDATE), Some((78_400, false)));
        assert_eq!(shared(16_896, Folding::NONE), Some((38_080, false)));
        assert_eq!(shared(16_896, Folding::NORM), None);
        // Q4_K's chunks stage four sums each (two runs): 16 bytes a chunk.
        let q4k = matvec_tc_plan(4096, 4096, TC_CHUNKS_KQUANT, false, Folding::NONE, 132, 0);
        assert_eq!(q4k.unwrap().map(|p| p.shared), Some(10_304));
    }

    /// A gathered matvec's slots share the SMs: Qwen3-30B-A3B's gate/up and down (128 experts,
    /// 8 slots) on 16 blocks a slot; other widths, small experts, and stacks past the 32-bit
    /// offsets stay on moe.cu's kernels.
    #[test]
    fn gather_matvec_tc_plan_shares_the_sms_between_slots() {
        let mlx = |bits| WeightLayout::MlxAffine {
            bits,
            group_size: 64,
        };
        let plan_of = |layout, (n, k), experts, gated| {
            let matvec = DecodeMatvec {
                gated,
                ..DecodeMatvec::aligned(layout, n, k, gated)
            };
            gather_matvec_tc_plan(matvec, (experts, 8), 132)
                .unwrap()
                .map(|p| (p.grid, p.kgroups, p.threads, p.layout_suffix))
        };
        let plan = |bits, (n, k), experts, gated| {
            plan_of(mlx(bits), (n, k), experts, gated).map(|(g, kg, t, _)| (g, kg, t))
        };
        assert_eq!(plan(4, (768, 2048), 128, true), Some(((16, 8, 1), 5, 512)));
        assert_eq!(plan(4, (2048, 768), 128, false), Some(((16, 8, 1), 2, 512)));
        assert_eq!(plan(8, (768, 2048), 128, true), Some(((16, 8, 1), 5, 512)));
        assert_eq!(plan(6, (768, 2048), 128, true), None);
        assert_eq!(plan(4, (128, 512), 128, true), None);
        assert_eq!(plan(4, (256, 1024), 128, false), Some(((16, 8, 1), 4, 128)));
        assert_eq!(plan(4, (2048, 7168), 293, false), None);
        // ggml experts as the dense matvec takes them: Q4_K gate/up and down; Q6_K plain, on
        // stacks of an even number of super-blocks only; Q8_0 off quads on words.
        let gguf = WeightLayout::Gguf;
        let q4k = plan_of(gguf(GgmlType::Q4K), (768, 2048), 128, true);
        assert_eq!(q4k, Some(((16, 8, 1), 5, 512, "")));
        assert!(plan_of(gguf(GgmlType::Q4K), (2048, 768), 128, false).is_some());
        assert!(plan_of(gguf(GgmlType::Q6K), (2048, 1024), 128, false).is_some());
        assert!(plan_of(gguf(GgmlType::Q6K), (2048, 768), 128, false).is_some());
        assert!(plan_of(gguf(GgmlType::Q6K), (2047, 768), 3, false).is_none());
        assert!(plan_of(gguf(GgmlType::Q6K), (768, 2048), 128, true).is_none());
        let q8 = plan_of(gguf(GgmlType::Q8_0), (2048, 704), 128, false);
        assert_eq!(q8.map(|p| p.3), Some("_words"));
    }

    /// The kernel's 32-bit offsets reach 2^32 − 1 elements; a larger matrix runs matvec.cu.
    #[test]
    fn matvec_tc_plan_leaves_matrices_of_2_pow_32_elements() {
        let plan = |n| matvec_tc_plan(n, 4096, TC_CHUNKS_32, false, Folding::NONE, 132, 0).unwrap();
        assert!(plan((1 << 20) - 1).is_some());
        assert!(plan(1 << 20).is_none());
    }
}
