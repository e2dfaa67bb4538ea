//! `mlxn chat`: an interactive conversation through the model's chat template. Each turn's
//! prompt is the whole conversation rendered again; the session reuses the keys and values of
//! its longest prefix already in the cache (the earlier turns), so only the new tokens run.

use std::io::{BufRead, Write};

use clap::Args;
use mlx_native::engine::{GenerateOptions, LoadedModel};
use mlx_native::formats::chat_template::Message;
use mlx_native::formats::tokenizer::TextStream;
use mlx_native::{Error, Result};

use crate::{load::device_and_model, ModelArgs, SamplingArgs};

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Context length (tokens of the whole conversation).
    #[arg(long, default_value_t = 4096)]
    ctx: usize,
}

pub fn run(args: ChatArgs) -> Result<()> {
    let (device, loaded) = device_and_model(&args.model)?;
    let capacity = args.ctx.min(loaded.model.params.max_position_embeddings);
    let LoadedModel {
        model,
        tokenizer,
        chat_template,
        stop_ids,
    } = loaded;
    let template =
        chat_template.ok_or_else(|| Error::Template("the model has no chat template".into()))?;
    let opts = GenerateOptions {
        max_new_tokens: args.max_tokens,
        sampling: args.sampling.params(),
        stop_ids,
        use_graph: !args.model.run.no_graph,
    };
    let mut session = args.model.run.session(model, &device, capacity)?;
    session.set_prefix_reuse(true);
    let mut history: Vec<Message> = Vec::new();
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    loop {
        print!("> ");
        let _ = stdout.flush();
        let mut line = String::new();
        if stdin
            .lock()
            .read_line(&mut line)
            .map_err(|e| Error::io("<stdin>", e))?
            == 0
        {
            break;
        }
        let line = line.trim();
        if line.is_empty() {
            break;
        }
        history.push(Message::new("user", line));
        let prompt = tokenizer.encode(&template.render(&history, true)?, true)?;
        let room = capacity.saturating_sub(prompt.len());
        let turn = GenerateOptions {
            max_new_tokens: opts.max_new_tokens.min(room),
            ..opts.clone()
        };
        let mut stream = TextStream::new(&tokenizer, true);
        let (ids, stats) = session.generate(&prompt, &turn, |id| {
            if !turn.stop_ids.contains(&id) {
                if let Ok(text) = stream.push(id) {
                    print!("{text}");
                    let _ = std::io::stdout().flush();
                }
            }
            true
        })?;
        if let Ok(rest) = stream.finish() {
            print!("{rest}");
        }
        println!();
        eprintln!(
            "[{} tokens, {:.1} tokens/s; prompt {} tokens, {} of them cached]",
            stats.generated_tokens,
            stats.decode_tokens_per_s(),
            stats.prompt_tokens,
            stats.reused_tokens
        );
        let reply: Vec<u32> = ids
            .into_iter()
            .filter(|i| !turn.stop_ids.contains(i))
            .collect();
        history.push(Message::new("assistant", tokenizer.decode(&reply, true)?));
    }
    Ok(())
}
