use super::{expect_dtype, expect_shape, ACTIVATIONS, FLOATS};
use crate::core::device::Device;
use crate::core::dtype::DType;
use crate::core::encoder::CommandEncoder;
use crate::core::op::{Op, PreNorm, UnaryFn};
use crate::core::tensor::Tensor;
use crate::quant::{GgmlType, WeightLayout};
use crate::{Error, Result};

/// A weight matrix of `n` output rows by `k` input columns, stored as its file stores it
/// (dense, MLX affine or a GGUF block type), with an optional bias `[n]`.
#[derive(Clone, Debug)]
pub struct Linear {
    pub layout: WeightLayout,
    /// Dense: `[w]`; MLX affine: `[w (u32), scales, biases]`; GGUF: `[blocks (u8)]`.
    pub tensors: Vec<Tensor>,
    pub bias: Option<Tensor>,
    pub n: usize,
    pub k: usize,
}

impl Linear {
    /// Check that the stored tensors have the shapes and dtypes the layout implies.
    pub fn new(
        name: &str,
        layout: WeightLayout,
        tensors: Vec<Tensor>,
        bias: Option<Tensor>,
        n: usize,
        k: usize,
    ) -> Result<Linear> {
        let bad = |reason: String| Error::op("linear", format!("`{name}`: {reason}"));
        if k == 0 {
            return Err(bad("rows of 0 columns".into()));
        }
        if tensors.len() != layout.tensor_count() {
            return Err(bad(format!(
                "{} tensors for layout {}",
                tensors.len(),
                layout.variant()
            )));
        }
        let shape_is = |t: &Tensor, what: &str, shape: &[usize]| {
            if t.shape() == shape {
                Ok(())
            } else {
                Err(Error::TensorShape {
                    name: format!("{name}.{what}"),
                    expected: shape.to_vec(),
                    found: t.shape().to_vec(),
                })
            }
        };
        match layout {
            WeightLayout::Dense => {
                if !FLOATS.contains(&tensors[0].dtype()) {
                    return Err(bad(format!("dense weight of dtype {}", tensors[0].dtype())));
                }
                shape_is(&tensors[0], "weight", &[n, k])?;
            }
            WeightLayout::MlxAffine { bits, group_size } => {
                crate::quant::mlx_affine::check_params(bits, group_size)?;
                if !k.is_multiple_of(group_size) || !(k * bits as usize).is_multiple_of(32) {
                    return Err(bad(format!(
                        "k = {k} is not a multiple of the group size {group_size}"
                    )));
                }
                if tensors[0].dtype() != DType::U32 {
                    return Err(bad(format!(
                        "packed weight of dtype {}",
                        tensors[0].dtype()
                    )));
                }
                shape_is(&tensors[0], "weight", &[n, k * bits as usize / 32])?;
                for (t, what) in tensors[1..].iter().zip(["scales", "biases"]) {
                    if !FLOATS.contains(&t.dtype()) {
                        return Err(bad(format!("{what} of dtype {}", t.dtype())));
                    }
                    shape_is(t, what, &[n, k / group_size])?;
                }
            }
            WeightLayout::Gguf(t) => {
                if !k.is_multiple_of(t.block_size()) {
                    return Err(bad(format!(
                        "k = {k} is not a multiple of {}'s block size {}",
                        t.name(),
                        t.block_size()
                    )));
                }
                if tensors[0].dtype() != DType::U8 {
                    return Err(bad(format!("block data of dtype {}", tensors[0].dtype())));
                }
                shape_is(&tensors[0], "weight", &[n * t.row_bytes(k)])?;
            }
        }
        if let Some(b) = &bias {
            shape_is(b, "bias", &[n])?;
        }
        Ok(Linear {
            layout,
            tensors,
            bias,
            n,
            k,
        })
    }

    /// Output rows `start..start + len` as a Linear of their own, viewing the same memory
    /// (a fused projection such as Phi-3's `qkv_proj` split into q, k and v). Every layout
    /// stores rows contiguously, so each tensor's row range is one slice.
    pub fn narrow_rows(&self, start: usize, len: usize) -> Result<Linear> {
        if start + len > self.n {
            return Err(Error::op(
                "linear",
                format!("rows {start}..{} of a {}-row weight", start + len, self.n),
            ));
        }
        // GGUF blocks are one byte vector: a row is `row_bytes` of its elements.
        let per_row = match self.layout {
            WeightLayout::Gguf(t) => t.row_bytes(self.k),
            WeightLayout::Dense | WeightLayout::MlxAffine { .. } => 1,
        };
        let tensors = self
            .tensors
            .iter()
            .map(|t| t.narrow_rows(start * per_row, len * per_row))
            .collect::<Result<_>>()?;
        let bias = match &self.bias {
            Some(b) => Some(b.narrow_rows(start, len)?),
            None => None,
        };
        let name = format!("rows {start}..{}", start + len);
        Linear::new(&name, self.layout, tensors, bias, len, self.k)
    }

    /// Same layout, input width, stored dtypes and bias presence: rows of `other` could sit
    /// under rows of `self` in one weight, and one kernel reads both alike.
    pub fn stored_like(&self, other: &Linear) -> bool {
        self.layout == other.layout
            && self.k == other.k
            && self.bias.as_ref().map(Tensor::dtype) == other.bias.as_ref().map(Tensor::dtype)
            && self
                .tensors
                .iter()
                .zip(&other.tensors)
                .all(|(a, b)| a.dtype() == b.dtype())
    }

    /// One weight holding the rows of `parts` in order (q, k and v as one projection, which a
    /// decode step then reads in one pass), copied into new memory on the parts' device.
    pub fn concat_rows(name: &str, parts: &[&Linear]) -> Result<Linear> {
        let Some((first, rest)) = parts.split_first() else {
            return Err(Error::op(
                "linear",
                format!("`{name}`: nothing to concatenate"),
            ));
        };
        if let Some(other) = rest.iter().find(|p| !first.stored_like(p)) {
            return Err(Error::op(
                "linear",
                format!(
                    "`{name}`: parts stored differently ({} k={} and {} k={})",
                    first.layout.variant(),
                    first.k,
                    other.layout.variant(),
                    other.k
                ),
            ));
        }
        let device = first.tensors[0].device();
        // Every layout stores a weight's rows along each tensor's leading dim.
        let concat = |tensors: Vec<&Tensor>| -> Result<Tensor> {
            let leading = |t: &&Tensor| t.shape().first().copied().unwrap_or(1);
            let mut shape = tensors[0].shape().to_vec();
            if let Some(rows) = shape.first_mut() {
                *rows = tensors.iter().map(leading).sum();
            }
            let out = device.empty(&shape, tensors[0].dtype())?;
            let mut at = 0;
            for t in &tensors {
                device.copy_bytes(t, &out, at)?;
                at += t.byte_len();
            }
            Ok(out)
        };
        let tensors = (0..first.tensors.len())
            .map(|i| concat(parts.iter().map(|p| &p.tensors[i]).collect()))
            .collect::<Result<Vec<_>>>()?;
        let bias = match first.bias {
            Some(_) => Some(concat(
                parts.iter().filter_map(|p| p.bias.as_ref()).collect(),
            )?),
            None => None,
        };
        let n = parts.iter().map(|p| p.n).sum();
        Linear::new(name, first.layout, tensors, bias, n, first.k)
    }

    /// Bytes a full pass over the weight reads (for bandwidth reports).
    pub fn weight_bytes(&self) -> usize {
        self.tensors.iter().map(Tensor::byte_len).sum::<usize>()
            + self.bias.as_ref().map_or(0, Tensor::byte_len)
    }

    /// GGUF block type, if the weight is stored in one.
    pub fn ggml_type(&self) -> Option<GgmlType> {
        match self.layout {
            WeightLayout::Gguf(t) => Some(t),
            _ => None,
        }
    }
}

/// out `[m, n]` = x `[m, k]` · Wᵀ (+ bias). x is f32, or f16 (f16 activations: worth writing
/// where `matmul_reads_half`; kernels that read f32 x widen them first).
pub fn matmul(enc: &mut CommandEncoder, x: &Tensor, w: &Linear, out: &Tensor) -> Result<()> {
    dispatch_matmul(enc, x, None, None, w, out)
}

/// The RMSNorm a decode matmul applies to its input: weight f32 `[k]` and parameters.
pub type InputNorm<'a> = (&'a Tensor, PreNorm);

/// The previous block's output added to the residual stream in front of a decode matmul's
/// folded input norm (Gemma's sandwich norms): the matmul reads x + RMSNorm(y)·weight (with the
/// input norm's eps and offset), and writes it to `out`, the residual stream's next value.
#[derive(Clone, Copy)]
pub struct ResidualUpdate<'a> {
    pub y: &'a Tensor,
    pub weight: &'a Tensor,
    pub out: &'a Tensor,
}

impl ResidualUpdate<'_> {
    /// y and out are f32 rows like x, the weight f32 over x's last dim, and out is neither x
    /// nor y: the kernels read those while they write it.
    fn check(&self, op: &'static str, x: &Tensor) -> Result<()> {
        for (what, t) in [("y", self.y), ("updated x", self.out)] {
            expect_dtype(op, what, t, &[DType::F32])?;
            expect_shape(op, what, t, x.shape())?;
        }
        check_norm_weight(op, "update norm weight", x, self.weight)?;
        if self.out.overlaps(x) || self.out.overlaps(self.y) {
            return Err(Error::op(op, "the updated x must not overlap x or y"));
        }
        Ok(())
    }
}

fn check_input_norm(op: &'static str, x: &Tensor, norm: InputNorm) -> Result<()> {
    if x.rows() != 1 {
        return Err(Error::op(op, "a folded RMSNorm needs a single row of x"));
    }
    check_norm_weight(op, "norm weight", x, norm.0)
}

/// A norm weight (`what`) is f32 over x's last dim.
pub(super) fn check_norm_weight(
    op: &'static str,
    what: &str,
    x: &Tensor,
    weight: &Tensor,
) -> Result<()> {
    expect_dtype(op, what, weight, &[DType::F32])?;
    expect_shape(op, what, weight, &[x.last_dim()])
}

/// x is f32 with the weight's `k` columns.
fn check_x(op: &'static str, x: &Tensor, k: usize) -> Result<()> {
    check_x_of(op, x, k, &[DType::F32])
}

/// x is of `dtypes` with the weight's `k` columns.
fn check_x_of(op: &'static str, x: &Tensor, k: usize, dtypes: &[DType]) -> Result<()> {
    expect_dtype(op, "x", x, dtypes)?;
    if x.last_dim() != k {
        return Err(Error::op(
            op,
            format!("x has {} columns, the weight expects {k}", x.last_dim()),
        ));
    }
    Ok(())
}

/// out `[1, n]` = RMSNorm(x `[1, k]`) · Wᵀ (+ bias), one dispatch: the norm is folded into
/// the matmul (decode). With `update`, x + RMSNorm(y)·w takes x's place (and is written to
/// `update.out`) in the same dispatch.
pub fn normed_matmul(
    enc: &mut CommandEncoder,
    x: &Tensor,
    update: Option<ResidualUpdate>,
    norm: InputNorm,
    w: &Linear,
    out: &Tensor,
) -> Result<()> {
    check_input_norm("matmul", x, norm)?;
    if let Some(update) = &update {
        update.check("matmul", x)?;
    }
    dispatch_matmul(enc, x, update, Some(norm), w, out)
}

/// `Op::MatMul` of x (updated by `update` and through `norm` if given) and `w` (with its bias)
/// into out `[m, n]`.
fn dispatch_matmul(
    enc: &mut CommandEncoder,
    x: &Tensor,
    update: Option<ResidualUpdate>,
    norm: Option<InputNorm>,
    w: &Linear,
    out: &Tensor,
) -> Result<()> {
    // Only a plain product takes f16 activations: a norm or an update reads x as f32.
    let x_dtypes = match (norm, update) {
        (None, None) => ACTIVATIONS,
        _ => &[DType::F32],
    };
    check_x_of("matmul", x, w.k, x_dtypes)?;
    expect_shape("matmul", "out", out, &[x.rows(), w.n])?;
    let mut inputs: Vec<&Tensor> = vec![x];
    inputs.extend(update.iter().flat_map(|u| [u.y, u.weight]));
    inputs.extend(norm.map(|(weight, _)| weight));
    inputs.extend(w.tensors.iter());
    inputs.extend(w.bias.iter());
    let op = Op::MatMul {
        layout: w.layout,
        has_bias: w.bias.is_some(),
        pre_norm: norm.map(|(_, p)| p),
        half_x: false,
        residual_update: update.is_some(),
    };
    let outputs: Vec<&Tensor> = std::iter::once(out).chain(update.map(|u| u.out)).collect();
    enc.dispatch(op, &inputs, &outputs)
}

/// out `[1, n]` = x `[1, k]` · Wᵀ + residual `[1, n]`, one dispatch: for a single row the
/// residual is a per-column bias, so the matmul kernels add it as they store (decode saves the
/// separate add). The weight must have no bias of its own. `x_h`, if given, is x's f16 copy
/// `[1, k]` (`gated_matmul`'s `out_h`), which a kernel that rounds x to f16 reads instead.
pub fn matmul_add(
    enc: &mut CommandEncoder,
    x: &Tensor,
    x_h: Option<&Tensor>,
    w: &Linear,
    residual: &Tensor,
    out: &Tensor,
) -> Result<()> {
    check_x("matmul", x, w.k)?;
    if let Some(x_h) = x_h {
        check_half_copy("matmul", "x_h", x_h, w.k)?;
    }
    expect_dtype("matmul", "residual", residual, &[DType::F32])?;
    if x.rows() != 1 || w.bias.is_some() {
        return Err(Error::op(
            "matmul",
            "a fused residual needs one row of x and a weight without bias",
        ));
    }
    expect_shape("matmul", "residual", residual, &[1, w.n])?;
    expect_shape("matmul", "out", out, &[1, w.n])?;
    let mut inputs: Vec<&Tensor> = vec![x];
    inputs.extend(w.tensors.iter());
    inputs.push(residual);
    inputs.extend(x_h);
    let op = Op::MatMul {
        layout: w.layout,
        has_bias: true,
        pre_norm: None,
        half_x: x_h.is_some(),
        residual_update: false,
    };
    enc.dispatch(op, &inputs, &[out])
}

/// Whether `matmul_add` of one row with `w` on `device` reads x's f16 copy where given (the
/// CUDA tensor-core matvec stages it instead of x): only then is a copy worth writing, since
/// an unread one costs its producer (SmolLM2's attention output: decode −3.6%, H100,
/// 2026-11-26).
pub fn reads_half_copy(device: &Device, w: &Linear) -> bool {
    device.backend().matvec_reads_half_x(w.layout, w.n, w.k)
}

/// Whether `matmul` of `rows` rows of x with `w` on `device` reads f16 x (the values rounded
/// once by their producer) where it lies, sparing the pass that would round x to f16 for its
/// products: only then is it worth having the producer write f16 activations.
pub fn matmul_reads_half(device: &Device, w: &Linear, rows: usize) -> bool {
    device
        .backend()
        .matmul_reads_half_x(w.layout, rows, w.n, w.k)
}

/// Whether `normed_matmul` of one row with `w` on `device` is one dispatch, the norm computed in
/// the matmul's kernel (`Backend::matvec_folds_norm`).
pub fn normed_matmul_folds(device: &Device, w: &Linear) -> bool {
    device.backend().matvec_folds_norm(w.layout, w.n, w.k)
}

/// An f16 copy of a row of `n` values: f16 `[1, n]`.
pub(super) fn check_half_copy(op: &'static str, what: &str, t: &Tensor, n: usize) -> Result<()> {
    expect_dtype(op, what, t, &[DType::F16])?;
    expect_shape(op, what, t, &[1, n])
}

/// out `[1, n]` = f(x·Gᵀ) ∘ (x·Uᵀ) for one row x `[1, k]`: the gated MLP's gate and up
/// projections and its activation in one dispatch (decode), x first through `norm` if given.
/// Both weights must share a layout shape and stored dtypes, and have no bias. With `out_h`
/// (f16 `[1, n]`), out's f16 copy is written there too, for the down projection's `x_h`. With
/// `update` (and a norm), x + RMSNorm(y)·w takes x's place, as in `normed_matmul`.
#[allow(clippy::too_many_arguments)]
pub fn gated_matmul(
    enc: &mut CommandEncoder,
    x: &Tensor,
    update: Option<ResidualUpdate>,
    norm: Option<InputNorm>,
    gate: &Linear,
    up: &Linear,
    f: UnaryFn,
    out: &Tensor,
    out_h: Option<&Tensor>,
) -> Result<()> {
    check_x("gated_matmul", x, gate.k)?;
    if x.rows() != 1 {
        return Err(Error::op("gated_matmul", "x must be a single row"));
    }
    if !gate.stored_like(up) || gate.n != up.n {
        return Err(Error::op(
            "gated_matmul",
            format!(
                "gate {} [{}, {}] and up {} [{}, {}] are stored differently",
                gate.layout.variant(),
                gate.n,
                gate.k,
                up.layout.variant(),
                up.n,
                up.k
            ),
        ));
    }
    if gate.bias.is_some() || up.bias.is_some() {
        return Err(Error::op("gated_matmul", "weights with a bias"));
    }
    expect_shape("gated_matmul", "out", out, &[1, gate.n])?;
    if let Some(out_h) = out_h {
        check_half_copy("gated_matmul", "out_h", out_h, gate.n)?;
    }
    let mut inputs: Vec<&Tensor> = vec![x];
    if let Some(update) = &update {
        if norm.is_none() {
            return Err(Error::op(
                "gated_matmul",
                "a residual update needs the input norm it precedes",
            ));
        }
        update.check("gated_matmul", x)?;
        inputs.extend([update.y, update.weight]);
    }
    if let Some(norm) = norm {
        check_input_norm("gated_matmul", x, norm)?;
        inputs.push(norm.0);
    }
    inputs.extend(gate.tensors.iter());
    inputs.extend(up.tensors.iter());
    let op = Op::GatedMatMul {
        layout: gate.layout,
        act: f,
        pre_norm: norm.map(|(_, p)| p),
        half_out: out_h.is_some(),
        residual_update: update.is_some(),
    };
    let outputs: Vec<&Tensor> = std::iter::once(out)
        .chain(update.map(|u| u.out))
        .chain(out_h)
        .collect();
    enc.dispatch(op, &inputs, &outputs)
}
