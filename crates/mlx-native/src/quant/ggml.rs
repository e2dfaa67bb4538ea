//! ggml block types (as stored in GGUF files): sizes, ids, reference dequantization and
//! simple reference quantizers.
//!
//! Layouts (little-endian, f16 = IEEE half):
//! - Q4_0 (32 elements, 18 bytes): `d: f16, qs: [u8; 16]`; element = d·(q − 8). The low
//!   nibbles of `qs` are elements 0..16, the high nibbles elements 16..32.
//! - Q4_1 (32, 20): `d: f16, m: f16, qs: [u8; 16]`; element = d·q + m, nibbles as Q4_0.
//! - Q5_0 (32, 22): `d: f16, qh: [u8; 4], qs: [u8; 16]`; element = d·(q − 16) with q a nibble
//!   as Q4_0 plus bit j of the little-endian word `qh` above it (element j).
//! - Q5_1 (32, 24): `d: f16, m: f16, qh: [u8; 4], qs: [u8; 16]`; element = d·q + m, q as Q5_0.
//! - Q8_0 (32, 34): `d: f16, qs: [i8; 32]`; element = d·q.
//! - Q4_K (256, 144): `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`: eight
//!   sub-blocks of 32 with 6-bit scales `sc` and mins `m` packed in `scales`;
//!   element = d·sc·q − dmin·m. Each 32-byte run of `qs` holds two sub-blocks: low nibbles
//!   the first, high nibbles the second.
//! - Q5_K (256, 176): `d: f16, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]`: as
//!   Q4_K, with a fifth bit above each nibble: bit j of `qh[l]` for element l of sub-block j.
//! - Q6_K (256, 210): `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`: sixteen
//!   sub-blocks of 16 with signed 8-bit scales; element = d·scale·(q − 32) with q the 6-bit
//!   value made of a nibble of `ql` and two bits of `qh` (see `dequantize_q6_k`).

use half::{bf16, f16};

use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

impl GgmlType {
    /// Every supported type.
    pub const ALL: [GgmlType; 11] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];

    /// From the type id in a GGUF tensor-info record.
    pub fn from_id(id: u32) -> Result<GgmlType> {
        Ok(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            other => {
                return Err(Error::UnsupportedQuant(format!(
                    "ggml type id {other} (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)"
                )))
            }
        })
    }

    /// The type id GGUF files store (inverse of `from_id`).
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::BF16 => 30,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "f32",
            GgmlType::F16 => "f16",
            GgmlType::BF16 => "bf16",
            GgmlType::Q4_0 => "q4_0",
            GgmlType::Q4_1 => "q4_1",
            GgmlType::Q5_0 => "q5_0",
            GgmlType::Q5_1 => "q5_1",
            GgmlType::Q8_0 => "q8_0",
            GgmlType::Q4K => "q4_k",
            GgmlType::Q5K => "q5_k",
            GgmlType::Q6K => "q6_k",
        }
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
                32
            }
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4K => 144,
            GgmlType::Q5K => 176,
            GgmlType::Q6K => 210,
        }
    }

    /// Bytes of one row of `k` elements (`k` a multiple of the block size).
    pub fn row_bytes(self, k: usize) -> usize {
        k / self.block_size() * self.block_bytes()
    }
}

/// Sub-blocks of a Q4_K or Q5_K super-block, each of 32 elements.
const Q4K_SUB_BLOCKS: usize = 8;
/// Sub-blocks of a Q6_K super-block, each of 16 elements.
const Q6K_SUB_BLOCKS: usize = 16;

/// Checks that `bytes` holds exactly the blocks of a row of `elems` elements of type `t`.
fn check_row(t: GgmlType, bytes: usize, elems: usize) -> Result<()> {
    if !elems.is_multiple_of(t.block_size()) || bytes != t.row_bytes(elems) {
        return Err(Error::Invalid(format!(
            "{}: a row of {elems} elements needs a multiple of {} elements in {} bytes, got {bytes} bytes",
            t.name(),
            t.block_size(),
            t.row_bytes(elems)
        )));
    }
    Ok(())
}

/// The little-endian f16 at `b[at..at + 2]`, as f32.
#[inline]
pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K or Q5_K super-block's packed
/// `scales`: sub-blocks 0..4 keep theirs in the low 6 bits of bytes j and j+4; sub-blocks 4..8
/// in a nibble of byte j+4 plus the top 2 bits of bytes j−4 (scale) and j (min).
#[inline]
pub(crate) fn q4k_scale_min(scales: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    }
}

/// Dequantize one row: `bytes` holds `out.len() / block_size` blocks of type `t`.
pub fn dequantize_row(t: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    check_row(t, bytes.len(), out.len())?;
    let blocks = bytes.chunks_exact(t.block_bytes());
    let outs = out.chunks_exact_mut(t.block_size());
    match t {
        GgmlType::F32 => {
            for (b, o) in blocks.zip(outs) {
                o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (b, o) in blocks.zip(outs) {
                o[0] = f16_at(b, 0);
            }
        }
        GgmlType::BF16 => {
            for (b, o) in blocks.zip(outs) {
                o[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        GgmlType::Q4_0 => {
            for (b, o) in blocks.zip(outs) {
                let d = f16_at(b, 0);
                for (j, &q) in b[2..18].iter().enumerate() {
                    o[j] = d * ((q & 0xF) as i32 - 8) as f32;
                    o[j + 16] = d * ((q >> 4) as i32 - 8) as f32;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (b, o) in blocks.zip(outs) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                for (j, &q) in b[4..20].iter().enumerate() {
                    o[j] = d * (q & 0xF) as f32 + m;
                    o[j + 16] = d * (q >> 4) as f32 + m;
                }
            }
        }
        GgmlType::Q5_0 => {
            for (b, o) in blocks.zip(outs) {
                let d = f16_at(b, 0);
                for (j, q) in q5_codes(&b[2..22]).into_iter().enumerate() {
                    o[j] = d * (q as i32 - 16) as f32;
                }
            }
        }
        GgmlType::Q5_1 => {
            for (b, o) in blocks.zip(outs) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                for (j, q) in q5_codes(&b[4..24]).into_iter().enumerate() {
                    o[j] = d * q as f32 + m;
                }
            }
        }
        GgmlType::Q8_0 => {
            for (b, o) in blocks.zip(outs) {
                let d = f16_at(b, 0);
                for (o, &q) in o.iter_mut().zip(&b[2..34]) {
                    *o = d * (q as i8) as f32;
                }
            }
        }
        GgmlType::Q4K => {
            for (b, o) in blocks.zip(outs) {
                dequantize_q4_k(b, o);
            }
        }
        GgmlType::Q5K => {
            for (b, o) in blocks.zip(outs) {
                dequantize_q5_k(b, o);
            }
        }
        GgmlType::Q6K => {
            for (b, o) in blocks.zip(outs) {
                dequantize_q6_k(b, o);
            }
        }
    }
    Ok(())
}

/// The 32 5-bit codes of a Q5_0 / Q5_1 block from its `qh` and `qs` (20 bytes): element j
/// is the nibble of `qs` that Q4_0 gives it, plus bit j of the word `qh` as bit 4.
fn q5_codes(b: &[u8]) -> [u8; 32] {
    let qh = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let qs = &b[4..20];
    std::array::from_fn(|j| {
        let nibble = (qs[j % 16] >> (4 * (j / 16))) & 0xF;
        nibble | ((((qh >> j) & 1) as u8) << 4)
    })
}

/// One Q4_K super-block (144 bytes) into 256 values.
fn dequantize_q4_k(b: &[u8], out: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (pair, (q, o)) in qs
        .chunks_exact(32)
        .zip(out.chunks_exact_mut(64))
        .enumerate()
    {
        let (sc_lo, m_lo) = q4k_scale_min(scales, 2 * pair);
        let (sc_hi, m_hi) = q4k_scale_min(scales, 2 * pair + 1);
        let (d_lo, m_lo) = (d * sc_lo as f32, dmin * m_lo as f32);
        let (d_hi, m_hi) = (d * sc_hi as f32, dmin * m_hi as f32);
        for (l, &q) in q.iter().enumerate() {
            o[l] = d_lo * (q & 0xF) as f32 - m_lo;
            o[l + 32] = d_hi * (q >> 4) as f32 - m_hi;
        }
    }
}

/// One Q5_K super-block (176 bytes) into 256 values.
fn dequantize_q5_k(b: &[u8], out: &mut [f32]) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for (pair, (q, o)) in qs
        .chunks_exact(32)
        .zip(out.chunks_exact_mut(64))
        .enumerate()
    {
        let (lo, hi) = (2 * pair, 2 * pair + 1);
        let (sc_lo, m_lo) = q4k_scale_min(scales, lo);
        let (sc_hi, m_hi) = q4k_scale_min(scales, hi);
        let (d_lo, m_lo) = (d * sc_lo as f32, dmin * m_lo as f32);
        let (d_hi, m_hi) = (d * sc_hi as f32, dmin * m_hi as f32);
        for (l, (&q, &h)) in q.iter().zip(qh).enumerate() {
            let q_lo = (q & 0xF) | (((h >> lo) & 1) << 4);
            let q_hi = (q >> 4) | (((h >> hi) & 1) << 4);
            o[l] = d_lo * q_lo as f32 - m_lo;
            o[l + 32] = d_hi * q_hi as f32 - m_hi;
        }
    }
}

/// The 6-bit value (0..64) of element `e` (0..256) of a Q6_K super-block. Each half of 128
/// elements uses 64 bytes of `ql` and 32 of `qh`: element 32·g + l of the half (g = 0..4)
/// takes the low (g < 2) or high nibble of `ql[32·(g % 2) + l]` and bits 2g..2g+2 of `qh[l]`.
#[inline]
pub(crate) fn q6k_value(ql: &[u8], qh: &[u8], e: usize) -> u8 {
    let (half, r) = (e / 128, e % 128);
    let (g, l) = (r / 32, r % 32);
    let low = (ql[half * 64 + (g % 2) * 32 + l] >> (4 * (g / 2))) & 0xF;
    let high = (qh[half * 32 + l] >> (2 * g)) & 3;
    low | (high << 4)
}

/// One Q6_K super-block (210 bytes) into 256 values.
fn dequantize_q6_k(b: &[u8], out: &mut [f32]) {
    let (ql, qh, scales) = (&b[..128], &b[128..192], &b[192..208]);
    let d = f16_at(b, 208);
    for (e, o) in out.iter_mut().enumerate() {
        let scale = scales[e / 16] as i8 as f32;
        *o = d * scale * (q6k_value(ql, qh, e) as i32 - 32) as f32;
    }
}

/// Quantize one row with a simple round-to-nearest reference quantizer (for tests and
/// synthetic models; not ggml's error-minimising search). `x.len()` must be a multiple of
/// the block size.
pub fn quantize_row(t: GgmlType, x: &[f32]) -> Result<Vec<u8>> {
    if !x.len().is_multiple_of(t.block_size()) {
        return Err(Error::Invalid(format!(
            "{}: cannot quantize a row of {} elements (not a multiple of {})",
            t.name(),
            x.len(),
            t.block_size()
        )));
    }
    let mut out = Vec::with_capacity(t.row_bytes(x.len()));
    for block in x.chunks_exact(t.block_size()) {
        match t {
            GgmlType::F32 => out.extend_from_slice(&block[0].to_le_bytes()),
            GgmlType::F16 => out.extend_from_slice(&f16::from_f32(block[0]).to_le_bytes()),
            GgmlType::BF16 => out.extend_from_slice(&bf16::from_f32(block[0]).to_le_bytes()),
            GgmlType::Q4_0 => quantize_q4_0(block, &mut out),
            GgmlType::Q4_1 => quantize_q4_1(block, &mut out),
            GgmlType::Q5_0 => quantize_q5_0(block, &mut out),
            GgmlType::Q5_1 => quantize_q5_1(block, &mut out),
            GgmlType::Q8_0 => quantize_q8_0(block, &mut out),
            GgmlType::Q4K => quantize_q4_k(block, &mut out),
            GgmlType::Q5K => quantize_q5_k(block, &mut out),
            GgmlType::Q6K => quantize_q6_k(block, &mut out),
        }
    }
    Ok(out)
}

/// Stores `value` as f16 and returns the stored value as f32 (quantizers divide by it).
fn push_f16(out: &mut Vec<u8>, value: f32) -> f32 {
    let h = f16::from_f32(value);
    out.extend_from_slice(&h.to_le_bytes());
    h.to_f32()
}

fn inverse(d: f32) -> f32 {
    if d == 0.0 {
        0.0
    } else {
        1.0 / d
    }
}

/// Packs 32 4-bit codes the ggml way: byte j holds element j (low) and j + 16 (high).
fn push_nibbles(q: &[u8; 32], out: &mut Vec<u8>) {
    out.extend((0..16).map(|j| q[j] | (q[j + 16] << 4)));
}

/// The element of largest magnitude, with its sign.
fn signed_absmax(x: &[f32]) -> f32 {
    x.iter()
        .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m })
}

fn quantize_q4_0(x: &[f32], out: &mut Vec<u8>) {
    // The extreme value maps to −8, so the full signed range [−8, 7] is used.
    let d = push_f16(out, signed_absmax(x) / -8.0);
    let id = inverse(d);
    let q: [u8; 32] = std::array::from_fn(|j| ((x[j] * id).round() + 8.0).clamp(0.0, 15.0) as u8);
    push_nibbles(&q, out);
}

/// Packs 32 5-bit codes the ggml way: bit 4 of element j as bit j of the word `qh`, then the
/// low 4 bits as `push_nibbles`.
fn push_fives(q: &[u8; 32], out: &mut Vec<u8>) {
    let qh = (0..32).fold(0u32, |h, j| h | (((q[j] >> 4) as u32) << j));
    out.extend_from_slice(&qh.to_le_bytes());
    push_nibbles(&q.map(|v| v & 0xF), out);
}

/// The min and max of `x`.
fn min_max(x: &[f32]) -> (f32, f32) {
    let min = x.iter().copied().fold(f32::INFINITY, f32::min);
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    (min, max)
}

/// Pushes d = (max − min) / top and m = min, and returns the codes 0..=top of `x` against the
/// stored (rounded) d and m: the affine 32-element formats, Q4_1 and Q5_1.
fn affine_codes(x: &[f32], top: f32, out: &mut Vec<u8>) -> [u8; 32] {
    let (min, max) = min_max(x);
    let d = push_f16(out, (max - min) / top);
    let m = push_f16(out, min);
    let id = inverse(d);
    std::array::from_fn(|j| ((x[j] - m) * id).round().clamp(0.0, top) as u8)
}

fn quantize_q4_1(x: &[f32], out: &mut Vec<u8>) {
    let q = affine_codes(x, 15.0, out);
    push_nibbles(&q, out);
}

fn quantize_q5_0(x: &[f32], out: &mut Vec<u8>) {
    // As Q4_0: the extreme value maps to −16, the range is [−16, 15].
    let d = push_f16(out, signed_absmax(x) / -16.0);
    let id = inverse(d);
    let q: [u8; 32] = std::array::from_fn(|j| ((x[j] * id).round() + 16.0).clamp(0.0, 31.0) as u8);
    push_fives(&q, out);
}

fn quantize_q5_1(x: &[f32], out: &mut Vec<u8>) {
    let q = affine_codes(x, 31.0, out);
    push_fives(&q, out);
}

fn quantize_q8_0(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let id = inverse(push_f16(out, amax / 127.0));
    out.extend(
        x.iter()
            .map(|&v| (v * id).round().clamp(-127.0, 127.0) as i8 as u8),
    );
}

/// Pushes a Q4_K / Q5_K super-block's d, dmin and packed scales for `x` and returns its codes
/// 0..=top against the stored (rounded) scales and mins.
fn k_affine_codes(x: &[f32], top: f32, out: &mut Vec<u8>) -> [u8; 256] {
    // Per sub-block: an affine range [min, max] with min ≤ 0 (the format subtracts mins).
    let mut scales = [0.0f32; Q4K_SUB_BLOCKS];
    let mut mins = [0.0f32; Q4K_SUB_BLOCKS];
    for (j, sub) in x.chunks_exact(32).enumerate() {
        let min = sub.iter().copied().fold(0.0f32, f32::min);
        let max = sub.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        scales[j] = (max - min) / top;
        mins[j] = -min;
    }
    let d = push_f16(out, scales.iter().copied().fold(0.0, f32::max) / 63.0);
    let dmin = push_f16(out, mins.iter().copied().fold(0.0, f32::max) / 63.0);
    let six_bits = |v: f32, unit: f32| (v * inverse(unit)).round().clamp(0.0, 63.0) as u8;
    let sc: [u8; Q4K_SUB_BLOCKS] = std::array::from_fn(|j| six_bits(scales[j], d));
    let m: [u8; Q4K_SUB_BLOCKS] = std::array::from_fn(|j| six_bits(mins[j], dmin));
    let mut packed = [0u8; 12];
    for j in 0..Q4K_SUB_BLOCKS {
        if j < 4 {
            packed[j] |= sc[j];
            packed[j + 4] |= m[j];
        } else {
            packed[j + 4] = (sc[j] & 0xF) | ((m[j] & 0xF) << 4);
            packed[j - 4] |= (sc[j] >> 4) << 6;
            packed[j] |= (m[j] >> 4) << 6;
        }
    }
    out.extend_from_slice(&packed);
    std::array::from_fn(|e| {
        let j = e / 32;
        let id = inverse(d * sc[j] as f32);
        ((x[e] + dmin * m[j] as f32) * id).round().clamp(0.0, top) as u8
    })
}

/// Packs a K-quant super-block's low 4 bits of its codes: each 32-byte run holds two
/// sub-blocks, the first in the low nibbles.
fn push_k_nibbles(codes: &[u8; 256], out: &mut Vec<u8>) {
    for pair in codes.chunks_exact(64) {
        out.extend((0..32).map(|l| (pair[l] & 0xF) | ((pair[l + 32] & 0xF) << 4)));
    }
}

fn quantize_q4_k(x: &[f32], out: &mut Vec<u8>) {
    let codes = k_affine_codes(x, 15.0, out);
    push_k_nibbles(&codes, out);
}

fn quantize_q5_k(x: &[f32], out: &mut Vec<u8>) {
    let codes = k_affine_codes(x, 31.0, out);
    // Bit 4 of element l of sub-block j as bit j of qh[l].
    let qh: [u8; 32] = std::array::from_fn(|l| {
        (0..Q4K_SUB_BLOCKS).fold(0u8, |h, j| h | ((codes[32 * j + l] >> 4) << j))
    });
    out.extend_from_slice(&qh);
    push_k_nibbles(&codes, out);
}

fn quantize_q6_k(x: &[f32], out: &mut Vec<u8>) {
    let scales: [f32; Q6K_SUB_BLOCKS] =
        std::array::from_fn(|j| signed_absmax(&x[16 * j..16 * j + 16]) / -32.0);
    let amax = scales.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = f16::from_f32(amax / 127.0).to_f32();
    let sc: [i8; Q6K_SUB_BLOCKS] =
        std::array::from_fn(|j| (scales[j] * inverse(d)).round().clamp(-127.0, 127.0) as i8);
    let codes: [u8; 256] = std::array::from_fn(|e| {
        let id = inverse(d * sc[e / 16] as f32);
        ((x[e] * id).round().clamp(-32.0, 31.0) + 32.0) as u8
    });
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for (e, &q) in codes.iter().enumerate() {
        let (half, r) = (e / 128, e % 128);
        let (g, l) = (r / 32, r % 32);
        ql[half * 64 + (g % 2) * 32 + l] |= (q & 0xF) << (4 * (g / 2));
        qh[half * 32 + l] |= (q >> 4) << (2 * g);
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(sc.iter().map(|&s| s as u8));
    push_f16(out, d);
}
