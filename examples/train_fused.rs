//! Trains the SimpleRNN language model with the fused kernels rak generates, on the embedded
//! associative-recall task (no download): `cargo run --release --example train_fused`.
//!
//! Runs on CUDA when built with `--features cuda` and a GPU answers, else on wgpu's default
//! adapter (without a GPU, the CPU through Mesa's software Vulkan driver: a couple of minutes on
//! two cores). Writes its run directory to `runs/train_fused` (metrics.jsonl, checkpoints).

use rak::cells::SimpleRnn;
use rak::codegen::schedule::Schedule;
use rak::runtime::burn::tensor::backend::AutodiffBackend;
use rak::runtime::data::DataConfig;
use rak::runtime::device::{BackendVisitor, run_on_best};
use rak::runtime::fused::FusedCellBackend;
use rak::runtime::model::{ModelConfig, Strategy};
use rak::runtime::train::{OptimizerConfig, RunOptions, RunSummary, TrainConfig, train};

struct Train(TrainConfig);

impl BackendVisitor for Train {
    type Output = Result<RunSummary, String>;
    fn visit<B>(self, device: B::Device, schedule: Schedule) -> Self::Output
    where
        B: AutodiffBackend + FusedCellBackend,
        B::InnerBackend: FusedCellBackend,
    {
        let options = RunOptions {
            run_dir: "runs/train_fused".into(),
            resume: false,
            stop_after: None,
            schedule,
            progress: true,
        };
        train::<B, SimpleRnn>(&self.0, &options, &device)
    }
}

fn main() {
    let config = TrainConfig {
        model: ModelConfig {
            cell: "simple_rnn".into(),
            vocab: 32,
            d_model: 64,
            layers: 2,
            heads: 2,
            dims: vec![16, 16],
            residual: true,
            strategy: Strategy::Fused,
            chunk: 16,
        },
        data: DataConfig::Recall {
            vocab: 32,
            pairs: 6,
        },
        optimizer: OptimizerConfig {
            lr: 3e-3,
            min_lr: 3e-4,
            warmup_steps: 20,
            weight_decay: 0.01,
            grad_clip: 1.0,
        },
        steps: 300,
        batch_size: 32,
        accumulation: 1,
        tbptt: None,
        seed: 7,
        log_every: 10,
        eval_every: 100,
        eval_batches: 4,
        test_batches: 4,
        checkpoint_every: 100,
    };
    let (device, result) = run_on_best(Train(config));
    println!("device: {}", device.name);
    match result {
        Ok(summary) => {
            let first = summary.losses.first().map_or(f64::NAN, |l| l.1);
            let last = summary.losses.last().map_or(f64::NAN, |l| l.1);
            println!("training loss: {first:.3} at step 1 → {last:.3} at the last step");
            if let Some(test) = summary.test {
                println!(
                    "test: loss {:.3}, recall accuracy {:.3} (chance {:.3})",
                    test.loss, test.accuracy, summary.chance_accuracy
                );
            }
            println!(
                "train {:.1} s ({:.0} tokens/s), validation {:.1} s, test {:.1} s",
                summary.train_seconds,
                summary.tokens_per_second,
                summary.validation_seconds,
                summary.test_seconds
            );
        }
        Err(error) => {
            eprintln!("error: {error}");
            std::process::exit(1);
        }
    }
}
