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
    choose_registers(held, (ident("registers"), ident("in_registers")), step)
}

/// As [`registers_or_workspace`], with the kernel's parameter `asked` and the comptime choice
/// `held_here` (a launch holds them where it can).
pub(super) fn choose_registers(
    held: &BTreeSet<StateId>,
    (asked, held_here): (Ident, Ident),
    step: impl Fn(&BTreeSet<StateId>) -> TokenStream,
) -> (TokenStream, Option<TokenStream>) {
    let in_workspace = step(&BTreeSet::new());
    if held.is_empty() {
        return (in_workspace, None);
    }
    let in_registers = step(held);
    let code = quote! {
        if comptime![#held_here] {
            #in_registers
        } else {
            #in_workspace
        }
    };
    (code, Some(quote!(#[comptime] #asked: bool,)))
}

impl Emitter<'_> {
    /// This emitter, carrying the gradients of `states` in registers through the backward
    /// walk ([`crate::schedule::carried_register_grads`]), with the bounds of their slot loops
    /// decided at compile time where they always hold (as for the recomputation: the arrays
    /// are loaded and stored once per chunk, and should not stay live through the
    /// recomputation).
    pub(super) fn with_carried_registers(&self, states: BTreeSet<StateId>) -> Self {
        Emitter {
            carried_registers: states,
            slot_bounds_at_compile_time: true,
            ..self.clone()
        }
    }

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
        Self::names_of_registers(&self.cell.states[state.0].name)
    }

    /// The comptime names of the gradient of a state that the backward walk carries in
    /// registers ([`crate::schedule::carried_register_grads`]): as [`Self::register_names`],
    /// of `grad_S`.
    pub(super) fn carried_register_names(&self, state: StateId) -> RegisterNames {
        Self::names_of_registers(&format!("grad_{}", self.cell.states[state.0].name))
    }

    fn names_of_registers(name: &str) -> RegisterNames {
        RegisterNames {
            parts: format_ident!("parts_{name}"),
            columns: format_ident!("columns_{name}"),
            lanes: format_ident!("lanes_{name}"),
            slots: format_ident!("slots_{name}"),
            array: format_ident!("registers_{name}"),
        }
    }

    /// The register array that holds `value` at the element of a slot, if the code being
    /// emitted holds it in registers: a state ([`Emitter::registers`]), or the gradient of a
    /// state the walk carries ([`Emitter::carried_registers`]: `dS_next`, `dS` and `dS_{t−1}`
    /// share one array).
    pub(super) fn register_array_of(&self, value: Value) -> Option<Ident> {
        match value {
            Value::State(state, _) if self.registers.contains(&state) => {
                Some(self.register_names(state).array)
            }
            Value::Grad(
                Grad::StateFromNext(state) | Grad::State(state) | Grad::StatePrevious(state),
            ) if self.carried_registers.contains(&state) => {
                Some(self.carried_register_names(state).array)
            }
            _ => None,
        }
    }

    /// The layout of the registers a sum reads (not inside the sums it holds), if it reads a
    /// state held in registers, or `dS` of a state whose gradient the walk carries in
    /// registers at the element of the slot (`dS[index, indices…]`, the sum's index first);
    /// with the elements of that state.
    pub(super) fn registers_of_sum(
        &self,
        sum: ExprId,
        aligned: &[IndexId],
    ) -> Option<(RegisterNames, TokenStream)> {
        let numel = |state: StateId| self.local_numel(&self.cell.states[state.0].shape);
        let held_state = crate::schedule::direct_state_loads(self.cell, sum)
            .into_iter()
            .map(|(state, _)| state)
            .find(|state| self.registers.contains(state));
        if let Some(state) = held_state {
            return Some((self.register_names(state), numel(state)));
        }
        self.carried_registers.iter().find_map(|&state| {
            let total = Value::Grad(Grad::State(state));
            let loads = crate::schedule::loads_where(self.cell, sum, false, |v| v == total);
            let all_aligned = loads.iter().all(|(_, indices)| indices == aligned);
            (!loads.is_empty() && all_aligned)
                .then(|| (self.carried_register_names(state), numel(state)))
        })
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
        (names, numel): (RegisterNames, TokenStream),
        followed_by_barrier: bool,
        store: impl Fn(&Ident) -> TokenStream,
    ) -> TokenStream {
        let (parts, lanes, slots) = (&names.parts, &names.lanes, &names.slots);
        let var = self.index_var(sum.index);
        // A slot past the end of the split axis (in the last tile) holds no element: its
        // registers and workspace were never written.
        let terms = |add_term: TokenStream| {
            let add_term = self.guarded(&[sum.index], add_term);
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
        let names = self.register_names(update.state);
        let shape = &self.cell.states[update.state.0].shape;
        self.slot_statement(ready, &names, shape, (&update.indices, update.expr), None)
    }

    /// The definition of `dS` or `dS_{t−1}` of a state whose gradient the walk carries in
    /// registers ([`crate::schedule::carried_register_grads`]): each unit computes its slots,
    /// reading `dS_next` or `dS` from the same slot; `dS` is also written to its workspace
    /// buffer, for the reads the slots do not serve.
    pub(super) fn carried_register_definition(
        &self,
        ready: &mut HashSet<ExprId>,
        definition: &GradDefinition,
        state: StateId,
    ) -> TokenStream {
        let names = self.carried_register_names(state);
        let shape = &self.cell.states[state.0].shape;
        let write_through = matches!(definition.grad, Grad::State(_))
            .then(|| self.at(Buffer::Grad(definition.grad)));
        let statement = (&definition.indices[..], definition.expr);
        self.slot_statement(ready, &names, shape, statement, write_through)
    }

    /// `registers[indices] = expr` for each slot of registers (`names`, of a value of
    /// `shape`), reading the registers at the slot's own element; also written to the
    /// workspace buffer at `write_through` if given.
    fn slot_statement(
        &self,
        ready: &mut HashSet<ExprId>,
        names: &RegisterNames,
        shape: &Shape,
        (indices, expr): (&[IndexId], ExprId),
        write_through: Option<TokenStream>,
    ) -> TokenStream {
        let mut tokens = self.materialise_sums(ready, expr);
        let array = &names.array;
        let numel = self.local_numel(shape);
        let decode = self.decode_slot_indices(indices, names);
        let mut exprs = ExprEmitter::new(self, ready.clone());
        exprs.register_view = Some((indices.to_vec(), quote!(slot)));
        let value = exprs.emit(expr);
        let statements = exprs.finish();
        let write = write_through.map(|at| self.step_write(&at, quote!(e), quote!(#value)));
        let body = self.guarded(
            indices,
            quote!(#(#statements)* #array[slot] = #value; #write),
        );
        tokens.extend(self.slot_loop(names, &numel, quote!(#decode #body)));
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
    /// launch's, where sums over that axis read the registers. The kernel's comptime flag
    /// `registers` asks for them; `in_registers` says whether this launch holds them.
    pub(super) fn held_in_registers(
        &self,
        held: &BTreeSet<StateId>,
        sum_parts: TokenStream,
    ) -> HeldInRegisters {
        let held: Vec<(RegisterNames, &Shape, Buffer)> = (held.iter())
            .map(|&state| {
                let shape = &self.cell.states[state.0].shape;
                (self.register_names(state), shape, Buffer::State(state))
            })
            .collect();
        self.values_in_registers(
            &held,
            (ident("registers"), ident("in_registers")),
            sum_parts,
        )
    }

    /// The code for the state gradients the backward walk may carry in registers
    /// ([`crate::schedule::carried_register_grads`]), loaded from and stored to the buffer of
    /// the gradient carried from the step after; the kernel's comptime flag `walk_registers`
    /// asks for them, `walk_in_registers` says whether this launch carries them. As many units
    /// per position along a state's first axis as the cube has for it.
    pub(super) fn carried_in_registers(&self, held: &BTreeSet<StateId>) -> HeldInRegisters {
        let held: Vec<(RegisterNames, &Shape, Buffer)> = (held.iter())
            .map(|&state| {
                let shape = &self.cell.states[state.0].shape;
                let buffer = Buffer::Grad(Grad::StateFromNext(state));
                (self.carried_register_names(state), shape, buffer)
            })
            .collect();
        let flags = (ident("walk_registers"), ident("walk_in_registers"));
        self.values_in_registers(&held, flags, quote!(cube_dim))
    }

    /// The comptime layout, arrays, load and store of values held in registers: each with its
    /// names, shape and workspace buffer; `(asked, held)`: the kernel's comptime flag that asks
    /// for them and the comptime name that says whether this launch holds them.
    fn values_in_registers(
        &self,
        held: &[(RegisterNames, &Shape, Buffer)],
        (asked, in_registers): (Ident, Ident),
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
        let mut conditions = vec![quote!(#asked)];
        let mut arrays = TokenStream::new();
        for (names, shape, buffer) in held {
            let (parts, columns, lanes, slots, array) = (
                &names.parts,
                &names.columns,
                &names.lanes,
                &names.slots,
                &names.array,
            );
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
                let mut #array = Array::<f32>::new(comptime![if #in_registers {
                    #slots
                } else {
                    1usize
                }]);
            });
            let at = self.at(*buffer);
            let read = self.step_read(&at, quote!(e));
            code.load
                .extend(self.slot_loop(names, &numel, quote!(#array[slot] = #read;)));
            code.store.extend(self.slot_loop(
                names,
                &numel,
                self.step_write(&at, quote!(e), quote!(#array[slot])),
            ));
        }
        code.layout.extend(quote! {
            // Whether this launch holds them in registers: asked for, and each one's sums have
            // at least one unit per element.
            let #in_registers = comptime![#(#conditions)&&*];
            #arrays
        });
        let (load, store, barrier) = (&code.load, &code.store, self.barrier());
        code.load = quote! {
            if comptime![#in_registers] {
                #load
            }
        };
        // Other units read the workspace next (in their own order).
        code.store = quote! {
            if comptime![#in_registers] {
                #store
                #barrier
            }
        };
        code
    }
}
