//! Mixture-of-experts ops (moe.cu, moe_ggml.cu): routing, gathered matmuls over stacked experts
//! and the weighted combine. A gathered product of one token (decode) runs every slot's expert
//! as a matvec in one launch, a folded input norm included: on tensor cores (matvec_tc.cu's
//! gathered kernels) where the dense matvec would take the expert's matrix (MLX 4- and 8-bit,
//! the ggml formats the dense planner sends there); there the gated product also routes the
//! token itself when the op routes (`ops::routed_gated_matmul`), elsewhere a moe_route launch
//! goes first. More tokens are grouped by expert (`moe_bucket`, scratch owned by the dispatch)
//! and run as tiled matmuls over each expert's slots (on tensor cores where the dense matmul's
//! tiles would take them), after the norm's own launch. The SIMT matvecs and tiles of ggml
//! blocks are a program of their own (moe_ggml.cu), compiled only for models that hold them.

use super::elementwise::unary_code;
use super::matmul::{
    check_norm_weight, gather_matvec_tc_plan, matvec_reads, norm_args, tensor_core_tiles,
    DecodeMatvec, Norm, TcPlan, MATMUL_TC_MIN_ROWS, MATMUL_TC_TILE,
};
use super::norm::{rms_norm_rows, RmsNormRows};
use super::weights::Weight;
use super::{COMMON, GATHER, LAYOUTS, MMA, ROUTE, TILES_TC};
use crate::backends::cuda::compile::Source;
use crate::backends::cuda::device_ptr;
use crate::backends::cuda::launch::{
    blocks, dim, operand_count, wrong_op, Args, CudaKernel, KernelLibrary, Launch, Planner,
};
use crate::core::dtype::DType;
use crate::core::op::{Op, Route, Routing};
use crate::core::registry::Registry;
use crate::core::tensor::Tensor;
use crate::quant::WeightLayout;
use crate::{Error, Result};

pub(super) static SOURCE: Source = Source {
    name: "moe",
    parts: &[
        COMMON,
        LAYOUTS,
        MMA,
        TILES_TC,
        ROUTE,
        GATHER,
        include_str!("moe.cu"),
    ],
};

/// The gathered products of ggml blocks, compiled only for models that hold them.
pub(super) static GGML_SOURCE: Source = Source {
    name: "moe_ggml",
    parts: &[
        COMMON,
        LAYOUTS,
        MMA,
        TILES_TC,
        GATHER,
        include_str!("moe_ggml.cu"),
    ],
};

/// Warps per block of moe_route (one row each).
const ROUTE_WARPS: usize = 4;
/// Experts a lane of moe_route can track (a 64-bit mask each).
const ROUTE_MAX_EXPERTS: usize = 32 * 64;
/// Slots a row of moe_route keeps (one a lane).
const ROUTE_MAX_TOP_K: usize = 32;
/// GMV_WARPS·GMV_ROWS output rows per block of the gathered matvec, GMV_WARPS·32 threads.
const MATVEC_ROWS_PER_BLOCK: usize = 16;
const MATVEC_THREADS: u32 = 128;
/// GMM_BM = GMM_BN (64×64 SIMT tiles), 256 threads as the tensor-core tiles.
const TILE: usize = 64;
const TILE_THREADS: u32 = 256;
/// Slots of the short tensor-core tiles (gather.cuh `gather_matmul_tc16`), taken while the
/// experts hold at most this many slots on average.
const SHORT_TILE_ROWS: usize = 16;
const SHORT_TILE_MAX_MEAN_SLOTS: usize = 16;
/// Threads of moe_bucket (one block).
const BUCKET_THREADS: u32 = 1024;
/// Row tiles per expert given to blocks up front, as a multiple of an even share of the slots;
/// busier experts loop over their extra tiles.
const TILES_PER_SHARE: usize = 4;

pub(super) fn register(reg: &mut Registry<Planner>) {
    for layout in WeightLayout::all() {
        reg.insert("gather_matmul", &layout.variant(), DType::F32, gather);
        reg.insert("gather_gated_matmul", &layout.variant(), DType::F32, gather);
    }
    reg.insert("moe_route", "", DType::U32, route);
    reg.insert("moe_combine", "", DType::F32, combine);
}

fn route(
    lib: &KernelLibrary,
    op: &Op,
    inputs: &[Tensor],
    outputs: &[Tensor],
) -> Result<CudaKernel> {
    let Op::MoeRoute { top_k, routing } = *op else {
        return Err(wrong_op(op));
    };
    let ([logits], [ids, weights]) = (inputs, outputs) else {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    };
    let route = Route { top_k, routing };
    Ok(CudaKernel::single(route_launch(
        lib,
        logits,
        route,
        (ids, weights),
    )?))
}

/// moe_route of `logits` `[m, experts]` into `ids` and `weights` `[m, top_k]`.
fn route_launch(
    lib: &KernelLibrary,
    logits: &Tensor,
    route: Route,
    (ids, weights): (&Tensor, &Tensor),
) -> Result<Launch> {
    let (m, experts) = (logits.rows(), logits.last_dim());
    let mode = route_mode(route, experts)?;
    let args = Args::new()
        .ptr(logits)?
        .ptr(ids)?
        .ptr(weights)?
        .int(m)?
        .int(experts)?
        .int(route.top_k)?
        .code(mode)
        .early_launch(m);
    let grid = (blocks(m, ROUTE_WARPS)?, 1, 1);
    let threads = (ROUTE_WARPS * 32) as u32;
    let shared = ROUTE_WARPS as u32 * route_shared(experts);
    lib.launch(&SOURCE, "moe_route", grid, threads, shared, args)
}

/// Shared memory of a warp's routing (route.cuh): a row of scores.
fn route_shared(experts: usize) -> u32 {
    (experts * 4) as u32
}

/// route.cuh's mode for `route` over `experts`, which must be within what a warp tracks.
fn route_mode(route: Route, experts: usize) -> Result<i32> {
    if experts > ROUTE_MAX_EXPERTS {
        return Err(Error::op(
            "moe_route",
            format!("{experts} experts (at most {ROUTE_MAX_EXPERTS})"),
        ));
    }
    if route.top_k > ROUTE_MAX_TOP_K {
        return Err(Error::op(
            "moe_route",
            format!("top {} experts (at most {ROUTE_MAX_TOP_K})", route.top_k),
        ));
    }
    Ok(match route.routing {
        Routing::TopKSoftmax => 0,
        Routing::SoftmaxTopK { normalize: false } => 1,
        Routing::SoftmaxTopK { normalize: true } => 2,
    })
}

fn combine(
    lib: &KernelLibrary,
    op: &Op,
    inputs: &[Tensor],
    outputs: &[Tensor],
) -> Result<CudaKernel> {
    let ([y, weights, residual], [out]) = (inputs, outputs) else {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    };
    let launch = combine_launch(lib, device_ptr(y)?, (weights, residual), out)?;
    Ok(CudaKernel::single(launch))
}

/// moe_combine of the slots at `y` (`[m, top_k, n]` f32) into `out` `[m, n]`.
fn combine_launch(
    lib: &KernelLibrary,
    y: u64,
    (weights, residual): (&Tensor, &Tensor),
    out: &Tensor,
) -> Result<Launch> {
    let (m, n, top_k) = (out.rows(), out.last_dim(), weights.last_dim());
    let args = Args::new()
        .u64(y)
        .ptr(weights)?
        .ptr(residual)?
        .ptr(out)?
        .int(m)?
        .int(n)?
        .int(top_k)?
        .early_launch(m);
    let grid = (blocks(m * n, 256)?.min(65535), 1, 1);
    lib.launch(&SOURCE, "moe_combine", grid, 256, 0, args)
}

/// The routing of an op that routes (logits, route, weights) as a launch of its own, into ids.
fn routed_first(
    lib: &KernelLibrary,
    routing: Option<(&Tensor, Route, &Tensor)>,
    ids: &Tensor,
) -> Result<Vec<Launch>> {
    Ok(match routing {
        Some((logits, r, weights)) => vec![route_launch(lib, logits, r, (ids, weights))?],
        None => Vec::new(),
    })
}

/// `Op::GatherMatMul` and `Op::GatherGatedMatMul`.
fn gather(
    lib: &KernelLibrary,
    op: &Op,
    inputs: &[Tensor],
    outputs: &[Tensor],
) -> Result<CudaKernel> {
    let (name, layout, per_slot, act, gated, pre_norm, route, combine) = match *op {
        Op::GatherMatMul {
            layout,
            per_slot,
            combine,
        } => (
            "gather_matmul",
            layout,
            per_slot,
            0,
            false,
            None,
            None,
            combine,
        ),
        Op::GatherGatedMatMul {
            layout,
            act,
            pre_norm,
            route,
        } => (
            "gather_gated_matmul",
            layout,
            false,
            unary_code(act),
            true,
            pre_norm,
            route,
            false,
        ),
        _ => return Err(wrong_op(op)),
    };
    let count = layout.tensor_count();
    let ([out, routed @ ..], [x, ids_or_logits, rest @ ..]) = (outputs, inputs) else {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    };
    // A routing op's second input is the router logits, and its ids and weights are outputs.
    let (ids, routing) = match (route, routed) {
        (None, []) => (ids_or_logits, None),
        (Some(r), [ids, weights]) => (ids, Some((ids_or_logits, r, weights))),
        _ => return Err(operand_count(op, inputs.len(), outputs.len())),
    };
    // A combining op's routing weights and residual come last.
    let (rest, combined) = match (combine, rest) {
        (true, [rest @ .., weights, residual]) => (rest, Some((weights, residual))),
        (false, rest) => (rest, None),
        (true, _) => return Err(operand_count(op, inputs.len(), outputs.len())),
    };
    // The folded norm's weight comes right after ids.
    let (norm, weights): (Norm, _) = match (pre_norm, rest) {
        (None, weights) => (None, weights),
        (Some(p), [g, weights @ ..]) => {
            check_norm_weight(op, g)?;
            (Some((g, p)), weights)
        }
        (Some(_), []) => return Err(operand_count(op, inputs.len(), outputs.len())),
    };
    if weights.len() != count * (1 + gated as usize) {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    }
    let (m, top_k, n, k) = (ids.rows(), ids.last_dim(), out.last_dim(), x.last_dim());
    let (w, rows) = Weight::parse(name, layout, &weights[..count], k)?;
    let up = match gated {
        true => Some(Weight::parse(name, layout, &weights[count..], k)?),
        false => None,
    };
    let experts = rows / n.max(1);
    if n == 0 || rows % n != 0 || up.as_ref().is_some_and(|(_, r)| *r != rows) {
        return Err(Error::op(
            name,
            format!("weights of {rows} rows are not whole experts of {n} rows"),
        ));
    }
    w.check_alignment(name)?;
    if let Some((up, _)) = &up {
        up.check_alignment(name)?;
    }
    let up = up.map(|(w, _)| w);
    let matvec = m == 1
        && device_ptr(x)? % 16 == 0
        && matvec_reads(&w, k)?
        && up.as_ref().map_or(Ok(true), |up| matvec_reads(up, k))?;
    let gated_part = if gated { "gated_" } else { "" };
    let layout_name = w.layout_name();
    let source = match w {
        Weight::Ggml { .. } => &GGML_SOURCE,
        _ => &SOURCE,
    };
    // A combining op's product goes to the library's shared scratch (`y`, `[m, top_k, n]`: a
    // combining op folds no norm, which the tiles would stage there), allocated once rather
    // than a dispatch (prefill of 128 tokens, 48 layers: 4,907 → 4,671 tok/s with an allocation
    // a dispatch, H200).
    let y_scratch = match combine {
        true => Some(lib.shared_scratch(m * top_k * n * 4)?),
        false => None,
    };
    let product = match &y_scratch {
        Some((_, y)) => *y,
        None => device_ptr(out)?,
    };
    let holding_y = |kernel: CudaKernel| match &y_scratch {
        Some((y, _)) => kernel.holding(y.clone()),
        None => kernel,
    };
    let tail = |args: Args| -> Result<Args> {
        let args = w.group_args(args.u64(product).int(n)?.int(k)?);
        let args = args.int(experts)?.int(top_k)?;
        Ok(if gated {
            args.code(act)
        } else {
            args.code(per_slot as i32)
        })
    };
    if matvec {
        // Decode: every slot's rows in one launch, the norm (if any) folded in; on tensor cores
        // (matvec_tc.cu) where they take the layout.
        let mut args = w.tensor_args(Args::new().ptr(x)?.ptr(ids)?)?;
        if let Some(up) = &up {
            args = up.tensor_args(args)?;
        }
        let norm_part = if norm.is_some() { "norm_" } else { "" };
        let stacked = (n, experts * n);
        let matvec = DecodeMatvec::of((&w, up.as_ref()), stacked, k, norm.is_some())?;
        let tc = gather_matvec_tc_plan(matvec, (experts, m * top_k), lib.sm_count())?;
        let mut args = tail(args)?;
        if let Some(plan) = tc {
            args = args.int(plan.kgroups())?;
        }
        if gated {
            args = norm_args(args, norm)?;
        }
        let layout = w.typed_layout_name();
        let tc_layout = |plan: &TcPlan| format!("{layout}{}", plan.layout_suffix());
        let launch = match tc {
            Some(plan) if gated => {
                // The tensor-core kernel routes the token itself where the op routes: its
                // logits, the weights' output and the mode (null, null, 0 for none), and a row
                // of scores beside staged x.
                let (args, plan) = match routing {
                    Some((logits, r, weights)) => {
                        let mode = route_mode(r, experts)?;
                        let args = args.ptr(logits)?.ptr(weights)?.code(mode);
                        (args, plan.with_shared(route_shared(experts)))
                    }
                    None => (args.u64(0).u64(0).code(0), plan),
                };
                let layout = tc_layout(&plan);
                let kernel = format!("gather_matvec_tc_{gated_part}{norm_part}{layout}");
                return Ok(CudaKernel::single(plan.launch(lib, &kernel, args)?));
            }
            Some(plan) => {
                // The slots summed into out by the blocks (weights, residual, out, and counters,
                // one a block column, the dispatch's own), or nulls.
                let (args, counters) = match combined {
                    Some((weights, residual)) => {
                        let (counters, at) = lib.zeroed_scratch(4 * plan.grid().0 as usize)?;
                        let args = args.ptr(weights)?.ptr(residual)?.ptr(out)?.u64(at);
                        (args, Some(counters))
                    }
                    None => (args.u64(0).u64(0).u64(0).u64(0), None),
                };
                let kernel = format!("gather_matvec_tc_{}", tc_layout(&plan));
                let launch = plan.launch(lib, &kernel, args)?;
                return Ok(holding_y(CudaKernel::new(vec![launch], counters)));
            }
            None => {
                let kernel = format!("gather_matvec_{gated_part}{norm_part}{layout}");
                let grid = (blocks(n, MATVEC_ROWS_PER_BLOCK)?, dim(m * top_k)?, 1);
                lib.launch(source, &kernel, grid, MATVEC_THREADS, 0, args)?
            }
        };
        let mut launches = routed_first(lib, routing, ids)?;
        launches.push(launch);
        if let Some((weights, residual)) = combined {
            launches.push(combine_launch(lib, product, (weights, residual), out)?);
        }
        return Ok(holding_y(CudaKernel::new(launches, None)));
    }
    // Several tokens: the routing and the norm (if any) first, the norm into the shared
    // scratch the tiles then read.
    let mut launches = routed_first(lib, routing, ids)?;
    let normed = match norm {
        Some((g, p)) => {
            let (scratch, row) = lib.shared_scratch(x.byte_len())?;
            let rows = RmsNormRows {
                x: device_ptr(x)?,
                residual: 0,
                out: row,
                rows: m,
                d: k,
                tokens: m,
            };
            launches.push(rms_norm_rows(lib, rows, g, p)?);
            Some((scratch, row))
        }
        None => None,
    };
    let x_at = match &normed {
        Some((_, row)) => *row,
        None => device_ptr(x)?,
    };
    // Then group the slots by expert, and tiles over each expert's slots.
    let slots = m * top_k;
    let (scratch, offsets) = lib.scratch((experts + 1 + slots) * 4)?;
    let order = offsets + 4 * (experts as u64 + 1);
    let bucket_args = Args::new()
        .ptr(ids)?
        .int(slots)?
        .int(experts)?
        .u64(offsets)
        .u64(order);
    let shared = u32::try_from((experts + 1) * 4)
        .map_err(|_| Error::op(name, format!("{experts} experts")))?;
    let bucket = lib.launch(
        &SOURCE,
        "moe_bucket",
        (1, 1, 1),
        BUCKET_THREADS,
        shared,
        bucket_args,
    )?;
    let mut args = w.tensor_args(Args::new().u64(x_at).u64(offsets).u64(order))?;
    if let Some(up) = &up {
        args = up.tensor_args(args)?;
    }
    // Tiles read the scale (or dense row) type as an argument; ggml kernels know their blocks'.
    if let Some(ft) = w.float_type() {
        args = args.code(ft);
    }
    // Tensor-core tiles take 128 slots of an expert, or 16 where the experts hold few each; they
    // hold the gate and up rows of half their columns' outputs.
    let tensor_cores = tensor_core_tiles((m, k), x_at, &w, MATMUL_TC_MIN_ROWS);
    let few_slots = slots <= experts * SHORT_TILE_MAX_MEAN_SLOTS;
    let (tc, rows_per_tile) = match (tensor_cores, few_slots) {
        (true, true) => ("tc16_", SHORT_TILE_ROWS),
        (true, false) => ("tc_", MATMUL_TC_TILE),
        (false, _) => ("", TILE),
    };
    let cols_per_block = match (tensor_cores, gated) {
        (true, true) => MATMUL_TC_TILE / 2,
        (true, false) => MATMUL_TC_TILE,
        (false, _) => TILE,
    };
    let kernel = format!("gather_matmul_{tc}{gated_part}{layout_name}");
    let share = (TILES_PER_SHARE * slots).div_ceil(experts * rows_per_tile);
    let row_tiles = share.clamp(1, m.div_ceil(rows_per_tile).max(1));
    let grid = (blocks(n, cols_per_block)?, dim(row_tiles)?, dim(experts)?);
    let args = tail(args)?;
    let tiles = lib.launch(source, &kernel, grid, TILE_THREADS, 0, args)?;
    launches.extend([bucket, tiles]);
    if let Some((weights, residual)) = combined {
        launches.push(combine_launch(lib, product, (weights, residual), out)?);
    }
    let kernel = holding_y(CudaKernel::new(launches, Some(scratch)));
    Ok(match normed {
        Some((shared, _)) => kernel.holding(shared),
        None => kernel,
    })
}
