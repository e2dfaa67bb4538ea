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
    let Op::Embedding { layout, scale } = *op else {
        return Err(wrong_op(op));
    };
    let ([out], Some((ids, table))) = (outputs, inputs.split_first()) else {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    };
    let k = out.last_dim();
    let (weight, vocab) = Weight::parse("embedding", layout, table, k)?;
    weight.check_alignment("embedding")?;
    let name = format!("embedding_{}", weight.layout_name());
    let args = weight.typed_tensor_args(Args::new().ptr(ids)?)?;
    let args = weight
        .group_args(args.ptr(out)?.int(vocab)?.int(k)?)
        .f32(scale)
        .early_launch(ids.elem_count());
    let grid = (dim(ids.elem_count())?, 1, 1);
    Ok(CudaKernel::single(
        lib.launch(&SOURCE, &name, grid, THREADS, 0, args)?,
    ))
}
