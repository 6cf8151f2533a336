//! The generated kernels of every reference cell, run on wgpu (in CI: Mesa's Vulkan software
//! driver on the CPU), against the f64 reference interpreter.
//!
//! Error measure: for each tensor, max |kernel − reference| / max |reference| (the ∞-norm
//! relative error), which must be ≤ 1e-4 in f32.

use cubecl::prelude::*;
use rak::cells::*;
use rak::codegen::ScanShape;
use rak::codegen::interpret::{ScanInputs, Tensor, backward, forward};
use rak::codegen::ir::{Cell, InputId, OutputId, ParamId, StateId};
use rak::codegen::schedule::Schedule;
use rak::kernels::{
    BackwardBuffers, CellKernels, CellRunner, DeviceArray, ForwardBuffers, checkpoint_count,
};

type Wgpu = cubecl::wgpu::WgpuRuntime;
const TOLERANCE: f64 = 1e-4;

fn client() -> ComputeClient<Wgpu> {
    // Mesa prints noise without it; harmless when already set.
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        let dir = std::env::temp_dir().join("rak-xdg");
        std::fs::create_dir_all(&dir).ok();
        unsafe { std::env::set_var("XDG_RUNTIME_DIR", dir) };
    }
    Wgpu::client(&Default::default())
}

/// SplitMix64.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn tensor(&mut self, shape: Vec<usize>, scale: f64) -> Tensor {
        let mut tensor = Tensor::zeros(shape);
        for x in &mut tensor.data {
            *x = scale * (2.0 * self.next() - 1.0);
        }
        tensor
    }
}

fn upload(client: &ComputeClient<Wgpu>, tensor: &Tensor) -> DeviceArray {
    let values: Vec<f32> = tensor.data.iter().map(|&x| x as f32).collect();
    DeviceArray::new(
        client.create_from_slice(f32::as_bytes(&values)),
        values.len(),
    )
}

fn zeros(client: &ComputeClient<Wgpu>, elements: usize) -> DeviceArray {
    DeviceArray::zeros(client, elements, 4)
}

fn download(client: &ComputeClient<Wgpu>, array: &DeviceArray) -> Vec<f32> {
    f32::from_bytes(&client.read_one_unchecked(array.handle.clone()))[..array.len].to_vec()
}

fn relative_error(kernel: &[f32], reference: &[f64]) -> f64 {
    assert_eq!(kernel.len(), reference.len());
    let scale = reference
        .iter()
        .fold(0f64, |m, x| m.max(x.abs()))
        .max(1e-30);
    let error = kernel
        .iter()
        .zip(reference)
        .fold(0f64, |m, (k, r)| m.max((*k as f64 - r).abs()));
    error / scale
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Everything the kernels produced, read back.
struct KernelResults {
    outputs: Vec<Vec<f32>>,
    final_states: Vec<Vec<f32>>,
    grad_inputs: Vec<Vec<f32>>,
    grad_params: Vec<Vec<f32>>,
    grad_initial: Vec<Vec<f32>>,
}

fn run_kernels<C: CellKernels>(
    runner: &CellRunner<C>,
    client: &ComputeClient<Wgpu>,
    shape: &ScanShape,
    schedule: Schedule,
    inputs: &ScanInputs,
    grad_outputs: &[Tensor],
    grad_finals: &[Tensor],
) -> KernelResults {
    let cell = &runner.compiled().cell;
    let upload_all = |list: &[Tensor]| list.iter().map(|t| upload(client, t)).collect::<Vec<_>>();
    let states = cell.states.len();
    let forward_buffers = ForwardBuffers {
        inputs: upload_all(&inputs.inputs),
        params: upload_all(&inputs.params),
        initial_states: inputs.initial_states.as_deref().map(upload_all),
        outputs: (0..cell.outputs.len())
            .map(|o| zeros(client, numel(&shape.output(cell, OutputId(o)))))
            .collect(),
        final_states: (0..states)
            .map(|s| zeros(client, numel(&shape.state(cell, StateId(s)))))
            .collect(),
        checkpoints: Some(
            (0..states)
                .map(|s| {
                    zeros(
                        client,
                        numel(&shape.state(cell, StateId(s)))
                            * checkpoint_count(shape.time, schedule),
                    )
                })
                .collect(),
        ),
    };
    runner
        .forward::<f32, Wgpu>(client, shape, schedule, &forward_buffers)
        .expect("forward launch");
    let backward_buffers = BackwardBuffers {
        inputs: forward_buffers.inputs.clone(),
        params: forward_buffers.params.clone(),
        checkpoints: forward_buffers.checkpoints.clone().unwrap(),
        grad_outputs: upload_all(grad_outputs),
        grad_final_states: upload_all(grad_finals),
        grad_inputs: (0..cell.inputs.len())
            .map(|i| zeros(client, numel(&shape.input(cell, InputId(i)))))
            .collect(),
        grad_params: (0..cell.params.len())
            .map(|p| zeros(client, numel(&shape.param(cell, ParamId(p)))))
            .collect(),
        grad_initial_states: (0..states)
            .map(|s| zeros(client, numel(&shape.state(cell, StateId(s)))))
            .collect(),
    };
    runner
        .backward::<f32, Wgpu>(client, shape, schedule, &backward_buffers)
        .expect("backward launch");
    let read_all =
        |list: &[DeviceArray]| list.iter().map(|h| download(client, h)).collect::<Vec<_>>();
    KernelResults {
        outputs: read_all(&forward_buffers.outputs),
        final_states: read_all(&forward_buffers.final_states),
        grad_inputs: read_all(&backward_buffers.grad_inputs),
        grad_params: read_all(&backward_buffers.grad_params),
        grad_initial: read_all(&backward_buffers.grad_initial_states),
    }
}

fn random_problem(
    cell: &Cell,
    shape: &ScanShape,
    rng: &mut Rng,
    input_scale: f64,
) -> (ScanInputs, Vec<Tensor>, Vec<Tensor>) {
    let inputs = ScanInputs {
        inputs: (0..cell.inputs.len())
            .map(|i| rng.tensor(shape.input(cell, InputId(i)), input_scale))
            .collect(),
        // Matrices scaled by 1/√fan-in, as an initialisation would: a random uniform(−1, 1)
        // recurrent matrix makes Elman chaotic, where f32 and f64 trajectories rightly diverge.
        params: (0..cell.params.len())
            .map(|p| {
                let param = &cell.params[p];
                let fan_in = match param.shape.last() {
                    Some(dim) if param.shape.len() >= 2 => shape.dims[dim.0],
                    _ => 1,
                };
                rng.tensor(shape.param(cell, ParamId(p)), 1.0 / (fan_in as f64).sqrt())
            })
            .collect(),
        initial_states: Some(
            (0..cell.states.len())
                .map(|s| rng.tensor(shape.state(cell, StateId(s)), 1.0))
                .collect(),
        ),
    };
    let grad_outputs = (0..cell.outputs.len())
        .map(|o| rng.tensor(shape.output(cell, OutputId(o)), 1.0))
        .collect();
    let grad_finals = (0..cell.states.len())
        .map(|s| rng.tensor(shape.state(cell, StateId(s)), 1.0))
        .collect();
    (inputs, grad_outputs, grad_finals)
}

/// Runs one cell at one shape on the kernels and the interpreter, and compares everything.
fn compare<C: CellKernels>(
    client: &ComputeClient<Wgpu>,
    batch: usize,
    time: usize,
    heads: usize,
    dim: usize,
    schedule: Schedule,
    seed: u64,
) {
    let runner = CellRunner::<C>::new();
    let compiled = runner.compiled();
    let cell = &compiled.cell;
    let dims: Vec<(String, usize)> = cell.dims.iter().map(|d| (d.name.clone(), dim)).collect();
    let named: Vec<(&str, usize)> = dims.iter().map(|(n, s)| (n.as_str(), *s)).collect();
    let shape = ScanShape::new(cell, batch, time, heads, &named).unwrap();
    let mut rng = Rng(seed);
    let (inputs, grad_outputs, grad_finals) = random_problem(cell, &shape, &mut rng, 1.0);
    let expected = forward(cell, &shape, &inputs).unwrap();
    let expected_grads = backward(
        &compiled.backward,
        &shape,
        &inputs,
        &grad_outputs,
        &grad_finals,
    )
    .unwrap();
    let got = run_kernels(
        &runner,
        client,
        &shape,
        schedule,
        &inputs,
        &grad_outputs,
        &grad_finals,
    );
    let context = format!(
        "{} B={batch} T={time} H={heads} dims={dim} {schedule:?}",
        C::NAME
    );
    let check = |what: String, kernel: &[f32], reference: &Tensor| {
        let error = relative_error(kernel, &reference.data);
        assert!(
            error <= TOLERANCE,
            "{context}: {what}: relative error {error:e}"
        );
    };
    for (o, output) in cell.outputs.iter().enumerate() {
        check(
            format!("output `{}`", output.name),
            &got.outputs[o],
            &expected.outputs[o],
        );
    }
    for (s, state) in cell.states.iter().enumerate() {
        check(
            format!("final state `{}`", state.name),
            &got.final_states[s],
            &expected.final_states[s],
        );
        check(
            format!("gradient of initial state `{}`", state.name),
            &got.grad_initial[s],
            &expected_grads.initial_states[s],
        );
    }
    for (i, input) in cell.inputs.iter().enumerate() {
        check(
            format!("gradient of input `{}`", input.name),
            &got.grad_inputs[i],
            &expected_grads.inputs[i],
        );
    }
    for (p, param) in cell.params.iter().enumerate() {
        check(
            format!("gradient of parameter `{}`", param.name),
            &got.grad_params[p],
            &expected_grads.params[p],
        );
    }
}

#[test]
fn timing_probe() {
    let client = client();
    let schedule = Schedule { cube_dim: 64, chunk: 16 };
    for (batch, time, heads, dim) in [(1, 300, 1, 64), (3, 17, 2, 64)] {
        let start = std::time::Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| compare::<Elman>(&client, batch, time, heads, dim, schedule, 1)));
        eprintln!("Elman B {batch} T {time} H {heads} dims {dim}: {:?} ok={}", start.elapsed(), result.is_ok());
    }
    for (batch, time, heads, dim) in [(3, 300, 2, 5), (1, 300, 1, 33), (3, 17, 2, 33), (3, 300, 2, 33)] {
        let start = std::time::Instant::now();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| compare::<SimpleRnn>(&client, batch, time, heads, dim, schedule, 1)));
        eprintln!("SimpleRnn B {batch} T {time} H {heads} dims {dim}: {:?} ok={}", start.elapsed(), result.is_ok());
    }
}

#[test]
fn debug_elman() {
    let client = client();
    let runner = CellRunner::<Elman>::new();
    let cell = &runner.compiled().cell;
    for (dim, time, chunk, cube_dim) in [(64, 12, 16, 64)] {
        let schedule = Schedule { cube_dim, chunk };
        let shape = ScanShape::new(cell, 1, time, 1, &[("D", dim)]).unwrap();
        let mut rng = Rng(1);
        let (inputs, go, gf) = random_problem(cell, &shape, &mut rng, 1.0);
        let expected = backward(&runner.compiled().backward, &shape, &inputs, &go, &gf).unwrap();
        let got = run_kernels(&runner, &client, &shape, schedule, &inputs, &go, &gf);
        let err = relative_error(&got.grad_initial[0], &expected.initial_states[0].data);
        let err_x = relative_error(&got.grad_inputs[0], &expected.inputs[0].data);
        eprintln!("dim {dim} T {time} {schedule:?}: dh0 error {err:e} dx error {err_x:e}");
        for t in 0..time {
            let range = t * dim..(t + 1) * dim;
            eprintln!("   t={t}: dx err {:e}", relative_error(&got.grad_inputs[0][range.clone()], &expected.inputs[0].data[range]));
        }
    }
}
