//! Kernel benchmarks (`rak bench`): a cell's forward scan, and forward + backward, timed on the
//! device by cubecl's profiler (CUDA events on CUDA), median of repetitions after warm-up.
//!
//! The forward scan is timed as training runs it, writing checkpoints; forward + backward is
//! one forward scan, one backward scan and the parameter-gradient reduction.

use crate::codegen::ScanShape;
use crate::codegen::ir::{InputId, OutputId, ParamId, StateId};
use crate::codegen::schedule::Schedule;
use crate::kernels::{
    BackwardBuffers, CellKernels, CellRunner, DeviceArray, ForwardBuffers, KernelError,
    checkpoint_count,
};
use cubecl::prelude::*;
use std::time::Duration;

/// Medians of the timed repetitions.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KernelTiming {
    pub forward: Duration,
    pub forward_backward: Duration,
    /// What ran: the schedules with tile and placement chosen.
    pub forward_schedule: Schedule,
    pub backward_schedule: Schedule,
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
    })
}
