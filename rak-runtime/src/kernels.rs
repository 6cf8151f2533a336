//! Running a cell's generated kernels from host code: buffers, shape validation, workspace,
//! and the second pass that sums parameter gradients over the batch.
//!
//! Layouts (row-major, contiguous, element type `F` unless noted): input and its gradient
//! `[B, T, H, numel]` (before activation), parameter and its gradient `[H, numel]`, initial and
//! final states and their gradients `[B, H, numel]`, output and its gradient `[B, T, H, numel]`,
//! checkpoints `[B, H, ceil(T / C), numel]` in f32.

use crate::CellDefinition;
use crate::codegen::ir::{Grad, InputId, OutputId, ParamId, StateId};
use crate::codegen::schedule::{DeviceLimits, Pass, Schedule, SplitPlan};
use crate::codegen::{CompiledCell, ScanShape};
use cubecl::prelude::KernelDefinition;
use cubecl::prelude::*;
use cubecl::server::Handle;
use std::any::TypeId;
use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;

/// A device buffer of `len` elements (its handle may be larger: allocations are padded).
#[derive(Clone, Debug)]
pub struct DeviceArray {
    pub handle: Handle,
    pub len: usize,
}

impl DeviceArray {
    pub fn new(handle: Handle, len: usize) -> Self {
        DeviceArray { handle, len }
    }

    /// A zero-initialised buffer of `len` elements of `bytes` each.
    pub fn zeros<R: Runtime>(client: &ComputeClient<R>, len: usize, bytes: usize) -> Self {
        DeviceArray {
            handle: client.create_from_slice(&vec![0u8; (len * bytes).max(4)]),
            len,
        }
    }
}

/// Implemented by `rak::cell!` for every cell: launches its generated kernels. Use
/// [`CellRunner`], which validates the buffers first.
pub trait CellKernels:
    CellDefinition + Copy + Default + std::fmt::Debug + Send + Sync + 'static
{
    #[doc(hidden)]
    fn launch_forward<F: Float + CubeElement, R: Runtime>(
        client: &ComputeClient<R>,
        shape: &ScanShape,
        schedule: Schedule,
        steps: std::ops::Range<usize>,
        buffers: &ForwardBuffers,
        workspace: &DeviceArray,
        placeholder: &DeviceArray,
    );

    /// The forward kernel's definition at these sizes, for printing its source.
    fn forward_definition<F: Float + CubeElement, R: Runtime>(
        client: &ComputeClient<R>,
        dims: &[usize],
        heads: usize,
        schedule: Schedule,
    ) -> KernelDefinition;

    /// The backward kernel's definition at these sizes, for printing its source.
    fn backward_definition<F: Float + CubeElement, R: Runtime>(
        client: &ComputeClient<R>,
        dims: &[usize],
        heads: usize,
        schedule: Schedule,
    ) -> KernelDefinition;

    /// The step kernel's definition at these sizes (its schedule as [`step_schedule`] makes
    /// it), for printing its source.
    fn step_definition<F: Float + CubeElement, R: Runtime>(
        client: &ComputeClient<R>,
        dims: &[usize],
        heads: usize,
        schedule: Schedule,
    ) -> KernelDefinition;

    #[doc(hidden)]
    fn launch_step<F: Float + CubeElement, R: Runtime>(
        client: &ComputeClient<R>,
        shape: &ScanShape,
        schedule: Schedule,
        buffers: &StepBuffers,
        workspace: &DeviceArray,
    );

    #[doc(hidden)]
    fn launch_backward<F: Float + CubeElement, R: Runtime>(
        client: &ComputeClient<R>,
        shape: &ScanShape,
        schedule: Schedule,
        chunks_from_end: std::ops::Range<usize>,
        buffers: &BackwardBuffers,
        param_partials: &[DeviceArray],
        workspace: &DeviceArray,
    );
}

/// What the forward scan reads and writes, one handle per input, parameter, state, output.
#[derive(Clone, Debug)]
pub struct ForwardBuffers {
    pub inputs: Vec<DeviceArray>,
    pub params: Vec<DeviceArray>,
    /// `None`: every state starts from its declared value.
    pub initial_states: Option<Vec<DeviceArray>>,
    pub outputs: Vec<DeviceArray>,
    pub final_states: Vec<DeviceArray>,
    /// `Some`: write a checkpoint of the states every `schedule.chunk` steps (f32), which the
    /// backward scan needs.
    pub checkpoints: Option<Vec<DeviceArray>>,
}

/// What the single-step kernel of streaming inference reads and writes: the inputs of one step
/// `[B, 1, H, numel]`, and the states `[B, H, numel]`, read and then overwritten in place.
#[derive(Clone, Debug)]
pub struct StepBuffers {
    pub inputs: Vec<DeviceArray>,
    pub params: Vec<DeviceArray>,
    pub states: Vec<DeviceArray>,
    pub outputs: Vec<DeviceArray>,
}

/// What the backward scan reads and writes.
#[derive(Clone, Debug)]
pub struct BackwardBuffers {
    pub inputs: Vec<DeviceArray>,
    pub params: Vec<DeviceArray>,
    /// Written by the forward scan with the same schedule.
    pub checkpoints: Vec<DeviceArray>,
    pub grad_outputs: Vec<DeviceArray>,
    pub grad_final_states: Vec<DeviceArray>,
    /// Written: gradients of the inputs before their activation.
    pub grad_inputs: Vec<DeviceArray>,
    /// Written: gradients of the parameters, summed over batch and time.
    pub grad_params: Vec<DeviceArray>,
    pub grad_initial_states: Vec<DeviceArray>,
}

/// A launch refused before it started; the message names the offending buffer or value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelError(pub String);

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KernelError {}

/// Number of checkpoints the forward scan writes per sequence.
pub fn checkpoint_count(time: usize, schedule: Schedule) -> usize {
    time.div_ceil(schedule.chunk)
}

/// The schedule of the step kernel (resolved then as the forward scan's): the split axis whole,
/// so that no cube reads a state another one writes, and inputs staged one step at a time.
pub fn step_schedule(split: Option<&SplitPlan>, dims: &[usize], schedule: Schedule) -> Schedule {
    Schedule {
        tile: split.map(|plan| dims[plan.dim.0]),
        stage: 1,
        ..schedule
    }
}

thread_local! {
    /// [`compiled_cell`]'s cells, per thread: a `CompiledCell` keeps the source's spans for its
    /// messages, which cannot be shared between threads.
    static COMPILED: RefCell<HashMap<TypeId, Rc<CompiledCell>>> = RefCell::default();
}

/// Cell `C`, compiled the first time this thread asks for it and kept: the fused operation asks
/// for it at every launch (the forward and backward scans of every layer of every step), and
/// compiling a cell (parse, check, autodiff, chunked form, scan plan: 0.1–0.4 ms for the
/// built-in cells, BENCHMARKS.md) costs far more than the lookup.
pub fn compiled_cell<C: CellDefinition + 'static>() -> Rc<CompiledCell> {
    COMPILED.with_borrow_mut(|compiled| {
        compiled
            .entry(TypeId::of::<C>())
            .or_insert_with(|| Rc::new(C::compile()))
            .clone()
    })
}

/// A cell's kernels with the metadata needed to check buffers against a shape.
pub struct CellRunner<C: CellKernels> {
    compiled: Rc<CompiledCell>,
    cell: std::marker::PhantomData<C>,
}

/// What the device allows a cube: its shared memory (at most 48 KiB, what CUDA gives a kernel
/// without opting in to more), twice its multiprocessors (or CPU cores) as the cubes a grid
/// should have, and whether its `tanh` and `log1p` are accurate near 0 in relative terms (not
/// on wgpu: Vulkan bounds them only in absolute terms there, and Mesa's software driver is about
/// 1e-7 off, so the kernels write them as series; CUDA's are).
pub fn device_limits<R: Runtime>(client: &ComputeClient<R>) -> DeviceLimits {
    let hardware = &client.properties().hardware;
    let processors = hardware
        .num_streaming_multiprocessors
        .or(hardware.num_cpu_cores)
        .unwrap_or(1) as usize;
    DeviceLimits {
        shared_memory_bytes: hardware.max_shared_memory_size.min(48 * 1024),
        min_cubes: 2 * processors,
        precise_near_zero: !on_wgpu::<R>(),
    }
}

impl<C: CellKernels> Default for CellRunner<C> {
    fn default() -> Self {
        Self::new()
    }
}

/// Expected sizes of a list of buffers.
struct Expect<'a> {
    what: &'a str,
    names: Vec<&'a str>,
    elements: Vec<usize>,
    element_bytes: usize,
}

impl Expect<'_> {
    fn check(&self, arrays: &[DeviceArray]) -> Result<(), KernelError> {
        if arrays.len() != self.elements.len() {
            return Err(KernelError(format!(
                "expected {} {} buffers ({}), got {}",
                self.elements.len(),
                self.what,
                self.names.join(", "),
                arrays.len()
            )));
        }
        for ((array, name), &elements) in arrays.iter().zip(&self.names).zip(&self.elements) {
            if array.len != elements {
                return Err(KernelError(format!(
                    "{} `{name}`: expected {elements} elements, got {}",
                    self.what, array.len
                )));
            }
            let needed = (elements * self.element_bytes) as u64;
            if array.handle.size() < needed {
                return Err(KernelError(format!(
                    "{} `{name}`: {elements} elements need {needed} bytes, its handle has {}",
                    self.what,
                    array.handle.size()
                )));
            }
        }
        Ok(())
    }
}

impl<C: CellKernels> CellRunner<C> {
    pub fn new() -> Self {
        CellRunner {
            compiled: compiled_cell::<C>(),
            cell: std::marker::PhantomData,
        }
    }

    pub fn compiled(&self) -> &CompiledCell {
        &self.compiled
    }

    fn check_shape(&self, shape: &ScanShape, schedule: Schedule) -> Result<(), KernelError> {
        let cell = &self.compiled.cell;
        if shape.dims.len() != cell.dims.len() {
            return Err(KernelError(format!(
                "cell `{}` has {} dims, the shape gives {}",
                cell.name,
                cell.dims.len(),
                shape.dims.len()
            )));
        }
        if shape.time == 0 {
            return Err(KernelError("time must be at least 1".into()));
        }
        if schedule.chunk == 0
            || schedule.cube_dim == 0
            || schedule.chunks_per_launch == Some(0)
            || schedule.stage == 0
            || schedule.tile == Some(0)
            || schedule.sum_parts == 0
            || schedule.backward_cube_dim == Some(0)
            || schedule.backward_sum_parts == Some(0)
        {
            return Err(KernelError(format!(
                "schedule {schedule:?}: chunk, cube_dim, chunks_per_launch, stage, tile, \
                 sum_parts and the backward's cube_dim and sum_parts must be at least 1"
            )));
        }
        Ok(())
    }

    /// Expected buffers for a list of values: one per `(name, shape)`, `copies` times its
    /// elements, of `bytes` each.
    fn per_value<'a>(
        what: &'a str,
        values: impl Iterator<Item = (&'a str, Vec<usize>)>,
        copies: usize,
        bytes: usize,
    ) -> Expect<'a> {
        let (names, elements) = values
            .map(|(name, dims)| (name, dims.iter().product::<usize>() * copies))
            .unzip();
        Expect {
            what,
            names,
            elements,
            element_bytes: bytes,
        }
    }

    fn inputs<'a>(&'a self, shape: &ScanShape, what: &'a str, bytes: usize) -> Expect<'a> {
        let cell = &self.compiled.cell;
        let values = cell.inputs.iter().enumerate();
        Self::per_value(
            what,
            values.map(|(i, x)| (x.name.as_str(), shape.input(cell, InputId(i)))),
            1,
            bytes,
        )
    }

    fn params<'a>(&'a self, shape: &ScanShape, what: &'a str, bytes: usize) -> Expect<'a> {
        let cell = &self.compiled.cell;
        let values = cell.params.iter().enumerate();
        Self::per_value(
            what,
            values.map(|(p, x)| (x.name.as_str(), shape.param(cell, ParamId(p)))),
            1,
            bytes,
        )
    }

    fn states<'a>(
        &'a self,
        shape: &ScanShape,
        what: &'a str,
        bytes: usize,
        copies: usize,
    ) -> Expect<'a> {
        let cell = &self.compiled.cell;
        let values = cell.states.iter().enumerate();
        Self::per_value(
            what,
            values.map(|(s, x)| (x.name.as_str(), shape.state(cell, StateId(s)))),
            copies,
            bytes,
        )
    }

    fn outputs<'a>(&'a self, shape: &ScanShape, what: &'a str, bytes: usize) -> Expect<'a> {
        let cell = &self.compiled.cell;
        let values = cell.outputs.iter().enumerate();
        Self::per_value(
            what,
            values.map(|(o, x)| (x.name.as_str(), shape.output(cell, OutputId(o)))),
            1,
            bytes,
        )
    }

    /// The schedule of a scan at this shape on this device (tile and placement chosen).
    fn resolve<R: Runtime>(
        &self,
        client: &ComputeClient<R>,
        shape: &ScanShape,
        schedule: Schedule,
        pass: Pass,
    ) -> Result<Schedule, KernelError> {
        schedule
            .resolve(
                &self.compiled,
                pass,
                &shape.dims,
                shape.batch * shape.heads,
                device_limits(client),
            )
            .map_err(KernelError)
    }

    /// Cubes per sequence under a resolved schedule, and the dims inside one cube.
    fn tiles(&self, shape: &ScanShape, schedule: Schedule) -> (usize, Vec<usize>) {
        self.compiled.plan.tiling(&shape.dims, schedule.tile)
    }

    fn workspace<R: Runtime>(
        &self,
        client: &ComputeClient<R>,
        shape: &ScanShape,
        schedule: Schedule,
        pass: Pass,
    ) -> DeviceArray {
        let layout = self.compiled.plan.layout(pass);
        let (tiles, dims) = self.tiles(shape, schedule);
        let per_cube = layout.size(&self.compiled.backward.cell, &dims, &schedule);
        // And one element more, last: the kernels' loop-budget mark ([`check_loop_budget`]),
        // cleared where it is read. The rest is left as the allocator gives it: the kernels
        // write every workspace value before they read it.
        let len = shape.batch * shape.heads * tiles * per_cube + 1;
        let workspace = DeviceArray::new(client.empty(len * 4), len);
        if checks_loop_budget::<R>() {
            clear_loop_budget_mark::launch::<R>(
                client,
                CubeCount::Static(1, 1, 1),
                CubeDim::new_1d(1),
                unsafe { ArrayArg::from_raw_parts(workspace.handle.clone(), len) },
            );
        }
        workspace
    }

    /// Runs the forward scan.
    pub fn forward<F: Float + CubeElement, R: Runtime>(
        &self,
        client: &ComputeClient<R>,
        shape: &ScanShape,
        schedule: Schedule,
        buffers: &ForwardBuffers,
    ) -> Result<(), KernelError> {
        let launch = self.prepare_forward::<F, R>(client, shape, schedule, buffers)?;
        launch.run::<F, R>(client);
        check_loop_budget(client, &launch.workspace, launch.schedule, "forward scan")
    }

    /// Validates the buffers and allocates the workspace of a forward scan, which can then be
    /// run (and timed) any number of times.
    pub fn prepare_forward<F: Float + CubeElement, R: Runtime>(
        &self,
        client: &ComputeClient<R>,
        shape: &ScanShape,
        schedule: Schedule,
        buffers: &ForwardBuffers,
    ) -> Result<ForwardLaunch<C>, KernelError> {
        self.check_shape(shape, schedule)?;
        let bytes = size_of::<F>();
        self.inputs(shape, "input", bytes).check(&buffers.inputs)?;
        self.params(shape, "parameter", bytes)
            .check(&buffers.params)?;
        if let Some(initial) = &buffers.initial_states {
            self.states(shape, "initial state", bytes, 1)
                .check(initial)?;
        }
        self.outputs(shape, "output", bytes)
            .check(&buffers.outputs)?;
        self.states(shape, "final state", bytes, 1)
            .check(&buffers.final_states)?;
        if let Some(checkpoints) = &buffers.checkpoints {
            self.states(
                shape,
                "checkpoint",
                4,
                checkpoint_count(shape.time, schedule),
            )
            .check(checkpoints)?;
        }
        let schedule = self.resolve(client, shape, schedule, Pass::Forward)?;
        Ok(ForwardLaunch {
            shape: shape.clone(),
            schedule,
            buffers: buffers.clone(),
            workspace: self.workspace(client, shape, schedule, Pass::Forward),
            placeholder: DeviceArray::new(client.empty(4), 1),
            cell: std::marker::PhantomData,
        })
    }

    /// Runs one step of every stream: `shape.time` must be 1; reads the states and overwrites
    /// them with the new ones, writes the outputs. One cube per stream (the split axis stays
    /// whole, so that no cube reads a state another one writes); the workspace goes to shared
    /// memory when it fits.
    pub fn step<F: Float + CubeElement, R: Runtime>(
        &self,
        client: &ComputeClient<R>,
        shape: &ScanShape,
        schedule: Schedule,
        buffers: &StepBuffers,
    ) -> Result<(), KernelError> {
        self.check_shape(shape, schedule)?;
        if shape.time != 1 {
            return Err(KernelError(format!(
                "a step runs one token per stream: the shape's time must be 1, got {}",
                shape.time
            )));
        }
        let bytes = size_of::<F>();
        self.inputs(shape, "input", bytes).check(&buffers.inputs)?;
        self.params(shape, "parameter", bytes)
            .check(&buffers.params)?;
        self.states(shape, "state", bytes, 1)
            .check(&buffers.states)?;
        self.outputs(shape, "output", bytes)
            .check(&buffers.outputs)?;
        let whole = step_schedule(self.compiled.plan.split.as_ref(), &shape.dims, schedule);
        let schedule = self.resolve(client, shape, whole, Pass::Forward)?;
        let workspace = self.workspace(client, shape, schedule, Pass::Forward);
        C::launch_step::<F, R>(client, shape, schedule, buffers, &workspace);
        check_loop_budget(client, &workspace, schedule, "step")
    }

    /// Runs the backward scan, then sums the parameter gradients over the batch.
    pub fn backward<F: Float + CubeElement, R: Runtime>(
        &self,
        client: &ComputeClient<R>,
        shape: &ScanShape,
        schedule: Schedule,
        buffers: &BackwardBuffers,
    ) -> Result<(), KernelError> {
        let launch = self.prepare_backward::<F, R>(client, shape, schedule, buffers)?;
        launch.run::<F, R>(client);
        check_loop_budget(client, &launch.workspace, launch.schedule, "backward scan")
    }

    /// Validates the buffers and allocates the workspace of a backward scan.
    pub fn prepare_backward<F: Float + CubeElement, R: Runtime>(
        &self,
        client: &ComputeClient<R>,
        shape: &ScanShape,
        schedule: Schedule,
        buffers: &BackwardBuffers,
    ) -> Result<BackwardLaunch<C>, KernelError> {
        self.check_shape(shape, schedule)?;
        let bytes = size_of::<F>();
        self.inputs(shape, "input", bytes).check(&buffers.inputs)?;
        self.params(shape, "parameter", bytes)
            .check(&buffers.params)?;
        self.states(
            shape,
            "checkpoint",
            4,
            checkpoint_count(shape.time, schedule),
        )
        .check(&buffers.checkpoints)?;
        self.outputs(shape, "output gradient", bytes)
            .check(&buffers.grad_outputs)?;
        self.states(shape, "final state gradient", bytes, 1)
            .check(&buffers.grad_final_states)?;
        self.inputs(shape, "input gradient", bytes)
            .check(&buffers.grad_inputs)?;
        self.params(shape, "parameter gradient", bytes)
            .check(&buffers.grad_params)?;
        self.states(shape, "initial state gradient", bytes, 1)
            .check(&buffers.grad_initial_states)?;
        let schedule = self.resolve(client, shape, schedule, Pass::Backward)?;
        let (tiles, _) = self.tiles(shape, schedule);
        let cell = &self.compiled.cell;
        let numel = |dims: Vec<usize>| dims.iter().product::<usize>();
        // Per sequence and tile; zeros where a tile does not write (outside its slice).
        let param_partials = (0..cell.params.len())
            .map(|p| {
                let len = shape.batch * tiles * numel(shape.param(cell, ParamId(p)));
                DeviceArray::zeros(client, len, 4)
            })
            .collect();
        // Gradients held as per-tile parts go to f32 buffers of `tiles` blocks, summed after.
        let is_partial = |grad| {
            self.compiled
                .plan
                .split
                .as_ref()
                .is_some_and(|plan| plan.is_partial(grad))
        };
        let tile_parts = |grad, total: &DeviceArray| {
            is_partial(grad).then(|| {
                let len = tiles * total.len;
                DeviceArray::new(client.empty(len * 4), len)
            })
        };
        let input_parts = (0..cell.inputs.len())
            .map(|i| tile_parts(Grad::Input(InputId(i)), &buffers.grad_inputs[i]))
            .collect();
        let initial_parts = (0..cell.states.len())
            .map(|s| {
                tile_parts(
                    Grad::StateFromNext(StateId(s)),
                    &buffers.grad_initial_states[s],
                )
            })
            .collect();
        Ok(BackwardLaunch {
            shape: shape.clone(),
            schedule,
            buffers: buffers.clone(),
            tiles,
            param_partials,
            input_parts,
            initial_parts,
            workspace: self.workspace(client, shape, schedule, Pass::Backward),
            cell: std::marker::PhantomData,
        })
    }
}

/// Whether launches on runtime `R` check the loop budget of Mesa's software Vulkan driver
/// (the CPU adapter of the tests and CI), which allows one invocation 65,535 loop iterations
/// over all its loops and past that ends them silently: on wgpu. The kernels mark the
/// workspace's last element where a unit ran out of it (`loop_budget_check` in
/// `rak-codegen`'s emitter). A GPU behind wgpu never marks it; the check costs it a one-unit
/// launch and a read of 4 bytes per scan. CUDA has no budget and skips both. (The chunked
/// path's own kernels, whose loop passes follow from their sizes alone, are checked before
/// they launch: `fused::cube`.)
pub(crate) fn checks_loop_budget<R: Runtime>() -> bool {
    on_wgpu::<R>()
}

/// The loop passes that Mesa's software Vulkan driver allows one invocation, over all its
/// loops ([`checks_loop_budget`]): 65,535.
pub(crate) const LOOP_BUDGET: usize = 65_535;

/// Whether `R` is wgpu's runtime.
fn on_wgpu<R: Runtime>() -> bool {
    #[cfg(feature = "wgpu")]
    {
        TypeId::of::<R>() == TypeId::of::<cubecl::wgpu::WgpuRuntime>()
    }
    #[cfg(not(feature = "wgpu"))]
    {
        false
    }
}

/// An error where a scan that used `workspace` (launched under `schedule`) ran out of the
/// software driver's loop budget ([`checks_loop_budget`]): its results are wrong.
fn check_loop_budget<R: Runtime>(
    client: &ComputeClient<R>,
    workspace: &DeviceArray,
    schedule: Schedule,
    what: &str,
) -> Result<(), KernelError> {
    if !checks_loop_budget::<R>() {
        return Ok(());
    }
    // The mark alone: the workspace's last 4 bytes.
    let last = ((workspace.len - 1) * 4) as u64;
    let bytes = client
        .read_one(workspace.handle.clone().offset_start(last))
        .map_err(|error| KernelError(format!("reading the {what}'s workspace: {error:?}")))?;
    let mark = f32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"));
    if mark == 0.0 {
        return Ok(());
    }
    Err(KernelError(format!(
        "the {what} ran past the 65,535 loop iterations that Mesa's software Vulkan driver \
         allows one invocation (over all its loops), which cuts the loops short: its results \
         are wrong. Use shorter chunks (the schedule's chunk is {}; `model.chunk` in the \
         configs) or more units per cube (cube_dim {}, backward_cube_dim {:?}), or a GPU",
        schedule.chunk, schedule.cube_dim, schedule.backward_cube_dim
    )))
}

/// `$body` with `$F` the element type of `$dtype` (f32, f16 or bf16).
macro_rules! with_element {
    ($dtype:expr, $F:ident => $body:expr) => {
        match $dtype {
            $crate::kernels::Dtype::F32 => {
                type $F = f32;
                $body
            }
            $crate::kernels::Dtype::F16 => {
                type $F = half::f16;
                $body
            }
            $crate::kernels::Dtype::Bf16 => {
                type $F = half::bf16;
                $body
            }
        }
    };
}
pub(crate) use with_element;

/// A cell's kernels on runtime `R` without the cell's type: [`CellRunner`]'s scans behind a
/// trait object, the element type picked at run time. Code that picks a cell at run time holds
/// one ([`CellRef::kernels`], [`crate::cells::Builtin::kernels`]): the built-in cells'
/// implementations are compiled once, in this crate, so a caller (a test of every cell, say)
/// compiles none of their kernels again, where one generic over the cell compiles every cell's
/// kernels itself.
pub trait ScanKernels<R: Runtime> {
    /// The compiled cell.
    fn compiled(&self) -> &CompiledCell;

    /// [`CellRunner::forward`] with `dtype` inputs, parameters and outputs.
    fn forward(
        &self,
        dtype: Dtype,
        client: &ComputeClient<R>,
        shape: &ScanShape,
        schedule: Schedule,
        buffers: &ForwardBuffers,
    ) -> Result<(), KernelError>;

    /// [`CellRunner::step`] with `dtype` inputs, parameters, states and outputs.
    fn step(
        &self,
        dtype: Dtype,
        client: &ComputeClient<R>,
        shape: &ScanShape,
        schedule: Schedule,
        buffers: &StepBuffers,
    ) -> Result<(), KernelError>;

    /// [`CellRunner::backward`] with `dtype` inputs, parameters, outputs and gradients.
    fn backward(
        &self,
        dtype: Dtype,
        client: &ComputeClient<R>,
        shape: &ScanShape,
        schedule: Schedule,
        buffers: &BackwardBuffers,
    ) -> Result<(), KernelError>;
}

impl<C: CellKernels, R: Runtime> ScanKernels<R> for CellRunner<C> {
    fn compiled(&self) -> &CompiledCell {
        &self.compiled
    }

    fn forward(
        &self,
        dtype: Dtype,
        client: &ComputeClient<R>,
        shape: &ScanShape,
        schedule: Schedule,
        buffers: &ForwardBuffers,
    ) -> Result<(), KernelError> {
        with_element!(dtype, F => {
            CellRunner::forward::<F, R>(self, client, shape, schedule, buffers)
        })
    }

    fn step(
        &self,
        dtype: Dtype,
        client: &ComputeClient<R>,
        shape: &ScanShape,
        schedule: Schedule,
        buffers: &StepBuffers,
    ) -> Result<(), KernelError> {
        with_element!(dtype, F => {
            CellRunner::step::<F, R>(self, client, shape, schedule, buffers)
        })
    }

    fn backward(
        &self,
        dtype: Dtype,
        client: &ComputeClient<R>,
        shape: &ScanShape,
        schedule: Schedule,
        buffers: &BackwardBuffers,
    ) -> Result<(), KernelError> {
        with_element!(dtype, F => {
            CellRunner::backward::<F, R>(self, client, shape, schedule, buffers)
        })
    }
}

/// A cell with its type erased: its name, its compiler and its kernels ([`ScanKernels`]) on
/// each enabled runtime, as function pointers. [`CellRef::of`] builds one where the cell's
/// type is known (the crate that declares it), and only there are that cell's kernels
/// compiled; everything that takes a `CellRef` (the fused operation, the model, training,
/// generation) is compiled once, in this crate, for every cell.
#[derive(Clone, Copy)]
pub struct CellRef {
    name: &'static str,
    type_id: TypeId,
    compiled: fn() -> Rc<CompiledCell>,
    #[cfg(feature = "wgpu")]
    wgpu: fn() -> Box<dyn ScanKernels<cubecl::wgpu::WgpuRuntime>>,
    #[cfg(feature = "cuda")]
    cuda: fn() -> Box<dyn ScanKernels<cubecl::cuda::CudaRuntime>>,
}

impl CellRef {
    /// Cell `C`, its kernels compiled here for every enabled runtime.
    pub fn of<C: CellKernels>() -> Self {
        CellRef {
            name: C::NAME,
            type_id: TypeId::of::<C>(),
            compiled: compiled_cell::<C>,
            #[cfg(feature = "wgpu")]
            wgpu: kernels_of::<C, cubecl::wgpu::WgpuRuntime>,
            #[cfg(feature = "cuda")]
            cuda: kernels_of::<C, cubecl::cuda::CudaRuntime>,
        }
    }

    /// The cell's type name ([`crate::CellDefinition::NAME`]).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The compiled cell ([`compiled_cell`]: compiled once per thread).
    pub fn compiled(&self) -> Rc<CompiledCell> {
        (self.compiled)()
    }

    /// The cell's kernels on runtime `R`.
    pub fn kernels<R: ScanRuntime>(&self) -> Box<dyn ScanKernels<R>> {
        R::kernels_of(self)
    }
}

fn kernels_of<C: CellKernels, R: Runtime>() -> Box<dyn ScanKernels<R>> {
    Box::new(CellRunner::<C>::new())
}

impl fmt::Debug for CellRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CellRef({})", self.name)
    }
}

/// Two `CellRef`s are equal when they are of the same cell type.
impl PartialEq for CellRef {
    fn eq(&self, other: &Self) -> bool {
        self.type_id == other.type_id
    }
}

impl Eq for CellRef {}

/// A runtime that a [`CellRef`] carries kernels for (wgpu, CUDA: one per enabled feature).
pub trait ScanRuntime: Runtime {
    /// `cell`'s kernels on this runtime.
    fn kernels_of(cell: &CellRef) -> Box<dyn ScanKernels<Self>>;
}

#[cfg(feature = "wgpu")]
impl ScanRuntime for cubecl::wgpu::WgpuRuntime {
    fn kernels_of(cell: &CellRef) -> Box<dyn ScanKernels<Self>> {
        (cell.wgpu)()
    }
}

#[cfg(feature = "cuda")]
impl ScanRuntime for cubecl::cuda::CudaRuntime {
    fn kernels_of(cell: &CellRef) -> Box<dyn ScanKernels<Self>> {
        (cell.cuda)()
    }
}

/// A validated forward scan with its workspace ([`CellRunner::prepare_forward`]).
#[derive(Clone, Debug)]
pub struct ForwardLaunch<C> {
    shape: ScanShape,
    schedule: Schedule,
    buffers: ForwardBuffers,
    workspace: DeviceArray,
    placeholder: DeviceArray,
    cell: std::marker::PhantomData<C>,
}

impl<C: CellKernels> ForwardLaunch<C> {
    /// The schedule it runs, with tile and placement chosen.
    pub fn schedule(&self) -> Schedule {
        self.schedule
    }

    /// Enqueues the scan's launches.
    pub fn run<F: Float + CubeElement, R: Runtime>(&self, client: &ComputeClient<R>) {
        let (shape, schedule) = (&self.shape, self.schedule);
        for chunks in schedule.launches(shape.time) {
            let steps =
                chunks.start * schedule.chunk..(chunks.end * schedule.chunk).min(shape.time);
            C::launch_forward::<F, R>(
                client,
                shape,
                schedule,
                steps,
                &self.buffers,
                &self.workspace,
                &self.placeholder,
            );
        }
    }
}

/// A validated backward scan with its workspace ([`CellRunner::prepare_backward`]).
#[derive(Clone, Debug)]
pub struct BackwardLaunch<C> {
    shape: ScanShape,
    schedule: Schedule,
    buffers: BackwardBuffers,
    /// Cubes per sequence.
    tiles: usize,
    /// Parameter gradients per sequence and tile, summed over time.
    param_partials: Vec<DeviceArray>,
    /// Per-tile parts of input and initial-state gradients (where the split makes them so).
    input_parts: Vec<Option<DeviceArray>>,
    initial_parts: Vec<Option<DeviceArray>>,
    workspace: DeviceArray,
    cell: std::marker::PhantomData<C>,
}

impl<C: CellKernels> BackwardLaunch<C> {
    /// The schedule it runs, with tile and placement chosen.
    pub fn schedule(&self) -> Schedule {
        self.schedule
    }

    /// Enqueues the scan's launches, then the sums of the parameter gradients over the batch
    /// and tiles, and of the per-tile parts of other gradients over the tiles.
    pub fn run<F: Float + CubeElement, R: Runtime>(&self, client: &ComputeClient<R>) {
        let (shape, schedule) = (&self.shape, self.schedule);
        // The kernel writes per-tile parts where the buffers would be.
        let mut written = self.buffers.clone();
        let redirect = |targets: &mut Vec<DeviceArray>, parts: &[Option<DeviceArray>]| {
            for (target, part) in targets.iter_mut().zip(parts) {
                if let Some(part) = part {
                    *target = part.clone();
                }
            }
        };
        redirect(&mut written.grad_inputs, &self.input_parts);
        redirect(&mut written.grad_initial_states, &self.initial_parts);
        for chunks_from_end in schedule.launches(shape.time) {
            C::launch_backward::<F, R>(
                client,
                shape,
                schedule,
                chunks_from_end,
                &written,
                &self.param_partials,
                &self.workspace,
            );
        }
        let batch_tiles = shape.batch * self.tiles;
        let mut sums: Vec<(&DeviceArray, &DeviceArray, usize)> = Vec::new();
        for (parts, total) in self.param_partials.iter().zip(&self.buffers.grad_params) {
            sums.push((parts, total, batch_tiles));
        }
        let tile_parts = self
            .input_parts
            .iter()
            .zip(&self.buffers.grad_inputs)
            .chain(
                self.initial_parts
                    .iter()
                    .zip(&self.buffers.grad_initial_states),
            );
        for (parts, total) in tile_parts {
            if let Some(parts) = parts {
                sums.push((parts, total, self.tiles));
            }
        }
        for (parts, total, rows) in sums {
            let width = total.len;
            sum_rows::launch::<F, R>(
                client,
                CubeCount::Static(width.div_ceil(64) as u32, 1, 1),
                CubeDim::new_1d(64),
                unsafe { ArrayArg::from_raw_parts(parts.handle.clone(), parts.len) },
                unsafe { ArrayArg::from_raw_parts(total.handle.clone(), width) },
                rows as u32,
                width as u32,
            );
        }
    }
}

/// Which source `kernel_source` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceTarget {
    /// CUDA C++, as cubecl-cpp's compiler produces it for NVRTC (no GPU needed).
    Cuda,
    /// WGSL, as cubecl-wgpu produces it.
    Wgsl,
}

/// Which of a cell's kernels `kernel_source` (and `rak emit --pass`) prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kernel {
    /// The forward scan.
    Forward,
    /// The backward scan.
    Backward,
    /// One step of every stream (streaming generation).
    Step,
}

/// Element type of a kernel's inputs, parameters and outputs (states, checkpoints and the
/// arithmetic are f32 whatever it is).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Dtype {
    F32,
    F16,
    Bf16,
}

impl Dtype {
    /// The type burn names `dtype`, if the kernels take it.
    pub fn from_burn(dtype: burn::tensor::DType) -> Option<Dtype> {
        match dtype {
            burn::tensor::DType::F32 => Some(Dtype::F32),
            burn::tensor::DType::F16 => Some(Dtype::F16),
            burn::tensor::DType::BF16 => Some(Dtype::Bf16),
            _ => None,
        }
    }

    /// burn's name of the type.
    pub fn float_dtype(self) -> burn::tensor::FloatDType {
        match self {
            Dtype::F32 => burn::tensor::FloatDType::F32,
            Dtype::F16 => burn::tensor::FloatDType::F16,
            Dtype::Bf16 => burn::tensor::FloatDType::BF16,
        }
    }
}

/// A kernel's printed source and the schedule it was generated under.
#[derive(Clone, Debug)]
pub struct KernelSource {
    pub text: String,
    /// The schedule resolved for the printed sizes (its tile and placement set).
    pub schedule: Schedule,
    /// Whether the kernel holds the cell's states in registers (the forward scan; the
    /// backward scan's recomputation, `Schedule::recompute_registers`; never the step).
    pub states_in_registers: bool,
    /// Whether the kernel carries the state gradients in registers through its walk (the
    /// backward scan, `Schedule::walk_registers`).
    pub gradients_in_registers: bool,
}

/// The CUDA C++ or WGSL source of one of a cell's kernels for `dtype` inputs, at the given dim
/// sizes (the kernels are specialised on them), under `schedule` resolved for one batch element
/// of `heads` heads on a device with 48 KiB of shared memory per cube (set `schedule.tile` to
/// print the tile a larger grid gets). Needs a wgpu adapter (the CPU one will do) to build the
/// kernel definition.
#[cfg(feature = "wgpu")]
pub fn kernel_source<C: CellKernels>(
    dims: &[usize],
    heads: usize,
    schedule: Schedule,
    kernel: Kernel,
    target: SourceTarget,
    dtype: Dtype,
) -> Result<KernelSource, KernelError> {
    type Wgpu = cubecl::wgpu::WgpuRuntime;
    let client = source_client();
    // Printed as it would run on a CUDA device (48 KiB of shared memory), at batch 1, with
    // the functions as the target's backend needs them.
    let limits = DeviceLimits {
        shared_memory_bytes: 48 * 1024,
        min_cubes: 1,
        precise_near_zero: target == SourceTarget::Cuda,
    };
    let compiled = compiled_cell::<C>();
    let (schedule, pass) = match kernel {
        Kernel::Forward => (schedule, Pass::Forward),
        Kernel::Backward => (schedule, Pass::Backward),
        Kernel::Step => (
            step_schedule(compiled.plan.split.as_ref(), dims, schedule),
            Pass::Forward,
        ),
    };
    let schedule = schedule
        .resolve(&compiled, pass, dims, heads, limits)
        .map_err(KernelError)?;
    fn definition<C: CellKernels, F: Float + CubeElement>(
        client: &ComputeClient<Wgpu>,
        dims: &[usize],
        heads: usize,
        schedule: Schedule,
        kernel: Kernel,
    ) -> KernelDefinition {
        match kernel {
            Kernel::Forward => C::forward_definition::<F, Wgpu>(client, dims, heads, schedule),
            Kernel::Backward => C::backward_definition::<F, Wgpu>(client, dims, heads, schedule),
            Kernel::Step => C::step_definition::<F, Wgpu>(client, dims, heads, schedule),
        }
    }
    let definition =
        with_element!(dtype, F => definition::<C, F>(&client, dims, heads, schedule, kernel));
    let source = compile_definition(definition, target)
        .map_err(|error| KernelError(format!("cannot compile {} {kernel:?}: {error}", C::NAME)))?;
    let states_in_registers = match kernel {
        Kernel::Forward => schedule.holds_states_in_registers(&compiled, dims),
        Kernel::Backward => schedule.recomputes_in_registers(&compiled, dims),
        Kernel::Step => false,
    };
    let gradients_in_registers =
        kernel == Kernel::Backward && schedule.walks_in_registers(&compiled, dims);
    Ok(KernelSource {
        text: source,
        schedule,
        states_in_registers,
        gradients_in_registers,
    })
}

/// A wgpu client to build kernel definitions on (the CPU adapter will do), for printing their
/// sources.
#[cfg(feature = "wgpu")]
pub(crate) fn source_client() -> ComputeClient<cubecl::wgpu::WgpuRuntime> {
    cubecl::wgpu::WgpuRuntime::client(&Default::default())
}

/// `definition` compiled to `target`'s source (32-bit addresses, unchecked accesses, as the
/// kernels launch), its declarations sorted; the error is the compiler's, printed.
#[cfg(feature = "wgpu")]
pub(crate) fn compile_definition(
    definition: KernelDefinition,
    target: SourceTarget,
) -> Result<String, String> {
    use cubecl::Compiler;
    use cubecl::ir::{ElemType, StorageType, UIntKind};
    let address = StorageType::Scalar(ElemType::UInt(UIntKind::U32));
    let source = match target {
        SourceTarget::Cuda => {
            type CudaCompiler = cubecl_cpp::shared::CppCompiler<
                cubecl_cpp::cuda::CudaDialect<cubecl_cpp::cuda::mma::CudaWmmaCompiler>,
            >;
            CudaCompiler::default()
                .compile(
                    definition,
                    &Default::default(),
                    ExecutionMode::Unchecked,
                    address,
                )
                .map(|source| source.to_string())
                .map_err(|e| format!("{e:?}"))
        }
        SourceTarget::Wgsl => cubecl::wgpu::WgslCompiler::default()
            .compile(
                definition,
                &Default::default(),
                ExecutionMode::Unchecked,
                address,
            )
            .map(|source| source.to_string())
            .map_err(|e| format!("{e:?}")),
    }?;
    Ok(sort_declarations(&source))
}

/// cubecl declares a kernel's mutable variables in hash order; sorting each run of such
/// declarations (`float l_mut_7;`, `var l_mut_7: f32;`) makes printed sources reproducible.
fn sort_declarations(source: &str) -> String {
    let is_declaration = |line: &str| {
        let line = line.trim();
        line.ends_with(';') && line.contains("l_mut_") && !line.contains('=') && !line.contains('(')
    };
    let mut lines: Vec<&str> = source.lines().collect();
    let mut start = 0;
    while start < lines.len() {
        let end = (start..lines.len())
            .find(|&i| !is_declaration(lines[i]))
            .unwrap_or(lines.len());
        lines[start..end].sort_unstable();
        start = end + 1;
    }
    let mut sorted = lines.join("\n");
    sorted.push('\n');
    sorted
}

/// [`kernel_source`] as a [`crate::cells::CellVisitor`], for cells picked by name.
pub struct SourceOf<'a> {
    pub dims: &'a [usize],
    pub heads: usize,
    pub schedule: Schedule,
    pub kernel: Kernel,
    pub target: SourceTarget,
    pub dtype: Dtype,
}

impl crate::cells::CellVisitor for SourceOf<'_> {
    type Output = Result<KernelSource, KernelError>;

    #[cfg(feature = "wgpu")]
    fn visit<C: CellKernels>(self) -> Self::Output {
        kernel_source::<C>(
            self.dims,
            self.heads,
            self.schedule,
            self.kernel,
            self.target,
            self.dtype,
        )
    }

    #[cfg(not(feature = "wgpu"))]
    fn visit<C: CellKernels>(self) -> Self::Output {
        Err(KernelError(format!(
            "printing the kernels of {} needs rak built with the `wgpu` feature",
            C::NAME
        )))
    }
}

/// Zeroes the workspace's last element, the loop-budget mark ([`check_loop_budget`]).
#[cube(launch)]
fn clear_loop_budget_mark(workspace: &mut Array<f32>) {
    if ABSOLUTE_POS == 0 {
        workspace[workspace.len() - 1] = 0f32;
    }
}

/// `total[e] = Σ_r parts[r, e]`, in a fixed order (bitwise reproducible).
#[cube(launch)]
fn sum_rows<F: Float>(parts: &Array<f32>, total: &mut Array<F>, rows: u32, width: u32) {
    let e = ABSOLUTE_POS;
    let width = width as usize;
    if e < width {
        let mut sum = 0f32;
        for r in 0..rows as usize {
            sum += parts[r * width + e];
        }
        total[e] = F::cast_from(sum);
    }
}
