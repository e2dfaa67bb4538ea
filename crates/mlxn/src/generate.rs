//! `mlxn generate`: one prompt in, streamed text out, then speed and memory.

use std::io::Write;

use clap::Args;
use mlx_native::engine::{GenerateOptions, LoadedModel};
use mlx_native::formats::tokenizer::TextStream;
use mlx_native::{Error, Result};

use crate::{load::device_and_model, peak_memory_bytes, ModelArgs, SamplingArgs};

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Raw prompt text, fed as is.
    #[arg(long, conflicts_with = "chat")]
    prompt: Option<String>,
    /// A user message, wrapped in the model's chat template.
    #[arg(long)]
    chat: Option<String>,
    /// text: stream the continuation then print speeds; json: one JSON object at the end.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    output: String,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let (device, loaded) = device_and_model(&args.model)?;
    let prompt_ids = match (&args.prompt, &args.chat) {
        (Some(p), None) => loaded.encode_prompt(p)?,
        (None, Some(c)) => loaded.encode_chat(&[("user", c.as_str())])?,
        _ => {
            return Err(Error::Invalid(
                "give one of --prompt TEXT or --chat TEXT".into(),
            ))
        }
    };
    let capacity = (prompt_ids.len() + args.max_tokens)
        .min(loaded.model.params.max_position_embeddings)
        .max(1);
    let LoadedModel {
        model,
        tokenizer,
        stop_ids,
        ..
    } = loaded;
    let opts = GenerateOptions {
        max_new_tokens: args.max_tokens,
        sampling: args.sampling.params(),
        stop_ids,
        use_graph: !args.model.run.no_graph,
    };
    let mut session = args.model.run.session(model, &device, capacity)?;
    let json = args.output == "json";
    let mut stream = TextStream::new(&tokenizer, true);
    let mut stdout = std::io::stdout();
    let (ids, stats) = session.generate(&prompt_ids, &opts, |id| {
        if !json && !opts.stop_ids.contains(&id) {
            if let Ok(text) = stream.push(id) {
                let _ = stdout.write_all(text.as_bytes());
                let _ = stdout.flush();
            }
        }
        true
    })?;
    let peak = peak_memory_bytes();
    let visible: Vec<u32> = ids
        .iter()
        .copied()
        .filter(|i| !opts.stop_ids.contains(i))
        .collect();
    let text = tokenizer.decode(&visible, true)?;
    if json {
        let obj = serde_json::json!({
            "prompt_ids": prompt_ids,
            "generated_ids": ids,
            "text": text,
            "prompt_tokens": stats.prompt_tokens,
            "generated_tokens": stats.generated_tokens,
            "prefill_seconds": stats.prefill_time.as_secs_f64(),
            "decode_seconds": stats.decode_time.as_secs_f64(),
            "prefill_tokens_per_s": stats.prefill_tokens_per_s(),
            "decode_tokens_per_s": stats.decode_tokens_per_s(),
            "dispatches_per_token": stats.dispatches_per_token,
            "peak_memory_bytes": peak,
            "device": device.label(),
        });
        println!("{obj}");
    } else {
        if let Ok(rest) = stream.finish() {
            print!("{rest}");
        }
        println!();
        let _ = std::io::stdout().flush();
        eprintln!(
            "prompt: {} tokens, {:.1} tokens/s | decode: {} tokens, {:.1} tokens/s | peak memory: {}",
            stats.prompt_tokens,
            stats.prefill_tokens_per_s(),
            stats.generated_tokens,
            stats.decode_tokens_per_s(),
            peak.map_or("unknown".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0)),
        );
    }
    Ok(())
}
