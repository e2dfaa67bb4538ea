//! `Op::Embedding`: rows of a table, in any weight layout, gathered by token id and
//! dequantized to f32. Ids at or past the vocabulary size give zero rows.

use rayon::prelude::*;

use super::{slice, slice_mut, wrong_op, CpuKernel, FloatSlice};
use crate::core::dtype::DType;
use crate::core::op::Op;
use crate::core::registry::Registry;
use crate::core::tensor::Tensor;
use crate::quant::mlx_affine;
use crate::quant::{ggml, GgmlType, WeightLayout};
use crate::{Error, Result};

pub(super) fn register(reg: &mut Registry<CpuKernel>) {
    for layout in WeightLayout::all() {
        reg.insert("embedding", &layout.variant(), DType::F32, embedding);
    }
}

/// An embedding table `[vocab, hidden]` as stored.
enum Table<'a> {
    Dense(FloatSlice<'a>),
    MlxAffine {
        packed: &'a [u32],
        scales: FloatSlice<'a>,
        biases: FloatSlice<'a>,
        bits: u32,
        group_size: usize,
    },
    Gguf(GgmlType, &'a [u8]),
}

impl<'a> Table<'a> {
    fn new(layout: WeightLayout, tensors: &'a [Tensor]) -> Result<Self> {
        Ok(match (layout, tensors) {
            (WeightLayout::Dense, [w]) => Table::Dense(FloatSlice::of(w)?),
            (WeightLayout::MlxAffine { bits, group_size }, [packed, scales, biases]) => {
                mlx_affine::check_params(bits, group_size)?;
                Table::MlxAffine {
                    packed: slice(packed)?,
                    scales: FloatSlice::of(scales)?,
                    biases: FloatSlice::of(biases)?,
                    bits,
                    group_size,
                }
            }
            (WeightLayout::Gguf(t), [blocks]) => Table::Gguf(t, slice(blocks)?),
            _ => {
                return Err(Error::op(
                    "embedding",
                    format!("{} table tensors for {}", tensors.len(), layout.variant()),
                ))
            }
        })
    }

    /// Number of rows of `hidden` elements, checking that every tensor holds exactly that.
    fn vocab(&self, hidden: usize) -> Result<usize> {
        let bad = |what: String| Error::op("embedding", format!("{what} for rows of {hidden}"));
        match self {
            Table::Dense(w) if hidden > 0 && w.len() % hidden == 0 => Ok(w.len() / hidden),
            Table::Dense(w) => Err(bad(format!("dense table of {} elements", w.len()))),
            Table::MlxAffine {
                packed,
                scales,
                biases,
                bits,
                group_size,
            } => {
                let words = mlx_affine::packed_row_len(hidden, *bits);
                let groups = hidden / group_size;
                let vocab = packed.len().checked_div(words).unwrap_or(0);
                if !hidden.is_multiple_of(*group_size)
                    || words == 0
                    || packed.len() != vocab * words
                    || scales.len() != vocab * groups
                    || biases.len() != vocab * groups
                {
                    return Err(bad(format!(
                        "MLX table of {} words, {} scales, {} biases",
                        packed.len(),
                        scales.len(),
                        biases.len()
                    )));
                }
                Ok(vocab)
            }
            Table::Gguf(t, bytes) => {
                let row_bytes = t.row_bytes(hidden);
                if !hidden.is_multiple_of(t.block_size())
                    || row_bytes == 0
                    || !bytes.len().is_multiple_of(row_bytes)
                {
                    return Err(bad(format!("{} table of {} bytes", t.name(), bytes.len())));
                }
                Ok(bytes.len() / row_bytes)
            }
        }
    }

    /// Row `id` (< vocab) dequantized into `out`.
    fn row(&self, id: usize, out: &mut [f32]) -> Result<()> {
        let hidden = out.len();
        match self {
            Table::Dense(w) => w.convert(id * hidden, out),
            Table::MlxAffine {
                packed,
                scales,
                biases,
                bits,
                group_size,
            } => {
                let words = mlx_affine::packed_row_len(hidden, *bits);
                let groups = hidden / group_size;
                let mut s = vec![0f32; groups];
                let mut b = vec![0f32; groups];
                scales.convert(id * groups, &mut s)?;
                biases.convert(id * groups, &mut b)?;
                let packed_row = packed
                    .get(id * words..(id + 1) * words)
                    .ok_or_else(|| Error::op("embedding", format!("row {id} outside the table")))?;
                mlx_affine::dequantize_row(packed_row, &s, &b, *bits, *group_size, out)
            }
            Table::Gguf(t, bytes) => {
                let row_bytes = t.row_bytes(hidden);
                let row = bytes
                    .get(id * row_bytes..(id + 1) * row_bytes)
                    .ok_or_else(|| Error::op("embedding", format!("row {id} outside the table")))?;
                ggml::dequantize_row(*t, row, out)
            }
        }
    }
}

fn embedding(op: &Op, inputs: &[Tensor], outputs: &[Tensor]) -> Result<()> {
    let Op::Embedding { layout, scale } = *op else {
        return Err(wrong_op(op));
    };
    let (Some((ids, tensors)), Some(out)) = (inputs.split_first(), outputs.first()) else {
        return Err(wrong_op(op));
    };
    let hidden = out.last_dim();
    let table = Table::new(layout, tensors)?;
    let vocab = table.vocab(hidden)?;
    let ids = slice::<u32>(ids)?;
    let out = slice_mut::<f32>(out)?;
    if hidden == 0 || out.len() != ids.len() * hidden {
        return Err(Error::op(
            "embedding",
            format!("{} ids and an output of {} values", ids.len(), out.len()),
        ));
    }
    out.par_chunks_mut(hidden)
        .zip(ids.par_iter())
        .try_for_each(|(row, &id)| match id as usize {
            id if id < vocab => {
                table.row(id, row)?;
                if scale != 1.0 {
                    row.iter_mut().for_each(|v| *v *= scale);
                }
                Ok(())
            }
            _ => {
                row.fill(0.0);
                Ok(())
            }
        })
}
