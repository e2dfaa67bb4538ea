use super::{expect_dtype, expect_shape, Linear};
use crate::core::dtype::DType;
use crate::core::encoder::CommandEncoder;
use crate::core::op::Op;
use crate::core::tensor::Tensor;
use crate::Result;

/// out `[m, hidden]` = rows `ids` of `table` (`n` = vocab, `k` = hidden), dequantized to f32.
/// Ids at or past the vocabulary size produce zero rows.
pub fn embedding(
    enc: &mut CommandEncoder,
    ids: &Tensor,
    table: &Linear,
    out: &Tensor,
) -> Result<()> {
    scaled_embedding(enc, ids, table, 1.0, out)
}

/// `embedding`'s rows times `scale` (f32), in the same dispatch (Gemma's √hidden).
pub fn scaled_embedding(
    enc: &mut CommandEncoder,
    ids: &Tensor,
    table: &Linear,
    scale: f32,
    out: &Tensor,
) -> Result<()> {
    expect_dtype("embedding", "ids", ids, &[DType::U32])?;
    expect_shape("embedding", "out", out, &[ids.elem_count(), table.k])?;
    let mut inputs: Vec<&Tensor> = vec![ids];
    inputs.extend(table.tensors.iter());
    let op = Op::Embedding {
        layout: table.layout,
        scale,
    };
    enc.dispatch(op, &inputs, &[out])
}
