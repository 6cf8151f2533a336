//! Kernel benchmarks (`rak bench`): a cell's forward scan, and forward + backward, timed on the
//! device by cubecl's profiler (CUDA events on CUDA), median of repetitions after warm-up.
//!
//! The forward scan is timed as training runs it, writing checkpoints; forward + backward is
//! one forward scan, one backward scan and the parameter-gradient reduction.
//!
//! `rak bench --strategy chunked` times the cell's chunked form instead ([`time_chunked`]):
//! burn operations rather than one kernel, so it is timed from the first launch to the device's
//! synchronisation (launch overheads included), forward on the cubecl backend, forward +
//! backward through burn's autodiff.

use crate::chunked::{ChunkedScan, SUB_CHUNK};
use crate::codegen::ScanShape;
use crate::codegen::chunkwise::chunk_form;
use crate::codegen::ir::{InputId, OutputId, ParamId, StateId};
use crate::codegen::schedule::Schedule;
use crate::fused::FusedCellBackend;
use crate::kernels::{
    BackwardBuffers, CellKernels, CellRunner, DeviceArray, ForwardBuffers, KernelError,
    checkpoint_count,
};
use crate::packing::Packing;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Distribution, Tensor};
use cubecl::prelude::*;
use std::time::{Duration, Instant};

/// Medians of the timed repetitions.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KernelTiming {
    pub forward: Duration,
    pub forward_backward: Duration,
    /// What ran: the schedules with tile and placement chosen.
    pub forward_schedule: Schedule,
    pub backward_schedule: Schedule,
    /// Whether the forward scan held the states in registers
    /// ([`Schedule::holds_states_in_registers`]; false for the chunked scan).
    pub forward_in_registers: bool,
}

/// A buffer of `len` pseudo-random values in [−1, 1) (deterministic).
fn random<F: Float + CubeElement, R: Runtime>(
    client: &ComputeClient<R>,
    len: usize,
    seed: u64,
) -> DeviceArray {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let values: Vec<F> = (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            F::new(((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
        })
        .collect();
    DeviceArray::new(client.create_from_slice(F::as_bytes(&values)), len)
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
            .holds_states_in_registers(&runner.compiled().backward, &shape.dims),
    })
}

/// Times `C`'s chunked scan ([`crate::chunked`]) at `shape` in chunks of `schedule.chunk` steps
/// on the autodiff backend `B`: the forward scan on its inner backend, and forward + backward
/// (the gradients of inputs and parameters) through autodiff; each repetition from its first
/// launch to the device's synchronisation, median after warm-up.
pub fn time_chunked<C: CellKernels, B>(
    device: &B::Device,
    shape: &ScanShape,
    schedule: Schedule,
    warmup: usize,
    repetitions: usize,
) -> Result<KernelTiming, String>
where
    B: AutodiffBackend + FusedCellBackend,
    B::InnerBackend: FusedCellBackend,
{
    let compiled = C::compile();
    let cell = &compiled.cell;
    let form = chunk_form(cell).map_err(|e| e.to_string())?;
    let dims = &shape.dims;
    let [batch, time, heads] = [shape.batch, shape.time, shape.heads];
    let uniform = Distribution::Uniform(-1.0, 1.0);
    let inputs = Tensor::<B::InnerBackend, 4>::random(
        [batch, time, heads, Packing::inputs(cell, dims).width],
        uniform,
        device,
    );
    let params = Tensor::<B::InnerBackend, 2>::random(
        [heads, Packing::params(cell, dims).width],
        uniform,
        device,
    );
    let weights = Tensor::<B, 4>::random(
        [batch, time, heads, Packing::outputs(cell, dims).width],
        uniform,
        device,
    );
    let scan = ChunkedScan {
        form: &form,
        dims,
        chunk: schedule.chunk,
        sub_chunk: SUB_CHUNK,
    };
    let sync = || B::sync(device).map_err(|e| format!("device synchronisation failed: {e:?}"));
    let forward = || {
        scan.run(inputs.clone(), params.clone(), None)?;
        sync()
    };
    let forward_backward = || {
        let inputs = Tensor::<B, 4>::from_inner(inputs.clone()).require_grad();
        let params = Tensor::<B, 2>::from_inner(params.clone()).require_grad();
        let result = scan.run(inputs.clone(), params.clone(), None)?;
        let grads = (result.outputs * weights.clone()).sum().backward();
        let _ = (inputs.grad(&grads), params.grad(&grads));
        sync()
    };
    Ok(KernelTiming {
        forward: median_wall_time(forward, warmup, repetitions)?,
        forward_backward: median_wall_time(forward_backward, warmup, repetitions)?,
        forward_schedule: schedule,
        backward_schedule: schedule,
        forward_in_registers: false,
    })
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
