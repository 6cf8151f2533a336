//! The backward scan's kernel: per chunk, in reverse, the states recomputed from the chunk's
//! checkpoint, then the walk through the chunk's steps in reverse running the backward step,
//! with the next step's inputs and states read ahead.

use super::*;

/// At most this many registers per unit hold the states the backward scan reads ahead
/// ([`Emitter::backward_kernel`]); larger states are read when their step starts.
const PREFETCH_STATE_REGISTERS: usize = 32;

impl Emitter<'_> {
    /// The backward scan's kernel (see the module doc): the chunks from the last, each
    /// recomputed from its checkpoint and then walked in reverse.
    pub(super) fn backward_kernel(&self) -> TokenStream {
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
        let loop_budget_check = self.loop_budget_check();
        let carried: Vec<Buffer> = (0..cell.states.len())
            .map(|s| Buffer::Grad(Grad::StateFromNext(StateId(s))))
            .chain((0..cell.params.len()).map(|p| Buffer::ParamGradSum(ParamId(p))))
            .collect();
        let (save, restore) = (self.persist(&carried, true), self.persist(&carried, false));

        let setup = self.backward_setup(&grad_finals);
        let restore_checkpoint = self.restore_checkpoint();
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
        // The state gradients the walk may carry in registers: loaded from the workspace
        // before the chunk's walk, stored back to it after.
        let carried = crate::schedule::carried_register_grads(self.step);
        let flags = (ident("walk_registers"), ident("walk_in_registers"));
        let (definitions, walk_param) = choose_registers(&carried, flags, |held| {
            (self.with_carried_registers(held.clone())).walk_definitions(&mut ready.clone())
        });
        let HeldInRegisters {
            layout: carried_layout,
            load: load_carried,
            store: store_carried,
        } = (self.with_carried_registers(carried.clone())).carried_in_registers(&carried);
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
        let sinks = self.walk_sinks(&grad_inputs);
        let finish = self.backward_finish(&grad_initial, &grad_params);
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
                #walk_param
            ) {
                #prelude
                #register_layout
                #carried_layout
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
                    #load_carried
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
                    #store_carried
                }
                #save
                #finish
                #loop_budget_check
            }
        }
    }

    /// The gradients' start at the last step: parameter gradient sums zeroed, the gradients
    /// of the final states loaded (as per-tile parts, the first tile's).
    fn backward_setup(&self, grad_finals: &[Ident]) -> TokenStream {
        let cell = self.cell;
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
        setup
    }

    /// The chunk's checkpoint into the state buffers and the chunk's first slot.
    fn restore_checkpoint(&self) -> TokenStream {
        let cell = self.cell;
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
        restore_checkpoint
    }

    /// The backward step's definitions (gradients of lets, states, inputs, parameters), in
    /// phases that need no barrier between them, each phase followed by one.
    fn walk_definitions(&self, ready: &mut HashSet<ExprId>) -> TokenStream {
        // The definitions in phases that need no barrier between them.
        let mut definitions = TokenStream::new();
        for phase in crate::schedule::definition_phases(self.step) {
            let last = phase.len() - 1;
            for (n, definition) in phase.iter().map(|&d| &self.step.definitions[d]).enumerate() {
                if let Grad::State(state) | Grad::StatePrevious(state) = definition.grad
                    && self.carried_registers.contains(&state)
                {
                    definitions.extend(self.carried_register_definition(ready, definition, state));
                    continue;
                }
                definitions.extend(self.define_buffer(
                    ready,
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
        definitions
    }

    /// After the definitions: the input gradients written out, the parameter gradients
    /// added to their sums over time, and the gradients carried to the step before copied
    /// where they have a buffer of their own.
    fn walk_sinks(&self, grad_inputs: &[Ident]) -> TokenStream {
        let cell = self.cell;
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
        sinks
    }

    /// After the first chunk: the gradients of the initial states and the parameter
    /// gradients' sums over time written out.
    fn backward_finish(&self, grad_initial: &[Ident], grad_params: &[Ident]) -> TokenStream {
        let cell = self.cell;
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
        let param_row = match &self.plan.split {
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
        finish
    }
}
