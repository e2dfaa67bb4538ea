//! Weight layouts and their reference math, shared by every backend: MLX affine groups and
//! GGUF (ggml) blocks. A leaf module: it knows bytes and numbers, not devices.

pub mod ggml;
pub mod mlx_affine;

pub use ggml::GgmlType;

/// How a matrix (or embedding table) of `n` rows by `k` columns is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightLayout {
    /// One tensor `[n, k]` of f32, f16 or bf16.
    Dense,
    /// MLX affine quantization: `w` as u32 words `[n, k*bits/32]`, `scales` and `biases`
    /// `[n, k/group_size]`; element = scale * q + bias.
    MlxAffine { bits: u32, group_size: usize },
    /// A ggml block type: one u8 tensor holding `n` rows of `k / block_size` blocks.
    Gguf(GgmlType),
}

impl WeightLayout {
    /// MLX affine at every supported bit width and group size.
    pub fn mlx_affine_all() -> impl Iterator<Item = WeightLayout> {
        mlx_affine::SUPPORTED_BITS.into_iter().flat_map(|bits| {
            mlx_affine::SUPPORTED_GROUP_SIZES
                .into_iter()
                .map(move |group_size| WeightLayout::MlxAffine { bits, group_size })
        })
    }

    /// Every layout: dense, every MLX affine one, every ggml type.
    pub fn all() -> impl Iterator<Item = WeightLayout> {
        std::iter::once(WeightLayout::Dense)
            .chain(Self::mlx_affine_all())
            .chain(GgmlType::ALL.into_iter().map(WeightLayout::Gguf))
    }

    /// Number of tensors the layout is stored in (weight, scales, biases for MLX).
    pub fn tensor_count(self) -> usize {
        match self {
            WeightLayout::MlxAffine { .. } => 3,
            WeightLayout::Dense | WeightLayout::Gguf(_) => 1,
        }
    }

    /// Short name used in kernel-registry keys and error messages, e.g. `mlx4g64`, `q4_k`.
    pub fn variant(self) -> String {
        match self {
            WeightLayout::Dense => "dense".into(),
            WeightLayout::MlxAffine { bits, group_size } => format!("mlx{bits}g{group_size}"),
            WeightLayout::Gguf(t) => t.name().to_string(),
        }
    }
}
