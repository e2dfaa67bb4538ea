//! Random-weight models of real shapes, for benchmarks of models one does not have on disk
//! (Llama-3.2-1B, Llama-3.1-8B …). Each matrix repeats a few random rows quantized with the
//! reference quantizers, so building an 8B model takes seconds; speed does not depend on
//! the values.

use crate::core::device::Device;
use crate::core::tensor::Tensor;
use crate::models::decoder::{Architecture, DecoderParams, RopeParams};
use crate::models::WeightSource;
use crate::ops::{Linear, RopeScaling};
use crate::quant::{ggml, mlx_affine, GgmlType, WeightLayout};
use crate::{Error, Result};

/// Distinct random rows per matrix (then repeated).
const DISTINCT_ROWS: usize = 16;

/// Known shapes: (name, params), all of the Llama architecture.
pub fn preset(name: &str) -> Result<DecoderParams> {
    let llama = |hidden: usize, inter, layers, heads, kv, vocab, tie, theta| DecoderParams {
        arch: Architecture::LLAMA,
        hidden_size: hidden,
        intermediate_size: inter,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim: hidden / heads,
        vocab_size: vocab,
        rms_norm_eps: 1e-5,
        rope: RopeParams {
            theta,
            scaling: RopeScaling::None,
            traditional: false,
            rotary_dims: hidden / heads,
        },
        local_rope: None,
        layer_windows: vec![None; layers],
        attention_scale: 1.0 / ((hidden / heads) as f32).sqrt(),
        tie_word_embeddings: tie,
        max_position_embeddings: 8192,
    };
    Ok(match name {
        "smollm2-135m" => llama(576, 1536, 30, 9, 3, 49152, true, 100000.0),
        "llama-3.2-1b" => llama(2048, 8192, 16, 32, 8, 128256, true, 500000.0),
        "llama-3.1-8b" => llama(4096, 14336, 32, 32, 8, 128256, false, 500000.0),
        other => {
            return Err(Error::Invalid(format!(
                "unknown synthetic model `{other}` (known: {})",
                PRESETS.join(", ")
            )))
        }
    })
}

pub const PRESETS: &[&str] = &["smollm2-135m", "llama-3.2-1b", "llama-3.1-8b"];

/// Parse a layout name: `mlx{bits}g{group}`, a ggml type (`q4_0`, `q4_k` …) or `f16`/`bf16`/`f32`.
pub fn parse_layout(name: &str) -> Result<WeightLayout> {
    if let Some(rest) = name.strip_prefix("mlx") {
        if let Some((b, g)) = rest.split_once('g') {
            if let (Ok(bits), Ok(group_size)) = (b.parse(), g.parse()) {
                mlx_affine::check_params(bits, group_size)?;
                return Ok(WeightLayout::MlxAffine { bits, group_size });
            }
        }
    }
    match name {
        "f32" | "f16" | "bf16" => Ok(WeightLayout::Dense),
        _ => GgmlType::ALL
            .iter()
            .find(|t| t.name() == name)
            .map(|t| WeightLayout::Gguf(*t))
            .ok_or_else(|| {
                Error::UnsupportedQuant(format!(
                    "`{name}` (expected mlx{{bits}}g{{group}}, f16, bf16, f32 or a ggml type)"
                ))
            }),
    }
}

pub struct SyntheticWeights {
    device: Device,
    layout: WeightLayout,
    seed: std::cell::Cell<u64>,
}

impl SyntheticWeights {
    pub fn new(device: &Device, layout: WeightLayout, seed: u64) -> Self {
        SyntheticWeights {
            device: device.clone(),
            layout,
            seed: std::cell::Cell::new(seed),
        }
    }

    /// `len` values uniform in [-scale, scale) (splitmix64).
    fn random(&self, len: usize, scale: f32) -> Vec<f32> {
        let mut state = self.seed.get();
        let v = (0..len)
            .map(|_| {
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^= z >> 31;
                ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect();
        self.seed.set(state);
        v
    }
}

/// `rows` repeated until there are `n` of them.
fn tile<T: Copy>(rows: &[T], row_len: usize, n: usize) -> Vec<T> {
    let distinct = rows.len() / row_len.max(1);
    (0..n)
        .flat_map(|r| {
            rows[(r % distinct) * row_len..(r % distinct + 1) * row_len]
                .iter()
                .copied()
        })
        .collect()
}

impl WeightSource for SyntheticWeights {
    fn linear(&self, name: &str, n: usize, k: usize, bias: bool) -> Result<Linear> {
        let d = &self.device;
        // Uniform weights of std 1/√k keep activations in range through the layers.
        let rows = DISTINCT_ROWS.min(n);
        let w = self.random(rows * k, (3.0 / k as f32).sqrt());
        let tensors = match self.layout {
            WeightLayout::Dense => {
                let w: Vec<half::f16> = tile(&w, k, n)
                    .iter()
                    .map(|&v| half::f16::from_f32(v))
                    .collect();
                vec![d.from_slice(&w, &[n, k])?]
            }
            WeightLayout::MlxAffine { bits, group_size } => {
                let (q, s, b) = mlx_affine::quantize(&w, rows, k, bits, group_size)?;
                let f16 = |v: Vec<f32>| -> Vec<half::f16> {
                    v.into_iter().map(half::f16::from_f32).collect()
                };
                let (qk, gk) = (mlx_affine::packed_row_len(k, bits), k / group_size);
                vec![
                    d.from_slice(&tile(&q, qk, n), &[n, qk])?,
                    d.from_slice(&f16(tile(&s, gk, n)), &[n, gk])?,
                    d.from_slice(&f16(tile(&b, gk, n)), &[n, gk])?,
                ]
            }
            WeightLayout::Gguf(t) => {
                let bytes: Vec<u8> = w
                    .chunks(k)
                    .map(|row| ggml::quantize_row(t, row))
                    .collect::<Result<Vec<_>>>()?
                    .concat();
                let row_bytes = t.row_bytes(k);
                vec![d.from_slice(&tile(&bytes, row_bytes, n), &[n * row_bytes])?]
            }
        };
        let bias = if bias {
            Some(d.from_slice(&self.random(n, 0.1), &[n])?)
        } else {
            None
        };
        Linear::new(name, self.layout, tensors, bias, n, k)
    }

    fn vector(&self, _name: &str, len: usize) -> Result<Tensor> {
        let v: Vec<f32> = self.random(len, 0.1).iter().map(|x| 1.0 + x).collect();
        self.device.from_slice(&v, &[len])
    }

    fn has_linear(&self, _name: &str) -> bool {
        false
    }
}
