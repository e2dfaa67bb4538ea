use super::{expect_dtype, expect_shape};
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
    Linear { factor: f32 },
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
    pub fn new(device: &Device, rotary_dims: usize, theta: f32, scaling: &RopeScaling) -> Result<RopeTable> {
        if rotary_dims == 0 || rotary_dims % 2 != 0 {
            return Err(Error::op("rope", format!("rotary dims {rotary_dims} must be even and > 0")));
        }
        let (freqs, mscale) = inv_freq(rotary_dims, theta, scaling);
        Ok(RopeTable {
            inv_freq: device.from_slice(&freqs, &[rotary_dims / 2])?,
            rotary_dims,
            mscale,
        })
    }
}

/// Inverse frequencies for each rotated pair and the cos/sin multiplier, after scaling.
pub fn inv_freq(rotary_dims: usize, theta: f32, scaling: &RopeScaling) -> (Vec<f32>, f32) {
    let base: Vec<f32> = (0..rotary_dims / 2)
        .map(|i| 1.0 / theta.powf(2.0 * i as f32 / rotary_dims as f32))
        .collect();
    match scaling {
        RopeScaling::None => (base, 1.0),
        RopeScaling::Linear { factor } => (base.iter().map(|f| f / factor).collect(), 1.0),
        // llama3 and yarn: see their reference formulas (filled in with the rope kernels).
        _ => (base, 1.0),
    }
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
    if table.rotary_dims > head_dim {
        return Err(Error::op("rope", format!("rotary dims {} > head dim {head_dim}", table.rotary_dims)));
    }
    expect_dtype("rope", "pos", pos, &[DType::U32])?;
    expect_shape("rope", "pos", pos, &[1])?;
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
