//! Random-weight models of real shapes, for benchmarks of models one does not have on disk
//! (Llama-3.2-1B, Llama-3.1-8B, Qwen3-30B-A3B …). Each matrix repeats a few random rows
//! quantized with the reference quantizers, written to the device a chunk at a time, so
//! building even a 30B model takes seconds and little host memory; speed does not depend on
//! the values. Presets of families other than Llama are their config.json fields, read by
//! the family's own config reader.

use std::path::Path;

use serde_json::json;

use crate::core::device::Device;
use crate::core::dtype::Element;
use crate::core::tensor::Tensor;
use crate::models::decoder::{Architecture, DecoderParams, RopeParams};
use crate::models::family::decoder_params;
use crate::models::WeightSource;
use crate::ops::{ExpertLinear, Linear, RopeScaling};
use crate::quant::{ggml, mlx_affine, GgmlType, WeightLayout};
use crate::{Error, Result};

/// Distinct random rows per matrix (then repeated).
const DISTINCT_ROWS: usize = 16;

/// Bytes written to the device per copy while building a matrix.
const UPLOAD_CHUNK: usize = 64 << 20;

/// The parameters of a config.json of `model_type` (a preset's published fields).
fn from_config(name: &str, model_type: &str, config: serde_json::Value) -> Result<DecoderParams> {
    decoder_params(model_type, &config, Path::new(name))?
        .ok_or_else(|| Error::Invalid(format!("preset `{name}`: no reader for {model_type}")))
}

/// Known shapes by name: the Llama ones from their sizes, the others from the fields of
/// their published config.json (Qwen/Qwen3-0.6B, google/gemma-3-1b-it, Qwen/Qwen3-30B-A3B).
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
        moe: None,
    };
    Ok(match name {
        "smollm2-135m" => llama(576, 1536, 30, 9, 3, 49152, true, 100000.0),
        "llama-3.2-1b" => llama(2048, 8192, 16, 32, 8, 128256, true, 500000.0),
        "llama-3.1-8b" => llama(4096, 14336, 32, 32, 8, 128256, false, 500000.0),
        "qwen3-0.6b" => from_config(
            name,
            "qwen3",
            json!({"hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
                "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
                "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                "tie_word_embeddings": true, "max_position_embeddings": 40960}),
        )?,
        "gemma-3-1b" => from_config(
            name,
            "gemma3_text",
            json!({"hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26,
                "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
                "vocab_size": 262144, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                "rope_local_base_freq": 10000.0, "sliding_window": 512,
                "sliding_window_pattern": 6, "query_pre_attn_scalar": 256,
                "max_position_embeddings": 32768}),
        )?,
        "qwen3-30b-a3b" => from_config(
            name,
            "qwen3_moe",
            json!({"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 48,
                "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
                "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
                "decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": true,
                "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                "tie_word_embeddings": false, "max_position_embeddings": 40960}),
        )?,
        other => {
            return Err(Error::Invalid(format!(
                "unknown synthetic model `{other}` (known: {})",
                PRESETS.join(", ")
            )))
        }
    })
}

pub const PRESETS: &[&str] = &[
    "smollm2-135m",
    "llama-3.2-1b",
    "llama-3.1-8b",
    "qwen3-0.6b",
    "gemma-3-1b",
    "qwen3-30b-a3b",
];

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

/// How a synthetic model's matrices are stored.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SyntheticQuant {
    /// Every matrix alike.
    Uniform(WeightLayout),
    /// llama.cpp's Q4_K_M or Q5_K_M mix (`base` Q4_K or Q5_K) of a model of `layers` layers, as
    /// `llama-quantize` writes it: Q6_K for the output matrix (the embedding, where tied) and
    /// for v and down (experts' too) in layers i < n/8, i ≥ 7n/8 and every third between; F32
    /// for MoE routers (`ffn_gate_inp`, which llama.cpp's converter writes in F32 and
    /// llama-quantize leaves); `base` elsewhere;
    /// and as it falls back for rows that are not whole super-blocks of 256 (SmolLM2's 576):
    /// Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0.
    KQuantMix {
        base: GgmlType,
        layers: usize,
        tied: bool,
    },
}

impl SyntheticQuant {
    /// `q4_k_m`, `q5_k_m`, or a layout name (`parse_layout`) for every matrix.
    pub fn parse(name: &str, params: &DecoderParams) -> Result<SyntheticQuant> {
        let mix = |base| SyntheticQuant::KQuantMix {
            base,
            layers: params.num_layers,
            tied: params.tie_word_embeddings,
        };
        Ok(match name {
            "q4_k_m" => mix(GgmlType::Q4K),
            "q5_k_m" => mix(GgmlType::Q5K),
            _ => SyntheticQuant::Uniform(parse_layout(name)?),
        })
    }

    /// The layout of the matrix the decoder loads as `name`, of rows of `k`.
    fn layout_of(self, name: &str, k: usize) -> WeightLayout {
        let (base, layers, tied) = match self {
            SyntheticQuant::Uniform(layout) => return layout,
            SyntheticQuant::KQuantMix { base, layers, tied } => (base, layers, tied),
        };
        if name.ends_with(".gate") {
            return WeightLayout::Gguf(GgmlType::F32);
        }
        let more_bits = |i: usize| {
            let eighth = layers / 8;
            i < eighth || i >= 7 * layers / 8 || (i - eighth) % 3 == 2
        };
        let layer = name
            .strip_prefix("model.layers.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|i| i.parse::<usize>().ok());
        let six_bits = match layer {
            Some(i) => (name.ends_with("v_proj") || name.ends_with("down_proj")) && more_bits(i),
            None => name == "lm_head" || (tied && name == "model.embed_tokens"),
        };
        let ty = if six_bits { GgmlType::Q6K } else { base };
        WeightLayout::Gguf(match ty {
            _ if k.is_multiple_of(256) => ty,
            GgmlType::Q4K => GgmlType::Q5_0,
            GgmlType::Q5K => GgmlType::Q5_1,
            _ => GgmlType::Q8_0,
        })
    }
}

pub struct SyntheticWeights {
    device: Device,
    quant: SyntheticQuant,
    seed: std::cell::Cell<u64>,
}

impl SyntheticWeights {
    pub fn new(device: &Device, quant: SyntheticQuant, seed: u64) -> Self {
        SyntheticWeights {
            device: device.clone(),
            quant,
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

/// A tensor of `shape` whose elements are `period` repeated. Written in chunks of whole
/// periods, so the host never holds more than `UPLOAD_CHUNK` bytes of it.
fn repeated<T: Element>(device: &Device, period: &[T], shape: &[usize]) -> Result<Tensor> {
    let total: usize = shape.iter().product();
    let t = device.empty(&[total], T::DTYPE)?;
    let periods = (UPLOAD_CHUNK / std::mem::size_of_val(period).max(1)).max(1);
    let chunk: Vec<T> = period.repeat(periods.min(total.div_ceil(period.len().max(1))));
    let mut start = 0;
    while start < total {
        let len = chunk.len().min(total - start);
        t.narrow_rows(start, len)?.write(&chunk[..len])?;
        start += len;
    }
    t.reshape(shape)
}

impl SyntheticWeights {
    /// The stored tensors of `lead`×`n` matrices of `k` columns (`lead` = [] for one matrix,
    /// [experts] for stacked experts): `DISTINCT_ROWS` random rows, quantized, repeated.
    fn matrices(
        &self,
        layout: WeightLayout,
        lead: &[usize],
        n: usize,
        k: usize,
    ) -> Result<Vec<Tensor>> {
        let d = &self.device;
        // Uniform weights of std 1/√k keep activations in range through the layers.
        let rows = DISTINCT_ROWS.min(n);
        let w = self.random(rows * k, (3.0 / k as f32).sqrt());
        let shape = |cols: usize| [lead, &[n, cols]].concat();
        Ok(match layout {
            WeightLayout::Dense => {
                let w: Vec<half::f16> = w.iter().map(|&v| half::f16::from_f32(v)).collect();
                vec![repeated(d, &w, &shape(k))?]
            }
            WeightLayout::MlxAffine { bits, group_size } => {
                let (q, s, b) = mlx_affine::quantize(&w, rows, k, bits, group_size)?;
                let f16 = |v: Vec<f32>| -> Vec<half::f16> {
                    v.into_iter().map(half::f16::from_f32).collect()
                };
                let (qk, gk) = (mlx_affine::packed_row_len(k, bits), k / group_size);
                vec![
                    repeated(d, &q, &shape(qk))?,
                    repeated(d, &f16(s), &shape(gk))?,
                    repeated(d, &f16(b), &shape(gk))?,
                ]
            }
            WeightLayout::Gguf(t) => {
                let bytes: Vec<u8> = w
                    .chunks(k)
                    .map(|row| ggml::quantize_row(t, row))
                    .collect::<Result<Vec<_>>>()?
                    .concat();
                vec![repeated(
                    d,
                    &bytes,
                    &[lead, &[n * t.row_bytes(k)]].concat(),
                )?]
            }
        })
    }
}

impl WeightSource for SyntheticWeights {
    fn linear(&self, name: &str, n: usize, k: usize, bias: bool) -> Result<Linear> {
        let layout = self.quant.layout_of(name, k);
        let tensors = self.matrices(layout, &[], n, k)?;
        let bias = if bias {
            Some(self.device.from_slice(&self.random(n, 0.1), &[n])?)
        } else {
            None
        };
        Linear::new(name, layout, tensors, bias, n, k)
    }

    fn experts(&self, name: &str, experts: usize, n: usize, k: usize) -> Result<ExpertLinear> {
        let layout = self.quant.layout_of(name, k);
        let tensors = self.matrices(layout, &[experts], n, k)?;
        ExpertLinear::new(name, layout, tensors, experts, n, k)
    }

    /// In f16, as an MLX checkpoint of an f16 model stores its norms (the session's KV caches
    /// then default as that model's do: `Decoder::default_kv_dtype`).
    fn vector(&self, _name: &str, len: usize) -> Result<Tensor> {
        let v: Vec<half::f16> = (self.random(len, 0.1).iter())
            .map(|x| half::f16::from_f32(1.0 + x))
            .collect();
        self.device.from_slice(&v, &[len])
    }

    fn has_linear(&self, _name: &str) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layers whose v and down projections `llama-quantize … Q4_K_M` (llama.cpp from the
    /// llama-cpp-python 0.3.36 sdist) wrote in Q6_K, read from its logs for random-weight files
    /// of the 1B and 8B shapes (2026-11-28); the 1B's tied embedding Q6_K, the 8B's in the base
    /// type beside its Q6_K output. Q5_K_M chose the same Q6_K matrices (a 32-layer file of
    /// 256-wide layers, 2026-11-28), with Q5_K elsewhere.
    #[test]
    fn k_quant_mixes_match_llama_quantize() {
        let q6k = WeightLayout::Gguf(GgmlType::Q6K);
        let layers_8b: &[usize] = &[0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31];
        let cases: [(&str, &str, &[usize]); 3] = [
            ("llama-3.2-1b", "q4_k_m", &[0, 1, 4, 7, 10, 13, 14, 15]),
            ("llama-3.1-8b", "q4_k_m", layers_8b),
            ("llama-3.1-8b", "q5_k_m", layers_8b),
        ];
        for (shape, mix, six_bit_layers) in cases {
            let params = preset(shape).unwrap();
            let quant = SyntheticQuant::parse(mix, &params).unwrap();
            let base = WeightLayout::Gguf(match mix {
                "q4_k_m" => GgmlType::Q4K,
                _ => GgmlType::Q5K,
            });
            let embedding = if params.tie_word_embeddings {
                q6k
            } else {
                base
            };
            let k = params.hidden_size;
            assert_eq!(
                quant.layout_of("model.embed_tokens", k),
                embedding,
                "{shape}"
            );
            assert_eq!(quant.layout_of("lm_head", k), q6k, "{shape}");
            for l in 0..params.num_layers {
                let want = if six_bit_layers.contains(&l) {
                    q6k
                } else {
                    base
                };
                for (part, layout) in [
                    ("self_attn.v_proj", want),
                    ("mlp.down_proj", want),
                    ("self_attn.q_proj", base),
                    ("self_attn.k_proj", base),
                    ("self_attn.o_proj", base),
                    ("mlp.gate_proj", base),
                    ("mlp.up_proj", base),
                ] {
                    let name = format!("model.layers.{l}.{part}");
                    assert_eq!(quant.layout_of(&name, k), layout, "{shape} {mix} {name}");
                }
            }
        }
        // MoE: routers in F32; stacked experts by the dense rule (not checked against
        // llama-quantize's logs).
        let moe = preset("qwen3-30b-a3b").unwrap();
        let quant = SyntheticQuant::parse("q4_k_m", &moe).unwrap();
        let f32_layout = WeightLayout::Gguf(GgmlType::F32);
        let q4k = WeightLayout::Gguf(GgmlType::Q4K);
        for (name, want) in [
            ("model.layers.0.mlp.gate", f32_layout),
            ("model.layers.0.mlp.switch_mlp.down_proj", q6k),
            ("model.layers.6.mlp.switch_mlp.down_proj", q4k),
            ("model.layers.6.mlp.switch_mlp.gate_proj", q4k),
        ] {
            assert_eq!(quant.layout_of(name, 768), want, "{name}");
        }
        let uniform = SyntheticQuant::parse("q6_k", &preset("llama-3.2-1b").unwrap()).unwrap();
        assert_eq!(uniform.layout_of("model.layers.3.mlp.gate_proj", 2048), q6k);
    }

    /// Rows that are not whole super-blocks (SmolLM2's 576) take llama-quantize's fallbacks;
    /// its down projection's rows of 1,536 keep the K-quants.
    #[test]
    fn k_quant_mixes_fall_back_on_narrow_rows() {
        let params = preset("smollm2-135m").unwrap();
        let gguf = WeightLayout::Gguf;
        for (mix, base, fallback) in [
            ("q4_k_m", GgmlType::Q4K, GgmlType::Q5_0),
            ("q5_k_m", GgmlType::Q5K, GgmlType::Q5_1),
        ] {
            let quant = SyntheticQuant::parse(mix, &params).unwrap();
            for (name, k, want) in [
                ("model.embed_tokens", 576, GgmlType::Q8_0),
                ("model.layers.0.self_attn.v_proj", 576, GgmlType::Q8_0),
                ("model.layers.0.mlp.down_proj", 1536, GgmlType::Q6K),
                ("model.layers.4.self_attn.q_proj", 576, fallback),
                ("model.layers.4.mlp.down_proj", 1536, base),
            ] {
                assert_eq!(quant.layout_of(name, k), gguf(want), "{mix} {name}");
            }
        }
    }
}
