//! Running resolved jobs ([`crate::config`]): training a model of the built-in cell that
//! `model.cell` names, or testing a run's latest checkpoint, on the best device
//! ([`crate::device::run_on_best`]); and the table a multirun ends with (the seed's benchmark
//! table: time per phase and final metrics, one row per run); and generating text from a
//! run's latest checkpoint or timing it ([`infer_from_run`]: `rak generate`, `rak bench
//! generate`).

use crate::cells::{Builtin, all};
use crate::codegen::schedule::Schedule;
use crate::config::Mode;
use crate::device::{BackendVisitor, InferenceVisitor, Selected, infer_on_best, run_on_best};
use crate::fused::FusedCellBackend;
use crate::generate::Sampling;
use crate::kernels::{CellKernels, CellRef};
use crate::train::{RunOptions, RunSummary, TrainConfig, test_checkpoint, train};
use burn::tensor::backend::AutodiffBackend;
use std::path::{Path, PathBuf};

/// A job that ran: its configuration and what it did.
#[derive(Clone, Debug)]
pub struct JobReport {
    pub config: TrainConfig,
    pub device: String,
    pub summary: RunSummary,
}

/// Runs one job as its `[job]` table says; progress goes to stderr.
pub fn run_job(config: &TrainConfig, progress: bool) -> Result<JobReport, String> {
    let cell = find_cell(&config.model.cell)?;
    let options = RunOptions {
        run_dir: config.job.run_dir(),
        resume: config.job.resume,
        stop_after: None,
        schedule: Schedule::default(),
        progress,
    };
    let job = OnBest {
        config,
        options,
        cell: cell.cell,
    };
    let (device, summary) = run_on_best(job);
    Ok(JobReport {
        config: config.clone(),
        device: device.name,
        summary: summary?,
    })
}

/// Trains cell `C` as `config` says on the best device available, writing the run to
/// `run_dir` with progress on stderr; returns the device chosen and the run's summary.
///
/// The calling crate compiles only `C`'s kernels ([`CellRef::of`]); the training stack is
/// compiled here, once for every cell ([`train_cell_on_best`]).
pub fn train_on_best<C: CellKernels>(
    config: &TrainConfig,
    run_dir: impl Into<PathBuf>,
) -> (Selected, Result<RunSummary, String>) {
    train_cell_on_best(CellRef::of::<C>(), config, &run_dir.into())
}

/// [`train_on_best`] for a cell picked at run time (a built-in cell's [`Builtin::cell`]).
pub fn train_cell_on_best(
    cell: CellRef,
    config: &TrainConfig,
    run_dir: &Path,
) -> (Selected, Result<RunSummary, String>) {
    let config = training(config);
    let options = RunOptions {
        run_dir: run_dir.to_path_buf(),
        resume: false,
        stop_after: None,
        schedule: Schedule::default(),
        progress: true,
    };
    run_on_best(OnBest {
        config: &config,
        options,
        cell,
    })
}

/// `config` with its job set to training.
fn training(config: &TrainConfig) -> TrainConfig {
    TrainConfig {
        job: crate::config::JobConfig {
            mode: Mode::Train,
            ..config.job.clone()
        },
        ..config.clone()
    }
}

/// A job of one cell, waiting for its backend.
struct OnBest<'a> {
    config: &'a TrainConfig,
    options: RunOptions,
    cell: CellRef,
}

impl BackendVisitor for OnBest<'_> {
    type Output = Result<RunSummary, String>;

    fn visit<B>(self, device: B::Device, schedule: Schedule) -> Self::Output
    where
        B: AutodiffBackend + FusedCellBackend,
        B::InnerBackend: FusedCellBackend,
    {
        let OnBest {
            config,
            options,
            cell,
        } = self;
        let options = RunOptions {
            schedule,
            ..options
        };
        match config.job.mode {
            Mode::Train => train::<B>(cell, config, &options, &device),
            Mode::Test => test_checkpoint::<B>(cell, config, &options, &device),
        }
    }
}

/// What to do with a trained run's model.
#[derive(Clone, Debug)]
pub enum InferenceTask {
    /// Generate `max_tokens` tokens after each prompt (one stream per prompt, all at once);
    /// `stream` prints each token as it is drawn (one prompt only).
    Generate {
        prompts: Vec<String>,
        max_tokens: usize,
        sampling: Sampling,
        stream: bool,
    },
    /// Time reading random prompts of each length, then generating `tokens` tokens.
    Bench { lengths: Vec<usize>, tokens: usize },
}

/// `rak generate` and `rak bench generate`: a task on the latest checkpoint of a run.
#[derive(Clone, Debug)]
pub struct InferenceRequest {
    /// A training run's directory: its `config.json` and latest checkpoint.
    pub run_dir: PathBuf,
    /// Prompt tokens read per forward scan.
    pub block: usize,
    pub task: InferenceTask,
}

/// Runs an inference task on the best device; returns the device and, for generation, the
/// generated text of each prompt (for a benchmark, its table).
pub fn infer_from_run(request: &InferenceRequest) -> Result<(String, Vec<String>), String> {
    let config = crate::train::read_config(&request.run_dir)?;
    let mut prompts = Vec::new();
    if let InferenceTask::Generate {
        prompts: texts,
        sampling,
        ..
    } = &request.task
    {
        sampling.validate()?;
        if texts.is_empty() {
            return Err("no prompt given".into());
        }
        prompts = texts
            .iter()
            .map(|p| crate::generate::encode(&config.data, p))
            .collect::<Result<_, _>>()?;
    }
    if request.block == 0 {
        return Err("--block: must be at least 1".into());
    }
    let cell = find_cell(&config.model.cell)?;
    let (device, output) = infer_on_best(Inference {
        request,
        config: &config,
        prompts,
        cell: cell.cell,
    });
    let output = output?;
    let output = match &request.task {
        InferenceTask::Bench { .. } => vec![crate::generate::timing_table(&device.name, &output.1)],
        InferenceTask::Generate { .. } => output.0,
    };
    Ok((device.name, output))
}

fn find_cell(name: &str) -> Result<Builtin, String> {
    Builtin::find(name).ok_or_else(|| {
        let names: Vec<&str> = all().iter().map(|b| b.file).collect();
        format!(
            "model.cell: no built-in cell `{name}` (built-in cells: {})",
            names.join(", ")
        )
    })
}

struct Inference<'a> {
    request: &'a InferenceRequest,
    config: &'a TrainConfig,
    prompts: Vec<Vec<i64>>,
    cell: CellRef,
}

/// Generated texts, or the benchmark's rows.
type InferenceOutput = (Vec<String>, Vec<crate::generate::GenerationTiming>);

impl InferenceVisitor for Inference<'_> {
    type Output = Result<InferenceOutput, String>;

    fn visit<B: FusedCellBackend>(self, device: B::Device, schedule: Schedule) -> Self::Output {
        use std::io::Write;
        let Inference {
            request,
            config,
            prompts,
            cell,
        } = self;
        let (model, _, _) = crate::train::trained_model::<B>(
            cell,
            &config.model,
            &request.run_dir,
            schedule,
            &device,
        )?;
        let data = &config.data;
        match &request.task {
            InferenceTask::Generate {
                max_tokens,
                sampling,
                stream,
                ..
            } => {
                let stream = *stream && prompts.len() == 1;
                let generated = crate::generate::generate::<B>(
                    &model,
                    &prompts,
                    *max_tokens,
                    sampling,
                    request.block,
                    &device,
                    |_, token| {
                        if stream {
                            let mut out = std::io::stdout().lock();
                            let text = crate::generate::decode(data, &[token]);
                            let _ = out.write_all(text.as_bytes());
                            let _ = out.flush();
                        }
                    },
                );
                let texts = generated
                    .iter()
                    .map(|tokens| crate::generate::decode(data, tokens))
                    .collect();
                Ok((texts, Vec::new()))
            }
            InferenceTask::Bench { lengths, tokens } => {
                let rows = crate::generate::time_generation::<B>(
                    &model,
                    config.model.vocab,
                    lengths,
                    *tokens,
                    request.block,
                    &device,
                );
                Ok((Vec::new(), rows))
            }
        }
    }
}

/// The multirun table (Markdown): one row per job with its time per phase and final metrics.
pub fn table(reports: &[JobReport]) -> String {
    let seconds = |s: f64| {
        if s > 0.0 {
            format!("{s:.2}")
        } else {
            "–".into()
        }
    };
    let metric =
        |m: Option<f64>, digits: usize| m.map_or("–".into(), |m| format!("{m:.digits$}"));
    let mut text = String::from(
        "| run | mode | train time (s) | val time (s) | test time (s) | val loss | test loss \
         | test accuracy | train tokens/s |\n|---|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for report in reports {
        let s = &report.summary;
        let mode = match report.config.job.mode {
            Mode::Train => "train",
            Mode::Test => "test",
        };
        text += &format!(
            "| {} | {mode} | {} | {} | {} | {} | {} | {} | {} |\n",
            report.config.job.name,
            seconds(s.train_seconds),
            seconds(s.validation_seconds),
            seconds(s.test_seconds),
            metric(s.validation.map(|m| m.loss), 4),
            metric(s.test.map(|m| m.loss), 4),
            metric(s.test.map(|m| m.accuracy), 3),
            if s.tokens_per_second > 0.0 {
                format!("{:.0}", s.tokens_per_second)
            } else {
                "–".into()
            },
        );
    }
    text
}
