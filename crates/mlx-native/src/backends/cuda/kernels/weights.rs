//! The stored operands of a weight layout (layouts.cuh) as the matmul and embedding planners
//! pass them to kernels, with the alignment the kernels' wide loads need.

use crate::backends::cuda::device_ptr;
use crate::backends::cuda::launch::{float_type, Args};
use crate::core::tensor::Tensor;
use crate::quant::{GgmlType, WeightLayout};
use crate::{Error, Result};

pub(super) enum Weight<'a> {
    /// MLX affine: packed words, scales and biases of float type `scale_type`.
    Mlx {
        w: &'a Tensor,
        scales: &'a Tensor,
        biases: &'a Tensor,
        bits: u32,
        /// log2(group_size / 32).
        group_shift: i32,
        scale_type: i32,
    },
    /// ggml quantized blocks.
    Ggml { data: &'a Tensor, ty: GgmlType },
    /// Plain rows of float type `ft`: dense weights, and GGUF F32/F16/BF16 tensors.
    Dense { w: &'a Tensor, ft: i32 },
}

impl<'a> Weight<'a> {
    /// The weight stored as `layout` in `tensors`, with `k` elements a row, and the number of
    /// whole rows its tensors hold (kernels never read past them).
    pub fn parse(
        op: &'static str,
        layout: WeightLayout,
        tensors: &'a [Tensor],
        k: usize,
    ) -> Result<(Weight<'a>, usize)> {
        let bad = |reason: String| Error::op(op, format!("{} weight: {reason}", layout.variant()));
        // Whole rows of `per_row` elements in `t`.
        let rows = |t: &Tensor, per_row: usize| t.elem_count() / per_row.max(1);
        Ok(match layout {
            WeightLayout::Dense => {
                let [w] = tensors else {
                    return Err(bad(format!("{} tensors", tensors.len())));
                };
                let ft = float_type(op, "weight", w.dtype())?;
                (Weight::Dense { w, ft }, rows(w, k))
            }
            WeightLayout::MlxAffine { bits, group_size } => {
                let [w, scales, biases] = tensors else {
                    return Err(bad(format!("{} tensors", tensors.len())));
                };
                if !k.is_multiple_of(group_size) {
                    return Err(bad(format!("rows of {k} are not whole groups")));
                }
                if scales.dtype() != biases.dtype() {
                    return Err(bad(format!(
                        "scales ({}) and biases ({}) differ in dtype",
                        scales.dtype(),
                        biases.dtype()
                    )));
                }
                let groups = k / group_size;
                let n = rows(w, k * bits as usize / 32)
                    .min(rows(scales, groups))
                    .min(rows(biases, groups));
                let weight = Weight::Mlx {
                    w,
                    scales,
                    biases,
                    bits,
                    group_shift: (group_size / 32).trailing_zeros() as i32,
                    scale_type: float_type(op, "scales", scales.dtype())?,
                };
                (weight, n)
            }
            WeightLayout::Gguf(ty) => {
                let [data] = tensors else {
                    return Err(bad(format!("{} tensors", tensors.len())));
                };
                if !k.is_multiple_of(ty.block_size()) {
                    return Err(bad(format!("rows of {k} are not whole blocks")));
                }
                let n = data.byte_len() / ty.row_bytes(k).max(1);
                let weight = match ty {
                    GgmlType::F32 => Weight::Dense { w: data, ft: 0 },
                    GgmlType::F16 => Weight::Dense { w: data, ft: 1 },
                    GgmlType::BF16 => Weight::Dense { w: data, ft: 2 },
                    _ => Weight::Ggml { data, ty },
                };
                (weight, n)
            }
        })
    }

    /// The tensor holding the weights proper (packed words, blocks or rows).
    pub fn data(&self) -> &'a Tensor {
        match self {
            Weight::Mlx { w, .. } => w,
            Weight::Ggml { data, .. } => data,
            Weight::Dense { w, .. } => w,
        }
    }

    /// Appends the stored tensors as kernel arguments: MLX words, scales and biases; ggml
    /// blocks; dense rows.
    pub fn tensor_args(&self, args: Args) -> Result<Args> {
        match *self {
            Weight::Mlx {
                w, scales, biases, ..
            } => args.ptr(w)?.ptr(scales)?.ptr(biases),
            Weight::Ggml { data, .. } => args.ptr(data),
            Weight::Dense { w, .. } => args.ptr(w),
        }
    }

    /// The tensors, then the float type of MLX scales or dense rows, for the kernels that take
    /// it as an argument (the tiled matmul, the embedding gather).
    pub fn typed_tensor_args(&self, args: Args) -> Result<Args> {
        let args = self.tensor_args(args)?;
        Ok(match self.float_type() {
            Some(ft) => args.code(ft),
            None => args,
        })
    }

    /// Appends MLX's group shift; the other layouts take none.
    pub fn group_args(&self, args: Args) -> Args {
        match *self {
            Weight::Mlx { group_shift, .. } => args.code(group_shift),
            _ => args,
        }
    }

    /// The float type of MLX scales or dense rows (ggml kernels know their blocks' types).
    pub fn float_type(&self) -> Option<i32> {
        match *self {
            Weight::Mlx { scale_type, .. } => Some(scale_type),
            Weight::Ggml { .. } => None,
            Weight::Dense { ft, .. } => Some(ft),
        }
    }

    /// The layout the kernels read: MLX affine, a ggml block type, or dense rows (which GGUF's
    /// float types parse to).
    pub fn layout(&self) -> WeightLayout {
        match *self {
            Weight::Mlx {
                bits, group_shift, ..
            } => WeightLayout::MlxAffine {
                bits,
                group_size: 32 << group_shift,
            },
            Weight::Ggml { ty, .. } => WeightLayout::Gguf(ty),
            Weight::Dense { .. } => WeightLayout::Dense,
        }
    }

    /// The layout in kernel names: `mlx{bits}`, the ggml type's name, or `dense`.
    pub fn layout_name(&self) -> String {
        match *self {
            Weight::Mlx { bits, .. } => format!("mlx{bits}"),
            Weight::Ggml { ty, .. } => ty.name().to_string(),
            Weight::Dense { .. } => "dense".to_string(),
        }
    }

    /// The layout and float type in the names of kernels built per type (`mlx4_bf16`,
    /// `q4_0`, `dense_f16`).
    pub fn typed_layout_name(&self) -> String {
        match self.float_type() {
            Some(ft) => format!("{}_{}", self.layout_name(), float_name(ft)),
            None => self.layout_name(),
        }
    }

    /// Checks the alignment that the quantized layouts' loads need (dense rows are read with
    /// wide loads only by the matvec, which checks for itself). Buffers made by the backend
    /// are 256-byte aligned; only views at odd offsets can fail.
    pub fn check_alignment(&self, op: &'static str) -> Result<()> {
        let align = match self {
            // A unit of 32 elements is `bits` words, read with 16-, 8- or 4-byte loads.
            Weight::Mlx { bits, .. } => match bits % 4 {
                0 => 16,
                2 => 8,
                _ => 4,
            },
            Weight::Ggml {
                ty: GgmlType::Q4K | GgmlType::Q5K,
                ..
            } => 16,
            Weight::Ggml {
                ty: GgmlType::Q4_1 | GgmlType::Q5_1,
                ..
            } => 4,
            Weight::Ggml { .. } => 2,
            Weight::Dense { .. } => return Ok(()),
        };
        if device_ptr(self.data())? % align != 0 {
            return Err(Error::op(
                op,
                format!("weight data must start {align}-byte aligned in device memory"),
            ));
        }
        Ok(())
    }
}

/// The kernel-name suffix of a float type code.
pub(super) fn float_name(ft: i32) -> &'static str {
    match ft {
        1 => "f16",
        2 => "bf16",
        _ => "f32",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::device::Device;
    use crate::core::dtype::DType;

    /// `layout` gives back what `parse` read (GGUF's float types as dense rows), which the
    /// tensor-core planner matches on.
    #[test]
    fn layout_is_what_parse_read() {
        let cpu = Device::cpu();
        let (n, k) = (4, 128);
        let mlx = WeightLayout::MlxAffine {
            bits: 4,
            group_size: 64,
        };
        let mlx_tensors = [
            cpu.zeros(&[n, k * 4 / 32], DType::U32).unwrap(),
            cpu.zeros(&[n, k / 64], DType::F16).unwrap(),
            cpu.zeros(&[n, k / 64], DType::F16).unwrap(),
        ];
        let q4_0 = WeightLayout::Gguf(GgmlType::Q4_0);
        let q4_0_tensors = [cpu
            .zeros(&[n * GgmlType::Q4_0.row_bytes(k)], DType::U8)
            .unwrap()];
        let f16 = WeightLayout::Gguf(GgmlType::F16);
        let f16_tensors = [cpu.zeros(&[n * k], DType::F16).unwrap()];
        let cases = [
            (mlx, &mlx_tensors[..], mlx),
            (q4_0, &q4_0_tensors[..], q4_0),
            (f16, &f16_tensors[..], WeightLayout::Dense),
        ];
        for (layout, tensors, want) in cases {
            let (weight, rows) = Weight::parse("test", layout, tensors, k).unwrap();
            assert_eq!(weight.layout(), want, "{layout:?}");
            assert_eq!(rows, n, "{layout:?}");
        }
    }
}
