//! `mlxn bench`: prefill and decode speed at set prompt lengths, with the bytes each decoded
//! token reads and the device's measured copy bandwidth, so that decode reads as a fraction of
//! the memory bound. Runs a model file or a synthetic model of a known shape with random
//! weights (`--synthetic llama-3.1-8b`).

use clap::Args;
use mlx_native::engine::GenerateOptions;
use mlx_native::models::decoder::Decoder;
use mlx_native::models::synthetic::{self, SyntheticQuant, SyntheticWeights};
use mlx_native::{Device, Error, Result};

use crate::{load, peak_memory_bytes, DeviceArgs, ModelArgs, SamplingArgs};

#[derive(Args)]
pub struct BenchArgs {
    /// An MLX checkpoint directory or a .gguf file.
    #[arg(long, short, conflicts_with = "synthetic")]
    model: Option<std::path::PathBuf>,
    /// A random-weight model of a known shape: smollm2-135m, llama-3.2-1b, llama-3.1-8b,
    /// qwen3-0.6b, gemma-3-1b, qwen3-30b-a3b.
    #[arg(long)]
    synthetic: Option<String>,
    /// Weight layout of the synthetic model: mlx{bits}g{group}, q4_0, q4_k, f16 …, or q4_k_m /
    /// q5_k_m (llama.cpp's mixes of Q4_K or Q5_K with Q6_K)
    #[arg(long, default_value = "mlx4g64")]
    quant: String,
    #[command(flatten)]
    run: DeviceArgs,
    /// Prompt lengths to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "128,512")]
    prompt_lens: Vec<usize>,
    /// Tokens decoded after each prompt.
    #[arg(long, default_value_t = 128)]
    decode: usize,
    /// Repetitions of each measurement, after one untimed run (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Print one JSON object per row instead of a table.
    #[arg(long)]
    json: bool,
    /// Also time each prompt's forward pass on the device alone: recorded once as a graph and
    /// replayed, without the host's recording and launches that bound short prompts.
    #[arg(long)]
    device_time: bool,
    /// How each decoded token is chosen (greedy by default).
    #[command(flatten)]
    sampling: SamplingArgs,
}

/// The device's copy bandwidth (bytes read and written a second). A GPU copies 2 GiB, as
/// scripts/copy_bandwidth.cu does (at 256 MiB an H100's copies read ~1.5% slower, which would
/// flatter the share of the bound), or half that and so on to 64 MiB where memory is short; the
/// CPU 256 MiB, far past its caches.
fn copy_bandwidth(device: &Device) -> Result<f64> {
    let bytes = if device.is_cpu() { 256 << 20 } else { 2 << 30 };
    halving_while_out_of_memory(bytes, |bytes| device.copy_bandwidth(bytes))
}

/// `probe(bytes)`, then of half the bytes and so on down to 64 MiB while the device has not the
/// memory for it; any other error is the probe's answer.
fn halving_while_out_of_memory(
    mut bytes: usize,
    mut probe: impl FnMut(usize) -> Result<f64>,
) -> Result<f64> {
    loop {
        match probe(bytes) {
            Err(Error::OutOfMemory(_)) if bytes > 64 << 20 => bytes /= 2,
            measured => return measured,
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn model(args: &BenchArgs) -> Result<(Device, Decoder, String)> {
    match (&args.model, &args.synthetic) {
        (Some(path), None) => {
            let model_args = ModelArgs {
                model: path.clone(),
                run: args.run.clone(),
            };
            let (device, model) = load::device_and_decoder(&model_args)?;
            Ok((device, model, path.display().to_string()))
        }
        (None, Some(name)) => {
            let device = Device::parse(&args.run.device)?;
            let params = synthetic::preset(name)?;
            let quant = SyntheticQuant::parse(&args.quant, &params)?;
            let weights = SyntheticWeights::new(&device, quant, 1);
            let model = Decoder::load(params, &weights, &device)?;
            Ok((device, model, format!("synthetic {name} {}", args.quant)))
        }
        _ => Err(Error::Invalid(
            "give --model PATH or --synthetic NAME".into(),
        )),
    }
}

/// One prompt length's measurement.
struct Row {
    prompt: usize,
    prefill_tokens_per_s: f64,
    /// The prefill's host time recording its forward pass, ms (`GenerateStats`).
    prefill_record_ms: f64,
    /// Prompt tokens a second of the replayed forward pass (`--device-time`).
    prefill_device_tokens_per_s: Option<f64>,
    decode_tokens_per_s: f64,
    kv_bytes: usize,
    kernels: usize,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let (device, model, label) = model(&args)?;
    let p = model.params.clone();
    let weight_bytes = model.weight_bytes();
    let max_len = args.prompt_lens.iter().max().copied().unwrap_or(1) + args.decode;
    let capacity = max_len.min(p.max_position_embeddings);
    let mut session = args.run.session(model, &device, capacity)?;
    let opts = GenerateOptions {
        max_new_tokens: args.decode,
        sampling: args.sampling.params(),
        stop_ids: Vec::new(),
        use_graph: !args.run.no_graph,
    };
    if !args.json {
        let s = &opts.sampling;
        let sampling = if s.temperature > 0.0 {
            format!(
                "T={} top-k {} top-p {} min-p {} repeat-penalty {}",
                s.temperature, s.top_k, s.top_p, s.min_p, s.repetition_penalty
            )
        } else {
            "greedy".into()
        };
        println!(
            "model: {label} | device: {} | weights read per token: {:.1} MiB | KV cache: {} | \
             graph: {} | {sampling}",
            device.label(),
            weight_bytes as f64 / 1048576.0,
            session.kv_dtype(),
            opts.use_graph
        );
    }
    let mut rows = Vec::new();
    for &len in &args.prompt_lens {
        // Deterministic, varied ids (none of the special tokens at the start of a vocabulary).
        let prompt: Vec<u32> = (0..len)
            .map(|i| 100 + ((i as u64 * 2654435761) % (p.vocab_size as u64 - 100)) as u32)
            .collect();
        // One untimed run first, as llama-bench does, so that no timed run includes a prompt
        // length's first use (kernel loads, scratch, the decode graph's capture). H100,
        // 2026-11-27, interleaved: 1B shape Q4_0 decode 1,977 → 1,988 tok/s, its 128-token
        // prefill and the 8B shape's figures unchanged.
        session.generate(&prompt, &opts, |_| true)?;
        let mut prefill = Vec::new();
        let mut record = Vec::new();
        let mut decode = Vec::new();
        let mut kernels = 0;
        for _ in 0..args.reps.max(1) {
            let (_, stats) = session.generate(&prompt, &opts, |_| true)?;
            prefill.push(stats.prefill_tokens_per_s());
            record.push(stats.prefill_record_time.as_secs_f64() * 1e3);
            decode.push(stats.decode_tokens_per_s());
            kernels = stats.kernels_per_token;
        }
        let prefill_device_tokens_per_s = match args.device_time {
            true => {
                let pass = session.prefill_device_time(&prompt, args.reps.max(1))?;
                Some(len as f64 / pass.as_secs_f64().max(1e-9))
            }
            false => None,
        };
        // KV bytes read per decoded token at the middle of the decode run.
        let mid = len + args.decode / 2;
        let kv_elem = session.kv_dtype().size_in_bytes();
        rows.push(Row {
            prompt: len,
            prefill_tokens_per_s: median(prefill),
            prefill_record_ms: median(record),
            prefill_device_tokens_per_s,
            decode_tokens_per_s: median(decode),
            kv_bytes: 2 * p.num_layers * p.num_kv_heads * p.head_dim * kv_elem * mid,
            kernels,
        });
    }
    // The process's peak before the bandwidth probe's buffers, which would count in it on the
    // CPU; the probe after the runs, so that it leaves the model's memory as it was.
    let peak = peak_memory_bytes();
    let copy_bytes_per_s = copy_bandwidth(&device)?;
    if !args.json {
        println!(
            "copy bandwidth: {:.0} GB/s (read + written); % of bound = decode GB/s ÷ that",
            copy_bytes_per_s / 1e9
        );
        println!(
            "{:>8} {:>14} {:>10} {:>14} {:>14} {:>12} {:>11} {:>14}",
            "prompt",
            "prefill tok/s",
            "record ms",
            "device tok/s",
            "decode tok/s",
            "decode GB/s",
            "% of bound",
            "kernels/token"
        );
    }
    for r in &rows {
        let (pf, dc) = (r.prefill_tokens_per_s, r.decode_tokens_per_s);
        let gbs = (weight_bytes + r.kv_bytes) as f64 * dc / 1e9;
        let bound = gbs * 1e9 / copy_bytes_per_s;
        if args.json {
            println!(
                "{}",
                serde_json::json!({"model": label, "prompt_tokens": r.prompt, "decode_tokens": args.decode,
                    "prefill_tokens_per_s": pf, "prefill_record_ms": r.prefill_record_ms,
                    "prefill_device_tokens_per_s": r.prefill_device_tokens_per_s,
                    "decode_tokens_per_s": dc, "decode_gb_per_s": gbs,
                    "copy_gb_per_s": copy_bytes_per_s / 1e9, "decode_bound_fraction": bound,
                    "weight_bytes_per_token": weight_bytes, "kv_bytes_per_token": r.kv_bytes,
                    "kv_dtype": session.kv_dtype().name(),
                    "kernels_per_token": r.kernels, "device": device.label(), "graph": opts.use_graph,
                    "temperature": opts.sampling.temperature, "top_k": opts.sampling.top_k,
                    "top_p": opts.sampling.top_p, "min_p": opts.sampling.min_p,
                    "repetition_penalty": opts.sampling.repetition_penalty})
            );
        } else {
            let (len, rec, pct, kernels) =
                (r.prompt, r.prefill_record_ms, 100.0 * bound, r.kernels);
            let device = r
                .prefill_device_tokens_per_s
                .map_or("-".into(), |t| format!("{t:.1}"));
            println!(
                "{len:>8} {pf:>14.1} {rec:>10.3} {device:>14} {dc:>14.1} {gbs:>12.2} {pct:>10.1}% \
                 {kernels:>14}"
            );
        }
    }
    if let (false, Some(peak)) = (args.json, peak) {
        println!("peak memory: {:.1} MiB", peak as f64 / 1048576.0);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bandwidth probe halves its copies only for want of memory, down to 64 MiB; another
    /// failure (a driver error, say) is reported as it comes.
    #[test]
    fn bandwidth_probe_halves_only_when_out_of_memory() {
        let mut sizes = Vec::new();
        let measured = halving_while_out_of_memory(2 << 30, |bytes| {
            sizes.push(bytes);
            if bytes > 256 << 20 {
                Err(Error::OutOfMemory(format!("allocating {bytes} bytes")))
            } else {
                Ok(bytes as f64)
            }
        });
        assert_eq!(measured.ok(), Some((256 << 20) as f64));
        assert_eq!(sizes, [2 << 30, 1 << 30, 512 << 20, 256 << 20]);

        let mut calls = 0;
        let failed = halving_while_out_of_memory(2 << 30, |_| {
            calls += 1;
            Err(Error::Cuda("launch failed".into()))
        });
        assert!(matches!(failed, Err(Error::Cuda(_))), "{failed:?}");
        assert_eq!(calls, 1);

        let mut smallest = 0;
        let never = halving_while_out_of_memory(2 << 30, |bytes| {
            smallest = bytes;
            Err(Error::OutOfMemory(format!("allocating {bytes} bytes")))
        });
        assert!(matches!(never, Err(Error::OutOfMemory(_))), "{never:?}");
        assert_eq!(smallest, 64 << 20);
    }
}
