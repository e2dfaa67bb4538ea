//! Loading a model with a progress bar, and the device choice.

use indicatif::{ProgressBar, ProgressStyle};
use mlx_native::engine::{load_model, LoadedModel};
use mlx_native::{Device, Result};

use crate::ModelArgs;

pub fn device_and_model(args: &ModelArgs) -> Result<(Device, LoadedModel)> {
    let device = Device::parse(&args.run.device)?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("loading {msg} [{bar:30}] {pos}/{len} tensors")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(args.model.display().to_string());
    // Only worth drawing for models that take a moment (hidden when stderr is no terminal).
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr_with_hz(4));
    let model = load_model(&args.model, &device, &mut |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    });
    bar.finish_and_clear();
    Ok((device, model?))
}
