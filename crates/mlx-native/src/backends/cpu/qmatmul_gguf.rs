//! Matrix products over GGUF (ggml block) weights, with f32 activations.
//!
//! Quantized weights (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) are dequantized on the
//! fly, a block at a time in registers, into exactly the f32 values of the reference
//! `quant::ggml::dequantize_row`; they are multiplied by x and summed in f32. This is the
//! product MLX computes from the same quantized values (an exact MLX twin of a GGUF file
//! gives the same logits to f32 rounding). ggml's CPU path instead rounds x to 8 bits per
//! block of 32, which moves logits by up to about 0.5% and can change greedy answers.
//! Float weights (F32, F16, BF16) are read the same way, an element per "block".
//!
//! Threads own blocks of output columns (weight rows), as for every layout (see
//! `matmul::par_column_blocks`). On x86-64 the kernels use AVX-512 or AVX2, picked at run
//! time (`x86`); the portable path (dequantize a row with the reference code, then dot
//! products) runs anywhere and is the reference the SIMD kernels are tested against.

#[cfg(target_arch = "x86_64")]
mod x86;

use std::sync::OnceLock;

use super::matmul::{dot, par_column_blocks};
use crate::quant::ggml::{dequantize_row, GgmlType};
use crate::{Error, Result};

/// out `[m, n]` = x `[m, k]` · Wᵀ, with W `n` rows of `k` elements in ggml type `t`
/// (`w` holds the rows' blocks back to back, as in a GGUF file; `k` a multiple of the block
/// size).
pub(super) fn matmul_gguf(
    t: GgmlType,
    x: &[f32],
    w: &[u8],
    n: usize,
    k: usize,
    out: &mut [f32],
) -> Result<()> {
    matmul_with(Kernel::detected(), t, x, w, n, k, out)
}

fn matmul_with(
    kernel: Kernel,
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
    par_column_blocks(out, n, k, |c0, out_rows| {
        let cols = out_rows.first().map_or(0, |r| r.len());
        kernel.run(
            t,
            &w[c0 * row_bytes..(c0 + cols) * row_bytes],
            k,
            x,
            out_rows,
        )
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    X86(x86::Isa),
}

impl Kernel {
    /// Every kernel this CPU runs, fastest first; the portable one is last.
    fn available() -> Vec<Kernel> {
        #[allow(unused_mut)]
        let mut all = Vec::new();
        #[cfg(target_arch = "x86_64")]
        all.extend(x86::Isa::available().into_iter().map(Kernel::X86));
        all.push(Kernel::Portable);
        all
    }

    fn detected() -> Kernel {
        static KERNEL: OnceLock<Kernel> = OnceLock::new();
        *KERNEL.get_or_init(|| Kernel::available()[0])
    }

    /// `out_rows[i][c]` = row i of x · weight row c, for every row c in `w`.
    fn run(
        self,
        t: GgmlType,
        w: &[u8],
        k: usize,
        x: &[f32],
        out_rows: &mut [&mut [f32]],
    ) -> Result<()> {
        let row_bytes = t.row_bytes(k);
        match self {
            Kernel::Portable => portable(t, w, row_bytes, k, x, out_rows),
            #[cfg(target_arch = "x86_64")]
            Kernel::X86(isa) => {
                x86::run(isa, t, w, row_bytes, k, x, out_rows);
                // Float rows whose length is not a multiple of the SIMD step end here.
                let done = k / x86::FLOAT_STEP * x86::FLOAT_STEP;
                if t.block_size() == 1 && done < k {
                    add_float_tail(t, w, row_bytes, done, k, x, out_rows)?;
                }
                Ok(())
            }
        }
    }
}

/// Any type: dequantize a weight row with the reference code, then one dot product per
/// row of x.
fn portable(
    t: GgmlType,
    w: &[u8],
    row_bytes: usize,
    k: usize,
    x: &[f32],
    out_rows: &mut [&mut [f32]],
) -> Result<()> {
    let mut row = vec![0f32; k];
    for (c, wrow) in w.chunks_exact(row_bytes).enumerate() {
        dequantize_row(t, wrow, &mut row)?;
        for (out, xr) in out_rows.iter_mut().zip(x.chunks_exact(k)) {
            out[c] = dot(&row, xr);
        }
    }
    Ok(())
}

/// Adds elements `from..k` of every float weight row times x to `out_rows`.
#[cfg(target_arch = "x86_64")]
fn add_float_tail(
    t: GgmlType,
    w: &[u8],
    row_bytes: usize,
    from: usize,
    k: usize,
    x: &[f32],
    out_rows: &mut [&mut [f32]],
) -> Result<()> {
    let mut tail = vec![0f32; k - from];
    for (c, wrow) in w.chunks_exact(row_bytes).enumerate() {
        dequantize_row(t, &wrow[from * t.block_bytes()..], &mut tail)?;
        for (out, xr) in out_rows.iter_mut().zip(x.chunks_exact(k)) {
            out[c] += dot(&tail, &xr[from..]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::cpu::matmul::column_block;
    use crate::quant::ggml::quantize_row;

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

    /// x · dequantized Wᵀ in f64, and Σ|x·w| of every output (the scale of f32 rounding).
    fn reference(x: &[f32], deq: &[f32], n: usize, k: usize) -> (Vec<f64>, Vec<f64>) {
        let m = x.len() / k;
        let (mut out, mut size) = (vec![0.0; m * n], vec![0.0; m * n]);
        for i in 0..m {
            for j in 0..n {
                for e in 0..k {
                    let p = x[i * k + e] as f64 * deq[j * k + e] as f64;
                    out[i * n + j] += p;
                    size[i * n + j] += p.abs();
                }
            }
        }
        (out, size)
    }

    /// One kernel over all rows, as one task.
    fn product_with(
        kernel: Kernel,
        t: GgmlType,
        x: &[f32],
        w: &[u8],
        n: usize,
        k: usize,
    ) -> Vec<f32> {
        let mut out = vec![f32::NAN; x.len() / k * n];
        let mut rows: Vec<&mut [f32]> = out.chunks_mut(n).collect();
        kernel.run(t, w, k, x, &mut rows).unwrap();
        out
    }

    /// Each kernel against an f64 reference, for every type, over every tile shape (rows of
    /// x 1..=9 cover tiles of 1 to 4 rows and the loop over groups of rows; 37 weight rows
    /// leave a tail of single rows); float rows of 101 elements end after the SIMD steps.
    /// Tolerance 1e-5·Σ|x·w| (f32 accumulation; rounding x to 8 bits would miss it by
    /// orders of magnitude).
    #[test]
    fn every_kernel_matches_the_f64_reference() {
        let n = 37;
        for t in GgmlType::ALL {
            let k = match t.block_size() {
                1 => 101,
                32 => 11 * 32,
                _ => 3 * 256,
            };
            let (w, deq) = weights(t, n, k, 7 + t.id() as u64);
            for m in 1..=9 {
                let x = random(m * k, 99 + m as u64);
                let (want, size) = reference(&x, &deq, n, k);
                for kernel in Kernel::available() {
                    let got = product_with(kernel, t, &x, &w, n, k);
                    for (j, (&g, (&w, &s))) in got.iter().zip(want.iter().zip(&size)).enumerate() {
                        assert!(
                            (g as f64 - w).abs() <= 1e-5 * s,
                            "{t:?} {kernel:?} m={m} [{}, {}]: {g} vs {w}",
                            j / n,
                            j % n
                        );
                    }
                }
            }
        }
    }

    /// Splitting the columns over threads changes no bit: every output is summed in the
    /// same order whichever task and tile computes it.
    #[test]
    fn split_products_equal_single_task_ones() {
        let (n, k) = (301, 512);
        assert!(column_block(n, 1, k) < n || rayon::current_num_threads() == 1);
        for t in [GgmlType::Q4_1, GgmlType::Q6K, GgmlType::F16] {
            let (w, _) = weights(t, n, k, 21);
            for m in [1, 5] {
                let x = random(m * k, 4);
                let mut got = vec![0.0; m * n];
                matmul_gguf(t, &x, &w, n, k, &mut got).unwrap();
                assert_eq!(
                    got,
                    product_with(Kernel::detected(), t, &x, &w, n, k),
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

    /// Best-of-many time of `f`.
    fn best_of(runs: usize, mut f: impl FnMut()) -> f64 {
        (0..runs)
            .map(|_| {
                let start = std::time::Instant::now();
                f();
                start.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    }

    /// Decode-shaped matrix-vector products (SmolLM2-135M's shapes, lm-head included):
    /// best-of-many time and weight bandwidth per kernel on one thread, and on all threads.
    /// Run with `cargo test -p mlx-native --lib bench_matvec -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_matvec() {
        for (t, n, k) in [
            (GgmlType::Q4_1, 1536, 576),
            (GgmlType::Q4_1, 576, 1536),
            (GgmlType::Q4_1, 576, 576),
            (GgmlType::Q4_0, 1536, 576),
            (GgmlType::Q8_0, 1536, 576),
            (GgmlType::Q5_0, 1536, 576),
            (GgmlType::Q5_1, 1536, 576),
            (GgmlType::Q4K, 1536, 768),
            (GgmlType::Q5K, 1536, 768),
            (GgmlType::Q6K, 1536, 768),
            (GgmlType::F16, 1536, 576),
            (GgmlType::Q8_0, 49152, 576),
        ] {
            let (w, _) = weights(t, n, k, 1);
            let x = random(k, 2);
            let mut out = vec![0.0; n];
            let runs = (400_000_000 / (n * k)).clamp(20, 2000);
            let report = |what: String, secs: f64| {
                println!(
                    "{:>5} {n:>5}x{k:<5} {what:>24}: {:7.1} us {:5.1} GB/s {:5.2} ns/32 weights",
                    t.name(),
                    secs * 1e6,
                    w.len() as f64 / secs / 1e9,
                    secs * 1e9 * 32.0 / (n * k) as f64
                )
            };
            for kernel in Kernel::available() {
                let secs = best_of(runs, || {
                    let mut rows = [&mut out[..]];
                    kernel.run(t, &w, k, &x, &mut rows).unwrap();
                });
                report(format!("{kernel:?}"), secs);
            }
            let secs = best_of(runs, || matmul_gguf(t, &x, &w, n, k, &mut out).unwrap());
            report(format!("{} threads", rayon::current_num_threads()), secs);
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
                let kernel = Kernel::detected();
                let mut out = vec![0.0; m * n];
                let secs = best_of((200 / m).max(5), || {
                    let mut rows: Vec<&mut [f32]> = out.chunks_mut(n).collect();
                    kernel.run(t, &w, k, &x, &mut rows).unwrap();
                });
                println!(
                    "{:>5} {n}x{k} m={m:<3} {kernel:?}: {:7.1} us, {:.3} ns per row and 32 weights",
                    t.name(),
                    secs * 1e6,
                    secs * 1e9 / (m * n * k / 32) as f64
                );
            }
        }
    }

    /// Every matrix-vector product of one SmolLM2-135M decode step (30 layers of q, k, v, o,
    /// gate, up, down, then the tied Q8_0 lm-head) on the shared GGUF's weights, which do
    /// not fit in cache. Run with
    /// `cargo test -p mlx-native --lib bench_smollm2 -- --ignored --nocapture`.
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
        // Inside a pool, as the CPU backend runs a decode step.
        let pool = rayon::ThreadPoolBuilder::new().build().unwrap();
        let mut step = || {
            pool.install(|| {
                for &(t, w, n, k) in &mats {
                    matmul_gguf(t, &x[..k], w, n, k, &mut out[..n]).unwrap();
                }
            })
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
                Kernel::detected(),
                secs * 1e3,
                bytes as f64 / secs / 1e9,
            );
        }
    }
}
