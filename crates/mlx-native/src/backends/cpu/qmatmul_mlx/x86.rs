//! x86-64 SIMD kernels (AVX-512F, or AVX2 + FMA), chosen at run time.
//!
//! A tile is R weight rows × M rows of x. Per step of 32 elements an unpacker turns each
//! weight row's packed words into lanes of dequantized weights (q·scale + bias, in f32) in
//! the order x was arranged in; the tile multiplies them into per-lane sums, reduced once
//! per tile. Unpackers: 4 bits (nibbles), 8 bits (bytes), and any width (`Bits`: permutes
//! bring each element's one or two words into its lane, variable shifts cut it out).

use std::arch::x86_64::*;
use std::borrow::Cow;

use super::Block;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    Avx2,
    Avx512,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unpacker {
    Q4,
    Q8,
    Bits,
}

/// A SIMD kernel this CPU supports (only `available` makes them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Kernel {
    isa: Isa,
    unpacker: Unpacker,
    bits: u32,
}

impl Kernel {
    /// Every kernel this CPU can run for `bits`, fastest first.
    pub(super) fn available(bits: u32) -> Vec<Kernel> {
        let mut isas = Vec::new();
        if is_x86_feature_detected!("avx512f") {
            isas.push(Isa::Avx512);
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            isas.push(Isa::Avx2);
        }
        let mut all = Vec::new();
        for isa in isas {
            match bits {
                4 => all.push(Kernel {
                    isa,
                    unpacker: Unpacker::Q4,
                    bits,
                }),
                8 => all.push(Kernel {
                    isa,
                    unpacker: Unpacker::Q8,
                    bits,
                }),
                _ => {}
            }
            all.push(Kernel {
                isa,
                unpacker: Unpacker::Bits,
                bits,
            });
        }
        all
    }

    /// x rearranged to the order in which the unpacker yields elements.
    pub(super) fn arrange_x(self, x: &[f32]) -> Cow<'_, [f32]> {
        match (self.unpacker, self.isa) {
            (Unpacker::Q4, Isa::Avx512) => evens_then_odds(x, 32).into(),
            (Unpacker::Q4, Isa::Avx2) => evens_then_odds(x, 16).into(),
            _ => x.into(),
        }
    }

    /// All rows of the block against all rows of x (arranged by `arrange_x`).
    pub(super) fn run(self, w: &Block, x: &[f32], out_rows: &mut [&mut [f32]]) {
        // SAFETY: `available` made this kernel only if the CPU has its features; `run512`
        // and `run256` check the bounds they rely on.
        unsafe {
            match (self.isa, self.unpacker, self.bits) {
                (Isa::Avx512, Unpacker::Q4, _) => run512::<Q4>(w, x, out_rows),
                (Isa::Avx512, Unpacker::Q8, _) => run512::<Q8>(w, x, out_rows),
                (Isa::Avx512, Unpacker::Bits, 2) => run512::<Bits<2>>(w, x, out_rows),
                (Isa::Avx512, Unpacker::Bits, 3) => run512::<Bits<3>>(w, x, out_rows),
                (Isa::Avx512, Unpacker::Bits, 4) => run512::<Bits<4>>(w, x, out_rows),
                (Isa::Avx512, Unpacker::Bits, 5) => run512::<Bits<5>>(w, x, out_rows),
                (Isa::Avx512, Unpacker::Bits, 6) => run512::<Bits<6>>(w, x, out_rows),
                (Isa::Avx512, Unpacker::Bits, _) => run512::<Bits<8>>(w, x, out_rows),
                (Isa::Avx2, Unpacker::Q4, _) => run256::<Q4>(w, x, out_rows),
                (Isa::Avx2, Unpacker::Q8, _) => run256::<Q8>(w, x, out_rows),
                (Isa::Avx2, Unpacker::Bits, 2) => run256::<Bits<2>>(w, x, out_rows),
                (Isa::Avx2, Unpacker::Bits, 3) => run256::<Bits<3>>(w, x, out_rows),
                (Isa::Avx2, Unpacker::Bits, 4) => run256::<Bits<4>>(w, x, out_rows),
                (Isa::Avx2, Unpacker::Bits, 5) => run256::<Bits<5>>(w, x, out_rows),
                (Isa::Avx2, Unpacker::Bits, 6) => run256::<Bits<6>>(w, x, out_rows),
                (Isa::Avx2, Unpacker::Bits, _) => run256::<Bits<8>>(w, x, out_rows),
            }
        }
    }
}

/// Per chunk of `chunk` elements: the even-indexed ones, then the odd ones. 4-bit words hold
/// element 2i in the low nibble of byte i and 2i+1 in the high one, so widening bytes to
/// lanes and taking low, then high nibbles yields a chunk in this order.
fn evens_then_odds(x: &[f32], chunk: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for c in x.chunks(chunk) {
        out.extend(c.iter().step_by(2));
        out.extend(c.iter().skip(1).step_by(2));
    }
    out
}

/// Bounds every tile relies on: rows r0..r0+rows of the block, M rows of x, whole steps.
fn check_tile(w: &Block, r0: usize, rows: usize, x: &[f32], m: usize) {
    let groups = w.groups();
    assert!(
        w.packed.len() >= (r0 + rows) * w.words()
            && w.scales.len() >= (r0 + rows) * groups
            && w.biases.len() >= (r0 + rows) * groups
            && x.len() >= m * w.k
            && w.group_size.is_multiple_of(32),
        "MLX matmul tile out of bounds"
    );
}

/// Tile kernels as function values, so that one driver serves every unpacker and shape.
type Tile<const R: usize, const M: usize> = unsafe fn(&Block, usize, &[f32]) -> [[f32; M]; R];

/// Every weight row of the block against the first M rows of x: R rows a tile, then single
/// rows. Returns M.
///
/// # Safety
/// The tiles must be runnable on this CPU.
#[inline(always)]
unsafe fn tile_rows<const R: usize, const M: usize>(
    w: &Block,
    x: &[f32],
    out: &mut [&mut [f32]],
    tile: Tile<R, M>,
    single: Tile<1, M>,
) -> usize {
    let cols = out.first().map_or(0, |r| r.len());
    let mut c = 0;
    while c + R <= cols {
        let sums = tile(w, c, x);
        for (r, sums) in sums.iter().enumerate() {
            for (out, &s) in out.iter_mut().zip(sums) {
                out[c + r] = s;
            }
        }
        c += R;
    }
    while c < cols {
        let [sums] = single(w, c, x);
        for (out, &s) in out.iter_mut().zip(&sums) {
            out[c] = s;
        }
        c += 1;
    }
    M
}

/// The constants of the any-width unpacker for `bits`, per element j of a 32-element pack
/// (`bits` words): the word holding its low bits, the next word, and the shifts that
/// join them. The next word of the pack's last word is itself: the shift discards it.
struct BitTable {
    word: [i32; 32],
    next_word: [i32; 32],
    shift_right: [i32; 32],
    shift_left: [i32; 32],
}

impl BitTable {
    const fn new(bits: usize) -> BitTable {
        let mut t = BitTable {
            word: [0; 32],
            next_word: [0; 32],
            shift_right: [0; 32],
            shift_left: [0; 32],
        };
        let mut j = 0;
        while j < 32 {
            let (word, shift) = ((j * bits / 32) as i32, (j * bits % 32) as i32);
            t.word[j] = word;
            t.next_word[j] = if word + 1 < bits as i32 {
                word + 1
            } else {
                word
            };
            t.shift_right[j] = shift;
            // A count of 32 shifts everything out (the element does not straddle).
            t.shift_left[j] = 32 - shift;
            j += 1;
        }
        t
    }
}

struct Q4;
struct Q8;
struct Bits<const B: usize>;

impl<const B: usize> Bits<B> {
    const TABLE: BitTable = BitTable::new(B);
}

// ---------------------------------------------------------------- AVX-512

/// Turns a weight row's packed words into dequantized lanes, 32 elements a step.
trait Unpack512 {
    /// A group's scale and bias, in the form the steps use.
    type Group: Copy;
    unsafe fn group(scale: f32, bias: f32) -> Self::Group;
    /// Elements e..e+32 of `row` (e a multiple of 32), in x's arranged order.
    unsafe fn step(row: *const u32, e: usize, group: Self::Group) -> [__m512; 2];
}

/// 4 bits: a 16-entry table of the group's values i·scale + bias, looked up by `vpermps`,
/// which reads only the low 4 bits of each lane (so nibbles need a shift but no mask).
impl Unpack512 for Q4 {
    type Group = __m512;

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn group(scale: f32, bias: f32) -> __m512 {
        let iota = _mm512_setr_ps(
            0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.,
        );
        _mm512_fmadd_ps(iota, _mm512_set1_ps(scale), _mm512_set1_ps(bias))
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn step(row: *const u32, e: usize, table: __m512) -> [__m512; 2] {
        let bytes = _mm_loadu_si128((row as *const u8).add(e / 2) as *const __m128i);
        let v = _mm512_cvtepu8_epi32(bytes);
        [
            _mm512_permutexvar_ps(v, table),
            _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table),
        ]
    }
}

impl Unpack512 for Q8 {
    type Group = (__m512, __m512);

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn group(scale: f32, bias: f32) -> Self::Group {
        (_mm512_set1_ps(scale), _mm512_set1_ps(bias))
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn step(row: *const u32, e: usize, (scale, bias): Self::Group) -> [__m512; 2] {
        let bytes = (row as *const u8).add(e);
        let mut out = [_mm512_setzero_ps(); 2];
        for (h, o) in out.iter_mut().enumerate() {
            let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(bytes.add(16 * h) as *const __m128i));
            *o = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), scale, bias);
        }
        out
    }
}

impl<const B: usize> Unpack512 for Bits<B> {
    type Group = (__m512, __m512);

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn group(scale: f32, bias: f32) -> Self::Group {
        (_mm512_set1_ps(scale), _mm512_set1_ps(bias))
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn step(row: *const u32, e: usize, (scale, bias): Self::Group) -> [__m512; 2] {
        let t = &Self::TABLE;
        let pack =
            _mm512_maskz_loadu_epi32(((1u32 << B) - 1) as u16, row.add(e / 32 * B) as *const i32);
        let mask = _mm512_set1_epi32((1 << B) - 1);
        let mut out = [_mm512_setzero_ps(); 2];
        for (h, o) in out.iter_mut().enumerate() {
            let at = 16 * h;
            let low = _mm512_permutexvar_epi32(load16(&t.word, at), pack);
            let high = _mm512_permutexvar_epi32(load16(&t.next_word, at), pack);
            let q = _mm512_or_si512(
                _mm512_srlv_epi32(low, load16(&t.shift_right, at)),
                _mm512_sllv_epi32(high, load16(&t.shift_left, at)),
            );
            let q = _mm512_cvtepi32_ps(_mm512_and_si512(q, mask));
            *o = _mm512_fmadd_ps(q, scale, bias);
        }
        out
    }
}

/// Lanes `at..at + 16` of a table row.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load16(a: &[i32; 32], at: usize) -> __m512i {
    debug_assert!(at + 16 <= 32);
    _mm512_loadu_si512(a.as_ptr().add(at) as *const _)
}

#[target_feature(enable = "avx512f")]
unsafe fn tile512<U: Unpack512, const R: usize, const M: usize>(
    w: &Block,
    r0: usize,
    x: &[f32],
) -> [[f32; M]; R] {
    check_tile(w, r0, R, x, M);
    let (k, gs, groups, words) = (w.k, w.group_size, w.groups(), w.words());
    let (sp, bp) = (
        w.scales.as_ptr().add(r0 * groups),
        w.biases.as_ptr().add(r0 * groups),
    );
    let mut rows = [w.packed.as_ptr(); R];
    for (r, row) in rows.iter_mut().enumerate() {
        *row = row.add((r0 + r) * words);
    }
    let mut acc = [[[_mm512_setzero_ps(); 2]; M]; R];
    let mut e = 0;
    for g in 0..groups {
        let mut state = [U::group(0.0, 0.0); R];
        for (r, s) in state.iter_mut().enumerate() {
            *s = U::group(*sp.add(r * groups + g), *bp.add(r * groups + g));
        }
        let end = e + gs;
        while e < end {
            for r in 0..R {
                let wv = U::step(rows[r], e, state[r]);
                for (i, acc) in acc[r].iter_mut().enumerate() {
                    let xr = x.as_ptr().add(i * k + e);
                    for h in 0..2 {
                        let xv = _mm512_loadu_ps(xr.add(16 * h));
                        acc[h] = _mm512_fmadd_ps(wv[h], xv, acc[h]);
                    }
                }
            }
            e += 32;
        }
    }
    let mut sums = [[0f32; M]; R];
    for r in 0..R {
        for i in 0..M {
            sums[r][i] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][i][0], acc[r][i][1]));
        }
    }
    sums
}

/// Rows of x in groups of up to 4. Weight rows one at a time for one row of x (decoding:
/// the hardware prefetchers follow a single stream through memory much better than several
/// interleaved ones), 4 at a time for two rows of x, else 2 (to stay within the 32
/// registers).
#[target_feature(enable = "avx512f")]
unsafe fn run512<U: Unpack512>(w: &Block, x: &[f32], out_rows: &mut [&mut [f32]]) {
    let k = w.k;
    let m = out_rows.len().min(x.len() / k);
    let mut i0 = 0;
    while i0 < m {
        let (x, out) = (&x[i0 * k..], &mut out_rows[i0..]);
        i0 += match m - i0 {
            1 => tile_rows::<1, 1>(w, x, out, tile512::<U, 1, 1>, tile512::<U, 1, 1>),
            2 => tile_rows::<4, 2>(w, x, out, tile512::<U, 4, 2>, tile512::<U, 1, 2>),
            3 => tile_rows::<2, 3>(w, x, out, tile512::<U, 2, 3>, tile512::<U, 1, 3>),
            _ => tile_rows::<2, 4>(w, x, out, tile512::<U, 2, 4>, tile512::<U, 1, 4>),
        };
    }
}

// ---------------------------------------------------------------- AVX2

/// As `Unpack512`, in four vectors of 8 lanes.
trait Unpack256 {
    type Group: Copy;
    unsafe fn group(scale: f32, bias: f32) -> Self::Group;
    unsafe fn step(row: *const u32, e: usize, group: Self::Group) -> [__m256; 4];
}

/// 4 bits: 8 bytes widened to 8 lanes give 16 elements, low nibbles then high ones.
impl Unpack256 for Q4 {
    type Group = (__m256, __m256);

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn group(scale: f32, bias: f32) -> Self::Group {
        (_mm256_set1_ps(scale), _mm256_set1_ps(bias))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn step(row: *const u32, e: usize, (scale, bias): Self::Group) -> [__m256; 4] {
        let bytes = (row as *const u8).add(e / 2);
        let nibble = _mm256_set1_epi32(0xf);
        let mut out = [_mm256_setzero_ps(); 4];
        for half in 0..2 {
            let v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(bytes.add(8 * half) as *const __m128i));
            let q = [_mm256_and_si256(v, nibble), _mm256_srli_epi32(v, 4)];
            for (j, q) in q.into_iter().enumerate() {
                out[2 * half + j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), scale, bias);
            }
        }
        out
    }
}

impl Unpack256 for Q8 {
    type Group = (__m256, __m256);

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn group(scale: f32, bias: f32) -> Self::Group {
        (_mm256_set1_ps(scale), _mm256_set1_ps(bias))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn step(row: *const u32, e: usize, (scale, bias): Self::Group) -> [__m256; 4] {
        let bytes = (row as *const u8).add(e);
        let mut out = [_mm256_setzero_ps(); 4];
        for (c, o) in out.iter_mut().enumerate() {
            let v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(bytes.add(8 * c) as *const __m128i));
            *o = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), scale, bias);
        }
        out
    }
}

impl<const B: usize> Unpack256 for Bits<B> {
    type Group = (__m256, __m256);

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn group(scale: f32, bias: f32) -> Self::Group {
        (_mm256_set1_ps(scale), _mm256_set1_ps(bias))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn step(row: *const u32, e: usize, (scale, bias): Self::Group) -> [__m256; 4] {
        let t = &Self::TABLE;
        // Lanes 0..B hold the pack's words; the load reads nothing past them.
        let lanes = _mm256_cmpgt_epi32(
            _mm256_set1_epi32(B as i32),
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
        );
        let pack = _mm256_maskload_epi32(row.add(e / 32 * B) as *const i32, lanes);
        let mask = _mm256_set1_epi32((1 << B) - 1);
        let mut out = [_mm256_setzero_ps(); 4];
        for (c, o) in out.iter_mut().enumerate() {
            let at = 8 * c;
            let low = _mm256_permutevar8x32_epi32(pack, load8(&t.word, at));
            let high = _mm256_permutevar8x32_epi32(pack, load8(&t.next_word, at));
            let q = _mm256_or_si256(
                _mm256_srlv_epi32(low, load8(&t.shift_right, at)),
                _mm256_sllv_epi32(high, load8(&t.shift_left, at)),
            );
            let q = _mm256_cvtepi32_ps(_mm256_and_si256(q, mask));
            *o = _mm256_fmadd_ps(q, scale, bias);
        }
        out
    }
}

/// Lanes `at..at + 8` of a table row.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn load8(a: &[i32; 32], at: usize) -> __m256i {
    debug_assert!(at + 8 <= 32);
    _mm256_loadu_si256(a.as_ptr().add(at) as *const __m256i)
}

#[target_feature(enable = "avx2,fma")]
unsafe fn tile256<U: Unpack256, const R: usize, const M: usize>(
    w: &Block,
    r0: usize,
    x: &[f32],
) -> [[f32; M]; R] {
    check_tile(w, r0, R, x, M);
    let (k, gs, groups, words) = (w.k, w.group_size, w.groups(), w.words());
    let (sp, bp) = (
        w.scales.as_ptr().add(r0 * groups),
        w.biases.as_ptr().add(r0 * groups),
    );
    let mut rows = [w.packed.as_ptr(); R];
    for (r, row) in rows.iter_mut().enumerate() {
        *row = row.add((r0 + r) * words);
    }
    let mut acc = [[[_mm256_setzero_ps(); 2]; M]; R];
    let mut e = 0;
    for g in 0..groups {
        let mut state = [U::group(0.0, 0.0); R];
        for (r, s) in state.iter_mut().enumerate() {
            *s = U::group(*sp.add(r * groups + g), *bp.add(r * groups + g));
        }
        let end = e + gs;
        while e < end {
            for r in 0..R {
                let wv = U::step(rows[r], e, state[r]);
                for (i, acc) in acc[r].iter_mut().enumerate() {
                    let xr = x.as_ptr().add(i * k + e);
                    for c in 0..4 {
                        let xv = _mm256_loadu_ps(xr.add(8 * c));
                        acc[c % 2] = _mm256_fmadd_ps(wv[c], xv, acc[c % 2]);
                    }
                }
            }
            e += 32;
        }
    }
    let mut sums = [[0f32; M]; R];
    for r in 0..R {
        for i in 0..M {
            sums[r][i] = hsum256(_mm256_add_ps(acc[r][i][0], acc[r][i][1]));
        }
    }
    sums
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// Rows of x in groups of up to 4. Weight rows one at a time for one row of x (see
/// `run512`), 2 at a time for two rows of x, else 1 (AVX2 has 16 registers).
#[target_feature(enable = "avx2,fma")]
unsafe fn run256<U: Unpack256>(w: &Block, x: &[f32], out_rows: &mut [&mut [f32]]) {
    let k = w.k;
    let m = out_rows.len().min(x.len() / k);
    let mut i0 = 0;
    while i0 < m {
        let (x, out) = (&x[i0 * k..], &mut out_rows[i0..]);
        i0 += match m - i0 {
            1 => tile_rows::<1, 1>(w, x, out, tile256::<U, 1, 1>, tile256::<U, 1, 1>),
            2 => tile_rows::<2, 2>(w, x, out, tile256::<U, 2, 2>, tile256::<U, 1, 2>),
            3 => tile_rows::<1, 3>(w, x, out, tile256::<U, 1, 3>, tile256::<U, 1, 3>),
            _ => tile_rows::<1, 4>(w, x, out, tile256::<U, 1, 4>, tile256::<U, 1, 4>),
        };
    }
}
