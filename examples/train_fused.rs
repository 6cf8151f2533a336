//! Trains the SimpleRNN language model with the fused kernels rak generates, on the embedded
//! associative-recall task (no download): `cargo run --release --example train_fused`.
//!
//! Runs on CUDA when built with `--features cuda` and a GPU answers, else on wgpu's default
//! adapter (without a GPU, the CPU through Mesa's software Vulkan driver: a couple of minutes on
//! two cores). Writes its run directory to `runs/train_fused` (metrics.jsonl, checkpoints,
//! model.safetensors).

use rak::cells::Builtin;
use rak::runtime::jobs::train_cell_on_best;
use rak::runtime::train::TrainConfig;
use std::path::Path;

fn main() {
    // A 2-layer, 2-head pre-norm LM (D = 64, K = V = 16) on recall: 300 steps.
    // A built-in cell, picked by name: no cell type here, its kernels and the training stack
    // are compiled in rak-runtime (a cell of your own goes through `train_on_best::<C>`: see
    // examples/train_new_cell.rs).
    let cell = Builtin::find("simple_rnn").expect("SimpleRNN is a built-in cell");
    let config = TrainConfig::recall(cell.file, 2);
    let (device, result) = train_cell_on_best(cell.cell, &config, Path::new("runs/train_fused"));
    println!("device: {}", device.name);
    match result {
        Ok(summary) => println!("{}", summary.report()),
        Err(error) => {
            eprintln!("error: {error}");
            std::process::exit(1);
        }
    }
}
