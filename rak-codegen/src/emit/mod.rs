//! Emit pass: a cell's IR and backward step → cubecl `#[cube]` kernels, as Rust tokens.
//!
//! Three kernels and their host launchers per cell, following [`crate::schedule`]:
//!
//! - `forward`: one cube per sequence (batch element × head) and tile of the split axis runs
//!   the time loop; per step it activates the inputs, computes the lets, the updates and the
//!   outputs, one statement at a time, each statement's elements shared among the cube's
//!   units; optional initial states; final states; a checkpoint of the states every `chunk`
//!   steps when asked.
//! - `step`: one step of every stream for streaming inference, states read and written in
//!   place (the forward scan's step, between a load and a store of the states).
//! - `backward`: the same cubes walk the chunks in reverse, recompute the chunk's states from
//!   its checkpoint, then run the backward step ([`crate::ir::BackwardStep`]) for each step in
//!   reverse. It writes the gradients of the inputs (before activation) and of the initial
//!   states, and each sequence's and tile's sum over time of the parameter gradients; gradients
//!   held as per-tile parts go to f32 buffers (the host sums those over tiles and batch in a
//!   second pass: no atomics, bitwise reproducible).
//!
//! Inside a cube, an index over the split axis counts from `tile_start`; workspace buffers are
//! `tile` long along it and global arrays are addressed with `tile_start + index`; values past
//! the end of the axis (the last tile of an axis that `tile` does not divide) are skipped.
//! Workspace accesses go to `shared` or to the cube's part of `workspace` depending on the
//! comptime flag `shared_workspace`. The comptime flag `series_near_zero` writes `tanh` and
//! `log(1 + x)` as their series near 0, for backends (Vulkan) that are accurate there only in
//! absolute terms (`expr`).
//!
//! Kernels are generic over the element type `F` of inputs, parameters and outputs; states,
//! intermediates and accumulations are f32. Every sub-expression becomes one `let`; a `sum`
//! becomes a loop, split among units when its statement has fewer elements than the cube has
//! units (comptime `cube_dim` and `sum_parts`); identical sub-expressions are computed once
//! where their indices allow.
//!
//! The code is split by what it emits: `forward` and `backward` hold the kernels' outlines
//! and `launchers` their host side; `statements` a step's lets, updates and sums,
//! `expr` the expressions inside them, `registers` the states held in registers;
//! `elements` the loops sharing a statement's elements among units, `copies` the copies
//! between arguments, workspace and state slots, `indexing` the index arithmetic. This module
//! holds the `Emitter` and what every part uses: dims, buffers, workspace offsets, the
//! kernel prelude.

use crate::CompiledCell;
use crate::ir::*;
use crate::schedule::{Buffer, GradSplit, Pass, ScanPlan, WorkspaceLayout};
use proc_macro2::{Ident, Literal, Span, TokenStream};
use quote::{format_ident, quote};
use std::collections::{BTreeSet, HashMap, HashSet};

mod backward;
mod copies;
mod elements;
mod expr;
mod forward;
mod indexing;
mod launchers;
mod registers;
mod statements;

use copies::{Place, Prefetch, Transfer};
use elements::{ElementValue, StridedElements};
use expr::ExprEmitter;
use registers::{HeldInRegisters, choose_registers, registers_or_workspace};
use statements::SumStatement;

/// The kernels and launchers of a cell, as items for a module that has
/// `use cubecl::prelude::*;` in scope. The split axis and the workspace layouts come from the
/// cell's [`ScanPlan`] (`compiled.plan`), the same the host reads at every launch.
pub fn emit_kernels(compiled: &CompiledCell) -> TokenStream {
    let forward_pass = Emitter::new(compiled, Pass::Forward);
    let backward_pass = Emitter::new(compiled, Pass::Backward);
    let forward = forward_pass.forward_kernel();
    let backward = backward_pass.backward_kernel();
    let step = forward_pass.step_kernel();
    let launchers = forward_pass.launchers();
    quote! {
        #forward
        #backward
        #step
        #launchers
    }
}

/// The kernels as formatted Rust source (what `rak emit --target rust` prints).
pub fn kernels_source(compiled: &CompiledCell) -> String {
    let tokens = emit_kernels(compiled);
    match syn::parse2::<syn::File>(tokens.clone()) {
        Ok(file) => prettyplease::unparse(&file),
        Err(_) => tokens.to_string(),
    }
}

#[derive(Clone)]
struct Emitter<'a> {
    step: &'a BackwardStep,
    cell: &'a Cell,
    /// Each materialised sum's class representative (see [`crate::schedule::sum_classes`]).
    sum_classes: HashMap<ExprId, ExprId>,
    /// The cell's split axis and workspace layouts. The axis split across cubes, if any, has
    /// `tile` values inside a cube, from `tile_start`.
    plan: &'a ScanPlan,
    /// The states whose new values overwrite the old ones in place, in the forward pass (see
    /// [`crate::schedule::in_place_states`]): there, `NewState` is `State`.
    in_place: BTreeSet<StateId>,
    /// The states whose gradient carried to the step before is written over the one carried
    /// from the step after, in the backward pass (see [`crate::schedule::carried_in_place`]):
    /// there, `Grad::StatePrevious` is `Grad::StateFromNext`.
    carried_in_place: BTreeSet<StateId>,
    /// The states the code being emitted holds in registers (the forward scan's register step,
    /// see [`crate::schedule::register_states`]); empty elsewhere.
    registers: BTreeSet<StateId>,
    /// The states whose gradient the code being emitted carries in registers (the backward
    /// walk's, see [`crate::schedule::carried_register_grads`]); empty elsewhere.
    carried_registers: BTreeSet<StateId>,
    /// Whether the loops over the slots of states held in registers ([`Emitter::slot_loop`])
    /// decide their bounds tests at compile time where they always hold: in the backward
    /// scan's recomputation, where NVVM proved neither test, and the values of the register
    /// arrays, as it saw them, flowed around the chunk loop and stayed live through the walk
    /// (compiled for the H100, SimpleRNN's backward kernel went from 253 to 168 registers and
    /// its walk's step from 1,142 to 1,367 instructions; with the tests decided, 232 and
    /// 1,017). Not in the forward scan, whose time loop got slower so (950 → 1,155
    /// instructions for SimpleRNN at tile 16), NVVM proving the tests of all slots but the
    /// last by itself there.
    slot_bounds_at_compile_time: bool,
}

/// How many of `numel` elements (a comptime expression) each of the cube's units takes when
/// they are dealt out in turn: ⌈numel / units⌉.
fn per_unit(numel: &TokenStream) -> TokenStream {
    quote!(((#numel + units - 1) / units))
}

fn ident(name: &str) -> Ident {
    Ident::new(name, Span::call_site())
}

fn float(value: f64) -> TokenStream {
    let value = value as f32;
    if value.is_nan() {
        quote!((0f32 / 0f32))
    } else if value.is_infinite() {
        if value > 0.0 {
            quote!((1f32 / 0f32))
        } else {
            quote!((-1f32 / 0f32))
        }
    } else if value < 0.0 {
        let magnitude = Literal::f32_suffixed(-value);
        quote!((-#magnitude))
    } else {
        let literal = Literal::f32_suffixed(value);
        quote!(#literal)
    }
}

impl<'a> Emitter<'a> {
    /// The emitter of the kernels of one pass (forward: the forward and step kernels).
    fn new(compiled: &'a CompiledCell, pass: Pass) -> Self {
        let step = &compiled.backward;
        Emitter {
            step,
            cell: &step.cell,
            sum_classes: crate::schedule::sum_classes(step),
            plan: &compiled.plan,
            in_place: match pass {
                Pass::Forward => crate::schedule::in_place_states(&step.cell),
                Pass::Backward => BTreeSet::new(),
            },
            carried_in_place: match pass {
                Pass::Forward => BTreeSet::new(),
                Pass::Backward => crate::schedule::carried_in_place(step),
            },
            registers: BTreeSet::new(),
            carried_registers: BTreeSet::new(),
            slot_bounds_at_compile_time: false,
        }
    }

    /// Every state of the cell.
    fn states(&self) -> Vec<StateId> {
        (0..self.cell.states.len()).map(StateId).collect()
    }

    fn dim(&self, dim: DimId) -> Ident {
        format_ident!("dim_{}", self.cell.dims[dim.0].name)
    }

    fn is_split(&self, dim: DimId) -> bool {
        self.plan.split.as_ref().is_some_and(|plan| plan.dim == dim)
    }

    /// The values of a dim inside one cube: `tile` for the split axis, else the dim.
    fn extent(&self, dim: DimId) -> Ident {
        if self.is_split(dim) {
            ident("tile")
        } else {
            self.dim(dim)
        }
    }

    fn product(mut factors: impl Iterator<Item = Ident>) -> TokenStream {
        match factors.next() {
            None => quote!(1usize),
            Some(first) => {
                let product = factors.fold(quote!(#first), |product, dim| quote!(#product * #dim));
                quote!((#product))
            }
        }
    }

    /// `(dim_K * dim_V)`, or `1usize` for a scalar: the elements of a value in global memory.
    fn shape_numel(&self, shape: &Shape) -> TokenStream {
        Self::product(shape.iter().map(|&d| self.dim(d)))
    }

    /// `(dim_K * tile)`: the elements of a value in one cube's workspace.
    fn local_numel(&self, shape: &Shape) -> TokenStream {
        Self::product(shape.iter().map(|&d| self.extent(d)))
    }

    /// How a gradient is held across tiles (`Local` when nothing is split).
    fn grad_split(&self, grad: Grad) -> GradSplit {
        self.plan
            .split
            .as_ref()
            .map_or(GradSplit::Local, |plan| plan.grad(grad))
    }

    /// A read of the per-step workspace (shared memory or the cube's global workspace).
    fn step_read(&self, at: &TokenStream, index: TokenStream) -> TokenStream {
        quote! {
            if comptime![shared_workspace] {
                shared[#at + #index]
            } else {
                workspace[base + #at + #index]
            }
        }
    }

    /// A write to the per-step workspace.
    fn step_write(&self, at: &TokenStream, index: TokenStream, value: TokenStream) -> TokenStream {
        quote! {
            if comptime![shared_workspace] {
                shared[#at + #index] = #value;
            } else {
                workspace[base + #at + #index] = #value;
            }
        }
    }

    /// Last in every kernel: the check of the loop budget of Mesa's software Vulkan driver,
    /// which allows one invocation 65,535 loop iterations over all its loops and past that
    /// ends every loop after its current pass, silently. A loop of two passes, its count hidden
    /// from the compiler (a `select` on the workspace's runtime length, so that it is not
    /// unrolled), completes only while the budget lasts; where it did not, the unit marks the
    /// workspace's last element, which the host reserves and, on wgpu, reads back
    /// (`rak_runtime::kernels`). Elsewhere it costs two loop passes.
    fn loop_budget_check(&self) -> TokenStream {
        quote! {
            let budget_passes = select(workspace.len() < 2usize, workspace.len(), 2usize);
            let mut passes = 0usize;
            for _ in 0..budget_passes {
                passes += 1usize;
            }
            if passes < budget_passes {
                workspace[workspace.len() - 1] = 1f32;
            }
        }
    }

    /// A barrier that makes the cube's writes to its workspace visible to its units.
    fn barrier(&self) -> TokenStream {
        quote! {
            if comptime![shared_workspace] {
                sync_cube();
            } else {
                sync_storage();
            }
        }
    }

    fn buffer_name(&self, buffer: Buffer) -> Ident {
        let cell = self.cell;
        match buffer {
            Buffer::Input(i) => format_ident!("at_input_{}", cell.inputs[i.0].name),
            Buffer::InputPreActivation(i) => {
                format_ident!("at_input_pre_{}", cell.inputs[i.0].name)
            }
            Buffer::State(s) => format_ident!("at_state_{}", cell.states[s.0].name),
            Buffer::NewState(s) => format_ident!("at_new_state_{}", cell.states[s.0].name),
            Buffer::Let(l) => format_ident!("at_let_{}", cell.lets[l.0].name),
            Buffer::ParamGradSum(p) => format_ident!("at_param_grad_sum_{}", cell.params[p.0].name),
            Buffer::ChunkStates => ident("at_chunk_states"),
            Buffer::Sum(expr) => format_ident!("at_sum_{}", expr.0),
            Buffer::SumParts => ident("at_sum_parts"),
            Buffer::Grad(grad) => {
                let (kind, name) = match grad {
                    Grad::Output(o) => ("output", &cell.outputs[o.0].name),
                    Grad::StateFromNext(s) => ("state_from_next", &cell.states[s.0].name),
                    Grad::State(s) => ("state", &cell.states[s.0].name),
                    Grad::Let(l) => ("let", &cell.lets[l.0].name),
                    Grad::InputActivated(i) => ("input_activated", &cell.inputs[i.0].name),
                    Grad::Input(i) => ("input", &cell.inputs[i.0].name),
                    Grad::Param(p) => ("param", &cell.params[p.0].name),
                    Grad::StatePrevious(s) => ("state_previous", &cell.states[s.0].name),
                };
                format_ident!("at_grad_{kind}_{name}")
            }
        }
    }

    /// The size of a buffer in elements, as a comptime expression.
    fn buffer_size(&self, buffer: Buffer, pass: Pass) -> TokenStream {
        let shapes = WorkspaceLayout::shapes(self.cell, buffer);
        let sizes: Vec<TokenStream> = shapes.iter().map(|s| self.local_numel(s)).collect();
        let total = if sizes.is_empty() {
            quote!(0usize)
        } else {
            quote!((#(#sizes)+*))
        };
        match buffer {
            // The walk splits its sums over the gradients it carries in registers whatever
            // `sum_parts` says (`WorkspaceLayout::sum_parts_size`).
            Buffer::SumParts
                if pass == Pass::Backward
                    && !crate::schedule::carried_register_grads(self.step).is_empty() =>
            {
                quote!(
                    (if sum_parts > 1 || walk_registers {
                        cube_dim
                    } else {
                        0usize
                    })
                )
            }
            Buffer::SumParts => quote!((if sum_parts > 1 { cube_dim } else { 0usize })),
            Buffer::ChunkStates => quote!((#total * (chunk + 1))),
            Buffer::Input(_) if pass == Pass::Forward => quote!((#total * stage)),
            _ => total,
        }
    }

    /// `let at_x = comptime![...];` for every buffer, and `workspace_size`.
    fn workspace_offsets(&self, pass: Pass) -> TokenStream {
        let layout = self.plan.layout(pass);
        let mut tokens = TokenStream::new();
        let mut previous: Option<(Ident, TokenStream)> = None;
        for &buffer in &layout.buffers {
            let name = self.buffer_name(buffer);
            let offset = match &previous {
                None => quote!(0usize),
                Some((name, size)) => quote!(#name + #size),
            };
            tokens.extend(quote!(let #name = comptime![#offset];));
            previous = Some((name, self.buffer_size(buffer, pass)));
        }
        let total = match previous {
            None => quote!(0usize),
            Some((name, size)) => quote!(#name + #size),
        };
        tokens.extend(quote!(let workspace_size = comptime![#total];));
        // The per-step buffers come first; the chunk's states (backward), last, stay global.
        let step_size = if layout.buffers.contains(&Buffer::ChunkStates) {
            quote!(at_chunk_states)
        } else {
            quote!(workspace_size)
        };
        tokens.extend(quote!(let step_size = comptime![#step_size];));
        // The offset of each state inside one slot of the chunk's states.
        let mut slot_offset = quote!(0usize);
        for state in &self.cell.states {
            let name = format_ident!("slot_{}", state.name);
            tokens.extend(quote!(let #name = comptime![#slot_offset];));
            let size = self.local_numel(&state.shape);
            slot_offset = quote!(#name + #size);
        }
        tokens.extend(quote!(let slot_size = comptime![#slot_offset];));
        tokens
    }

    fn kernel_prelude(&self, pass: Pass) -> TokenStream {
        let offsets = self.workspace_offsets(pass);
        let tiles = match &self.plan.split {
            None => quote!(let sequence = cube;),
            Some(plan) => {
                let dim = self.dim(plan.dim);
                quote! {
                    // Each sequence's cubes hold `tile` values of the split axis each.
                    let tiles = comptime![(#dim + tile - 1) / tile];
                    let sequence = cube / tiles;
                    let tile_index = cube % tiles;
                    let tile_start = tile_index * tile;
                }
            }
        };
        quote! {
            // Launches are one-dimensional (`CubeCount::Static(n, 1, 1)`, `CubeDim::new_1d`):
            // positions along x, not the flattened `CUBE_POS`/`UNIT_POS`, whose y and z terms
            // hide from the CUDA compiler that a unit's position is below the cube dim (with
            // it, NVVM folds the index arithmetic of copies instead of hoisting it into
            // registers held across the time loop).
            let cube = CUBE_POS_X as usize;
            #tiles
            let batch_index = sequence / heads;
            let head = sequence % heads;
            let time_len = time as usize;
            let chunk_count = (time_len + chunk - 1) / chunk;
            let unit = UNIT_POS_X as usize;
            // The launch's cube dim, known at compile time (loops over elements get constant
            // trip counts).
            let units = comptime![cube_dim];
            #offsets
            let base = cube * workspace_size;
            let mut shared = SharedMemory::<f32>::new(comptime![if shared_workspace {
                step_size
            } else {
                1usize
            }]);
        }
    }

    /// Kernel argument names: `prefix_name` for each name.
    fn args<'n>(&self, prefix: &str, names: impl IntoIterator<Item = &'n String>) -> Vec<Ident> {
        names
            .into_iter()
            .map(|name| format_ident!("{prefix}_{name}"))
            .collect()
    }

    fn input_arg(&self, id: usize) -> Ident {
        format_ident!("input_{}", self.cell.inputs[id].name)
    }

    /// The element type of a gradient argument: f32 for per-tile parts, else `F`.
    fn grad_arg_type(&self, grad: Grad) -> TokenStream {
        if self.grad_split(grad) == GradSplit::Partial {
            quote!(f32)
        } else {
            quote!(F)
        }
    }

    fn step_place(&self, buffer: Buffer) -> Place {
        Place::Step(self.at(buffer))
    }

    fn at(&self, buffer: Buffer) -> TokenStream {
        let buffer = match buffer {
            Buffer::NewState(s) if self.in_place.contains(&s) => Buffer::State(s),
            buffer => crate::schedule::laid_out(buffer, &self.carried_in_place),
        };
        let name = self.buffer_name(buffer);
        quote!(#name)
    }

    fn chunk_slot(&self, state: StateId, slot: TokenStream) -> TokenStream {
        let slot_offset = format_ident!("slot_{}", self.cell.states[state.0].name);
        quote!((at_chunk_states + (#slot) * slot_size + #slot_offset))
    }

    fn comptime_dim_params(&self) -> TokenStream {
        let dims = self
            .cell
            .dims
            .iter()
            .map(|d| format_ident!("dim_{}", d.name));
        let tile = self
            .plan
            .split
            .as_ref()
            .map(|_| quote!(#[comptime] tile: usize,));
        quote! {
            #[comptime] heads: usize,
            #(#[comptime] #dims: usize,)*
            #[comptime] chunk: usize,
            #tile
            #[comptime] shared_workspace: bool,
            #[comptime] series_near_zero: bool,
            #[comptime] cube_dim: usize,
            #[comptime] sum_parts: usize
        }
    }
}
