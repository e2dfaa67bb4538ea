//! y = x · Wᵀ with W in MLX affine layout, dequantized on the fly (each element
//! scale·q + bias in f32, as MLX does, times x, summed in f32).
//!
//! Decode (one row of x) reads every weight byte once, so speed is how fast packed words
//! turn into f32 lanes. On x86-64 SIMD kernels (AVX-512 or AVX2+FMA, picked at run time;
//! special ones for 4 and 8 bits, a general one for every width) work on tiles of weight
//! rows × rows of x, unpacking a weight block once per tile for all its rows of x. The
//! portable path (dequantize a row with the reference code, then dot products) serves every
//! `bits` anywhere and is the reference the SIMD kernels are tested against.

#[cfg(target_arch = "x86_64")]
mod x86;

use std::cell::RefCell;

use super::matmul::{dot, par_column_blocks};
use super::FloatSlice;
use crate::quant::mlx_affine::{check_params, dequantize_row, packed_row_len};
use crate::{Error, Result};

/// An MLX affine weight `[n, k]`: packed words `[n, k·bits/32]`, scales and biases
/// `[n, k/group_size]`.
pub(super) struct MlxAffine<'a> {
    pub packed: &'a [u32],
    pub scales: FloatSlice<'a>,
    pub biases: FloatSlice<'a>,
    pub bits: u32,
    pub group_size: usize,
    pub n: usize,
    pub k: usize,
}

/// out `[m, n]` = x `[m, k]` · Wᵀ.
pub(super) fn matmul(x: &[f32], w: &MlxAffine, out: &mut [f32]) -> Result<()> {
    matmul_with(Kernel::select(w.bits), x, w, out)
}

fn matmul_with(kernel: Kernel, x: &[f32], w: &MlxAffine, out: &mut [f32]) -> Result<()> {
    let (n, k) = (w.n, w.k);
    check_params(w.bits, w.group_size)?;
    let words = packed_row_len(k, w.bits);
    let groups = k / w.group_size;
    if k == 0
        || !k.is_multiple_of(w.group_size)
        || w.packed.len() != n * words
        || w.scales.len() != n * groups
        || w.biases.len() != n * groups
        || !x.len().is_multiple_of(k)
        || out.len() != x.len() / k * n
    {
        return Err(Error::op(
            "matmul",
            format!(
                "MLX {}-bit weight [{n}, {k}] (group {}) with {} words, {} scales, {} biases; x of {} and out of {} values",
                w.bits,
                w.group_size,
                w.packed.len(),
                w.scales.len(),
                w.biases.len(),
                x.len(),
                out.len()
            ),
        ));
    }
    let x = kernel.arrange_x(x);
    par_column_blocks(out, n, k, |col0, out_rows| {
        let cols = out_rows.first().map_or(0, |r| r.len());
        let len = cols * groups;
        SCALES_BIASES.with_borrow_mut(|buf| {
            if buf.len() < 2 * len {
                buf.resize(2 * len, 0.0);
            }
            let (scales, biases) = buf[..2 * len].split_at_mut(len);
            w.scales.convert(col0 * groups, scales)?;
            w.biases.convert(col0 * groups, biases)?;
            let block = Block {
                packed: &w.packed[col0 * words..(col0 + cols) * words],
                scales,
                biases,
                bits: w.bits,
                group_size: w.group_size,
                k,
            };
            kernel.run(&block, &x, out_rows)
        })
    })
}

thread_local! {
    /// A task's scales and biases in f32, kept per thread so that decoding allocates nothing.
    static SCALES_BIASES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The weight rows of one task, scales and biases already in f32.
struct Block<'a> {
    packed: &'a [u32],
    scales: &'a [f32],
    biases: &'a [f32],
    bits: u32,
    group_size: usize,
    k: usize,
}

impl Block<'_> {
    fn words(&self) -> usize {
        packed_row_len(self.k, self.bits)
    }
    fn groups(&self) -> usize {
        self.k / self.group_size
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    X86(x86::Kernel),
}

impl Kernel {
    /// Every kernel this CPU can run for `bits`, fastest first; the portable one is last.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    fn available(bits: u32) -> Vec<Kernel> {
        #[allow(unused_mut)]
        let mut all = Vec::new();
        #[cfg(target_arch = "x86_64")]
        all.extend(x86::Kernel::available(bits).into_iter().map(Kernel::X86));
        all.push(Kernel::Portable);
        all
    }

    fn select(bits: u32) -> Kernel {
        Kernel::available(bits)[0]
    }

    /// x rearranged to the element order in which the kernel unpacks weights.
    fn arrange_x(self, x: &[f32]) -> std::borrow::Cow<'_, [f32]> {
        match self {
            Kernel::Portable => x.into(),
            #[cfg(target_arch = "x86_64")]
            Kernel::X86(kernel) => kernel.arrange_x(x),
        }
    }

    fn run(self, w: &Block, x: &[f32], out_rows: &mut [&mut [f32]]) -> Result<()> {
        match self {
            Kernel::Portable => portable(w, x, out_rows),
            #[cfg(target_arch = "x86_64")]
            Kernel::X86(kernel) => {
                kernel.run(w, x, out_rows);
                Ok(())
            }
        }
    }
}

/// Any `bits`: dequantize one weight row (the reference `dequantize_row`), then one dot
/// product per row of x.
fn portable(w: &Block, x: &[f32], out_rows: &mut [&mut [f32]]) -> Result<()> {
    let (k, words, groups) = (w.k, w.words(), w.groups());
    let mut row = vec![0f32; k];
    let rows = w
        .packed
        .chunks_exact(words)
        .zip(w.scales.chunks_exact(groups));
    for (c, ((packed, scales), biases)) in rows.zip(w.biases.chunks_exact(groups)).enumerate() {
        dequantize_row(packed, scales, biases, w.bits, w.group_size, &mut row)?;
        for (out_row, x_row) in out_rows.iter_mut().zip(x.chunks_exact(k)) {
            out_row[c] = dot(&row, x_row);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Weights {
        packed: Vec<u32>,
        scales: Vec<f32>,
        biases: Vec<f32>,
        /// The same scales and biases stored as f16 and as bf16.
        halves: (Vec<half::f16>, Vec<half::f16>),
        bhalves: (Vec<half::bf16>, Vec<half::bf16>),
        n: usize,
        k: usize,
        bits: u32,
        group_size: usize,
    }

    /// How a view stores its scales and biases.
    #[derive(Clone, Copy, Debug)]
    enum Storage {
        F32,
        F16,
        BF16,
    }

    impl Weights {
        /// Random codes; scales and biases exact in f16 and bf16 (8-bit numerators over
        /// powers of two), so every storage holds the same values.
        fn random(n: usize, k: usize, bits: u32, group_size: usize, seed: u64) -> Weights {
            let mut rng = Lcg(seed);
            let groups = n * k / group_size;
            let mut exact = |unit: f32| (rng.next_u32() % 255) as f32 * unit - 127.0 * unit;
            let scales: Vec<f32> = (0..groups).map(|_| exact(1.0 / 1024.0)).collect();
            let biases: Vec<f32> = (0..groups).map(|_| exact(1.0 / 128.0)).collect();
            let to_f16 = |v: &[f32]| v.iter().map(|&x| half::f16::from_f32(x)).collect();
            let to_bf16 = |v: &[f32]| v.iter().map(|&x| half::bf16::from_f32(x)).collect();
            Weights {
                packed: (0..n * packed_row_len(k, bits))
                    .map(|_| rng.next_u32())
                    .collect(),
                halves: (to_f16(&scales), to_f16(&biases)),
                bhalves: (to_bf16(&scales), to_bf16(&biases)),
                scales,
                biases,
                n,
                k,
                bits,
                group_size,
            }
        }
        fn view(&self, storage: Storage) -> MlxAffine<'_> {
            let (scales, biases) = match storage {
                Storage::F32 => (FloatSlice::F32(&self.scales), FloatSlice::F32(&self.biases)),
                Storage::F16 => (
                    FloatSlice::F16(&self.halves.0),
                    FloatSlice::F16(&self.halves.1),
                ),
                Storage::BF16 => (
                    FloatSlice::BF16(&self.bhalves.0),
                    FloatSlice::BF16(&self.bhalves.1),
                ),
            };
            MlxAffine {
                packed: &self.packed,
                scales,
                biases,
                bits: self.bits,
                group_size: self.group_size,
                n: self.n,
                k: self.k,
            }
        }
        /// Row r dequantized by the reference code, in f64.
        fn row(&self, r: usize) -> Vec<f64> {
            let (words, groups) = (packed_row_len(self.k, self.bits), self.k / self.group_size);
            let mut out = vec![0f32; self.k];
            dequantize_row(
                &self.packed[r * words..(r + 1) * words],
                &self.scales[r * groups..(r + 1) * groups],
                &self.biases[r * groups..(r + 1) * groups],
                self.bits,
                self.group_size,
                &mut out,
            )
            .unwrap();
            out.iter().map(|&v| v as f64).collect()
        }
    }

    struct Lcg(u64);

    impl Lcg {
        fn next_u32(&mut self) -> u32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 32) as u32
        }
        /// Uniform in [-1, 1).
        fn next_f32(&mut self) -> f32 {
            (self.next_u32() >> 8) as f32 / (1 << 23) as f32 - 1.0
        }
    }

    /// Each kernel against an f64 reference, over every tile shape (rows of x 1..=9 cover
    /// tiles of 1 to 4 rows and the loop over groups of rows; 37 weight rows leave a tail
    /// of single rows), every group size and every storage of scales and biases. Tolerance
    /// 1e-5·Σ|x·w| (f32 accumulation).
    #[test]
    fn kernels_match_f64_reference() {
        for bits in [2, 3, 4, 5, 6, 8] {
            for group_size in [32, 64, 128] {
                let (n, k) = (37, 3 * group_size);
                let w = Weights::random(
                    n,
                    k,
                    bits,
                    group_size,
                    bits as u64 * 1000 + group_size as u64,
                );
                let mut rng = Lcg(99);
                for m in 1..=9 {
                    let x: Vec<f32> = (0..m * k).map(|_| rng.next_f32()).collect();
                    let storages = [Storage::F32, Storage::F16, Storage::BF16];
                    for (kernel, storage) in Kernel::available(bits)
                        .into_iter()
                        .flat_map(|k| storages.map(|s| (k, s)))
                    {
                        let mut out = vec![f32::NAN; m * n];
                        matmul_with(kernel, &x, &w.view(storage), &mut out).unwrap();
                        for r in 0..n {
                            let row = w.row(r);
                            for i in 0..m {
                                let xs = &x[i * k..(i + 1) * k];
                                let want: f64 =
                                    row.iter().zip(xs).map(|(w, &x)| w * x as f64).sum();
                                let size: f64 =
                                    row.iter().zip(xs).map(|(w, &x)| (w * x as f64).abs()).sum();
                                let got = out[i * n + r] as f64;
                                assert!(
                                    (got - want).abs() <= 1e-5 * size,
                                    "{kernel:?} {storage:?} bits={bits} gs={group_size} m={m} [{i}, {r}]: {got} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// Per-kernel decode speed for every `bits` on SmolLM2-135M's 1536×576 MLP weight shape
    /// (group 64):
    /// `cargo test --release -p mlx-native --lib qmatmul_mlx -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_kernels() {
        let (n, k, group_size) = (1536, 576, 64);
        let x: Vec<f32> = (0..k).map(|i| (i as f32).sin()).collect();
        for bits in [2, 3, 4, 5, 6, 8] {
            let w = Weights::random(n, k, bits, group_size, 1);
            let bytes = (w.packed.len() + w.scales.len() * 2) * 4;
            for kernel in Kernel::available(bits) {
                let mut out = vec![0f32; n];
                let mut best = f64::INFINITY;
                for _ in 0..7 {
                    let start = std::time::Instant::now();
                    for _ in 0..50 {
                        matmul_with(kernel, &x, &w.view(Storage::F16), &mut out).unwrap();
                    }
                    best = best.min(start.elapsed().as_secs_f64() / 50.0);
                }
                println!(
                    "{bits}-bit {kernel:?}: {:.1} us, {:.1} GB/s",
                    best * 1e6,
                    bytes as f64 / best / 1e9
                );
            }
        }
    }
}
