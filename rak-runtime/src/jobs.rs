//! Running resolved jobs ([`crate::config`]): training a model of the built-in cell that
//! `model.cell` names, or testing a run's latest checkpoint, on the best device
//! ([`crate::device::run_on_best`]); and the table a multirun ends with (the seed's benchmark
//! table: time per phase and final metrics, one row per run).

use crate::cells::{Builtin, CellVisitor, all};
use crate::codegen::schedule::Schedule;
use crate::config::Mode;
use crate::device::{BackendVisitor, Selected, run_on_best};
use crate::fused::FusedCellBackend;
use crate::kernels::CellKernels;
use crate::train::{RunOptions, RunSummary, TrainConfig, test_checkpoint, train};
use burn::tensor::backend::AutodiffBackend;
use std::marker::PhantomData;
use std::path::PathBuf;

/// A job that ran: its configuration and what it did.
#[derive(Clone, Debug)]
pub struct JobReport {
    pub config: TrainConfig,
    pub device: String,
    pub summary: RunSummary,
}

/// Runs one job as its `[job]` table says; progress goes to stderr.
pub fn run_job(config: &TrainConfig, progress: bool) -> Result<JobReport, String> {
    let cell = Builtin::find(&config.model.cell).ok_or_else(|| {
        let names: Vec<&str> = all().iter().map(|b| b.file).collect();
        format!(
            "model.cell: no built-in cell `{}` (built-in cells: {})",
            config.model.cell,
            names.join(", ")
        )
    })?;
    let options = RunOptions {
        run_dir: config.job.run_dir(),
        resume: config.job.resume,
        stop_after: None,
        schedule: Schedule::default(),
        progress,
    };
    let (device, summary) = cell.visit(OnBest { config, options });
    Ok(JobReport {
        config: config.clone(),
        device: device.name,
        summary: summary?,
    })
}

/// Trains cell `C` as `config` says on the best device available, writing the run to
/// `run_dir` with progress on stderr; returns the device chosen and the run's summary.
pub fn train_on_best<C: CellKernels>(
    config: &TrainConfig,
    run_dir: impl Into<PathBuf>,
) -> (Selected, Result<RunSummary, String>) {
    let config = TrainConfig {
        job: crate::config::JobConfig {
            mode: Mode::Train,
            ..config.job.clone()
        },
        ..config.clone()
    };
    let options = RunOptions {
        run_dir: run_dir.into(),
        resume: false,
        stop_after: None,
        schedule: Schedule::default(),
        progress: true,
    };
    OnBest {
        config: &config,
        options,
    }
    .visit::<C>()
}

/// A job waiting for its cell type, then for its backend.
struct OnBest<'a> {
    config: &'a TrainConfig,
    options: RunOptions,
}

impl CellVisitor for OnBest<'_> {
    type Output = (Selected, Result<RunSummary, String>);

    fn visit<C: CellKernels>(self) -> Self::Output {
        run_on_best(WithCell::<C> {
            job: self,
            cell: PhantomData,
        })
    }
}

struct WithCell<'a, C> {
    job: OnBest<'a>,
    cell: PhantomData<C>,
}

impl<C: CellKernels> BackendVisitor for WithCell<'_, C> {
    type Output = Result<RunSummary, String>;

    fn visit<B>(self, device: B::Device, schedule: Schedule) -> Self::Output
    where
        B: AutodiffBackend + FusedCellBackend,
        B::InnerBackend: FusedCellBackend,
    {
        let OnBest { config, options } = self.job;
        let options = RunOptions {
            schedule,
            ..options
        };
        match config.job.mode {
            Mode::Train => train::<B, C>(config, &options, &device),
            Mode::Test => test_checkpoint::<B, C>(config, &options, &device),
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
