//! The generated kernels of every reference cell, run on wgpu (in CI: Mesa's Vulkan software
//! driver on the CPU) or, built with `--features cuda`, on CUDA, against the f64 reference
//! interpreter.
//!
//! Error measure: for each tensor, max |kernel − reference| / max |reference| (the ∞-norm
//! relative error), which must be ≤ 1e-4 in f32.
//!
//! The built-in cells' kernels come from `rak` through [`ScanKernels`] trait objects
//! (`Builtin::kernels`), compiled there: this binary compiles the kernels of its own test cell
//! only. (The chunked form's tests against the same interpreter are in `model.rs`, with the
//! other tests built on burn.)

mod reference;

use cubecl::prelude::*;
use rak::CellDefinition;
use rak::codegen::ScanShape;
use rak::codegen::interpret::{ScanInputs, Tensor, backward, forward};
use rak::codegen::ir::{InputId, OutputId, ParamId, StateId};
use rak::codegen::schedule::Schedule;
use rak::kernels::{
    BackwardBuffers, CellRunner, DeviceArray, Dtype, ForwardBuffers, ScanKernels, StepBuffers,
    checkpoint_count,
};
use reference::{
    CHUNK, Reference, Rng, SHAPES, ScanResults, TOLERANCE, beyond, random_problem, relative_error,
};

// Built with `--features cuda`, the same tests run on CUDA (the device script does this).
#[cfg(not(feature = "cuda"))]
type Wgpu = cubecl::wgpu::WgpuRuntime;
#[cfg(feature = "cuda")]
type Wgpu = cubecl::cuda::CudaRuntime;

/// A cell's kernels on the runtime under test.
type Kernels = dyn ScanKernels<Wgpu>;

/// The kernels of the built-in cell of this file name, compiled in `rak`.
fn builtin(file: &str) -> Box<Kernels> {
    let cell = rak::cells::Builtin::find(file).expect("a built-in cell");
    cell.kernels::<Wgpu>()
}

/// Calls `check` with the kernels of each built-in cell.
fn for_each_cell(mut check: impl FnMut(&Kernels)) {
    for cell in rak::cells::all() {
        check(&*cell.kernels::<Wgpu>());
    }
}

fn client() -> ComputeClient<Wgpu> {
    // Mesa prints noise without it; harmless when already set.
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        let dir = std::env::temp_dir().join("rak-xdg");
        std::fs::create_dir_all(&dir).ok();
        unsafe { std::env::set_var("XDG_RUNTIME_DIR", dir) };
    }
    Wgpu::client(&Default::default())
}

/// The element types the kernels are tested with (inputs, parameters and outputs).
trait TestElement: Float + CubeElement {
    const DTYPE: Dtype;
    fn from_f64(x: f64) -> Self;
    fn to_f32(self) -> f32;
}

impl TestElement for f32 {
    const DTYPE: Dtype = Dtype::F32;
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl TestElement for half::f16 {
    const DTYPE: Dtype = Dtype::F16;
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

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

fn run_kernels(
    runner: &Kernels,
    client: &ComputeClient<Wgpu>,
    shape: &ScanShape,
    schedule: Schedule,
    inputs: &ScanInputs,
    grad_outputs: &[Tensor],
    grad_finals: &[Tensor],
) -> ScanResults {
    run_kernels_as::<f32>(
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
fn run_kernels_as<E: TestElement>(
    runner: &Kernels,
    client: &ComputeClient<Wgpu>,
    shape: &ScanShape,
    schedule: Schedule,
    inputs: &ScanInputs,
    grad_outputs: &[Tensor],
    grad_finals: &[Tensor],
) -> ScanResults {
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
        .forward(E::DTYPE, client, shape, schedule, &forward_buffers)
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
        .backward(E::DTYPE, client, shape, schedule, &backward_buffers)
        .expect("backward launch");
    let read_all = |list: &[DeviceArray]| {
        list.iter()
            .map(|h| download::<E>(client, h))
            .collect::<Vec<_>>()
    };
    ScanResults {
        outputs: read_all(&forward_buffers.outputs),
        final_states: read_all(&forward_buffers.final_states),
        grad_inputs: read_all(&backward_buffers.grad_inputs),
        grad_params: read_all(&backward_buffers.grad_params),
        grad_initial: read_all(&backward_buffers.grad_initial_states),
    }
}

/// Runs one cell at one shape on the kernels and the interpreter, and compares everything.
fn compare(
    runner: &Kernels,
    client: &ComputeClient<Wgpu>,
    (batch, time, heads): (usize, usize, usize),
    dim: usize,
    schedule: Schedule,
    seed: u64,
) {
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
        runner,
        client,
        &shape,
        schedule,
        &reference.inputs,
        &reference.grad_outputs,
        &reference.grad_finals,
    );
    let context = format!(
        "{} B={batch} T={time} H={heads} dims={dim} {schedule:?}",
        cell.name
    );
    let found = beyond(reference.errors(cell, &got), &context, TOLERANCE);
    assert!(found.is_empty(), "{}", found.join("\n"));
}

/// The schedule for the software adapter: one launch per chunk, since Mesa allows one
/// invocation 65,535 loop iterations over all its loops (and cuts them silently past it).
/// Tile and placement are chosen at launch.
fn cpu_schedule() -> Schedule {
    Schedule {
        cube_dim: 64,
        chunk: CHUNK,
        chunks_per_launch: Some(1),
        ..Default::default()
    }
}

#[test]
fn kernels_match_the_interpreter_for_every_cell() {
    let client = client();
    for (n, (batch, time, heads, dim)) in SHAPES.into_iter().enumerate() {
        for_each_cell(|kernels| {
            let seed = 100 + n as u64;
            compare(
                kernels,
                &client,
                (batch, time, heads),
                dim,
                cpu_schedule(),
                seed,
            )
        });
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
    let simple_rnn = rak::cells::SimpleRnn::compile();
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
            resolved.holds_states_in_registers(&simple_rnn, &[dim, dim]),
            registers
        );
        assert_eq!(
            resolved.recomputes_in_registers(&simple_rnn, &[dim, dim]),
            registers
        );
        assert_eq!(
            resolved.walks_in_registers(&simple_rnn, &[dim, dim]),
            registers
        );
        for_each_cell(|kernels| {
            let seed = 200 + n as u64;
            compare(kernels, &client, (2, 2 * CHUNK + 3, 2), dim, schedule, seed)
        });
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
fn check_scan_then_step(
    runner: &Kernels,
    client: &ComputeClient<Wgpu>,
    batch: usize,
    time: usize,
    heads: usize,
    dim: usize,
    seed: u64,
) {
    let cell = &runner.compiled().cell;
    let dims: Vec<(String, usize)> = (cell.dims.iter().enumerate())
        .map(|(n, d)| (d.name.clone(), dim + n))
        .collect();
    let named: Vec<(&str, usize)> = dims.iter().map(|(n, s)| (n.as_str(), *s)).collect();
    let shape = ScanShape::new(cell, batch, time, heads, &named).unwrap();
    let (inputs, _, _) = random_problem(cell, &shape, &mut Rng(seed), 1.0);
    let expected = forward(cell, &shape, &inputs).unwrap();
    let context = format!("{} B={batch} T={time} H={heads} dims={dim}", cell.name);
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
        .forward(
            Dtype::F32,
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
            .step(Dtype::F32, client, &step_shape, cpu_schedule(), &buffers)
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
        for_each_cell(|kernels| {
            check_scan_then_step(kernels, &client, batch, time, heads, dim, 300 + n as u64)
        });
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
    let coupled = CellRunner::<Coupled>::new();
    compare(
        &coupled,
        &client,
        (2, 2 * CHUNK + 3, 2),
        33,
        cpu_schedule(),
        400,
    );
    check_scan_then_step(&coupled, &client, 2, 5, 2, 5, 401);
}

rak::cell! {
    /// A gate that sums the state along its row, reduced from a cell of the random-cell
    /// generator (`rak-codegen/tests/compiler/random_cells.rs`, seed 0).
    pub cell RowGate {
        dims K, V;
        input x_k[K], x_v[V], x1[K] = sigmoid;
        state S[K, V];
        update S[i, j] = sigmoid(sum(l) S[i, l] * x_v[l]) * S[i, j] + tanh(x1[i]);
        output o[j] = sum(i) S[i, j];
    }
}

/// The backward scan with 16 units at K = 33, V = 34: each unit holds three rows of the state
/// and walks 71 of its elements per statement, in loops too long to unroll. Chunks of 8 steps
/// keep one launch within the loop budget of Mesa's software driver (65,535 loop iterations per
/// invocation, over all its loops: past it, Mesa ends every loop silently); with chunks of 16
/// this cell exceeds it there, which the next test shows is refused (a GPU has no budget).
#[test]
fn row_gate_backward_with_16_units() {
    let client = client();
    let runner = CellRunner::<RowGate>::new();
    let schedule = Schedule {
        chunk: 8,
        backward_cube_dim: Some(16),
        ..cpu_schedule()
    };
    compare(&runner, &client, (2, 2 * 8 + 5, 1), 33, schedule, 602);
}

/// Past the software driver's loop budget a scan is an error, not wrong numbers: `RowGate`
/// with 16 backward units at K = 33 and chunks of 16 runs out of it (the kernels check, and the
/// host reads their mark back; a GPU has no such budget).
#[cfg(not(feature = "cuda"))]
#[test]
fn a_scan_past_the_software_drivers_loop_budget_is_an_error() {
    let client = client();
    let runner = CellRunner::<RowGate>::new();
    let schedule = Schedule {
        backward_cube_dim: Some(16),
        ..cpu_schedule()
    };
    let refused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        compare(&runner, &client, (1, CHUNK, 1), 33, schedule, 603)
    }))
    .expect_err("the backward scan ran past the loop budget");
    let message = refused
        .downcast_ref::<String>()
        .expect("a panic with a message");
    assert!(
        message.contains("backward scan ran past the 65,535 loop iterations"),
        "{message}"
    );
}

/// A cell is compiled once per thread (the fused operation asks for it at every launch): every
/// runner and `CellRef` of one cell shares that compiled cell, which is what compiling the cell
/// again gives, and another cell has its own.
#[test]
fn a_cell_is_compiled_once_per_thread() {
    let first = CellRunner::<Coupled>::new();
    let second = CellRunner::<Coupled>::new();
    assert!(std::ptr::eq(first.compiled(), second.compiled()));
    let cell = rak::kernels::CellRef::of::<Coupled>();
    assert!(std::ptr::eq(first.compiled(), &*cell.compiled()));
    let printed = |compiled: &rak::CompiledCell| {
        use rak::codegen::display::{backward_to_string, cell_to_string};
        cell_to_string(&compiled.cell) + &backward_to_string(&compiled.backward)
    };
    assert_eq!(printed(first.compiled()), printed(&Coupled::compile()));
    let other = rak::cells::Builtin::find("simple_rnn").expect("a built-in cell");
    assert!(!std::ptr::eq(first.compiled(), &*other.cell.compiled()));
    assert_eq!(other.cell.compiled().cell.name, "SimpleRnn");
}

#[test]
fn one_launch_and_many_launches_agree() {
    let client = client();
    let one_launch = Schedule {
        chunks_per_launch: None,
        ..cpu_schedule()
    };
    compare(&*builtin("mlstm"), &client, (2, 40, 1), 5, one_launch, 7);
    compare(
        &*builtin("mamba2"),
        &client,
        (2, 40, 1),
        5,
        Schedule {
            chunks_per_launch: Some(2),
            ..cpu_schedule()
        },
        7,
    );
}

/// Runs forward and backward twice on the same inputs; every result must be bitwise equal.
fn check_reproducible(runner: &Kernels, client: &ComputeClient<Wgpu>) {
    let cell = &runner.compiled().cell;
    let dims: Vec<(String, usize)> = cell.dims.iter().map(|d| (d.name.clone(), 7)).collect();
    let named: Vec<(&str, usize)> = dims.iter().map(|(n, s)| (n.as_str(), *s)).collect();
    let shape = ScanShape::new(cell, 3, 21, 2, &named).unwrap();
    let (inputs, go, gf) = random_problem(cell, &shape, &mut Rng(5), 1.0);
    let bits = |results: ScanResults| -> Vec<u32> {
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
        runner,
        client,
        &shape,
        cpu_schedule(),
        &inputs,
        &go,
        &gf,
    ));
    let second = bits(run_kernels(
        runner,
        client,
        &shape,
        cpu_schedule(),
        &inputs,
        &go,
        &gf,
    ));
    assert!(first == second, "{}: two runs differ", cell.name);
}

#[test]
fn gradients_are_bitwise_reproducible() {
    let client = client();
    for_each_cell(|kernels| check_reproducible(kernels, &client));
}

/// T = 2048 with inputs scaled by 30 (sigmoid and log-sigmoid gates saturated near 0 and 1):
/// everything stays finite and still matches the interpreter.
fn check_saturated(runner: &Kernels, client: &ComputeClient<Wgpu>) {
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
    let got = run_kernels(runner, client, &shape, schedule, &inputs, &go, &gf);
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
        cell.name
    );
    let expected = forward(cell, &shape, &inputs).unwrap();
    let error = relative_error(&got.outputs[0], &expected.outputs[0].data);
    assert!(
        error <= TOLERANCE,
        "{}: saturated outputs: relative error {error:e}",
        cell.name
    );
}

#[test]
fn saturated_gates_and_long_sequences_stay_finite() {
    let client = client();
    for cell in ["simple_rnn", "gla", "mlstm", "mamba2"] {
        check_saturated(&*builtin(cell), &client);
    }
}

#[test]
fn mismatched_buffers_are_refused_with_their_name() {
    let client = client();
    let runner = builtin("simple_rnn");
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
        .forward(Dtype::F32, &client, &shape, cpu_schedule(), &buffers)
        .expect("valid buffers");
    buffers.outputs = vec![zeros::<f32>(&client, 7)];
    let error = runner
        .forward(Dtype::F32, &client, &shape, cpu_schedule(), &buffers)
        .unwrap_err();
    assert_eq!(error.0, "output `o`: expected 30 elements, got 7");
    buffers.outputs = Vec::new();
    let error = runner
        .forward(Dtype::F32, &client, &shape, cpu_schedule(), &buffers)
        .unwrap_err();
    assert_eq!(error.0, "expected 1 output buffers (o), got 0");
    let zero_time = ScanShape::new(cell, 2, 0, 1, &[("K", 4), ("V", 5)]).unwrap();
    let error = runner
        .forward(Dtype::F32, &client, &zero_time, cpu_schedule(), &buffers)
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
    for cell in rak::cells::all() {
        let dims = vec![
            4;
            rak::codegen::compile_str(cell.source)
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
                let source = cell.kernel_source(request).unwrap().text;
                insta::assert_snapshot!(format!("{}_{kernel_name}_{extension}", cell.file), source);
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
    let runner = builtin("simple_rnn");
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
    let got =
        run_kernels_as::<half::f16>(&*runner, &client, &shape, cpu_schedule(), &inputs, &go, &gf);
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

rak::cell! {
    /// The functions whose backends are accurate near 0 only in absolute terms on some devices
    /// (`tanh`, and `log(1 + x)` inside softplus and log-sigmoid), each an output of its own.
    pub cell NearZero {
        dims D;
        input x[D];
        state h[D];
        update h[i] = x[i];
        output t[i] = tanh(h[i]);
        output s[i] = softplus(h[i]);
        output l[i] = logsigmoid(h[i]);
    }
}

/// `tanh`, softplus and log-sigmoid of ±1e-6 … ±20 are accurate in relative terms: each output
/// element within 1e-5 of the f64 interpreter's, relative to itself (tanh(1e-6) = 1e-6,
/// softplus(−20) = 2.1e-9, log-sigmoid(20) = −2.1e-9). On wgpu the kernels write `tanh` and
/// `log(1 + x)` as series near 0 (`Schedule::series_near_zero`, resolved per device); the
/// backend's own functions on Mesa's software driver are printed beside, for the record (they
/// are off by up to 1 relative: its `log(1 + e^−20)` is 0).
#[test]
fn functions_are_accurate_in_relative_terms_near_zero() {
    let client = client();
    let runner = CellRunner::<NearZero>::new();
    let cell = &runner.compiled().cell;
    let (steps, width) = (4, 16);
    let shape = ScanShape::new(cell, 1, steps, 1, &[("D", width)]).unwrap();
    // 32 magnitudes spaced evenly in log scale from 1e-6 to 20, each with both signs.
    let count = steps * width;
    let span = 20f64.log10() + 6.0;
    let x: Vec<f64> = (0..count)
        .map(|n| {
            let magnitude = 10f64.powf(-6.0 + span * (n / 2) as f64 / (count / 2 - 1) as f64);
            let sign = if n % 2 == 0 { 1.0 } else { -1.0 };
            // As the kernels see it.
            f64::from((sign * magnitude) as f32)
        })
        .collect();
    let inputs = ScanInputs {
        inputs: vec![Tensor {
            shape: shape.input(cell, InputId(0)),
            data: x.clone(),
        }],
        params: Vec::new(),
        initial_states: None,
    };
    let expected = forward(cell, &shape, &inputs).expect("the interpreter runs the cell");
    let zeros = |shape: Vec<usize>| Tensor::zeros(shape);
    let grad_outputs: Vec<Tensor> = (0..cell.outputs.len())
        .map(|o| zeros(shape.output(cell, OutputId(o))))
        .collect();
    let grad_finals = vec![zeros(shape.state(cell, StateId(0)))];
    let worst = |series_near_zero: Option<bool>| {
        let schedule = Schedule {
            series_near_zero,
            ..cpu_schedule()
        };
        let got = run_kernels(
            &runner,
            &client,
            &shape,
            schedule,
            &inputs,
            &grad_outputs,
            &grad_finals,
        );
        let mut worst = Vec::new();
        for (o, output) in cell.outputs.iter().enumerate() {
            let reference = &expected.outputs[o].data;
            let (error, at) = (got.outputs[o].iter().zip(reference).enumerate())
                .map(|(n, (&kernel, &exact))| ((f64::from(kernel) - exact).abs() / exact.abs(), n))
                .fold(
                    (0.0, 0),
                    |worst, this| if this.0 > worst.0 { this } else { worst },
                );
            worst.push((output.name.clone(), error, x[at]));
        }
        worst
    };
    for (output, error, at) in worst(None) {
        eprintln!("as the device needs: {output} relative error {error:.2e} at x = {at:e}");
        assert!(
            error <= 1e-5,
            "{output}: relative error {error:.2e} at x = {at:e}"
        );
    }
    for (output, error, at) in worst(Some(false)) {
        eprintln!("the backend's functions: {output} relative error {error:.2e} at x = {at:e}");
    }
}

rak::cell! {
    /// Seeds 0 and 4 of the random-cell generator (`rak-codegen/tests/compiler/
    /// random_cells.rs`), copied as it wrote them: lets that read the states, sums in gates,
    /// writes and outputs, a parameter, second states of two shapes, a scalar output; seed 13
    /// (below) adds matrix and scalar parameters and a second matrix state.
    pub cell Random0 {
        dims K, V;
        input x_k[K], x_v[V], x0 = sigmoid, x1[K] = sigmoid;
        state S[K, V], n;
        let h0[j] = x_v[j] * sqrt(1 + exp(tanh(((sum(l0) x1[l0]) - (sum(l1) S[l1, j])))) * exp(tanh(((sum(l0) x1[l0]) - (sum(l1) S[l1, j])))));
        let h1[j] = x_v[j] * (1.5 * ((sum(l2) S[l2, j]) / (1.5 + sigmoid(1.5))));
        update S[i, j] = sigmoid((sum(l3) S[i, l3] * h0[l3])) * S[i, j] + tanh(n);
        update n = sigmoid((sum(l4) h0[l4])) * n + tanh((sum(l5) x1[l5] * logsigmoid((sum(l6) x_v[l6]))));
        output o0[j] = n * h1[j] * log(2 + tanh(((x_v[j] - x0) / (1.5 + sigmoid(sqrt(1 + n * n))))));
    }
}

rak::cell! {
    pub cell Random4 {
        dims K, V;
        input x_k[K], x_v[V], x0[K] = softplus, x1 = sigmoid;
        param p0[V] = uniform(-0.5, 0.5);
        state S[K, V], n[K];
        let h0[j] = x_v[j] * exp(tanh(log(2 + tanh((0.25 * 0.5)))));
        update S[i, j] = sigmoid((log(2 + tanh(n[i])) / (1.5 + sigmoid((x1 / (1.5 + sigmoid(h0[j]))))))) * S[i, j] + tanh(x0[i]);
        update n[i] = sigmoid((sum(l0) p0[l0])) * n[i] + tanh(silu(exp(tanh(((sum(l1) h0[l1]) * (sum(l2) S[i, l2]))))));
        output o0 = (sum(l3, l4) S[l3, l4]) * x1 * (sum(l5) x_v[l5] * (sum(l6) h0[l6] * (-0.25)));
        output o1[i] = (sum(l7) S[i, l7]) * x_k[i] * (log(2 + tanh(softplus((sum(l8) p0[l8])))) / (1.5 + sigmoid(sqrt(1 + ((sum(l9) h0[l9]) + (sum(l10) S[i, l10])) * ((sum(l9) h0[l9]) + (sum(l10) S[i, l10]))))));
    }
}

rak::cell! {
    /// Seed 13 of the random-cell generator, as it wrote it. Its `n` doubles small values at
    /// each step, which takes a `tanh` accurate in relative terms near 0 (docs/compiler.md,
    /// "Functions written out") and a sum over the split axis guarded in its last tile.
    pub cell Random13 {
        dims K, V;
        input x_k[K], x_v[V], x0, x1[K] = softplus;
        param p0[K, V] = uniform(-0.5, 0.5), p1 = uniform(-0.5, 0.5);
        state S[K, V], n[K, V];
        let h0[i] = x1[i] * (sqrt(1 + x0 * x0) + (((sum(l0) S[i, l0]) * (sum(l1) x_v[l1])) / (1.5 + sigmoid((sum(l2) x_v[l2])))));
        let h1[j] = x_v[j] * (exp(tanh((sum(l3) x_v[l3] * x_v[l3]))) / (1.5 + sigmoid((0.5 / (1.5 + sigmoid(x0))))));
        update S[i, j] = sigmoid((h1[j] / (1.5 + sigmoid((sum(l4) p0[i, l4] * S[i, l4]))))) * S[i, j] + tanh(sqrt(1 + n[i, j] * n[i, j]));
        update n[i, j] = sigmoid(((-h0[i]) / (1.5 + sigmoid((n[i, j] + x1[i]))))) * n[i, j] + tanh(n[i, j]);
        output o0[i] = (sum(l5) S[i, l5]) * x1[i] * (-((x0 / (1.5 + sigmoid(h0[i]))) * p1));
    }
}

/// Cells the generator wrote, through the macro, on the kernels against the interpreter: at
/// small and odd dims, with several heads, T past two chunks; under a schedule asking for a
/// split axis in tiles of 8, shared memory, split sums, registers and 16 units in both passes
/// (chunks of 8, within the software driver's loop budget, see `row_gate_backward_with_16_units`);
/// and the single-step kernel after a scan.
#[test]
fn random_cells_match_the_interpreter() {
    use rak::codegen::schedule::Placement;
    let client = client();
    let asking = Schedule {
        chunk: 8,
        tile: Some(8),
        placement: Placement::Shared,
        stage: 3,
        sum_parts: 3,
        cube_dim: 16,
        ..cpu_schedule()
    }
    .same_for_both_passes();
    let cells: [Box<Kernels>; 3] = [
        Box::new(CellRunner::<Random0>::new()),
        Box::new(CellRunner::<Random4>::new()),
        Box::new(CellRunner::<Random13>::new()),
    ];
    for (n, kernels) in cells.iter().enumerate() {
        let seed = 700 + 10 * n as u64;
        let kernels = &**kernels;
        compare(
            kernels,
            &client,
            (2, 2 * CHUNK + 3, 2),
            5,
            cpu_schedule(),
            seed,
        );
        compare(
            kernels,
            &client,
            (1, CHUNK + 1, 3),
            33,
            cpu_schedule(),
            seed + 1,
        );
        compare(kernels, &client, (2, 2 * 8 + 5, 1), 33, asking, seed + 2);
        check_scan_then_step(kernels, &client, 2, 5, 2, 5, seed + 3);
    }
}
