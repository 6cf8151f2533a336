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
//! comptime flag `shared_workspace`.
//!
//! Kernels are generic over the element type `F` of inputs, parameters and outputs; states,
//! intermediates and accumulations are f32. Every sub-expression becomes one `let`; a `sum`
//! becomes a loop, split among units when its statement has fewer elements than the cube has
//! units (comptime `cube_dim` and `sum_parts`); identical sub-expressions are computed once
//! where their indices allow.

use crate::ir::*;
use crate::schedule::{Buffer, GradSplit, Pass, SplitPlan, WorkspaceLayout};
use proc_macro2::{Ident, Literal, Span, TokenStream};
use quote::{format_ident, quote};
use std::collections::{BTreeSet, HashMap, HashSet};

/// The kernels and launchers of a cell, as items for a module that has
/// `use cubecl::prelude::*;` in scope.
pub fn emit_kernels(step: &BackwardStep) -> TokenStream {
    let forward_pass = Emitter::new(step, Pass::Forward);
    let backward_pass = Emitter::new(step, Pass::Backward);
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
pub fn kernels_source(step: &BackwardStep) -> String {
    let tokens = emit_kernels(step);
    match syn::parse2::<syn::File>(tokens.clone()) {
        Ok(file) => prettyplease::unparse(&file),
        Err(_) => tokens.to_string(),
    }
}

/// Where [`Emitter::copy_states`] reads or writes: a per-step workspace buffer, or a slot of
/// the chunk's states (always in the cube's global workspace); the offset of the state.
enum Place {
    Step(TokenStream),
    Chunk(TokenStream),
}

/// A copy of `numel` elements shared among a cube's units (element `flat` goes to unit
/// `flat mod units`) whose reads are issued before its writes ([`Emitter::gather`],
/// [`Emitter::prefetch`]). For each element, `locate` (statements) defines what `inside`
/// (whether the element is copied), `read` (its value) and `write` (statements that see the
/// value as `value`) use; it runs before the read and again before the write.
struct GatheredCopy {
    numel: TokenStream,
    locate: TokenStream,
    inside: TokenStream,
    read: TokenStream,
    write: TokenStream,
}

/// A unit's share of a loop over elements ([`Emitter::strided_elements`]): the `m`-th of its
/// `count` elements is `unit + (first + m) · units` (`unit + m · units` without `first`),
/// bound to `element` in `body`; `unroll` is the loop's attribute.
struct StridedElements<'n> {
    element: &'n Ident,
    first: Option<TokenStream>,
    count: TokenStream,
    unroll: TokenStream,
    all_exist: TokenStream,
    numel: &'n TokenStream,
    body: TokenStream,
}

/// One element of a statement ([`Emitter::computed_then_stored`]): `statements` compute its
/// `value`, which `write` stores.
struct ElementValue {
    statements: TokenStream,
    value: Ident,
    write: TokenStream,
}

/// Copies split in time ([`Emitter::prefetch`]): the declaration of registers that hold every
/// element a unit copies, the reads into them, and the writes from them. The reads of the
/// next step's values are issued before a step's work and stay in flight while it runs; the
/// writes wait for them only when the next step starts.
struct Prefetch {
    registers: TokenStream,
    reads: TokenStream,
    writes: TokenStream,
}

/// Elements per unit whose reads [`Emitter::gather`] issues together (registers per unit).
const GATHER_BATCH: usize = 16;

/// Loops over a statement's elements ([`Emitter::for_each_element`]) are
/// unrolled where each unit has at most this many elements.
const UNROLLED_ELEMENTS: usize = 32;

/// At most this many registers per unit hold the states the backward scan reads ahead
/// ([`Emitter::backward_kernel`]); larger states are read when their step starts.
const PREFETCH_STATE_REGISTERS: usize = 32;

/// Which way [`Emitter::transfer`] copies.
#[derive(Clone, Copy)]
enum Transfer {
    /// Kernel argument (element type `F`) → workspace.
    Load,
    /// Workspace → kernel argument of element type `F`.
    Store,
    /// Workspace → kernel argument of f32.
    StoreF32,
}

/// `target[indices] = Σ_index body`, a sum computed for each element of a statement.
struct SumStatement<'i> {
    indices: &'i [IndexId],
    index: IndexId,
    body: ExprId,
}

/// See [`Emitter::held_in_registers`]: the comptime layout of the states held in registers
/// (`parts_S`, `columns_S`, `lanes_S`, `slots_S`, whether this launch holds them:
/// `in_registers`) and their
/// arrays; their load from the workspace after the states are set; their store back to it
/// (before a checkpoint and at the end), followed by a barrier.
struct HeldInRegisters {
    layout: TokenStream,
    load: TokenStream,
    store: TokenStream,
}

/// See [`Emitter::register_names`].
struct RegisterNames {
    parts: Ident,
    columns: Ident,
    lanes: Ident,
    slots: Ident,
    array: Ident,
}

#[derive(Clone)]
struct Emitter<'a> {
    step: &'a BackwardStep,
    cell: &'a Cell,
    /// Each materialised sum's class representative (see [`crate::schedule::sum_classes`]).
    sum_classes: HashMap<ExprId, ExprId>,
    /// The axis split across cubes, if any: inside a cube it has `tile` values, from
    /// `tile_start`.
    split: Option<SplitPlan>,
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

/// A step emitted by `step` holding `held` in registers and holding none, chosen at compile
/// time by `in_registers` ([`Emitter::held_in_registers`]), and the kernel's comptime
/// `registers` parameter; the step holding none alone, and no parameter, where `held` is empty.
fn registers_or_workspace(
    held: &BTreeSet<StateId>,
    step: impl Fn(&BTreeSet<StateId>) -> TokenStream,
) -> (TokenStream, Option<TokenStream>) {
    let in_workspace = step(&BTreeSet::new());
    if held.is_empty() {
        return (in_workspace, None);
    }
    let in_registers = step(held);
    let code = quote! {
        if comptime![in_registers] {
            #in_registers
        } else {
            #in_workspace
        }
    };
    (code, Some(quote!(#[comptime] registers: bool,)))
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
    fn new(step: &'a BackwardStep, pass: Pass) -> Self {
        Emitter {
            step,
            cell: &step.cell,
            sum_classes: crate::schedule::sum_classes(step),
            split: crate::schedule::split_plan(step),
            in_place: match pass {
                Pass::Forward => crate::schedule::in_place_states(&step.cell),
                Pass::Backward => BTreeSet::new(),
            },
            carried_in_place: match pass {
                Pass::Forward => BTreeSet::new(),
                Pass::Backward => crate::schedule::carried_in_place(step),
            },
            registers: BTreeSet::new(),
            slot_bounds_at_compile_time: false,
        }
    }

    /// This emitter, holding `states` in registers.
    fn with_registers(&self, states: BTreeSet<StateId>) -> Self {
        Emitter {
            registers: states,
            ..self.clone()
        }
    }

    /// The comptime names of a state held in registers: its units (`lanes_S`), its slots per
    /// unit (`slots_S`), the units sharing each of its sums (`parts_S`), its elements per
    /// position along its first axis (`columns_S`), and its array.
    fn register_names(&self, state: StateId) -> RegisterNames {
        let name = &self.cell.states[state.0].name;
        RegisterNames {
            parts: format_ident!("parts_{name}"),
            columns: format_ident!("columns_{name}"),
            lanes: format_ident!("lanes_{name}"),
            slots: format_ident!("slots_{name}"),
            array: format_ident!("registers_{name}"),
        }
    }

    /// The state held in registers that a sum loads (not inside the sums it holds), if any.
    fn register_state_of_sum(&self, sum: ExprId) -> Option<StateId> {
        crate::schedule::direct_state_loads(self.cell, sum)
            .into_iter()
            .map(|(state, _)| state)
            .find(|state| self.registers.contains(state))
    }

    /// Every state of the cell.
    fn states(&self) -> Vec<StateId> {
        (0..self.cell.states.len()).map(StateId).collect()
    }

    fn dim(&self, dim: DimId) -> Ident {
        format_ident!("dim_{}", self.cell.dims[dim.0].name)
    }

    fn is_split(&self, dim: DimId) -> bool {
        self.split.as_ref().is_some_and(|plan| plan.dim == dim)
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
        self.split
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
            Buffer::SumParts => quote!((if sum_parts > 1 { cube_dim } else { 0usize })),
            Buffer::ChunkStates => quote!((#total * (chunk + 1))),
            Buffer::Input(_) if pass == Pass::Forward => quote!((#total * stage)),
            _ => total,
        }
    }

    /// `let at_x = comptime![...];` for every buffer, and `workspace_size`.
    fn workspace_offsets(&self, pass: Pass) -> TokenStream {
        let layout = WorkspaceLayout::new(self.step, pass);
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
        let tiles = match &self.split {
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

    /// A loop sharing `numel` elements (a comptime expression) among the cube's units; `body`
    /// sees the element as `e`. Each unit's `m`-th element is `unit + m · units` for a
    /// constant number of `m`, the loop unrolled up to [`UNROLLED_ELEMENTS`] per unit, and the
    /// bounds test drops out (a comptime `true ||`) where `units` divides `numel`. Unrolled, a
    /// unit's reads are independent of each other and issue together. (As a `while e < numel`
    /// loop its trip count depended on the unit: NVVM emitted it unrolled by four with a
    /// remainder loop, each element's test and address of its own.)
    fn for_each_element(&self, numel: TokenStream, body: TokenStream) -> TokenStream {
        let element = ident("e");
        let elements = self.strided_elements(StridedElements {
            element: &element,
            first: None,
            count: quote!(elements_per_unit),
            unroll: quote!(#[unroll(elements_per_unit <= #UNROLLED_ELEMENTS)]),
            all_exist: quote!(#numel % units == 0),
            numel: &numel,
            body,
        });
        quote! {
            {
                let elements_per_unit = comptime![(#numel + units - 1) / units];
                #elements
            }
        }
    }

    /// [`Self::for_each_element`] for a statement: `locate` (statements) decodes the element
    /// `e`, `guard` wraps what runs only for elements that exist (the split axis' tile may pass
    /// its end). Where the loop is unrolled, every element's value is computed into a register
    /// first and stored after, in a second loop: a statement's operands and its target share
    /// the workspace, so a store between two reads of the same operand (a value per key read
    /// by every element of its row) makes the compilers read it again, where all reads before
    /// any store read it once and issue together.
    fn computed_then_stored(
        &self,
        numel: TokenStream,
        locate: TokenStream,
        guard: impl Fn(TokenStream) -> TokenStream,
        element: ElementValue,
    ) -> TokenStream {
        let ElementValue {
            statements,
            value,
            write,
        } = element;
        let results = ident("results");
        let element = ident("e");
        let compute = guard(quote!(#statements #results[m] = #value;));
        let store = guard(quote!(let #value = #results[m]; #write));
        let one_pass = guard(quote!(#statements #write));
        let strided = |unroll: TokenStream, body: TokenStream| {
            self.strided_elements(StridedElements {
                element: &element,
                first: None,
                count: quote!(elements_per_unit),
                unroll,
                all_exist: quote!(#numel % units == 0),
                numel: &numel,
                body: quote!(#locate #body),
            })
        };
        let computes = strided(quote!(#[unroll]), compute);
        let stores = strided(quote!(#[unroll]), store);
        let serial = strided(quote!(), one_pass);
        quote! {
            {
                let elements_per_unit = comptime![(#numel + units - 1) / units];
                if comptime![elements_per_unit <= #UNROLLED_ELEMENTS] {
                    let mut #results = Array::<f32>::new(comptime![elements_per_unit.max(1)]);
                    #computes
                    #stores
                } else {
                    #serial
                }
            }
        }
    }

    /// The loop over a unit's elements `unit + (first + m) · units` for `m` in `0..count`
    /// (comptime), named `element` in `body`, which runs for those below `numel`. `all_exist`
    /// (comptime) says that every element visited is below `numel`: then the test is a constant
    /// `true ||` that the compilers fold away. One helper for the per-unit loops of
    /// [`Self::for_each_element`] and [`Self::unit_elements`].
    fn strided_elements(&self, elements: StridedElements) -> TokenStream {
        let StridedElements {
            element,
            first,
            count,
            unroll,
            all_exist,
            numel,
            body,
        } = elements;
        let position = match first {
            Some(first) => quote!(unit + (#first + m) * units),
            None => quote!(unit + m * units),
        };
        quote! {
            #unroll
            for m in 0..#count {
                let #element = #position;
                if comptime![#all_exist] || #element < #numel {
                    #body
                }
            }
        }
    }

    /// Kernel argument names: `prefix_name` for each name.
    fn args<'n>(&self, prefix: &str, names: impl IntoIterator<Item = &'n String>) -> Vec<Ident> {
        names
            .into_iter()
            .map(|name| format_ident!("{prefix}_{name}"))
            .collect()
    }

    /// Where element `e` of the cube's part of a value of `shape` lies in the value's global
    /// row: statements that define `global` from `e`, and, when the shape has the split axis,
    /// the condition that the element is inside the axis (the last tile may pass its end).
    fn tile_position(&self, shape: &Shape) -> (TokenStream, Option<TokenStream>) {
        let Some(split_position) = shape.iter().position(|&d| self.is_split(d)) else {
            return (quote!(let global = e;), None);
        };
        let coords: Vec<Ident> = (0..shape.len()).map(|n| format_ident!("c_{n}")).collect();
        let mut decode = quote!(let mut rest = e;);
        for (n, &dim) in shape.iter().enumerate().rev() {
            let (coord, extent) = (&coords[n], self.extent(dim));
            decode.extend(if n == 0 {
                quote!(let #coord = rest;)
            } else {
                quote!(let #coord = rest % #extent; rest /= #extent;)
            });
        }
        let mut global = quote!(0usize);
        for (n, &dim) in shape.iter().enumerate() {
            let coord = &coords[n];
            let coord = if n == split_position {
                quote!((tile_start + #coord))
            } else {
                quote!(#coord)
            };
            global = if n == 0 {
                coord
            } else {
                let dim = self.dim(dim);
                quote!((#global) * #dim + #coord)
            };
        }
        let (last, dim) = (&coords[split_position], self.dim(shape[split_position]));
        decode.extend(quote!(let global = #global;));
        (decode, Some(quote!(tile_start + #last < #dim)))
    }

    /// A loop over the cube's elements of a value of `shape`: `body` sees the element in the
    /// workspace as `e` and its position in the value's global row as `global`. Along the
    /// split axis only the cube's tile is visited, and values past the axis' end are skipped.
    fn shape_loop(&self, shape: &Shape, body: TokenStream) -> TokenStream {
        let numel = self.local_numel(shape);
        let body = match self.tile_position(shape) {
            (decode, None) => quote!(#decode #body),
            (decode, Some(inside)) => quote! {
                #decode
                if #inside {
                    #body
                }
            },
        };
        self.for_each_element(numel, body)
    }

    /// The loop over a unit's elements of a [`GatheredCopy`] from its `first` (the unit's
    /// `first`-th element is `flat = unit + first · units`), `count` of them (comptime),
    /// unrolled; `body` runs as the `m`-th, after the copy's `locate`, for those copied.
    /// `all_exist` as in [`Self::strided_elements`]: NVVM cannot drop the test itself where
    /// `first` is a loop variable (it cost each element a comparison and an address of its
    /// own, where the elements' addresses are otherwise one base and constant offsets).
    fn unit_elements(
        &self,
        copy: &GatheredCopy,
        first: TokenStream,
        count: TokenStream,
        all_exist: TokenStream,
        body: TokenStream,
    ) -> TokenStream {
        let GatheredCopy {
            numel,
            locate,
            inside,
            ..
        } = copy;
        self.strided_elements(StridedElements {
            element: &ident("flat"),
            first: Some(first),
            count,
            unroll: quote!(#[unroll]),
            all_exist,
            numel,
            body: quote! {
                #locate
                if #inside {
                    #body
                }
            },
        })
    }

    /// The reads of a [`GatheredCopy`] into the registers `values`, and its writes from them
    /// (see [`Self::unit_elements`]).
    fn reads_and_writes(
        &self,
        copy: &GatheredCopy,
        values: &Ident,
        first: TokenStream,
        count: TokenStream,
        all_exist: TokenStream,
    ) -> (TokenStream, TokenStream) {
        let (read, write) = (&copy.read, &copy.write);
        let reads = quote!(#values[m] = #read;);
        let writes = quote! {
            let value = #values[m];
            #write
        };
        (
            self.unit_elements(copy, first.clone(), count.clone(), all_exist.clone(), reads),
            self.unit_elements(copy, first, count, all_exist, writes),
        )
    }

    /// A copy that issues its reads before its writes: per unit, in batches of up to
    /// [`GATHER_BATCH`] elements, an unrolled loop (its trip count is known at compile time)
    /// reads every element of the batch into registers, then a second one writes them. So the
    /// latency of global memory is paid once per batch, not once per element (a loop that
    /// reads and then writes each element in turn waits for every read).
    fn gather(&self, copy: &GatheredCopy) -> TokenStream {
        let numel = &copy.numel;
        let values = ident("values");
        let (first, count) = (quote!(first * batch), quote!(batch));
        // Every batch is full and every unit has `per_unit` elements.
        let all_exist = quote!(#numel % (units * batch.max(1)) == 0);
        let (reads, writes) = self.reads_and_writes(copy, &values, first, count, all_exist);
        let per_unit = per_unit(numel);
        quote! {
            {
                let per_unit = comptime![#per_unit];
                let batch = comptime![if per_unit < #GATHER_BATCH { per_unit } else { #GATHER_BATCH }];
                let mut #values = Array::<f32>::new(comptime![batch.max(1)]);
                for first in 0..comptime![(per_unit + batch - 1) / batch.max(1)] {
                    #reads
                    #writes
                }
            }
        }
    }

    /// `copies` split in time ([`Prefetch`]): the registers of copy n (`{prefix}_n`) hold
    /// every element of the unit; its reads and its writes are separate code. `enabled` (a
    /// comptime condition) says whether the launch uses them: else they are one register
    /// each, and their reads and writes must not run.
    fn prefetch(&self, prefix: &str, copies: &[GatheredCopy], enabled: TokenStream) -> Prefetch {
        let mut code = Prefetch {
            registers: TokenStream::new(),
            reads: TokenStream::new(),
            writes: TokenStream::new(),
        };
        for (n, copy) in copies.iter().enumerate() {
            let values = &format_ident!("{prefix}_{n}");
            let per_unit = per_unit(&copy.numel);
            let count = quote!(comptime![#per_unit]);
            code.registers.extend(quote! {
                let mut #values = Array::<f32>::new(comptime![
                    if #enabled { #per_unit.max(1) } else { 1usize }
                ]);
            });
            let numel = &copy.numel;
            let all_exist = quote!(#per_unit * units == #numel);
            let (reads, writes) =
                self.reads_and_writes(copy, values, quote!(0usize), count, all_exist);
            code.reads.extend(reads);
            code.writes.extend(writes);
        }
        code
    }

    /// A loop over the elements of one row of a value: `arg[row * numel + global]` to or from
    /// the workspace buffer at `at`. Values without the split axis are the same in every tile:
    /// the first tile stores them.
    fn transfer(
        &self,
        direction: Transfer,
        arg: &Ident,
        row: TokenStream,
        shape: &Shape,
        at: TokenStream,
    ) -> TokenStream {
        let numel = self.shape_numel(shape);
        let element = quote!(#arg[#row * #numel + global]);
        let buffer = self.step_read(&at, quote!(e));
        let store = match direction {
            // Reads of global memory, issued together.
            Transfer::Load => return self.gather(&self.load_copy(arg, row, shape, at)),
            Transfer::Store => quote!(#element = F::cast_from(#buffer);),
            Transfer::StoreF32 => quote!(#element = #buffer;),
        };
        let replicated = self.split.is_some() && !shape.iter().any(|&d| self.is_split(d));
        let body = match replicated {
            true => quote!(if tile_index == 0 { #store }),
            false => store,
        };
        self.shape_loop(shape, body)
    }

    /// The copy of one row of a value, `arg[row * numel + global]`, into the workspace buffer
    /// at `at` (the cube's tile of it).
    fn load_copy(
        &self,
        arg: &Ident,
        row: TokenStream,
        shape: &Shape,
        at: TokenStream,
    ) -> GatheredCopy {
        let numel = self.shape_numel(shape);
        let (decode, inside) = self.tile_position(shape);
        GatheredCopy {
            numel: self.local_numel(shape),
            locate: quote!(let e = flat; #decode),
            inside: inside.unwrap_or(quote!(true)),
            read: quote!(f32::cast_from(#arg[#row * #numel + global])),
            write: self.step_write(&at, quote!(e), quote!(value)),
        }
    }

    /// Decodes the element `e` into the statement's index variables (row-major).
    fn decode_indices(&self, indices: &[IndexId]) -> TokenStream {
        self.decode_indices_from(indices, quote!(e))
    }

    /// Decodes the element at row-major position `flat` into the index variables of `indices`.
    fn decode_indices_from(&self, indices: &[IndexId], flat: TokenStream) -> TokenStream {
        let mut tokens = quote!(let mut rest = #flat;);
        for (position, &index) in indices.iter().enumerate().rev() {
            let var = self.index_var(index);
            let dim = self.extent(self.cell.index_dim(index));
            if position == 0 {
                tokens.extend(quote!(let #var = rest;));
            } else {
                tokens.extend(quote!(let #var = rest % #dim; rest /= #dim;));
            }
        }
        tokens
    }

    /// The representative of a sum's class: the buffer it is materialised in.
    fn sum_class(&self, sum: ExprId) -> ExprId {
        self.sum_classes.get(&sum).copied().unwrap_or(sum)
    }

    /// The row-major position of `indices` in a workspace buffer of their dims.
    fn flat_index(&self, indices: &[IndexId]) -> TokenStream {
        let mut flat = quote!(0usize);
        for (position, &index) in indices.iter().enumerate() {
            let var = self.index_var(index);
            if position == 0 {
                flat = quote!(#var);
            } else {
                let dim = self.extent(self.cell.index_dim(index));
                flat = quote!((#flat) * #dim + #var);
            }
        }
        flat
    }

    /// The row-major position of `indices` in a value in global memory (an index over the
    /// split axis counts from the cube's `tile_start`).
    fn global_index(&self, indices: &[IndexId]) -> TokenStream {
        let mut flat = quote!(0usize);
        for (position, &index) in indices.iter().enumerate() {
            let var = self.index_var(index);
            let dim = self.cell.index_dim(index);
            let coord = if self.is_split(dim) {
                quote!((tile_start + #var))
            } else {
                quote!(#var)
            };
            if position == 0 {
                flat = coord;
            } else {
                let dim = self.dim(dim);
                flat = quote!((#flat) * #dim + #coord);
            }
        }
        flat
    }

    /// `tile_start + j < dim_V` if `indices` include an index over the split axis.
    fn split_guard(&self, indices: &[IndexId]) -> Option<TokenStream> {
        let &index = indices
            .iter()
            .find(|&&i| self.is_split(self.cell.index_dim(i)))?;
        let var = self.index_var(index);
        let dim = self.dim(self.cell.index_dim(index));
        Some(quote!(tile_start + #var < #dim))
    }

    /// `tokens`, run only where [`Self::split_guard`] of `indices` holds (always without one).
    fn guarded(&self, indices: &[IndexId], tokens: TokenStream) -> TokenStream {
        match self.split_guard(indices) {
            Some(guard) => quote!(if #guard { #tokens }),
            None => tokens,
        }
    }

    /// The dims of a statement's indices.
    fn shape_of(&self, indices: &[IndexId]) -> Shape {
        indices.iter().map(|&i| self.cell.index_dim(i)).collect()
    }

    fn index_var(&self, index: IndexId) -> Ident {
        format_ident!("{}_{}", self.cell.indices[index.0].name, index.0)
    }

    /// `target[indices] = expr` for every element: `store(value)` writes one element. First
    /// materialises the `sum`s inside `expr` that this step has not computed yet (`ready`).
    /// `followed_by_barrier`: the caller puts a barrier right after the statement (a split sum
    /// then needs none of its own after it).
    fn statement(
        &self,
        ready: &mut HashSet<ExprId>,
        indices: &[IndexId],
        expr: ExprId,
        followed_by_barrier: bool,
        store: impl Fn(&Ident) -> TokenStream,
    ) -> TokenStream {
        let mut tokens = self.materialise_sums(ready, expr);
        tokens.extend(self.element_loop(ready, indices, expr, followed_by_barrier, store));
        tokens
    }

    /// Computes the `sum`s inside `expr` (not `expr` itself) that this step has not computed
    /// yet into their buffers, each followed by a barrier.
    fn materialise_sums(&self, ready: &mut HashSet<ExprId>, expr: ExprId) -> TokenStream {
        let mut tokens = TokenStream::new();
        for sum in self.cell.sums_under(&[expr]) {
            let class = self.sum_class(sum);
            if sum != expr && !ready.contains(&class) {
                let free: Vec<IndexId> = self.cell.free_indices(sum).into_iter().collect();
                let at = self.at(Buffer::Sum(class));
                tokens.extend(self.element_loop(ready, &free, sum, true, |value| {
                    self.step_write(&at, quote!(e), quote!(#value))
                }));
                tokens.extend(self.barrier());
                ready.insert(class);
            }
        }
        tokens
    }

    /// One loop over the elements of `indices`, computing `expr` from materialised sums. When
    /// `expr` is itself a sum to compute, it may be split among units ([`Self::split_sum`]), or
    /// read a state held in registers ([`Self::register_sum`]).
    fn element_loop(
        &self,
        ready: &HashSet<ExprId>,
        indices: &[IndexId],
        expr: ExprId,
        followed_by_barrier: bool,
        store: impl Fn(&Ident) -> TokenStream,
    ) -> TokenStream {
        if let &Expr::Sum { index, body } = self.cell.exprs.get(expr)
            && !ready.contains(&self.sum_class(expr))
            && let Some(state) = self.register_state_of_sum(expr)
        {
            let sum = SumStatement {
                indices,
                index,
                body,
            };
            return self.register_sum(ready, &sum, state, followed_by_barrier, store);
        }
        let shape = self.shape_of(indices);
        let decode = self.decode_indices(indices);
        let mut exprs = ExprEmitter::new(self, ready.clone());
        let value = exprs.emit(expr);
        let statements = exprs.finish();
        let write = store(&value);
        let serial = self.computed_then_stored(
            self.local_numel(&shape),
            quote!(#decode),
            |body| self.guarded(indices, body),
            ElementValue {
                statements: quote!(#(#statements)*),
                value,
                write,
            },
        );
        match self.cell.exprs.get(expr) {
            &Expr::Sum { index, body } if !ready.contains(&self.sum_class(expr)) => {
                let sum = SumStatement {
                    indices,
                    index,
                    body,
                };
                self.split_sum(ready, &sum, serial, followed_by_barrier, store)
            }
            _ => serial,
        }
    }

    /// The code shared by both ways of splitting `target[indices] = Σ_index body` among
    /// `parts` units per element: each part's sum of its terms (`terms`, given the term's
    /// statements and variable, adds them to `partial`), written to the partial sums
    /// (`at_sum_parts`) or, with one part, stored; then, with several parts, a barrier and
    /// each element's total of its parts in order, and a barrier before the next split sum
    /// reuses the partial sums (unless `followed_by_barrier`). A state held in registers is
    /// read at slot `slot` where its indices are the summed index and then `indices`.
    fn partial_sums(
        &self,
        ready: &HashSet<ExprId>,
        sum: &SumStatement,
        parts: &TokenStream,
        terms: impl Fn(TokenStream) -> TokenStream,
        followed_by_barrier: bool,
        store: impl Fn(&Ident) -> TokenStream,
    ) -> (TokenStream, TokenStream) {
        let shape = self.shape_of(sum.indices);
        let numel = self.local_numel(&shape);
        let decode = self.decode_indices(sum.indices);
        let mut exprs = ExprEmitter::new(self, ready.clone());
        let mut aligned = vec![sum.index];
        aligned.extend_from_slice(sum.indices);
        exprs.register_view = Some((aligned, quote!(slot)));
        let (term_statements, term) = exprs.term(sum.index, sum.body);
        let outer = exprs.finish();
        let add_terms = terms(quote!(#(#term_statements)* partial += #term;));
        let at = self.at(Buffer::SumParts);
        let write_part = self.step_write(&at, quote!(part * #numel + e), quote!(partial));
        let store_partial = store(&ident("partial"));
        let partials = self.guarded(
            sum.indices,
            quote! {
                #(#outer)*
                let mut partial = 0f32;
                #add_terms
                if comptime![#parts > 1] {
                    #write_part
                } else {
                    #store_partial
                }
            },
        );
        let partials = quote! {
            if unit < #parts * #numel {
                let e = unit % #numel;
                let part = unit / #numel;
                #decode
                #partials
            }
        };
        let read_part = self.step_read(&at, quote!(p * #numel + e));
        let write = store(&ident("total"));
        let add_up = self.guarded(
            sum.indices,
            quote! {
                let mut total = 0f32;
                for p in 0..#parts {
                    let part_sum = #read_part;
                    total += part_sum;
                }
                #write
            },
        );
        let add_up = self.for_each_element(numel, quote!(#decode #add_up));
        let barrier = self.barrier();
        let reuse_barrier = if followed_by_barrier {
            TokenStream::new()
        } else {
            // The next split sum reuses the partial sums.
            barrier.clone()
        };
        let totals = quote! {
            if comptime![#parts > 1] {
                #barrier
                #add_up
                #reuse_barrier
            }
        };
        (partials, totals)
    }

    /// `target[indices] = Σ_index body` with each element's terms split among units, chosen at
    /// compile time: when the statement has fewer elements than the cube has units, `parts`
    /// units (at most [`Schedule::sum_parts`](crate::schedule::Schedule::sum_parts), at most
    /// the summed dim) take every `parts`-th term of one element each and write their partial
    /// sums to the workspace (`at_sum_parts`); after a barrier, each element adds up its parts
    /// in order. Otherwise, or with `sum_parts` = 1, the `serial` loop.
    fn split_sum(
        &self,
        ready: &HashSet<ExprId>,
        sum: &SumStatement,
        serial: TokenStream,
        followed_by_barrier: bool,
        store: impl Fn(&Ident) -> TokenStream,
    ) -> TokenStream {
        let shape = self.shape_of(sum.indices);
        let numel = self.local_numel(&shape);
        let extent = self.extent(self.cell.index_dim(sum.index));
        let var = self.index_var(sum.index);
        let parts = quote!(parts);
        let terms = |add_term: TokenStream| {
            let add_term = self.guarded(&[sum.index], add_term);
            quote! {
                let mut #var = part;
                while #var < #extent {
                    #add_term
                    #var += parts;
                }
            }
        };
        let (partials, totals) =
            self.partial_sums(ready, sum, &parts, terms, followed_by_barrier, store);
        quote! {
            let parts = comptime![::rak::codegen::schedule::split_sum_parts(
                cube_dim, sum_parts, #extent, #numel,
            )];
            if comptime![parts > 1] {
                #partials
                #totals
            } else {
                #serial
            }
        }
    }

    /// `target[indices] = Σ_index body` where `body` reads `state`, held in registers: the sum
    /// is split as the state is held ([`crate::schedule::register_states`]): `parts_S` units
    /// per element, unit `part` taking the terms `index = part + slot · parts_S`, each of which
    /// reads the unit's own slot `slot` of the state (`lanes_S = parts_S × elements`). With one
    /// part, each unit stores its element's total itself. A term is in range when the slot's
    /// element `unit + slot · lanes_S` is (the same test as the update's, which NVVM proves
    /// from `unit < lanes_S` for every slot but the last, where `index < extent` it did not).
    fn register_sum(
        &self,
        ready: &HashSet<ExprId>,
        sum: &SumStatement,
        state: StateId,
        followed_by_barrier: bool,
        store: impl Fn(&Ident) -> TokenStream,
    ) -> TokenStream {
        let names = self.register_names(state);
        let (parts, lanes, slots) = (&names.parts, &names.lanes, &names.slots);
        let numel = self.local_numel(&self.cell.states[state.0].shape);
        let var = self.index_var(sum.index);
        let terms = |add_term: TokenStream| {
            quote! {
                #[unroll]
                for slot in 0..#slots {
                    let #var = part + slot * #parts;
                    if unit + slot * #lanes < #numel {
                        #add_term
                    }
                }
            }
        };
        let (partials, totals) = self.partial_sums(
            ready,
            sum,
            &quote!(#parts),
            terms,
            followed_by_barrier,
            store,
        );
        quote! {
            #partials
            #totals
        }
    }

    /// Writes a workspace buffer from an expression, for every element of its shape.
    fn define_buffer(
        &self,
        ready: &mut HashSet<ExprId>,
        buffer: Buffer,
        indices: &[IndexId],
        expr: ExprId,
        followed_by_barrier: bool,
    ) -> TokenStream {
        let at = self.at(buffer);
        self.statement(ready, indices, expr, followed_by_barrier, |value| {
            self.step_write(&at, quote!(e), quote!(#value))
        })
    }

    /// The indices of the element in slot `slot` of a state held in registers (element
    /// `e = unit + slot · lanes_S`, as [`Emitter::decode_indices`] would decode it), taken
    /// from the unit and the slot rather than from `e`: the position along the first axis is
    /// `unit / columns_S + slot · parts_S`, the others come from `unit % columns_S`. NVVM then
    /// folds a unit's reads of a value per position (a key, a gate) into one base address and
    /// a constant offset per slot; decoded from `e`, every slot's read needed a division and
    /// an address of its own.
    fn decode_slot_indices(&self, indices: &[IndexId], names: &RegisterNames) -> TokenStream {
        let Some((&first, rest)) = indices.split_first() else {
            return TokenStream::new();
        };
        let (parts, columns) = (&names.parts, &names.columns);
        let first = self.index_var(first);
        let mut tokens = self.decode_indices_from(rest, quote!(unit % #columns));
        tokens.extend(quote!(let #first = unit / #columns + slot * #parts;));
        tokens
    }

    /// `update S[indices] = expr` of a state held in registers: each unit computes its slots
    /// (elements `unit + slot · lanes_S`), reading the state's old value from the same slot.
    fn register_update(&self, ready: &mut HashSet<ExprId>, update: &Update) -> TokenStream {
        let mut tokens = self.materialise_sums(ready, update.expr);
        let names = self.register_names(update.state);
        let array = &names.array;
        let numel = self.local_numel(&self.cell.states[update.state.0].shape);
        let decode = self.decode_slot_indices(&update.indices, &names);
        let mut exprs = ExprEmitter::new(self, ready.clone());
        exprs.register_view = Some((update.indices.clone(), quote!(slot)));
        let value = exprs.emit(update.expr);
        let statements = exprs.finish();
        let body = self.guarded(
            &update.indices,
            quote!(#(#statements)* #array[slot] = #value;),
        );
        tokens.extend(self.slot_loop(&names, &numel, quote!(#decode #body)));
        tokens
    }

    /// The loop over a unit's slots of a state held in registers (`names`, `numel` elements):
    /// `body` runs for each slot `slot` whose element `e = unit + slot · lanes_S` exists.
    /// With [`Emitter::slot_bounds_at_compile_time`], both tests are decided at compile time
    /// where they always hold: `unit < lanes_S` where the state takes every unit
    /// (`lanes_S = units`), the element's where `lanes_S` divides `numel`.
    fn slot_loop(
        &self,
        names: &RegisterNames,
        numel: &TokenStream,
        body: TokenStream,
    ) -> TokenStream {
        let (lanes, slots) = (&names.lanes, &names.slots);
        let (unit_test, element_test) = if self.slot_bounds_at_compile_time {
            (
                quote!(comptime![#lanes == units] || unit < #lanes),
                quote!(comptime![#numel % #lanes.max(1) == 0] || e < #numel),
            )
        } else {
            (quote!(unit < #lanes), quote!(e < #numel))
        };
        quote! {
            if #unit_test {
                #[unroll]
                for slot in 0..#slots {
                    let e = unit + slot * #lanes;
                    if #element_test {
                        #body
                    }
                }
            }
        }
    }

    fn input_arg(&self, id: usize) -> Ident {
        format_ident!("input_{}", self.cell.inputs[id].name)
    }

    /// Loads the inputs of the steps `block_start..block_end` (at most `steps`, a comptime
    /// expression; `block_start` a multiple of it) activated, and before activation if asked
    /// and the backward step reads it (then `steps` is 1), into slots `s - block_start` of the
    /// input buffers, each input's reads issued together ([`Self::gather`]). `row` is the
    /// inputs' row at step `s`. No barrier.
    fn load_inputs(
        &self,
        keep_pre_activation: bool,
        steps: TokenStream,
        row: TokenStream,
    ) -> TokenStream {
        let copies = self.input_copies(keep_pre_activation, steps, row);
        copies.iter().map(|copy| self.gather(copy)).collect()
    }

    /// The copies of [`Self::load_inputs`], one per input.
    fn input_copies(
        &self,
        keep_pre_activation: bool,
        steps: TokenStream,
        row: TokenStream,
    ) -> Vec<GatheredCopy> {
        let mut copies = Vec::new();
        // The backward's workspace holds an input before activation only where it reads it.
        let pre_activations = WorkspaceLayout::new(self.step, Pass::Backward).buffers;
        for (id, input) in self.cell.inputs.iter().enumerate() {
            let arg = self.input_arg(id);
            let numel = self.shape_numel(&input.shape);
            let at = self.at(Buffer::Input(InputId(id)));
            let mut exprs = ExprEmitter::new(self, HashSet::new());
            let pre = ident("pre");
            let activated = match input.activation {
                Some(op) => exprs.apply_unary(op, &pre),
                None => pre.clone(),
            };
            let statements = exprs.finish();
            let pre_buffer = Buffer::InputPreActivation(InputId(id));
            let store_pre = if keep_pre_activation && pre_activations.contains(&pre_buffer) {
                let at_pre = self.at(pre_buffer);
                self.step_write(&at_pre, quote!(e), quote!(pre))
            } else {
                TokenStream::new()
            };
            // Slot `s - block_start` of the buffer, element `e`.
            let store = self.step_write(&at, quote!(flat), quote!(#activated));
            let local = self.local_numel(&input.shape);
            let (decode, inside) = self.tile_position(&input.shape);
            let inside = match inside {
                Some(inside) => quote!(s < block_end && #inside),
                None => quote!(s < block_end),
            };
            copies.push(GatheredCopy {
                numel: quote!((#steps * #local)),
                locate: quote! {
                    let s = block_start + flat / #local;
                    let e = flat % #local;
                    #decode
                    let row = #row;
                },
                inside,
                read: quote!(f32::cast_from(#arg[row * #numel + global])),
                write: quote! {
                    let pre = value;
                    #store_pre
                    #(#statements)*
                    #store
                },
            });
        }
        copies
    }

    /// Lets (each followed by a barrier) and updates into the new states (or the registers
    /// holding them), then a barrier unless every state is held in registers.
    fn lets_and_updates(&self, ready: &mut HashSet<ExprId>) -> TokenStream {
        let mut tokens = self.lets(ready);
        let updates = &self.cell.updates;
        for (n, update) in updates.iter().enumerate() {
            if self.registers.contains(&update.state) {
                tokens.extend(self.register_update(ready, update));
            } else {
                tokens.extend(self.define_buffer(
                    ready,
                    Buffer::NewState(update.state),
                    &update.indices,
                    update.expr,
                    // The barrier after the updates follows the last.
                    n + 1 == updates.len(),
                ));
            }
        }
        if updates.iter().any(|u| !self.registers.contains(&u.state)) {
            tokens.extend(self.barrier());
        }
        tokens
    }

    /// The lets, each followed by a barrier.
    fn lets(&self, ready: &mut HashSet<ExprId>) -> TokenStream {
        let mut tokens = TokenStream::new();
        for (id, definition) in self.cell.lets.iter().enumerate() {
            tokens.extend(self.define_buffer(
                ready,
                Buffer::Let(LetId(id)),
                &definition.indices,
                definition.expr,
                true,
            ));
            tokens.extend(self.barrier());
        }
        tokens
    }

    /// `to = from` for each of `states` (element `e`).
    fn copy_states(
        &self,
        states: &[StateId],
        from: impl Fn(StateId) -> Place,
        to: impl Fn(StateId) -> Place,
    ) -> TokenStream {
        let copies = self.state_copies(states, from, to);
        copies.iter().map(|copy| self.gather(copy)).collect()
    }

    /// The backward walk's step `step_from_end`: walking a chunk in reverse, the state after
    /// a step is the state before the step walked just before (at the first, the chunk's last
    /// state, which the recomputation leaves in `State`). So instead of copying `State` to
    /// `NewState` every step, the two buffers trade places: the offsets `at_state_S` and
    /// `at_new_state_S` are shadowed by runtime ones, swapped at even `step_from_end`; the
    /// state before the step is then written over the one the previous step read as its
    /// state before (a barrier ends each step).
    fn trade_state_buffers(&self) -> TokenStream {
        let mut tokens = quote!(let swapped = step_from_end % 2 == 0;);
        for state in self.states() {
            let before = self.buffer_name(Buffer::State(state));
            let after = self.buffer_name(Buffer::NewState(state));
            let traded = format_ident!("{before}_traded");
            tokens.extend(quote! {
                let #traded = select(swapped, #after, #before);
                let #after = select(swapped, #before, #after);
                let #before = #traded;
            });
        }
        tokens
    }

    /// The copies of [`Self::copy_states`], one per state.
    fn state_copies(
        &self,
        states: &[StateId],
        from: impl Fn(StateId) -> Place,
        to: impl Fn(StateId) -> Place,
    ) -> Vec<GatheredCopy> {
        let mut copies = Vec::new();
        for &id in states {
            let state = &self.cell.states[id.0];
            let value = match from(id) {
                Place::Step(at) => self.step_read(&at, quote!(e)),
                Place::Chunk(at) => quote!(workspace[base + #at + e]),
            };
            let write = match to(id) {
                Place::Step(at) => self.step_write(&at, quote!(e), quote!(value)),
                Place::Chunk(at) => quote!(workspace[base + #at + e] = value;),
            };
            copies.push(GatheredCopy {
                numel: self.local_numel(&state.shape),
                locate: quote!(let e = flat;),
                inside: quote!(true),
                read: value,
                write,
            });
        }
        copies
    }

    /// Writes a gradient the backward scan outputs: a complete one to its argument (element
    /// type `F`) at `row`; per-tile parts to their f32 argument, one block of rows per tile
    /// (`[tiles, rows, numel]`), which the host sums over the tiles.
    fn write_gradient(
        &self,
        grad: Grad,
        arg: &Ident,
        row: TokenStream,
        shape: &Shape,
    ) -> TokenStream {
        let at = self.at(Buffer::Grad(grad));
        if self.grad_split(grad) == GradSplit::Partial {
            let numel = self.shape_numel(shape);
            let value = self.step_read(&at, quote!(e));
            self.for_each_element(
                numel.clone(),
                quote!(#arg[tile_index * (#arg.len() / tiles) + #row * #numel + e] = #value;),
            )
        } else {
            self.transfer(Transfer::Store, arg, row, shape, at)
        }
    }

    /// The element type of a gradient argument: f32 for per-tile parts, else `F`.
    fn grad_arg_type(&self, grad: Grad) -> TokenStream {
        if self.grad_split(grad) == GradSplit::Partial {
            quote!(f32)
        } else {
            quote!(F)
        }
    }

    /// S_t copied over S_{t−1} after a step, for the states not updated in place (those are
    /// already where the next step reads them). No barrier.
    fn advance_states(&self) -> TokenStream {
        let copied: Vec<StateId> = (self.states().into_iter())
            .filter(|s| !self.in_place.contains(s))
            .collect();
        self.copy_states(
            &copied,
            |s| self.step_place(Buffer::NewState(s)),
            |s| self.step_place(Buffer::State(s)),
        )
    }

    fn step_place(&self, buffer: Buffer) -> Place {
        Place::Step(self.at(buffer))
    }

    /// With the workspace in shared memory, which does not outlive a launch, the buffers a
    /// later launch of the same scan resumes from are saved to the cube's global workspace at
    /// the end of a launch (`save`) and restored at the start of the next (`!save`).
    fn persist(&self, buffers: &[Buffer], save: bool) -> TokenStream {
        let mut tokens = TokenStream::new();
        for &buffer in buffers {
            let at = self.at(buffer);
            let numel = self.local_numel(&WorkspaceLayout::shapes(self.cell, buffer)[0]);
            let copy = if save {
                quote!(workspace[base + #at + e] = shared[#at + e];)
            } else {
                quote!(shared[#at + e] = workspace[base + #at + e];)
            };
            tokens.extend(self.for_each_element(numel, copy));
        }
        quote! {
            if comptime![shared_workspace] {
                #tokens
            }
        }
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
            .split
            .as_ref()
            .map(|_| quote!(#[comptime] tile: usize,));
        quote! {
            #[comptime] heads: usize,
            #(#[comptime] #dims: usize,)*
            #[comptime] chunk: usize,
            #tile
            #[comptime] shared_workspace: bool,
            #[comptime] cube_dim: usize,
            #[comptime] sum_parts: usize
        }
    }

    /// The code for the states a scan may hold in registers (the forward scan's
    /// [`crate::schedule::register_states`], the backward's recomputation's
    /// [`crate::schedule::recomputed_register_states`]); all empty if there are none.
    /// `sum_parts` (comptime) bounds the units per position along a state's first axis: the
    /// launch's, where sums over that axis read the registers.
    fn held_in_registers(
        &self,
        held: &BTreeSet<StateId>,
        sum_parts: TokenStream,
    ) -> HeldInRegisters {
        let mut code = HeldInRegisters {
            layout: TokenStream::new(),
            load: TokenStream::new(),
            store: TokenStream::new(),
        };
        if held.is_empty() {
            return code;
        }
        let mut conditions = vec![quote!(registers)];
        let mut arrays = TokenStream::new();
        for &state in held {
            let names = self.register_names(state);
            let (parts, columns, lanes, slots, array) = (
                &names.parts,
                &names.columns,
                &names.lanes,
                &names.slots,
                &names.array,
            );
            let shape = &self.cell.states[state.0].shape;
            let numel = self.local_numel(shape);
            // The units sharing each sum over the first axis, the elements past the first axis
            // being the sum's elements.
            let (first, rest) = match shape.split_first() {
                Some((&first, rest)) => {
                    let first = self.extent(first);
                    (quote!(#first), self.local_numel(&rest.to_vec()))
                }
                None => (quote!(1usize), quote!(1usize)),
            };
            code.layout.extend(quote! {
                let #parts = comptime![::rak::codegen::schedule::split_sum_parts(
                    cube_dim, #sum_parts, #first, #rest,
                )];
                let #columns = comptime![#rest];
                let #lanes = comptime![#parts * #columns];
                let #slots = comptime![(#numel + #lanes - 1) / #lanes.max(1)];
            });
            conditions.push(quote!(#parts >= 1));
            arrays.extend(quote! {
                let mut #array = Array::<f32>::new(comptime![if in_registers {
                    #slots
                } else {
                    1usize
                }]);
            });
            let at = self.at(Buffer::State(state));
            let read = self.step_read(&at, quote!(e));
            code.load
                .extend(self.slot_loop(&names, &numel, quote!(#array[slot] = #read;)));
            code.store.extend(self.slot_loop(
                &names,
                &numel,
                self.step_write(&at, quote!(e), quote!(#array[slot])),
            ));
        }
        code.layout.extend(quote! {
            // Whether this launch holds the states in registers: asked for, and each state's
            // sums have at least one unit per element.
            let in_registers = comptime![#(#conditions)&&*];
            #arrays
        });
        let (load, store, barrier) = (&code.load, &code.store, self.barrier());
        code.load = quote! {
            if comptime![in_registers] {
                #load
            }
        };
        // Other units read the workspace next (in their own order).
        code.store = quote! {
            if comptime![in_registers] {
                #store
                #barrier
            }
        };
        code
    }

    fn forward_kernel(&self) -> TokenStream {
        let cell = self.cell;
        let state_names = || cell.states.iter().map(|s| &s.name);
        let inputs = self.args("input", cell.inputs.iter().map(|i| &i.name));
        let params = self.args("param", cell.params.iter().map(|p| &p.name));
        let initial = self.args("initial", state_names());
        let outputs = self.args("output", cell.outputs.iter().map(|o| &o.name));
        let finals = self.args("final", state_names());
        let checkpoints = self.args("checkpoint", state_names());
        let comptime_dims = self.comptime_dim_params();
        let prelude = self.kernel_prelude(Pass::Forward);
        let barrier = self.barrier();
        let states: Vec<Buffer> = (0..cell.states.len())
            .map(|s| Buffer::State(StateId(s)))
            .collect();
        let (save, restore) = (self.persist(&states, true), self.persist(&states, false));

        let mut init_states = TokenStream::new();
        for (id, state) in cell.states.iter().enumerate() {
            let at = self.at(Buffer::State(StateId(id)));
            let initial = format_ident!("initial_{}", state.name);
            let numel = self.shape_numel(&state.shape);
            let given = self.step_write(
                &at,
                quote!(e),
                quote!(f32::cast_from(#initial[sequence * #numel + global])),
            );
            let declared = self.step_write(&at, quote!(e), float(state.init));
            init_states.extend(self.shape_loop(
                &state.shape,
                quote! {
                    if comptime![has_initial] {
                        #given
                    } else {
                        #declared
                    }
                },
            ));
        }
        let mut write_checkpoints = TokenStream::new();
        for (id, state) in cell.states.iter().enumerate() {
            let at = self.at(Buffer::State(StateId(id)));
            let row = quote!((sequence * chunk_count + t / chunk));
            write_checkpoints.extend(self.transfer(
                Transfer::StoreF32,
                &checkpoints[id],
                row,
                &state.shape,
                at,
            ));
        }
        let load_inputs = self.load_inputs(
            false,
            quote!(stage),
            quote!((batch_index * time_len + s) * heads + head),
        );
        let held = crate::schedule::register_states(cell);
        let (step, registers_param) = registers_or_workspace(&held, |held| {
            self.with_registers(held.clone()).forward_step()
        });
        let held = self.held_in_registers(&held, quote!(sum_parts));
        let (register_layout, load_registers, store_registers) =
            (held.layout, held.load, held.store);
        let mut finals_code = TokenStream::new();
        for (id, state) in cell.states.iter().enumerate() {
            let at = self.at(Buffer::State(StateId(id)));
            finals_code.extend(self.transfer(
                Transfer::Store,
                &finals[id],
                quote!(sequence),
                &state.shape,
                at,
            ));
        }
        quote! {
            /// The forward scan: one cube per sequence (batch element × head) and tile of the
            /// split axis, if the cell has one.
            #[cube(launch, launch_unchecked)]
            pub fn forward<F: Float>(
                #(#inputs: &Array<F>,)*
                #(#params: &Array<F>,)*
                #(#initial: &Array<F>,)*
                #(#outputs: &mut Array<F>,)*
                #(#finals: &mut Array<F>,)*
                #(#checkpoints: &mut Array<f32>,)*
                workspace: &mut Array<f32>,
                time: u32,
                first_step: u32,
                end_step: u32,
                #comptime_dims,
                #[comptime] stage: usize,
                #[comptime] has_initial: bool,
                #[comptime] write_checkpoints: bool,
                #registers_param
            ) {
                #prelude
                #register_layout
                // A later launch of the same scan resumes from the states in the workspace.
                if first_step == 0 {
                    #init_states
                } else {
                    #restore
                }
                #barrier
                #load_registers
                for t in first_step as usize..end_step as usize {
                    if comptime![write_checkpoints] {
                        if t % chunk == 0 {
                            #store_registers
                            #write_checkpoints
                        }
                    }
                    // The inputs of a block of `stage` steps are loaded at once.
                    let input_step = t % stage;
                    if t == first_step as usize || input_step == 0 {
                        let block_start = t - input_step;
                        let block_end = select(
                            block_start + stage < end_step as usize,
                            block_start + stage,
                            end_step as usize,
                        );
                        #load_inputs
                        #barrier
                    }
                    let row = (batch_index * time_len + t) * heads + head;
                    #step
                }
                #store_registers
                #save
                #finals_code
            }
        }
    }

    /// One step of the forward scan, from the inputs in the workspace (slot `input_step`): the
    /// lets, the updates, the outputs (row `row` of each output argument), then the new states
    /// become the states (copied, except for states updated in place).
    fn forward_step(&self) -> TokenStream {
        let mut ready = HashSet::new();
        let lets_and_updates = self.lets_and_updates(&mut ready);
        let mut outputs_code = TokenStream::new();
        for (n, output) in self.cell.outputs.iter().enumerate() {
            let arg = format_ident!("output_{}", output.name);
            let numel = self.shape_numel(&output.shape);
            let global = self.global_index(&output.indices);
            // Outputs without the split axis are the same in every tile: the first stores them.
            let replicated = self.split.is_some() && self.split_guard(&output.indices).is_none();
            outputs_code.extend(self.statement(
                &mut ready,
                &output.indices,
                output.expr,
                // The step's last barrier follows the last output.
                n + 1 == self.cell.outputs.len(),
                |value| {
                    let store = quote!(#arg[row * #numel + #global] = F::cast_from(#value););
                    if replicated {
                        quote!(if tile_index == 0 { #store })
                    } else {
                        store
                    }
                },
            ));
        }
        let advance = self.advance_states();
        let barrier = self.barrier();
        quote! {
            #lets_and_updates
            #outputs_code
            #advance
            #barrier
        }
    }

    /// The single-step kernel of streaming inference: one token of every stream (batch element
    /// × head), its states read from `state_*` and written back in place. One cube per stream:
    /// the host launches it with the split axis whole (`tile` = the axis), so that no cube
    /// reads a state another cube writes.
    fn step_kernel(&self) -> TokenStream {
        let cell = self.cell;
        let inputs = self.args("input", cell.inputs.iter().map(|i| &i.name));
        let params = self.args("param", cell.params.iter().map(|p| &p.name));
        let states = self.args("state", cell.states.iter().map(|s| &s.name));
        let outputs = self.args("output", cell.outputs.iter().map(|o| &o.name));
        let comptime_dims = self.comptime_dim_params();
        let prelude = self.kernel_prelude(Pass::Forward);
        let barrier = self.barrier();
        let mut load_states = TokenStream::new();
        let mut store_states = TokenStream::new();
        for (id, state) in cell.states.iter().enumerate() {
            let at = self.at(Buffer::State(StateId(id)));
            let arg = &states[id];
            load_states.extend(self.transfer(
                Transfer::Load,
                arg,
                quote!(sequence),
                &state.shape,
                at.clone(),
            ));
            store_states.extend(self.transfer(
                Transfer::Store,
                arg,
                quote!(sequence),
                &state.shape,
                at,
            ));
        }
        // The one step's inputs: step `s` = 0 of the stream's row.
        let load_inputs = self.load_inputs(false, quote!(1usize), quote!(sequence + s));
        let step = self.forward_step();
        quote! {
            /// One step of every stream (batch element × head), states updated in place.
            #[cube(launch, launch_unchecked)]
            pub fn step<F: Float>(
                #(#inputs: &Array<F>,)*
                #(#params: &Array<F>,)*
                #(#states: &mut Array<F>,)*
                #(#outputs: &mut Array<F>,)*
                workspace: &mut Array<f32>,
                #comptime_dims,
            ) {
                // The forward scan's layout with one step and one staged input.
                let stage = comptime![1usize];
                let time = 1u32;
                #prelude
                #load_states
                let input_step = 0usize;
                let row = sequence;
                let (block_start, block_end) = (0usize, 1usize);
                #load_inputs
                #barrier
                #step
                #store_states
            }
        }
    }

    fn backward_kernel(&self) -> TokenStream {
        let cell = self.cell;
        let state_names = || cell.states.iter().map(|s| &s.name);
        let input_names = || cell.inputs.iter().map(|i| &i.name);
        let param_names = || cell.params.iter().map(|p| &p.name);
        let inputs = self.args("input", input_names());
        let params = self.args("param", param_names());
        let checkpoints = self.args("checkpoint", state_names());
        let grad_outputs = self.args("grad_output", cell.outputs.iter().map(|o| &o.name));
        let grad_finals = self.args("grad_final", state_names());
        let grad_inputs = self.args("grad_input", input_names());
        let grad_params = self.args("grad_param", param_names());
        let grad_initial = self.args("grad_initial", state_names());
        let grad_input_types: Vec<TokenStream> = (0..cell.inputs.len())
            .map(|i| self.grad_arg_type(Grad::Input(InputId(i))))
            .collect();
        let grad_initial_types: Vec<TokenStream> = (0..cell.states.len())
            .map(|s| self.grad_arg_type(Grad::StateFromNext(StateId(s))))
            .collect();
        let comptime_dims = self.comptime_dim_params();
        let prelude = self.kernel_prelude(Pass::Backward);
        let barrier = self.barrier();
        let carried: Vec<Buffer> = (0..cell.states.len())
            .map(|s| Buffer::Grad(Grad::StateFromNext(StateId(s))))
            .chain((0..cell.params.len()).map(|p| Buffer::ParamGradSum(ParamId(p))))
            .collect();
        let (save, restore) = (self.persist(&carried, true), self.persist(&carried, false));

        let mut setup = TokenStream::new();
        for (id, param) in cell.params.iter().enumerate() {
            let at = self.at(Buffer::ParamGradSum(ParamId(id)));
            setup.extend(self.for_each_element(
                self.local_numel(&param.shape),
                self.step_write(&at, quote!(e), quote!(0f32)),
            ));
        }
        for (id, state) in cell.states.iter().enumerate() {
            let grad = Grad::StateFromNext(StateId(id));
            let at = self.at(Buffer::Grad(grad));
            if self.grad_split(grad) == GradSplit::Partial {
                // Carried as per-tile parts: the first tile starts from the given gradient.
                let arg = &grad_finals[id];
                let numel = self.shape_numel(&state.shape);
                let given = self.step_write(
                    &at,
                    quote!(e),
                    quote!(f32::cast_from(#arg[sequence * #numel + e])),
                );
                let zero = self.step_write(&at, quote!(e), quote!(0f32));
                setup.extend(
                    self.for_each_element(
                        numel,
                        quote!(if tile_index == 0 { #given } else { #zero }),
                    ),
                );
            } else {
                setup.extend(self.transfer(
                    Transfer::Load,
                    &grad_finals[id],
                    quote!(sequence),
                    &state.shape,
                    at,
                ));
            }
        }
        let mut restore_checkpoint = TokenStream::new();
        for (id, state) in cell.states.iter().enumerate() {
            let at = self.at(Buffer::State(StateId(id)));
            let slot = self.chunk_slot(StateId(id), quote!(0usize));
            let arg = format_ident!("checkpoint_{}", state.name);
            let mut copy = self.load_copy(
                &arg,
                quote!((sequence * chunk_count + chunk_index)),
                &state.shape,
                at,
            );
            // The entering state is also the chunk's first slot.
            let write = copy.write;
            copy.write = quote! {
                #write
                workspace[base + #slot + e] = value;
            };
            restore_checkpoint.extend(self.gather(&copy));
        }
        let step_row = quote!((batch_index * time_len + s) * heads + head);
        // The recomputation reads each step's inputs one step ahead.
        let recompute_copies = self.input_copies(false, quote!(1usize), step_row.clone());
        let recompute = self.prefetch("recompute_input", &recompute_copies, quote!(true));
        // The recomputation updates states in place where the forward scan does (the walk
        // after it reads S_{t−1} and S_t and keeps both buffers).
        let recomputation = Emitter {
            in_place: crate::schedule::in_place_states(cell),
            slot_bounds_at_compile_time: true,
            ..self.clone()
        };
        // One step of the recomputation holding `held` in registers: the lets and updates,
        // then every state stored to the chunk's slot after the step.
        let recompute_step = |held: &BTreeSet<StateId>| {
            let lets_and_updates =
                (recomputation.with_registers(held.clone())).lets_and_updates(&mut HashSet::new());
            let advance = recomputation.advance_states();
            let in_workspace: Vec<StateId> = (self.states().into_iter())
                .filter(|s| !held.contains(s))
                .collect();
            let mut keep = self.copy_states(
                &in_workspace,
                |s| recomputation.step_place(Buffer::NewState(s)),
                |s| Place::Chunk(self.chunk_slot(s, quote!(step + 1))),
            );
            for &state in held {
                let names = self.register_names(state);
                let array = &names.array;
                let slot = self.chunk_slot(state, quote!(step + 1));
                let numel = self.local_numel(&cell.states[state.0].shape);
                let store = quote!(workspace[base + #slot + e] = #array[slot];);
                keep.extend(recomputation.slot_loop(&names, &numel, store));
            }
            quote!(#lets_and_updates #advance #keep)
        };
        // The states the recomputation may hold in registers: loaded from the workspace after
        // the checkpoint is restored, stored back to it after the chunk's last step (where the
        // walk reads the state after that step).
        let held = crate::schedule::recomputed_register_states(cell);
        let (recompute_step, registers_param) = registers_or_workspace(&held, recompute_step);
        let HeldInRegisters {
            layout: register_layout,
            load: load_registers,
            store: store_registers,
        } = recomputation.held_in_registers(&held, quote!(cube_dim));
        let trade_state_buffers = self.trade_state_buffers();
        // The state before the step comes from the chunk's slots, read one step ahead where
        // it fits in `PREFETCH_STATE_REGISTERS` registers per unit (`prefetch_states`).
        let previous_copies = self.state_copies(
            &self.states(),
            |s| Place::Chunk(self.chunk_slot(s, quote!(step))),
            |s| self.step_place(Buffer::State(s)),
        );
        let load_previous: TokenStream = previous_copies.iter().map(|c| self.gather(c)).collect();
        let state_registers: Vec<TokenStream> = previous_copies
            .iter()
            .map(|copy| per_unit(&copy.numel))
            .collect();
        let previous = self.prefetch("previous_state", &previous_copies, quote!(prefetch_states));
        // The step's inputs (activated and before activation) and output gradients, read one
        // step ahead.
        let mut primal_copies = self.input_copies(true, quote!(1usize), step_row);
        for (id, output) in cell.outputs.iter().enumerate() {
            let at = self.at(Buffer::Grad(Grad::Output(OutputId(id))));
            primal_copies.push(self.load_copy(&grad_outputs[id], quote!(row), &output.shape, at));
        }
        let primal = self.prefetch("primal", &primal_copies, quote!(true));
        let mut ready = HashSet::new();
        let primal_lets = self.lets(&mut ready);
        let Prefetch {
            registers: recompute_registers,
            reads: recompute_reads,
            writes: recompute_writes,
        } = recompute;
        let Prefetch {
            registers: previous_registers,
            reads: previous_reads,
            writes: previous_writes,
        } = previous;
        let Prefetch {
            registers: primal_registers,
            reads: primal_reads,
            writes: primal_writes,
        } = primal;
        // The reads of step `step`'s state before it, inputs and output gradients.
        let read_ahead = quote! {
            let row = (batch_index * time_len + t0 + step) * heads + head;
            let (block_start, block_end) = (t0 + step, t0 + step + 1);
            if comptime![prefetch_states] {
                #previous_reads
            }
            #primal_reads
        };
        // The definitions in phases that need no barrier between them.
        let mut definitions = TokenStream::new();
        for phase in crate::schedule::definition_phases(self.step) {
            let last = phase.len() - 1;
            for (n, definition) in phase.iter().map(|&d| &self.step.definitions[d]).enumerate() {
                definitions.extend(self.define_buffer(
                    &mut ready,
                    Buffer::Grad(definition.grad),
                    &definition.indices,
                    definition.expr,
                    // A split sum's partial sums are reused by the next one: a barrier
                    // between them unless the phase's own follows.
                    n == last,
                ));
            }
            definitions.extend(self.barrier());
        }
        let mut sinks = TokenStream::new();
        for (id, input) in cell.inputs.iter().enumerate() {
            let grad = Grad::Input(InputId(id));
            sinks.extend(self.write_gradient(grad, &grad_inputs[id], quote!(row), &input.shape));
        }
        for (id, param) in cell.params.iter().enumerate() {
            let at = self.at(Buffer::Grad(Grad::Param(ParamId(id))));
            let sum = self.at(Buffer::ParamGradSum(ParamId(id)));
            let total = self.step_read(&sum, quote!(e));
            let term = self.step_read(&at, quote!(e));
            sinks.extend(self.for_each_element(
                self.local_numel(&param.shape),
                self.step_write(&sum, quote!(e), quote!(#total + #term)),
            ));
        }
        // The gradients carried to the step before, where they have a buffer of their own.
        let copied: Vec<StateId> = (self.states().into_iter())
            .filter(|s| !self.carried_in_place.contains(s))
            .collect();
        sinks.extend(self.copy_states(
            &copied,
            |s| self.step_place(Buffer::Grad(Grad::StatePrevious(s))),
            |s| self.step_place(Buffer::Grad(Grad::StateFromNext(s))),
        ));
        let mut finish = TokenStream::new();
        for (id, state) in cell.states.iter().enumerate() {
            finish.extend(self.write_gradient(
                Grad::StateFromNext(StateId(id)),
                &grad_initial[id],
                quote!(sequence),
                &state.shape,
            ));
        }
        // One row per sequence and tile: `[B, tiles, H, numel]` (`[B, H, numel]` unsplit).
        let param_row = match &self.split {
            Some(_) => quote!(((batch_index * tiles + tile_index) * heads + head)),
            None => quote!(sequence),
        };
        for (id, param) in cell.params.iter().enumerate() {
            let at = self.at(Buffer::ParamGradSum(ParamId(id)));
            let arg = &grad_params[id];
            let numel = self.shape_numel(&param.shape);
            let value = self.step_read(&at, quote!(e));
            finish.extend(self.shape_loop(
                &param.shape,
                quote!(#arg[#param_row * #numel + global] = #value;),
            ));
        }
        quote! {
            /// The backward scan: one cube per sequence and tile, chunks in reverse, states
            /// recomputed from the forward scan's checkpoints. Parameter gradients are written
            /// per sequence and tile (summed over time), per-tile parts of other gradients per
            /// tile; the host sums them over batch and tiles.
            #[cube(launch, launch_unchecked)]
            pub fn backward<F: Float>(
                #(#inputs: &Array<F>,)*
                #(#params: &Array<F>,)*
                #(#checkpoints: &Array<f32>,)*
                #(#grad_outputs: &Array<F>,)*
                #(#grad_finals: &Array<F>,)*
                #(#grad_inputs: &mut Array<#grad_input_types>,)*
                #(#grad_params: &mut Array<f32>,)*
                #(#grad_initial: &mut Array<#grad_initial_types>,)*
                workspace: &mut Array<f32>,
                time: u32,
                first_chunk_from_end: u32,
                end_chunk_from_end: u32,
                #comptime_dims,
                #registers_param
            ) {
                #prelude
                #register_layout
                // One step's inputs at a time.
                let input_step = 0usize;
                // Registers for the values read one step ahead (see `Prefetch`).
                let prefetch_states = comptime![(#(#state_registers)+*) <= #PREFETCH_STATE_REGISTERS];
                #recompute_registers
                #previous_registers
                #primal_registers
                // A later launch of the same scan resumes from the gradients in the workspace.
                if first_chunk_from_end == 0 {
                    #setup
                } else {
                    #restore
                }
                #barrier
                for chunk_from_end in first_chunk_from_end as usize..end_chunk_from_end as usize {
                    let chunk_index = chunk_count - 1 - chunk_from_end;
                    let t0 = chunk_index * chunk;
                    let remaining = time_len - t0;
                    let steps = select(remaining < chunk, remaining, chunk);
                    #restore_checkpoint
                    {
                        let (block_start, block_end) = (t0, t0 + 1);
                        #recompute_reads
                    }
                    #barrier
                    #load_registers
                    for step in 0..steps {
                        let (block_start, block_end) = (t0 + step, t0 + step + 1);
                        #recompute_writes
                        #barrier
                        // The next step's inputs, in flight while this step runs.
                        {
                            let block_start = t0 + step + 1;
                            let block_end = select(step + 1 < steps, block_start + 1, block_start);
                            #recompute_reads
                        }
                        #recompute_step
                        #barrier
                    }
                    #store_registers
                    {
                        let step = steps - 1;
                        #read_ahead
                    }
                    for step_from_end in 0..steps {
                        let step = steps - 1 - step_from_end;
                        let row = (batch_index * time_len + t0 + step) * heads + head;
                        let (block_start, block_end) = (t0 + step, t0 + step + 1);
                        #trade_state_buffers
                        if comptime![prefetch_states] {
                            #previous_writes
                        } else {
                            #load_previous
                        }
                        #primal_writes
                        #barrier
                        // The step before's states, inputs and output gradients, in flight
                        // while this step runs.
                        if step > 0 {
                            let step = step - 1;
                            #read_ahead
                        }
                        #primal_lets
                        #definitions
                        #sinks
                        #barrier
                    }
                }
                #save
                #finish
            }
        }
    }

    /// Host functions that launch the kernels from handles (shapes already validated).
    fn launchers(&self) -> TokenStream {
        let cell = self.cell;
        let dims = cell.dims.iter().enumerate().map(|(n, d)| {
            let name = format_ident!("dim_{}", d.name);
            quote!(let #name = dims[#n];)
        });
        let mut dims: Vec<TokenStream> = dims.collect();
        let mut dim_args: Vec<TokenStream> = cell
            .dims
            .iter()
            .map(|d| {
                let name = format_ident!("dim_{}", d.name);
                quote!(#name)
            })
            .collect();
        dim_args.push(quote!(schedule.chunk));
        // The split axis' tile (resolved by the host; the whole axis if unset) and the number
        // of cubes per sequence.
        match &self.split {
            Some(plan) => {
                let dim = self.dim(plan.dim);
                dims.push(quote! {
                    let tile = schedule.tile.unwrap_or(#dim).clamp(1, #dim);
                    let tiles = #dim.div_ceil(tile);
                });
                dim_args.push(quote!(tile));
            }
            None => dims.push(quote!(let tiles = 1usize;)),
        }
        dims.push(quote! {
            let shared_workspace =
                schedule.placement == ::rak::codegen::schedule::Placement::Shared;
        });
        dim_args.push(quote!(shared_workspace));
        dim_args.push(quote!(schedule.cube_dim as usize));
        dim_args.push(quote!(schedule.sum_parts));
        // `element` views a buffer as an array of F, `single` as an array of f32.
        let arrays = |kind: &str, list: TokenStream, count: usize| {
            let view = ident(kind);
            let items = (0..count).map(|n| quote!(#view(&#list[#n])));
            quote!(#(#items,)*)
        };
        let inputs = arrays("element", quote!(buffers.inputs), cell.inputs.len());
        let params = arrays("element", quote!(buffers.params), cell.params.len());
        let states = cell.states.len();
        let initial = arrays("element", quote!(initial), states);
        let outputs = arrays("element", quote!(buffers.outputs), cell.outputs.len());
        let finals = arrays("element", quote!(buffers.final_states), states);
        let checkpoints = arrays("single", quote!(checkpoints), states);
        let grad_outputs = arrays("element", quote!(buffers.grad_outputs), cell.outputs.len());
        let grad_finals = arrays("element", quote!(buffers.grad_final_states), states);
        let grad_inputs = arrays("element", quote!(buffers.grad_inputs), cell.inputs.len());
        let grad_params = arrays("single", quote!(param_partials), cell.params.len());
        let grad_initial = arrays("element", quote!(buffers.grad_initial_states), states);
        let backward_checkpoints = arrays("single", quote!(buffers.checkpoints), states);
        // One compilation argument per runtime parameter of each kernel: its arrays and the
        // workspace, then the scans' three scalars (time and the launch's range).
        let (inputs_n, params_n, outputs_n) =
            (cell.inputs.len(), cell.params.len(), cell.outputs.len());
        let forward_arrays = inputs_n + params_n + 3 * states + outputs_n + 1;
        let backward_arrays = 2 * inputs_n + 2 * params_n + 3 * states + outputs_n + 1;
        let compilation_args = |arrays: usize, scalars: usize| {
            let mut args = vec![quote!(ArrayCompilationArg { inplace: None }); arrays];
            args.extend(vec![quote!(Default::default()); scalars]);
            args
        };
        // `name(client, dims, heads, schedule)`: the kernel's definition at these sizes.
        let definition = |kernel: &str, arrays: usize, scalars: usize, flags: TokenStream| {
            let name = format_ident!("{kernel}_definition");
            let doc = format!(
                " The definition of [`{kernel}`] at these sizes (to print its CUDA or WGSL source)."
            );
            let module = ident(kernel);
            let kernel_type = format_ident!("{}", kernel[..1].to_uppercase() + &kernel[1..]);
            let compilation = compilation_args(arrays, scalars);
            quote! {
                #[doc = #doc]
                pub fn #name<F: Float + CubeElement, R: Runtime>(
                    client: &ComputeClient<R>,
                    dims: &[usize],
                    heads: usize,
                    schedule: ::rak::codegen::schedule::Schedule,
                ) -> cubecl::prelude::KernelDefinition {
                    #(#dims)*
                    let _ = tiles;
                    let settings = KernelSettings::default().cube_dim(CubeDim::new_1d(schedule.cube_dim));
                    #module::#kernel_type::<F, R>::new(
                        settings,
                        client.clone(),
                        #(#compilation,)*
                        heads,
                        #(#dim_args,)*
                        #flags
                    )
                    .define()
                }
            }
        };
        // The forward scan's `registers` flag, if it has states to hold in registers.
        let registers = (!crate::schedule::register_states(cell).is_empty())
            .then(|| quote!(schedule.registers,));
        let forward_definition = definition(
            "forward",
            forward_arrays,
            3,
            quote!(schedule.stage, true, true, #registers),
        );
        // The backward scan's (`recompute_registers`), if its recomputation has states to
        // hold in registers.
        let backward_registers = (!crate::schedule::recomputed_register_states(cell).is_empty())
            .then(|| quote!(schedule.recompute_registers,));
        let backward_definition =
            definition("backward", backward_arrays, 3, quote!(#backward_registers));
        let step_arrays = inputs_n + params_n + states + outputs_n + 1;
        let step_definition = definition("step", step_arrays, 0, TokenStream::new());
        let step_states = arrays("element", quote!(buffers.states), states);
        let views = quote! {
            let element = |array: &::rak::kernels::DeviceArray| unsafe {
                ArrayArg::from_raw_parts(array.handle.clone(), array.len)
            };
            let single = element;
        };
        quote! {
            /// Launches [`forward`] for the steps `steps`; `buffers` must have been validated
            /// against `shape`.
            pub fn launch_forward<F: Float + CubeElement, R: Runtime>(
                client: &ComputeClient<R>,
                shape: &::rak::codegen::ScanShape,
                schedule: ::rak::codegen::schedule::Schedule,
                steps: ::core::ops::Range<usize>,
                buffers: &::rak::kernels::ForwardBuffers,
                workspace: &::rak::kernels::DeviceArray,
                placeholder: &::rak::kernels::DeviceArray,
            ) {
                let dims = &shape.dims;
                #(#dims)*
                #views
                // Absent initial states and checkpoints: the kernel never reads these.
                let placeholders = vec![placeholder.clone(); #states];
                let initial = buffers.initial_states.as_deref().unwrap_or(&placeholders);
                let checkpoints = buffers.checkpoints.as_deref().unwrap_or(&placeholders);
                // Safety: every buffer was checked against the shape, and the kernel reads and
                // writes only inside the shape (tested on the software adapter).
                unsafe { forward::launch_unchecked::<F, R>(
                    client,
                    CubeCount::Static((shape.batch * shape.heads * tiles) as u32, 1, 1),
                    CubeDim::new_1d(schedule.cube_dim),
                    #inputs #params #initial #outputs #finals #checkpoints
                    single(workspace),
                    shape.time as u32,
                    steps.start as u32,
                    steps.end as u32,
                    shape.heads,
                    #(#dim_args,)*
                    schedule.stage,
                    buffers.initial_states.is_some(),
                    buffers.checkpoints.is_some(),
                    #registers
                ) };
            }

            #forward_definition

            #backward_definition

            #step_definition

            /// Launches [`step`] (the split axis whole, whatever `schedule.tile` says);
            /// `buffers` must have been validated against `shape` (one step).
            pub fn launch_step<F: Float + CubeElement, R: Runtime>(
                client: &ComputeClient<R>,
                shape: &::rak::codegen::ScanShape,
                schedule: ::rak::codegen::schedule::Schedule,
                buffers: &::rak::kernels::StepBuffers,
                workspace: &::rak::kernels::DeviceArray,
            ) {
                let schedule = ::rak::codegen::schedule::Schedule { tile: None, ..schedule };
                let dims = &shape.dims;
                #(#dims)*
                #views
                // Safety: as for the forward scan.
                unsafe { step::launch_unchecked::<F, R>(
                    client,
                    CubeCount::Static((shape.batch * shape.heads * tiles) as u32, 1, 1),
                    CubeDim::new_1d(schedule.cube_dim),
                    #inputs #params #step_states #outputs
                    single(workspace),
                    shape.heads,
                    #(#dim_args,)*
                ) };
            }

            /// Launches [`backward`] for the chunks `chunks_from_end` (counted from the last);
            /// `buffers` must have been validated against `shape`.
            pub fn launch_backward<F: Float + CubeElement, R: Runtime>(
                client: &ComputeClient<R>,
                shape: &::rak::codegen::ScanShape,
                schedule: ::rak::codegen::schedule::Schedule,
                chunks_from_end: ::core::ops::Range<usize>,
                buffers: &::rak::kernels::BackwardBuffers,
                param_partials: &[::rak::kernels::DeviceArray],
                workspace: &::rak::kernels::DeviceArray,
            ) {
                let dims = &shape.dims;
                #(#dims)*
                #views
                // Safety: as for the forward scan.
                unsafe { backward::launch_unchecked::<F, R>(
                    client,
                    CubeCount::Static((shape.batch * shape.heads * tiles) as u32, 1, 1),
                    CubeDim::new_1d(schedule.cube_dim),
                    #inputs #params #backward_checkpoints #grad_outputs #grad_finals
                    #grad_inputs #grad_params #grad_initial
                    single(workspace),
                    shape.time as u32,
                    chunks_from_end.start as u32,
                    chunks_from_end.end as u32,
                    shape.heads,
                    #(#dim_args,)*
                    #backward_registers
                ) };
            }
        }
    }
}

/// Emits the statements computing expressions, one `let` per node, each node once per scope.
struct ExprEmitter<'e, 'a> {
    emitter: &'e Emitter<'a>,
    /// Sums already in the workspace: read, not recomputed.
    materialized: HashSet<ExprId>,
    /// Innermost last: the statements of the loops being emitted.
    blocks: Vec<Vec<TokenStream>>,
    /// Innermost last: what each open scope computed, and the index it binds.
    frames: Vec<(Option<IndexId>, HashMap<ExprId, Ident>)>,
    free: HashMap<ExprId, BTreeSet<IndexId>>,
    counter: usize,
    /// Where the states held in registers are read: a load of one at these indices reads this
    /// slot of its array (no other load of them is emitted).
    register_view: Option<(Vec<IndexId>, TokenStream)>,
}

impl<'e, 'a> ExprEmitter<'e, 'a> {
    fn new(emitter: &'e Emitter<'a>, materialized: HashSet<ExprId>) -> Self {
        ExprEmitter {
            emitter,
            materialized,
            blocks: vec![Vec::new()],
            frames: vec![(None, HashMap::new())],
            free: HashMap::new(),
            counter: 0,
            register_view: None,
        }
    }

    fn finish(mut self) -> Vec<TokenStream> {
        self.blocks.pop().unwrap_or_default()
    }

    fn push(&mut self, statement: TokenStream) {
        if let Some(block) = self.blocks.last_mut() {
            block.push(statement);
        }
    }

    fn fresh(&mut self) -> Ident {
        self.counter += 1;
        format_ident!("v{}", self.counter)
    }

    /// The index variables free in an expression.
    fn free_indices(&mut self, expr: ExprId) -> BTreeSet<IndexId> {
        if let Some(free) = self.free.get(&expr) {
            return free.clone();
        }
        let cell = self.emitter.cell;
        let free = match cell.exprs.get(expr).clone() {
            Expr::Const(_) => BTreeSet::new(),
            Expr::Load { indices, .. } => indices.into_iter().collect(),
            Expr::Unary(_, a) => self.free_indices(a),
            Expr::Binary(_, a, b) => {
                let mut free = self.free_indices(a);
                free.extend(self.free_indices(b));
                free
            }
            Expr::Sum { index, body } => {
                let mut free = self.free_indices(body);
                free.remove(&index);
                free
            }
        };
        self.free.insert(expr, free.clone());
        free
    }

    /// A variable already holding `expr` in the current scope, if any: found in a frame, and
    /// no frame opened since binds an index free in `expr`.
    fn lookup(&mut self, expr: ExprId) -> Option<Ident> {
        let free = self.free_indices(expr);
        for depth in (0..self.frames.len()).rev() {
            if let Some(found) = self.frames[depth].1.get(&expr) {
                return Some(found.clone());
            }
            if let Some(bound) = self.frames[depth].0
                && free.contains(&bound)
            {
                return None;
            }
        }
        None
    }

    fn emit(&mut self, expr: ExprId) -> Ident {
        if let Some(known) = self.lookup(expr) {
            return known;
        }
        let emitter = self.emitter;
        let value = match emitter.cell.exprs.get(expr).clone() {
            Expr::Const(Constant(c)) => {
                let name = self.fresh();
                let literal = float(c);
                self.push(quote!(let #name = #literal;));
                name
            }
            Expr::Load { value, indices } => {
                let name = self.fresh();
                let load = self.load(value, &indices);
                self.push(quote!(let #name = #load;));
                name
            }
            Expr::Unary(op, a) => {
                let a = self.emit(a);
                self.apply_unary(op, &a)
            }
            Expr::Binary(op, a, b) => {
                let (a, b) = (self.emit(a), self.emit(b));
                let name = self.fresh();
                let value = match op {
                    BinaryOp::Add => quote!(#a + #b),
                    BinaryOp::Sub => quote!(#a - #b),
                    BinaryOp::Mul => quote!(#a * #b),
                    BinaryOp::Div => quote!(#a / #b),
                    BinaryOp::Max => quote!(max(#a, #b)),
                    BinaryOp::Min => quote!(min(#a, #b)),
                    BinaryOp::GreaterEq => quote!(select(#a >= #b, 1f32, 0f32)),
                };
                self.push(quote!(let #name = #value;));
                name
            }
            Expr::Sum { .. } if self.materialized.contains(&emitter.sum_class(expr)) => {
                let name = self.fresh();
                let free: Vec<IndexId> = emitter.cell.free_indices(expr).into_iter().collect();
                let flat = emitter.flat_index(&free);
                let at = emitter.at(Buffer::Sum(emitter.sum_class(expr)));
                let read = emitter.step_read(&at, flat);
                self.push(quote!(let #name = #read;));
                name
            }
            Expr::Sum { index, body } => {
                let name = self.fresh();
                let var = emitter.index_var(index);
                let extent = emitter.extent(emitter.cell.index_dim(index));
                let (statements, term) = self.term(index, body);
                // A sum over the split axis adds up the cube's tile (a per-tile part).
                let body = emitter.guarded(&[index], quote!(#(#statements)* #name += #term;));
                self.push(quote! {
                    let mut #name = 0f32;
                    for #var in 0..#extent {
                        #body
                    }
                });
                name
            }
        };
        if let Some(frame) = self.frames.last_mut() {
            frame.1.insert(expr, value.clone());
        }
        value
    }

    /// One term of `Σ_index body`: the statements computing `body` with `index` bound (in a new
    /// scope, so that nothing depending on `index` is reused outside it), and its variable.
    fn term(&mut self, index: IndexId, body: ExprId) -> (Vec<TokenStream>, Ident) {
        self.blocks.push(Vec::new());
        self.frames.push((Some(index), HashMap::new()));
        let term = self.emit(body);
        self.frames.pop();
        (self.blocks.pop().unwrap_or_default(), term)
    }

    /// `let v = op(a);` with the function written out in f32 arithmetic.
    fn apply_unary(&mut self, op: UnaryOp, a: &Ident) -> Ident {
        let name = self.fresh();
        let value = match op {
            UnaryOp::Neg => quote!(-#a),
            UnaryOp::Exp => quote!(#a.exp()),
            UnaryOp::Log => quote!(#a.ln()),
            UnaryOp::Sigmoid => quote!(1f32 / (1f32 + (-#a).exp())),
            // log σ(x) = min(x, 0) − log(1 + e^(−|x|))
            UnaryOp::LogSigmoid => quote!(min(#a, 0f32) - (1f32 + (-#a.abs()).exp()).ln()),
            UnaryOp::Tanh => quote!(#a.tanh()),
            // softplus(x) = max(x, 0) + log(1 + e^(−|x|))
            UnaryOp::Softplus => quote!(max(#a, 0f32) + (1f32 + (-#a.abs()).exp()).ln()),
            UnaryOp::Silu => quote!(#a / (1f32 + (-#a).exp())),
            UnaryOp::Relu => quote!(max(#a, 0f32)),
            UnaryOp::Abs => quote!(#a.abs()),
            UnaryOp::Sqrt => quote!(#a.sqrt()),
            UnaryOp::Step => quote!(select(#a > 0f32, 1f32, 0f32)),
            UnaryOp::Sign => quote!(select(#a > 0f32, 1f32, select(#a < 0f32, -1f32, 0f32))),
        };
        self.push(quote!(let #name = #value;));
        name
    }

    /// The element `value[indices]` read from where it lives.
    fn load(&mut self, value: Value, indices: &[IndexId]) -> TokenStream {
        let emitter = self.emitter;
        let cell = emitter.cell;
        let flat = emitter.flat_index(indices);
        if let Value::State(state, _) = value
            && emitter.registers.contains(&state)
        {
            let slot = match &self.register_view {
                Some((aligned, slot)) if aligned == indices => slot,
                _ => panic!(
                    "state `{}` is held in registers but read where no slot holds it \
                     (register_states admitted a load the emitter cannot serve)",
                    cell.states[state.0].name
                ),
            };
            let array = emitter.register_names(state).array;
            return quote!(#array[#slot]);
        }
        match crate::schedule::value_buffer(value) {
            Some(Buffer::Input(i)) => {
                // The input buffers hold a block of steps: this step's slot.
                let slot = emitter.local_numel(&cell.inputs[i.0].shape);
                let at = emitter.at(Buffer::Input(i));
                emitter.step_read(&at, quote!(input_step * #slot + #flat))
            }
            Some(buffer) => emitter.step_read(&emitter.at(buffer), flat),
            None => {
                let Value::Param(p) = value else {
                    unreachable!("only parameters are read from global memory")
                };
                let arg = format_ident!("param_{}", cell.params[p.0].name);
                let numel = emitter.shape_numel(&cell.params[p.0].shape);
                let global = emitter.global_index(indices);
                quote!(f32::cast_from(#arg[head * #numel + #global]))
            }
        }
    }
}
