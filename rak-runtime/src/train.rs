//! Training and evaluation of a [`LanguageModel`]: AdamW with warm-up and cosine decay of the
//! learning rate, gradient clipping by norm, gradient accumulation, optional truncated
//! backpropagation through time (segments of `tbptt` steps, each starting from the previous
//! segment's final states, detached), seeded and resumable runs.
//!
//! A run directory receives `config.json` (the resolved configuration), `metrics.jsonl` (one
//! JSON object per logged step and per evaluation), `summary.json` (time per phase and final
//! metrics), `checkpoints/` ([`crate::checkpoint`]) and `model.safetensors` (the last
//! weights). A loss that is not finite stops the run with its step.
//!
//! [`TrainConfig::recall`] is a small run that learns the embedded recall task in a few
//! minutes on a CPU ([`crate::jobs::train_on_best`] trains it on the best device available);
//! [`test_checkpoint`] evaluates a run's latest checkpoint on the test split.

use crate::checkpoint;
use crate::codegen::schedule::Schedule;
use crate::config::JobConfig;
use crate::data::{Batch, DataConfig, Dataset, Split};
use crate::fused::FusedCellBackend;
use crate::kernels::CellRef;
use crate::model::{LanguageModel, ModelConfig};
use burn::module::{AutodiffModule, Module};
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::record::{FullPrecisionSettings, NamedMpkBytesRecorder, Recorder};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData, activation};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The optimizer section of a run's configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerConfig {
    /// Peak learning rate, reached after `warmup_steps`.
    pub lr: f64,
    /// Learning rate at the last step (cosine decay from `lr`).
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    /// Largest gradient norm; larger gradients are scaled down. `0` disables clipping.
    pub grad_clip: f64,
}

/// A training run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// What to do and where (the command line's jobs; [`train`] itself takes its run directory
    /// from [`RunOptions`]).
    #[serde(default)]
    pub job: JobConfig,
    pub model: ModelConfig,
    pub data: DataConfig,
    pub optimizer: OptimizerConfig,
    /// Optimizer steps.
    pub steps: usize,
    pub batch_size: usize,
    /// Micro-batches whose gradients are summed into one step.
    pub accumulation: usize,
    /// Truncated backpropagation through time: segments of this many steps.
    pub tbptt: Option<usize>,
    pub seed: u64,
    pub log_every: usize,
    /// Validate every this many steps (and at the end).
    pub eval_every: usize,
    pub eval_batches: usize,
    pub test_batches: usize,
    /// Write a checkpoint every this many steps (and at the end).
    pub checkpoint_every: usize,
}

/// Loss, perplexity and accuracy over some batches.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub loss: f64,
    pub perplexity: f64,
    /// Fraction of scored positions whose most likely token is the target.
    pub accuracy: f64,
}

/// What a run did.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunSummary {
    /// The training loss of each step this invocation ran, by step.
    pub losses: Vec<(usize, f64)>,
    pub validation: Option<Metrics>,
    pub test: Option<Metrics>,
    pub chance_accuracy: f64,
    pub train_seconds: f64,
    pub validation_seconds: f64,
    pub test_seconds: f64,
    pub tokens_per_second: f64,
    pub last_step: usize,
}

/// How to run: where, whether to resume, and when to stop early.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub run_dir: PathBuf,
    /// Continue from the run directory's latest checkpoint.
    pub resume: bool,
    /// Stop after this step (a checkpoint is written there), before `steps`.
    pub stop_after: Option<usize>,
    /// The scan schedule (chunk comes from the model configuration).
    pub schedule: Schedule,
    /// Print progress (a bar on a terminal, lines otherwise).
    pub progress: bool,
}

impl TrainConfig {
    /// A small pre-norm residual LM of `cell` (two heads, every dim 16) on the embedded recall
    /// task: 300 steps that take a couple of minutes on two CPU cores and learn well above
    /// chance. `cell` is the name recorded in the configuration.
    pub fn recall(cell: &str, dims: usize) -> TrainConfig {
        TrainConfig {
            job: JobConfig::default(),
            model: ModelConfig {
                cell: cell.into(),
                vocab: 32,
                d_model: 64,
                layers: 2,
                heads: 2,
                dims: vec![16; dims],
                residual: true,
                strategy: crate::model::Strategy::Fused,
                projection: crate::model::Projection::Fused,
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
        }
    }

    /// Checks the configuration against `cell`; errors name the key.
    pub fn validate(&self, cell: CellRef) -> Result<Dataset, String> {
        self.model.validate(cell)?;
        let dataset = self.data.load()?;
        if self.model.vocab != self.data.vocab() {
            return Err(format!(
                "model.vocab: must equal the data's vocabulary ({}), got {}",
                self.data.vocab(),
                self.model.vocab
            ));
        }
        for (key, value) in [
            ("steps", self.steps),
            ("batch_size", self.batch_size),
            ("accumulation", self.accumulation),
            ("log_every", self.log_every),
            ("eval_every", self.eval_every),
            ("checkpoint_every", self.checkpoint_every),
        ] {
            if value == 0 {
                return Err(format!("{key}: must be at least 1"));
            }
        }
        if self.tbptt == Some(0) {
            return Err("tbptt: must be at least 1".into());
        }
        let o = &self.optimizer;
        if !(o.lr > 0.0 && o.lr.is_finite()) {
            return Err(format!("optimizer.lr: must be positive, got {}", o.lr));
        }
        if !(o.min_lr >= 0.0 && o.min_lr <= o.lr) {
            return Err(format!(
                "optimizer.min_lr: must be between 0 and optimizer.lr, got {}",
                o.min_lr
            ));
        }
        Ok(dataset)
    }

    /// The learning rate of step `step` (0-based): linear warm-up, then cosine decay.
    pub fn learning_rate(&self, step: usize) -> f64 {
        let o = &self.optimizer;
        if step < o.warmup_steps {
            return o.lr * (step + 1) as f64 / o.warmup_steps as f64;
        }
        let span = (self.steps - o.warmup_steps).max(1) as f64;
        let progress = ((step - o.warmup_steps) as f64 / span).min(1.0);
        o.min_lr + 0.5 * (o.lr - o.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// The batch as tensors: tokens, targets, mask.
fn tensors<B: Backend>(
    batch: &Batch,
    device: &B::Device,
) -> (Tensor<B, 2, Int>, Tensor<B, 2, Int>, Tensor<B, 2>) {
    let shape = [batch.batch, batch.time];
    (
        Tensor::from_data(TensorData::new(batch.tokens.clone(), shape), device),
        Tensor::from_data(TensorData::new(batch.targets.clone(), shape), device),
        Tensor::from_data(TensorData::new(batch.mask.clone(), shape), device),
    )
}

/// Masked mean cross-entropy and the number of correct predictions of `logits` `[B, T, V]`.
fn loss_and_correct<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    mask: Tensor<B, 2>,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let [batch, time, _] = logits.dims();
    let log_probs = activation::log_softmax(logits, 2);
    let target_log_probs = log_probs
        .clone()
        .gather(2, targets.clone().reshape([batch, time, 1]))
        .reshape([batch, time]);
    let count = mask.clone().sum().clamp_min(1.0);
    let loss = (target_log_probs * mask.clone()).sum().neg() / count;
    let predicted = log_probs.argmax(2).reshape([batch, time]);
    let correct = (predicted.equal(targets).float() * mask).sum();
    (loss, correct)
}

/// Evaluates the model (no gradients) on `batches` batches of `split`.
pub fn evaluate<B: FusedCellBackend>(
    model: &LanguageModel<B>,
    dataset: &Dataset,
    config: &TrainConfig,
    split: Split,
    batches: usize,
    device: &B::Device,
) -> Metrics {
    let (mut loss_sum, mut correct, mut scored) = (0.0, 0.0, 0.0);
    for index in 0..batches.max(1) {
        let batch = dataset.batch(config.seed, split, index as u64, config.batch_size);
        let weight: f64 = batch.mask.iter().map(|&m| m as f64).sum();
        let (tokens, targets, mask) = tensors::<B>(&batch, device);
        let output = model.forward(tokens, None);
        let (loss, hits) = loss_and_correct(output.logits, targets, mask);
        loss_sum += loss.into_scalar().elem::<f64>() * weight;
        correct += hits.into_scalar().elem::<f64>();
        scored += weight;
    }
    let loss = loss_sum / scored.max(1.0);
    Metrics {
        loss,
        perplexity: loss.exp(),
        accuracy: correct / scored.max(1.0),
    }
}

use burn::tensor::ElementConversion;

/// Appends one JSON object to `metrics.jsonl`.
fn log_metrics(file: &mut std::fs::File, line: serde_json::Value) -> Result<(), String> {
    writeln!(file, "{line}").map_err(|e| format!("cannot write metrics.jsonl: {e}"))
}

fn record<B: Backend, R: burn::record::Record<B>>(item: R) -> Result<Vec<u8>, String> {
    NamedMpkBytesRecorder::<FullPrecisionSettings>::default()
        .record(item, ())
        .map_err(|e| format!("cannot serialise a record: {e}"))
}

/// Trains a model of `cell` as `config` says; see the module documentation for what the run
/// writes.
pub fn train<B>(
    cell: CellRef,
    config: &TrainConfig,
    options: &RunOptions,
    device: &B::Device,
) -> Result<RunSummary, String>
where
    B: AutodiffBackend + FusedCellBackend,
    B::InnerBackend: FusedCellBackend,
{
    let dataset = config.validate(cell)?;
    let run_dir = &options.run_dir;
    std::fs::create_dir_all(run_dir)
        .map_err(|e| format!("cannot create `{}`: {e}", run_dir.display()))?;
    checkpoint::write_json(&run_dir.join("config.json"), config)?;
    B::seed(device, config.seed);
    let mut model: LanguageModel<B> = config.model.init::<B>(cell, options.schedule, device)?;
    let o = &config.optimizer;
    let mut adamw = AdamWConfig::new().with_weight_decay(o.weight_decay as f32);
    if o.grad_clip > 0.0 {
        adamw = adamw.with_grad_clipping(Some(
            burn::optim::grad_clipping::GradientClippingConfig::Norm(o.grad_clip as f32),
        ));
    }
    let mut optimizer = adamw.init::<B, LanguageModel<B>>();
    let mut first_step = 0;
    if options.resume
        && let Some(path) = checkpoint::latest(run_dir)?
    {
        let saved = checkpoint::load(&path, &config.model)?;
        let recorder = NamedMpkBytesRecorder::<FullPrecisionSettings>::default();
        let refuse = |e: burn::record::RecorderError| {
            format!("checkpoint `{}` refused: {e}", path.display())
        };
        model = model.load_record(recorder.load(saved.model, device).map_err(refuse)?);
        optimizer = optimizer.load_record(recorder.load(saved.optimizer, device).map_err(refuse)?);
        first_step = saved.state.step;
        if options.progress {
            eprintln!("resuming {} from step {first_step}", run_dir.display());
        }
    }
    let mut metrics = open_metrics(run_dir)?;
    let last_step = options.stop_after.unwrap_or(config.steps).min(config.steps);
    let progress = Progress::new(options.progress, first_step, last_step);
    let time = dataset.seq_len();
    let segment = config.tbptt.unwrap_or(time).min(time);
    let tokens_per_step = config.batch_size * time * config.accumulation;
    let mut summary = RunSummary {
        losses: Vec::new(),
        validation: None,
        test: None,
        chance_accuracy: dataset.chance_accuracy(),
        train_seconds: 0.0,
        validation_seconds: 0.0,
        test_seconds: 0.0,
        tokens_per_second: 0.0,
        last_step,
    };
    let (mut train_time, mut validation_time) = (Duration::ZERO, Duration::ZERO);
    let save = |model: &LanguageModel<B>, optimizer: &_, step: usize| -> Result<(), String> {
        let model_bytes = record::<B, _>(model.clone().into_record())?;
        let optimizer_bytes =
            record::<B, _>(Optimizer::<LanguageModel<B>, B>::to_record(optimizer))?;
        checkpoint::save(run_dir, step, &config.model, &model_bytes, &optimizer_bytes)?;
        Ok(())
    };
    for step in first_step..last_step {
        let started = Instant::now();
        let lr = config.learning_rate(step);
        let mut accumulator = GradientsAccumulator::<LanguageModel<B>>::new();
        let mut loss_total = 0.0;
        let segments = time.div_ceil(segment);
        for micro in 0..config.accumulation {
            let index = (step * config.accumulation + micro) as u64;
            let batch = dataset.batch(config.seed, Split::Train, index, config.batch_size);
            let (tokens, targets, mask) = tensors::<B>(&batch, device);
            let mut states: Option<Vec<Tensor<B, 3>>> = None;
            for s in 0..segments {
                let range = s * segment..((s + 1) * segment).min(time);
                let slice = |t: Tensor<B, 2, Int>| t.slice([0..batch.batch, range.clone()]);
                let output = model.forward(slice(tokens.clone()), states.take());
                states = Some(output.states.into_iter().map(|s| s.detach()).collect());
                let (loss, _) = loss_and_correct(
                    output.logits,
                    slice(targets.clone()),
                    mask.clone().slice([0..batch.batch, range]),
                );
                let scale = (config.accumulation * segments) as f64;
                let value = loss.clone().into_scalar().elem::<f64>();
                if !value.is_finite() {
                    progress.finish();
                    return Err(format!(
                        "step {}: the training loss is {value}; stopping (the last checkpoint \
                         is kept in `{}`)",
                        step + 1,
                        run_dir.join("checkpoints").display()
                    ));
                }
                loss_total += value / scale;
                let gradients = loss.div_scalar(scale).backward();
                accumulator.accumulate(&model, GradientsParams::from_grads(gradients, &model));
            }
        }
        model = optimizer.step(lr, model, accumulator.grads());
        let elapsed = started.elapsed();
        train_time += elapsed;
        let done = step + 1;
        summary.losses.push((done, loss_total));
        let tokens_per_second = tokens_per_step as f64 / elapsed.as_secs_f64().max(1e-9);
        progress.step(done, loss_total, tokens_per_second);
        if done.is_multiple_of(config.log_every) || done == last_step {
            log_metrics(
                &mut metrics,
                serde_json::json!({
                    "phase": "train", "step": done, "loss": loss_total, "lr": lr,
                    "tokens_per_second": tokens_per_second,
                    "seconds": train_time.as_secs_f64(),
                }),
            )?;
        }
        if done.is_multiple_of(config.eval_every) || done == config.steps {
            let (m, took) = phase::<B>(
                &model,
                &dataset,
                config,
                Split::Validation,
                done,
                device,
                &mut metrics,
            )?;
            validation_time += took;
            summary.validation = Some(m);
            progress.note(&format!(
                "step {done}: validation loss {:.4}, accuracy {:.3}",
                m.loss, m.accuracy
            ));
        }
        if done.is_multiple_of(config.checkpoint_every) || done == last_step {
            save(&model, &optimizer, done)?;
        }
    }
    progress.finish();
    checkpoint::export_safetensors(&model, &config.model, &run_dir.join("model.safetensors"))?;
    summary.train_seconds = train_time.as_secs_f64();
    summary.validation_seconds = validation_time.as_secs_f64();
    let trained_steps = last_step.saturating_sub(first_step);
    summary.tokens_per_second =
        (tokens_per_step * trained_steps) as f64 / summary.train_seconds.max(1e-9);
    if last_step == config.steps && config.test_batches > 0 {
        let (m, took) = phase::<B>(
            &model,
            &dataset,
            config,
            Split::Test,
            last_step,
            device,
            &mut metrics,
        )?;
        summary.test_seconds = took.as_secs_f64();
        summary.test = Some(m);
    }
    checkpoint::write_json(&run_dir.join("summary.json"), &summary)?;
    Ok(summary)
}

impl RunSummary {
    /// A few lines for a person: the loss from first to last step, the test metrics against
    /// chance, and the time of each phase.
    pub fn report(&self) -> String {
        let mut lines = Vec::new();
        if let (Some(first), Some(last)) = (self.losses.first(), self.losses.last()) {
            lines.push(format!(
                "training loss: {:.3} at step {} → {:.3} at step {}",
                first.1, first.0, last.1, last.0
            ));
        }
        if let Some(test) = self.test {
            lines.push(format!(
                "test: loss {:.3}, accuracy {:.3} (chance {:.3})",
                test.loss, test.accuracy, self.chance_accuracy
            ));
        }
        if self.train_seconds > 0.0 {
            lines.push(format!(
                "train {:.1} s ({:.0} tokens/s), validation {:.1} s, test {:.1} s",
                self.train_seconds,
                self.tokens_per_second,
                self.validation_seconds,
                self.test_seconds
            ));
        } else {
            lines.push(format!("test {:.1} s", self.test_seconds));
        }
        lines.join("\n")
    }
}

/// The run's `metrics.jsonl`, opened for appending.
fn open_metrics(run_dir: &Path) -> Result<std::fs::File, String> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run_dir.join("metrics.jsonl"))
        .map_err(|e| format!("cannot open metrics.jsonl: {e}"))
}

/// The model of `cell` of the latest checkpoint of `run_dir` (configured as `config`; a
/// checkpoint of another model is refused), its step and the checkpoint's folder.
pub fn trained_model<B: FusedCellBackend>(
    cell: CellRef,
    config: &ModelConfig,
    run_dir: &Path,
    schedule: Schedule,
    device: &B::Device,
) -> Result<(LanguageModel<B>, usize, PathBuf), String> {
    let path = checkpoint::latest(run_dir)?
        .ok_or_else(|| format!("`{}` has no checkpoint (train it first)", run_dir.display()))?;
    let saved = checkpoint::load(&path, config)?;
    let model: LanguageModel<B> = config.init::<B>(cell, schedule, device)?;
    let record = NamedMpkBytesRecorder::<FullPrecisionSettings>::default()
        .load(saved.model, device)
        .map_err(|e| format!("checkpoint `{}` refused: {e}", path.display()))?;
    Ok((model.load_record(record), saved.state.step, path))
}

/// Tests the latest checkpoint of `options.run_dir` (a model of `cell` configured as
/// `config.model`; another is refused) on `config.test_batches` batches of the test split,
/// without training; writes the test's configuration to `test-config.json` and appends the
/// metrics to the run's `metrics.jsonl`.
pub fn test_checkpoint<B>(
    cell: CellRef,
    config: &TrainConfig,
    options: &RunOptions,
    device: &B::Device,
) -> Result<RunSummary, String>
where
    B: AutodiffBackend + FusedCellBackend,
    B::InnerBackend: FusedCellBackend,
{
    let dataset = config.validate(cell)?;
    let run_dir = &options.run_dir;
    let (model, step, path) =
        trained_model::<B>(cell, &config.model, run_dir, options.schedule, device)?;
    checkpoint::write_json(&run_dir.join("test-config.json"), config)?;
    let mut metrics = open_metrics(run_dir)?;
    let (m, took) = phase::<B>(
        &model,
        &dataset,
        config,
        Split::Test,
        step,
        device,
        &mut metrics,
    )?;
    if options.progress {
        eprintln!(
            "tested {} at step {step}: loss {:.4}, accuracy {:.3}",
            path.display(),
            m.loss,
            m.accuracy
        );
    }
    Ok(RunSummary {
        losses: Vec::new(),
        validation: None,
        test: Some(m),
        chance_accuracy: dataset.chance_accuracy(),
        train_seconds: 0.0,
        validation_seconds: 0.0,
        test_seconds: took.as_secs_f64(),
        tokens_per_second: 0.0,
        last_step: step,
    })
}

/// Evaluates the model without gradients on the validation or test batches and logs the
/// metrics; returns them and the time taken.
fn phase<B>(
    model: &LanguageModel<B>,
    dataset: &Dataset,
    config: &TrainConfig,
    split: Split,
    step: usize,
    device: &B::Device,
    metrics: &mut std::fs::File,
) -> Result<(Metrics, Duration), String>
where
    B: AutodiffBackend,
    B::InnerBackend: FusedCellBackend,
{
    let started = Instant::now();
    let (name, batches) = match split {
        Split::Test => ("test", config.test_batches),
        _ => ("validation", config.eval_batches),
    };
    let m = evaluate(&model.valid(), dataset, config, split, batches, device);
    let took = started.elapsed();
    log_metrics(
        metrics,
        serde_json::json!({
            "phase": name, "step": step, "loss": m.loss,
            "perplexity": m.perplexity, "accuracy": m.accuracy,
        }),
    )?;
    Ok((m, took))
}

/// A progress bar on a terminal, plain lines otherwise, nothing when quiet.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    lines: bool,
    every: usize,
}

impl Progress {
    fn new(enabled: bool, first: usize, last: usize) -> Self {
        use std::io::IsTerminal;
        let terminal = enabled && std::io::stderr().is_terminal();
        let bar = terminal.then(|| {
            let bar = indicatif::ProgressBar::new(last as u64);
            bar.set_position(first as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
        Progress {
            bar,
            lines: enabled && !terminal,
            every: (last.saturating_sub(first) / 20).max(1),
        }
    }

    fn step(&self, step: usize, loss: f64, tokens_per_second: f64) {
        let message = format!("loss {loss:.4}  {tokens_per_second:.0} tokens/s");
        if let Some(bar) = &self.bar {
            bar.set_position(step as u64);
            bar.set_message(message);
        } else if self.lines && step.is_multiple_of(self.every) {
            eprintln!("step {step}: {message}");
        }
    }

    fn note(&self, line: &str) {
        if let Some(bar) = &self.bar {
            bar.println(line);
        } else if self.lines {
            eprintln!("{line}");
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Reads a run's resolved configuration back (for `rak test` and resuming).
pub fn read_config(run_dir: &Path) -> Result<TrainConfig, String> {
    let path = run_dir.join("config.json");
    let bytes =
        std::fs::read(&path).map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("`{}`: {e}", path.display()))
}
