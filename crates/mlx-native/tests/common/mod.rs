//! Test data and checks shared by the test binaries that compare backends (each binary uses
//! a part of it).
#![allow(dead_code)]

use mlx_native::{CommandEncoder, Device, Result, Tensor};

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
