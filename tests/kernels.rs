//! The generated kernels of every reference cell, run on wgpu (in CI: Mesa's Vulkan software
//! driver on the CPU) or, built with `--features cuda`, on CUDA, against the f64 reference
//! interpreter.
//!
//! Error measure: for each tensor, max |kernel − reference| / max |reference| (the ∞-norm
//! relative error), which must be ≤ 1e-4 in f32 (the chunked form's on CUDA: see
//! [`CHUNKED_TOLERANCE`]).

use cubecl::prelude::*;
use rak::CellDefinition;
use rak::cells::*;
use rak::codegen::ScanShape;
use rak::codegen::interpret::{ScanInputs, Tensor, backward, forward};
use rak::codegen::ir::{Cell, InputId, OutputId, ParamId, StateId};
use rak::codegen::schedule::Schedule;
use rak::kernels::{
    BackwardBuffers, CellKernels, CellRunner, DeviceArray, ForwardBuffers, StepBuffers,
    checkpoint_count,
};

// Built with `--features cuda`, the same tests run on CUDA (the device script does this).
#[cfg(not(feature = "cuda"))]
type Wgpu = cubecl::wgpu::WgpuRuntime;
#[cfg(feature = "cuda")]
type Wgpu = cubecl::cuda::CudaRuntime;
const TOLERANCE: f64 = 1e-4;

/// The chunked form's tolerance. Its matrix products are cubecl's autotuned matmuls: exact f32
/// products on wgpu, but on CUDA the tensor-core kernels the autotuner picks when they are the
/// fastest round f32 operands to tf32 (10-bit mantissa, unit roundoff u = 2⁻¹¹ ≈ 4.9e-4; what
/// Triton, and so flash-linear-attention, does with f32 inputs too). A product of two rounded
/// operands is then off by up to 2u of the sum of its terms' magnitudes, and a gradient here
/// passes through up to four products: 8u, set before any run on a GPU.
#[cfg(not(feature = "cuda"))]
const CHUNKED_TOLERANCE: f64 = TOLERANCE;
#[cfg(feature = "cuda")]
const CHUNKED_TOLERANCE: f64 = 8.0 / 2048.0;

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

/// The element types the kernels are tested with (inputs, parameters and outputs).
trait TestElement: Float + CubeElement {
    fn from_f64(x: f64) -> Self;
    fn to_f32(self) -> f32;
}

impl TestElement for f32 {
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl TestElement for half::f16 {
    fn from_f64(x: f64) -> Self {
        half::f16::from_f64(x)
    }
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
}

fn upload<E: TestElement>(client: &ComputeClient<Wgpu>, tensor: &Tensor) -> DeviceArray {
    let values: Vec<E> = tensor.data.iter().map(|&x| E::from_f64(x)).collect();
    DeviceArray::new(client.create_from_slice(E::as_bytes(&values)), values.len())
}

/// Zeroed buffer of `elements` values of `E`.
fn zeros<E: TestElement>(client: &ComputeClient<Wgpu>, elements: usize) -> DeviceArray {
    DeviceArray::zeros(client, elements, size_of::<E>())
}

fn download<E: TestElement>(client: &ComputeClient<Wgpu>, array: &DeviceArray) -> Vec<f32> {
    let bytes = client.read_one_unchecked(array.handle.clone());
    E::from_bytes(&bytes)[..array.len]
        .iter()
        .map(|&x| x.to_f32())
        .collect()
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
    run_kernels_as::<C, f32>(
        runner,
        client,
        shape,
        schedule,
        inputs,
        grad_outputs,
        grad_finals,
    )
}

/// Runs forward then backward with inputs, parameters and outputs of type `E`.
fn run_kernels_as<C: CellKernels, E: TestElement>(
    runner: &CellRunner<C>,
    client: &ComputeClient<Wgpu>,
    shape: &ScanShape,
    schedule: Schedule,
    inputs: &ScanInputs,
    grad_outputs: &[Tensor],
    grad_finals: &[Tensor],
) -> KernelResults {
    let cell = &runner.compiled().cell;
    let upload_all = |list: &[Tensor]| {
        list.iter()
            .map(|t| upload::<E>(client, t))
            .collect::<Vec<_>>()
    };
    let states = cell.states.len();
    let forward_buffers = ForwardBuffers {
        inputs: upload_all(&inputs.inputs),
        params: upload_all(&inputs.params),
        initial_states: inputs.initial_states.as_deref().map(upload_all),
        outputs: (0..cell.outputs.len())
            .map(|o| zeros::<E>(client, numel(&shape.output(cell, OutputId(o)))))
            .collect(),
        final_states: (0..states)
            .map(|s| zeros::<E>(client, numel(&shape.state(cell, StateId(s)))))
            .collect(),
        checkpoints: Some(
            (0..states)
                .map(|s| {
                    zeros::<f32>(
                        client,
                        numel(&shape.state(cell, StateId(s)))
                            * checkpoint_count(shape.time, schedule),
                    )
                })
                .collect(),
        ),
    };
    runner
        .forward::<E, Wgpu>(client, shape, schedule, &forward_buffers)
        .expect("forward launch");
    let backward_buffers = BackwardBuffers {
        inputs: forward_buffers.inputs.clone(),
        params: forward_buffers.params.clone(),
        checkpoints: forward_buffers.checkpoints.clone().unwrap(),
        grad_outputs: upload_all(grad_outputs),
        grad_final_states: upload_all(grad_finals),
        grad_inputs: (0..cell.inputs.len())
            .map(|i| zeros::<E>(client, numel(&shape.input(cell, InputId(i)))))
            .collect(),
        grad_params: (0..cell.params.len())
            .map(|p| zeros::<E>(client, numel(&shape.param(cell, ParamId(p)))))
            .collect(),
        grad_initial_states: (0..states)
            .map(|s| zeros::<E>(client, numel(&shape.state(cell, StateId(s)))))
            .collect(),
    };
    runner
        .backward::<E, Wgpu>(client, shape, schedule, &backward_buffers)
        .expect("backward launch");
    let read_all = |list: &[DeviceArray]| {
        list.iter()
            .map(|h| download::<E>(client, h))
            .collect::<Vec<_>>()
    };
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
    // Every dim a different size (dim, dim + 1, …), so that no two axes can be confused.
    let dims: Vec<(String, usize)> = (cell.dims.iter().enumerate())
        .map(|(n, d)| (d.name.clone(), dim + n))
        .collect();
    let named: Vec<(&str, usize)> = dims.iter().map(|(n, s)| (n.as_str(), *s)).collect();
    let shape = ScanShape::new(cell, batch, time, heads, &named).unwrap();
    let reference = Reference::new(compiled, &shape, seed, 1.0);
    let got = run_kernels(
        &runner,
        client,
        &shape,
        schedule,
        &reference.inputs,
        &reference.grad_outputs,
        &reference.grad_finals,
    );
    let context = format!(
        "{} B={batch} T={time} H={heads} dims={dim} {schedule:?}",
        C::NAME
    );
    let found = beyond(reference.errors(cell, &got), &context, TOLERANCE);
    assert!(found.is_empty(), "{}", found.join("\n"));
}

/// A random problem and the interpreter's answer: outputs, final states and every gradient.
struct Reference {
    inputs: ScanInputs,
    grad_outputs: Vec<Tensor>,
    grad_finals: Vec<Tensor>,
    expected: rak::codegen::interpret::ScanOutputs,
    gradients: rak::codegen::interpret::ScanGradients,
}

impl Reference {
    /// Inputs drawn in ±`input_scale` (parameters scaled by 1/√fan-in) from seed `seed`.
    fn new(compiled: &rak::CompiledCell, shape: &ScanShape, seed: u64, input_scale: f64) -> Self {
        let cell = &compiled.cell;
        let (inputs, grad_outputs, grad_finals) =
            random_problem(cell, shape, &mut Rng(seed), input_scale);
        let expected = forward(cell, shape, &inputs).unwrap();
        let gradients = backward(
            &compiled.backward,
            shape,
            &inputs,
            &grad_outputs,
            &grad_finals,
        )
        .unwrap();
        Reference {
            inputs,
            grad_outputs,
            grad_finals,
            expected,
            gradients,
        }
    }

    /// The relative error of each tensor of `got` (NaN where it holds a value that is not
    /// finite), and what it is.
    fn errors(&self, cell: &Cell, got: &KernelResults) -> Vec<(String, f64)> {
        let (expected, gradients) = (&self.expected, &self.gradients);
        let mut pairs: Vec<(String, &[f32], &Tensor)> = Vec::new();
        for (o, output) in cell.outputs.iter().enumerate() {
            let what = format!("output `{}`", output.name);
            pairs.push((what, &got.outputs[o], &expected.outputs[o]));
        }
        for (s, state) in cell.states.iter().enumerate() {
            let what = format!("final state `{}`", state.name);
            pairs.push((what, &got.final_states[s], &expected.final_states[s]));
            let what = format!("gradient of initial state `{}`", state.name);
            pairs.push((what, &got.grad_initial[s], &gradients.initial_states[s]));
        }
        for (i, input) in cell.inputs.iter().enumerate() {
            let what = format!("gradient of input `{}`", input.name);
            pairs.push((what, &got.grad_inputs[i], &gradients.inputs[i]));
        }
        for (p, param) in cell.params.iter().enumerate() {
            let what = format!("gradient of parameter `{}`", param.name);
            pairs.push((what, &got.grad_params[p], &gradients.params[p]));
        }
        pairs
            .into_iter()
            .map(|(what, got, reference)| {
                let finite = got.iter().all(|x| x.is_finite());
                let error = relative_error(got, &reference.data);
                (what, if finite { error } else { f64::NAN })
            })
            .collect()
    }
}

/// One line, starting with `context`, for each of `errors` (from [`Reference::errors`]) above
/// `tolerance` or NaN (a value that is not finite).
fn beyond(errors: Vec<(String, f64)>, context: &str, tolerance: f64) -> Vec<String> {
    errors
        .into_iter()
        .filter(|(_, error)| error.is_nan() || *error > tolerance)
        .map(|(what, error)| format!("{context}: {what}: relative error {error:e}"))
        .collect()
}

/// Steps between checkpoints in these tests (C).
const CHUNK: usize = 16;

/// The schedule for the software adapter: one launch per chunk, since Mesa caps every loop at
/// 65,535 iterations per invocation. Tile and placement are chosen at launch.
fn cpu_schedule() -> Schedule {
    Schedule {
        cube_dim: 64,
        chunk: CHUNK,
        chunks_per_launch: Some(1),
        ..Default::default()
    }
}

/// Calls `$check::<Cell>($args)` for each of the seven reference cells.
macro_rules! for_each_cell {
    ($check:ident($($args:expr),*)) => {
        $check::<SimpleRnn>($($args),*);
        $check::<Gla>($($args),*);
        $check::<RetNet>($($args),*);
        $check::<Mamba2>($($args),*);
        $check::<DeltaNet>($($args),*);
        $check::<Mlstm>($($args),*);
        $check::<Elman>($($args),*);
    };
}

#[test]
fn kernels_match_the_interpreter_for_every_cell() {
    let client = client();
    // (B, T, H, size of every dim): T covers 1, 7, C−1, C, C+1 and 300; dims 5, 33 and 64.
    let shapes = [
        (1, 1, 1, 5),
        (3, 7, 2, 5),
        (1, CHUNK - 1, 2, 33),
        (3, CHUNK, 1, 33),
        (1, CHUNK + 1, 2, 64),
        (3, 300, 2, 5),
    ];
    for (n, (batch, time, heads, dim)) in shapes.into_iter().enumerate() {
        for_each_cell!(compare(
            &client,
            batch,
            time,
            heads,
            dim,
            cpu_schedule(),
            100 + n as u64
        ));
    }
}

/// Every cell under explicit splits, placements and input stages: tiles that do not divide the
/// axis (33 = 4 × 8 + 1), a tile of one value, the whole axis; the workspace in shared and in
/// global memory, over several launches (the shared workspace is saved and restored between
/// them); blocks of staged inputs that do not divide the chunk (3) or the sequence (5); sums
/// split among units in parts that do not divide the summed axis (3 parts over 33 or 8
/// values), and sums left to one unit each (1 part; the other tests split them into up to 8);
/// states held in registers (stored to and loaded from either placement) or not, in the
/// forward scan and the backward scan's recomputation alike, and the state gradients the
/// backward walk carries in registers or not; 16 units
/// per cube, so that a unit loads 17 elements of a block of staged inputs (8 × 33 over 16
/// units), more than one batch of reads issued together (`GATHER_BATCH` in the emitter). The
/// backward scan reads each step's state one step ahead into registers (17 per unit for the
/// tile of 8 over 16 units), except where that takes more than `PREFETCH_STATE_REGISTERS`:
/// the whole axis of 33 over 16 units (69 per unit) reads it when its step starts.
#[test]
fn split_tiles_and_workspace_placements() {
    use rak::codegen::schedule::Placement;
    let client = client();
    let variants = [
        (Some(8), Placement::Shared, 33, 3, 8, false, 64),
        (Some(8), Placement::Global, 33, 8, 3, true, 16),
        (Some(1), Placement::Shared, 5, 1, 1, true, 64),
        (Some(33), Placement::Global, 33, 5, 1, false, 16),
    ];
    let simple_rnn = SimpleRnn::compile();
    for (n, (tile, placement, dim, stage, sum_parts, registers, cube_dim)) in
        variants.into_iter().enumerate()
    {
        let schedule = Schedule {
            tile,
            placement,
            stage,
            sum_parts,
            registers,
            recompute_registers: registers,
            walk_registers: registers,
            cube_dim,
            ..cpu_schedule()
        }
        // The backward scan under the variant's units and sum parts too (the other tests run
        // it under its own defaults, `Schedule::backward_cube_dim` and `backward_sum_parts`).
        .same_for_both_passes();
        // The variants asking for registers get them (each tile fits the units).
        let resolved = Schedule {
            tile: tile.or(Some(dim)),
            ..schedule
        };
        assert_eq!(
            resolved.holds_states_in_registers(&simple_rnn.backward, &[dim, dim]),
            registers
        );
        assert_eq!(
            resolved.recomputes_in_registers(&simple_rnn.backward, &[dim, dim]),
            registers
        );
        assert_eq!(
            resolved.walks_in_registers(&simple_rnn.backward, &[dim, dim]),
            registers
        );
        for_each_cell!(compare(
            &client,
            2,
            2 * CHUNK + 3,
            2,
            dim,
            schedule,
            200 + n as u64
        ));
    }
}

/// Steps `range` of a `[B, T, …]` tensor.
fn time_slice(tensor: &Tensor, range: std::ops::Range<usize>) -> Tensor {
    let (batch, time) = (tensor.shape[0], tensor.shape[1]);
    let per_step: usize = tensor.shape[2..].iter().product();
    let mut data = Vec::with_capacity(batch * range.len() * per_step);
    for b in 0..batch {
        let start = (b * time + range.start) * per_step;
        data.extend_from_slice(&tensor.data[start..start + range.len() * per_step]);
    }
    let mut shape = tensor.shape.clone();
    shape[1] = range.len();
    Tensor { shape, data }
}

/// Streaming inference: the forward scan over the first T − 2 steps, then the single-step
/// kernel twice from its final states (updated in place), give the outputs of the last two
/// steps and the final states of the interpreter's scan over all T steps.
fn check_scan_then_step<C: CellKernels>(
    client: &ComputeClient<Wgpu>,
    batch: usize,
    time: usize,
    heads: usize,
    dim: usize,
    seed: u64,
) {
    let runner = CellRunner::<C>::new();
    let cell = &runner.compiled().cell;
    let dims: Vec<(String, usize)> = (cell.dims.iter().enumerate())
        .map(|(n, d)| (d.name.clone(), dim + n))
        .collect();
    let named: Vec<(&str, usize)> = dims.iter().map(|(n, s)| (n.as_str(), *s)).collect();
    let shape = ScanShape::new(cell, batch, time, heads, &named).unwrap();
    let (inputs, _, _) = random_problem(cell, &shape, &mut Rng(seed), 1.0);
    let expected = forward(cell, &shape, &inputs).unwrap();
    let context = format!("{} B={batch} T={time} H={heads} dims={dim}", C::NAME);
    let check = |what: String, kernel: &[f32], reference: &Tensor| {
        let error = relative_error(kernel, &reference.data);
        assert!(
            error <= TOLERANCE,
            "{context}: {what}: relative error {error:e}"
        );
    };
    let upload_all = |list: &[Tensor]| {
        list.iter()
            .map(|t| upload::<f32>(client, t))
            .collect::<Vec<_>>()
    };
    let prefix = time - 2;
    let prefix_shape = ScanShape::new(cell, batch, prefix, heads, &named).unwrap();
    let states = (0..cell.states.len())
        .map(|s| zeros::<f32>(client, numel(&shape.state(cell, StateId(s)))))
        .collect::<Vec<_>>();
    let prefix_inputs: Vec<Tensor> = (inputs.inputs.iter())
        .map(|t| time_slice(t, 0..prefix))
        .collect();
    runner
        .forward::<f32, Wgpu>(
            client,
            &prefix_shape,
            cpu_schedule(),
            &ForwardBuffers {
                inputs: upload_all(&prefix_inputs),
                params: upload_all(&inputs.params),
                initial_states: inputs.initial_states.as_deref().map(upload_all),
                outputs: (0..cell.outputs.len())
                    .map(|o| zeros::<f32>(client, numel(&prefix_shape.output(cell, OutputId(o)))))
                    .collect(),
                final_states: states.clone(),
                checkpoints: None,
            },
        )
        .expect("prefix scan");
    let step_shape = ScanShape::new(cell, batch, 1, heads, &named).unwrap();
    for t in prefix..time {
        let step_inputs: Vec<Tensor> = (inputs.inputs.iter())
            .map(|x| time_slice(x, t..t + 1))
            .collect();
        let buffers = StepBuffers {
            inputs: upload_all(&step_inputs),
            params: upload_all(&inputs.params),
            states: states.clone(),
            outputs: (0..cell.outputs.len())
                .map(|o| zeros::<f32>(client, numel(&step_shape.output(cell, OutputId(o)))))
                .collect(),
        };
        runner
            .step::<f32, Wgpu>(client, &step_shape, cpu_schedule(), &buffers)
            .expect("step");
        for (o, output) in cell.outputs.iter().enumerate() {
            check(
                format!("output `{}` at step {t}", output.name),
                &download::<f32>(client, &buffers.outputs[o]),
                &time_slice(&expected.outputs[o], t..t + 1),
            );
        }
    }
    for (s, state) in cell.states.iter().enumerate() {
        check(
            format!("state `{}` after the steps", state.name),
            &download::<f32>(client, &states[s]),
            &expected.final_states[s],
        );
    }
}

#[test]
fn scan_then_single_steps_equal_the_whole_scan() {
    let client = client();
    for (n, (batch, time, heads, dim)) in [(2, 3, 2, 5), (1, CHUNK + 3, 3, 33)]
        .into_iter()
        .enumerate()
    {
        for_each_cell!(check_scan_then_step(
            &client,
            batch,
            time,
            heads,
            dim,
            300 + n as u64
        ));
    }
}

rak::cell! {
    /// Two states that read each other's previous values, one through a sum over its axis:
    /// neither is updated in place (the reference cells all are), so the forward step keeps
    /// a buffer for each new state and copies it over the old one after the step.
    pub cell Coupled {
        dims D;
        input x[D];
        param R[D, D] = normal(0.0, 0.3);
        state a[D], b[D];
        update a[i] = tanh(b[i] + x[i]);
        update b[i] = sum(j) R[i, j] * a[j];
        output y[i] = a[i] * b[i];
    }
}

/// The forward step's copy of the new states (states not updated in place), in the scan and in
/// the single-step kernel.
#[test]
fn states_not_updated_in_place() {
    let client = client();
    let compiled = Coupled::compile();
    assert!(rak::codegen::schedule::in_place_states(&compiled.cell).is_empty());
    compare::<Coupled>(&client, 2, 2 * CHUNK + 3, 2, 33, cpu_schedule(), 400);
    check_scan_then_step::<Coupled>(&client, 2, 5, 2, 5, 401);
}

#[test]
fn one_launch_and_many_launches_agree() {
    let client = client();
    let one_launch = Schedule {
        chunks_per_launch: None,
        ..cpu_schedule()
    };
    compare::<Mlstm>(&client, 2, 40, 1, 5, one_launch, 7);
    compare::<Mamba2>(
        &client,
        2,
        40,
        1,
        5,
        Schedule {
            chunks_per_launch: Some(2),
            ..cpu_schedule()
        },
        7,
    );
}

/// Runs forward and backward twice on the same inputs; every result must be bitwise equal.
fn check_reproducible<C: CellKernels>(client: &ComputeClient<Wgpu>) {
    let runner = CellRunner::<C>::new();
    let cell = &runner.compiled().cell;
    let dims: Vec<(String, usize)> = cell.dims.iter().map(|d| (d.name.clone(), 7)).collect();
    let named: Vec<(&str, usize)> = dims.iter().map(|(n, s)| (n.as_str(), *s)).collect();
    let shape = ScanShape::new(cell, 3, 21, 2, &named).unwrap();
    let (inputs, go, gf) = random_problem(cell, &shape, &mut Rng(5), 1.0);
    let bits = |results: KernelResults| -> Vec<u32> {
        [
            results.outputs,
            results.final_states,
            results.grad_inputs,
            results.grad_params,
            results.grad_initial,
        ]
        .into_iter()
        .flatten()
        .flatten()
        .map(f32::to_bits)
        .collect()
    };
    let first = bits(run_kernels(
        &runner,
        client,
        &shape,
        cpu_schedule(),
        &inputs,
        &go,
        &gf,
    ));
    let second = bits(run_kernels(
        &runner,
        client,
        &shape,
        cpu_schedule(),
        &inputs,
        &go,
        &gf,
    ));
    assert!(first == second, "{}: two runs differ", C::NAME);
}

#[test]
fn gradients_are_bitwise_reproducible() {
    let client = client();
    for_each_cell!(check_reproducible(&client));
}

/// T = 2048 with inputs scaled by 30 (sigmoid and log-sigmoid gates saturated near 0 and 1):
/// everything stays finite and still matches the interpreter.
fn check_saturated<C: CellKernels>(client: &ComputeClient<Wgpu>) {
    let runner = CellRunner::<C>::new();
    let compiled = runner.compiled();
    let cell = &compiled.cell;
    let dims: Vec<(String, usize)> = cell.dims.iter().map(|d| (d.name.clone(), 3)).collect();
    let named: Vec<(&str, usize)> = dims.iter().map(|(n, s)| (n.as_str(), *s)).collect();
    let shape = ScanShape::new(cell, 1, 2048, 1, &named).unwrap();
    let (inputs, go, gf) = random_problem(cell, &shape, &mut Rng(11), 30.0);
    let schedule = Schedule {
        chunk: 64,
        chunks_per_launch: Some(4),
        ..cpu_schedule()
    };
    let got = run_kernels(&runner, client, &shape, schedule, &inputs, &go, &gf);
    let all = [
        &got.outputs,
        &got.final_states,
        &got.grad_inputs,
        &got.grad_params,
        &got.grad_initial,
    ];
    assert!(
        all.iter()
            .all(|list| list.iter().flatten().all(|x| x.is_finite())),
        "{}: non-finite values",
        C::NAME
    );
    let expected = forward(cell, &shape, &inputs).unwrap();
    let error = relative_error(&got.outputs[0], &expected.outputs[0].data);
    assert!(
        error <= TOLERANCE,
        "{}: saturated outputs: relative error {error:e}",
        C::NAME
    );
}

#[test]
fn saturated_gates_and_long_sequences_stay_finite() {
    let client = client();
    check_saturated::<SimpleRnn>(&client);
    check_saturated::<Gla>(&client);
    check_saturated::<Mlstm>(&client);
    check_saturated::<Mamba2>(&client);
}

#[test]
fn mismatched_buffers_are_refused_with_their_name() {
    let client = client();
    let runner = CellRunner::<SimpleRnn>::new();
    let cell = &runner.compiled().cell;
    let shape = ScanShape::new(cell, 2, 3, 1, &[("K", 4), ("V", 5)]).unwrap();
    let (inputs, _, _) = random_problem(cell, &shape, &mut Rng(1), 1.0);
    let mut buffers = ForwardBuffers {
        inputs: inputs
            .inputs
            .iter()
            .map(|t| upload::<f32>(&client, t))
            .collect(),
        params: Vec::new(),
        initial_states: None,
        outputs: vec![zeros::<f32>(&client, 2 * 3 * 5)],
        final_states: vec![zeros::<f32>(&client, 2 * 4 * 5)],
        checkpoints: None,
    };
    runner
        .forward::<f32, Wgpu>(&client, &shape, cpu_schedule(), &buffers)
        .expect("valid buffers");
    buffers.outputs = vec![zeros::<f32>(&client, 7)];
    let error = runner
        .forward::<f32, Wgpu>(&client, &shape, cpu_schedule(), &buffers)
        .unwrap_err();
    assert_eq!(error.0, "output `o`: expected 30 elements, got 7");
    buffers.outputs = Vec::new();
    let error = runner
        .forward::<f32, Wgpu>(&client, &shape, cpu_schedule(), &buffers)
        .unwrap_err();
    assert_eq!(error.0, "expected 1 output buffers (o), got 0");
    let zero_time = ScanShape::new(cell, 2, 0, 1, &[("K", 4), ("V", 5)]).unwrap();
    let error = runner
        .forward::<f32, Wgpu>(&client, &zero_time, cpu_schedule(), &buffers)
        .unwrap_err();
    assert_eq!(error.0, "time must be at least 1");
}

#[test]
#[cfg(not(feature = "cuda"))]
fn cuda_and_wgsl_sources_of_every_cell() {
    use rak::kernels::{Kernel, SourceTarget};
    let schedule = Schedule {
        cube_dim: 32,
        chunk: 8,
        chunks_per_launch: None,
        ..Default::default()
    }
    .same_for_both_passes();
    for builtin in rak::cells::all() {
        let dims = vec![
            4;
            rak::codegen::compile_str(builtin.source)
                .unwrap()
                .cell
                .dims
                .len()
        ];
        let kernels = [
            (Kernel::Forward, "forward"),
            (Kernel::Backward, "backward"),
            (Kernel::Step, "step"),
        ];
        for (kernel, kernel_name) in kernels {
            for (target, extension) in [(SourceTarget::Cuda, "cu"), (SourceTarget::Wgsl, "wgsl")] {
                let request = rak::kernels::SourceOf {
                    dims: &dims,
                    heads: 2,
                    schedule,
                    kernel,
                    target,
                    dtype: rak::kernels::Dtype::F32,
                };
                let source = builtin.visit(request).unwrap().text;
                insta::assert_snapshot!(
                    format!("{}_{kernel_name}_{extension}", builtin.file),
                    source
                );
            }
        }
    }
}

/// The chunked path's own kernels (`rak emit linear_scan --target cuda`, …) at small sizes:
/// chunks of 8 steps in sub-chunks of 4, 4 keys.
#[test]
#[cfg(not(feature = "cuda"))]
fn cuda_and_wgsl_sources_of_the_chunked_path_kernels() {
    use rak::kernels::{Dtype, SourceTarget};
    use rak::runtime::fused::{ChunkedKernel, ChunkedSizes, chunked_kernel_source};
    let sizes = ChunkedSizes {
        chunk: 8,
        sub_chunk: 4,
        keys: 4,
    };
    for kernel in ChunkedKernel::ALL {
        for (target, extension) in [(SourceTarget::Cuda, "cu"), (SourceTarget::Wgsl, "wgsl")] {
            let source = chunked_kernel_source(kernel, sizes, target, Dtype::F32).unwrap();
            insta::assert_snapshot!(format!("chunked_{}_{extension}", kernel.name()), source);
        }
    }
}

/// f16 inputs, parameters and outputs (f32 state and arithmetic), where the adapter has f16.
/// The reference runs on the same f16-rounded inputs, so outputs differ by their f16 rounding
/// (relative 2⁻¹¹) and f32 arithmetic: tolerance 2e-3.
#[test]
fn f16_inputs_and_outputs_where_the_adapter_offers_them() {
    use cubecl::ir::{ElemType, FloatKind, StorageType};
    let client = client();
    let f16 = StorageType::Scalar(ElemType::Float(FloatKind::F16));
    if !client.properties().supports_type(f16) {
        eprintln!(
            "skipped: this adapter does not offer f16 ({:?})",
            client.properties().hardware
        );
        return;
    }
    let runner = CellRunner::<SimpleRnn>::new();
    let compiled = runner.compiled();
    let cell = &compiled.cell;
    let shape = ScanShape::new(cell, 2, 19, 2, &[("K", 5), ("V", 7)]).unwrap();
    let (mut inputs, mut go, mut gf) = random_problem(cell, &shape, &mut Rng(3), 1.0);
    let round = |t: &mut Tensor| {
        t.data
            .iter_mut()
            .for_each(|x| *x = half::f16::from_f64(*x).to_f64())
    };
    inputs
        .inputs
        .iter_mut()
        .chain(inputs.initial_states.iter_mut().flatten())
        .chain(&mut go)
        .chain(&mut gf)
        .for_each(round);
    let expected = forward(cell, &shape, &inputs).unwrap();
    let expected_grads = backward(&compiled.backward, &shape, &inputs, &go, &gf).unwrap();
    let got = run_kernels_as::<SimpleRnn, half::f16>(
        &runner,
        &client,
        &shape,
        cpu_schedule(),
        &inputs,
        &go,
        &gf,
    );
    for (what, kernel, reference) in [
        ("output", &got.outputs[0], &expected.outputs[0]),
        (
            "final state",
            &got.final_states[0],
            &expected.final_states[0],
        ),
        (
            "gradient of q",
            &got.grad_inputs[0],
            &expected_grads.inputs[0],
        ),
        (
            "gradient of g",
            &got.grad_inputs[3],
            &expected_grads.inputs[3],
        ),
        (
            "gradient of the initial state",
            &got.grad_initial[0],
            &expected_grads.initial_states[0],
        ),
    ] {
        let error = relative_error(kernel, &reference.data);
        assert!(error <= 2e-3, "f16 {what}: relative error {error:e}");
    }
}

// ---------------------------------------------------------------------------------------------
// The chunked form (`rak::runtime::chunked`): burn operations on the cubecl backend of the same
// runtime (the matrix products are cubecl's, with tensor cores where the device has them),
// differentiated by burn's autodiff, against the same f64 interpreter.

type ChunkedBackend = rak::runtime::burn::backend::Autodiff<
    rak::runtime::burn_cubecl::CubeBackend<Wgpu, f32, i32, u32>,
>;
type BurnTensor<const D: usize> = rak::runtime::burn::tensor::Tensor<ChunkedBackend, D>;

/// The values of `tensors` (each `rows × width_i`, row-major) side by side: `rows × Σ width_i`,
/// the packed layout of `rak::runtime::packing`.
fn pack(tensors: &[Tensor], rows: usize) -> Vec<f32> {
    let widths: Vec<usize> = tensors.iter().map(|t| t.data.len() / rows).collect();
    let mut packed = Vec::with_capacity(rows * widths.iter().sum::<usize>());
    for row in 0..rows {
        for (tensor, width) in tensors.iter().zip(&widths) {
            packed.extend(
                tensor.data[row * width..(row + 1) * width]
                    .iter()
                    .map(|&x| x as f32),
            );
        }
    }
    packed
}

/// The inverse of [`pack`]: each value of `widths`, row-major.
fn unpack(packed: &[f32], widths: &[usize]) -> Vec<Vec<f32>> {
    let total: usize = widths.iter().sum();
    let mut values: Vec<Vec<f32>> = widths.iter().map(|_| Vec::new()).collect();
    for row in packed.chunks(total.max(1)) {
        let mut offset = 0;
        for (value, width) in values.iter_mut().zip(widths) {
            value.extend_from_slice(&row[offset..offset + width]);
            offset += width;
        }
    }
    values
}

fn burn_tensor<const D: usize>(values: Vec<f32>, shape: [usize; D]) -> BurnTensor<D> {
    use rak::runtime::burn::tensor::TensorData;
    BurnTensor::from_data(TensorData::new(values, shape), &Default::default())
}

fn burn_values<B: rak::runtime::burn::tensor::backend::Backend, const D: usize>(
    tensor: rak::runtime::burn::tensor::Tensor<B, D>,
) -> Vec<f32> {
    tensor.into_data().to_vec::<f32>().expect("f32 tensor")
}

/// Runs the chunked form of `compiled` at one shape (chunks of `chunk` steps in sub-chunks of
/// `sub_chunk`, inputs drawn in ±`input_scale`) and the interpreter on the same problem; one
/// line per tensor that differs by more than [`CHUNKED_TOLERANCE`] or is not finite.
#[allow(clippy::too_many_arguments)]
fn compare_chunked(
    compiled: &rak::CompiledCell,
    (batch, time, heads): (usize, usize, usize),
    dims: &[usize],
    chunk: usize,
    sub_chunk: usize,
    input_scale: f64,
    seed: u64,
) -> Vec<String> {
    use rak::runtime::chunked::ChunkedScan;
    let cell = &compiled.cell;
    let form = rak::codegen::chunkwise::chunk_form(cell).unwrap_or_else(|e| panic!("{e}"));
    let named: Vec<(&str, usize)> = (cell.dims.iter().zip(dims))
        .map(|(d, &s)| (d.name.as_str(), s))
        .collect();
    let shape = ScanShape::new(cell, batch, time, heads, &named).unwrap();
    let reference = Reference::new(compiled, &shape, seed, input_scale);
    let (inputs, grad_outputs, grad_finals) = (
        &reference.inputs,
        &reference.grad_outputs,
        &reference.grad_finals,
    );

    let width = |tensors: &[Tensor], rows: usize| -> Vec<usize> {
        tensors.iter().map(|t| t.data.len() / rows).collect()
    };
    let (steps, sequences) = (batch * time * heads, batch * heads);
    let initial = inputs.initial_states.as_deref().unwrap();
    let widths = [
        width(&inputs.inputs, steps),
        width(&inputs.params, heads),
        width(initial, sequences),
        width(grad_outputs, steps),
    ];
    let sum = |w: &[usize]| w.iter().sum::<usize>();
    let packed_inputs = burn_tensor(
        pack(&inputs.inputs, steps),
        [batch, time, heads, sum(&widths[0])],
    )
    .require_grad();
    let packed_params =
        burn_tensor(pack(&inputs.params, heads), [heads, sum(&widths[1])]).require_grad();
    let packed_initial =
        burn_tensor(pack(initial, sequences), [batch, heads, sum(&widths[2])]).require_grad();
    let scan = ChunkedScan {
        form: &form,
        dims: &shape.dims,
        chunk,
        sub_chunk,
    };
    let result = scan
        .run(
            packed_inputs.clone(),
            packed_params.clone(),
            Some(packed_initial.clone()),
        )
        .expect("chunked scan");
    // L = Σ outputs · ∂L/∂outputs + Σ final states · ∂L/∂final states.
    let loss = (result.outputs.clone()
        * burn_tensor(
            pack(grad_outputs, steps),
            [batch, time, heads, sum(&widths[3])],
        ))
    .sum()
        + (result.final_states.clone()
            * burn_tensor(
                pack(grad_finals, sequences),
                [batch, heads, sum(&widths[2])],
            ))
        .sum();
    let grads = loss.backward();
    let got = KernelResults {
        outputs: unpack(&burn_values(result.outputs), &widths[3]),
        final_states: unpack(&burn_values(result.final_states), &widths[2]),
        grad_inputs: unpack(
            &burn_values(packed_inputs.grad(&grads).expect("input gradient")),
            &widths[0],
        ),
        // A cell without parameters has an empty parameter tensor, with no gradient.
        grad_params: packed_params
            .grad(&grads)
            .map(|g| unpack(&burn_values(g), &widths[1]))
            .unwrap_or_default(),
        grad_initial: unpack(
            &burn_values(packed_initial.grad(&grads).expect("initial-state gradient")),
            &widths[2],
        ),
    };
    let context = format!(
        "{} B={batch} T={time} H={heads} dims={dims:?} C={chunk} c={sub_chunk} inputs ×{input_scale}",
        cell.name
    );
    // The worst error, for the log of a run on a GPU (`--nocapture`).
    let errors = reference.errors(cell, &got);
    let worst = errors.iter().max_by(|a, b| a.1.total_cmp(&b.1));
    if let Some((what, error)) = worst {
        println!("{context}: worst relative error {error:.2e} ({what})");
    }
    beyond(errors, &context, CHUNKED_TOLERANCE)
}

/// Every cell with a chunked form: the five built-in ones (DeltaNet's the delta rule's) and three
/// test cells for what they do not cover (a gate along the value axis; a state stored `[V, K]`
/// read with a scale and a direct term; the delta rule under a decay, Gated DeltaNet).
fn chunkable_cells() -> Vec<rak::CompiledCell> {
    let test_cell = |name: &str| {
        let path = format!("{}/tests/cells/{name}.rak", env!("CARGO_MANIFEST_DIR"));
        let source = std::fs::read_to_string(&path).expect("test cell");
        rak::codegen::compile_str(&source).expect("test cell")
    };
    vec![
        SimpleRnn::compile(),
        Gla::compile(),
        RetNet::compile(),
        Mamba2::compile(),
        DeltaNet::compile(),
        test_cell("value_gate"),
        test_cell("transposed"),
        test_cell("gated_delta"),
    ]
}

/// The chunked form at the shapes of `kernels_match_the_interpreter_for_every_cell` (T = 1, 7,
/// C − 1, C, C + 1, 300 with chunks of C = 16 in sub-chunks of 4; dims 5, 33, 64, each dim a
/// different size), outputs, final states and every gradient.
#[test]
fn chunked_form_matches_the_interpreter() {
    let shapes = [
        (1, 1, 1, 5),
        (3, 7, 2, 5),
        (1, CHUNK - 1, 2, 33),
        (3, CHUNK, 1, 33),
        (1, CHUNK + 1, 2, 64),
        (3, 300, 2, 5),
    ];
    let mut found = Vec::new();
    for compiled in chunkable_cells() {
        for (n, (batch, time, heads, dim)) in shapes.into_iter().enumerate() {
            let dims: Vec<usize> = (0..compiled.cell.dims.len()).map(|d| dim + d).collect();
            found.extend(compare_chunked(
                &compiled,
                (batch, time, heads),
                &dims,
                CHUNK,
                4,
                1.0,
                200 + n as u64,
            ));
        }
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
}

/// T = 2048 with inputs scaled by 30, as `saturated_gates_and_long_sequences_stay_finite`:
/// gates near 0 and 1, cumulative log decays far below what `exp` of their negation holds in
/// f32 (chunks of 64 steps in sub-chunks of 16, 32 chunks).
#[test]
fn chunked_form_with_saturated_gates_and_long_sequences() {
    let mut found = Vec::new();
    for compiled in chunkable_cells() {
        let dims = vec![3; compiled.cell.dims.len()];
        found.extend(compare_chunked(
            &compiled,
            (1, 2048, 1),
            &dims,
            64,
            16,
            30.0,
            11,
        ));
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
}
