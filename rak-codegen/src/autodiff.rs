//! Autodiff pass: symbolic reverse-mode differentiation of the step → [`BackwardStep`].
//!
//! Every statement `W[I] = e` of the step is a root: its adjoint is the gradient `dW[I]`
//! (given for outputs, the total state gradient for updates, the let's gradient for lets).
//! The adjoint is pushed down `e` with the chain rule; each access `V[J]` met on the way
//! contributes `Σ_{scope∖J} adjoint` to `dV[J]`, where the scope is the statement's indices
//! plus those of enclosing `sum`s (broadcasting in the forward direction is a sum in the
//! backward one). The contributions to each gradient are renamed onto fresh index variables
//! and added up into one [`GradDefinition`].
//!
//! Definitions come in dependency order: total state gradients (from the next step and from
//! the outputs), let gradients in reverse order, input gradients (after, then before their
//! activation), parameter gradients, and the gradients of the previous states.

use crate::ir::*;
use std::collections::HashMap;

/// Derives the backward step of a checked cell.
pub fn differentiate(cell: &Cell) -> BackwardStep {
    let mut differentiator = Differentiator {
        cell: cell.clone(),
        contributions: HashMap::new(),
    };
    differentiator.backprop_statements();
    let definitions = differentiator.definitions();
    BackwardStep {
        cell: differentiator.cell,
        definitions,
    }
}

/// `Σ_{scope∖indices} adjoint`, to be added to the gradient of the value accessed as
/// `value[indices]`.
struct Contribution {
    indices: Vec<IndexId>,
    expr: ExprId,
}

struct Differentiator {
    cell: Cell,
    contributions: HashMap<Grad, Vec<Contribution>>,
}

/// The derivative of `op` at `arg`, given `result = op(arg)` (reused where cheaper).
pub fn derivative(exprs: &mut ExprArena, op: UnaryOp, arg: ExprId, result: ExprId) -> ExprId {
    match op {
        UnaryOp::Neg => exprs.constant_expr(-1.0),
        UnaryOp::Exp => result,
        UnaryOp::Log => {
            let one = exprs.constant_expr(1.0);
            exprs.div(one, arg)
        }
        UnaryOp::Sigmoid => {
            let one = exprs.constant_expr(1.0);
            let complement = exprs.sub(one, result);
            exprs.mul(result, complement)
        }
        UnaryOp::LogSigmoid => {
            let negated = exprs.neg(arg);
            exprs.unary(UnaryOp::Sigmoid, negated)
        }
        UnaryOp::Tanh => {
            let one = exprs.constant_expr(1.0);
            let square = exprs.mul(result, result);
            exprs.sub(one, square)
        }
        UnaryOp::Softplus => exprs.unary(UnaryOp::Sigmoid, arg),
        UnaryOp::Silu => {
            // σ(x)·(1 + x·(1 − σ(x)))
            let one = exprs.constant_expr(1.0);
            let s = exprs.unary(UnaryOp::Sigmoid, arg);
            let complement = exprs.sub(one, s);
            let x_complement = exprs.mul(arg, complement);
            let factor = exprs.add(one, x_complement);
            exprs.mul(s, factor)
        }
        UnaryOp::Relu => exprs.unary(UnaryOp::Step, arg),
        UnaryOp::Abs => exprs.unary(UnaryOp::Sign, arg),
        UnaryOp::Sqrt => {
            let half = exprs.constant_expr(0.5);
            exprs.div(half, result)
        }
        UnaryOp::Step | UnaryOp::Sign => exprs.constant_expr(0.0),
    }
}

impl Differentiator {
    fn backprop_statements(&mut self) {
        let cell = &self.cell;
        let mut roots: Vec<(Grad, Vec<IndexId>, ExprId)> = Vec::new();
        for (id, output) in cell.outputs.iter().enumerate() {
            roots.push((
                Grad::Output(OutputId(id)),
                output.indices.clone(),
                output.expr,
            ));
        }
        for update in &cell.updates {
            roots.push((
                Grad::State(update.state),
                update.indices.clone(),
                update.expr,
            ));
        }
        for (id, definition) in cell.lets.iter().enumerate() {
            roots.push((
                Grad::Let(LetId(id)),
                definition.indices.clone(),
                definition.expr,
            ));
        }
        for (grad, indices, expr) in roots {
            let adjoint = self.cell.exprs.load(Value::Grad(grad), indices.clone());
            self.backprop(expr, adjoint, &indices);
        }
    }

    /// Pushes `adjoint` (the gradient of `expr`, with free indices in `scope`) down `expr`.
    fn backprop(&mut self, expr: ExprId, adjoint: ExprId, scope: &[IndexId]) {
        let exprs = &mut self.cell.exprs;
        match exprs.get(expr).clone() {
            Expr::Const(_) => {}
            Expr::Load { value, indices } => {
                let grad = match value {
                    Value::Input(i) => Grad::InputActivated(i),
                    Value::Param(p) => Grad::Param(p),
                    Value::State(s, StateTime::Previous) => Grad::StatePrevious(s),
                    Value::State(s, StateTime::Current) => Grad::State(s),
                    Value::Let(l) => Grad::Let(l),
                    // The forward step reads neither.
                    Value::InputPreActivation(_) | Value::Grad(_) => return,
                };
                let mut contribution = adjoint;
                for &index in scope.iter().rev() {
                    if !indices.contains(&index) {
                        contribution = exprs.sum(index, contribution);
                    }
                }
                let entry = self.contributions.entry(grad).or_default();
                entry.push(Contribution {
                    indices,
                    expr: contribution,
                });
            }
            Expr::Unary(op, a) => {
                let local = derivative(exprs, op, a, expr);
                let adjoint_a = exprs.mul(adjoint, local);
                self.backprop(a, adjoint_a, scope);
            }
            Expr::Binary(op, a, b) => {
                let (adjoint_a, adjoint_b) = match op {
                    BinaryOp::Add => (adjoint, adjoint),
                    BinaryOp::Sub => (adjoint, exprs.neg(adjoint)),
                    BinaryOp::Mul => (exprs.mul(adjoint, b), exprs.mul(adjoint, a)),
                    BinaryOp::Div => {
                        // ∂(a/b)/∂b = −(a/b)/b
                        let quotient_over_b = exprs.div(expr, b);
                        let scaled = exprs.mul(adjoint, quotient_over_b);
                        (exprs.div(adjoint, b), exprs.neg(scaled))
                    }
                    BinaryOp::Max | BinaryOp::Min => {
                        // The gradient goes to the chosen argument (to `a` on ties).
                        let a_chosen = match op {
                            BinaryOp::Max => exprs.binary(BinaryOp::GreaterEq, a, b),
                            _ => exprs.binary(BinaryOp::GreaterEq, b, a),
                        };
                        let one = exprs.constant_expr(1.0);
                        let b_chosen = exprs.sub(one, a_chosen);
                        (exprs.mul(adjoint, a_chosen), exprs.mul(adjoint, b_chosen))
                    }
                    BinaryOp::GreaterEq => return,
                };
                self.backprop(a, adjoint_a, scope);
                self.backprop(b, adjoint_b, scope);
            }
            Expr::Sum { index, body } => {
                let mut inner = scope.to_vec();
                inner.push(index);
                self.backprop(body, adjoint, &inner);
            }
        }
    }

    /// Adds up the contributions to `grad`, on fresh index variables `dgrad[indices]`, starting
    /// from the given gradient `base` if any.
    fn gather(&mut self, grad: Grad, base: Option<Grad>) -> GradDefinition {
        let shape = self.cell.grad_shape(grad).clone();
        let contributions = self.contributions.remove(&grad).unwrap_or_default();
        let names: Vec<String> = match contributions.first() {
            Some(first) => first
                .indices
                .iter()
                .map(|i| self.cell.indices[i.0].name.clone())
                .collect(),
            None => ["i", "j", "l", "m", "n", "p"]
                .iter()
                .cycle()
                .take(shape.len())
                .map(|s| s.to_string())
                .collect(),
        };
        let indices: Vec<IndexId> = names
            .iter()
            .zip(&shape)
            .map(|(name, &dim)| self.cell.fresh_index(name, dim))
            .collect();
        let mut total = match base {
            Some(base) => self.cell.exprs.load(Value::Grad(base), indices.clone()),
            None => self.cell.exprs.constant_expr(0.0),
        };
        for contribution in contributions {
            let renamed = rename_indices(
                &mut self.cell.exprs,
                contribution.expr,
                &contribution.indices,
                &indices,
            );
            total = self.cell.exprs.add(total, renamed);
        }
        GradDefinition {
            grad,
            indices,
            expr: total,
        }
    }

    fn definitions(&mut self) -> Vec<GradDefinition> {
        let mut definitions = Vec::new();
        for state in 0..self.cell.states.len() {
            let state = StateId(state);
            // dS_t = (gradient from step t+1) + (this step's outputs' contributions)
            definitions.push(self.gather(Grad::State(state), Some(Grad::StateFromNext(state))));
        }
        for id in (0..self.cell.lets.len()).rev() {
            definitions.push(self.gather(Grad::Let(LetId(id)), None));
        }
        for id in 0..self.cell.inputs.len() {
            let input = InputId(id);
            let activated = self.gather(Grad::InputActivated(input), None);
            let indices = activated.indices.clone();
            let exprs = &mut self.cell.exprs;
            let grad_activated =
                exprs.load(Value::Grad(Grad::InputActivated(input)), indices.clone());
            let expr = match self.cell.inputs[id].activation {
                None => grad_activated,
                Some(op) => {
                    let pre = exprs.load(Value::InputPreActivation(input), indices.clone());
                    let post = exprs.load(Value::Input(input), indices.clone());
                    let local = derivative(exprs, op, pre, post);
                    exprs.mul(grad_activated, local)
                }
            };
            definitions.push(activated);
            definitions.push(GradDefinition {
                grad: Grad::Input(input),
                indices,
                expr,
            });
        }
        for id in 0..self.cell.params.len() {
            definitions.push(self.gather(Grad::Param(ParamId(id)), None));
        }
        for state in 0..self.cell.states.len() {
            definitions.push(self.gather(Grad::StatePrevious(StateId(state)), None));
        }
        definitions
    }
}

/// `expr` with the index variables `from` renamed to `to`, position by position.
pub fn rename_indices(
    exprs: &mut ExprArena,
    expr: ExprId,
    from: &[IndexId],
    to: &[IndexId],
) -> ExprId {
    let renaming = from.iter().copied().zip(to.iter().copied()).collect();
    substitute(exprs, expr, &renaming, &mut HashMap::new())
}

/// `expr` with its free index variables renamed by `renaming`.
pub fn substitute(
    exprs: &mut ExprArena,
    expr: ExprId,
    renaming: &HashMap<IndexId, IndexId>,
    memo: &mut HashMap<ExprId, ExprId>,
) -> ExprId {
    if let Some(&done) = memo.get(&expr) {
        return done;
    }
    let result = match exprs.get(expr).clone() {
        Expr::Const(_) => expr,
        Expr::Load { value, indices } => {
            if indices.iter().any(|i| renaming.contains_key(i)) {
                let renamed = indices
                    .iter()
                    .map(|i| *renaming.get(i).unwrap_or(i))
                    .collect();
                exprs.load(value, renamed)
            } else {
                expr
            }
        }
        Expr::Unary(op, a) => {
            let new_a = substitute(exprs, a, renaming, memo);
            if new_a == a {
                expr
            } else {
                exprs.unary(op, new_a)
            }
        }
        Expr::Binary(op, a, b) => {
            let new_a = substitute(exprs, a, renaming, memo);
            let new_b = substitute(exprs, b, renaming, memo);
            if (new_a, new_b) == (a, b) {
                expr
            } else {
                exprs.binary(op, new_a, new_b)
            }
        }
        Expr::Sum { index, body } => {
            // A derivative can hold a copy of a forward `sum` over an index that is also free
            // around it; inside the copy the index is bound and must not be renamed.
            let new_body = if renaming.contains_key(&index) {
                let mut inner = renaming.clone();
                inner.remove(&index);
                substitute(exprs, body, &inner, &mut HashMap::new())
            } else {
                substitute(exprs, body, renaming, memo)
            };
            if new_body == body {
                expr
            } else {
                exprs.sum(index, new_body)
            }
        }
    };
    memo.insert(expr, result);
    result
}
