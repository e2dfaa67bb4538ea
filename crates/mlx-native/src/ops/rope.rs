use super::{check_kv_caches, expect_dtype, expect_shape, expect_u32_scalar};
use crate::core::device::Device;
use crate::core::dtype::DType;
use crate::core::encoder::CommandEncoder;
use crate::core::op::Op;
use crate::core::tensor::Tensor;
use crate::{Error, Result};

/// RoPE frequency scaling, as in config.json's `rope_scaling` (mlx-lm's names).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (`"linear"`).
    Linear {
        factor: f32,
    },
    /// Llama 3.x: low frequencies slowed by `factor`, a smooth band between.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
    /// YaRN: per-dimension blend of interpolation and extrapolation, plus an attention factor.
    Yarn {
        factor: f32,
        original_max_position_embeddings: usize,
        beta_fast: f32,
        beta_slow: f32,
        mscale: f32,
        mscale_all_dim: f32,
    },
    /// Phi-3 LongRoPE as mlx-lm runs it (`SuScaledRoPE`, at every length): pair i's period
    /// stretched by `long_factor[i]`, the rotated dims scaled by √(1 + ln s / ln original)
    /// where s = max_position_embeddings / original_max_position_embeddings, when s > 1.
    LongRope {
        long_factor: Vec<f32>,
        max_position_embeddings: usize,
        original_max_position_embeddings: usize,
    },
    /// Pair i's period multiplied by `factors[i]`, as GGUF files store RoPE scaling in
    /// `rope_freqs.weight` (llama.cpp's frequency factors; its converter writes Llama 3.x
    /// scaling so).
    PeriodFactors {
        factors: Vec<f32>,
    },
}

/// The per-model RoPE constants: inverse frequencies on the device and the cos/sin factor.
#[derive(Clone, Debug)]
pub struct RopeTable {
    /// f32 `[rotary_dims / 2]`.
    pub inv_freq: Tensor,
    pub rotary_dims: usize,
    pub mscale: f32,
}

impl RopeTable {
    pub fn new(
        device: &Device,
        rotary_dims: usize,
        theta: f32,
        scaling: &RopeScaling,
    ) -> Result<RopeTable> {
        if rotary_dims == 0 || rotary_dims % 2 == 1 {
            return Err(Error::op(
                "rope",
                format!("rotary dims {rotary_dims} must be even and > 0"),
            ));
        }
        let per_pair = match scaling {
            RopeScaling::LongRope { long_factor, .. } => Some(("LongRoPE", long_factor)),
            RopeScaling::PeriodFactors { factors } => Some(("period", factors)),
            _ => None,
        };
        if let Some((what, factors)) = per_pair {
            if factors.len() != rotary_dims / 2 {
                return Err(Error::op(
                    "rope",
                    format!(
                        "{} {what} factors for {rotary_dims} rotary dims (one per pair expected)",
                        factors.len()
                    ),
                ));
            }
        }
        let (freqs, mscale) = inv_freq(rotary_dims, theta, scaling);
        // Degenerate settings (theta <= 0, a zero or negative factor) show up here as
        // non-finite or non-positive frequencies.
        if !mscale.is_finite() || freqs.iter().any(|f| !f.is_finite() || *f <= 0.0) {
            return Err(Error::op(
                "rope",
                format!("theta {theta} with scaling {scaling:?} gives invalid frequencies"),
            ));
        }
        Ok(RopeTable {
            inv_freq: device.from_slice(&freqs, &[rotary_dims / 2])?,
            rotary_dims,
            mscale,
        })
    }
}

/// Inverse frequencies for each rotated pair (the angle of pair i at position p is
/// p · inv_freq[i]) and the cos/sin multiplier, after scaling. mlx-lm describes the llama3
/// and yarn tables by their reciprocals (`freqs`, periods per radian) and, for yarn, scales
/// the rotated dims by `mscale`; both are reproduced here in f64.
pub fn inv_freq(rotary_dims: usize, theta: f32, scaling: &RopeScaling) -> (Vec<f32>, f32) {
    let dims = rotary_dims as f64;
    let theta = theta as f64;
    // period factors theta^(2i/dims), mlx-lm's `freqs` before scaling
    let periods = (0..rotary_dims / 2).map(|i| theta.powf(2.0 * i as f64 / dims));
    let to_f32 = |inv: Vec<f64>| inv.into_iter().map(|f| f as f32).collect::<Vec<f32>>();
    match scaling {
        RopeScaling::None => (to_f32(periods.map(|p| 1.0 / p).collect()), 1.0),
        RopeScaling::Linear { factor } => (
            to_f32(periods.map(|p| 1.0 / (p * *factor as f64)).collect()),
            1.0,
        ),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let (factor, low, high) = (
                *factor as f64,
                *low_freq_factor as f64,
                *high_freq_factor as f64,
            );
            let old_context = *original_max_position_embeddings as f64;
            let (low_wavelen, high_wavelen) = (old_context / low, old_context / high);
            let inv = periods.map(|p| {
                let wavelen = 2.0 * std::f64::consts::PI * p;
                let period = if wavelen > low_wavelen {
                    p * factor
                } else if wavelen > high_wavelen && wavelen < low_wavelen {
                    // between the two bands: interpolate between slowed and unchanged
                    let smooth = (old_context / wavelen - low) / (high - low);
                    p / ((1.0 - smooth) / factor + smooth)
                } else {
                    p
                };
                1.0 / period
            });
            (to_f32(inv.collect()), 1.0)
        }
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            mscale,
            mscale_all_dim,
        } => {
            let factor = *factor as f64;
            let old_context = *original_max_position_embeddings as f64;
            // the dim index at which a frequency turns `rotations` times over the old context
            let correction_dim = |rotations: f64| {
                dims * (old_context / (rotations * 2.0 * std::f64::consts::PI)).ln()
                    / (2.0 * theta.ln())
            };
            let low = correction_dim(*beta_fast as f64).floor().max(0.0);
            let high = correction_dim(*beta_slow as f64).ceil().min(dims - 1.0);
            let high = if low == high { high + 0.001 } else { high };
            // high-frequency pairs (below `low`) keep their frequency, low-frequency pairs
            // (above `high`) are slowed by `factor`, a linear ramp blends the two between
            let inv = periods.enumerate().map(|(i, period)| {
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                (1.0 - ramp) / period + ramp / (factor * period)
            });
            let attention_factor = |m: f32| {
                if factor <= 1.0 {
                    1.0
                } else {
                    0.1 * m as f64 * factor.ln() + 1.0
                }
            };
            let mscale = attention_factor(*mscale) / attention_factor(*mscale_all_dim);
            (to_f32(inv.collect()), mscale as f32)
        }
        RopeScaling::LongRope {
            long_factor,
            max_position_embeddings,
            original_max_position_embeddings,
        } => {
            let inv = periods.zip(long_factor).map(|(p, &f)| 1.0 / (p * f as f64));
            let old_context = *original_max_position_embeddings as f64;
            let stretch = *max_position_embeddings as f64 / old_context;
            let mscale = if stretch <= 1.0 {
                1.0
            } else {
                (1.0 + stretch.ln() / old_context.ln()).sqrt()
            };
            (to_f32(inv.collect()), mscale as f32)
        }
        RopeScaling::PeriodFactors { factors } => (
            to_f32(
                periods
                    .zip(factors)
                    .map(|(p, &f)| 1.0 / (p * f as f64))
                    .collect(),
            ),
            1.0,
        ),
    }
}

/// The table turns at most `head_dim` dims; `pos` is a u32 `[1]` position.
fn check_table_and_pos(
    op: &'static str,
    table: &RopeTable,
    head_dim: usize,
    pos: &Tensor,
) -> Result<()> {
    if table.rotary_dims > head_dim {
        return Err(Error::op(
            op,
            format!("rotary dims {} > head dim {head_dim}", table.rotary_dims),
        ));
    }
    expect_u32_scalar(op, "pos", pos)
}

/// Rotate the leading `table.rotary_dims` dims of each head of `x` `[m, n_heads*head_dim]`;
/// row i is at position pos+i (`pos`: u32 `[1]`).
#[allow(clippy::too_many_arguments)]
pub fn rope(
    enc: &mut CommandEncoder,
    x: &Tensor,
    table: &RopeTable,
    n_heads: usize,
    head_dim: usize,
    traditional: bool,
    pos: &Tensor,
    out: &Tensor,
) -> Result<()> {
    expect_dtype("rope", "x", x, &[DType::F32])?;
    expect_shape("rope", "x", x, &[x.rows(), n_heads * head_dim])?;
    check_table_and_pos("rope", table, head_dim, pos)?;
    expect_shape("rope", "out", out, x.shape())?;
    let op = Op::Rope {
        n_heads,
        head_dim,
        rotary_dims: table.rotary_dims,
        traditional,
        mscale: table.mscale,
    };
    enc.dispatch(op, &[x, &table.inv_freq, pos], &[out])
}

/// RoPE of `q` `[m, n_heads*head_dim]` into `q_out` and of `k` `[m, n_kv_heads*head_dim]`,
/// then `k` and `v` stored into `k_cache` and `v_cache` `[n_kv_heads, capacity, head_dim]`
/// (both f32 or both f16, stores rounded to nearest) at positions pos..pos+m: `rope` twice and
/// `kv_append` twice in one dispatch.
#[allow(clippy::too_many_arguments)]
pub fn rope_kv_append(
    enc: &mut CommandEncoder,
    qkv: [&Tensor; 3],
    table: &RopeTable,
    n_heads: usize,
    traditional: bool,
    pos: &Tensor,
    q_out: &Tensor,
    (k_cache, v_cache): (&Tensor, &Tensor),
) -> Result<()> {
    let op = "rope_kv_append";
    check_rope_inputs(op, qkv, table, n_heads, pos, (k_cache, v_cache))?;
    let [q, k, v] = qkv;
    expect_shape(op, "q_out", q_out, q.shape())?;
    let op = Op::RopeKvAppend {
        n_heads,
        n_kv_heads: k_cache.shape()[0],
        head_dim: k_cache.shape()[2],
        rotary_dims: table.rotary_dims,
        traditional,
        mscale: table.mscale,
    };
    enc.dispatch(
        op,
        &[q, k, v, &table.inv_freq, pos],
        &[q_out, k_cache, v_cache],
    )
}

/// The operands of a RoPE + cache append (`rope_kv_append`, `rope_attention`): q
/// `[m, n_heads*head_dim]`, k and v `[m, n_kv_heads*head_dim]` in f32, caches
/// `[n_kv_heads, capacity, head_dim]` both in f32 or both in f16 (`check_kv_caches`; a 3-d k
/// cache is checked here, so callers may index its shape afterwards), the table and `pos`.
pub(super) fn check_rope_inputs(
    op: &'static str,
    [q, k, v]: [&Tensor; 3],
    table: &RopeTable,
    n_heads: usize,
    pos: &Tensor,
    (k_cache, v_cache): (&Tensor, &Tensor),
) -> Result<()> {
    let [n_kv_heads, capacity, head_dim] = *k_cache.shape() else {
        return Err(Error::op(
            op,
            format!("k cache of shape {:?}", k_cache.shape()),
        ));
    };
    let m = q.rows();
    for (what, t, heads) in [
        ("q", q, n_heads),
        ("k", k, n_kv_heads),
        ("v", v, n_kv_heads),
    ] {
        expect_dtype(op, what, t, &[DType::F32])?;
        expect_shape(op, what, t, &[m, heads * head_dim])?;
    }
    check_kv_caches(op, (k_cache, v_cache), &[n_kv_heads, capacity, head_dim])?;
    check_table_and_pos(op, table, head_dim, pos)
}
