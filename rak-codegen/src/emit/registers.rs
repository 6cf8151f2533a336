//! States held in registers: the comptime layout of a state's slots over the cube's units
//! (units along the axes its sums do not reduce, parts along the one they do), the loop over
//! a unit's slots, updates and sums computed from the slots, and the load and store between
//! the slots and the workspace. Used by the forward scan and the backward scan's
//! recomputation ([`crate::schedule::register_states`],
//! [`crate::schedule::recomputed_register_states`]).

use super::*;

/// See [`Emitter::held_in_registers`]: the comptime layout of the states held in registers
/// (`parts_S`, `columns_S`, `lanes_S`, `slots_S`, whether this launch holds them:
/// `in_registers`) and their
/// arrays; their load from the workspace after the states are set; their store back to it
/// (before a checkpoint and at the end), followed by a barrier.
pub(super) struct HeldInRegisters {
    pub(super) layout: TokenStream,
    pub(super) load: TokenStream,
    pub(super) store: TokenStream,
}

/// See [`Emitter::register_names`].
pub(super) struct RegisterNames {
    pub(super) parts: Ident,
    pub(super) columns: Ident,
    pub(super) lanes: Ident,
    pub(super) slots: Ident,
    pub(super) array: Ident,
}

/// A step emitted by `step` holding `held` in registers and holding none, chosen at compile
/// time by `in_registers` ([`Emitter::held_in_registers`]), and the kernel's comptime
/// `registers` parameter; the step holding none alone, and no parameter, where `held` is empty.
pub(super) fn registers_or_workspace(
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

impl Emitter<'_> {
    /// This emitter, holding `states` in registers.
    pub(super) fn with_registers(&self, states: BTreeSet<StateId>) -> Self {
        Emitter {
            registers: states,
            ..self.clone()
        }
    }

    /// The comptime names of a state held in registers: its units (`lanes_S`), its slots per
    /// unit (`slots_S`), the units sharing each of its sums (`parts_S`), its elements per
    /// position along its first axis (`columns_S`), and its array.
    pub(super) fn register_names(&self, state: StateId) -> RegisterNames {
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
    pub(super) fn register_state_of_sum(&self, sum: ExprId) -> Option<StateId> {
        crate::schedule::direct_state_loads(self.cell, sum)
            .into_iter()
            .map(|(state, _)| state)
            .find(|state| self.registers.contains(state))
    }

    /// `target[indices] = Σ_index body` where `body` reads `state`, held in registers: the sum
    /// is split as the state is held ([`crate::schedule::register_states`]): `parts_S` units
    /// per element, unit `part` taking the terms `index = part + slot · parts_S`, each of which
    /// reads the unit's own slot `slot` of the state (`lanes_S = parts_S × elements`). With one
    /// part, each unit stores its element's total itself. A term is in range when the slot's
    /// element `unit + slot · lanes_S` is (the same test as the update's, which NVVM proves
    /// from `unit < lanes_S` for every slot but the last, where `index < extent` it did not).
    pub(super) fn register_sum(
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
    pub(super) fn register_update(
        &self,
        ready: &mut HashSet<ExprId>,
        update: &Update,
    ) -> TokenStream {
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
    pub(super) fn slot_loop(
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

    /// The code for the states a scan may hold in registers (the forward scan's
    /// [`crate::schedule::register_states`], the backward's recomputation's
    /// [`crate::schedule::recomputed_register_states`]); all empty if there are none.
    /// `sum_parts` (comptime) bounds the units per position along a state's first axis: the
    /// launch's, where sums over that axis read the registers.
    pub(super) fn held_in_registers(
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
}
