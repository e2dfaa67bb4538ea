//! y = x · Wᵀ with W in a GGUF (ggml) block type: each weight row dequantized with the
//! reference `quant::ggml::dequantize_row`, then one dot product per row of x.

use super::matmul::{column_block, dot, par_column_blocks};
use crate::quant::ggml::{dequantize_row, GgmlType};
use crate::{Error, Result};

/// out `[m, n]` = x `[m, k]` · Wᵀ, W given as `n` rows of `t` blocks.
pub(super) fn matmul_gguf(
    t: GgmlType,
    x: &[f32],
    w: &[u8],
    n: usize,
    k: usize,
    out: &mut [f32],
) -> Result<()> {
    let row_bytes = t.row_bytes(k);
    if k == 0
        || w.len() != n * row_bytes
        || !x.len().is_multiple_of(k)
        || out.len() != x.len() / k * n
    {
        return Err(Error::op(
            "matmul",
            format!(
                "{} weight [{n}, {k}] of {} bytes; x of {} and out of {} values",
                t.name(),
                w.len(),
                x.len(),
                out.len()
            ),
        ));
    }
    par_column_blocks(out, n, column_block(n), |col0, out_rows| {
        let mut row = vec![0f32; k];
        for c in 0..out_rows.first().map_or(0, |r| r.len()) {
            let at = (col0 + c) * row_bytes;
            dequantize_row(t, &w[at..at + row_bytes], &mut row)?;
            for (out_row, x_row) in out_rows.iter_mut().zip(x.chunks_exact(k)) {
                out_row[c] = dot(&row, x_row);
            }
        }
        Ok(())
    })
}
