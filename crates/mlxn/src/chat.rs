//! `mlxn chat`: an interactive conversation through the model's chat template. The whole
//! conversation is re-run each turn (simple and exact; prompts here are short).

use std::io::{BufRead, Write};

use clap::Args;
use mlx_native::engine::{GenerateOptions, Session};
use mlx_native::formats::tokenizer::TextStream;
use mlx_native::Result;

use crate::{load::device_and_model, ModelArgs, SamplingArgs};

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Context length (tokens of the whole conversation).
    #[arg(long, default_value_t = 4096)]
    ctx: usize,
}

pub fn run(args: ChatArgs) -> Result<()> {
    let (device, loaded) = device_and_model(&args.model)?;
    let capacity = args.ctx.min(loaded.model.params.max_position_embeddings);
    let opts = GenerateOptions {
        max_new_tokens: args.sampling.max_tokens,
        sampling: args.sampling.params(),
        stop_ids: loaded.stop_ids.clone(),
        use_graph: !args.model.no_graph,
    };
    let tokenizer = loaded.tokenizer.clone();
    let template = loaded.clone_template();
    let mut session = Session::new(loaded.model, &device, capacity)?;
    let mut history: Vec<(String, String)> = Vec::new();
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    loop {
        print!("> ");
        let _ = stdout.flush();
        let mut line = String::new();
        if stdin.lock().read_line(&mut line).map_err(|e| mlx_native::Error::io("<stdin>", e))? == 0 {
            break;
        }
        let line = line.trim();
        if line.is_empty() {
            break;
        }
        history.push(("user".into(), line.to_string()));
        let messages: Vec<(&str, &str)> = history.iter().map(|(r, c)| (r.as_str(), c.as_str())).collect();
        let prompt = tokenizer.encode(&template.render_pairs(&messages, true)?, true)?;
        let room = capacity.saturating_sub(prompt.len());
        let turn = GenerateOptions {
            max_new_tokens: opts.max_new_tokens.min(room),
            ..opts.clone()
        };
        let mut stream = TextStream::new(&tokenizer);
        let (ids, stats) = session.generate(&prompt, &turn, |id| {
            if !turn.stop_ids.contains(&id) {
                if let Ok(Some(text)) = stream.push(id) {
                    print!("{text}");
                    let _ = std::io::stdout().flush();
                }
            }
            true
        })?;
        if let Ok(Some(rest)) = stream.flush() {
            print!("{rest}");
        }
        println!();
        eprintln!("[{} tokens, {:.1} tokens/s]", stats.generated_tokens, stats.decode_tokens_per_s());
        let reply: Vec<u32> = ids.into_iter().filter(|i| !turn.stop_ids.contains(i)).collect();
        history.push(("assistant".into(), tokenizer.decode(&reply, true)?));
    }
    Ok(())
}
