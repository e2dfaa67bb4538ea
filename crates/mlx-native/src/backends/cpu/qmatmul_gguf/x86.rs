//! x86-64 SIMD kernels (AVX-512F, or AVX2 + FMA; both with F16C), chosen at run time.
//!
//! A tile is one weight row × up to four rows of x. Per block, the row's header (scales,
//! mins) is decoded once; then, `LANES` elements at a time, the format's `chunk` turns the
//! codes into their f32 values, in element order, and every row of x multiplies them into
//! per-lane sums, reduced once per tile. The formats are written once against `Simd`,
//! which both instruction sets implement. 4-bit codes go through a table of the block's 16
//! possible values: on AVX-512 one `vpermps` looks up 16 codes; on AVX2 the codes are
//! converted and scaled with a fused multiply-add. 5-bit codes always take the multiply-add.
//!
//! The weights are exactly `quant::ggml::dequantize_row`'s values: d·(q − 8), d·sc·q and
//! (d·sc)·(q − 32) round as there, d·q + m rounds once either way (d·q is exact; Q5_0's
//! d·(q − 16) = d·q − 16·d is exact), and Q8_0's exact d·q is applied as d times the block's
//! sum of q·x.
//!
//! Block headers go through memory on purpose: they are broadcast to every lane from there
//! (`Simd::splat_from`), which on Zen 4 keeps the shuffle unit free for unpacking codes.

// Accumulators and results are parallel arrays indexed by x row.
#![allow(clippy::needless_range_loop)]

use std::arch::x86_64::*;
use std::ptr::read_unaligned;

use crate::quant::ggml::q4k_scale_min;
use crate::quant::GgmlType;

/// Bytes ahead of each weight row's current block to prefetch: rows stream from memory
/// (decode reads every weight once), and the hardware prefetchers alone leave the tiles
/// waiting on it.
const PREFETCH: usize = 2048;

/// Elements per block of the float formats' SIMD loop (their blocks are single elements).
pub(super) const FLOAT_STEP: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Isa {
    Avx512,
    Avx2,
}

impl Isa {
    /// Every instruction set this CPU runs the kernels with, fastest first.
    pub(super) fn available() -> Vec<Isa> {
        let mut isas = Vec::new();
        if !(is_x86_feature_detected!("f16c") && is_x86_feature_detected!("fma")) {
            return isas;
        }
        if is_x86_feature_detected!("avx512f") {
            isas.push(Isa::Avx512);
        }
        if is_x86_feature_detected!("avx2") {
            isas.push(Isa::Avx2);
        }
        isas
    }
}

/// `out_rows[i][c]` = row i of x `[m, k]` · weight row c, for every row c of `w` (whole
/// rows of `row_bytes` bytes of type `t`). Float types cover their first `k / FLOAT_STEP`
/// steps of elements only; the caller adds the rest.
pub(super) fn run(
    isa: Isa,
    t: GgmlType,
    w: &[u8],
    row_bytes: usize,
    k: usize,
    x: &[f32],
    out_rows: &mut [&mut [f32]],
) {
    let rows = out_rows.first().map_or(0, |r| r.len());
    assert!(
        rows * row_bytes <= w.len()
            && out_rows.len() * k <= x.len()
            && out_rows.iter().all(|r| r.len() == rows)
            && t.row_bytes(k) == row_bytes,
        "GGUF matmul tile out of bounds"
    );
    // SAFETY: `available` made `isa` only if the CPU has its features; the bounds the
    // tiles rely on were checked above.
    unsafe {
        match isa {
            Isa::Avx512 => run512(t, w, row_bytes, k, x, out_rows),
            Isa::Avx2 => run256(t, w, row_bytes, k, x, out_rows),
        }
    }
}

#[target_feature(enable = "avx512f,f16c,fma")]
unsafe fn run512(
    t: GgmlType,
    w: &[u8],
    row_bytes: usize,
    k: usize,
    x: &[f32],
    out: &mut [&mut [f32]],
) {
    for_format::<Avx512>(t, w, row_bytes, k, x, out)
}

#[target_feature(enable = "avx2,f16c,fma")]
unsafe fn run256(
    t: GgmlType,
    w: &[u8],
    row_bytes: usize,
    k: usize,
    x: &[f32],
    out: &mut [&mut [f32]],
) {
    for_format::<Avx2>(t, w, row_bytes, k, x, out)
}

#[inline(always)]
unsafe fn for_format<S: Simd>(
    t: GgmlType,
    w: &[u8],
    row_bytes: usize,
    k: usize,
    x: &[f32],
    out: &mut [&mut [f32]],
) {
    let tiles = Tiles {
        w: w.as_ptr(),
        row_bytes,
        k,
    };
    match t {
        GgmlType::Q4_0 => tiles.run::<S, Q4_0>(k / 32, x, out),
        GgmlType::Q4_1 => tiles.run::<S, Q4_1>(k / 32, x, out),
        GgmlType::Q5_0 => tiles.run::<S, Q5_0>(k / 32, x, out),
        GgmlType::Q5_1 => tiles.run::<S, Q5_1>(k / 32, x, out),
        GgmlType::Q8_0 => tiles.run::<S, Q8_0>(k / 32, x, out),
        GgmlType::Q4K => tiles.run::<S, Q4K>(k / 256, x, out),
        GgmlType::Q5K => tiles.run::<S, Q5K>(k / 256, x, out),
        GgmlType::Q6K => tiles.run::<S, Q6K>(k / 256, x, out),
        GgmlType::F32 => tiles.run::<S, F32>(k / FLOAT_STEP, x, out),
        GgmlType::F16 => tiles.run::<S, F16>(k / FLOAT_STEP, x, out),
        GgmlType::BF16 => tiles.run::<S, BF16>(k / FLOAT_STEP, x, out),
    }
}

/// The weight rows of one task.
struct Tiles {
    w: *const u8,
    row_bytes: usize,
    /// Row length of x.
    k: usize,
}

impl Tiles {
    /// Rows of x in groups of up to four, each group against every weight row.
    #[inline(always)]
    unsafe fn run<S: Simd, F: Format<S>>(&self, blocks: usize, x: &[f32], out: &mut [&mut [f32]]) {
        let mut i0 = 0;
        while i0 < out.len() {
            let (x, out) = (x.as_ptr().add(i0 * self.k), &mut out[i0..]);
            i0 += match out.len() {
                1 => self.rows::<S, F, 1>(blocks, x, out),
                2 => self.rows::<S, F, 2>(blocks, x, out),
                3 => self.rows::<S, F, 3>(blocks, x, out),
                _ => self.rows::<S, F, 4>(blocks, x, out),
            };
        }
    }

    /// Every weight row against M rows of x at `x`; returns M.
    #[inline(always)]
    unsafe fn rows<S: Simd, F: Format<S>, const M: usize>(
        &self,
        blocks: usize,
        x: *const f32,
        out: &mut [&mut [f32]],
    ) -> usize {
        let cols = out.first().map_or(0, |r| r.len());
        for c in 0..cols {
            let sums = self.tile::<S, F, M>(self.w.add(c * self.row_bytes), blocks, x);
            for i in 0..M {
                out[i][c] = sums[i];
            }
        }
        M
    }

    /// One weight row (at `row`) times M rows of x over the first `blocks` blocks. One row
    /// at a time: the hardware prefetchers follow a single stream through memory much better
    /// than several interleaved ones (decode speed drops by a third with four).
    #[inline(always)]
    unsafe fn tile<S: Simd, F: Format<S>, const M: usize>(
        &self,
        row: *const u8,
        blocks: usize,
        x: *const f32,
    ) -> [f32; M] {
        // Two sums per x row, for alternate chunks, so that FMA chains overlap.
        let mut acc = [[S::zero(); 2]; M];
        for b in 0..blocks {
            self.block::<S, F, M>(row.add(b * F::BYTES), x.add(b * F::ELEMS), &mut acc);
        }
        let mut sums = [0f32; M];
        for i in 0..M {
            sums[i] = S::sum(S::add(acc[i][0], acc[i][1]));
        }
        sums
    }

    /// Adds the block at `blk` times M rows of x (from `x`) to `acc`.
    #[inline(always)]
    unsafe fn block<S: Simd, F: Format<S>, const M: usize>(
        &self,
        blk: *const u8,
        x: *const f32,
        acc: &mut [[S::F; 2]; M],
    ) {
        // In memory, which the broadcasts of its values read.
        let head = F::header(blk);
        // A hint only: it may point past the weights.
        _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PREFETCH) as *const i8);
        // Formats that scale block sums sum into a fresh `part`, scaled once.
        let mut part = [[S::zero(); 2]; M];
        let sums = if F::SCALED_SUMS { &mut part } else { &mut *acc };
        for u in 0..F::ELEMS / F::UNIT {
            let unit = F::unit(&head, u);
            let xu = x.add(u * F::UNIT);
            let mut e = 0;
            while e < F::UNIT {
                let w = [
                    F::chunk(blk, &unit, u, e),
                    F::chunk(blk, &unit, u, e + S::LANES),
                ];
                for i in 0..M {
                    for h in 0..2 {
                        let xv = S::load(xu.add(i * self.k + e + h * S::LANES));
                        sums[i][h] = S::fma(w[h], xv, sums[i][h]);
                    }
                }
                e += 2 * S::LANES;
            }
        }
        if F::SCALED_SUMS {
            let scale = F::sum_scale(&head);
            for i in 0..M {
                for h in 0..2 {
                    acc[i][h] = S::fma(part[i][h], scale, acc[i][h]);
                }
            }
        }
    }
}

/// The vector operations the formats are written in.
trait Simd {
    /// f32 lanes.
    type F: Copy;
    /// i32 lanes.
    type I: Copy;
    /// A block's table of the 16 values of a 4-bit code, i·d + m.
    type Lut: Copy;
    const LANES: usize;

    unsafe fn zero() -> Self::F;
    unsafe fn splat(v: f32) -> Self::F;
    /// The f32 at `p` in every lane, broadcast by the load unit (`vbroadcastss` from a
    /// register, or on Zen 4 even from memory, would take the shuffle unit that the
    /// unpacking keeps busy).
    unsafe fn splat_from(p: *const f32) -> Self::F;
    unsafe fn load(p: *const f32) -> Self::F;
    /// a·b + c.
    unsafe fn fma(a: Self::F, b: Self::F, c: Self::F) -> Self::F;
    unsafe fn mul(a: Self::F, b: Self::F) -> Self::F;
    unsafe fn add(a: Self::F, b: Self::F) -> Self::F;
    /// The sum of the lanes.
    unsafe fn sum(v: Self::F) -> f32;
    /// `LANES` f16 values at `p`, as f32.
    unsafe fn f16s(p: *const u8) -> Self::F;
    /// `LANES` bf16 values at `p`, as f32.
    unsafe fn bf16s(p: *const u8) -> Self::F;
    /// `LANES` bytes at `p`, zero-extended.
    unsafe fn u8s(p: *const u8) -> Self::I;
    /// `LANES` bytes at `p`, sign-extended.
    unsafe fn i8s(p: *const u8) -> Self::I;
    unsafe fn and(v: Self::I, mask: i32) -> Self::I;
    unsafe fn or(a: Self::I, b: Self::I) -> Self::I;
    unsafe fn shift_right(v: Self::I, bits: u32) -> Self::I;
    unsafe fn shift_left(v: Self::I, bits: u32) -> Self::I;
    unsafe fn sub(v: Self::I, c: i32) -> Self::I;
    /// Lane i: bit `first + i` of `word` (0 or 1).
    unsafe fn bits(word: u32, first: u32) -> Self::I;
    unsafe fn to_f32(v: Self::I) -> Self::F;
    /// The table for the d and m at `d` and `m`.
    unsafe fn lut(d: *const f32, m: *const f32) -> Self::Lut;
    /// The table's value for the low 4 bits of each lane (higher bits are ignored).
    unsafe fn lookup(codes: Self::I, lut: Self::Lut) -> Self::F;
    /// Lanes of bytes (0..256) with bits 4..8 moved to the low 4 bits, for `lookup`.
    unsafe fn high_nibbles(v: Self::I) -> Self::I;
}

struct Avx512;

impl Simd for Avx512 {
    type F = __m512;
    type I = __m512i;
    type Lut = __m512;
    const LANES: usize = 16;

    #[inline(always)]
    unsafe fn zero() -> __m512 {
        _mm512_setzero_ps()
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> __m512 {
        _mm512_set1_ps(v)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn splat_from(p: *const f32) -> __m512 {
        // Written out: the compiler would pick `vbroadcastss`.
        let out;
        std::arch::asm!(
            "vpbroadcastd {out}, dword ptr [{p}]",
            out = lateout(zmm_reg) out,
            p = in(reg) p,
            options(pure, readonly, nostack, preserves_flags)
        );
        out
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m512 {
        _mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn mul(a: __m512, b: __m512) -> __m512 {
        _mm512_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn add(a: __m512, b: __m512) -> __m512 {
        _mm512_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn sum(v: __m512) -> f32 {
        _mm512_reduce_add_ps(v)
    }
    #[inline(always)]
    unsafe fn f16s(p: *const u8) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
    #[inline(always)]
    unsafe fn bf16s(p: *const u8) -> __m512 {
        // bf16 is the high half of an f32.
        let bits = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(bits))
    }
    #[inline(always)]
    unsafe fn u8s(p: *const u8) -> __m512i {
        _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i))
    }
    #[inline(always)]
    unsafe fn i8s(p: *const u8) -> __m512i {
        _mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i))
    }
    #[inline(always)]
    unsafe fn and(v: __m512i, mask: i32) -> __m512i {
        _mm512_and_si512(v, _mm512_set1_epi32(mask))
    }
    #[inline(always)]
    unsafe fn or(a: __m512i, b: __m512i) -> __m512i {
        _mm512_or_si512(a, b)
    }
    #[inline(always)]
    unsafe fn shift_right(v: __m512i, bits: u32) -> __m512i {
        _mm512_srl_epi32(v, _mm_cvtsi32_si128(bits as i32))
    }
    #[inline(always)]
    unsafe fn shift_left(v: __m512i, bits: u32) -> __m512i {
        _mm512_sll_epi32(v, _mm_cvtsi32_si128(bits as i32))
    }
    #[inline(always)]
    unsafe fn sub(v: __m512i, c: i32) -> __m512i {
        _mm512_sub_epi32(v, _mm512_set1_epi32(c))
    }
    #[inline(always)]
    unsafe fn bits(word: u32, first: u32) -> __m512i {
        let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let shifts = _mm512_add_epi32(lanes, _mm512_set1_epi32(first as i32));
        Self::and(_mm512_srlv_epi32(_mm512_set1_epi32(word as i32), shifts), 1)
    }
    #[inline(always)]
    unsafe fn to_f32(v: __m512i) -> __m512 {
        _mm512_cvtepi32_ps(v)
    }
    #[inline(always)]
    unsafe fn lut(d: *const f32, m: *const f32) -> __m512 {
        let codes = _mm512_setr_ps(
            0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.,
        );
        _mm512_fmadd_ps(codes, Self::splat_from(d), Self::splat_from(m))
    }
    #[inline(always)]
    unsafe fn lookup(codes: __m512i, table: __m512) -> __m512 {
        // vpermps reads only the low 4 bits of each index.
        _mm512_permutexvar_ps(codes, table)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn high_nibbles(v: __m512i) -> __m512i {
        // Opaque to the compiler, which would otherwise turn the shift of widened bytes
        // into a shift of the bytes and a second widening (a costlier cross-lane op).
        let out;
        std::arch::asm!(
            "vpsrld {out}, {v}, 4",
            out = lateout(zmm_reg) out,
            v = in(zmm_reg) v,
            options(pure, nomem, nostack, preserves_flags)
        );
        out
    }
}

struct Avx2;

impl Simd for Avx2 {
    type F = __m256;
    type I = __m256i;
    type Lut = (__m256, __m256);
    const LANES: usize = 8;

    #[inline(always)]
    unsafe fn zero() -> __m256 {
        _mm256_setzero_ps()
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> __m256 {
        _mm256_set1_ps(v)
    }
    #[inline(always)]
    unsafe fn splat_from(p: *const f32) -> __m256 {
        _mm256_broadcast_ss(&*p)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
        _mm256_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn mul(a: __m256, b: __m256) -> __m256 {
        _mm256_mul_ps(a, b)
    }
    #[inline(always)]
    unsafe fn add(a: __m256, b: __m256) -> __m256 {
        _mm256_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn sum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }
    #[inline(always)]
    unsafe fn f16s(p: *const u8) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
    #[inline(always)]
    unsafe fn bf16s(p: *const u8) -> __m256 {
        let bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(bits))
    }
    #[inline(always)]
    unsafe fn u8s(p: *const u8) -> __m256i {
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i))
    }
    #[inline(always)]
    unsafe fn i8s(p: *const u8) -> __m256i {
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i))
    }
    #[inline(always)]
    unsafe fn and(v: __m256i, mask: i32) -> __m256i {
        _mm256_and_si256(v, _mm256_set1_epi32(mask))
    }
    #[inline(always)]
    unsafe fn or(a: __m256i, b: __m256i) -> __m256i {
        _mm256_or_si256(a, b)
    }
    #[inline(always)]
    unsafe fn shift_right(v: __m256i, bits: u32) -> __m256i {
        _mm256_srl_epi32(v, _mm_cvtsi32_si128(bits as i32))
    }
    #[inline(always)]
    unsafe fn shift_left(v: __m256i, bits: u32) -> __m256i {
        _mm256_sll_epi32(v, _mm_cvtsi32_si128(bits as i32))
    }
    #[inline(always)]
    unsafe fn sub(v: __m256i, c: i32) -> __m256i {
        _mm256_sub_epi32(v, _mm256_set1_epi32(c))
    }
    #[inline(always)]
    unsafe fn bits(word: u32, first: u32) -> __m256i {
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let shifts = _mm256_add_epi32(lanes, _mm256_set1_epi32(first as i32));
        Self::and(_mm256_srlv_epi32(_mm256_set1_epi32(word as i32), shifts), 1)
    }
    #[inline(always)]
    unsafe fn to_f32(v: __m256i) -> __m256 {
        _mm256_cvtepi32_ps(v)
    }
    #[inline(always)]
    unsafe fn lut(d: *const f32, m: *const f32) -> (__m256, __m256) {
        (Self::splat_from(d), Self::splat_from(m))
    }
    #[inline(always)]
    unsafe fn lookup(codes: __m256i, (d, m): (__m256, __m256)) -> __m256 {
        _mm256_fmadd_ps(Self::to_f32(Self::and(codes, 0xF)), d, m)
    }
    #[inline(always)]
    unsafe fn high_nibbles(v: __m256i) -> __m256i {
        _mm256_srli_epi32::<4>(v)
    }
}

/// A ggml block type as the tiles see it.
trait Format<S: Simd> {
    /// Elements and bytes per block.
    const ELEMS: usize;
    const BYTES: usize;
    /// Elements per unit: the run of a block whose chunks share their layout arithmetic,
    /// which the tiles unroll (a multiple of 32 dividing `ELEMS`).
    const UNIT: usize = 32;
    /// Whether `chunk` yields values without the block's scale, which then multiplies the
    /// block's sums (`sum_scale`): one multiply per block instead of one per chunk.
    const SCALED_SUMS: bool = false;
    /// The block's scales (and mins) in f32, decoded once per block.
    type Header: Copy;
    /// What a unit's chunks need of the header, in registers.
    type Unit: Copy;
    unsafe fn header(block: *const u8) -> Self::Header;
    unsafe fn unit(head: &Self::Header, u: usize) -> Self::Unit;
    /// The values of elements e..e + LANES of unit u of the block (e a multiple of LANES).
    unsafe fn chunk(block: *const u8, unit: &Self::Unit, u: usize, e: usize) -> S::F;
    /// The factor of the block's sums (1 unless `SCALED_SUMS`).
    #[inline(always)]
    unsafe fn sum_scale(_: &Self::Header) -> S::F {
        S::splat(1.0)
    }
}

/// The four f16 at `p` (the start of a block of at least 8 bytes), as f32.
#[inline(always)]
unsafe fn f16x4(p: *const u8) -> [f32; 4] {
    let mut out = [0f32; 4];
    _mm_storeu_ps(
        out.as_mut_ptr(),
        _mm_cvtph_ps(_mm_loadl_epi64(p as *const __m128i)),
    );
    out
}

/// The f16 at `p` as f32.
#[inline(always)]
unsafe fn f16_at(p: *const u8) -> f32 {
    let bits = read_unaligned(p as *const u16);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// Elements e..e + LANES of a 32-element block of 4-bit codes at `qs` (byte j: element j
/// in the low nibble, j + 16 in the high one).
#[inline(always)]
unsafe fn nibbles<S: Simd>(qs: *const u8, lut: S::Lut, e: usize) -> S::F {
    let v = S::u8s(qs.add(e % 16));
    S::lookup(if e < 16 { v } else { S::high_nibbles(v) }, lut)
}

struct Q4_0;
impl<S: Simd> Format<S> for Q4_0 {
    const ELEMS: usize = 32;
    const BYTES: usize = 18;
    /// d and −8·d.
    type Header = [f32; 2];
    type Unit = S::Lut;
    #[inline(always)]
    unsafe fn header(p: *const u8) -> [f32; 2] {
        let d = f16_at(p);
        [d, -8.0 * d]
    }
    #[inline(always)]
    unsafe fn unit(h: &[f32; 2], _: usize) -> S::Lut {
        S::lut(&h[0], &h[1])
    }
    #[inline(always)]
    unsafe fn chunk(p: *const u8, lut: &S::Lut, _: usize, e: usize) -> S::F {
        nibbles::<S>(p.add(2), *lut, e)
    }
}

struct Q4_1;
impl<S: Simd> Format<S> for Q4_1 {
    const ELEMS: usize = 32;
    const BYTES: usize = 20;
    /// d, m (and two values that are codes).
    type Header = [f32; 4];
    type Unit = S::Lut;
    #[inline(always)]
    unsafe fn header(p: *const u8) -> [f32; 4] {
        f16x4(p)
    }
    #[inline(always)]
    unsafe fn unit(h: &[f32; 4], _: usize) -> S::Lut {
        S::lut(&h[0], &h[1])
    }
    #[inline(always)]
    unsafe fn chunk(p: *const u8, lut: &S::Lut, _: usize, e: usize) -> S::F {
        nibbles::<S>(p.add(4), *lut, e)
    }
}

/// Elements e..e + LANES of a 32-element block of 5-bit codes as d·q + m: the low 4 bits as
/// `nibbles` at `qs`, bit 4 of element j as bit j of the little-endian word at `qh`.
#[inline(always)]
unsafe fn fives<S: Simd>(qs: *const u8, qh: *const u8, (d, m): (S::F, S::F), e: usize) -> S::F {
    let v = S::u8s(qs.add(e % 16));
    let low = S::and(if e < 16 { v } else { S::high_nibbles(v) }, 0xF);
    let high = S::bits(read_unaligned(qh as *const u32), e as u32);
    S::fma(S::to_f32(S::or(low, S::shift_left(high, 4))), d, m)
}

/// Q5_0: d·(q − 16) = d·q − 16·d, exact either way (d·q fits f32's mantissa).
struct Q5_0;
impl<S: Simd> Format<S> for Q5_0 {
    const ELEMS: usize = 32;
    const BYTES: usize = 22;
    /// d and −16·d.
    type Header = [f32; 2];
    type Unit = (S::F, S::F);
    #[inline(always)]
    unsafe fn header(p: *const u8) -> [f32; 2] {
        let d = f16_at(p);
        [d, -16.0 * d]
    }
    #[inline(always)]
    unsafe fn unit(h: &[f32; 2], _: usize) -> (S::F, S::F) {
        (S::splat_from(&h[0]), S::splat_from(&h[1]))
    }
    #[inline(always)]
    unsafe fn chunk(p: *const u8, dm: &(S::F, S::F), _: usize, e: usize) -> S::F {
        fives::<S>(p.add(6), p.add(2), *dm, e)
    }
}

struct Q5_1;
impl<S: Simd> Format<S> for Q5_1 {
    const ELEMS: usize = 32;
    const BYTES: usize = 24;
    /// d, m (and two values that are codes).
    type Header = [f32; 4];
    type Unit = (S::F, S::F);
    #[inline(always)]
    unsafe fn header(p: *const u8) -> [f32; 4] {
        f16x4(p)
    }
    #[inline(always)]
    unsafe fn unit(h: &[f32; 4], _: usize) -> (S::F, S::F) {
        (S::splat_from(&h[0]), S::splat_from(&h[1]))
    }
    #[inline(always)]
    unsafe fn chunk(p: *const u8, dm: &(S::F, S::F), _: usize, e: usize) -> S::F {
        fives::<S>(p.add(8), p.add(4), *dm, e)
    }
}

/// Q8_0: d·q with d·q exact in f32, so d may as well scale the block's sum.
struct Q8_0;
impl<S: Simd> Format<S> for Q8_0 {
    const ELEMS: usize = 32;
    const BYTES: usize = 34;
    const SCALED_SUMS: bool = true;
    /// d (and three values that are codes).
    type Header = [f32; 4];
    type Unit = ();
    #[inline(always)]
    unsafe fn header(p: *const u8) -> [f32; 4] {
        f16x4(p)
    }
    #[inline(always)]
    unsafe fn unit(_: &[f32; 4], _: usize) {}
    #[inline(always)]
    unsafe fn chunk(p: *const u8, _: &(), _: usize, e: usize) -> S::F {
        S::to_f32(S::i8s(p.add(2 + e)))
    }
    #[inline(always)]
    unsafe fn sum_scale(h: &[f32; 4]) -> S::F {
        S::splat_from(&h[0])
    }
}

/// Q4_K: eight sub-blocks of 32, each with its table d·sc·q − dmin·m.
struct Q4K;
impl<S: Simd> Format<S> for Q4K {
    const ELEMS: usize = 256;
    const BYTES: usize = 144;
    /// Units of two sub-blocks, which share 32 bytes of codes.
    const UNIT: usize = 64;
    /// d·sc of the sub-blocks, then −dmin·m.
    type Header = [f32; 16];
    type Unit = [S::Lut; 2];
    #[inline(always)]
    unsafe fn header(p: *const u8) -> [f32; 16] {
        let [d, dmin, ..] = f16x4(p);
        let scales = std::slice::from_raw_parts(p.add(4), 12);
        let mut h = [0f32; 16];
        for j in 0..8 {
            let (sc, m) = q4k_scale_min(scales, j);
            h[j] = d * sc as f32;
            h[8 + j] = -(dmin * m as f32);
        }
        h
    }
    #[inline(always)]
    unsafe fn unit(h: &[f32; 16], u: usize) -> [S::Lut; 2] {
        [
            S::lut(&h[2 * u], &h[8 + 2 * u]),
            S::lut(&h[2 * u + 1], &h[8 + 2 * u + 1]),
        ]
    }
    #[inline(always)]
    unsafe fn chunk(p: *const u8, luts: &[S::Lut; 2], u: usize, e: usize) -> S::F {
        // Sub-block 2u in the low nibbles, 2u + 1 in the high ones.
        let v = S::u8s(p.add(16 + 32 * u + e % 32));
        if e < 32 {
            S::lookup(v, luts[0])
        } else {
            S::lookup(S::high_nibbles(v), luts[1])
        }
    }
}

/// Q5_K: Q4_K's sub-blocks with a fifth bit per code; d·sc·q − dmin·m (d·sc·q exact).
struct Q5K;
impl<S: Simd> Format<S> for Q5K {
    const ELEMS: usize = 256;
    const BYTES: usize = 176;
    /// Units of two sub-blocks, which share 32 bytes of codes.
    const UNIT: usize = 64;
    /// d·sc of the sub-blocks, then −dmin·m.
    type Header = [f32; 16];
    /// d·sc and −dmin·m of the unit's two sub-blocks.
    type Unit = [(S::F, S::F); 2];
    #[inline(always)]
    unsafe fn header(p: *const u8) -> [f32; 16] {
        <Q4K as Format<S>>::header(p)
    }
    #[inline(always)]
    unsafe fn unit(h: &[f32; 16], u: usize) -> [(S::F, S::F); 2] {
        let j = 2 * u;
        [
            (S::splat_from(&h[j]), S::splat_from(&h[8 + j])),
            (S::splat_from(&h[j + 1]), S::splat_from(&h[8 + j + 1])),
        ]
    }
    #[inline(always)]
    unsafe fn chunk(p: *const u8, dm: &[(S::F, S::F); 2], u: usize, e: usize) -> S::F {
        // Sub-block j = 2u + e / 32: the low (j even) or high nibbles of the unit's 32 bytes
        // of qs, bit j of qh[l] above them.
        let (half, l) = (e / 32, e % 32);
        let v = S::u8s(p.add(48 + 32 * u + l));
        let low = S::and(if half == 0 { v } else { S::high_nibbles(v) }, 0xF);
        let high = S::and(
            S::shift_right(S::u8s(p.add(16 + l)), (2 * u + half) as u32),
            1,
        );
        let (d, m) = dm[half];
        S::fma(S::to_f32(S::or(low, S::shift_left(high, 4))), d, m)
    }
}

/// Q6_K: sixteen sub-blocks of 16 with scales d·sc; element = d·sc·(q − 32).
struct Q6K;
impl<S: Simd> Format<S> for Q6K {
    const ELEMS: usize = 256;
    const BYTES: usize = 210;
    /// Units of half a block (see `quant::ggml::q6k_value` for the layout).
    const UNIT: usize = 128;
    /// d·sc of the sub-blocks.
    type Header = [f32; 16];
    type Unit = [S::F; 8];
    #[inline(always)]
    unsafe fn header(p: *const u8) -> [f32; 16] {
        let d = f16_at(p.add(208));
        let mut h = [0f32; 16];
        for (j, h) in h.iter_mut().enumerate() {
            *h = d * *p.add(192 + j) as i8 as f32;
        }
        h
    }
    #[inline(always)]
    unsafe fn unit(h: &[f32; 16], u: usize) -> [S::F; 8] {
        let mut scales = [S::zero(); 8];
        for (j, s) in scales.iter_mut().enumerate() {
            *s = S::splat_from(&h[8 * u + j]);
        }
        scales
    }
    #[inline(always)]
    unsafe fn chunk(p: *const u8, scales: &[S::F; 8], u: usize, e: usize) -> S::F {
        let (g, l) = (e / 32, e % 32);
        let low = S::u8s(p.add(64 * u + 32 * (g % 2) + l));
        let low = S::and(S::shift_right(low, 4 * (g as u32 / 2)), 0xF);
        let high = S::u8s(p.add(128 + 32 * u + l));
        let high = S::and(S::shift_right(high, 2 * g as u32), 3);
        let q = S::sub(S::or(low, S::shift_left(high, 4)), 32);
        S::mul(S::to_f32(q), scales[e / 16])
    }
}

/// Float weights in steps of `FLOAT_STEP` elements.
struct F32;
impl<S: Simd> Format<S> for F32 {
    const ELEMS: usize = FLOAT_STEP;
    const BYTES: usize = 4 * FLOAT_STEP;
    type Header = ();
    type Unit = ();
    #[inline(always)]
    unsafe fn header(_: *const u8) {}
    #[inline(always)]
    unsafe fn unit(_: &(), _: usize) {}
    #[inline(always)]
    unsafe fn chunk(p: *const u8, _: &(), _: usize, e: usize) -> S::F {
        S::load((p as *const f32).add(e))
    }
}

struct F16;
impl<S: Simd> Format<S> for F16 {
    const ELEMS: usize = FLOAT_STEP;
    const BYTES: usize = 2 * FLOAT_STEP;
    type Header = ();
    type Unit = ();
    #[inline(always)]
    unsafe fn header(_: *const u8) {}
    #[inline(always)]
    unsafe fn unit(_: &(), _: usize) {}
    #[inline(always)]
    unsafe fn chunk(p: *const u8, _: &(), _: usize, e: usize) -> S::F {
        S::f16s(p.add(2 * e))
    }
}

struct BF16;
impl<S: Simd> Format<S> for BF16 {
    const ELEMS: usize = FLOAT_STEP;
    const BYTES: usize = 2 * FLOAT_STEP;
    type Header = ();
    type Unit = ();
    #[inline(always)]
    unsafe fn header(_: *const u8) {}
    #[inline(always)]
    unsafe fn unit(_: &(), _: usize) {}
    #[inline(always)]
    unsafe fn chunk(p: *const u8, _: &(), _: usize, e: usize) -> S::F {
        S::bf16s(p.add(2 * e))
    }
}
