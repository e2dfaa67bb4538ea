use super::{expect_dtype, expect_shape};
use crate::core::dtype::DType;
use crate::core::encoder::CommandEncoder;
use crate::core::op::{Op, SamplingParams};
use crate::core::tensor::Tensor;
use crate::Result;

/// token u32 `[1]` = argmax of the last row of logits `[m, vocab]` (lowest id on ties).
pub fn argmax(enc: &mut CommandEncoder, logits: &Tensor, token: &Tensor) -> Result<()> {
    greedy(enc, logits, token, None)
}

/// `argmax`, then pos u32 `[1]` += 1 (`advance_pos`) in the same dispatch: the end of a greedy
/// decode step.
pub fn argmax_advance(
    enc: &mut CommandEncoder,
    logits: &Tensor,
    token: &Tensor,
    pos: &Tensor,
) -> Result<()> {
    greedy(enc, logits, token, Some(pos))
}

fn greedy(
    enc: &mut CommandEncoder,
    logits: &Tensor,
    token: &Tensor,
    pos: Option<&Tensor>,
) -> Result<()> {
    expect_dtype("argmax", "logits", logits, &[DType::F32])?;
    expect_dtype("argmax", "token", token, &[DType::U32])?;
    expect_shape("argmax", "token", token, &[1])?;
    match pos {
        None => enc.dispatch(Op::Argmax { advance_pos: false }, &[logits], &[token]),
        Some(pos) => {
            expect_dtype("argmax", "pos", pos, &[DType::U32])?;
            expect_shape("argmax", "pos", pos, &[1])?;
            enc.dispatch(Op::Argmax { advance_pos: true }, &[logits], &[token, pos])
        }
    }
}

/// pos u32 `[1]` += 1 (the end of a decode step).
pub fn advance_pos(enc: &mut CommandEncoder, pos: &Tensor) -> Result<()> {
    expect_dtype("advance_pos", "pos", pos, &[DType::U32])?;
    expect_shape("advance_pos", "pos", pos, &[1])?;
    enc.dispatch(Op::AdvancePos, &[], &[pos])
}

/// token u32 `[1]` = a draw from the last row of `logits` under `params`; `history` u32
/// `[capacity]` holds the tokens at positions 0..=pos (read for the repetition penalty) and
/// receives the draw at pos+1. `pos` is a u32 `[1]` buffer. Temperature 0 is argmax.
pub fn sample(
    enc: &mut CommandEncoder,
    params: SamplingParams,
    logits: &Tensor,
    pos: &Tensor,
    token: &Tensor,
    history: &Tensor,
) -> Result<()> {
    expect_dtype("sample", "logits", logits, &[DType::F32])?;
    expect_dtype("sample", "pos", pos, &[DType::U32])?;
    expect_shape("sample", "pos", pos, &[1])?;
    expect_dtype("sample", "token", token, &[DType::U32])?;
    expect_shape("sample", "token", token, &[1])?;
    expect_dtype("sample", "history", history, &[DType::U32])?;
    params.validate()?;
    enc.dispatch(Op::Sample(params), &[logits, pos], &[token, history])
}
