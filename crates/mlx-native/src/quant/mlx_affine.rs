//! MLX affine quantization: groups of `group_size` consecutive elements of a row share a
//! scale and a bias; element = scale · q + bias with q an unsigned `bits`-bit integer.
//!
//! Packing (checked against `mx.quantize` for every supported `bits`): each row is one
//! little-endian bit stream stored in u32 words, element j at bits `[j·bits, (j+1)·bits)`.
//! MLX writes 3-, 5- and 6-bit rows byte by byte (8, 8 and 4 elements per 3, 5 and 3 bytes),
//! which is the same stream.

use crate::{Error, Result};

pub const SUPPORTED_BITS: [u32; 6] = [2, 3, 4, 5, 6, 8];
pub const SUPPORTED_GROUP_SIZES: [usize; 3] = [32, 64, 128];

pub fn check_params(bits: u32, group_size: usize) -> Result<()> {
    if !SUPPORTED_BITS.contains(&bits) || !SUPPORTED_GROUP_SIZES.contains(&group_size) {
        return Err(Error::UnsupportedQuant(format!(
            "MLX affine bits={bits} group_size={group_size} (bits in {SUPPORTED_BITS:?}, group sizes in {SUPPORTED_GROUP_SIZES:?})"
        )));
    }
    Ok(())
}

/// u32 words of one packed row of `k` elements (`k` a multiple of a supported group size).
pub fn packed_row_len(k: usize, bits: u32) -> usize {
    k * bits as usize / 32
}

/// Element `j` of a packed row. Panics if the element lies outside `packed_row`; `bits` must
/// be at most 8 (see `check_params`).
#[inline(always)]
pub fn unpack(packed_row: &[u32], bits: u32, j: usize) -> u32 {
    let bit = j * bits as usize;
    let (word, shift) = (bit / 32, bit % 32);
    let mut q = packed_row[word] >> shift;
    if shift + bits as usize > 32 {
        q |= packed_row[word + 1] << (32 - shift);
    }
    q & ((1 << bits) - 1)
}

/// Quantize `w` (`n` rows of `k`) the way MLX's `mx.quantize` does, bit for bit.
/// Returns the packed words `[n, k·bits/32]`, scales and biases `[n, k/group_size]` in f32;
/// MLX stores scales and biases in the weight's dtype, so round them to it (f16, bf16) to
/// get MLX's tensors for such weights (the packed words do not depend on that rounding).
pub fn quantize(
    w: &[f32],
    n: usize,
    k: usize,
    bits: u32,
    group_size: usize,
) -> Result<(Vec<u32>, Vec<f32>, Vec<f32>)> {
    check_params(bits, group_size)?;
    if !k.is_multiple_of(group_size) || w.len() != n * k {
        return Err(Error::Invalid(format!(
            "quantize: {} values for [{n}, {k}] with group size {group_size}",
            w.len()
        )));
    }
    let words = packed_row_len(k, bits);
    let max_q = ((1u32 << bits) - 1) as f32;
    let mut packed = vec![0u32; n * words];
    let mut scales = Vec::with_capacity(n * k / group_size);
    let mut biases = Vec::with_capacity(n * k / group_size);
    for (row, packed_row) in w.chunks_exact(k).zip(packed.chunks_exact_mut(words)) {
        for (g, group) in row.chunks_exact(group_size).enumerate() {
            let (scale, bias) = group_scale_bias(group, max_q);
            for (i, &v) in group.iter().enumerate() {
                let q = ((v - bias) / scale).round_ties_even().clamp(0.0, max_q) as u32;
                let bit = (g * group_size + i) * bits as usize;
                let (word, shift) = (bit / 32, bit % 32);
                packed_row[word] |= q << shift;
                if shift + bits as usize > 32 {
                    packed_row[word + 1] |= q >> (32 - shift);
                }
            }
            scales.push(scale);
            biases.push(bias);
        }
    }
    Ok((packed, scales, biases))
}

/// MLX's choice of (scale, bias) for one group: the value of largest magnitude (the "edge")
/// is made exactly representable, as q = 0 with bias = edge, by letting the scale carry the
/// sign that points from the edge into the group.
fn group_scale_bias(group: &[f32], max_q: f32) -> (f32, f32) {
    let (mut min, mut max) = (f32::INFINITY, f32::NEG_INFINITY);
    for &v in group {
        min = min.min(v);
        max = max.max(v);
    }
    let edge_is_min = min.abs() > max.abs();
    let scale = ((max - min) / max_q).max(1e-7);
    let (scale, edge) = if edge_is_min {
        (scale, min)
    } else {
        (-scale, max)
    };
    let q0 = (edge / scale).round_ties_even();
    if q0 == 0.0 {
        (scale, 0.0)
    } else {
        (edge / q0, edge)
    }
}

/// Dequantize one packed row into `out` (`k = out.len()` elements): scale · q + bias, in f32.
pub fn dequantize_row(
    packed_row: &[u32],
    scales_row: &[f32],
    biases_row: &[f32],
    bits: u32,
    group_size: usize,
    out: &mut [f32],
) -> Result<()> {
    check_params(bits, group_size)?;
    let k = out.len();
    let groups = k / group_size;
    if !k.is_multiple_of(group_size)
        || packed_row.len() != packed_row_len(k, bits)
        || scales_row.len() != groups
        || biases_row.len() != groups
    {
        return Err(Error::Invalid(format!(
            "dequantize_row: {} words, {} scales, {} biases for {k} {bits}-bit elements in groups of {group_size}",
            packed_row.len(),
            scales_row.len(),
            biases_row.len()
        )));
    }
    let dequantize = match bits {
        2 => dequantize_groups::<2>,
        3 => dequantize_groups::<3>,
        4 => dequantize_groups::<4>,
        5 => dequantize_groups::<5>,
        6 => dequantize_groups::<6>,
        // 8: `check_params` admits no other value.
        _ => dequantize_groups::<8>,
    };
    dequantize(packed_row, scales_row, biases_row, group_size, out);
    Ok(())
}

/// `dequantize_row` with `bits` a constant. Works a pack at a time: 32 elements fill exactly
/// BITS words, so every element's word and shift inside a pack are constants (the loops
/// unroll into straight-line shifts and masks).
fn dequantize_groups<const BITS: usize>(
    packed_row: &[u32],
    scales_row: &[f32],
    biases_row: &[f32],
    group_size: usize,
    out: &mut [f32],
) {
    let mask = (1u64 << BITS) - 1;
    let packs_per_group = group_size / 32;
    let packs = packed_row.chunks_exact(BITS).zip(out.chunks_exact_mut(32));
    for (p, (words, out)) in packs.enumerate() {
        let g = p / packs_per_group;
        let (scale, bias) = (scales_row[g], biases_row[g]);
        // Word w with its successor above it, so no element straddles two reads.
        let mut windows = [0u64; BITS];
        for (w, window) in windows.iter_mut().enumerate() {
            let next = words.get(w + 1).map_or(0, |&v| (v as u64) << 32);
            *window = words[w] as u64 | next;
        }
        for (j, o) in out.iter_mut().enumerate() {
            let q = (windows[j * BITS / 32] >> (j * BITS % 32)) & mask;
            *o = scale * q as f32 + bias;
        }
    }
}
