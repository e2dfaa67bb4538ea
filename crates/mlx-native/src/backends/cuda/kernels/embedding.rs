//! Embedding gather for every table layout (embedding.cu): one block per token.

use super::weights::Weight;
use super::{COMMON, LAYOUTS};
use crate::backends::cuda::compile::Source;
use crate::backends::cuda::launch::{
    dim, operand_count, wrong_op, Args, CudaKernel, KernelLibrary, Planner,
};
use crate::core::dtype::DType;
use crate::core::op::Op;
use crate::core::registry::Registry;
use crate::core::tensor::Tensor;
use crate::quant::WeightLayout;
use crate::Result;

pub(super) static SOURCE: Source = Source {
    name: "embedding",
    parts: &[COMMON, LAYOUTS, include_str!("embedding.cu")],
};

const THREADS: u32 = 128;

pub(super) fn register(reg: &mut Registry<Planner>) {
    for layout in WeightLayout::all() {
        reg.insert("embedding", &layout.variant(), DType::F32, embedding);
    }
}

fn embedding(
    lib: &KernelLibrary,
    op: &Op,
    inputs: &[Tensor],
    outputs: &[Tensor],
) -> Result<CudaKernel> {
    let Op::Embedding { layout } = *op else {
        return Err(wrong_op(op));
    };
    let ([out], Some((ids, table))) = (outputs, inputs.split_first()) else {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    };
    let k = out.last_dim();
    let (weight, vocab) = Weight::parse("embedding", layout, table, k)?;
    weight.check_alignment("embedding")?;
    let (name, args) = match weight {
        Weight::Mlx {
            w,
            scales,
            biases,
            bits,
            group_shift,
            scale_type,
        } => (
            format!("embedding_mlx{bits}"),
            Args::new()
                .ptr(ids)?
                .ptr(w)?
                .ptr(scales)?
                .ptr(biases)?
                .code(scale_type)
                .ptr(out)?
                .int(vocab)?
                .int(k)?
                .code(group_shift),
        ),
        Weight::Ggml { data, ty } => (
            format!("embedding_{}", ty.name()),
            Args::new()
                .ptr(ids)?
                .ptr(data)?
                .ptr(out)?
                .int(vocab)?
                .int(k)?,
        ),
        Weight::Dense { w, ft } => (
            "embedding_dense".to_string(),
            Args::new()
                .ptr(ids)?
                .ptr(w)?
                .code(ft)
                .ptr(out)?
                .int(vocab)?
                .int(k)?,
        ),
    };
    let grid = (dim(ids.elem_count())?, 1, 1);
    Ok(CudaKernel::single(
        lib.launch(&SOURCE, &name, grid, THREADS, 0, args)?,
    ))
}
