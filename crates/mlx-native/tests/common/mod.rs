//! Test data and checks shared by the test binaries that compare backends (each binary uses
//! a part of it).
#![allow(dead_code)]

use mlx_native::{CommandEncoder, Device, Result, SamplingParams, Tensor};

/// SplitMix64: small, seeded, good enough for test data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-scale, scale], never zero.
    pub fn sym(&mut self, scale: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        let v = (2.0 * u - 1.0) * scale;
        if v == 0.0 {
            scale * 0.5
        } else {
            v
        }
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.sym(scale)).collect()
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// An f32 output filled with NaN, so that unwritten elements fail the comparison.
pub fn poisoned(dev: &Device, shape: &[usize]) -> Result<Tensor> {
    dev.from_slice(&vec![f32::NAN; shape.iter().product()], shape)
}

pub fn run(dev: &Device, record: impl FnOnce(&mut CommandEncoder) -> Result<()>) -> Result<()> {
    let mut enc = CommandEncoder::new(dev);
    record(&mut enc)?;
    enc.commit_and_wait()
}

/// ‖got − want‖ ≤ tol·‖want‖, and every element finite.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut err = 0.0;
    let mut norm = 0.0;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{what}: element {i} is {g} (expected {w})");
        err += (g as f64 - w) * (g as f64 - w);
        norm += w * w;
    }
    let rel = err.sqrt() / norm.sqrt().max(1e-30);
    assert!(rel <= tol, "{what}: relative error {rel:e} > {tol:e}");
}

/// The CPU backend's uniform draw for (seed, pos): one SplitMix64 step from seed ⊕ pos·γ,
/// its top 53 bits over 2⁵³.
pub fn uniform(seed: u64, pos: usize) -> f64 {
    let mut state = Rng(seed ^ (pos as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    (state.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// Sampling as the CPU backend specifies it, by sorting: penalty, argmax; then min-p, top-k
/// and top-p over the rank order (logit descending, id ascending) and an inverse-CDF draw.
pub fn sample_ref(logits: &[f32], history: &[u32], pos: usize, p: &SamplingParams) -> u32 {
    let mut l = logits.to_vec();
    if p.repetition_penalty != 1.0 && p.repetition_window > 0 {
        let window = &history[(pos + 1).saturating_sub(p.repetition_window)..=pos];
        let seen: std::collections::BTreeSet<u32> = window.iter().copied().collect();
        for t in seen {
            if let Some(v) = l.get_mut(t as usize) {
                *v = if *v < 0.0 {
                    *v * p.repetition_penalty
                } else {
                    *v / p.repetition_penalty
                };
            }
        }
    }
    let best = (0..l.len()).fold(0, |b, i| {
        if l[i] > l[b] || l[b].is_nan() && !l[i].is_nan() {
            i
        } else {
            b
        }
    });
    if p.temperature == 0.0 || !l[best].is_finite() {
        return best as u32;
    }
    let max = l[best];
    let floor = if p.min_p > 0.0 {
        max + p.min_p.ln()
    } else {
        f32::NEG_INFINITY
    };
    let mut kept: Vec<usize> = (0..l.len())
        .filter(|&i| l[i] >= floor && l[i] > f32::NEG_INFINITY)
        .collect();
    kept.sort_by(|&a, &b| l[b].total_cmp(&l[a]).then(a.cmp(&b)));
    if p.top_k > 0 && p.top_k < kept.len() {
        kept.truncate(p.top_k);
    }
    if p.top_p < 1.0 {
        // Each token's share of the untempered mass, summed in id order.
        let mass: Vec<f64> = l
            .iter()
            .map(|&v| {
                let weighs = v > f32::NEG_INFINITY; // −∞ and NaN weigh nothing
                if weighs {
                    ((v - max) as f64).exp()
                } else {
                    0.0
                }
            })
            .collect();
        let limit = p.top_p as f64 * mass.iter().sum::<f64>();
        let (mut above, mut n) = (0.0, 0);
        while n < kept.len() && above < limit {
            above += mass[kept[n]];
            n += 1;
        }
        while n < kept.len() && l[kept[n]] == l[kept[n - 1]] {
            n += 1;
        }
        kept.truncate(n);
    }
    let inv_t = 1.0 / p.temperature as f64;
    let w = |i: usize| ((l[i] - max) as f64 * inv_t).exp();
    let target = uniform(p.seed, pos) * kept.iter().map(|&i| w(i)).sum::<f64>();
    let mut acc = 0.0;
    for &i in &kept {
        acc += w(i);
        if acc > target {
            return i as u32;
        }
    }
    *kept.last().unwrap() as u32
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K or Q5_K super-block, from its 12 packed
/// bytes `sc` (ggml's get_scale_min_k4, restated).
pub fn k_scale_min(sc: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (sc[j] & 63, sc[j + 4] & 63)
    } else {
        (
            (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4),
            (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4),
        )
    }
}
