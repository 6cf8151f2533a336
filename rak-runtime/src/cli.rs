//! The `rak` command line.
//!
//! - `rak check CELL...`: compiles `.rak` files and reports every error with its location;
//! - `rak show CELL [--backward] [--chunked]`: prints a cell's IR, the backward step derived
//!   from it, its chunked form;
//! - `rak emit CELL [--target rust|cuda|wgsl]`: prints the kernels generated for a cell (CUDA
//!   and WGSL at the sizes and schedule of `--dim`, `--dtype`, `--cube-dim`, `--sum-parts`,
//!   `--registers`, `--tile`);
//! - `rak bench`: times a built-in cell's kernels (or its chunked form) on this machine's device;
//! - `rak train` and `rak test`: run jobs from the layered configuration in `configs/`
//!   ([`crate::config`]), with overrides, a printout (`-c`), another main file (`-cn`) and
//!   multirun (`-m`) ending with the table of every run;
//! - `rak plot RUN...`: draws the loss curves of runs to a PNG file;
//! - `rak generate --checkpoint RUN --prompt ...`: streams tokens from a trained run.

use clap::{Parser, Subcommand};
use rak_codegen::display::{backward_to_string, cell_to_string};
use rak_codegen::schedule::Schedule;
use rak_codegen::{CompiledCell, compile_str};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "rak",
    version,
    about = "A compiler for recurrent neural network cells"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// What `rak emit` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// The `#[cube]` Rust source of the forward and backward kernels.
    Rust,
    /// CUDA C++ (what NVRTC compiles on an NVIDIA GPU).
    Cuda,
    /// WGSL (what wgpu runs).
    Wgsl,
}

pub use crate::kernels::{Dtype, Kernel};

/// Devices `rak bench` runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Device {
    /// wgpu's default adapter (`CUBECL_WGPU_DEFAULT_DEVICE=Cpu` picks the software one).
    Wgpu,
    /// The first CUDA GPU (needs rak built with `--features cuda`).
    Cuda,
}

fn parse_bench_shape(text: &str) -> Result<[usize; 4], String> {
    let values: Vec<usize> = text
        .split(',')
        .map(|part| {
            part.trim()
                .parse::<usize>()
                .map_err(|_| format!("`{part}` is not a size"))
        })
        .collect::<Result<_, _>>()?;
    match values.as_slice() {
        &[b, t, h, d] if b > 0 && t > 0 && h > 0 && d > 0 => Ok([b, t, h, d]),
        _ => Err(format!(
            "expected B,T,H,D (four sizes of at least 1), got `{text}`"
        )),
    }
}

/// Times one built-in cell picked by name.
struct BenchRequest {
    strategy: BenchStrategy,
    shape: [usize; 4],
    dtype: Dtype,
    device: Device,
    schedule: Schedule,
    warmup: usize,
    repetitions: usize,
    /// Whether to time the chunked path's own kernels alone too (chunked only).
    parts: bool,
    /// Whether the chunked scan runs inside burn's fusion wrapper, as training runs it.
    fusion: bool,
}

impl crate::cells::CellVisitor for BenchRequest {
    type Output = Result<crate::bench::KernelTiming, String>;

    fn visit<C: crate::kernels::CellKernels>(self) -> Self::Output {
        let compiled = crate::kernels::compiled_cell::<C>();
        let [batch, time, heads, dim] = self.shape;
        let dims: Vec<(String, usize)> = compiled
            .cell
            .dims
            .iter()
            .map(|d| (d.name.clone(), dim))
            .collect();
        let named: Vec<(&str, usize)> = dims.iter().map(|(n, s)| (n.as_str(), *s)).collect();
        let shape = rak_codegen::ScanShape::new(&compiled.cell, batch, time, heads, &named)
            .map_err(|e| e.to_string())?;
        let (schedule, warmup, repetitions) = (self.schedule, self.warmup, self.repetitions);
        macro_rules! time_on {
            ($runtime:ty, $client:expr) => {{
                let client = $client;
                let (fusion, parts) = (self.fusion, self.parts);
                let chunked = crate::bench::ChunkedBench {
                    compiled: &compiled,
                    shape: &shape,
                    dtype: self.dtype,
                    schedule,
                    warmup,
                    repetitions,
                    parts,
                };
                if self.strategy == BenchStrategy::Chunked {
                    return chunked.run::<$runtime>(fusion);
                }
                crate::kernels::with_element!(self.dtype, F => {
                    crate::bench::time_cell::<C, F, $runtime>(
                        &client, &shape, schedule, warmup, repetitions,
                    )
                })
                .map_err(|e| e.to_string())
            }};
        }
        match self.device {
            #[cfg(feature = "wgpu")]
            Device::Wgpu => {
                use cubecl::Runtime;
                time_on!(
                    cubecl::wgpu::WgpuRuntime,
                    cubecl::wgpu::WgpuRuntime::client(&Default::default())
                )
            }
            #[cfg(feature = "cuda")]
            Device::Cuda => {
                use cubecl::Runtime;
                time_on!(
                    cubecl::cuda::CudaRuntime,
                    cubecl::cuda::CudaRuntime::client(&Default::default())
                )
            }
            #[allow(unreachable_patterns)]
            other => Err(format!(
                "rak was built without the `{}` feature",
                format!("{other:?}").to_lowercase()
            )),
        }
    }
}

/// Runs `rak bench`: one table row (and JSON line) per shape and schedule.
#[allow(clippy::too_many_arguments)]
fn bench(
    strategy: BenchStrategy,
    cell: &str,
    shapes: &[[usize; 4]],
    dtype: Dtype,
    device: Device,
    schedules: &[Schedule],
    warmup: usize,
    repetitions: usize,
    json: Option<&Path>,
    parts: bool,
    fusion: bool,
) -> Result<(), String> {
    let builtin = crate::cells::Builtin::find(cell)
        .ok_or_else(|| format!("error: `{cell}` is not a built-in cell"))?;
    if parts && strategy != BenchStrategy::Chunked {
        return Err(
            "error: --parts times the chunked path's kernels: it needs --strategy chunked".into(),
        );
    }
    let mut part_rows = Vec::new();
    println!(
        "| cell | dtype | device | B | T | H | dims | forward (ms) | forward+backward (ms) | \
         schedule (forward; backward) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let runs = shapes
        .iter()
        .flat_map(|&shape| schedules.iter().map(move |&schedule| (shape, schedule)));
    for (shape, schedule) in runs {
        let request = BenchRequest {
            strategy,
            shape,
            dtype,
            device,
            schedule,
            warmup,
            repetitions,
            parts,
            fusion,
        };
        let timing = builtin.visit(request).map_err(|e| format!("error: {e}"))?;
        if parts {
            part_rows.extend(part_table_rows(shape, &timing));
        }
        let [b, t, h, d] = shape;
        let (forward, both) = (
            timing.forward.as_secs_f64() * 1e3,
            timing.forward_backward.as_secs_f64() * 1e3,
        );
        let describe = |s: Schedule, in_registers: Option<&str>| match strategy {
            BenchStrategy::Chunked => {
                let wrapper = if fusion { "fusion" } else { "no fusion" };
                format!("chunked, {} steps per chunk, {wrapper}", s.chunk)
            }
            BenchStrategy::Fused => describe_schedule(s, in_registers),
        };
        let forward_schedule = describe(
            timing.forward_schedule,
            timing.forward_in_registers.then_some("states"),
        );
        let backward_schedule = match strategy {
            BenchStrategy::Fused => format!(
                "{}, checkpoints every {} steps",
                describe(
                    timing.backward_schedule,
                    backward_registers(timing.recomputed_in_registers, timing.walked_in_registers),
                ),
                timing.backward_schedule.chunk
            ),
            BenchStrategy::Chunked => describe(timing.backward_schedule, None),
        };
        println!(
            "| {} | {dtype:?} | {device:?} | {b} | {t} | {h} | {d} | {forward:.3} | {both:.3} | \
             {forward_schedule}; {backward_schedule} |",
            builtin.file
        );
        if let Some(path) = json {
            let line = serde_json::json!({
                "cell": builtin.file, "dtype": format!("{dtype:?}").to_lowercase(),
                "device": format!("{device:?}").to_lowercase(), "batch": b, "time": t, "heads": h, "dim": d,
                "forward_ms": forward, "forward_backward_ms": both, "repetitions": repetitions,
                "chunk": schedule.chunk, "cube_dim": schedule.cube_dim,
                "sum_parts": schedule.sum_parts, "registers": schedule.registers,
                "recompute_registers": schedule.recompute_registers,
                "walk_registers": schedule.walk_registers,
                "series_near_zero": timing.backward_schedule.series_near_zero,
                "backward_cube_dim": schedule.backward_cube_dim,
                "backward_sum_parts": schedule.backward_sum_parts,
                "forward_in_registers": timing.forward_in_registers,
                "recomputed_in_registers": timing.recomputed_in_registers,
                "walked_in_registers": timing.walked_in_registers,
                "strategy": format!("{strategy:?}").to_lowercase(),
                "forward_schedule": forward_schedule, "backward_schedule": backward_schedule,
                "fusion": strategy == BenchStrategy::Chunked && fusion,
            });
            use std::io::Write;
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("error: cannot write `{}`: {e}", path.display()))?;
            writeln!(file, "{line}")
                .map_err(|e| format!("error: cannot write `{}`: {e}", path.display()))?;
        }
    }
    if parts {
        println!(
            "\nThe chunked path's own kernels, each timed alone at the sizes the scan gives it \
             (launch to synchronisation, medians); the rest of the scan is matrix products and \
             element-wise operations.\n"
        );
        println!(
            "| B | T | H | dims | kernel | launch | forward (ms) | share of the forward | \
             backward (ms) | forward+backward: share of the scan's |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");
        for row in part_rows {
            println!("{row}");
        }
    }
    Ok(())
}

/// The rows of `rak bench --parts`'s table for one shape: each of the chunked path's kernels
/// with its share of the whole scan's forward, and of its forward + backward (the kernel's
/// forward and backward together), then the rest of the scan.
fn part_table_rows(shape: [usize; 4], timing: &crate::bench::KernelTiming) -> Vec<String> {
    let [b, t, h, d] = shape;
    let ms = |duration: std::time::Duration| duration.as_secs_f64() * 1e3;
    let (forward, both) = (ms(timing.forward), ms(timing.forward_backward));
    let share = |part: f64, whole: f64| format!("{:.0} %", 100.0 * part / whole);
    let mut rows = Vec::new();
    let (mut parts_forward, mut parts_both) = (0.0, 0.0);
    for part in &timing.parts {
        let (part_forward, part_backward) = (ms(part.forward), ms(part.backward));
        parts_forward += part_forward;
        parts_both += part_forward + part_backward;
        rows.push(format!(
            "| {b} | {t} | {h} | {d} | {} | {} | {part_forward:.3} | {} | {part_backward:.3} | {} |",
            part.kernel.name(),
            part.launch,
            share(part_forward, forward),
            share(part_forward + part_backward, both),
        ));
    }
    rows.push(format!(
        "| {b} | {t} | {h} | {d} | the rest (whole scan: {forward:.3} ms forward, {both:.3} ms \
         forward+backward) | | {:.3} | {} | {:.3} | {} |",
        forward - parts_forward,
        share(forward - parts_forward, forward),
        both - forward - (parts_both - parts_forward),
        share(both - parts_both, both),
    ));
    rows
}

/// `rak bench --strategy`: what is timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchStrategy {
    /// The generated recurrent kernels, timed on the device.
    Fused,
    /// The cell's chunked form (burn operations, matrix products), timed to synchronisation.
    Chunked,
}

/// `rak bench --placement`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WorkspacePlacement {
    Auto,
    Shared,
    Global,
}

impl From<WorkspacePlacement> for rak_codegen::schedule::Placement {
    fn from(placement: WorkspacePlacement) -> Self {
        match placement {
            WorkspacePlacement::Auto => Self::Auto,
            WorkspacePlacement::Shared => Self::Shared,
            WorkspacePlacement::Global => Self::Global,
        }
    }
}

/// What `rak bench` measures besides the kernels.
#[derive(Debug, Subcommand)]
pub enum BenchTarget {
    /// Streaming inference from a run's latest checkpoint: time to read a random prompt of
    /// each length (by the forward scan, in blocks) and to generate tokens one step at a time,
    /// with the device memory after each: it stays flat however long the prompt.
    Generate {
        /// The run directory (its config.json and latest checkpoint).
        #[arg(long = "checkpoint", value_name = "RUN")]
        run: PathBuf,
        /// Prompt lengths, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = [1_000, 10_000, 100_000])]
        prompt_lengths: Vec<usize>,
        /// Tokens generated after each prompt.
        #[arg(long, default_value_t = 64)]
        tokens: usize,
        /// Prompt tokens read per forward scan.
        #[arg(long, default_value_t = 512)]
        block: usize,
    },
}

/// What `rak train` and `rak test` take.
#[derive(Debug, clap::Args)]
pub struct JobArgs {
    /// `key.sub=value` sets a value (a TOML value, else a string); `group=choice` picks a
    /// group's file (`model=small`, `experiment=fused`). With `-m`, comma-separated values run
    /// one job each.
    pub overrides: Vec<String>,
    /// The main configuration file, without `.toml` (the seed's `-cn`, also accepted).
    #[arg(long = "config-name", short = 'n')]
    pub config_name: Option<String>,
    /// The configuration folder.
    #[arg(long, default_value = "configs")]
    pub config_dir: PathBuf,
    /// Print the resolved configuration and exit (the seed's `-c job`, also accepted).
    #[arg(short = 'c', long = "cfg")]
    pub print_config: bool,
    /// Multirun: one job per combination of comma-separated values, then a table of all.
    #[arg(short = 'm', long)]
    pub multirun: bool,
    /// Also write the table of the runs (Markdown) to this file.
    #[arg(long)]
    pub table: Option<PathBuf>,
}

// `rak bench`'s many knobs make its variant the largest; a command is parsed once per process.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a model as the configuration says (`configs/train.toml` and its groups).
    Train(JobArgs),
    /// Test the latest checkpoint of a run on the test split (`configs/test.toml`).
    Test(JobArgs),
    /// Generate tokens after a prompt from a run's latest checkpoint: the prompt is read by the
    /// forward scan, then tokens come one step at a time from the carried states (memory per
    /// token does not grow with the context).
    Generate {
        /// The run directory (its config.json and latest checkpoint).
        #[arg(long = "checkpoint", value_name = "RUN")]
        run: PathBuf,
        /// The prompt: text for a model of text data, else token numbers separated by spaces.
        /// Repeat it to generate for several prompts at once.
        #[arg(long = "prompt", required_unless_present = "prompts_file")]
        prompts: Vec<String>,
        /// A file of prompts, one per line, generated for as one batch.
        #[arg(long)]
        prompts_file: Option<PathBuf>,
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// 0: greedy decoding.
        #[arg(long, default_value_t = 1.0)]
        temperature: f64,
        #[arg(long)]
        top_k: Option<usize>,
        #[arg(long)]
        top_p: Option<f64>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Prompt tokens read per forward scan.
        #[arg(long, default_value_t = 512)]
        block: usize,
    },
    /// Draw the training (and validation) loss of one or more runs to a PNG file.
    Plot {
        /// Run directories (each with a `metrics.jsonl`).
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        #[arg(long, short, default_value = "loss.png")]
        out: PathBuf,
    },
    /// Compile cells (`.rak` files) and report any error.
    Check {
        /// The `.rak` files to check.
        #[arg(required = true)]
        cells: Vec<PathBuf>,
    },
    /// Print the kernels generated for a cell: the cubecl Rust source, or the CUDA C++ or WGSL
    /// that cubecl compiles it to (built-in cells only; no GPU needed); or the CUDA C++ or WGSL
    /// of one of the chunked path's own kernels.
    Emit {
        /// A `.rak` file, a built-in cell (`simple_rnn`, `gla`, `retnet`, `mamba2`,
        /// `deltanet`, `mlstm`, `elman`), or a kernel of the chunked path (`linear_scan`,
        /// `linear_scan_reverse`, `decayed_scores`, `decayed_scores_backward`,
        /// `scores_across_sub_chunks`, `scores_across_sub_chunks_backward`; `--dim` is then
        /// the number of keys).
        cell: String,
        #[arg(long, value_enum, default_value_t = Target::Rust)]
        target: Target,
        /// Which kernel (CUDA and WGSL only; the Rust source holds all three).
        #[arg(long, value_enum, default_value_t = Kernel::Forward)]
        pass: Kernel,
        /// The size of every dim (CUDA and WGSL kernels are specialised on them).
        #[arg(long, default_value_t = 64)]
        dim: usize,
        /// Element type of inputs, parameters and outputs (CUDA and WGSL).
        #[arg(long, value_enum, default_value_t = Dtype::F32)]
        dtype: Dtype,
        /// Units per cube of the pass emitted (CUDA and WGSL; default: what that pass runs
        /// with, 128 for the forward scan and the step, 64 for the backward scan).
        #[arg(long)]
        cube_dim: Option<u32>,
        /// Units that may share one sum in the pass emitted (CUDA and WGSL; 1: one unit per
        /// element; default: what that pass runs with, 8 for the forward scan and the step, 1
        /// for the backward scan).
        #[arg(long)]
        sum_parts: Option<usize>,
        /// Whether the forward scan holds its states in registers where it can (CUDA and WGSL).
        #[arg(long, default_value_t = Schedule::default().registers, action = clap::ArgAction::Set)]
        registers: bool,
        /// Whether the backward scan's recomputation of each chunk holds the states in
        /// registers where it can (CUDA and WGSL).
        #[arg(long, default_value_t = Schedule::default().recompute_registers, action = clap::ArgAction::Set)]
        recompute_registers: bool,
        /// Whether the backward scan's walk carries the state gradients in registers from step
        /// to step where it can (CUDA and WGSL).
        #[arg(long, default_value_t = Schedule::default().walk_registers, action = clap::ArgAction::Set)]
        walk_registers: bool,
        /// Values of the split axis per cube (CUDA and WGSL; default: the tile a launch of
        /// one sequence gets with 48 KiB of shared memory; a GPU launch of many sequences
        /// takes smaller tiles, see `rak bench`'s schedule column).
        #[arg(long)]
        tile: Option<usize>,
        /// Steps per chunk (the chunked path's kernels).
        #[arg(long, default_value_t = 64)]
        chunk: usize,
        /// Steps per sub-chunk (the chunked path's kernels; at most the path's own, 16).
        #[arg(long, default_value_t = crate::chunked::SUB_CHUNK)]
        sub_chunk: usize,
    },
    /// Time a built-in cell's kernels (forward, and forward + backward) on this machine's device:
    /// medians of device-timed repetitions after warm-up.
    Bench {
        /// `rak bench generate`: streaming inference instead of the kernels.
        #[command(subcommand)]
        what: Option<BenchTarget>,
        /// A built-in cell.
        #[arg(long, default_value = "simple_rnn")]
        cell: String,
        /// The fused recurrent kernels, or the cell's chunked form.
        #[arg(long, value_enum, default_value_t = BenchStrategy::Fused)]
        strategy: BenchStrategy,
        /// `B,T,H,D`: batch, time, heads, and the size of every dim of the cell. Repeatable.
        #[arg(long = "shape", value_parser = parse_bench_shape, default_values = ["8,2048,8,128"])]
        shapes: Vec<[usize; 4]>,
        /// Element type of inputs, parameters and outputs (state and arithmetic are f32).
        #[arg(long, value_enum, default_value_t = Dtype::F32)]
        dtype: Dtype,
        #[arg(long, value_enum, default_value_t = Device::Wgpu)]
        device: Device,
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        #[arg(long, default_value_t = 20)]
        repetitions: usize,
        /// Steps between checkpoints (fused: the backward scan recomputes that many states per
        /// chunk), steps per chunk (chunked); several (`16,64`) time each shape under each.
        #[arg(long, value_delimiter = ',', default_values_t = [Schedule::default().chunk])]
        chunk: Vec<usize>,
        /// Units per cube (default: the one training uses); several (`64,128,256`) time each
        /// shape under each.
        #[arg(long, value_delimiter = ',', default_values_t = [Schedule::default().cube_dim])]
        cube_dim: Vec<u32>,
        /// Split each scan into launches of this many chunks (Mesa's software driver needs it
        /// for long scans).
        #[arg(long)]
        chunks_per_launch: Option<usize>,
        /// Steps whose inputs the forward scan loads at once.
        #[arg(long, default_value_t = 8)]
        stage: usize,
        /// Values of the split axis per cube, in both scans (default: chosen from the device
        /// and shape, for each scan); several (`16,32`) time each shape under each.
        #[arg(long, value_delimiter = ',')]
        tile: Vec<usize>,
        /// Where the per-step workspace lives.
        #[arg(long, value_enum, default_value_t = WorkspacePlacement::Auto)]
        placement: WorkspacePlacement,
        /// Units that may share one sum of a statement with fewer elements than units (1: one
        /// unit per element); several (`1,8`) time each shape under each.
        #[arg(long, value_delimiter = ',', default_value = "8")]
        sum_parts: Vec<usize>,
        /// Units per cube of the backward scan (default: its own, 64; `same`: `--cube-dim`);
        /// several time each shape under each.
        #[arg(long, value_delimiter = ',', value_parser = parse_backward_knob::<u32>, default_value = "64")]
        backward_cube_dim: Vec<Option<u32>>,
        /// `--sum-parts` of the backward scan (default: its own, 1; `same`: `--sum-parts`);
        /// several time each shape under each.
        #[arg(long, value_delimiter = ',', value_parser = parse_backward_knob::<usize>, default_value = "1")]
        backward_sum_parts: Vec<Option<usize>>,
        /// Whether the forward scan holds its states in registers where the cell and the
        /// launch allow it; `true,false` times each shape both ways.
        #[arg(long, value_delimiter = ',', default_value = "true")]
        registers: Vec<bool>,
        /// Whether the backward scan's recomputation of each chunk holds the states in
        /// registers where the cell and the launch allow it; `false,true` times each shape
        /// both ways.
        #[arg(long, value_delimiter = ',', default_value = "true")]
        recompute_registers: Vec<bool>,
        /// Whether the backward scan's walk carries the state gradients in registers from step
        /// to step where the cell and the launch allow it; `false,true` times each shape both
        /// ways.
        #[arg(long, value_delimiter = ',', default_value = "true")]
        walk_registers: Vec<bool>,
        /// Whether the kernels write `tanh` and `log1p` as series near 0; `false,true` times
        /// each shape both ways (default: as the device needs, on wgpu but not on CUDA).
        #[arg(long, value_delimiter = ',')]
        series_near_zero: Vec<bool>,
        /// Append one JSON object per shape to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// With `--strategy chunked`: also time the chunked path's own kernels alone, at the
        /// sizes the scan gives them, and print what share of the scan's time they take.
        #[arg(long)]
        parts: bool,
        /// With `--strategy chunked`: run inside burn's fusion wrapper (element-wise operations
        /// fused into fewer kernels), as training does; `false` times the cubecl backend alone.
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        fusion: bool,
    },
    /// Print a cell's IR, in the DSL's notation.
    Show {
        /// A `.rak` file.
        cell: PathBuf,
        /// Also print the backward step derived by automatic differentiation.
        #[arg(long)]
        backward: bool,
        /// Also print the chunked form (or why the cell has none).
        #[arg(long)]
        chunked: bool,
    },
}

/// Reads and compiles a `.rak` file; the error is ready to print (rendered diagnostics or an
/// I/O error naming the file).
pub fn compile_file(path: &Path) -> Result<CompiledCell, String> {
    let source = std::fs::read_to_string(path)
        .map_err(|error| format!("error: cannot read `{}`: {error}", path.display()))?;
    compile_str(&source).map_err(|errors| errors.render(&source, &path.display().to_string()))
}

/// What `rak emit` prints of a built-in cell's CUDA or WGSL kernel.
struct EmitOptions {
    pass: Kernel,
    /// The size of every dim.
    dim: usize,
    dtype: Dtype,
    schedule: Schedule,
    /// Steps per chunk and per sub-chunk (the chunked path's kernels).
    chunk: usize,
    sub_chunk: usize,
}

/// The source `rak emit` prints: for CUDA and WGSL, after a comment line that names the cell,
/// the kernel, the sizes and the resolved schedule.
fn emit(cell: &str, target: Target, options: EmitOptions) -> Result<String, String> {
    if let Some(kernel) = crate::fused::ChunkedKernel::find(cell) {
        return emit_chunked(kernel, target, &options);
    }
    let builtin = crate::cells::Builtin::find(cell);
    if target == Target::Rust {
        let compiled = match builtin {
            Some(builtin) => compile_str(builtin.source).map_err(|e| e.to_string())?,
            None => compile_file(Path::new(cell))?,
        };
        return Ok(rak_codegen::emit::kernels_source(&compiled));
    }
    let Some(builtin) = builtin else {
        let names: Vec<&str> = crate::cells::all().iter().map(|b| b.file).collect();
        return Err(format!(
            "error: CUDA and WGSL sources exist for the cells compiled into rak ({}); `{cell}` is not one. \
             Declare your cell with `rak::cell!` and call `rak::kernels::kernel_source` from your crate.",
            names.join(", ")
        ));
    };
    let compiled = compile_str(builtin.source).map_err(|e| e.to_string())?;
    let dims = vec![options.dim; compiled.cell.dims.len()];
    let kernel_target = match target {
        Target::Cuda => crate::kernels::SourceTarget::Cuda,
        _ => crate::kernels::SourceTarget::Wgsl,
    };
    let source = builtin
        .kernel_source(crate::kernels::SourceOf {
            dims: &dims,
            heads: 1,
            schedule: options.schedule,
            kernel: options.pass,
            target: kernel_target,
            dtype: options.dtype,
        })
        .map_err(|e| format!("error: {e}"))?;
    let sizes: Vec<String> = (compiled.cell.dims.iter())
        .map(|d| format!("{}={}", d.name, options.dim))
        .collect();
    let header = format!(
        "// rak emit: {} {} kernel, {}, {}; {}",
        builtin.file,
        format!("{:?}", options.pass).to_lowercase(),
        format!("{:?}", options.dtype).to_lowercase(),
        sizes.join(" "),
        describe_schedule(
            source.schedule,
            match options.pass {
                Kernel::Backward => {
                    backward_registers(source.states_in_registers, source.gradients_in_registers)
                }
                Kernel::Forward | Kernel::Step => source.states_in_registers.then_some("states"),
            },
        ),
    );
    Ok(format!("{header}\n{}", source.text))
}

/// [`emit`] of one of the chunked path's kernels, after a comment line that names it, its
/// sizes and its units per cube.
fn emit_chunked(
    kernel: crate::fused::ChunkedKernel,
    target: Target,
    options: &EmitOptions,
) -> Result<String, String> {
    let target = match target {
        Target::Cuda => crate::kernels::SourceTarget::Cuda,
        Target::Wgsl => crate::kernels::SourceTarget::Wgsl,
        Target::Rust => {
            return Err(format!(
                "error: `{}` is a kernel of the chunked path, written in rak-runtime/src/fused/cube.rs; \
                 `--target cuda` or `--target wgsl` prints what it compiles to",
                kernel.name()
            ));
        }
    };
    let (chunk, sub_chunk) = (options.chunk, options.sub_chunk);
    if chunk == 0 || sub_chunk == 0 || !chunk.is_multiple_of(sub_chunk) {
        return Err(format!(
            "error: --sub-chunk {sub_chunk} must divide --chunk {chunk} (both positive)"
        ));
    }
    if sub_chunk > crate::chunked::SUB_CHUNK {
        return Err(format!(
            "error: --sub-chunk {sub_chunk}: the chunked path takes sub-chunks of at most {} \
             steps, and its kernels are launched for those",
            crate::chunked::SUB_CHUNK
        ));
    }
    let sizes = crate::fused::ChunkedSizes {
        chunk,
        sub_chunk,
        keys: options.dim,
    };
    let source = crate::fused::chunked_kernel_source(kernel, sizes, target, options.dtype)
        .map_err(|e| format!("error: {e}"))?;
    let header = format!(
        "// rak emit: chunked path {} kernel, {}, C={chunk} c={sub_chunk} K={}; {} units per cube",
        kernel.name(),
        format!("{:?}", options.dtype).to_lowercase(),
        options.dim,
        kernel.units(sizes),
    );
    Ok(format!("{header}\n{source}"))
}

/// What the backward scan holds in registers, in words: the recomputation's states, the state
/// gradients its walk carries, both or neither.
fn backward_registers(recomputed: bool, walked: bool) -> Option<&'static str> {
    match (recomputed, walked) {
        (true, true) => Some("recomputed states and carried gradients"),
        (true, false) => Some("recomputed states"),
        (false, true) => Some("carried gradients"),
        (false, false) => None,
    }
}

/// A fused kernel's resolved schedule in words, as `rak emit`'s header and `rak bench`'s
/// schedule column print it.
fn describe_schedule(schedule: Schedule, in_registers: Option<&str>) -> String {
    let tile = schedule.tile.map_or("none".to_string(), |t| t.to_string());
    let placement = format!("{:?}", schedule.placement).to_lowercase();
    let registers = in_registers.map_or(String::new(), |held| format!(", {held} in registers"));
    let series = match schedule.series_near_zero {
        Some(true) => ", series near 0",
        _ => "",
    };
    format!(
        "cube_dim {}, tile {tile}, {placement} workspace, sum_parts {}{registers}{series}",
        schedule.cube_dim, schedule.sum_parts
    )
}

/// Each of `schedules` under each of `values` of one knob (`set` sets it), in order: the knobs
/// of `rak bench` given as lists multiply.
pub fn every<T: Copy>(
    schedules: Vec<Schedule>,
    values: &[T],
    set: impl Fn(&mut Schedule, T),
) -> Vec<Schedule> {
    let set = &set;
    schedules
        .into_iter()
        .flat_map(|schedule| {
            values.iter().map(move |&value| {
                let mut schedule = schedule;
                set(&mut schedule, value);
                schedule
            })
        })
        .collect()
}

/// The values of an optional knob given as a list, or unset (`None`, decided at launch) where
/// the list is empty.
fn given_or_unset<T>(values: Vec<T>) -> Vec<Option<T>> {
    if values.is_empty() {
        vec![None]
    } else {
        values.into_iter().map(Some).collect()
    }
}

/// A knob of the backward scan: a number, or `same` (the forward's).
fn parse_backward_knob<T: std::str::FromStr>(text: &str) -> Result<Option<T>, String> {
    match text {
        "same" => Ok(None),
        number => number
            .parse()
            .map(Some)
            .map_err(|_| format!("`{number}`: a number, or `same` (the forward's)")),
    }
}

/// Parses the process's arguments, accepting Hydra's `-cn NAME` for `--config-name NAME` and
/// `-c job` for `-c`.
pub fn parse_args() -> Cli {
    use clap::Parser;
    Cli::parse_from(hydra_spellings(std::env::args()))
}

/// Rewrites Hydra's `-cn NAME` to `--config-name NAME` and `-c job` to `-c`.
pub fn hydra_spellings(args: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for arg in args {
        if arg == "job" && out.last().is_some_and(|previous| previous == "-c") {
            continue;
        }
        out.push(if arg == "-cn" {
            "--config-name".into()
        } else {
            arg
        });
    }
    out
}

/// Resolves and runs the jobs of `rak train` / `rak test`; the table of the runs at the end.
fn run_jobs(args: JobArgs, main_file: &str) -> Result<(), String> {
    use crate::config::{ConfigDir, Override, multirun};
    let dir = ConfigDir::new(&args.config_dir);
    let name = args.config_name.as_deref().unwrap_or(main_file);
    let overrides = args
        .overrides
        .iter()
        .map(|text| Override::parse(text))
        .collect::<Result<Vec<_>, _>>()?;
    let sets = if args.multirun {
        multirun(&overrides)
    } else {
        if let Some(o) = overrides
            .iter()
            .find(|o| multirun(std::slice::from_ref(o)).len() > 1)
        {
            eprintln!("note: `{o}` is one value with commas; add -m to run one job per value");
        }
        vec![overrides]
    };
    // Resolve every job first: a mistake stops the multirun before anything runs.
    let jobs = sets
        .iter()
        .map(|set| dir.resolve(name, set))
        .collect::<Result<Vec<_>, _>>()?;
    let mut run_dirs = std::collections::HashSet::new();
    for job in &jobs {
        let run_dir = job.config.job.run_dir();
        if !run_dirs.insert(run_dir.clone()) {
            return Err(format!(
                "two runs would share the run directory `{}`: give each its own job.name, or \
                 put {{name}} in job.run_dir",
                run_dir.display()
            ));
        }
    }
    if args.print_config {
        for job in &jobs {
            if jobs.len() > 1 {
                print_output(&format!("# ---- run `{}`\n", job.config.job.name));
            }
            print_output(&job.to_toml());
        }
        return Ok(());
    }
    let mut reports = Vec::new();
    let mut failure = None;
    for (index, job) in jobs.iter().enumerate() {
        let config = &job.config;
        eprintln!(
            "[{}/{}] {} `{}` → {}",
            index + 1,
            jobs.len(),
            if config.job.mode == crate::config::Mode::Test {
                "test"
            } else {
                "train"
            },
            config.job.name,
            config.job.run_dir().display()
        );
        match crate::jobs::run_job(config, true) {
            Ok(report) => {
                eprintln!("device: {}", report.device);
                eprintln!("{}", report.summary.report());
                reports.push(report);
            }
            Err(error) => {
                failure = Some(format!("run `{}`: {error}", config.job.name));
                break;
            }
        }
    }
    if !reports.is_empty() {
        let table = crate::jobs::table(&reports);
        print_output(&table);
        if let Some(path) = &args.table {
            crate::checkpoint::write_atomically(path, table.as_bytes())?;
        }
    }
    failure.map_or(Ok(()), Err)
}

/// Runs the command line; returns the process exit code.
/// Prints `text` to stdout; a reader that stops early (`rak emit … | head`) ends the output
/// quietly instead of a panic.
fn print_output(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(error) = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        && error.kind() != std::io::ErrorKind::BrokenPipe
    {
        eprintln!("error: cannot write to stdout: {error}");
    }
}

pub fn run(cli: Cli) -> ExitCode {
    let report = |result: Result<(), String>| match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    };
    match cli.command {
        Command::Train(args) => report(run_jobs(args, "train")),
        Command::Test(args) => report(run_jobs(args, "test")),
        Command::Plot { runs, out } => report(crate::plot::loss_curves(&runs, &out)),
        Command::Generate {
            run,
            prompts,
            prompts_file,
            max_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            block,
        } => report((|| {
            let mut prompts = prompts;
            if let Some(file) = &prompts_file {
                let text = std::fs::read_to_string(file)
                    .map_err(|e| format!("cannot read `{}`: {e}", file.display()))?;
                prompts.extend(
                    text.lines()
                        .filter(|l| !l.trim().is_empty())
                        .map(String::from),
                );
            }
            let stream = prompts.len() == 1;
            let request = crate::jobs::InferenceRequest {
                run_dir: run,
                block,
                task: crate::jobs::InferenceTask::Generate {
                    prompts: prompts.clone(),
                    max_tokens,
                    sampling: crate::generate::Sampling {
                        temperature,
                        top_k,
                        top_p,
                        seed,
                    },
                    stream,
                },
            };
            let (device, texts) = crate::jobs::infer_from_run(&request)?;
            if stream {
                println!();
            } else {
                for (prompt, text) in prompts.iter().zip(&texts) {
                    println!("{prompt} → {text}");
                }
            }
            eprintln!("device: {device}");
            Ok(())
        })()),
        Command::Check { cells } => {
            let mut failed = false;
            for path in cells {
                match compile_file(&path) {
                    Ok(compiled) => {
                        let cell = &compiled.cell;
                        println!(
                            "ok: {} ({}): {} dims, {} inputs, {} params, {} states, {} outputs",
                            cell.name,
                            path.display(),
                            cell.dims.len(),
                            cell.inputs.len(),
                            cell.params.len(),
                            cell.states.len(),
                            cell.outputs.len()
                        );
                    }
                    Err(report) => {
                        eprint!("{report}");
                        failed = true;
                    }
                }
            }
            if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Command::Emit {
            cell,
            target,
            pass,
            dim,
            dtype,
            cube_dim,
            sum_parts,
            registers,
            recompute_registers,
            walk_registers,
            tile,
            chunk,
            sub_chunk,
        } => match emit(
            &cell,
            target,
            EmitOptions {
                pass,
                dim,
                dtype,
                // `--cube-dim` and `--sum-parts` are those of the pass emitted; unset, that
                // pass's defaults (the backward scan's own, `Schedule::for_backward`).
                schedule: {
                    let defaults = Schedule::default();
                    Schedule {
                        cube_dim: cube_dim.unwrap_or(defaults.cube_dim),
                        sum_parts: sum_parts.unwrap_or(defaults.sum_parts),
                        backward_cube_dim: cube_dim.or(defaults.backward_cube_dim),
                        backward_sum_parts: sum_parts.or(defaults.backward_sum_parts),
                        registers,
                        recompute_registers,
                        walk_registers,
                        tile,
                        ..defaults
                    }
                },
                chunk,
                sub_chunk,
            },
        ) {
            Ok(source) => {
                print_output(&source);
                ExitCode::SUCCESS
            }
            Err(report) => {
                eprintln!("{}", report.trim_end());
                ExitCode::FAILURE
            }
        },
        Command::Bench {
            what:
                Some(BenchTarget::Generate {
                    run,
                    prompt_lengths,
                    tokens,
                    block,
                }),
            ..
        } => report((|| {
            let request = crate::jobs::InferenceRequest {
                run_dir: run,
                block,
                task: crate::jobs::InferenceTask::Bench {
                    lengths: prompt_lengths,
                    tokens,
                },
            };
            let (_, table) = crate::jobs::infer_from_run(&request)?;
            print_output(&table.concat());
            Ok(())
        })()),
        Command::Bench {
            what: None,
            strategy,
            cell,
            shapes,
            dtype,
            device,
            warmup,
            repetitions,
            chunk,
            cube_dim,
            chunks_per_launch,
            stage,
            tile,
            placement,
            sum_parts,
            registers,
            recompute_registers,
            walk_registers,
            series_near_zero,
            backward_cube_dim,
            backward_sum_parts,
            json,
            parts,
            fusion,
        } => {
            // Every combination of the knobs given as lists.
            let tiles = given_or_unset(tile);
            let schedules = vec![Schedule {
                chunks_per_launch,
                stage,
                placement: placement.into(),
                ..Schedule::default()
            }];
            let schedules = every(schedules, &chunk, |s, v| s.chunk = v);
            let schedules = every(schedules, &cube_dim, |s, v| s.cube_dim = v);
            let schedules = every(schedules, &sum_parts, |s, v| s.sum_parts = v);
            let schedules = every(schedules, &registers, |s, v| s.registers = v);
            let schedules = every(schedules, &recompute_registers, |s, v| {
                s.recompute_registers = v
            });
            let schedules = every(schedules, &walk_registers, |s, v| s.walk_registers = v);
            let series_near_zero = given_or_unset(series_near_zero);
            let schedules = every(schedules, &series_near_zero, |s, v| s.series_near_zero = v);
            let schedules = every(schedules, &tiles, |s, v| s.tile = v);
            let schedules = every(schedules, &backward_cube_dim, |s, v| {
                s.backward_cube_dim = v
            });
            let schedules = every(schedules, &backward_sum_parts, |s, v| {
                s.backward_sum_parts = v
            });
            match bench(
                strategy,
                &cell,
                &shapes,
                dtype,
                device,
                &schedules,
                warmup,
                repetitions,
                json.as_deref(),
                parts,
                fusion,
            ) {
                Ok(()) => ExitCode::SUCCESS,
                Err(report) => {
                    eprintln!("{report}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Show {
            cell,
            backward,
            chunked,
        } => match compile_file(&cell) {
            Ok(compiled) => {
                print_output(&cell_to_string(&compiled.cell));
                if backward {
                    println!();
                    print_output(&backward_to_string(&compiled.backward));
                }
                if chunked {
                    println!();
                    match &compiled.chunk_form {
                        Ok(form) => print_output(&rak_codegen::display::chunk_form_to_string(form)),
                        Err(reason) => println!("{reason}"),
                    }
                }
                ExitCode::SUCCESS
            }
            Err(report) => {
                eprint!("{report}");
                ExitCode::FAILURE
            }
        },
    }
}
