//! Declares a brand-new cell and trains a language model built from it, with the kernels the
//! macro generated for it: `cargo run --release --example train_new_cell`.

use rak::runtime::jobs::train_on_best;
use rak::runtime::train::TrainConfig;

rak::cell! {
    /// A gated outer-product state whose writes are scaled by the gate's complement (as in GLA)
    /// and by a learned per-head strength, read out by a query through a tanh.
    pub cell LeakyWrite {
        dims K, V;
        input q[K], k[K], v[V], g[K] = sigmoid;
        param strength = 1.0;
        state S[K, V];
        update S[i, j] = g[i] * S[i, j] + softplus(strength) * (1 - g[i]) * k[i] * v[j];
        output o[j] = tanh(sum(i) q[i] * S[i, j]);
    }
}

fn main() {
    // The recall task's small LM (2 layers, 2 heads, K = V = 16), 300 steps.
    let config = TrainConfig::recall("leaky_write", 2);
    let (device, result) = train_on_best::<LeakyWrite>(&config, "runs/train_new_cell");
    println!("device: {}", device.name);
    match result {
        Ok(summary) => println!("{}", summary.report()),
        Err(error) => {
            eprintln!("error: {error}");
            std::process::exit(1);
        }
    }
}
