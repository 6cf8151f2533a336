//! Copies between kernel arguments, the workspace and the chunk's state slots: the inputs
//! of a step (read ahead while the previous step runs), the states and carried gradients
//! traded between steps, and the gradients the backward scan writes out.

use super::*;

/// Where [`Emitter::copy_states`] reads or writes: a per-step workspace buffer, or a slot of
/// the chunk's states (always in the cube's global workspace); the offset of the state.
pub(super) enum Place {
    Step(TokenStream),
    Chunk(TokenStream),
}

/// A copy of `numel` elements shared among a cube's units (element `flat` goes to unit
/// `flat mod units`) whose reads are issued before its writes ([`Emitter::gather`],
/// [`Emitter::prefetch`]). For each element, `locate` (statements) defines what `inside`
/// (whether the element is copied), `read` (its value) and `write` (statements that see the
/// value as `value`) use; it runs before the read and again before the write.
pub(super) struct GatheredCopy {
    pub(super) numel: TokenStream,
    pub(super) locate: TokenStream,
    pub(super) inside: TokenStream,
    pub(super) read: TokenStream,
    pub(super) write: TokenStream,
}

/// Copies split in time ([`Emitter::prefetch`]): the declaration of registers that hold every
/// element a unit copies, the reads into them, and the writes from them. The reads of the
/// next step's values are issued before a step's work and stay in flight while it runs; the
/// writes wait for them only when the next step starts.
pub(super) struct Prefetch {
    pub(super) registers: TokenStream,
    pub(super) reads: TokenStream,
    pub(super) writes: TokenStream,
}

/// Elements per unit whose reads [`Emitter::gather`] issues together (registers per unit).
const GATHER_BATCH: usize = 16;

/// Which way [`Emitter::transfer`] copies.
#[derive(Clone, Copy)]
pub(super) enum Transfer {
    /// Kernel argument (element type `F`) → workspace.
    Load,
    /// Workspace → kernel argument of element type `F`.
    Store,
    /// Workspace → kernel argument of f32.
    StoreF32,
}

impl Emitter<'_> {
    /// A copy that issues its reads before its writes: per unit, in batches of up to
    /// [`GATHER_BATCH`] elements, an unrolled loop (its trip count is known at compile time)
    /// reads every element of the batch into registers, then a second one writes them. So the
    /// latency of global memory is paid once per batch, not once per element (a loop that
    /// reads and then writes each element in turn waits for every read).
    pub(super) fn gather(&self, copy: &GatheredCopy) -> TokenStream {
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
    pub(super) fn prefetch(
        &self,
        prefix: &str,
        copies: &[GatheredCopy],
        enabled: TokenStream,
    ) -> Prefetch {
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
    pub(super) fn transfer(
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
        let replicated = self.plan.split.is_some() && !shape.iter().any(|&d| self.is_split(d));
        let body = match replicated {
            true => quote!(if tile_index == 0 { #store }),
            false => store,
        };
        self.shape_loop(shape, body)
    }

    /// The copy of one row of a value, `arg[row * numel + global]`, into the workspace buffer
    /// at `at` (the cube's tile of it).
    pub(super) fn load_copy(
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

    /// Loads the inputs of the steps `block_start..block_end` (at most `steps`, a comptime
    /// expression; `block_start` a multiple of it) activated, and before activation if asked
    /// and the backward step reads it (then `steps` is 1), into slots `s - block_start` of the
    /// input buffers, each input's reads issued together ([`Self::gather`]). `row` is the
    /// inputs' row at step `s`. No barrier.
    pub(super) fn load_inputs(
        &self,
        keep_pre_activation: bool,
        steps: TokenStream,
        row: TokenStream,
    ) -> TokenStream {
        let copies = self.input_copies(keep_pre_activation, steps, row);
        copies.iter().map(|copy| self.gather(copy)).collect()
    }

    /// The copies of [`Self::load_inputs`], one per input.
    pub(super) fn input_copies(
        &self,
        keep_pre_activation: bool,
        steps: TokenStream,
        row: TokenStream,
    ) -> Vec<GatheredCopy> {
        let mut copies = Vec::new();
        // The backward's workspace holds an input before activation only where it reads it.
        let pre_activations = &self.plan.backward.buffers;
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

    /// `to = from` for each of `states` (element `e`).
    pub(super) fn copy_states(
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
    pub(super) fn trade_state_buffers(&self) -> TokenStream {
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
    pub(super) fn state_copies(
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
    pub(super) fn write_gradient(
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

    /// S_t copied over S_{t−1} after a step, for the states not updated in place (those are
    /// already where the next step reads them). No barrier.
    pub(super) fn advance_states(&self) -> TokenStream {
        let copied: Vec<StateId> = (self.states().into_iter())
            .filter(|s| !self.in_place.contains(s))
            .collect();
        self.copy_states(
            &copied,
            |s| self.step_place(Buffer::NewState(s)),
            |s| self.step_place(Buffer::State(s)),
        )
    }

    /// With the workspace in shared memory, which does not outlive a launch, the buffers a
    /// later launch of the same scan resumes from are saved to the cube's global workspace at
    /// the end of a launch (`save`) and restored at the start of the next (`!save`).
    pub(super) fn persist(&self, buffers: &[Buffer], save: bool) -> TokenStream {
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
    pub(super) fn reads_and_writes(
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
}
