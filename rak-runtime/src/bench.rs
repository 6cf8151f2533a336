//! Kernel benchmarks (`rak bench`): a cell's forward scan, and forward + backward, timed on the
//! device by cubecl's profiler (CUDA events on CUDA), median of repetitions after warm-up.
//!
//! The forward scan is timed as training runs it, writing checkpoints; forward + backward is
//! one forward scan, one backward scan and the parameter-gradient reduction.
//!
//! `rak bench --strategy chunked` times the cell's chunked form instead ([`time_chunked`]):
//! burn operations rather than one kernel, so it is timed from the first launch to the device's
//! synchronisation (launch overheads included), forward on the cubecl backend inside burn's
//! fusion wrapper as training runs it (or not: `--fusion false`), forward + backward through
//! burn's autodiff; `--parts` adds the chunked path's own kernels timed alone.

use crate::chunked::{ChunkedScan, SUB_CHUNK};
use crate::codegen::ScanShape;
use crate::codegen::chunkwise::GateAxis;
use crate::codegen::ir::IndexId;
use crate::codegen::ir::{InputId, OutputId, ParamId, StateId};
use crate::codegen::schedule::Schedule;
use crate::fused::{BlockScores, ChunkedKernel, FusedCellBackend, SumOver};
use crate::kernels::{
    BackwardBuffers, CellKernels, CellRunner, DeviceArray, Dtype, ForwardBuffers, KernelError,
    ScanRuntime, checkpoint_count,
};
use crate::packing::Packing;
use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, FloatDType, Tensor, TensorData};
use burn_cubecl::CubeRuntime;
use cubecl::prelude::*;
use std::time::{Duration, Instant};

/// Medians of the timed repetitions.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelTiming {
    pub forward: Duration,
    pub forward_backward: Duration,
    /// What ran: the schedules with tile and placement chosen.
    pub forward_schedule: Schedule,
    pub backward_schedule: Schedule,
    /// Whether the forward scan held the states in registers
    /// ([`Schedule::holds_states_in_registers`]; false for the chunked scan).
    pub forward_in_registers: bool,
    /// Whether the backward scan's recomputation held the states in registers
    /// ([`Schedule::recomputes_in_registers`]; false for the chunked scan).
    pub recomputed_in_registers: bool,
    /// Whether the backward scan's walk carried the state gradients in registers
    /// ([`Schedule::walks_in_registers`]; false for the chunked scan).
    pub walked_in_registers: bool,
    /// The chunked path's own kernels timed alone at the sizes the scan gives them
    /// ([`time_chunked`] when asked; empty otherwise).
    pub parts: Vec<PartTiming>,
}

/// One of the chunked path's own kernels timed alone, forward and backward (medians).
#[derive(Clone, Debug, PartialEq)]
pub struct PartTiming {
    /// The forward kernel; the backward one is `linear_scan` in reverse, or the scores'
    /// backward kernel.
    pub kernel: ChunkedKernel,
    /// What one launch covers, in words.
    pub launch: String,
    pub forward: Duration,
    pub backward: Duration,
}

/// `len` pseudo-random values in [`low`, `high`), deterministic in `seed` (xorshift). Made on
/// the host: burn's `Tensor::random` launches a PRNG kernel whose grid CUDA refused
/// (`CUDA_ERROR_INVALID_VALUE`) at the benchmark's sizes.
fn pseudo_random(len: usize, seed: u64, (low, high): (f32, f32)) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            low + ((state >> 40) as f32 / (1u64 << 24) as f32) * (high - low)
        })
        .collect()
}

/// A buffer of `len` pseudo-random values in [−1, 1) ([`pseudo_random`]).
fn random<F: Float + CubeElement, R: Runtime>(
    client: &ComputeClient<R>,
    len: usize,
    seed: u64,
) -> DeviceArray {
    let values: Vec<F> = pseudo_random(len, seed, (-1.0, 1.0))
        .into_iter()
        .map(F::new)
        .collect();
    DeviceArray::new(client.create_from_slice(F::as_bytes(&values)), len)
}

/// An f32 tensor of `shape` with pseudo-random values in `range` ([`pseudo_random`]).
fn random_tensor<B: Backend, const D: usize>(
    shape: [usize; D],
    seed: u64,
    range: (f32, f32),
    device: &B::Device,
) -> Tensor<B, D> {
    let values = pseudo_random(shape.iter().product(), seed, range);
    Tensor::from_data(TensorData::new(values, shape), device)
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// Times `C`'s kernels at `shape` with elements of type `F` on runtime `R`.
pub fn time_cell<C: CellKernels, F: Float + CubeElement, R: Runtime>(
    client: &ComputeClient<R>,
    shape: &ScanShape,
    schedule: Schedule,
    warmup: usize,
    repetitions: usize,
) -> Result<KernelTiming, KernelError> {
    let runner = CellRunner::<C>::new();
    let cell = &runner.compiled().cell;
    let bytes = size_of::<F>();
    let numel = |dims: Vec<usize>| dims.iter().product::<usize>();
    let inputs: Vec<DeviceArray> = (0..cell.inputs.len())
        .map(|i| random::<F, R>(client, numel(shape.input(cell, InputId(i))), i as u64))
        .collect();
    let params: Vec<DeviceArray> = (0..cell.params.len())
        .map(|p| random::<F, R>(client, numel(shape.param(cell, ParamId(p))), 100 + p as u64))
        .collect();
    let states = |copies: usize, element_bytes: usize| -> Vec<DeviceArray> {
        (0..cell.states.len())
            .map(|s| {
                DeviceArray::zeros(
                    client,
                    numel(shape.state(cell, StateId(s))) * copies,
                    element_bytes,
                )
            })
            .collect()
    };
    let checkpoints = states(checkpoint_count(shape.time, schedule), 4);
    let forward_buffers = ForwardBuffers {
        inputs: inputs.clone(),
        params: params.clone(),
        initial_states: None,
        outputs: (0..cell.outputs.len())
            .map(|o| DeviceArray::zeros(client, numel(shape.output(cell, OutputId(o))), bytes))
            .collect(),
        final_states: states(1, bytes),
        checkpoints: Some(checkpoints.clone()),
    };
    let backward_buffers = BackwardBuffers {
        inputs: inputs.clone(),
        params: params.clone(),
        checkpoints,
        grad_outputs: (0..cell.outputs.len())
            .map(|o| {
                random::<F, R>(
                    client,
                    numel(shape.output(cell, OutputId(o))),
                    200 + o as u64,
                )
            })
            .collect(),
        grad_final_states: states(1, bytes),
        grad_inputs: inputs
            .iter()
            .map(|a| DeviceArray::zeros(client, a.len, bytes))
            .collect(),
        grad_params: params
            .iter()
            .map(|a| DeviceArray::zeros(client, a.len, bytes))
            .collect(),
        grad_initial_states: states(1, bytes),
    };
    let forward = runner.prepare_forward::<F, R>(client, shape, schedule, &forward_buffers)?;
    let backward = runner.prepare_backward::<F, R>(client, shape, schedule, &backward_buffers)?;
    for _ in 0..warmup {
        forward.run::<F, R>(client);
        backward.run::<F, R>(client);
    }
    let profiled = |both: bool| -> Result<Duration, KernelError> {
        let (launch_forward, launch_backward, device) =
            (forward.clone(), backward.clone(), client.clone());
        let (_, duration) = client
            .profile(
                move || {
                    launch_forward.run::<F, R>(&device);
                    if both {
                        launch_backward.run::<F, R>(&device);
                    }
                },
                "rak bench",
            )
            .map_err(|e| KernelError(format!("profiling failed: {e:?}")))?;
        Ok(cubecl::future::block_on(duration.resolve()).duration())
    };
    let forward_times = (0..repetitions.max(1))
        .map(|_| profiled(false))
        .collect::<Result<Vec<_>, _>>()?;
    let both_times = (0..repetitions.max(1))
        .map(|_| profiled(true))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(KernelTiming {
        forward: median(forward_times),
        forward_backward: median(both_times),
        forward_schedule: forward.schedule(),
        backward_schedule: backward.schedule(),
        forward_in_registers: forward
            .schedule()
            .holds_states_in_registers(runner.compiled(), &shape.dims),
        recomputed_in_registers: backward
            .schedule()
            .recomputes_in_registers(runner.compiled(), &shape.dims),
        walked_in_registers: backward
            .schedule()
            .walks_in_registers(runner.compiled(), &shape.dims),
        parts: Vec::new(),
    })
}

/// `rak bench --strategy chunked` at one shape, on the cubecl backend of runtime `R` under
/// autodiff, inside burn's fusion wrapper (as training runs) or not.
#[derive(Clone, Copy)]
pub struct ChunkedBench<'a> {
    /// The cell, which must have a chunked form.
    pub compiled: &'a crate::CompiledCell,
    pub shape: &'a ScanShape,
    /// The element type of the scan's inputs, parameters and outputs. The scan runs in f32
    /// whatever it is (its decays, states and products: the half types would round the
    /// cumulative log decays to a few digits); a half type is cast to f32 on the way in and
    /// back on the way out, inside the timed region.
    pub dtype: Dtype,
    pub schedule: Schedule,
    pub warmup: usize,
    pub repetitions: usize,
    /// Whether to time the chunked path's own kernels alone too.
    pub parts: bool,
}

impl ChunkedBench<'_> {
    pub fn run<R: CubeRuntime + ScanRuntime>(&self, fusion: bool) -> Result<KernelTiming, String> {
        type Cube<R> = burn_cubecl::CubeBackend<R, f32, i32, u32>;
        let device = Default::default();
        match fusion {
            true => time_chunked::<Autodiff<burn_fusion::Fusion<Cube<R>>>>(&device, self),
            false => time_chunked::<Autodiff<Cube<R>>>(&device, self),
        }
    }
}

/// Times the chunked scan of `bench.cell` ([`crate::chunked`]) at `bench.shape` in chunks of
/// `bench.schedule.chunk` steps on the autodiff backend `B` (whose float elements are f32):
/// the forward scan on its inner backend, and forward + backward (the gradients of inputs and
/// parameters) through autodiff, with inputs, parameters and outputs of `bench.dtype`; each
/// repetition from its first launch to the device's synchronisation, median after warm-up.
/// With `bench.parts`, the chunked path's own kernels are then timed alone too
/// ([`time_chunked_parts`]).
pub fn time_chunked<B>(device: &B::Device, bench: &ChunkedBench) -> Result<KernelTiming, String>
where
    B: AutodiffBackend + FusedCellBackend,
    B::InnerBackend: FusedCellBackend,
{
    let ChunkedBench {
        compiled,
        shape,
        dtype,
        schedule,
        warmup,
        repetitions,
        parts,
    } = *bench;
    let cell = &compiled.cell;
    let form = compiled.chunk_form.as_ref().map_err(|e| e.to_string())?;
    let dims = &shape.dims;
    let [batch, time, heads] = [shape.batch, shape.time, shape.heads];
    // Inputs, parameters and outputs in `dtype`, the scan in f32.
    let (dtype, f32) = (dtype.float_dtype(), FloatDType::F32);
    let (packed, range) = (Packing::inputs(cell, dims).width, (-1.0, 1.0));
    let inputs =
        random_tensor::<B::InnerBackend, 4>([batch, time, heads, packed], 1, range, device)
            .cast(dtype);
    let packed = Packing::params(cell, dims).width;
    let params = random_tensor::<B::InnerBackend, 2>([heads, packed], 2, range, device).cast(dtype);
    let packed = Packing::outputs(cell, dims).width;
    let weights = random_tensor::<B, 4>([batch, time, heads, packed], 3, range, device).cast(dtype);
    let scan = ChunkedScan {
        form,
        dims,
        chunk: schedule.chunk,
        sub_chunk: SUB_CHUNK,
    };
    let sync = || B::sync(device).map_err(|e| format!("device synchronisation failed: {e:?}"));
    let forward = || {
        let result = scan.run(
            in_dtype(inputs.clone(), f32),
            in_dtype(params.clone(), f32),
            None,
        )?;
        let _ = in_dtype(result.outputs, dtype);
        sync()
    };
    let forward_backward = || {
        let inputs = Tensor::<B, 4>::from_inner(inputs.clone()).require_grad();
        let params = Tensor::<B, 2>::from_inner(params.clone()).require_grad();
        let result = scan.run(
            in_dtype(inputs.clone(), f32),
            in_dtype(params.clone(), f32),
            None,
        )?;
        let outputs = in_dtype(result.outputs, dtype);
        let grads = (outputs * weights.clone()).sum().backward();
        let _ = (inputs.grad(&grads), params.grad(&grads));
        sync()
    };
    let (forward, forward_backward) = (
        median_wall_time(forward, warmup, repetitions)?,
        median_wall_time(forward_backward, warmup, repetitions)?,
    );
    let parts = match parts {
        true => time_chunked_parts::<B::InnerBackend>(device, &scan, shape, warmup, repetitions)?,
        false => Vec::new(),
    };
    Ok(KernelTiming {
        forward,
        forward_backward,
        forward_schedule: schedule,
        backward_schedule: schedule,
        forward_in_registers: false,
        recomputed_in_registers: false,
        walked_in_registers: false,
        parts,
    })
}

/// `x` with elements of `dtype`: cast unless they already are.
fn in_dtype<B: Backend, const D: usize>(x: Tensor<B, D>, dtype: FloatDType) -> Tensor<B, D> {
    match x.dtype() == DType::from(dtype) {
        true => x,
        false => x.cast(dtype),
    }
}

/// Times the chunked path's own kernels that `scan` runs at `shape`, each alone on random
/// operands of the sizes the scan gives it (log decays in [−1, 0)), forward and backward,
/// each repetition from its launch to the device's synchronisation: the recurrence across
/// chunks (unless the cell has the delta rule, whose states are not element-wise), and for a
/// per-key decay the scores within sub-chunks and across them (when a chunk has more than one
/// sub-chunk). What the scan spends besides is matrix products and element-wise operations.
pub fn time_chunked_parts<B: FusedCellBackend>(
    device: &B::Device,
    scan: &ChunkedScan,
    shape: &ScanShape,
    warmup: usize,
    repetitions: usize,
) -> Result<Vec<PartTiming>, String> {
    let form = scan.form;
    let size = |index: IndexId| shape.dims[form.cell.index_dim(index).0];
    let (keys, values) = (size(form.key.indices[0]), size(form.value.indices[0]));
    let (chunk, sub_chunk) = (scan.chunk.max(1), scan.sub_chunk_steps());
    let (sequences, chunks) = (shape.batch * shape.heads, shape.time.div_ceil(chunk));
    // Random operands of `shape`: log decays in [−1, 0), anything else in [−1, 1).
    let (log_decays, others) = ((-1.0, 0.0), (-1.0, 1.0));
    let seed = std::cell::Cell::new(10);
    let random = |shape: &[usize], range: (f32, f32)| {
        seed.set(seed.get() + 1);
        let values = [shape.iter().product::<usize>()];
        let tensor = random_tensor::<B, 1>(values, seed.get(), range, device);
        B::float_reshape(tensor.into_primitive().tensor(), shape.into())
    };
    let sync = || B::sync(device).map_err(|e| format!("device synchronisation failed: {e:?}"));
    let time = |run: &dyn Fn()| {
        median_wall_time(
            || {
                run();
                sync()
            },
            warmup,
            repetitions,
        )
    };
    let mut parts = Vec::new();
    if form.delta.is_none() {
        let (decay_keys, decay_values) = match form.gate_axis {
            GateAxis::Key => (keys, 1),
            GateAxis::Value => (1, values),
            GateAxis::Scalar => (1, 1),
        };
        let [b, h] = [shape.batch, shape.heads];
        let log_decay = random(&[b, h, chunks, decay_keys, decay_values], log_decays);
        let writes = random(&[b, h, chunks, keys, values], others);
        let initial = random(&[b, h, keys, values], others);
        // The scan writes the state entering each chunk; its backward walks from the last.
        let walk = |over: SumOver| {
            B::linear_scan(log_decay.clone(), writes.clone(), initial.clone(), over);
        };
        parts.push(PartTiming {
            kernel: ChunkedKernel::LinearScan,
            launch: format!("{sequences} states [{keys}, {values}] through {chunks} chunks"),
            forward: time(&|| walk(SumOver::Before))?,
            backward: time(&|| walk(SumOver::After))?,
        });
    }
    if form.delta.is_none() && form.gate_axis == GateAxis::Key {
        let subs = chunk / sub_chunk;
        let mut forms = vec![(
            ChunkedKernel::DecayedScores,
            BlockScores::WithinSubChunk,
            sequences * chunks * subs,
            sub_chunk,
            format!(
                "{} sub-chunks of {sub_chunk} steps",
                sequences * chunks * subs
            ),
        )];
        if subs > 1 {
            forms.push((
                ChunkedKernel::ScoresAcrossSubChunks,
                BlockScores::AcrossSubChunks { sub_chunk },
                sequences * chunks,
                chunk,
                format!("{} chunks of {subs} sub-chunks", sequences * chunks),
            ));
        }
        for (kernel, block_form, blocks, steps, launch) in forms {
            let (query, key) = (
                random(&[blocks, steps, keys], others),
                random(&[blocks, steps, keys], others),
            );
            // The gates between sub-chunks are exponentials of log decays: in (e^{−1}, 1].
            let factors = match block_form {
                BlockScores::WithinSubChunk => random(&[blocks, steps, keys], log_decays),
                BlockScores::AcrossSubChunks { .. } => {
                    let subs = steps / sub_chunk;
                    B::float_exp(random(&[blocks, subs, subs, keys], log_decays))
                }
            };
            let grad = random(&[blocks, steps, steps], others);
            let forward = time(&|| {
                B::block_scores(block_form, query.clone(), key.clone(), factors.clone());
            })?;
            let backward = time(&|| {
                B::block_scores_backward(
                    block_form,
                    query.clone(),
                    key.clone(),
                    factors.clone(),
                    grad.clone(),
                );
            })?;
            parts.push(PartTiming {
                kernel,
                launch,
                forward,
                backward,
            });
        }
    }
    Ok(parts)
}

/// The median wall time of `run` over `repetitions` calls, after `warmup` untimed ones.
fn median_wall_time(
    run: impl Fn() -> Result<(), String>,
    warmup: usize,
    repetitions: usize,
) -> Result<Duration, String> {
    for _ in 0..warmup {
        run()?;
    }
    let times = (0..repetitions.max(1))
        .map(|_| {
            let start = Instant::now();
            run().map(|()| start.elapsed())
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(median(times))
}
