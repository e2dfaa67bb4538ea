//! Rotary position embedding (rope.cu): one thread per rotated pair or copied dim; fused with
//! the KV-cache append for the attention's input stage (f32 or f16 caches: a build of the
//! source each, `kv_t`).

use super::{for_caches, COMMON, KV_F16, KV_F32, ROPE};
use crate::backends::cuda::compile::Source;
use crate::backends::cuda::device_ptr;
use crate::backends::cuda::launch::{
    blocks, dim, operand_count, wrong_op, Args, CudaKernel, KernelLibrary, Launch, Planner,
};
use crate::core::dtype::DType;
use crate::core::op::{Op, PreNorm};
use crate::core::registry::Registry;
use crate::core::tensor::Tensor;
use crate::{Error, Result};

pub(super) static SOURCE: Source = Source {
    name: "rope",
    parts: &[COMMON, ROPE, KV_F32, ROPE_CU],
};
pub(super) static SOURCE_F16: Source = Source {
    name: "rope_f16",
    parts: &[COMMON, ROPE, KV_F16, ROPE_CU],
};
const ROPE_CU: &str = include_str!("rope.cu");

pub(super) fn register(reg: &mut Registry<Planner>) {
    reg.insert("rope", "", DType::F32, rope);
    reg.insert("rope_kv_append", "", DType::F32, rope_kv_append);
}

fn rope(lib: &KernelLibrary, op: &Op, inputs: &[Tensor], outputs: &[Tensor]) -> Result<CudaKernel> {
    let Op::Rope {
        n_heads,
        head_dim,
        rotary_dims,
        traditional,
        mscale,
    } = *op
    else {
        return Err(wrong_op(op));
    };
    let ([x, inv_freq, pos], [out]) = (inputs, outputs) else {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    };
    let rows = x.rows();
    let threads = rows * n_heads * (rotary_dims / 2 + head_dim - rotary_dims);
    let args = Args::new()
        .ptr(x)?
        .ptr(inv_freq)?
        .ptr(pos)?
        .ptr(out)?
        .int(rows)?
        .int(n_heads)?
        .int(head_dim)?
        .int(rotary_dims)?
        .code(traditional as i32)
        .f32(mscale);
    let grid = (blocks(threads, 256)?, 1, 1);
    Ok(CudaKernel::single(
        lib.launch(&SOURCE, "rope", grid, 256, 0, args)?,
    ))
}

fn rope_kv_append(
    lib: &KernelLibrary,
    op: &Op,
    inputs: &[Tensor],
    outputs: &[Tensor],
) -> Result<CudaKernel> {
    let ([q, k, v, inv_freq, pos], [q_out, k_cache, v_cache]) = (inputs, outputs) else {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    };
    let launch = rope_kv_append_launch(
        lib,
        op,
        (device_ptr(q)?, device_ptr(k)?),
        [v, inv_freq, pos],
        device_ptr(q_out)?,
        (k_cache, v_cache),
        None,
    )?;
    Ok(CudaKernel::single(launch))
}

/// The `rope_kv_append` kernel for an `Op::RopeKvAppend`: q and k read at addresses `q` and
/// `k` (as many rows as `v`), the rotated q written at address `q_out`; with `head_norm` (q's
/// and k's weights, f32 `[head_dim]`, at most ROPE_NORMED_MAX_HEAD_DIM) each q and k head
/// RMS-normed first (`rope_kv_append_normed`).
pub(super) fn rope_kv_append_launch(
    lib: &KernelLibrary,
    op: &Op,
    (q, k): (u64, u64),
    [v, inv_freq, pos]: [&Tensor; 3],
    q_out: u64,
    (k_cache, v_cache): (&Tensor, &Tensor),
    head_norm: Option<(&Tensor, &Tensor, PreNorm)>,
) -> Result<Launch> {
    let Op::RopeKvAppend {
        n_heads,
        n_kv_heads,
        head_dim,
        rotary_dims,
        traditional,
        mscale,
    } = *op
    else {
        return Err(wrong_op(op));
    };
    let source = for_caches(op.name(), &[k_cache, v_cache], [&SOURCE, &SOURCE_F16])?;
    let rows = v.rows();
    let capacity = k_cache.shape().get(1).copied().unwrap_or(0);
    let per_row =
        (n_heads + n_kv_heads) * (rotary_dims / 2 + head_dim - rotary_dims) + n_kv_heads * head_dim;
    let args = Args::new()
        .u64(q)
        .u64(k)
        .ptr(v)?
        .ptr(inv_freq)?
        .ptr(pos)?
        .u64(q_out)
        .ptr(k_cache)?
        .ptr(v_cache)?;
    let shape = |args: Args| -> Result<Args> {
        args.int(n_heads)?
            .int(n_kv_heads)?
            .int(head_dim)?
            .int(rotary_dims)?
            .code(traditional as i32)
            .f32(mscale)
            .int(capacity)
    };
    match head_norm {
        Some((q_w, k_w, norm)) => {
            if head_dim > ROPE_NORMED_MAX_HEAD_DIM {
                return Err(Error::op(
                    op.name(),
                    format!("head norms in the rope pass at head dim {head_dim}"),
                ));
            }
            let args = shape(args)?
                .ptr(q_w)?
                .ptr(k_w)?
                .f32(norm.eps)
                .f32(norm.w_offset())
                .early_launch(rows);
            let (grid, threads) = ((dim(rows)?, 1, 1), ROPE_NORMED_THREADS);
            lib.launch(source, "rope_kv_append_normed", grid, threads, 0, args)
        }
        None => {
            let args = shape(args.int(rows)?)?.early_launch(rows);
            let grid = (blocks(rows * per_row, 256)?, 1, 1);
            lib.launch(source, "rope_kv_append", grid, 256, 0, args)
        }
    }
}

/// The most head dims `rope_kv_append_normed` takes, and its threads (rope.cu's
/// ROPE_NORMED_MAX_HD and ROPE_NORMED_WARPS).
pub(super) const ROPE_NORMED_MAX_HEAD_DIM: usize = 256;
const ROPE_NORMED_THREADS: u32 = 256;

#[cfg(test)]
mod tests {
    use super::*;

    /// `rope_kv_append_normed`'s shared memory holds a head of ROPE_NORMED_MAX_HD dims a warp:
    /// the planner's limit and block size must be the kernel's.
    #[test]
    fn planner_constants_match_the_kernel() {
        super::super::assert_defines(
            "rope.cu",
            ROPE_CU,
            &[
                ("ROPE_NORMED_MAX_HD", ROPE_NORMED_MAX_HEAD_DIM),
                ("ROPE_NORMED_WARPS", ROPE_NORMED_THREADS as usize / 32),
            ],
        );
    }
}
