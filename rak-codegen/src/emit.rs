//! Emit pass: a cell's IR and backward step → cubecl `#[cube]` kernels, as Rust tokens.
//!
//! Two kernels and two host launchers per cell, following [`crate::schedule`]:
//!
//! - `forward`: one cube per sequence (batch element × head) runs the time loop; per step it
//!   activates the inputs, computes the lets, the updates and the outputs, one statement at a
//!   time, each statement's elements shared among the cube's units; optional initial states;
//!   final states; a checkpoint of the states every `chunk` steps when asked.
//! - `backward`: the same cubes walk the chunks in reverse, recompute the chunk's states from
//!   its checkpoint, then run the backward step ([`crate::ir::BackwardStep`]) for each step in
//!   reverse. It writes the gradients of the inputs (before activation) and of the initial
//!   states, and each sequence's sum over time of the parameter gradients (the host sums those
//!   over the batch in a second pass: no atomics, bitwise reproducible).
//!
//! Kernels are generic over the element type `F` of inputs, parameters and outputs; states,
//! intermediates and accumulations are f32. Every sub-expression becomes one `let`; a `sum`
//! becomes a loop; identical sub-expressions are computed once where their indices allow.

use crate::ir::*;
use crate::schedule::{Buffer, Pass, WorkspaceLayout};
use proc_macro2::{Ident, Literal, Span, TokenStream};
use quote::{format_ident, quote};
use std::collections::{BTreeSet, HashMap, HashSet};

/// The kernels and launchers of a cell, as items for a module that has
/// `use cubecl::prelude::*;` in scope.
pub fn emit_kernels(step: &BackwardStep) -> TokenStream {
    let emitter = Emitter::new(step);
    let forward = emitter.forward_kernel();
    let backward = emitter.backward_kernel();
    let launchers = emitter.launchers();
    quote! {
        #forward
        #backward
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

struct Emitter<'a> {
    step: &'a BackwardStep,
    cell: &'a Cell,
    /// Each materialised sum's class representative (see [`crate::schedule::sum_classes`]).
    sum_classes: HashMap<ExprId, ExprId>,
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
    fn new(step: &'a BackwardStep) -> Self {
        Emitter {
            step,
            cell: &step.cell,
            sum_classes: crate::schedule::sum_classes(step),
        }
    }

    fn dim(&self, dim: DimId) -> Ident {
        format_ident!("dim_{}", self.cell.dims[dim.0].name)
    }

    /// `(dim_K * dim_V)`, or `1usize` for a scalar: the elements of a shape.
    fn shape_numel(&self, shape: &Shape) -> TokenStream {
        let mut dims = shape.iter().map(|&d| self.dim(d));
        match dims.next() {
            None => quote!(1usize),
            Some(first) => {
                let product = dims.fold(quote!(#first), |product, dim| quote!(#product * #dim));
                quote!((#product))
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
    fn buffer_size(&self, buffer: Buffer) -> TokenStream {
        let shapes = WorkspaceLayout::shapes(self.cell, buffer);
        let sizes: Vec<TokenStream> = shapes.iter().map(|s| self.shape_numel(s)).collect();
        let total = if sizes.is_empty() {
            quote!(0usize)
        } else {
            quote!((#(#sizes)+*))
        };
        if buffer == Buffer::ChunkStates {
            quote!((#total * (chunk + 1)))
        } else {
            total
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
            previous = Some((name, self.buffer_size(buffer)));
        }
        let total = match previous {
            None => quote!(0usize),
            Some((name, size)) => quote!(#name + #size),
        };
        tokens.extend(quote!(let workspace_size = comptime![#total];));
        // The offset of each state inside one slot of the chunk's states.
        let mut slot_offset = quote!(0usize);
        for state in &self.cell.states {
            let name = format_ident!("slot_{}", state.name);
            tokens.extend(quote!(let #name = comptime![#slot_offset];));
            let size = self.shape_numel(&state.shape);
            slot_offset = quote!(#name + #size);
        }
        tokens.extend(quote!(let slot_size = comptime![#slot_offset];));
        tokens
    }

    fn kernel_prelude(&self, pass: Pass) -> TokenStream {
        let offsets = self.workspace_offsets(pass);
        quote! {
            let sequence = CUBE_POS as usize;
            let batch_index = sequence / heads;
            let head = sequence % heads;
            let time_len = time as usize;
            let chunk_count = (time_len + chunk - 1) / chunk;
            let unit = UNIT_POS as usize;
            let units = CUBE_DIM as usize;
            #offsets
            let base = sequence * workspace_size;
        }
    }

    /// A loop sharing `numel` elements among the cube's units; `body` sees the element as `e`.
    fn for_each_element(&self, numel: TokenStream, body: TokenStream) -> TokenStream {
        quote! {
            let mut e = unit;
            while e < #numel {
                #body
                e += units;
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

    /// A loop over the elements of one row of a value: `arg[row * numel + e]` to or from the
    /// workspace buffer at `at`.
    fn transfer(
        &self,
        direction: Transfer,
        arg: &Ident,
        row: TokenStream,
        shape: &Shape,
        at: TokenStream,
    ) -> TokenStream {
        let numel = self.shape_numel(shape);
        let element = quote!(#arg[#row * #numel + e]);
        let buffer = quote!(workspace[base + #at + e]);
        let body = match direction {
            Transfer::Load => quote!(#buffer = f32::cast_from(#element);),
            Transfer::Store => quote!(#element = F::cast_from(#buffer);),
            Transfer::StoreF32 => quote!(#element = #buffer;),
        };
        self.for_each_element(numel, body)
    }

    /// Decodes the element `e` into the statement's index variables (row-major).
    fn decode_indices(&self, indices: &[IndexId]) -> TokenStream {
        let mut tokens = quote!(let mut rest = e;);
        for (position, &index) in indices.iter().enumerate().rev() {
            let var = self.index_var(index);
            let dim = self.dim(self.cell.index_dim(index));
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

    /// The row-major position of `indices` in a value of their dims.
    fn flat_index(&self, indices: &[IndexId]) -> TokenStream {
        let mut flat = quote!(0usize);
        for (position, &index) in indices.iter().enumerate() {
            let var = self.index_var(index);
            if position == 0 {
                flat = quote!(#var);
            } else {
                let dim = self.dim(self.cell.index_dim(index));
                flat = quote!((#flat) * #dim + #var);
            }
        }
        flat
    }

    fn index_var(&self, index: IndexId) -> Ident {
        format_ident!("{}_{}", self.cell.indices[index.0].name, index.0)
    }

    /// `target[indices] = expr` for every element: `store(value)` writes one element. First
    /// materialises the `sum`s inside `expr` that this step has not computed yet (`ready`).
    fn statement(
        &self,
        ready: &mut HashSet<ExprId>,
        indices: &[IndexId],
        expr: ExprId,
        store: impl Fn(&Ident) -> TokenStream,
    ) -> TokenStream {
        let mut tokens = TokenStream::new();
        for sum in self.cell.sums_under(&[expr]) {
            let class = self.sum_class(sum);
            if sum != expr && !ready.contains(&class) {
                let free: Vec<IndexId> = self.cell.free_indices(sum).into_iter().collect();
                let at = self.buffer_name(Buffer::Sum(class));
                tokens.extend(self.element_loop(
                    ready,
                    &free,
                    sum,
                    |value| quote!(workspace[base + #at + e] = #value;),
                ));
                tokens.extend(quote!(sync_storage();));
                ready.insert(class);
            }
        }
        tokens.extend(self.element_loop(ready, indices, expr, store));
        tokens
    }

    /// One loop over the elements of `indices`, computing `expr` from materialised sums.
    fn element_loop(
        &self,
        ready: &HashSet<ExprId>,
        indices: &[IndexId],
        expr: ExprId,
        store: impl Fn(&Ident) -> TokenStream,
    ) -> TokenStream {
        let shape: Shape = indices.iter().map(|&i| self.cell.index_dim(i)).collect();
        let decode = self.decode_indices(indices);
        let mut exprs = ExprEmitter::new(self, ready.clone());
        let value = exprs.emit(expr);
        let statements = exprs.finish();
        let write = store(&value);
        self.for_each_element(
            self.shape_numel(&shape),
            quote!(#decode #(#statements)* #write),
        )
    }

    /// Writes a workspace buffer from an expression, for every element of its shape.
    fn define_buffer(
        &self,
        ready: &mut HashSet<ExprId>,
        buffer: Buffer,
        indices: &[IndexId],
        expr: ExprId,
    ) -> TokenStream {
        let at = self.buffer_name(buffer);
        self.statement(
            ready,
            indices,
            expr,
            |value| quote!(workspace[base + #at + e] = #value;),
        )
    }

    fn input_arg(&self, id: usize) -> Ident {
        format_ident!("input_{}", self.cell.inputs[id].name)
    }

    /// Loads the inputs of step `row` (activated, and before activation if asked).
    fn load_inputs(&self, keep_pre_activation: bool) -> TokenStream {
        let mut tokens = TokenStream::new();
        for (id, input) in self.cell.inputs.iter().enumerate() {
            let arg = self.input_arg(id);
            let numel = self.shape_numel(&input.shape);
            let at = self.buffer_name(Buffer::Input(InputId(id)));
            let mut exprs = ExprEmitter::new(self, HashSet::new());
            let pre = ident("pre");
            let activated = match input.activation {
                Some(op) => exprs.apply_unary(op, &pre),
                None => pre.clone(),
            };
            let statements = exprs.finish();
            let store_pre = if keep_pre_activation {
                let at_pre = self.buffer_name(Buffer::InputPreActivation(InputId(id)));
                quote!(workspace[base + #at_pre + e] = pre;)
            } else {
                TokenStream::new()
            };
            tokens.extend(self.for_each_element(
                numel.clone(),
                quote! {
                    let pre = f32::cast_from(#arg[row * #numel + e]);
                    #store_pre
                    #(#statements)*
                    workspace[base + #at + e] = #activated;
                },
            ));
        }
        tokens.extend(quote!(sync_storage();));
        tokens
    }

    /// Lets (each followed by a barrier) and updates into the new states.
    fn lets_and_updates(&self, ready: &mut HashSet<ExprId>) -> TokenStream {
        let mut tokens = self.lets(ready);
        for update in &self.cell.updates {
            tokens.extend(self.define_buffer(
                ready,
                Buffer::NewState(update.state),
                &update.indices,
                update.expr,
            ));
        }
        tokens.extend(quote!(sync_storage();));
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
            ));
            tokens.extend(quote!(sync_storage();));
        }
        tokens
    }

    /// `workspace[to] = workspace[from]` for every state (element `e`).
    fn copy_states(
        &self,
        from: impl Fn(StateId) -> TokenStream,
        to: impl Fn(StateId) -> TokenStream,
    ) -> TokenStream {
        let mut tokens = TokenStream::new();
        for (id, state) in self.cell.states.iter().enumerate() {
            let (source, destination) = (from(StateId(id)), to(StateId(id)));
            tokens.extend(self.for_each_element(
                self.shape_numel(&state.shape),
                quote!(workspace[base + #destination + e] = workspace[base + #source + e];),
            ));
        }
        tokens
    }

    fn at(&self, buffer: Buffer) -> TokenStream {
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
        quote!(#[comptime] heads: usize, #(#[comptime] #dims: usize,)* #[comptime] chunk: usize)
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

        let mut init_states = TokenStream::new();
        for (id, state) in cell.states.iter().enumerate() {
            let at = self.at(Buffer::State(StateId(id)));
            let initial = format_ident!("initial_{}", state.name);
            let numel = self.shape_numel(&state.shape);
            let init = float(state.init);
            init_states.extend(self.for_each_element(
                numel.clone(),
                quote! {
                    if comptime![has_initial] {
                        workspace[base + #at + e] = f32::cast_from(#initial[sequence * #numel + e]);
                    } else {
                        workspace[base + #at + e] = #init;
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
        let load_inputs = self.load_inputs(false);
        let mut ready = HashSet::new();
        let lets_and_updates = self.lets_and_updates(&mut ready);
        let mut outputs_code = TokenStream::new();
        for output in &cell.outputs {
            let arg = format_ident!("output_{}", output.name);
            let numel = self.shape_numel(&output.shape);
            outputs_code.extend(self.statement(
                &mut ready,
                &output.indices,
                output.expr,
                |value| quote!(#arg[row * #numel + e] = F::cast_from(#value);),
            ));
        }
        let advance = self.copy_states(
            |s| self.at(Buffer::NewState(s)),
            |s| self.at(Buffer::State(s)),
        );
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
            /// The forward scan: one cube per sequence (batch element × head).
            #[cube(launch)]
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
                #[comptime] has_initial: bool,
                #[comptime] write_checkpoints: bool,
            ) {
                #prelude
                // A later launch of the same scan resumes from the states in the workspace.
                if first_step == 0 {
                    #init_states
                }
                sync_storage();
                for t in first_step as usize..end_step as usize {
                    if comptime![write_checkpoints] {
                        if t % chunk == 0 {
                            #write_checkpoints
                        }
                    }
                    let row = (batch_index * time_len + t) * heads + head;
                    #load_inputs
                    #lets_and_updates
                    #outputs_code
                    #advance
                    sync_storage();
                }
                #finals_code
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
        let comptime_dims = self.comptime_dim_params();
        let prelude = self.kernel_prelude(Pass::Backward);

        let mut setup = TokenStream::new();
        for (id, param) in cell.params.iter().enumerate() {
            let at = self.at(Buffer::ParamGradSum(ParamId(id)));
            setup.extend(self.for_each_element(
                self.shape_numel(&param.shape),
                quote!(workspace[base + #at + e] = 0f32;),
            ));
        }
        for (id, state) in cell.states.iter().enumerate() {
            let at = self.at(Buffer::Grad(Grad::StateFromNext(StateId(id))));
            setup.extend(self.transfer(
                Transfer::Load,
                &grad_finals[id],
                quote!(sequence),
                &state.shape,
                at,
            ));
        }
        let mut restore_checkpoint = TokenStream::new();
        for (id, state) in cell.states.iter().enumerate() {
            let at = self.at(Buffer::State(StateId(id)));
            let slot = self.chunk_slot(StateId(id), quote!(0usize));
            let arg = format_ident!("checkpoint_{}", state.name);
            let numel = self.shape_numel(&state.shape);
            restore_checkpoint.extend(self.for_each_element(
                numel.clone(),
                quote! {
                    let value = #arg[(sequence * chunk_count + chunk_index) * #numel + e];
                    workspace[base + #at + e] = value;
                    workspace[base + #slot + e] = value;
                },
            ));
        }
        let recompute_inputs = self.load_inputs(false);
        let recompute_lets_and_updates = self.lets_and_updates(&mut HashSet::new());
        let keep_states = {
            let advance = self.copy_states(
                |s| self.at(Buffer::NewState(s)),
                |s| self.at(Buffer::State(s)),
            );
            let store = self.copy_states(
                |s| self.at(Buffer::NewState(s)),
                |s| self.chunk_slot(s, quote!(step + 1)),
            );
            quote!(#advance #store)
        };
        let load_primal_states = {
            let previous = self.copy_states(
                |s| self.chunk_slot(s, quote!(step)),
                |s| self.at(Buffer::State(s)),
            );
            let current = self.copy_states(
                |s| self.chunk_slot(s, quote!(step + 1)),
                |s| self.at(Buffer::NewState(s)),
            );
            quote!(#previous #current)
        };
        let primal_inputs = self.load_inputs(true);
        let mut ready = HashSet::new();
        let primal_lets = self.lets(&mut ready);
        let mut load_output_grads = TokenStream::new();
        for (id, output) in cell.outputs.iter().enumerate() {
            let at = self.at(Buffer::Grad(Grad::Output(OutputId(id))));
            load_output_grads.extend(self.transfer(
                Transfer::Load,
                &grad_outputs[id],
                quote!(row),
                &output.shape,
                at,
            ));
        }
        let mut definitions = TokenStream::new();
        for definition in &self.step.definitions {
            definitions.extend(self.define_buffer(
                &mut ready,
                Buffer::Grad(definition.grad),
                &definition.indices,
                definition.expr,
            ));
            definitions.extend(quote!(sync_storage();));
        }
        let mut sinks = TokenStream::new();
        for (id, input) in cell.inputs.iter().enumerate() {
            let at = self.at(Buffer::Grad(Grad::Input(InputId(id))));
            sinks.extend(self.transfer(
                Transfer::Store,
                &grad_inputs[id],
                quote!(row),
                &input.shape,
                at,
            ));
        }
        for (id, param) in cell.params.iter().enumerate() {
            let at = self.at(Buffer::Grad(Grad::Param(ParamId(id))));
            let sum = self.at(Buffer::ParamGradSum(ParamId(id)));
            sinks.extend(self.for_each_element(
                self.shape_numel(&param.shape),
                quote!(workspace[base + #sum + e] += workspace[base + #at + e];),
            ));
        }
        sinks.extend(self.copy_states(
            |s| self.at(Buffer::Grad(Grad::StatePrevious(s))),
            |s| self.at(Buffer::Grad(Grad::StateFromNext(s))),
        ));
        let mut finish = TokenStream::new();
        for (id, state) in cell.states.iter().enumerate() {
            let at = self.at(Buffer::Grad(Grad::StateFromNext(StateId(id))));
            finish.extend(self.transfer(
                Transfer::Store,
                &grad_initial[id],
                quote!(sequence),
                &state.shape,
                at,
            ));
        }
        for (id, param) in cell.params.iter().enumerate() {
            let at = self.at(Buffer::ParamGradSum(ParamId(id)));
            finish.extend(self.transfer(
                Transfer::StoreF32,
                &grad_params[id],
                quote!(sequence),
                &param.shape,
                at,
            ));
        }
        quote! {
            /// The backward scan: one cube per sequence, chunks in reverse, states recomputed
            /// from the forward scan's checkpoints. Parameter gradients are written per sequence
            /// (summed over time); the host sums them over the batch.
            #[cube(launch)]
            pub fn backward<F: Float>(
                #(#inputs: &Array<F>,)*
                #(#params: &Array<F>,)*
                #(#checkpoints: &Array<f32>,)*
                #(#grad_outputs: &Array<F>,)*
                #(#grad_finals: &Array<F>,)*
                #(#grad_inputs: &mut Array<F>,)*
                #(#grad_params: &mut Array<f32>,)*
                #(#grad_initial: &mut Array<F>,)*
                workspace: &mut Array<f32>,
                time: u32,
                first_chunk_from_end: u32,
                end_chunk_from_end: u32,
                #comptime_dims,
            ) {
                #prelude
                // A later launch of the same scan resumes from the gradients in the workspace.
                if first_chunk_from_end == 0 {
                    #setup
                }
                sync_storage();
                for chunk_from_end in first_chunk_from_end as usize..end_chunk_from_end as usize {
                    let chunk_index = chunk_count - 1 - chunk_from_end;
                    let t0 = chunk_index * chunk;
                    let remaining = time_len - t0;
                    let steps = select(remaining < chunk, remaining, chunk);
                    #restore_checkpoint
                    sync_storage();
                    for step in 0..steps {
                        let row = (batch_index * time_len + t0 + step) * heads + head;
                        #recompute_inputs
                        #recompute_lets_and_updates
                        #keep_states
                        sync_storage();
                    }
                    for step_from_end in 0..steps {
                        let step = steps - 1 - step_from_end;
                        let row = (batch_index * time_len + t0 + step) * heads + head;
                        #load_primal_states
                        #primal_inputs
                        #primal_lets
                        #load_output_grads
                        sync_storage();
                        #definitions
                        #sinks
                        sync_storage();
                    }
                }
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
        let dims: Vec<TokenStream> = dims.collect();
        let dim_args: Vec<Ident> = cell
            .dims
            .iter()
            .map(|d| format_ident!("dim_{}", d.name))
            .collect();
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
        // One compilation argument per runtime parameter of each kernel: its arrays, then the
        // workspace and three scalars (time and the launch's range).
        let (inputs_n, params_n, outputs_n) =
            (cell.inputs.len(), cell.params.len(), cell.outputs.len());
        let forward_runtime = inputs_n + params_n + 3 * states + outputs_n + 1 + 3;
        let backward_runtime = 2 * inputs_n + 2 * params_n + 3 * states + outputs_n + 1 + 3;
        let compilation_args = |runtime: usize| {
            let mut args = vec![quote!(ArrayCompilationArg { inplace: None }); runtime - 3];
            args.extend(vec![quote!(Default::default()); 3]);
            args
        };
        // `name(client, dims, heads, schedule)`: the kernel's definition at these sizes.
        let definition = |kernel: &str, runtime_args: usize, flags: TokenStream| {
            let name = format_ident!("{kernel}_definition");
            let doc = format!(
                " The definition of [`{kernel}`] at these sizes (to print its CUDA or WGSL source)."
            );
            let module = ident(kernel);
            let kernel_type = format_ident!("{}", kernel[..1].to_uppercase() + &kernel[1..]);
            let compilation = compilation_args(runtime_args);
            quote! {
                #[doc = #doc]
                pub fn #name<F: Float + CubeElement, R: Runtime>(
                    client: &ComputeClient<R>,
                    dims: &[usize],
                    heads: usize,
                    schedule: ::rak::codegen::schedule::Schedule,
                ) -> cubecl::prelude::KernelDefinition {
                    #(#dims)*
                    let settings = KernelSettings::default().cube_dim(CubeDim::new_1d(schedule.cube_dim));
                    #module::#kernel_type::<F, R>::new(
                        settings,
                        client.clone(),
                        #(#compilation,)*
                        heads,
                        #(#dim_args,)*
                        schedule.chunk,
                        #flags
                    )
                    .define()
                }
            }
        };
        let forward_definition = definition("forward", forward_runtime, quote!(true, true,));
        let backward_definition = definition("backward", backward_runtime, TokenStream::new());
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
                forward::launch::<F, R>(
                    client,
                    CubeCount::Static((shape.batch * shape.heads) as u32, 1, 1),
                    CubeDim::new_1d(schedule.cube_dim),
                    #inputs #params #initial #outputs #finals #checkpoints
                    single(workspace),
                    shape.time as u32,
                    steps.start as u32,
                    steps.end as u32,
                    shape.heads,
                    #(#dim_args,)*
                    schedule.chunk,
                    buffers.initial_states.is_some(),
                    buffers.checkpoints.is_some(),
                );
            }

            #forward_definition

            #backward_definition

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
                backward::launch::<F, R>(
                    client,
                    CubeCount::Static((shape.batch * shape.heads) as u32, 1, 1),
                    CubeDim::new_1d(schedule.cube_dim),
                    #inputs #params #backward_checkpoints #grad_outputs #grad_finals
                    #grad_inputs #grad_params #grad_initial
                    single(workspace),
                    shape.time as u32,
                    chunks_from_end.start as u32,
                    chunks_from_end.end as u32,
                    shape.heads,
                    #(#dim_args,)*
                    schedule.chunk,
                );
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
                let at = emitter.buffer_name(Buffer::Sum(emitter.sum_class(expr)));
                self.push(quote!(let #name = workspace[base + #at + #flat];));
                name
            }
            Expr::Sum { index, body } => {
                let name = self.fresh();
                let var = emitter.index_var(index);
                let dim = emitter.dim(emitter.cell.index_dim(index));
                self.blocks.push(Vec::new());
                self.frames.push((Some(index), HashMap::new()));
                let term = self.emit(body);
                self.frames.pop();
                let statements = self.blocks.pop().unwrap_or_default();
                self.push(quote! {
                    let mut #name = 0f32;
                    for #var in 0..#dim {
                        #(#statements)*
                        #name += #term;
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
        let buffer = match value {
            Value::Param(p) => {
                let arg = format_ident!("param_{}", cell.params[p.0].name);
                let numel = emitter.shape_numel(&cell.params[p.0].shape);
                return quote!(f32::cast_from(#arg[head * #numel + #flat]));
            }
            Value::Input(i) => Buffer::Input(i),
            Value::InputPreActivation(i) => Buffer::InputPreActivation(i),
            Value::State(s, StateTime::Previous) => Buffer::State(s),
            Value::State(s, StateTime::Current) => Buffer::NewState(s),
            Value::Let(l) => Buffer::Let(l),
            Value::Grad(g) => Buffer::Grad(g),
        };
        let at = emitter.buffer_name(buffer);
        quote!(workspace[base + #at + #flat])
    }
}
