//! `mlxn`: generate, chat and bench with mlx-native.

mod bench;
mod chat;
mod generate;
mod load;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "mlxn", version, about = "MLX-compatible LLM inference in Rust")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a continuation of a prompt (or a chat reply), streaming the text.
    Generate(generate::GenerateArgs),
    /// Chat interactively with a model (one user message per line; empty line or EOF ends).
    Chat(chat::ChatArgs),
    /// Measure prefill and decode speed.
    Bench(bench::BenchArgs),
}

/// Where and how a model runs.
#[derive(Args, Clone)]
pub struct DeviceArgs {
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Record and submit every decode step instead of replaying a captured graph.
    #[arg(long)]
    pub no_graph: bool,
    /// Element type of the KV caches [default: f16 for f16 and bf16 models with head dims over
    /// 64, else f32; at head dim 64 f16 is faster past ~1,000 tokens]
    #[arg(long, value_enum)]
    pub kv_dtype: Option<KvDtype>,
}

impl DeviceArgs {
    /// A session for `model` with the KV cache dtype asked for, else the model's
    /// (`Session::new`).
    pub fn session(
        &self,
        model: mlx_native::models::decoder::Decoder,
        device: &mlx_native::Device,
        capacity: usize,
    ) -> mlx_native::Result<mlx_native::engine::Session> {
        use mlx_native::engine::Session;
        match self.kv_dtype {
            Some(kv) => Session::with_kv_dtype(model, device, capacity, kv.dtype()),
            None => Session::new(model, device, capacity),
        }
    }
}

#[derive(ValueEnum, Clone, Copy)]
pub enum KvDtype {
    F16,
    F32,
}

impl KvDtype {
    pub fn dtype(self) -> mlx_native::DType {
        match self {
            KvDtype::F16 => mlx_native::DType::F16,
            KvDtype::F32 => mlx_native::DType::F32,
        }
    }
}

/// Options shared by every command that runs a model from a file.
#[derive(Args, Clone)]
pub struct ModelArgs {
    /// An MLX checkpoint directory (config.json + safetensors) or a .gguf file.
    #[arg(long, short)]
    pub model: std::path::PathBuf,
    #[command(flatten)]
    pub run: DeviceArgs,
}

/// Sampling options shared by generate, chat and bench.
#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// Temperature; 0 is greedy.
    #[arg(long = "temp", default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling threshold (1 disables).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep only the k most likely tokens (0 disables).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Drop tokens less likely than min_p times the most likely (0 disables).
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Penalty for tokens seen in the last `--repeat-window` tokens (1 disables).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    pub repeat_window: usize,
    /// Seed of the sampler's random draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    pub fn params(&self) -> mlx_native::SamplingParams {
        mlx_native::SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repeat_penalty,
            repetition_window: self.repeat_window,
            seed: self.seed,
        }
    }
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Bench(args) => bench::run(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// Peak resident memory of this process in bytes (Linux: VmHWM), if known.
pub fn peak_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
