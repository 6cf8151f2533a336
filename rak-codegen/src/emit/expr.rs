//! Expressions → statements: one `let` per IR node, each node computed once per scope, loads
//! from wherever the value lives (argument, workspace, sum buffer or register slot).

use super::*;

/// Emits the statements computing expressions, one `let` per node, each node once per scope.
pub(super) struct ExprEmitter<'e, 'a> {
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
    pub(super) register_view: Option<(Vec<IndexId>, TokenStream)>,
}

impl<'e, 'a> ExprEmitter<'e, 'a> {
    pub(super) fn new(emitter: &'e Emitter<'a>, materialized: HashSet<ExprId>) -> Self {
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

    pub(super) fn finish(mut self) -> Vec<TokenStream> {
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

    pub(super) fn emit(&mut self, expr: ExprId) -> Ident {
        if let Some(known) = self.lookup(expr) {
            return known;
        }
        let emitter = self.emitter;
        let constant = emitter.cell.exprs.constant_value(expr);
        let value = match (emitter.cell.exprs.get(expr).clone(), constant) {
            // Constants, and functions of constants (`tanh(0.25 * 0.5)`) evaluated here in f64:
            // cubecl evaluates a literal's `let` at expansion, as a plain f32, and the two forms
            // of a function under a comptime flag (`apply_unary`) would not have one type.
            (Expr::Const(Constant(c)), _) | (_, Some(c)) => {
                let name = self.fresh();
                let literal = float(c);
                self.push(quote!(let #name = #literal;));
                name
            }
            (Expr::Load { value, indices }, _) => {
                let name = self.fresh();
                let load = self.load(value, &indices);
                self.push(quote!(let #name = #load;));
                name
            }
            (Expr::Unary(op, a), _) => {
                let a = self.emit(a);
                self.apply_unary(op, &a)
            }
            (Expr::Binary(op, a, b), _) => {
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
            (Expr::Sum { .. }, _) if self.materialized.contains(&emitter.sum_class(expr)) => {
                let name = self.fresh();
                let free: Vec<IndexId> = emitter.cell.free_indices(expr).into_iter().collect();
                let flat = emitter.flat_index(&free);
                let at = emitter.at(Buffer::Sum(emitter.sum_class(expr)));
                let read = emitter.step_read(&at, flat);
                self.push(quote!(let #name = #read;));
                name
            }
            (Expr::Sum { index, body }, _) => {
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
    pub(super) fn term(&mut self, index: IndexId, body: ExprId) -> (Vec<TokenStream>, Ident) {
        self.blocks.push(Vec::new());
        self.frames.push((Some(index), HashMap::new()));
        let term = self.emit(body);
        self.frames.pop();
        (self.blocks.pop().unwrap_or_default(), term)
    }

    /// `let v = op(a);` with the function written out in f32 arithmetic.
    pub(super) fn apply_unary(&mut self, op: UnaryOp, a: &Ident) -> Ident {
        let name = self.fresh();
        let value = match op {
            UnaryOp::Neg => quote!(-#a),
            UnaryOp::Exp => quote!(#a.exp()),
            UnaryOp::Log => quote!(#a.ln()),
            UnaryOp::Sigmoid => quote!(1f32 / (1f32 + (-#a).exp())),
            // log σ(x) = min(x, 0) − log(1 + e^(−|x|))
            UnaryOp::LogSigmoid => {
                let log_1p = self.log_1p(quote!((-#a.abs()).exp()));
                quote!(min(#a, 0f32) - #log_1p)
            }
            // Under `series_near_zero`, below |x| = 1/8, its Taylor series to x⁹ (truncation
            // under 1e-11 relative), and the backend's tanh above. A tanh computed through exp,
            // as (e^2x − 1)/(e^2x + 1), is accurate near 0 only in absolute terms, and a cell
            // that amplifies a small state (n ← σ(·)·n + tanh n doubles it) turns that into a
            // wrong answer: Random13 on Mesa's software driver (docs/compiler.md, "Functions
            // written out").
            UnaryOp::Tanh => quote! {
                if comptime![series_near_zero] {
                    let square = #a * #a;
                    select(
                        #a.abs() < 0.125f32,
                        #a + #a * square * (-0.33333334f32 + square * (0.13333334f32
                            + square * (-0.053968254f32 + square * 0.021869488f32))),
                        #a.tanh(),
                    )
                } else {
                    #a.tanh()
                }
            },
            // softplus(x) = max(x, 0) + log(1 + e^(−|x|))
            UnaryOp::Softplus => {
                let log_1p = self.log_1p(quote!((-#a.abs()).exp()));
                quote!(max(#a, 0f32) + #log_1p)
            }
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

    /// `log(1 + u)` for `u` in [0, 1] (`let` bound, its variable returned): the backend's
    /// `log1p`, or under `series_near_zero` its Taylor series to u⁸ below u = 1/8 (truncation
    /// under 1e-8 relative) and `ln(1 + u)` above, since Vulkan's `log` (and wgpu's `log1p`,
    /// which is `log(1 + u)`) is accurate near 1 only in absolute terms: softplus of a very
    /// negative value, or log-sigmoid of a large one, would come out 0 instead of ±e^(−|x|).
    fn log_1p(&mut self, value: TokenStream) -> Ident {
        let u = self.fresh();
        self.push(quote!(let #u = #value;));
        let name = self.fresh();
        self.push(quote! {
            let #name = if comptime![series_near_zero] {
                select(
                    #u < 0.125f32,
                    #u * (1f32 - #u * (0.5f32 - #u * (0.33333334f32 - #u * (0.25f32
                        - #u * (0.2f32 - #u * (0.16666667f32 - #u * (0.14285715f32
                            - #u * 0.125f32))))))),
                    (1f32 + #u).ln(),
                )
            } else {
                #u.log1p()
            };
        });
        name
    }

    /// The element `value[indices]` read from where it lives.
    fn load(&mut self, value: Value, indices: &[IndexId]) -> TokenStream {
        let emitter = self.emitter;
        let cell = emitter.cell;
        let flat = emitter.flat_index(indices);
        if let Some(array) = emitter.register_array_of(value) {
            match &self.register_view {
                Some((aligned, slot)) if aligned == indices => return quote!(#array[#slot]),
                // `dS` is also in its workspace buffer.
                _ if matches!(value, Value::Grad(Grad::State(_))) => {}
                _ => panic!(
                    "`{}` is held in registers but read where no slot holds it (the schedule \
                     admitted a load the emitter cannot serve)",
                    crate::display::value_name(cell, value)
                ),
            }
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
