use super::{expect_dtype, expect_u32_scalar};
use crate::core::dtype::DType;
use crate::core::encoder::CommandEncoder;
use crate::core::op::{Op, SamplingParams};
use crate::core::tensor::Tensor;
use crate::{Error, Result};

/// token u32 `[1]` = argmax of the last row of logits `[m, vocab]` (lowest id on ties).
pub fn argmax(enc: &mut CommandEncoder, logits: &Tensor, token: &Tensor) -> Result<()> {
    greedy(enc, logits, token, None)
}

/// `argmax`, then `end_step` in the same dispatch: the end of a greedy decode step.
pub fn argmax_end_step(
    enc: &mut CommandEncoder,
    logits: &Tensor,
    token: &Tensor,
    pos: &Tensor,
    ring: &Tensor,
) -> Result<()> {
    greedy(enc, logits, token, Some((pos, ring)))
}

fn greedy(
    enc: &mut CommandEncoder,
    logits: &Tensor,
    token: &Tensor,
    step: Option<(&Tensor, &Tensor)>,
) -> Result<()> {
    expect_dtype("argmax", "logits", logits, &[DType::F32])?;
    expect_u32_scalar("argmax", "token", token)?;
    match step {
        None => enc.dispatch(Op::Argmax { end_step: false }, &[logits], &[token]),
        Some((pos, ring)) => {
            expect_step_end("argmax", pos, ring)?;
            enc.dispatch(
                Op::Argmax { end_step: true },
                &[logits],
                &[token, pos, ring],
            )
        }
    }
}

/// The end of a decode step: ring u32 `[r]` slot (pos + 1) % r = token u32 `[1]`, then pos
/// u32 `[1]` += 1. The ring is where the host reads each step's token while later steps run;
/// in host-mapped memory (`Device::zeros_host_mapped`) that read copies nothing on the device.
pub fn end_step(
    enc: &mut CommandEncoder,
    token: &Tensor,
    pos: &Tensor,
    ring: &Tensor,
) -> Result<()> {
    expect_u32_scalar("end_step", "token", token)?;
    expect_step_end("end_step", pos, ring)?;
    enc.dispatch(Op::EndStep, &[token], &[pos, ring])
}

fn expect_step_end(op: &'static str, pos: &Tensor, ring: &Tensor) -> Result<()> {
    expect_u32_scalar(op, "pos", pos)?;
    expect_dtype(op, "ring", ring, &[DType::U32])?;
    if ring.shape().len() != 1 || ring.elem_count() == 0 {
        return Err(Error::op(
            op,
            format!(
                "ring: expected shape [r] with r ≥ 1, found {:?}",
                ring.shape()
            ),
        ));
    }
    Ok(())
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
    expect_u32_scalar("sample", "pos", pos)?;
    expect_u32_scalar("sample", "token", token)?;
    expect_dtype("sample", "history", history, &[DType::U32])?;
    params.validate()?;
    enc.dispatch(Op::Sample(params), &[logits, pos], &[token, history])
}
