//! A step's statements: lets, updates and outputs, each computed for all its elements, and
//! the sums inside them, materialised in the workspace; a sum is a loop per element or, when
//! the statement has fewer elements than the cube has units, split among units
//! (`sum_parts`) and combined.

use super::*;

/// `target[indices] = Σ_index body`, a sum computed for each element of a statement.
pub(super) struct SumStatement<'i> {
    pub(super) indices: &'i [IndexId],
    pub(super) index: IndexId,
    pub(super) body: ExprId,
}

impl Emitter<'_> {
    /// `target[indices] = expr` for every element: `store(value)` writes one element. First
    /// materialises the `sum`s inside `expr` that this step has not computed yet (`ready`).
    /// `followed_by_barrier`: the caller puts a barrier right after the statement (a split sum
    /// then needs none of its own after it).
    pub(super) fn statement(
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
    pub(super) fn materialise_sums(
        &self,
        ready: &mut HashSet<ExprId>,
        expr: ExprId,
    ) -> TokenStream {
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
            && let Some(registers) = self.registers_of_sum(expr, &[&[index], indices].concat())
        {
            let sum = SumStatement {
                indices,
                index,
                body,
            };
            return self.register_sum(ready, &sum, registers, followed_by_barrier, store);
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
    pub(super) fn partial_sums(
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

    /// Writes a workspace buffer from an expression, for every element of its shape.
    pub(super) fn define_buffer(
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

    /// Lets (each followed by a barrier) and updates into the new states (or the registers
    /// holding them), then a barrier unless every state is held in registers.
    pub(super) fn lets_and_updates(&self, ready: &mut HashSet<ExprId>) -> TokenStream {
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
    pub(super) fn lets(&self, ready: &mut HashSet<ExprId>) -> TokenStream {
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
}
