//! Loading a model with a progress bar, and the device choice.

use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};
use mlx_native::engine::{load_decoder, load_model, LoadedModel};
use mlx_native::models::decoder::Decoder;
use mlx_native::{Device, Result};

use crate::ModelArgs;

/// The device `args` names and the model at `args.model`: network, tokenizer, chat template.
pub fn device_and_model(args: &ModelArgs) -> Result<(Device, LoadedModel)> {
    with_progress(args, load_model)
}

/// As `device_and_model`, the network alone: `bench` reads no text, so a file without a
/// tokenizer (llama.cpp's random-weight GGUFs, `scripts/peer_random_gguf.py`) runs too.
pub fn device_and_decoder(args: &ModelArgs) -> Result<(Device, Decoder)> {
    with_progress(args, load_decoder)
}

type Loader<T> = fn(&Path, &Device, &mut dyn FnMut(usize, usize)) -> Result<T>;

fn with_progress<T>(args: &ModelArgs, load: Loader<T>) -> Result<(Device, T)> {
    let device = Device::parse(&args.run.device)?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("loading {msg} [{bar:30}] {pos}/{len} tensors")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(args.model.display().to_string());
    // Only worth drawing for models that take a moment (hidden when stderr is no terminal).
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr_with_hz(4));
    let model = load(&args.model, &device, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    });
    bar.finish_and_clear();
    Ok((device, model?))
}
