//! The forward scan's kernel and the single-step kernel of streaming inference: the time
//! loop, one step at a time, with the states in registers or in the workspace.

use super::*;

impl Emitter<'_> {
    /// The forward scan's kernel: per cube (sequence × tile of the split axis), the initial
    /// states, the time loop running [`Self::forward_step`] on blocks of prefetched inputs, a
    /// checkpoint of the states every `chunk` steps when asked, and the final states.
    pub(super) fn forward_kernel(&self) -> TokenStream {
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
        let loop_budget_check = self.loop_budget_check();
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
                #loop_budget_check
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
            let replicated =
                self.plan.split.is_some() && self.split_guard(&output.indices).is_none();
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
    pub(super) fn step_kernel(&self) -> TokenStream {
        let cell = self.cell;
        let inputs = self.args("input", cell.inputs.iter().map(|i| &i.name));
        let params = self.args("param", cell.params.iter().map(|p| &p.name));
        let states = self.args("state", cell.states.iter().map(|s| &s.name));
        let outputs = self.args("output", cell.outputs.iter().map(|o| &o.name));
        let comptime_dims = self.comptime_dim_params();
        let prelude = self.kernel_prelude(Pass::Forward);
        let barrier = self.barrier();
        let loop_budget_check = self.loop_budget_check();
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
                #loop_budget_check
            }
        }
    }
}
