//! Matrix products and embedding lookups over GGUF (ggml block) weights.
//!
//! Quantized weights (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K): each row of x is first quantized to
//! 8 bits per block of 32 (scale d = max|x|/127, plus s = d·Σq for the formats' offset
//! terms), as ggml does with its Q8_0/Q8_1 activations; every output is then a sum over
//! blocks of integer dot products scaled by the weight's and x's block scales, without
//! materialising dequantized weights. Rounding x costs accuracy, as on ggml's CPU path:
//! each x element moves by up to 1/254 of its block's largest magnitude, so results differ
//! from the f32 product with the dequantized weights by up to about 0.5% of the outputs'
//! magnitude on random data (less on real activations, whose products partly cancel the
//! rounding errors). Float weights (F32, F16, BF16) use x as is.
//!
//! Work is split over rayon threads by chunks of weight rows; for several rows of x
//! (prefill) each weight row is decoded once per group of up to four x rows. On x86-64 the
//! kernels use AVX2 (plus AVX-512 VNNI where present), picked at run time; the 32-element
//! formats go eight blocks at a time so that the per-block scale arithmetic runs on
//! vectors. The portable scalar kernels compute the same sums and are the reference the
//! SIMD ones are tested against.

use std::sync::OnceLock;

use rayon::prelude::*;

use crate::quant::ggml::{f16_at, q4k_scale_min, q6k_value, GgmlType};
use crate::{Error, Result};

/// Elements per block of quantized x (and per block of every 32-element weight format).
const QK: usize = 32;
/// Multiply-adds below which a matrix product is not worth splitting across threads.
const MIN_TASK_WORK: usize = 1 << 16;

/// out `[m, n]` = x `[m, k]` · Wᵀ, with W `n` rows of `k` elements in ggml type `t`
/// (`w` holds the rows' blocks back to back, as in a GGUF file; `k` a multiple of the block
/// size). Quantized types round x to 8 bits first (see the module doc).
pub(super) fn matmul_gguf(
    t: GgmlType,
    x: &[f32],
    w: &[u8],
    n: usize,
    k: usize,
    out: &mut [f32],
) -> Result<()> {
    let mismatch = || {
        Error::op(
            "matmul",
            format!(
                "{} weight of {} bytes for n = {n}, k = {k}; x of {} and out of {} elements",
                t.name(),
                w.len(),
                x.len(),
                out.len()
            ),
        )
    };
    if k == 0 {
        // An empty sum per output; x must be empty too.
        if !x.is_empty() || !w.is_empty() {
            return Err(mismatch());
        }
        out.fill(0.0);
        return Ok(());
    }
    let (m, row_bytes) = (x.len() / k, t.row_bytes(k));
    if !k.is_multiple_of(t.block_size())
        || !x.len().is_multiple_of(k)
        || n.checked_mul(row_bytes) != Some(w.len())
        || m.checked_mul(n) != Some(out.len())
    {
        return Err(mismatch());
    }
    let isa = Isa::detected();
    let x = Activations::new(t, x, k, m, isa);
    let rows_per_task = rows_per_task(n, m, k);
    let tile = |w: &[u8], out_t: &mut [f32]| x.tile(isa, t, w, row_bytes, out_t);
    if m == 1 {
        // One x row: `out` is already in weight-row order.
        for_each_task(out, w, rows_per_task, rows_per_task * row_bytes, &tile);
        return Ok(());
    }
    // Tiles write weight-row-major results [n, m]; transpose into out [m, n].
    let mut out_t = vec![0f32; n * m];
    for_each_task(
        &mut out_t,
        w,
        rows_per_task * m,
        rows_per_task * row_bytes,
        &tile,
    );
    out.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        for (j, o) in row.iter_mut().enumerate() {
            *o = out_t[j * m + i];
        }
    });
    Ok(())
}

/// Runs `tile(weights, outputs)` over matching chunks of `out` and `w`, in parallel when
/// there is more than one chunk.
fn for_each_task(
    out: &mut [f32],
    w: &[u8],
    out_chunk: usize,
    w_chunk: usize,
    tile: &(impl Fn(&[u8], &mut [f32]) + Sync),
) {
    if out.len() <= out_chunk {
        tile(w, out);
    } else {
        out.par_chunks_mut(out_chunk)
            .zip(w.par_chunks(w_chunk))
            .for_each(|(o, w)| tile(w, o));
    }
}

/// Weight rows per parallel task: a few tasks per thread for balance, none smaller than
/// `MIN_TASK_WORK` multiply-adds.
fn rows_per_task(n: usize, m: usize, k: usize) -> usize {
    let work = n.saturating_mul(m).saturating_mul(k);
    let tasks = (rayon::current_num_threads() * 4)
        .min(work / MIN_TASK_WORK)
        .max(1);
    n.div_ceil(tasks).max(1)
}

/// The instruction set the kernels run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX2 kernels with AVX-512 VNNI's u8·i8 dot instruction (256-bit forms).
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
}

impl Isa {
    fn detected() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| Isa::available().last().copied().unwrap_or(Isa::Portable))
    }

    /// Every instruction set this machine runs, fastest last.
    fn available() -> Vec<Isa> {
        #[allow(unused_mut)]
        let mut isas = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            isas.push(Isa::Avx2);
            if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl") {
                isas.push(Isa::Avx512Vnni);
            }
        }
        isas
    }
}

/// The x side of a product: as is for float weights, quantized for block weights.
enum Activations<'a> {
    Float { x: &'a [f32], k: usize },
    Quantized(QuantizedRows),
}

impl<'a> Activations<'a> {
    fn new(t: GgmlType, x: &'a [f32], k: usize, m: usize, isa: Isa) -> Self {
        match t {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => Activations::Float { x, k },
            _ => Activations::Quantized(QuantizedRows::new(x, k, m, isa)),
        }
    }

    /// out_t `[rows, m]` = the weight rows in `w` (`row_bytes` each) times every x row.
    fn tile(&self, isa: Isa, t: GgmlType, w: &[u8], row_bytes: usize, out_t: &mut [f32]) {
        match (self, isa) {
            (Activations::Float { x, k }, Isa::Portable) => {
                portable::float_tile(t, w, row_bytes, x, *k, out_t)
            }
            (Activations::Quantized(x), Isa::Portable) => {
                portable::quantized_tile(t, w, row_bytes, x, out_t)
            }
            // SAFETY: `isa` comes from `Isa::available`, so the CPU has the features; the
            // lengths were checked by `matmul_gguf`.
            #[cfg(target_arch = "x86_64")]
            (Activations::Float { x, k }, Isa::Avx2 | Isa::Avx512Vnni) => unsafe {
                x86::float_tile(t, w, row_bytes, x, *k, out_t)
            },
            #[cfg(target_arch = "x86_64")]
            (Activations::Quantized(x), Isa::Avx2) => unsafe {
                x86::quantized_tile_avx2(t, w, row_bytes, x, out_t)
            },
            #[cfg(target_arch = "x86_64")]
            (Activations::Quantized(x), Isa::Avx512Vnni) => unsafe {
                x86::quantized_tile_vnni(t, w, row_bytes, x, out_t)
            },
        }
    }
}

/// Rows of x quantized to 8 bits per block of 32: block b of row i is
/// `qs[i·k + 32b ..][..32]` times `d[i·k/32 + b]`, and `s` holds d·Σq of each block.
struct QuantizedRows {
    k: usize,
    m: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

/// One row of `QuantizedRows`.
#[derive(Clone, Copy)]
struct QuantizedRow<'a> {
    qs: &'a [i8],
    d: &'a [f32],
    s: &'a [f32],
}

impl QuantizedRows {
    /// `k` must be a multiple of 32 (every quantized weight type's block size is).
    fn new(x: &[f32], k: usize, m: usize, isa: Isa) -> QuantizedRows {
        let blocks = k / QK;
        let mut rows = QuantizedRows {
            k,
            m,
            qs: vec![0; m * k],
            d: vec![0.0; m * blocks],
            s: vec![0.0; m * blocks],
        };
        if m == 1 {
            quantize_row(isa, x, &mut rows.qs, &mut rows.d, &mut rows.s);
        } else {
            x.par_chunks(k)
                .zip(rows.qs.par_chunks_mut(k))
                .zip(rows.d.par_chunks_mut(blocks))
                .zip(rows.s.par_chunks_mut(blocks))
                .for_each(|(((x, qs), d), s)| quantize_row(isa, x, qs, d, s));
        }
        rows
    }

    fn row(&self, i: usize) -> QuantizedRow<'_> {
        let b = self.k / QK;
        QuantizedRow {
            qs: &self.qs[i * self.k..(i + 1) * self.k],
            d: &self.d[i * b..(i + 1) * b],
            s: &self.s[i * b..(i + 1) * b],
        }
    }
}

/// Quantizes one row of x into blocks: codes `qs`, scales `d` and d·Σq sums `s`.
fn quantize_row(isa: Isa, x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    let blocks = x.chunks_exact(QK).zip(qs.chunks_exact_mut(QK));
    for (((x, qs), d), s) in blocks.zip(d.iter_mut()).zip(s.iter_mut()) {
        let (scale, sum) = match isa {
            // SAFETY: the variant exists only where AVX2 was detected.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::Avx512Vnni => unsafe { x86::quantize_block(x, qs) },
            Isa::Portable => quantize_block(x, qs),
        };
        *d = scale;
        *s = scale * sum as f32;
    }
}

/// Quantizes 32 values to i8 with scale max|x|/127; returns (scale, Σq).
#[inline(always)]
fn quantize_block(x: &[f32], qs: &mut [i8]) -> (f32, i32) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0;
    for (q, &v) in qs.iter_mut().zip(x) {
        *q = (v * id).round_ties_even() as i8;
        sum += *q as i32;
    }
    (d, sum)
}

/// Scalar kernels: the reference for the SIMD ones (same integer sums).
mod portable {
    use super::*;

    pub(super) fn float_tile(
        t: GgmlType,
        w: &[u8],
        row_bytes: usize,
        x: &[f32],
        k: usize,
        out_t: &mut [f32],
    ) {
        let m = x.len() / k;
        let decode: fn(&[u8]) -> f32 = match t {
            GgmlType::F32 => |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            GgmlType::F16 => |b| half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
            _ => |b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        };
        let elem = t.block_bytes();
        for (wrow, out) in w.chunks_exact(row_bytes).zip(out_t.chunks_exact_mut(m)) {
            for (o, xrow) in out.iter_mut().zip(x.chunks_exact(k)) {
                *o = wrow
                    .chunks_exact(elem)
                    .zip(xrow)
                    .map(|(b, &x)| decode(b) * x)
                    .sum();
            }
        }
    }

    pub(super) fn quantized_tile(
        t: GgmlType,
        w: &[u8],
        row_bytes: usize,
        x: &QuantizedRows,
        out_t: &mut [f32],
    ) {
        let dot: fn(&[u8], QuantizedRow) -> f32 = match t {
            GgmlType::Q4_0 => dot_q4_0,
            GgmlType::Q4_1 => dot_q4_1,
            GgmlType::Q8_0 => dot_q8_0,
            GgmlType::Q4K => dot_q4_k,
            _ => dot_q6_k,
        };
        for (wrow, out) in w.chunks_exact(row_bytes).zip(out_t.chunks_exact_mut(x.m)) {
            for (i, o) in out.iter_mut().enumerate() {
                *o = dot(wrow, x.row(i));
            }
        }
    }

    /// Σ over a 32-element block of (4-bit code) · x, codes packed as in Q4_0/Q4_1.
    fn nibble_dot(qs: &[u8], x: &[i8]) -> i32 {
        qs.iter()
            .enumerate()
            .map(|(j, &q)| (q & 0xF) as i32 * x[j] as i32 + (q >> 4) as i32 * x[j + 16] as i32)
            .sum()
    }

    fn dot_q4_0(w: &[u8], x: QuantizedRow) -> f32 {
        // d·Σ(q − 8)·xd·xq = d·(xd·Σq·xq − 8·s)
        w.chunks_exact(18)
            .enumerate()
            .map(|(b, blk)| {
                let isum = nibble_dot(&blk[2..], &x.qs[b * QK..]);
                f16_at(blk, 0) * (x.d[b] * isum as f32 - 8.0 * x.s[b])
            })
            .sum()
    }

    fn dot_q4_1(w: &[u8], x: QuantizedRow) -> f32 {
        // Σ(d·q + m)·xd·xq = d·xd·Σq·xq + m·s
        w.chunks_exact(20)
            .enumerate()
            .map(|(b, blk)| {
                let isum = nibble_dot(&blk[4..], &x.qs[b * QK..]);
                f16_at(blk, 0) * x.d[b] * isum as f32 + f16_at(blk, 2) * x.s[b]
            })
            .sum()
    }

    fn dot_q8_0(w: &[u8], x: QuantizedRow) -> f32 {
        w.chunks_exact(34)
            .enumerate()
            .map(|(b, blk)| {
                let isum: i32 = blk[2..]
                    .iter()
                    .zip(&x.qs[b * QK..(b + 1) * QK])
                    .map(|(&q, &x)| q as i8 as i32 * x as i32)
                    .sum();
                f16_at(blk, 0) * x.d[b] * isum as f32
            })
            .sum()
    }

    fn dot_q4_k(w: &[u8], x: QuantizedRow) -> f32 {
        let mut sum = 0.0;
        for (sb, blk) in w.chunks_exact(144).enumerate() {
            let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
            let (scales, qs) = (&blk[4..16], &blk[16..]);
            for j in 0..8 {
                let (sc, mn) = q4k_scale_min(scales, j);
                let xb = sb * 8 + j;
                let shift = 4 * (j % 2);
                let codes = &qs[32 * (j / 2)..32 * (j / 2) + 32];
                let isum: i32 = codes
                    .iter()
                    .zip(&x.qs[xb * QK..(xb + 1) * QK])
                    .map(|(&q, &x)| ((q >> shift) & 0xF) as i32 * x as i32)
                    .sum();
                sum += d * sc as f32 * x.d[xb] * isum as f32 - dmin * mn as f32 * x.s[xb];
            }
        }
        sum
    }

    fn dot_q6_k(w: &[u8], x: QuantizedRow) -> f32 {
        let mut sum = 0.0;
        for (sb, blk) in w.chunks_exact(210).enumerate() {
            let (ql, qh, scales) = (&blk[..128], &blk[128..192], &blk[192..208]);
            let d = f16_at(blk, 208);
            for g in 0..8 {
                let xb = sb * 8 + g;
                let mut isum = 0;
                for half in 0..2 {
                    let part: i32 = (0..16)
                        .map(|l| {
                            let e = 32 * g + 16 * half + l;
                            (q6k_value(ql, qh, e) as i32 - 32)
                                * x.qs[xb * QK + 16 * half + l] as i32
                        })
                        .sum();
                    isum += scales[2 * g + half] as i8 as i32 * part;
                }
                sum += d * x.d[xb] * isum as f32;
            }
        }
        sum
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! AVX2 kernels. Every `#[inline(always)]` helper is flattened into one of the
    //! `#[target_feature]` entry points, where the intrinsics then inline.

    // Accumulators, x rows and results are parallel arrays indexed by x row.
    #![allow(clippy::needless_range_loop)]

    use std::arch::x86_64::*;
    use std::ptr::read_unaligned;

    use super::{QuantizedRow, QuantizedRows, QK};
    use crate::quant::GgmlType;

    /// Σ of u8·i8 products over each group of four bytes, into eight i32 lanes.
    trait I8Dot {
        /// Whether `u` may hold any u8 (VNNI sums in i32, where `maddubs` saturates its
        /// i16 pairs above 128·127·2).
        const ANY_U8: bool;
        unsafe fn dot(u: __m256i, s: __m256i) -> __m256i;
    }

    struct MaddUbs;
    impl I8Dot for MaddUbs {
        const ANY_U8: bool = false;

        /// Pairs into i16 (no saturation: |u| ≤ 128 and |s| ≤ 127 here), then pairs of those.
        #[inline(always)]
        unsafe fn dot(u: __m256i, s: __m256i) -> __m256i {
            _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
        }
    }

    struct Vnni;
    impl I8Dot for Vnni {
        const ANY_U8: bool = true;
        #[inline(always)]
        unsafe fn dot(u: __m256i, s: __m256i) -> __m256i {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
        }
    }

    /// Iterates `$b` over `$first..$nb`. With one x row, alternate blocks go to accumulator
    /// sets 0 and 1 (`$set`) so that two chains of FMAs hide each other's latency.
    macro_rules! for_each_block {
        ($rows:expr, $first:expr, $nb:expr, $b:ident, $set:ident, $body:block) => {{
            let nb = $nb;
            let mut $b = $first;
            if $rows == 1 {
                while $b + 2 <= nb {
                    {
                        let $set = 0;
                        $body
                    }
                    $b += 1;
                    {
                        let $set = 1;
                        $body
                    }
                    $b += 1;
                }
            }
            while $b < nb {
                {
                    let $set = 0;
                    $body
                }
                $b += 1;
            }
        }};
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantized_tile_avx2(
        t: GgmlType,
        w: &[u8],
        row_bytes: usize,
        x: &QuantizedRows,
        out_t: &mut [f32],
    ) {
        quantized_tile::<MaddUbs>(t, w, row_bytes, x, out_t)
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    pub(super) unsafe fn quantized_tile_vnni(
        t: GgmlType,
        w: &[u8],
        row_bytes: usize,
        x: &QuantizedRows,
        out_t: &mut [f32],
    ) {
        quantized_tile::<Vnni>(t, w, row_bytes, x, out_t)
    }

    #[inline(always)]
    unsafe fn quantized_tile<D: I8Dot>(
        t: GgmlType,
        w: &[u8],
        row_bytes: usize,
        x: &QuantizedRows,
        out_t: &mut [f32],
    ) {
        for (wrow, out) in w.chunks_exact(row_bytes).zip(out_t.chunks_exact_mut(x.m)) {
            let mut i = 0;
            while i + 4 <= x.m {
                rows::<D, 4>(t, wrow, x, i, &mut out[i..i + 4]);
                i += 4;
            }
            match x.m - i {
                3 => rows::<D, 3>(t, wrow, x, i, &mut out[i..]),
                2 => rows::<D, 2>(t, wrow, x, i, &mut out[i..]),
                1 => rows::<D, 1>(t, wrow, x, i, &mut out[i..]),
                _ => {}
            }
        }
    }

    /// One weight row times x rows `i0..i0 + R`.
    #[inline(always)]
    unsafe fn rows<D: I8Dot, const R: usize>(
        t: GgmlType,
        wrow: &[u8],
        x: &QuantizedRows,
        i0: usize,
        out: &mut [f32],
    ) {
        let mut xs = [x.row(i0); R];
        for (r, xr) in xs.iter_mut().enumerate() {
            *xr = x.row(i0 + r);
        }
        let sums = match t {
            GgmlType::Q4_0 => dot_q4_0::<D, R>(wrow, &xs),
            GgmlType::Q4_1 => dot_q4_1::<D, R>(wrow, &xs),
            GgmlType::Q8_0 => dot_q8_0::<D, R>(wrow, &xs),
            GgmlType::Q4K => dot_q4_k::<D, R>(wrow, &xs),
            _ => dot_q6_k::<R>(wrow, &xs),
        };
        out[..R].copy_from_slice(&sums);
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// Lane 1 of `v`.
    #[inline(always)]
    unsafe fn lane1(v: __m128) -> f32 {
        _mm_cvtss_f32(_mm_movehdup_ps(v))
    }

    /// The f16 at `p`, as f32 in every lane.
    #[inline(always)]
    unsafe fn f16_splat(p: *const u8) -> __m128 {
        _mm_cvtph_ps(_mm_set1_epi16(read_unaligned(p as *const i16)))
    }

    /// The f16 at `p`, as f32 in lane 0 (a zero-extending load: no false dependency on
    /// the register's previous value, which would chain all blocks together).
    #[inline(always)]
    unsafe fn f16_lane0(p: *const u8) -> __m128 {
        _mm_cvtph_ps(_mm_cvtsi32_si128(read_unaligned(p as *const u16) as i32))
    }

    /// The two f16 at `p`, as f32 in lanes 0 and 1.
    #[inline(always)]
    unsafe fn f16_pair(p: *const u8) -> __m128 {
        _mm_cvtph_ps(_mm_cvtsi32_si128(read_unaligned(p as *const i32)))
    }

    /// 32 4-bit codes from 16 bytes: low nibbles then high nibbles (ggml element order).
    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        // The 16 bytes in both halves (a load-port broadcast), the upper half shifted by 4.
        let both = _mm256_broadcastsi128_si256(_mm_loadu_si128(p as *const __m128i));
        let shifted = _mm256_srlv_epi64(both, _mm256_setr_epi64x(0, 0, 4, 4));
        _mm256_and_si256(shifted, _mm256_set1_epi8(0x0F))
    }

    /// Block `b`'s 32 quantized x values.
    #[inline(always)]
    unsafe fn x_block(x: &QuantizedRow, b: usize) -> __m256i {
        _mm256_loadu_si256(x.qs.as_ptr().add(b * QK) as *const __m256i)
    }

    /// [d, s, 0, 0] of x block `b`.
    #[inline(always)]
    unsafe fn x_scales(x: &QuantizedRow, b: usize) -> __m128 {
        _mm_unpacklo_ps(
            _mm_load_ss(x.d.as_ptr().add(b)),
            _mm_load_ss(x.s.as_ptr().add(b)),
        )
    }

    /// Lane i = the sum of the eight i32 lanes of `v[i]`; with `high_times_16`, lanes 4..8
    /// of every `v[i]` hold 16× their value (see `q4_codes`) and are divided back exactly.
    #[inline(always)]
    unsafe fn sum_lanes(v: &[__m256i; 8], high_times_16: bool) -> __m256i {
        let a = _mm256_hadd_epi32(v[0], v[1]);
        let b = _mm256_hadd_epi32(v[2], v[3]);
        let c = _mm256_hadd_epi32(v[4], v[5]);
        let d = _mm256_hadd_epi32(v[6], v[7]);
        // 128-bit halves now hold partial sums of lanes 0..4 and 4..8, in order.
        let ab = _mm256_hadd_epi32(a, b);
        let cd = _mm256_hadd_epi32(c, d);
        let low = _mm256_permute2x128_si256(ab, cd, 0x20);
        let high = _mm256_permute2x128_si256(ab, cd, 0x31);
        let high = if high_times_16 {
            _mm256_srai_epi32(high, 4)
        } else {
            high
        };
        _mm256_add_epi32(low, high)
    }

    /// A Q4 block's 32 codes (16 bytes at `p`) for batched sums: with VNNI, the high
    /// nibbles stay in place (16× their value, which `sum_lanes` undoes once per eight
    /// blocks) instead of being shifted down one block at a time.
    #[inline(always)]
    unsafe fn q4_codes<D: I8Dot>(p: *const u8) -> __m256i {
        if D::ANY_U8 {
            let both = _mm256_broadcastsi128_si256(_mm_loadu_si128(p as *const __m128i));
            let masks = _mm256_setr_m128i(_mm_set1_epi8(0x0F), _mm_set1_epi8(0xF0u8 as i8));
            _mm256_and_si256(both, masks)
        } else {
            nibbles(p)
        }
    }

    /// The u32 words at `p + i·STRIDE` for i in 0..8.
    #[inline(always)]
    unsafe fn gather8<const STRIDE: i32>(p: *const u8) -> __m256i {
        let offsets = _mm256_setr_epi32(
            0,
            STRIDE,
            2 * STRIDE,
            3 * STRIDE,
            4 * STRIDE,
            5 * STRIDE,
            6 * STRIDE,
            7 * STRIDE,
        );
        _mm256_i32gather_epi32::<1>(p as *const i32, offsets)
    }

    /// The low and high f16 halves of eight u32 words, as f32 lanes.
    #[inline(always)]
    unsafe fn f16_halves(words: __m256i) -> (__m256, __m256) {
        let low = _mm256_and_si256(words, _mm256_set1_epi32(0xFFFF));
        let high = _mm256_srli_epi32(words, 16);
        // [l0..l3 h0..h3 | l4..l7 h4..h7] → [l0..l7 | h0..h7]
        let packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(low, high), 0b11_01_10_00);
        (
            _mm256_cvtph_ps(_mm256_castsi256_si128(packed)),
            _mm256_cvtph_ps(_mm256_extracti128_si256(packed, 1)),
        )
    }

    /// Lanes `8c..8c + 8` of a per-block x array (`d` or `s`).
    #[inline(always)]
    unsafe fn x_lanes(v: &[f32], c: usize) -> __m256 {
        _mm256_loadu_ps(v.as_ptr().add(8 * c))
    }

    /// The 32-element formats run eight blocks at a time: each x row's eight integer dots
    /// are reduced to one lane per block so that the blocks' scales apply as vectors, and
    /// the weights are decoded once for all rows. These return the sums and the number of
    /// blocks done (a multiple of 8); the `dot_*` functions finish the rest block by block.
    #[inline(always)]
    unsafe fn q4_1_batched<D: I8Dot, const R: usize>(
        w: &[u8],
        xs: &[QuantizedRow; R],
    ) -> ([f32; R], usize) {
        let batches = w.len() / 20 / 8;
        let mut acc = [_mm256_setzero_ps(); R];
        for c in 0..batches {
            let p = w.as_ptr().add(c * 160);
            let mut q = [_mm256_setzero_si256(); 8];
            for (i, q) in q.iter_mut().enumerate() {
                *q = q4_codes::<D>(p.add(20 * i + 4));
            }
            let (d, m) = f16_halves(gather8::<20>(p));
            for r in 0..R {
                let mut dots = [_mm256_setzero_si256(); 8];
                for i in 0..8 {
                    dots[i] = D::dot(q[i], x_block(&xs[r], 8 * c + i));
                }
                let sums = _mm256_cvtepi32_ps(sum_lanes(&dots, D::ANY_U8));
                let scales = _mm256_mul_ps(d, x_lanes(xs[r].d, c));
                acc[r] = _mm256_fmadd_ps(scales, sums, acc[r]);
                acc[r] = _mm256_fmadd_ps(m, x_lanes(xs[r].s, c), acc[r]);
            }
        }
        let mut out = [0.0; R];
        for r in 0..R {
            out[r] = hsum(acc[r]);
        }
        (out, 8 * batches)
    }

    #[inline(always)]
    unsafe fn q4_0_batched<D: I8Dot, const R: usize>(
        w: &[u8],
        xs: &[QuantizedRow; R],
    ) -> ([f32; R], usize) {
        let batches = w.len() / 18 / 8;
        let mut acc = [_mm256_setzero_ps(); R];
        for c in 0..batches {
            let p = w.as_ptr().add(c * 144);
            let mut q = [_mm256_setzero_si256(); 8];
            for (i, q) in q.iter_mut().enumerate() {
                *q = q4_codes::<D>(p.add(18 * i + 2));
            }
            let (d, _) = f16_halves(gather8::<18>(p));
            for r in 0..R {
                let mut dots = [_mm256_setzero_si256(); 8];
                for i in 0..8 {
                    dots[i] = D::dot(q[i], x_block(&xs[r], 8 * c + i));
                }
                let sums = _mm256_cvtepi32_ps(sum_lanes(&dots, D::ANY_U8));
                // d·(xd·Σq·xq − 8·s)
                let blocks = _mm256_fnmadd_ps(
                    _mm256_set1_ps(8.0),
                    x_lanes(xs[r].s, c),
                    _mm256_mul_ps(x_lanes(xs[r].d, c), sums),
                );
                acc[r] = _mm256_fmadd_ps(d, blocks, acc[r]);
            }
        }
        let mut out = [0.0; R];
        for r in 0..R {
            out[r] = hsum(acc[r]);
        }
        (out, 8 * batches)
    }

    #[inline(always)]
    unsafe fn q8_0_batched<D: I8Dot, const R: usize>(
        w: &[u8],
        xs: &[QuantizedRow; R],
    ) -> ([f32; R], usize) {
        let batches = w.len() / 34 / 8;
        let mut acc = [_mm256_setzero_ps(); R];
        for c in 0..batches {
            let p = w.as_ptr().add(c * 272);
            let codes = |i: usize| _mm256_loadu_si256(p.add(34 * i + 2) as *const __m256i);
            let mut q_abs = [_mm256_setzero_si256(); 8];
            for (i, q_abs) in q_abs.iter_mut().enumerate() {
                *q_abs = _mm256_sign_epi8(codes(i), codes(i));
            }
            let (d, _) = f16_halves(gather8::<34>(p));
            for r in 0..R {
                let mut dots = [_mm256_setzero_si256(); 8];
                for i in 0..8 {
                    // Signed·signed as |q|·(x with q's sign) (x is never −128).
                    let x_signed = _mm256_sign_epi8(x_block(&xs[r], 8 * c + i), codes(i));
                    dots[i] = D::dot(q_abs[i], x_signed);
                }
                let sums = _mm256_cvtepi32_ps(sum_lanes(&dots, false));
                let scales = _mm256_mul_ps(d, x_lanes(xs[r].d, c));
                acc[r] = _mm256_fmadd_ps(scales, sums, acc[r]);
            }
        }
        let mut out = [0.0; R];
        for r in 0..R {
            out[r] = hsum(acc[r]);
        }
        (out, 8 * batches)
    }

    #[inline(always)]
    unsafe fn dot_q4_0<D: I8Dot, const R: usize>(w: &[u8], xs: &[QuantizedRow; R]) -> [f32; R] {
        let (mut out, first) = q4_0_batched::<D, R>(w, xs);
        let mut acc = [[_mm256_setzero_ps(); R]; 2];
        // Lane 1 sums d·s for the −8 offset.
        let mut offset = [[_mm_setzero_ps(); R]; 2];
        for_each_block!(R, first, w.len() / 18, b, set, {
            let p = w.as_ptr().add(b * 18);
            let d = f16_splat(p);
            let q = nibbles(p.add(2));
            for r in 0..R {
                let scales = _mm_mul_ps(d, x_scales(&xs[r], b));
                let dot = _mm256_cvtepi32_ps(D::dot(q, x_block(&xs[r], b)));
                acc[set][r] = _mm256_fmadd_ps(_mm256_broadcastss_ps(scales), dot, acc[set][r]);
                offset[set][r] = _mm_add_ps(offset[set][r], scales);
            }
        });
        for r in 0..R {
            out[r] += hsum(_mm256_add_ps(acc[0][r], acc[1][r]))
                - 8.0 * lane1(_mm_add_ps(offset[0][r], offset[1][r]));
        }
        out
    }

    #[inline(always)]
    unsafe fn dot_q4_1<D: I8Dot, const R: usize>(w: &[u8], xs: &[QuantizedRow; R]) -> [f32; R] {
        let (mut out, first) = q4_1_batched::<D, R>(w, xs);
        let mut acc = [[_mm256_setzero_ps(); R]; 2];
        // Lane 1 sums m·s.
        let mut offset = [[_mm_setzero_ps(); R]; 2];
        for_each_block!(R, first, w.len() / 20, b, set, {
            let p = w.as_ptr().add(b * 20);
            let dm = f16_pair(p);
            let q = nibbles(p.add(4));
            for r in 0..R {
                let scales = _mm_mul_ps(dm, x_scales(&xs[r], b));
                let dot = _mm256_cvtepi32_ps(D::dot(q, x_block(&xs[r], b)));
                acc[set][r] = _mm256_fmadd_ps(_mm256_broadcastss_ps(scales), dot, acc[set][r]);
                offset[set][r] = _mm_add_ps(offset[set][r], scales);
            }
        });
        for r in 0..R {
            out[r] += hsum(_mm256_add_ps(acc[0][r], acc[1][r]))
                + lane1(_mm_add_ps(offset[0][r], offset[1][r]));
        }
        out
    }

    #[inline(always)]
    unsafe fn dot_q8_0<D: I8Dot, const R: usize>(w: &[u8], xs: &[QuantizedRow; R]) -> [f32; R] {
        let (mut out, first) = q8_0_batched::<D, R>(w, xs);
        let mut acc = [[_mm256_setzero_ps(); R]; 2];
        for_each_block!(R, first, w.len() / 34, b, set, {
            let p = w.as_ptr().add(b * 34);
            let d = f16_lane0(p);
            let q = _mm256_loadu_si256(p.add(2) as *const __m256i);
            let q_abs = _mm256_sign_epi8(q, q);
            for r in 0..R {
                let scale = _mm_mul_ss(d, _mm_load_ss(xs[r].d.as_ptr().add(b)));
                let x_signed = _mm256_sign_epi8(x_block(&xs[r], b), q);
                let dot = _mm256_cvtepi32_ps(D::dot(q_abs, x_signed));
                acc[set][r] = _mm256_fmadd_ps(_mm256_broadcastss_ps(scale), dot, acc[set][r]);
            }
        });
        for r in 0..R {
            out[r] += hsum(_mm256_add_ps(acc[0][r], acc[1][r]));
        }
        out
    }

    /// The eight 6-bit scales and mins of a Q4_K super-block as f32 lanes, unpacked from
    /// the 12 bytes at `p` (see `quant::ggml::q4k_scale_min`).
    #[inline(always)]
    unsafe fn q4k_scales_mins(p: *const u8) -> (__m256, __m256) {
        let a = read_unaligned(p as *const u32);
        let b = read_unaligned(p.add(4) as *const u32);
        let c = read_unaligned(p.add(8) as *const u32);
        const LOW6: u32 = 0x3f3f_3f3f;
        const LOW4: u32 = 0x0f0f_0f0f;
        const TOP2: u32 = 0x0303_0303;
        let scales = (a & LOW6) as u64 | ((((c & LOW4) | (((a >> 6) & TOP2) << 4)) as u64) << 32);
        let mins =
            (b & LOW6) as u64 | (((((c >> 4) & LOW4) | (((b >> 6) & TOP2) << 4)) as u64) << 32);
        (widen_u8x8(scales), widen_u8x8(mins))
    }

    /// The eight bytes of `v` as f32 lanes.
    #[inline(always)]
    unsafe fn widen_u8x8(v: u64) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(v as i64)))
    }

    #[inline(always)]
    unsafe fn dot_q4_k<D: I8Dot, const R: usize>(w: &[u8], xs: &[QuantizedRow; R]) -> [f32; R] {
        let mut acc = [[_mm256_setzero_ps(); R]; 2];
        // Per-lane sums of dmin·m·s over sub-blocks (subtracted at the end).
        let mut offset = [[_mm256_setzero_ps(); R]; 2];
        let low4 = _mm256_set1_epi8(0x0F);
        for_each_block!(R, 0, w.len() / 144, sb, set, {
            let p = w.as_ptr().add(sb * 144);
            let dm = f16_pair(p);
            let (scales, mins) = q4k_scales_mins(p.add(4));
            let scales = _mm256_mul_ps(_mm256_broadcastss_ps(dm), scales);
            let mins = _mm256_mul_ps(_mm256_broadcastss_ps(_mm_movehdup_ps(dm)), mins);
            // Per x row: the eight sub-blocks' d·sc·xd, one per lane.
            let mut sub_scales = [_mm256_setzero_ps(); R];
            for r in 0..R {
                let xd = _mm256_loadu_ps(xs[r].d.as_ptr().add(sb * 8));
                let xs_ = _mm256_loadu_ps(xs[r].s.as_ptr().add(sb * 8));
                sub_scales[r] = _mm256_mul_ps(scales, xd);
                offset[set][r] = _mm256_fmadd_ps(mins, xs_, offset[set][r]);
            }
            for pair in 0..4 {
                let v = _mm256_loadu_si256(p.add(16 + 32 * pair) as *const __m256i);
                let codes = [
                    _mm256_and_si256(v, low4),
                    _mm256_and_si256(_mm256_srli_epi16(v, 4), low4),
                ];
                for (half, q) in codes.into_iter().enumerate() {
                    let j = 2 * pair + half;
                    let lane = _mm256_set1_epi32(j as i32);
                    for r in 0..R {
                        let dot = _mm256_cvtepi32_ps(D::dot(q, x_block(&xs[r], sb * 8 + j)));
                        let scale = _mm256_permutevar8x32_ps(sub_scales[r], lane);
                        acc[set][r] = _mm256_fmadd_ps(scale, dot, acc[set][r]);
                    }
                }
            }
        });
        let mut out = [0.0; R];
        for r in 0..R {
            out[r] = hsum(_mm256_add_ps(acc[0][r], acc[1][r]))
                - hsum(_mm256_add_ps(offset[0][r], offset[1][r]));
        }
        out
    }

    /// Byte shuffles that spread Q6_K scales 2g and 2g+1 over 8 bytes each.
    static Q6K_SCALE_PAIRS: [[u8; 16]; 8] = {
        let mut masks = [[0u8; 16]; 8];
        let mut g = 0;
        while g < 8 {
            let mut i = 0;
            while i < 16 {
                masks[g][i] = (2 * g + i / 8) as u8;
                i += 1;
            }
            g += 1;
        }
        masks
    };

    /// Q6_K has 16-element sub-blocks, so its products are summed in i16 pairs and scaled
    /// per half block (`maddubs` + `madd` by the scales) whatever the instruction set.
    #[inline(always)]
    unsafe fn dot_q6_k<const R: usize>(w: &[u8], xs: &[QuantizedRow; R]) -> [f32; R] {
        let mut acc = [[_mm256_setzero_ps(); R]; 2];
        let low4 = _mm256_set1_epi8(0x0F);
        let two = _mm256_set1_epi8(3);
        let bias = _mm256_set1_epi8(32);
        for_each_block!(R, 0, w.len() / 210, sb, set, {
            let p = w.as_ptr().add(sb * 210);
            let d = _mm256_broadcastss_ps(f16_splat(p.add(208)));
            let scales = _mm_loadu_si128(p.add(192) as *const __m128i);
            let mut block_scales = [_mm256_setzero_ps(); R];
            for r in 0..R {
                block_scales[r] = _mm256_mul_ps(d, _mm256_loadu_ps(xs[r].d.as_ptr().add(sb * 8)));
            }
            for half in 0..2 {
                let ql = p.add(64 * half);
                let ql = [
                    _mm256_loadu_si256(ql as *const __m256i),
                    _mm256_loadu_si256(ql.add(32) as *const __m256i),
                ];
                let qh = _mm256_loadu_si256(p.add(128 + 32 * half) as *const __m256i);
                for g in 0..4 {
                    let low = if g < 2 {
                        _mm256_and_si256(ql[g], low4)
                    } else {
                        _mm256_and_si256(_mm256_srli_epi16(ql[g - 2], 4), low4)
                    };
                    let high = match g {
                        0 => _mm256_and_si256(qh, two),
                        1 => _mm256_and_si256(_mm256_srli_epi16(qh, 2), two),
                        2 => _mm256_and_si256(_mm256_srli_epi16(qh, 4), two),
                        _ => _mm256_and_si256(_mm256_srli_epi16(qh, 6), two),
                    };
                    let q = _mm256_or_si256(low, _mm256_slli_epi16(high, 4));
                    let j = 4 * half + g;
                    let mask = _mm_loadu_si128(Q6K_SCALE_PAIRS[j].as_ptr() as *const __m128i);
                    let sub_scales = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, mask));
                    let lane = _mm256_set1_epi32(j as i32);
                    for r in 0..R {
                        let xq = x_block(&xs[r], sb * 8 + j);
                        let pairs = _mm256_sub_epi16(
                            _mm256_maddubs_epi16(q, xq),
                            _mm256_maddubs_epi16(bias, xq),
                        );
                        let dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, sub_scales));
                        let scale = _mm256_permutevar8x32_ps(block_scales[r], lane);
                        acc[set][r] = _mm256_fmadd_ps(scale, dot, acc[set][r]);
                    }
                }
            }
        });
        let mut out = [0.0; R];
        for r in 0..R {
            out[r] = hsum(_mm256_add_ps(acc[0][r], acc[1][r]));
        }
        out
    }

    /// Float weights times f32 x, eight lanes at a time.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn float_tile(
        t: GgmlType,
        w: &[u8],
        row_bytes: usize,
        x: &[f32],
        k: usize,
        out_t: &mut [f32],
    ) {
        let m = x.len() / k;
        for (wrow, out) in w.chunks_exact(row_bytes).zip(out_t.chunks_exact_mut(m)) {
            let mut i = 0;
            while i + 4 <= m {
                float_rows::<4>(t, wrow, x, k, i, &mut out[i..i + 4]);
                i += 4;
            }
            match m - i {
                3 => float_rows::<3>(t, wrow, x, k, i, &mut out[i..]),
                2 => float_rows::<2>(t, wrow, x, k, i, &mut out[i..]),
                1 => float_rows::<1>(t, wrow, x, k, i, &mut out[i..]),
                _ => {}
            }
        }
    }

    /// Eight weights from `p` (elements of type `t`) as f32.
    #[inline(always)]
    unsafe fn load8(t: GgmlType, p: *const u8) -> __m256 {
        match t {
            GgmlType::F32 => _mm256_loadu_ps(p as *const f32),
            GgmlType::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
            _ => {
                let bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
                _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16))
            }
        }
    }

    #[inline(always)]
    unsafe fn float_rows<const R: usize>(
        t: GgmlType,
        wrow: &[u8],
        x: &[f32],
        k: usize,
        i0: usize,
        out: &mut [f32],
    ) {
        let elem = t.block_bytes();
        let xp = x.as_ptr().add(i0 * k);
        let mut acc = [[_mm256_setzero_ps(); R]; 2];
        for_each_block!(R, 0, k / 8, c, set, {
            let wv = load8(t, wrow.as_ptr().add(8 * c * elem));
            for r in 0..R {
                let xv = _mm256_loadu_ps(xp.add(r * k + 8 * c));
                acc[set][r] = _mm256_fmadd_ps(wv, xv, acc[set][r]);
            }
        });
        let tail = 8 * (k / 8);
        for r in 0..R {
            let mut sum = hsum(_mm256_add_ps(acc[0][r], acc[1][r]));
            for e in tail..k {
                let b = &wrow[e * elem..(e + 1) * elem];
                let w = match t {
                    GgmlType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                    GgmlType::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
                    _ => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
                };
                sum += w * x[(i0 + r) * k + e];
            }
            out[r] = sum;
        }
    }

    /// `super::quantize_block` compiled for AVX2 (vectorised rounding).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn quantize_block(x: &[f32], qs: &mut [i8]) -> (f32, i32) {
        super::quantize_block(x, qs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::ggml::{dequantize_row, quantize_row};

    /// Deterministic uniform values in [-1, 1) (splitmix64).
    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    const TYPES: [GgmlType; 8] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q6K,
    ];

    /// Weights of type `t` for `n` rows of `k` (quantized from random values) and their
    /// dequantized values.
    fn weights(t: GgmlType, n: usize, k: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
        let values = random(n * k, seed);
        let bytes: Vec<u8> = values
            .chunks(k)
            .flat_map(|row| quantize_row(t, row).unwrap())
            .collect();
        let mut deq = vec![0.0; n * k];
        for (row, out) in bytes.chunks(t.row_bytes(k)).zip(deq.chunks_mut(k)) {
            dequantize_row(t, row, out).unwrap();
        }
        (bytes, deq)
    }

    /// x · dequantized Wᵀ in f64.
    fn reference(x: &[f32], deq: &[f32], n: usize, k: usize) -> Vec<f64> {
        let m = x.len() / k;
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|e| x[i * k + e] as f64 * deq[j * k + e] as f64)
                    .sum();
            }
        }
        out
    }

    /// Runs `tile` over all rows on one thread with a given instruction set.
    fn product_with(isa: Isa, t: GgmlType, x: &[f32], w: &[u8], n: usize, k: usize) -> Vec<f32> {
        let m = x.len() / k;
        let acts = Activations::new(t, x, k, m, isa);
        let mut out_t = vec![0.0; n * m];
        acts.tile(isa, t, w, t.row_bytes(k), &mut out_t);
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = out_t[j * m + i];
            }
        }
        out
    }

    /// Largest error relative to the largest reference magnitude.
    fn relative_error(got: &[f32], want: &[f64]) -> f64 {
        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let err = got
            .iter()
            .zip(want)
            .fold(0.0f64, |m, (&g, &w)| m.max((g as f64 - w).abs()));
        err / scale
    }

    #[test]
    fn every_kernel_matches_the_dequantized_reference() {
        let n = 37;
        for t in TYPES {
            for m in [1, 3, 6] {
                // 32-element formats: one batch of eight blocks and a tail of three;
                // K-quants: three super-blocks; floats: a tail after the 8-wide chunks.
                let k = match t.block_size() {
                    1 => 101,
                    32 => 11 * 32,
                    _ => 3 * 256,
                };
                let (w, deq) = weights(t, n, k, 7 + m as u64);
                let x = random(m * k, 99);
                let want = reference(&x, &deq, n, k);
                let mut got = vec![0.0; m * n];
                matmul_gguf(t, &x, &w, n, k, &mut got).unwrap();
                let tolerance = if t.block_size() == 1 { 1e-5 } else { 1e-2 };
                let err = relative_error(&got, &want);
                assert!(err < tolerance, "{t:?} m={m}: relative error {err}");
                for isa in Isa::available() {
                    let got = product_with(isa, t, &x, &w, n, k);
                    let err = relative_error(&got, &want);
                    assert!(err < tolerance, "{t:?} {isa:?} m={m}: relative error {err}");
                }
            }
        }
    }

    #[test]
    fn simd_kernels_agree_with_the_portable_ones() {
        let (n, k) = (19, 512);
        let x = random(5 * k, 3);
        for t in TYPES {
            let (w, _) = weights(t, n, k, 11);
            let portable = product_with(Isa::Portable, t, &x, &w, n, k);
            for isa in Isa::available() {
                let got = product_with(isa, t, &x, &w, n, k);
                for (g, p) in got.iter().zip(&portable) {
                    assert!(
                        (g - p).abs() <= 1e-5 * (1.0 + p.abs()),
                        "{t:?} {isa:?}: {g} vs {p}"
                    );
                }
            }
        }
    }

    #[test]
    fn split_products_equal_single_task_ones() {
        let (n, k) = (301, 512);
        assert!(rows_per_task(n, 1, k) < n || rayon::current_num_threads() == 1);
        for t in [GgmlType::Q4_1, GgmlType::Q6K, GgmlType::F16] {
            let (w, _) = weights(t, n, k, 21);
            for m in [1, 5] {
                let x = random(m * k, 4);
                let mut got = vec![0.0; m * n];
                matmul_gguf(t, &x, &w, n, k, &mut got).unwrap();
                assert_eq!(
                    got,
                    product_with(Isa::detected(), t, &x, &w, n, k),
                    "{t:?} m={m}"
                );
            }
        }
    }

    #[test]
    fn mismatched_lengths_are_errors() {
        let w = vec![0u8; GgmlType::Q8_0.row_bytes(64) * 3];
        let mut out = vec![0.0; 3];
        assert!(matmul_gguf(GgmlType::Q8_0, &[0.0; 64], &w, 3, 64, &mut out).is_ok());
        assert!(matmul_gguf(GgmlType::Q8_0, &[0.0; 64], &w[1..], 3, 64, &mut out).is_err());
        assert!(matmul_gguf(GgmlType::Q8_0, &[0.0; 63], &w, 3, 64, &mut out).is_err());
        assert!(matmul_gguf(GgmlType::Q8_0, &[0.0; 48], &w, 3, 48, &mut out).is_err());
        assert!(matmul_gguf(GgmlType::Q8_0, &[0.0; 64], &w, usize::MAX / 8, 64, &mut out).is_err());
        // k = 0: every output is an empty sum.
        let mut out = vec![1.0; 3];
        matmul_gguf(GgmlType::Q8_0, &[], &[], 3, 0, &mut out).unwrap();
        assert_eq!(out, [0.0; 3]);
    }

    /// Decode-shaped matrix-vector products (SmolLM2-135M's shapes, lm-head included):
    /// best-of-many time and weight bandwidth, one thread and all threads. Run with
    /// `cargo test -p mlx-native --lib bench_matvec -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_matvec() {
        fn best_of(runs: usize, mut f: impl FnMut()) -> f64 {
            (0..runs)
                .map(|_| {
                    let start = std::time::Instant::now();
                    f();
                    start.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min)
        }
        for (t, n, k) in [
            (GgmlType::Q4_1, 1536, 576),
            (GgmlType::Q4_1, 576, 1536),
            (GgmlType::Q4_1, 576, 576),
            (GgmlType::Q4_0, 1536, 576),
            (GgmlType::Q8_0, 1536, 576),
            (GgmlType::Q4K, 1536, 768),
            (GgmlType::Q6K, 1536, 768),
            (GgmlType::F16, 1536, 576),
            (GgmlType::Q8_0, 49152, 576),
        ] {
            let (w, _) = weights(t, n, k, 1);
            let x = random(k, 2);
            let mut out = vec![0.0; n];
            let runs = (400_000_000 / (n * k)).clamp(20, 2000);
            for isa in Isa::available() {
                let one_thread = best_of(runs, || {
                    let acts = Activations::new(t, &x, k, 1, isa);
                    acts.tile(isa, t, &w, t.row_bytes(k), &mut out);
                });
                let ns_per_block = one_thread * 1e9 / (n * k / t.block_size().max(QK)) as f64;
                println!(
                    "{:>5} {n:>5}x{k:<5} {isa:>10?} 1 thread: {:7.1} us {:5.1} GB/s {:5.2} ns/32 elements",
                    t.name(),
                    one_thread * 1e6,
                    w.len() as f64 / one_thread / 1e9,
                    ns_per_block * t.block_size().max(QK) as f64 / 32.0 / t.block_size().max(QK) as f64 * 32.0 / (t.block_size().max(QK) as f64 / 32.0),
                );
            }
            let all = best_of(runs, || matmul_gguf(t, &x, &w, n, k, &mut out).unwrap());
            println!(
                "{:>5} {n:>5}x{k:<5} {:?} {} threads: {:7.1} us {:5.1} GB/s",
                t.name(),
                Isa::detected(),
                rayon::current_num_threads(),
                all * 1e6,
                w.len() as f64 / all / 1e9
            );
        }
    }

    /// Prefill-shaped products: ns per (x row × 32 weights) for growing m, one thread.
    #[test]
    #[ignore]
    fn bench_matmul_rows() {
        for t in [GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4K, GgmlType::F16] {
            let (n, k) = (1536, 768);
            let (w, _) = weights(t, n, k, 1);
            for m in [1, 2, 4, 16, 64] {
                let x = random(m * k, 2);
                let isa = Isa::detected();
                let mut out_t = vec![0.0; n * m];
                let mut best = f64::INFINITY;
                for _ in 0..(200 / m).max(5) {
                    let start = std::time::Instant::now();
                    let acts = Activations::new(t, &x, k, m, isa);
                    acts.tile(isa, t, &w, t.row_bytes(k), &mut out_t);
                    best = best.min(start.elapsed().as_secs_f64());
                }
                println!(
                    "{:>5} {n}x{k} m={m:<3} {isa:?}: {:7.1} us, {:.3} ns per row and 32 weights",
                    t.name(),
                    best * 1e6,
                    best * 1e9 / (m * n * k / 32) as f64
                );
            }
        }
    }

    /// Every matrix-vector product of one SmolLM2-135M decode step (30 layers of q, k, v, o,
    /// gate, up, down, then the tied Q8_0 lm-head) on the shared GGUF's weights, which do
    /// not fit in cache. Run with
    /// `cargo test --release -p mlx-native --lib bench_smollm2 -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_smollm2_decode_step() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/models/smollm2-135m-instruct-q4_1.gguf"
        );
        let file = crate::formats::gguf::GgufFile::open(path).unwrap();
        let mut names: Vec<String> = (0..30)
            .flat_map(|l| {
                [
                    "attn_q",
                    "attn_k",
                    "attn_v",
                    "attn_output",
                    "ffn_gate",
                    "ffn_up",
                    "ffn_down",
                ]
                .map(|m| format!("blk.{l}.{m}.weight"))
            })
            .collect();
        names.push("token_embd.weight".into());
        let mats: Vec<(GgmlType, &[u8], usize, usize)> = names
            .iter()
            .map(|name| {
                let info = file.tensor_info(name).unwrap();
                let data = file.tensor_data(name).unwrap();
                (info.ggml_type, data, info.dims[1], info.dims[0])
            })
            .collect();
        let bytes: usize = mats.iter().map(|m| m.1.len()).sum();
        let x = random(1536, 3);
        let mut out = vec![0.0; 49152];
        let mut step = || {
            for &(t, w, n, k) in &mats {
                matmul_gguf(t, &x[..k], w, n, k, &mut out[..n]).unwrap();
            }
        };
        step();
        // Best and median of many steps: the machine may be shared.
        let mut times: Vec<f64> = (0..40)
            .map(|_| {
                let start = std::time::Instant::now();
                step();
                start.elapsed().as_secs_f64()
            })
            .collect();
        times.sort_by(f64::total_cmp);
        for (what, secs) in [("best", times[0]), ("median", times[times.len() / 2])] {
            println!(
                "{} matmuls, {:.1} MB, {} threads, {:?}: {what} {:.2} ms per step ({:.1} GB/s)",
                mats.len(),
                bytes as f64 / 1e6,
                rayon::current_num_threads(),
                Isa::detected(),
                secs * 1e3,
                bytes as f64 / secs / 1e9,
            );
        }
    }
}
