//! Schedule pass: how a cell's scans are laid out on the device.
//!
//! - **Split axis** ([`split_plan`]): a state axis whose values evolve independently (SimpleRNN's
//!   V) is tiled across cubes: one cube per batch element × head × tile, each holding `tile`
//!   values of the axis; values without the axis are computed by every cube. In the backward
//!   step, gradients of values without the axis are per-tile parts that the host sums in a
//!   second pass. Cells without such an axis (Elman) run one cube per sequence.
//! - **Time loop inside the kernel**: one launch per scan, or launches of
//!   [`Schedule::chunks_per_launch`] chunks that resume from the workspace.
//! - **Workspace**: every per-step value (activated inputs, S_{t−1}, S_t, lets, gradients,
//!   materialised sums) has an f32 buffer in the cube's workspace ([`WorkspaceLayout`]), in
//!   shared memory when it fits ([`Placement`]), else in global memory. The backward scan's
//!   recomputed chunk of states is always in global memory.
//! - **Checkpoints**: the forward scan writes the states every [`Schedule::chunk`] steps; the
//!   backward scan walks the chunks in reverse, recomputes each chunk's states from its
//!   checkpoint, then runs the backward step for each time step of the chunk in reverse.
//!
//! Every `sum` is materialised: computed once per step into a buffer indexed by its free
//! indices, right before the first statement that needs it, so that an expression such as
//! `tanh(Σ_j R[i, j]·h[j] + x[i])` is not recomputed inside every element of a statement that
//! reads it (the backward of Elman reads it D² times per step). Sums equal up to renaming of
//! their indices share one buffer and are computed once. A sum whose statement has fewer
//! elements than the cube has units is split among units ([`Schedule::sum_parts`]); the partial
//! sums wait in [`Buffer::SumParts`].
//!
//! [`Schedule::resolve`] fills in what a launch left open (tile, placement) from the shape and
//! the device's limits, reading the split axis and workspace layouts that the cell's
//! [`ScanPlan`] worked out once, when it was compiled; the kernel emitter ([`crate::emit`]) and
//! the host both derive buffer offsets and sizes from that same plan's [`WorkspaceLayout`]s and
//! [`SplitPlan`].

use crate::ir::*;

/// Where the per-step buffers of a cube's workspace live (the chunk's recomputed states of the
/// backward scan are always in global memory).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Placement {
    /// Shared memory when the buffers fit the device's shared memory, else global memory.
    #[default]
    Auto,
    /// Shared memory (the launch is refused if it does not fit).
    Shared,
    /// Global memory (any size; slower).
    Global,
}

/// Choices a launch can override (tests and benchmarks do).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// Units per cube.
    pub cube_dim: u32,
    /// Time steps between state checkpoints (C); the backward scan recomputes at most C states.
    pub chunk: usize,
    /// Split each scan into launches of this many chunks (the state, its gradient and the
    /// parameter-gradient sums wait in the workspace between launches); `None`: one launch.
    /// Mesa's software Vulkan driver caps every loop at 65,535 iterations per invocation in
    /// total, so long scans there need several launches.
    pub chunks_per_launch: Option<usize>,
    /// Steps whose inputs the forward scan loads at once (into the workspace, ahead of the
    /// steps that read them), so that the latency of global memory is paid once per block.
    pub stage: usize,
    /// Values of the split axis ([`SplitPlan`]) per cube; `None`: chosen at launch (the whole
    /// axis, halved while the workspace does not fit or the grid has few cubes). Ignored for
    /// cells with no split axis.
    pub tile: Option<usize>,
    /// Where the per-step buffers live.
    pub placement: Placement,
    /// Units that may share one `sum`: when a statement whose value is a sum has fewer
    /// elements than the cube has units, each element's terms are split among up to this many
    /// units (strided), whose partial sums one unit then adds up in a fixed order (bitwise
    /// reproducible). 1: every sum is a serial loop in one unit.
    pub sum_parts: usize,
    /// Whether the forward scan holds the states that allow it ([`register_states`]) in
    /// registers, where the launch's `cube_dim` and `sum_parts` allow it; else every state
    /// lives in the workspace.
    pub registers: bool,
    /// Whether the backward scan's recomputation of each chunk holds the states that allow it
    /// ([`recomputed_register_states`]) in registers, where its `cube_dim` allows it; else it
    /// updates them in the workspace. Compiled for the H100, that takes SimpleRNN's recomputed
    /// step from 129 shared-memory reads, 39 writes and 3 barriers to 65, 7 and 2, and its
    /// backward kernel's time loop from 2,094 to 1,933 instructions (BENCHMARKS.md); not
    /// timed on a GPU yet (`rak bench --recompute-registers false,true`).
    pub recompute_registers: bool,
    /// Whether the backward scan's walk carries the state gradients that allow it
    /// ([`carried_register_grads`]) in registers from step to step, where its `cube_dim` allows
    /// it; else they go through the workspace at every step.
    pub walk_registers: bool,
    /// Units per cube of the backward scan, where it differs from the forward's (`None`:
    /// `cube_dim`); see [`Schedule::for_backward`].
    pub backward_cube_dim: Option<u32>,
    /// `sum_parts` of the backward scan, where it differs from the forward's (`None`:
    /// `sum_parts`).
    pub backward_sum_parts: Option<usize>,
    /// Whether the kernels write `tanh`, and `log(1 + x)` in softplus and log-sigmoid, as
    /// their Taylor series near 0, for a backend that computes them accurately there only in
    /// absolute terms (Vulkan, on wgpu: docs/compiler.md, "Functions written out"); `None`:
    /// where the device needs it ([`DeviceLimits::precise_near_zero`]), decided at
    /// [`Schedule::resolve`] (and the series if a launch gets it unresolved). CUDA's `tanhf`
    /// and `log1pf` are accurate in relative terms, and the series cost registers there.
    pub series_near_zero: Option<bool>,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule {
            cube_dim: 128,
            chunk: 64,
            chunks_per_launch: None,
            stage: 8,
            tile: None,
            placement: Placement::Auto,
            sum_parts: 8,
            registers: true,
            recompute_registers: true,
            walk_registers: true,
            // The H200 sweep of 2026-12-04 (SimpleRNN, B=8 T=2048 H=8 K=V=128): the backward
            // scan took 26.8 ms with 64 units and unsplit sums, 37.5 with 64 units and split
            // sums, 39.9–40.7 with 128 units either way; the forward was fastest with split
            // sums (3.50 ms at 64 units, 3.84 at 128).
            backward_cube_dim: Some(64),
            backward_sum_parts: Some(1),
            series_near_zero: None,
        }
    }
}

impl Schedule {
    /// The schedule of the backward scan: `cube_dim` and `sum_parts` from
    /// `backward_cube_dim` and `backward_sum_parts` where those are set (and those cleared).
    /// [`Schedule::resolve`] applies it to the backward pass.
    pub fn for_backward(self) -> Schedule {
        Schedule {
            cube_dim: self.backward_cube_dim.unwrap_or(self.cube_dim),
            sum_parts: self.backward_sum_parts.unwrap_or(self.sum_parts),
            ..self.same_for_both_passes()
        }
    }

    /// This schedule for both passes alike (the backward's own units and sum parts cleared).
    pub fn same_for_both_passes(self) -> Schedule {
        Schedule {
            backward_cube_dim: None,
            backward_sum_parts: None,
            ..self
        }
    }

    /// The launches of a scan of `time` steps, as ranges of chunks (forward: from the first
    /// chunk; backward: counted from the last).
    pub fn launches(&self, time: usize) -> Vec<std::ops::Range<usize>> {
        let chunks = time.div_ceil(self.chunk);
        let per_launch = self.chunks_per_launch.unwrap_or(chunks).max(1);
        (0..chunks)
            .step_by(per_launch)
            .map(|first| first..(first + per_launch).min(chunks))
            .collect()
    }
}

/// What the host knows of the device when it resolves a [`Schedule`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceLimits {
    /// Shared memory one cube may use.
    pub shared_memory_bytes: usize,
    /// Cubes the grid should have to keep the device busy (tiles are halved until it has).
    pub min_cubes: usize,
    /// Whether the backend's `tanh` and `log1p` are accurate in relative terms near 0, as
    /// CUDA's are; where they are not (Vulkan's `tanh` and `log`, on wgpu, are bounded only in
    /// absolute terms there), the kernels write them as series ([`Schedule::series_near_zero`]).
    pub precise_near_zero: bool,
}

impl Schedule {
    /// The schedule of one scan at these sizes: for the backward pass, its own units and sum
    /// parts ([`Schedule::for_backward`]); the tile of the split axis (if the cell has one) and
    /// the placement of the workspace and whether to write functions as series near 0,
    /// chosen where left open. `sequences` is batch × heads.
    /// Errors if shared memory is asked for and the workspace does not fit. Reads the cell's
    /// [`ScanPlan`] (`compiled.plan`), so a launch works out nothing about the cell again.
    pub fn resolve(
        self,
        compiled: &crate::CompiledCell,
        pass: Pass,
        dims: &[usize],
        sequences: usize,
        limits: DeviceLimits,
    ) -> Result<Schedule, String> {
        if pass == Pass::Backward && self != self.for_backward() {
            return self
                .for_backward()
                .resolve(compiled, pass, dims, sequences, limits);
        }
        // The backward step's cell: its arena holds the sums the layouts refer to.
        let cell = &compiled.backward.cell;
        let layout = compiled.plan.layout(pass);
        let split = &compiled.plan.split;
        let shared_bytes = |tile: Option<usize>| {
            let (_, dims) = compiled.plan.tiling(dims, tile);
            layout.step_size(cell, &dims, &self) * 4
        };
        let fits = |tile| shared_bytes(tile) <= limits.shared_memory_bytes;
        let tile = split.as_ref().map(|plan| {
            let size = dims[plan.dim.0];
            if let Some(tile) = self.tile {
                return tile.clamp(1, size);
            }
            let mut tile = size;
            while tile > 1 {
                let enough_cubes = sequences * size.div_ceil(tile) >= limits.min_cubes;
                if enough_cubes && (self.placement == Placement::Global || fits(Some(tile))) {
                    break;
                }
                tile = tile.div_ceil(2);
            }
            tile
        });
        let placement = match self.placement {
            Placement::Auto if fits(tile) => Placement::Shared,
            Placement::Auto => Placement::Global,
            Placement::Shared if !fits(tile) => {
                return Err(format!(
                    "the {} workspace of cell `{}` needs {} bytes of shared memory per cube \
                     (tile {}), the device offers {}: use a smaller tile or global placement",
                    match pass {
                        Pass::Forward => "forward",
                        Pass::Backward => "backward",
                    },
                    cell.name,
                    shared_bytes(tile),
                    tile.map_or("none".to_string(), |t| t.to_string()),
                    limits.shared_memory_bytes
                ));
            }
            placement => placement,
        };
        Ok(Schedule {
            tile,
            placement,
            series_near_zero: Some(self.series_near_zero.unwrap_or(!limits.precise_near_zero)),
            ..self
        })
    }
}

/// How a gradient of the backward step is held when the split axis is tiled across cubes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradSplit {
    /// Indexed by the split axis: each cube holds its tile, complete.
    Local,
    /// Not indexed by the split axis, and computed from a sum over it (or from another partial
    /// gradient): each cube holds the part of its tile; the parts add up to the gradient
    /// (gradients are linear in the gradients they read).
    Partial,
    /// Not indexed by the split axis and independent of it: every cube holds all of it.
    Replicated,
}

/// A state axis whose values evolve independently, so the scans can be split across cubes,
/// each cube holding a tile of it (SimpleRNN's V axis: column `j` of `S` needs only `v[j]`, and
/// `o[j]` needs only column `j`). Values without the axis (SimpleRNN's `q`, `k`, `g`) are
/// computed by every cube. In the backward step, the gradients of values without the axis
/// are sums over it: each cube computes its tile's part ([`GradSplit::Partial`]), which the
/// host adds up in a second pass.
///
/// An axis qualifies when, in every forward statement, every index variable over it is the
/// statement's own (no `sum` over it, no two of it in one statement) and, in the backward step,
/// no gradient with the axis reads a partial gradient or sums over the axis, no partial
/// gradient also reads a replicated one, and no input, parameter or initial-state gradient is
/// replicated. Cells with no such axis (Elman: `Σ_j R[i, j]·h[j]` mixes all of `h`) run one
/// cube per sequence.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitPlan {
    pub dim: DimId,
    pub grads: std::collections::HashMap<Grad, GradSplit>,
}

impl SplitPlan {
    /// The split of a gradient (`Local` for gradients of the axis).
    pub fn grad(&self, grad: Grad) -> GradSplit {
        self.grads.get(&grad).copied().unwrap_or(GradSplit::Local)
    }

    /// Whether a gradient is a per-cube part to be summed over the tiles.
    pub fn is_partial(&self, grad: Grad) -> bool {
        self.grad(grad) == GradSplit::Partial
    }
}

/// What the host needs of a cell's schedule at every launch and that no launch changes, worked
/// out once when the cell is compiled ([`crate::CompiledCell::plan`]): the split axis and the
/// workspace layouts of both scans. Building it takes 28–225 µs for the built-in cells, which
/// every launch (one per scan, layer and training step) would otherwise pay again; resolving
/// both scans from it takes 2–18 µs (`cargo bench -p rak-codegen --bench launch_planning`).
/// The kernel emitter reads the same plan ([`crate::emit::emit_kernels`]).
#[derive(Clone, Debug)]
pub struct ScanPlan {
    pub split: Option<SplitPlan>,
    pub forward: WorkspaceLayout,
    pub backward: WorkspaceLayout,
}

impl ScanPlan {
    pub fn new(step: &BackwardStep) -> Self {
        ScanPlan {
            split: split_plan(step),
            forward: WorkspaceLayout::new(step, Pass::Forward),
            backward: WorkspaceLayout::new(step, Pass::Backward),
        }
    }

    /// The workspace layout of a pass.
    pub fn layout(&self, pass: Pass) -> &WorkspaceLayout {
        match pass {
            Pass::Forward => &self.forward,
            Pass::Backward => &self.backward,
        }
    }

    /// How each sequence's scan is cut into cubes at these dim sizes when the split axis (if
    /// the cell has one) is tiled by `tile` (clamped to the axis; `None`: not tiled): the cubes
    /// per sequence, and the dim sizes inside one cube (the split axis's size set to the tile).
    pub fn tiling(&self, dims: &[usize], tile: Option<usize>) -> (usize, Vec<usize>) {
        let mut in_cube = dims.to_vec();
        match (&self.split, tile) {
            (Some(plan), Some(tile)) => {
                let size = dims[plan.dim.0];
                let tile = tile.min(size).max(1);
                in_cube[plan.dim.0] = tile;
                (size.div_ceil(tile), in_cube)
            }
            _ => (1, in_cube),
        }
    }
}

/// The first dim (in declaration order) along which the cell's scans can be split, with the
/// split of every gradient; `None` if there is none.
pub fn split_plan(step: &BackwardStep) -> Option<SplitPlan> {
    (0..step.cell.dims.len()).find_map(|d| split_along(step, DimId(d)))
}

/// The index variables an expression mentions (loaded at or summed over).
fn index_vars(cell: &Cell, expr: ExprId) -> std::collections::BTreeSet<IndexId> {
    let mut vars = std::collections::BTreeSet::new();
    cell.exprs.walk(expr, &mut |_, node| match node {
        Expr::Load { indices, .. } => vars.extend(indices.iter().copied()),
        Expr::Sum { index, .. } => {
            vars.insert(*index);
        }
        _ => {}
    });
    vars
}

/// The statement's own index over `dim` (`Ok(None)` if it has none); `Err` if it has several,
/// or if the expression mentions another index over `dim` (a `sum` over it) and `allow_sum` is
/// false. The flag says whether the expression sums over `dim`.
fn own_split_index(
    cell: &Cell,
    dim: DimId,
    indices: &[IndexId],
    expr: ExprId,
) -> Result<(Option<IndexId>, bool), ()> {
    let own: Vec<IndexId> = indices
        .iter()
        .copied()
        .filter(|&i| cell.index_dim(i) == dim)
        .collect();
    if own.len() > 1 {
        return Err(());
    }
    let own = own.first().copied();
    let sums_over_dim = index_vars(cell, expr)
        .into_iter()
        .any(|i| cell.index_dim(i) == dim && Some(i) != own);
    Ok((own, sums_over_dim))
}

fn split_along(step: &BackwardStep, dim: DimId) -> Option<SplitPlan> {
    let cell = &step.cell;
    if !cell.states.iter().any(|s| s.shape.contains(&dim)) {
        return None;
    }
    let forward = cell
        .lets
        .iter()
        .map(|l| (&l.indices, l.expr))
        .chain(cell.updates.iter().map(|u| (&u.indices, u.expr)))
        .chain(cell.outputs.iter().map(|o| (&o.indices, o.expr)));
    for (indices, expr) in forward {
        match own_split_index(cell, dim, indices, expr) {
            Ok((_, false)) => {}
            _ => return None,
        }
    }
    let has_dim = |grad: Grad| cell.grad_shape(grad).contains(&dim);
    let mut grads = std::collections::HashMap::new();
    for (o, _) in cell.outputs.iter().enumerate() {
        let grad = Grad::Output(OutputId(o));
        let split = if has_dim(grad) {
            GradSplit::Local
        } else {
            GradSplit::Replicated
        };
        grads.insert(grad, split);
    }
    // The gradient a state without the axis carries from step to step is held as per-tile
    // parts (the host's final-state gradient goes to the first tile, zeros to the others);
    // the analysis below checks that the step keeps it so.
    for (s, state) in cell.states.iter().enumerate() {
        let split = if state.shape.contains(&dim) {
            GradSplit::Local
        } else {
            GradSplit::Partial
        };
        grads.insert(Grad::StateFromNext(StateId(s)), split);
    }
    for definition in &step.definitions {
        let (own, sums_over_dim) =
            own_split_index(cell, dim, &definition.indices, definition.expr).ok()?;
        let mut reads = Vec::new();
        cell.exprs.walk(definition.expr, &mut |_, node| {
            if let Expr::Load {
                value: Value::Grad(grad),
                ..
            } = node
            {
                reads.push(grads.get(grad).copied().unwrap_or(GradSplit::Local));
            }
        });
        let reads_partial = reads.contains(&GradSplit::Partial);
        let split = if own.is_some() {
            if sums_over_dim || reads_partial {
                return None;
            }
            GradSplit::Local
        } else if sums_over_dim || reads_partial {
            if reads.contains(&GradSplit::Replicated) {
                return None;
            }
            GradSplit::Partial
        } else {
            GradSplit::Replicated
        };
        grads.insert(definition.grad, split);
    }
    let sinks = (0..cell.inputs.len())
        .map(|i| Grad::Input(InputId(i)))
        .chain((0..cell.params.len()).map(|p| Grad::Param(ParamId(p))))
        .chain((0..cell.states.len()).map(|s| Grad::StatePrevious(StateId(s))));
    let replicated_sink = sinks
        .into_iter()
        .any(|g| grads.get(&g) == Some(&GradSplit::Replicated));
    (!replicated_sink).then_some(SplitPlan { dim, grads })
}

/// The states whose gradient carried to the step before ([`Grad::StatePrevious`]) the backward
/// step writes over the gradient carried from the step after ([`Grad::StateFromNext`]), one
/// buffer for both, so that the step needs no buffer and no copy for the first. A state
/// qualifies when no definition reads the gradient from the step after from the definition of
/// the one to the step before on; the earlier ones have read it by then, since the write
/// conflicts with their reads and so comes in a later phase ([`definition_phases`]). Every
/// reference cell qualifies: only the state's own gradient, `dS_t = dS_from_next + …`, the
/// first definition, reads it.
pub fn carried_in_place(step: &BackwardStep) -> std::collections::BTreeSet<StateId> {
    let cell = &step.cell;
    (0..cell.states.len())
        .map(StateId)
        .filter(|&state| {
            let carried = Value::Grad(Grad::StateFromNext(state));
            let definitions = &step.definitions;
            let written = definitions
                .iter()
                .position(|d| d.grad == Grad::StatePrevious(state));
            written.is_some_and(|written| {
                let later = &definitions[written..];
                later.iter().all(|d| !cell.reads(&[d.expr], carried))
            })
        })
        .collect()
}

/// The workspace buffer a load of `value` reads, as the backward step's statements name it
/// (before [`laid_out`]); `None` for parameters, which are read from global memory.
pub fn value_buffer(value: Value) -> Option<Buffer> {
    match value {
        Value::Input(i) => Some(Buffer::Input(i)),
        Value::InputPreActivation(i) => Some(Buffer::InputPreActivation(i)),
        Value::Param(_) => None,
        Value::State(s, StateTime::Previous) => Some(Buffer::State(s)),
        Value::State(s, StateTime::Current) => Some(Buffer::NewState(s)),
        Value::Let(l) => Some(Buffer::Let(l)),
        Value::Grad(g) => Some(Buffer::Grad(g)),
    }
}

/// The buffer the backward scan's workspace holds `buffer` in: a gradient carried to the step
/// before is written over the one carried from the step after ([`carried_in_place`]).
pub fn laid_out(buffer: Buffer, carried_in_place: &std::collections::BTreeSet<StateId>) -> Buffer {
    match buffer {
        Buffer::Grad(Grad::StatePrevious(s)) if carried_in_place.contains(&s) => {
            Buffer::Grad(Grad::StateFromNext(s))
        }
        buffer => buffer,
    }
}

/// The backward step's definitions (indices into [`BackwardStep::definitions`]) in phases,
/// in the order the backward scan evaluates them, with a barrier after each phase: a
/// definition goes into the phase after the last phase holding an earlier definition it
/// conflicts with (it reads a buffer that one writes, or writes one that it reads or writes),
/// or into the first. So no two definitions of a phase touch one buffer unless both only read
/// it, and every definition still follows those it depends on. The sums a definition reads
/// count as read and written by it (the first to need a sum computes it into its buffer); the
/// partial sums of a split sum are guarded by barriers of its own.
///
/// SimpleRNN's step: `dS` and the gradient of `q` (reading `do` and `S_t`); then those of `k`,
/// `v`, `g` (reading `dS`), `q`'s before activation (a copy: it has none) and `dS_{t−1}`; then
/// those of `k`, `v`, `g` before activation: 3 phases where a barrier after each of the 10
/// definitions made 10.
pub fn definition_phases(step: &BackwardStep) -> Vec<Vec<usize>> {
    use std::collections::HashSet;
    let cell = &step.cell;
    let carried = carried_in_place(step);
    let classes = sum_classes(step);
    let access: Vec<(HashSet<Buffer>, HashSet<Buffer>)> = step
        .definitions
        .iter()
        .map(|definition| {
            let mut reads = HashSet::new();
            let mut writes = HashSet::new();
            for expr in cell.reachable(&[definition.expr]) {
                match cell.exprs.get(expr) {
                    Expr::Load { value, .. } => {
                        reads.extend(value_buffer(*value).map(|b| laid_out(b, &carried)));
                    }
                    Expr::Sum { .. } => {
                        let class = classes.get(&expr).copied().unwrap_or(expr);
                        reads.insert(Buffer::Sum(class));
                        writes.insert(Buffer::Sum(class));
                    }
                    _ => {}
                }
            }
            writes.insert(laid_out(Buffer::Grad(definition.grad), &carried));
            (reads, writes)
        })
        .collect();
    let conflict = |later: usize, earlier: usize| {
        let (reads, writes) = &access[later];
        let (earlier_reads, earlier_writes) = &access[earlier];
        !reads.is_disjoint(earlier_writes)
            || !writes.is_disjoint(earlier_reads)
            || !writes.is_disjoint(earlier_writes)
    };
    let mut phase_of: Vec<usize> = Vec::with_capacity(access.len());
    for later in 0..access.len() {
        let phase = (0..later)
            .filter(|&earlier| conflict(later, earlier))
            .map(|earlier| phase_of[earlier] + 1)
            .max()
            .unwrap_or(0);
        phase_of.push(phase);
    }
    let phases = phase_of.iter().max().map_or(0, |last| last + 1);
    let mut grouped = vec![Vec::new(); phases];
    for (definition, &phase) in phase_of.iter().enumerate() {
        grouped[phase].push(definition);
    }
    grouped
}

/// The states the forward step updates in place: S_t is written over S_{t−1} in one buffer
/// ([`Buffer::State`]), so the step needs no `NewState` buffer and no copy of the new state over
/// the old one. A state qualifies when its update reads S_{t−1} only at the element it writes
/// (the unit that reads an element is the one that writes it), apart from the sums it
/// materialises first, and no other update or output reads S_{t−1} (a cube's updates run one
/// after the other without barriers between them; the outputs run after them). Lets run
/// before the updates and may read S_{t−1} freely. Every reference cell qualifies; the
/// backward scan, whose step reads S_{t−1} and S_t, keeps both buffers.
pub fn in_place_states(cell: &Cell) -> std::collections::BTreeSet<StateId> {
    // The indices of every load of S_{t−1} of `state` under `expr`; `materialised`: not inside
    // the sums under it (other than `expr` itself), which are computed beforehand.
    let loads = |expr: ExprId, state: StateId, materialised: bool| -> Vec<Vec<IndexId>> {
        state_loads(cell, expr, !materialised)
            .into_iter()
            .filter(|load| load.state == state && load.time == StateTime::Previous)
            .map(|load| load.indices)
            .collect()
    };
    (0..cell.states.len())
        .map(StateId)
        .filter(|&state| {
            let own = cell.updates.iter().all(|update| {
                if update.state == state {
                    loads(update.expr, state, true)
                        .iter()
                        .all(|indices| *indices == update.indices)
                } else {
                    loads(update.expr, state, false).is_empty()
                }
            });
            let outputs = cell
                .outputs
                .iter()
                .all(|output| loads(output.expr, state, false).is_empty());
            own && outputs
        })
        .collect()
}

/// One load of a state in an expression.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateLoad {
    pub state: StateId,
    pub time: StateTime,
    pub indices: Vec<IndexId>,
}

/// The state loads under `expr`. `into_sums`: also those inside the sums under it; else only
/// those outside them (and inside `expr` itself if it is a sum), as a statement sees them when
/// its sums are computed into buffers first.
pub fn state_loads(cell: &Cell, expr: ExprId, into_sums: bool) -> Vec<StateLoad> {
    (loads_where(cell, expr, into_sums, |value| {
        matches!(value, Value::State(..))
    })
    .into_iter())
    .map(|(value, indices)| {
        let Value::State(state, time) = value else {
            unreachable!("only state loads are kept")
        };
        StateLoad {
            state,
            time,
            indices,
        }
    })
    .collect()
}

/// The loads under `expr` of the values `wanted` keeps, with their indices. `into_sums`: also
/// those inside the sums under it; else only those outside them (and inside `expr` itself if
/// it is a sum).
pub fn loads_where(
    cell: &Cell,
    expr: ExprId,
    into_sums: bool,
    wanted: impl Fn(Value) -> bool,
) -> Vec<(Value, Vec<IndexId>)> {
    fn walk(
        cell: &Cell,
        expr: ExprId,
        root: ExprId,
        into_sums: bool,
        wanted: &dyn Fn(Value) -> bool,
        found: &mut Vec<(Value, Vec<IndexId>)>,
    ) {
        match cell.exprs.get(expr) {
            Expr::Const(_) => {}
            Expr::Load { value, indices } => {
                if wanted(*value) {
                    found.push((*value, indices.clone()));
                }
            }
            Expr::Unary(_, a) => walk(cell, *a, root, into_sums, wanted, found),
            Expr::Binary(_, a, b) => {
                walk(cell, *a, root, into_sums, wanted, found);
                walk(cell, *b, root, into_sums, wanted, found);
            }
            Expr::Sum { .. } if !into_sums && expr != root => {}
            Expr::Sum { body, .. } => walk(cell, *body, root, into_sums, wanted, found),
        }
    }
    let mut found = Vec::new();
    walk(cell, expr, expr, into_sums, &wanted, &mut found);
    found
}

/// The state loads of a statement's expression (or of a sum), with their indices: under `expr`,
/// not descending into the sums inside it (computed into buffers first).
pub fn direct_state_loads(cell: &Cell, expr: ExprId) -> Vec<(StateId, Vec<IndexId>)> {
    (state_loads(cell, expr, false).into_iter())
        .map(|load| (load.state, load.indices))
        .collect()
}

/// The states the forward scan may hold in registers ([`Schedule::registers`]): each unit keeps
/// its elements of the state from step to step, so that neither the update nor the sums that
/// read the state go through the workspace. Unit `u` holds the elements `u + m · lanes` (slot
/// `m`), where `lanes = parts × n`, `n` the elements of the state past its first axis and
/// `parts` the units that share each sum over the first axis (as in a split sum, see
/// [`Schedule::sum_parts`]); the `m`-th term of such a sum, `S[part + m · parts, f]`, is then
/// the unit's own slot `m`.
///
/// A state qualifies when it is updated in place ([`in_place_states`]) by a statement that is
/// not itself a `sum`, and every other read of it, in any let, update or output, is a load
/// inside a `sum` over its first axis whose indices are the summed index followed by the
/// indices of the elements the sum computes, in order (`Σ_i q[i] · S[i, j]` computing `o[j]`),
/// with no other state loaded by that sum. SimpleRNN's, GLA's, RetNet's, Mamba2's and DeltaNet's
/// states qualify, and mLSTM's `C` and `n`; Elman's `h` (`Σ_j R[i, j] · h[j]`) and mLSTM's
/// `m` (read element-wise by the lets) do not. A launch holds them in registers when every one
/// has at least one part ([`split_sum_parts`]: `n ≤ cube_dim`); else in the workspace
/// ([`Schedule::holds_states_in_registers`]).
pub fn register_states(cell: &Cell) -> std::collections::BTreeSet<StateId> {
    let loads = |expr: ExprId| direct_state_loads(cell, expr);
    let mut eligible = in_place_states(cell);
    let statements = (cell.lets.iter().map(|l| (&l.indices, l.expr, None)))
        .chain(
            cell.updates
                .iter()
                .map(|u| (&u.indices, u.expr, Some(u.state))),
        )
        .chain(cell.outputs.iter().map(|o| (&o.indices, o.expr, None)));
    for (indices, expr, updated) in statements {
        let root_is_sum = matches!(cell.exprs.get(expr), Expr::Sum { .. });
        if let Some(state) = updated
            && root_is_sum
        {
            eligible.remove(&state);
        }
        // Outside sums: only the state's own update, at the element it writes.
        if !root_is_sum {
            for (state, at) in loads(expr) {
                if updated != Some(state) || at != *indices {
                    eligible.remove(&state);
                }
            }
        }
        for sum in cell.sums_under(&[expr]) {
            let &Expr::Sum { index, .. } = cell.exprs.get(sum) else {
                continue;
            };
            // The elements the sum computes: the statement's, or (materialised) its free
            // indices in id order.
            let elements: Vec<IndexId> = if sum == expr {
                indices.clone()
            } else {
                cell.free_indices(sum).into_iter().collect()
            };
            let mut aligned = vec![index];
            aligned.extend(elements);
            let found = loads(sum);
            let one_state = found.iter().all(|(s, _)| *s == found[0].0);
            for (state, at) in found.iter() {
                if !one_state || *at != aligned {
                    eligible.remove(state);
                }
            }
        }
    }
    eligible
}

/// The states the backward scan's recomputation holds in registers (where the launch asks for
/// it, [`Schedule::recompute_registers`]): those updated in place ([`in_place_states`]) that no
/// let and no update reads except the state's own update, element-wise at the element it
/// writes, outside any `sum`. The recomputation evaluates only the lets and the updates, and
/// writes every state to the chunk's slots: held so, a state never goes through the workspace
/// between its checkpoint and the end of the recomputation. Unit `u` holds the elements
/// `u + m · lanes` as in the forward scan ([`register_states`]), with as many units per
/// position along the first axis as the cube has for it (no sum constrains the layout):
/// `lanes = parts × n`, `parts = min(cube_dim / n, first axis)`. SimpleRNN's, GLA's, RetNet's
/// and Mamba2's states qualify, and mLSTM's `C` and `n`; DeltaNet's `S` (its update sums over
/// the state) and mLSTM's `m` (read by the lets) do not.
pub fn recomputed_register_states(cell: &Cell) -> std::collections::BTreeSet<StateId> {
    let mut eligible = in_place_states(cell);
    let statements = (cell.lets.iter().map(|l| (&l.indices, l.expr, None))).chain(
        cell.updates
            .iter()
            .map(|u| (&u.indices, u.expr, Some(u.state))),
    );
    for (indices, expr, updated) in statements {
        for load in state_loads(cell, expr, false) {
            let own = updated == Some(load.state) && load.indices == *indices;
            if !own || matches!(cell.exprs.get(expr), Expr::Sum { .. }) {
                eligible.remove(&load.state);
            }
        }
        for sum in cell.sums_under(&[expr]) {
            for load in state_loads(cell, sum, true) {
                eligible.remove(&load.state);
            }
        }
    }
    eligible
}

/// The states whose gradient the backward scan's walk carries from step to step in registers
/// (where the launch asks for it, [`Schedule::walk_registers`]). Each unit holds its elements of
/// `dS` as the recomputation holds the state ([`recomputed_register_states`]: element
/// `u + m · lanes` in slot `m`, as many units per position along the first axis as the cube
/// has): the gradient from the step after (`dS_next`) is read from the slot, `dS` is computed
/// into it, and `dS_{t−1}` over it, without going through the workspace; `dS` is also written to
/// its workspace buffer for the reads the slots do not serve. Sums over the first axis that
/// read `dS` at the slot's element (SimpleRNN's `dv[j] = Σ_i dS[i, j] · k[i]`) add up the
/// unit's own slots, split as the layout splits that axis.
///
/// A state qualifies when its carried gradient is written over the one carried from the step
/// after ([`carried_in_place`]), every gradient of it is local to a cube's tile (not a
/// per-tile part, see [`SplitPlan`]), `dS` and `dS_{t−1}` are defined element-wise (not by a
/// `sum`), `dS_next` is read only by the definition of `dS`, at the element it defines and
/// outside sums, `dS_{t−1}` is read by no definition, `dS_{t−1}` reads `dS` outside sums only
/// at the element it defines, and no sum that reads `dS` comes after the definition of
/// `dS_{t−1}` (which overwrites the slots; other reads of `dS` go to its workspace buffer).
/// SimpleRNN's, GLA's, RetNet's, Mamba2's and DeltaNet's states qualify; not Elman's
/// (`dh_{t−1}` is a sum) nor mLSTM's (the gradients of `n` and `m` are per-tile parts, and
/// `dC_{t−1}` comes before the sums that read `dC`).
pub fn carried_register_grads(step: &BackwardStep) -> std::collections::BTreeSet<StateId> {
    let cell = &step.cell;
    let split = split_plan(step);
    let order: Vec<usize> = definition_phases(step).into_iter().flatten().collect();
    let position = |grad: Grad| (order.iter()).position(|&d| step.definitions[d].grad == grad);
    let is_sum = |expr: ExprId| matches!(cell.exprs.get(expr), Expr::Sum { .. });
    let loads = |expr: ExprId, into_sums: bool, value: Value| -> Vec<Vec<IndexId>> {
        (loads_where(cell, expr, into_sums, |v| v == value).into_iter())
            .map(|(_, indices)| indices)
            .collect()
    };
    (carried_in_place(step).into_iter())
        .filter(|&state| {
            let grads = [
                Grad::StateFromNext(state),
                Grad::State(state),
                Grad::StatePrevious(state),
            ];
            let local = split
                .as_ref()
                .is_none_or(|plan| grads.iter().all(|&g| plan.grad(g) == GradSplit::Local));
            let (Some(total), Some(previous)) = (
                step.definition(Grad::State(state)),
                step.definition(Grad::StatePrevious(state)),
            ) else {
                return false;
            };
            let Some(previous_at) = position(previous.grad).filter(|_| local) else {
                return false;
            };
            let [from_next, total_value, previous_value] = grads.map(Value::Grad);
            let shape_of = |indices: &[IndexId]| -> Shape {
                indices.iter().map(|&i| cell.index_dim(i)).collect()
            };
            let state_shape = &cell.states[state.0].shape;
            let elementwise = !is_sum(total.expr)
                && !is_sum(previous.expr)
                && shape_of(&total.indices) == *state_shape
                && shape_of(&previous.indices) == *state_shape;
            let reads_ok = step.definitions.iter().all(|definition| {
                // Every load of `value` at the element `definition` defines, none in a sum.
                let only_at_own_element = |value| {
                    let everywhere = loads(definition.expr, true, value);
                    everywhere
                        .iter()
                        .all(|indices| *indices == definition.indices)
                        && everywhere.len() == loads(definition.expr, false, value).len()
                };
                let from_next_ok = if definition.grad == total.grad {
                    only_at_own_element(from_next)
                } else {
                    loads(definition.expr, true, from_next).is_empty()
                };
                let previous_ok = loads(definition.expr, true, previous_value).is_empty();
                let total_ok = if definition.grad == previous.grad {
                    (loads(definition.expr, false, total_value).iter())
                        .all(|indices| *indices == previous.indices)
                } else {
                    let in_sums = (cell.sums_under(&[definition.expr]).into_iter())
                        .any(|sum| cell.reads(&[sum], total_value));
                    !in_sums || position(definition.grad).is_some_and(|at| at < previous_at)
                };
                from_next_ok && previous_ok && total_ok
            });
            elementwise && reads_ok
        })
        .collect()
}

/// The units that share each element of a split sum ([`Schedule::sum_parts`]) of `elements`
/// elements (in one cube), each the sum of `terms` terms, under a launch's `cube_dim` and
/// `sum_parts`: as many as `sum_parts`, the units and the terms allow. The kernels evaluate
/// this at compile time. For a state held in registers ([`register_states`]), the sums over its
/// first axis (`terms` values; `elements` past it) are split so; 0 parts: the launch cannot
/// hold the state in registers (its elements past the first axis outnumber the units).
pub fn split_sum_parts(cube_dim: usize, sum_parts: usize, terms: usize, elements: usize) -> usize {
    sum_parts.min(cube_dim / elements.max(1)).min(terms)
}

impl Schedule {
    /// Whether the forward scan, launched with this schedule (resolved: its tile set) at these
    /// dim sizes, holds the states that allow it in registers ([`register_states`]).
    pub fn holds_states_in_registers(
        &self,
        compiled: &crate::CompiledCell,
        dims: &[usize],
    ) -> bool {
        let held = register_states(&compiled.backward.cell);
        self.registers && self.fits_registers(compiled, dims, &held, self.sum_parts)
    }

    /// Whether the backward scan's recomputation, launched with this schedule (resolved for
    /// the backward scan) at these dim sizes, holds the states that allow it in registers
    /// ([`recomputed_register_states`]).
    pub fn recomputes_in_registers(&self, compiled: &crate::CompiledCell, dims: &[usize]) -> bool {
        let held = recomputed_register_states(&compiled.backward.cell);
        let units = self.cube_dim as usize;
        self.recompute_registers && self.fits_registers(compiled, dims, &held, units)
    }

    /// Whether the backward scan's walk, launched with this schedule (resolved for the backward
    /// scan) at these dim sizes, carries the state gradients that allow it in registers
    /// ([`carried_register_grads`]).
    pub fn walks_in_registers(&self, compiled: &crate::CompiledCell, dims: &[usize]) -> bool {
        let held = carried_register_grads(&compiled.backward);
        let units = self.cube_dim as usize;
        self.walk_registers && self.fits_registers(compiled, dims, &held, units)
    }

    /// Whether `held` is not empty and each of its states has at least one unit per position
    /// along its first axis ([`split_sum_parts`] under `sum_parts`) at these dim sizes.
    fn fits_registers(
        &self,
        compiled: &crate::CompiledCell,
        dims: &[usize],
        held: &std::collections::BTreeSet<StateId>,
        sum_parts: usize,
    ) -> bool {
        let cell = &compiled.backward.cell;
        let (_, local) = compiled.plan.tiling(dims, self.tile);
        !held.is_empty()
            && held.iter().all(|state| {
                let shape = &cell.states[state.0].shape;
                let (first, rest) = match shape.split_first() {
                    Some((first, rest)) => (local[first.0], Cell::numel(&rest.to_vec(), &local)),
                    None => (1, 1),
                };
                split_sum_parts(self.cube_dim as usize, sum_parts, first, rest) >= 1
            })
    }
}

/// One buffer of a cube's workspace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Buffer {
    /// An input after its activation.
    Input(InputId),
    /// An input before its activation (backward only).
    InputPreActivation(InputId),
    /// S_{t−1} (then, after the step, S_t; during the forward step of a state updated in place,
    /// see [`in_place_states`], S_{t−1} then S_t element by element).
    State(StateId),
    /// S_t while the step computes it (not in the forward workspace of a state updated in
    /// place).
    NewState(StateId),
    Let(LetId),
    Grad(Grad),
    /// The running sum over time of a parameter's gradient (backward only).
    ParamGradSum(ParamId),
    /// The states S_{t0} .. S_{t0+C} of the chunk being differentiated (backward only).
    ChunkStates,
    /// A materialised `sum` (the representative of its class, see [`sum_classes`]), indexed by
    /// its free indices in id order.
    Sum(ExprId),
    /// The partial sums of a `sum` split among units ([`Schedule::sum_parts`]): one element
    /// per unit, reused by every split sum of the step ([`WorkspaceLayout::sum_parts_size`]).
    SumParts,
}

/// The materialised sums that are the same up to renaming of their index variables (autodiff
/// renames copies of forward sums), mapped to one representative each: the smallest id of the
/// class. Two sums are the same if their canonical forms ([`canonical_form`]) are equal.
pub fn sum_classes(step: &BackwardStep) -> std::collections::HashMap<ExprId, ExprId> {
    let cell = &step.cell;
    let mut roots = step_roots(step, Pass::Forward);
    roots.extend(step_roots(step, Pass::Backward));
    let mut first: std::collections::HashMap<String, ExprId> = Default::default();
    let mut classes = std::collections::HashMap::new();
    let mut sums = cell.sums_under(&roots);
    sums.sort();
    for sum in sums {
        let representative = *first.entry(canonical_form(cell, sum)).or_insert(sum);
        classes.insert(sum, representative);
    }
    classes
}

/// An expression written with its free indices named by position (in id order, with their
/// dims) and its bound indices by nesting depth: equal forms compute the same values, element
/// for element, with free indices matched by position.
pub fn canonical_form(cell: &Cell, expr: ExprId) -> String {
    fn write(
        cell: &Cell,
        expr: ExprId,
        names: &mut std::collections::HashMap<IndexId, String>,
        depth: usize,
        out: &mut String,
    ) {
        use std::fmt::Write;
        match cell.exprs.get(expr) {
            Expr::Const(Constant(c)) => {
                let _ = write!(out, "c{:x}", c.to_bits());
            }
            Expr::Load { value, indices } => {
                let indices: Vec<&str> = indices
                    .iter()
                    .map(|i| names.get(i).map_or("?", String::as_str))
                    .collect();
                let _ = write!(out, "{value:?}[{}]", indices.join(","));
            }
            Expr::Unary(op, a) => {
                let _ = write!(out, "{op:?}(");
                write(cell, *a, names, depth, out);
                out.push(')');
            }
            Expr::Binary(op, a, b) => {
                let _ = write!(out, "{op:?}(");
                write(cell, *a, names, depth, out);
                out.push(',');
                write(cell, *b, names, depth, out);
                out.push(')');
            }
            Expr::Sum { index, body } => {
                let previous = names.insert(*index, format!("b{depth}"));
                let _ = write!(out, "sum[b{depth}:{:?}](", cell.index_dim(*index));
                write(cell, *body, names, depth + 1, out);
                out.push(')');
                match previous {
                    Some(name) => names.insert(*index, name),
                    None => names.remove(index),
                };
            }
        }
    }
    let mut names = std::collections::HashMap::new();
    for (position, index) in cell.free_indices(expr).into_iter().enumerate() {
        names.insert(index, format!("f{position}:{:?}", cell.index_dim(index)));
    }
    let mut out = String::new();
    write(cell, expr, &mut names, 0, &mut out);
    out
}

/// The statements a pass evaluates in each step, whose `sum`s it materialises.
pub fn step_roots(step: &BackwardStep, pass: Pass) -> Vec<ExprId> {
    let cell = &step.cell;
    let mut roots: Vec<ExprId> = cell.lets.iter().map(|l| l.expr).collect();
    roots.extend(cell.updates.iter().map(|u| u.expr));
    match pass {
        Pass::Forward => roots.extend(cell.outputs.iter().map(|o| o.expr)),
        Pass::Backward => roots.extend(step.definitions.iter().map(|d| d.expr)),
    }
    roots
}

/// Which scan a workspace serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    Forward,
    Backward,
}

/// The buffers of one cube's workspace, in order.
#[derive(Clone, Debug)]
pub struct WorkspaceLayout {
    pub buffers: Vec<Buffer>,
    pub pass: Pass,
    /// Whether the walk may split sums over the state gradients it carries in registers
    /// ([`carried_register_grads`]), whatever `sum_parts` says (the backward pass of a cell
    /// that has such gradients).
    pub walk_splits_sums: bool,
}

impl WorkspaceLayout {
    pub fn new(step: &BackwardStep, pass: Pass) -> Self {
        let cell = &step.cell;
        let roots = step_roots(step, pass);
        let mut buffers = Vec::new();
        for id in 0..cell.inputs.len() {
            // Only where the backward step reads it: the derivatives of the activations that
            // are functions of their result (sigmoid, tanh, exp) and inputs without one do not.
            if cell.reads(&roots, Value::InputPreActivation(InputId(id))) {
                buffers.push(Buffer::InputPreActivation(InputId(id)));
            }
            buffers.push(Buffer::Input(InputId(id)));
        }
        let in_place = match pass {
            Pass::Forward => in_place_states(cell),
            Pass::Backward => Default::default(),
        };
        for id in 0..cell.states.len() {
            buffers.push(Buffer::State(StateId(id)));
            if !in_place.contains(&StateId(id)) {
                buffers.push(Buffer::NewState(StateId(id)));
            }
        }
        buffers.extend((0..cell.lets.len()).map(|l| Buffer::Let(LetId(l))));
        if pass == Pass::Backward {
            for id in 0..cell.outputs.len() {
                buffers.push(Buffer::Grad(Grad::Output(OutputId(id))));
            }
            for id in 0..cell.states.len() {
                buffers.push(Buffer::Grad(Grad::StateFromNext(StateId(id))));
            }
            // The gradients carried to the step before are written over those carried from
            // the step after where that is safe (`carried_in_place`).
            let carried = carried_in_place(step);
            buffers.extend(step.definitions.iter().filter_map(|d| match d.grad {
                Grad::StatePrevious(state) if carried.contains(&state) => None,
                grad => Some(Buffer::Grad(grad)),
            }));
            buffers.extend((0..cell.params.len()).map(|p| Buffer::ParamGradSum(ParamId(p))));
        }
        let sums = cell.sums_under(&roots);
        if !sums.is_empty() {
            buffers.push(Buffer::SumParts);
        }
        buffers.extend(sums.into_iter().map(Buffer::Sum));
        // Last, so that the per-step buffers before it can move to shared memory together.
        if pass == Pass::Backward {
            buffers.push(Buffer::ChunkStates);
        }
        let walk_splits_sums = pass == Pass::Backward && !carried_register_grads(step).is_empty();
        WorkspaceLayout {
            buffers,
            pass,
            walk_splits_sums,
        }
    }

    /// The dims whose product is the buffer's size (for `ChunkStates`, which holds every state
    /// once per chunk slot, before the slot count: see [`Self::chunk_states_size`]; none for
    /// `SumParts`, whose size depends on the schedule only).
    pub fn shapes(cell: &Cell, buffer: Buffer) -> Vec<Shape> {
        match buffer {
            Buffer::Input(i) | Buffer::InputPreActivation(i) => {
                vec![cell.inputs[i.0].shape.clone()]
            }
            Buffer::State(s) | Buffer::NewState(s) => vec![cell.states[s.0].shape.clone()],
            Buffer::Let(l) => vec![cell.lets[l.0].shape.clone()],
            Buffer::Grad(g) => vec![cell.grad_shape(g).clone()],
            Buffer::ParamGradSum(p) => vec![cell.params[p.0].shape.clone()],
            Buffer::ChunkStates => cell.states.iter().map(|s| s.shape.clone()).collect(),
            Buffer::SumParts => Vec::new(),
            Buffer::Sum(expr) => vec![
                cell.free_indices(expr)
                    .iter()
                    .map(|&i| cell.index_dim(i))
                    .collect(),
            ],
        }
    }

    /// How many copies of its shapes a buffer holds: C + 1 for the chunk's states, `stage` for
    /// the forward scan's inputs (the inputs of a block of steps are loaded at once), else 1.
    pub fn copies(&self, buffer: Buffer, chunk: usize, stage: usize) -> usize {
        match buffer {
            Buffer::ChunkStates => chunk + 1,
            Buffer::Input(_) if self.pass == Pass::Forward => stage,
            _ => 1,
        }
    }

    /// Elements of f32 one cube needs, for the given dim sizes (the split axis, if any, at its
    /// tile size) and schedule.
    pub fn size(&self, cell: &Cell, dims: &[usize], schedule: &Schedule) -> usize {
        self.step_size(cell, dims, schedule) + self.chunk_states_size(cell, dims, schedule)
    }

    /// Elements of the per-step buffers (all but the chunk's states).
    pub fn step_size(&self, cell: &Cell, dims: &[usize], schedule: &Schedule) -> usize {
        self.sizes(cell, dims, schedule, |b| b != Buffer::ChunkStates)
    }

    /// Elements of the chunk's recomputed states (backward only).
    pub fn chunk_states_size(&self, cell: &Cell, dims: &[usize], schedule: &Schedule) -> usize {
        self.sizes(cell, dims, schedule, |b| b == Buffer::ChunkStates)
    }

    /// Elements of the buffer of partial sums ([`Buffer::SumParts`]): one per unit where sums
    /// are split (`sum_parts` above 1, or the walk carrying gradients in registers), else none.
    pub fn sum_parts_size(&self, schedule: &Schedule) -> usize {
        if schedule.sum_parts > 1 || (self.walk_splits_sums && schedule.walk_registers) {
            schedule.cube_dim as usize
        } else {
            0
        }
    }

    fn sizes(
        &self,
        cell: &Cell,
        dims: &[usize],
        schedule: &Schedule,
        keep: impl Fn(Buffer) -> bool,
    ) -> usize {
        self.buffers
            .iter()
            .filter(|&&b| keep(b))
            .map(|&b| {
                if b == Buffer::SumParts {
                    return self.sum_parts_size(schedule);
                }
                let elements: usize = Self::shapes(cell, b)
                    .iter()
                    .map(|s| Cell::numel(s, dims))
                    .sum();
                elements * self.copies(b, schedule.chunk, schedule.stage)
            })
            .sum()
    }
}

/// How a scan over a sequence runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanKind {
    /// The fused recurrent kernels: one step after the other inside one launch.
    Recurrent,
    /// The cell's chunked form ([`crate::chunkwise`]): matrix products within and across chunks.
    Chunked,
}

/// Sequences shorter than this many chunks run recurrent even when the cell has a chunked form.
pub const CHUNKED_MIN_CHUNKS: usize = 4;

/// The scan for a sequence of `time` steps in chunks of `chunk` steps: chunked when the cell has
/// a chunked form (`chunkable`) and the sequence spans at least [`CHUNKED_MIN_CHUNKS`] chunks,
/// so that the matrix products carry the work; recurrent otherwise (short sequences, single
/// decoding steps, cells without a chunked form). The threshold is a starting point; GPU
/// measurements of both scans side by side are what should set it.
pub fn pick_scan(chunkable: bool, time: usize, chunk: usize) -> ScanKind {
    if chunkable && time >= CHUNKED_MIN_CHUNKS * chunk.max(1) {
        ScanKind::Chunked
    } else {
        ScanKind::Recurrent
    }
}
