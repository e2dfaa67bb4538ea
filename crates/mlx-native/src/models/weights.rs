//! `WeightSource` for the two file families: MLX checkpoints (Hugging Face names as is) and
//! GGUF files (llama.cpp names). Each counts loads so a caller can show progress.

use std::cell::Cell;

use crate::core::device::Device;
use crate::core::tensor::Tensor;
use crate::formats::gguf::GgufFile;
use crate::formats::mlx_checkpoint::MlxCheckpoint;
use crate::models::WeightSource;
use crate::ops::{ExpertLinear, Linear};
use crate::{Error, Result};

/// Reports each loaded tensor as (done, total).
pub struct Progress<'a> {
    done: Cell<usize>,
    total: usize,
    report: std::cell::RefCell<&'a mut dyn FnMut(usize, usize)>,
}

impl<'a> Progress<'a> {
    pub fn new(total: usize, report: &'a mut dyn FnMut(usize, usize)) -> Self {
        Progress {
            done: Cell::new(0),
            total,
            report: std::cell::RefCell::new(report),
        }
    }
    fn tick(&self) {
        self.done.set(self.done.get() + 1);
        if let Ok(mut report) = self.report.try_borrow_mut() {
            report(self.done.get().min(self.total), self.total);
        }
    }
}

pub struct MlxWeights<'a> {
    pub checkpoint: &'a MlxCheckpoint,
    pub device: &'a Device,
    pub progress: Progress<'a>,
}

impl WeightSource for MlxWeights<'_> {
    fn linear(&self, name: &str, n: usize, k: usize, bias: bool) -> Result<Linear> {
        self.progress.tick();
        self.checkpoint.linear(self.device, name, n, k, bias)
    }

    fn vector(&self, name: &str, len: usize) -> Result<Tensor> {
        self.progress.tick();
        let t = self.checkpoint.tensor(self.device, name)?;
        check_vector(name, &t, len)?;
        Ok(t)
    }

    fn experts(&self, name: &str, experts: usize, n: usize, k: usize) -> Result<ExpertLinear> {
        self.progress.tick();
        self.checkpoint.experts(self.device, name, experts, n, k)
    }

    fn has_linear(&self, name: &str) -> bool {
        self.checkpoint.has(&format!("{name}.weight"))
    }
}

fn check_vector(name: &str, t: &Tensor, len: usize) -> Result<()> {
    if t.shape() != [len] {
        return Err(Error::TensorShape {
            name: name.to_string(),
            expected: vec![len],
            found: t.shape().to_vec(),
        });
    }
    Ok(())
}

/// The tensors of `inner` under `prefix`: `{prefix}model.layers.0…` is read for
/// `model.layers.0…` (multimodal checkpoints keep the language model under a prefix).
pub struct Prefixed<'a> {
    pub inner: &'a dyn WeightSource,
    pub prefix: &'a str,
}

impl WeightSource for Prefixed<'_> {
    fn linear(&self, name: &str, n: usize, k: usize, bias: bool) -> Result<Linear> {
        self.inner
            .linear(&format!("{}{name}", self.prefix), n, k, bias)
    }

    fn vector(&self, name: &str, len: usize) -> Result<Tensor> {
        self.inner.vector(&format!("{}{name}", self.prefix), len)
    }

    fn experts(&self, name: &str, experts: usize, n: usize, k: usize) -> Result<ExpertLinear> {
        self.inner
            .experts(&format!("{}{name}", self.prefix), experts, n, k)
    }

    fn has_linear(&self, name: &str) -> bool {
        self.inner.has_linear(&format!("{}{name}", self.prefix))
    }
}

pub struct GgufWeights<'a> {
    pub file: &'a GgufFile,
    pub device: &'a Device,
    pub progress: Progress<'a>,
    /// The layers have sandwich norms (Gemma 2/3), which llama.cpp names apart from Llama's.
    pub sandwich_norms: bool,
}

/// llama.cpp's name for a Hugging Face tensor prefix of the Llama family (Phi-3's fused
/// `qkv_proj` and `gate_up_proj` included), its mixture-of-experts parts (router and stacked
/// experts, under Mixtral's `block_sparse_moe` or Qwen3-MoE's `mlp`) included; with
/// `sandwich_norms` (Gemma 2/3), `post_attention_layernorm` is the attention output's norm and
/// `pre_feedforward_layernorm` the MLP's input norm.
fn gguf_name(hf: &str, sandwich_norms: bool) -> String {
    const LAYER_PARTS: [(&str, &str); 13] = [
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.qkv_proj", "attn_qkv"),
        ("mlp.gate_up_proj", "ffn_up"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("self_attn.q_norm", "attn_q_norm"),
        ("self_attn.k_norm", "attn_k_norm"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
        ("input_layernorm", "attn_norm"),
        ("post_attention_layernorm", "ffn_norm"),
    ];
    const SANDWICH_PARTS: [(&str, &str); 3] = [
        ("post_attention_layernorm", "post_attention_norm"),
        ("pre_feedforward_layernorm", "ffn_norm"),
        ("post_feedforward_layernorm", "post_ffw_norm"),
    ];
    const MOE_PARTS: [(&str, &str); 4] = [
        ("gate", "ffn_gate_inp"),
        ("switch_mlp.gate_proj", "ffn_gate_exps"),
        ("switch_mlp.up_proj", "ffn_up_exps"),
        ("switch_mlp.down_proj", "ffn_down_exps"),
    ];
    if let Some(rest) = hf.strip_prefix("model.layers.") {
        if let Some((layer, part)) = rest.split_once('.') {
            let (part, suffix) = match part.strip_suffix(".weight") {
                Some(p) => (p, ".weight"),
                None => (part, ""),
            };
            let moe_part = ["block_sparse_moe.", "mlp."]
                .iter()
                .find_map(|block| part.strip_prefix(block))
                .and_then(|p| MOE_PARTS.iter().find(|(h, _)| *h == p));
            let sandwich_part = SANDWICH_PARTS
                .iter()
                .find(|(h, _)| sandwich_norms && *h == part);
            let layer_part = LAYER_PARTS.iter().find(|(h, _)| *h == part);
            if let Some((_, g)) = sandwich_part.or(layer_part).or(moe_part) {
                return format!("blk.{layer}.{g}{suffix}");
            }
        }
    }
    match hf {
        "model.embed_tokens" => "token_embd".into(),
        "model.norm.weight" => "output_norm.weight".into(),
        "lm_head" => "output".into(),
        other => other.into(),
    }
}

impl WeightSource for GgufWeights<'_> {
    fn linear(&self, name: &str, n: usize, k: usize, bias: bool) -> Result<Linear> {
        self.progress.tick();
        let gguf = gguf_name(name, self.sandwich_norms);
        let mut linear = self
            .file
            .load_linear(self.device, &format!("{gguf}.weight"))?;
        if (linear.n, linear.k) != (n, k) {
            return Err(Error::TensorShape {
                name: format!("{gguf}.weight"),
                expected: vec![n, k],
                found: vec![linear.n, linear.k],
            });
        }
        if bias {
            let b = self
                .file
                .load_vector_f32(self.device, &format!("{gguf}.bias"))?;
            check_vector(&format!("{gguf}.bias"), &b, n)?;
            linear = Linear::new(name, linear.layout, linear.tensors, Some(b), n, k)?;
        }
        Ok(linear)
    }

    fn vector(&self, name: &str, len: usize) -> Result<Tensor> {
        self.progress.tick();
        let gguf = gguf_name(name, self.sandwich_norms);
        let t = self.file.load_vector_f32(self.device, &gguf)?;
        check_vector(&gguf, &t, len)?;
        Ok(t)
    }

    fn experts(&self, name: &str, experts: usize, n: usize, k: usize) -> Result<ExpertLinear> {
        self.progress.tick();
        let gguf = format!("{}.weight", gguf_name(name, self.sandwich_norms));
        let w = self.file.load_experts(self.device, &gguf)?;
        if (w.experts, w.n, w.k) != (experts, n, k) {
            return Err(Error::TensorShape {
                name: gguf,
                expected: vec![experts, n, k],
                found: vec![w.experts, w.n, w.k],
            });
        }
        Ok(w)
    }

    fn has_linear(&self, name: &str) -> bool {
        self.file
            .tensor_info(&format!("{}.weight", gguf_name(name, self.sandwich_norms)))
            .is_some()
    }
}
