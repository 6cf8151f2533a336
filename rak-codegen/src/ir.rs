//! The intermediate representation: a typed expression graph over indexed per-step values.
//!
//! A [`Cell`] describes one time step of a recurrence, per batch element and head:
//!
//! 1. the per-step inputs arrive pre-activation and are activated (`k = sigmoid(k_pre)`);
//! 2. the `let`s are computed, in order, from inputs, parameters, the previous states and
//!    earlier lets;
//! 3. every state gets its new value from one `update` (all updates read the previous states);
//! 4. the outputs are computed from the new states, inputs, parameters and lets.
//!
//! Expressions live in an [`ExprArena`] and refer to each other by [`ExprId`]. Tensor-valued
//! statements are written element-wise with index variables ([`IndexVar`]): an expression's
//! type is the set of index variables free in it, each ranging over a dim. A statement
//! `S[i, j] = e` evaluates `e` for every `(i, j)`; `Sum { index, body }` is a contraction.
//! Every binding site (a statement's left-hand side, a `sum`) creates fresh index variables, so
//! index variables are never shadowed.
//!
//! The IR is built by [`crate::lower`], its index dims are inferred and validated by
//! [`crate::check`], [`crate::autodiff`] derives a [`BackwardStep`] over the same arena, and
//! [`crate::interpret`] runs both in f64.

use crate::diagnostic::SourceRange;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

macro_rules! id_type {
    ($($(#[$doc:meta])* $name:ident;)*) => {$(
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub usize);
    )*};
}

id_type! {
    /// A declared dim (`K`, `V`), index into [`Cell::dims`].
    DimId;
    /// Index into [`Cell::inputs`].
    InputId;
    /// Index into [`Cell::params`].
    ParamId;
    /// Index into [`Cell::states`].
    StateId;
    /// Index into [`Cell::lets`].
    LetId;
    /// Index into [`Cell::outputs`].
    OutputId;
    /// Index into [`Cell::indices`].
    IndexId;
    /// Index into an [`ExprArena`].
    ExprId;
}

/// A shape: the dims of a value, outermost first; empty for a scalar (one value per head).
pub type Shape = Vec<DimId>;

#[derive(Clone, Debug)]
pub struct Dim {
    pub name: String,
    pub range: SourceRange,
}

/// Elementwise functions of one argument. The last two only appear in derivatives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    Neg,
    Exp,
    Log,
    Sigmoid,
    LogSigmoid,
    Tanh,
    Softplus,
    Silu,
    Relu,
    Abs,
    Sqrt,
    /// 1 where the argument is > 0, else 0 (derivative of `relu`).
    Step,
    /// −1, 0 or 1 (derivative of `abs`).
    Sign,
}

/// Elementwise functions of two arguments. `GreaterEq` only appears in derivatives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
    /// 1 where `a >= b`, else 0 (derivatives of `max` and `min`).
    GreaterEq,
}

impl UnaryOp {
    /// The functions a cell may call with one argument, by their DSL name.
    pub const CALLABLE: [(&'static str, UnaryOp); 10] = [
        ("exp", UnaryOp::Exp),
        ("log", UnaryOp::Log),
        ("sigmoid", UnaryOp::Sigmoid),
        ("logsigmoid", UnaryOp::LogSigmoid),
        ("tanh", UnaryOp::Tanh),
        ("softplus", UnaryOp::Softplus),
        ("silu", UnaryOp::Silu),
        ("relu", UnaryOp::Relu),
        ("abs", UnaryOp::Abs),
        ("sqrt", UnaryOp::Sqrt),
    ];

    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Step => "step",
            UnaryOp::Sign => "sign",
            op => UnaryOp::CALLABLE
                .iter()
                .find(|(_, o)| *o == op)
                .map(|(n, _)| *n)
                .unwrap_or("?"),
        }
    }

    /// Evaluates the function in f64 (the reference semantics of every backend).
    pub fn apply(self, x: f64) -> f64 {
        match self {
            UnaryOp::Neg => -x,
            UnaryOp::Exp => x.exp(),
            UnaryOp::Log => x.ln(),
            UnaryOp::Sigmoid => sigmoid(x),
            // log σ(x) = −softplus(−x), computed without overflow.
            UnaryOp::LogSigmoid => -softplus(-x),
            UnaryOp::Tanh => x.tanh(),
            UnaryOp::Softplus => softplus(x),
            UnaryOp::Silu => x * sigmoid(x),
            UnaryOp::Relu => x.max(0.0),
            UnaryOp::Abs => x.abs(),
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Step => f64::from(u8::from(x > 0.0)),
            UnaryOp::Sign => {
                if x > 0.0 {
                    1.0
                } else if x < 0.0 {
                    -1.0
                } else {
                    0.0
                }
            }
        }
    }
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// log(1 + eˣ) without overflow.
fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

impl BinaryOp {
    /// The functions a cell may call with two arguments, by their DSL name.
    pub const CALLABLE: [(&'static str, BinaryOp); 2] =
        [("max", BinaryOp::Max), ("min", BinaryOp::Min)];

    pub fn apply(self, a: f64, b: f64) -> f64 {
        match self {
            BinaryOp::Add => a + b,
            BinaryOp::Sub => a - b,
            BinaryOp::Mul => a * b,
            BinaryOp::Div => a / b,
            BinaryOp::Max => a.max(b),
            BinaryOp::Min => a.min(b),
            BinaryOp::GreaterEq => f64::from(u8::from(a >= b)),
        }
    }
}

/// Which value of a state an expression reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StateTime {
    /// S_{t−1}: what `let`s and `update`s read.
    Previous,
    /// S_t: what `output`s read.
    Current,
}

/// A gradient tensor of the backward step (see [`BackwardStep`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Grad {
    /// Given: ∂L/∂o_t.
    Output(OutputId),
    /// Given: the gradient reaching S_t from step t+1 (∂L/∂S_T for the last step).
    StateFromNext(StateId),
    /// Total ∂L/∂S_t: from the next step and from this step's outputs.
    State(StateId),
    /// ∂L/∂(let value).
    Let(LetId),
    /// ∂L/∂(input after its activation).
    InputActivated(InputId),
    /// ∂L/∂(input before its activation): what the backward kernel writes per step.
    Input(InputId),
    /// This step's contribution to ∂L/∂(parameter); the scan sums it over steps and batch.
    Param(ParamId),
    /// ∂L/∂S_{t−1}: becomes `StateFromNext` of the step before.
    StatePrevious(StateId),
}

/// What a [`Expr::Load`] reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Value {
    /// An input after its activation.
    Input(InputId),
    /// An input before its activation (only in the backward step).
    InputPreActivation(InputId),
    Param(ParamId),
    State(StateId, StateTime),
    Let(LetId),
    Grad(Grad),
}

/// An f64 constant compared and hashed by its bits, so expressions can be interned.
#[derive(Clone, Copy, Debug)]
pub struct Constant(pub f64);

impl PartialEq for Constant {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}
impl Eq for Constant {}
impl Hash for Constant {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.to_bits().hash(state)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Expr {
    Const(Constant),
    /// `value[indices]`; `indices.len()` equals the value's rank, no index twice.
    Load {
        value: Value,
        indices: Vec<IndexId>,
    },
    Unary(UnaryOp, ExprId),
    Binary(BinaryOp, ExprId, ExprId),
    /// Σ over `index` of `body`.
    Sum {
        index: IndexId,
        body: ExprId,
    },
}

/// The result of simplifying a node before interning it.
enum Simplified {
    /// The node equals an existing one.
    Existing(ExprId),
    New(Expr),
}

/// An index variable: bound by a statement's left-hand side or by a `sum`.
#[derive(Clone, Debug)]
pub struct IndexVar {
    pub name: String,
    /// The dim it ranges over; `None` only between lowering and checking.
    pub dim: Option<DimId>,
    /// Where it is bound.
    pub range: SourceRange,
}

/// Expressions, with the source range each was written at. Nodes built by the front end are
/// pushed as they are; nodes built by later passes are interned (hash-consed) and simplified.
#[derive(Clone, Debug, Default)]
pub struct ExprArena {
    nodes: Vec<Expr>,
    ranges: Vec<Option<SourceRange>>,
    interned: HashMap<Expr, ExprId>,
}

impl ExprArena {
    pub fn get(&self, id: ExprId) -> &Expr {
        &self.nodes[id.0]
    }

    /// Where the user wrote this expression (`None` for derived expressions).
    pub fn range(&self, id: ExprId) -> Option<SourceRange> {
        self.ranges[id.0]
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Adds a node written by the user.
    pub fn push(&mut self, expr: Expr, range: SourceRange) -> ExprId {
        self.nodes.push(expr);
        self.ranges.push(Some(range));
        ExprId(self.nodes.len() - 1)
    }

    /// Adds a derived node, reusing an identical one, after algebraic simplification
    /// (constant folding, `x·1`, `x·0`, `x+0`, `−(−x)`, `a + −b`).
    pub fn intern(&mut self, expr: Expr) -> ExprId {
        let expr = match self.simplify(expr) {
            Simplified::Existing(id) => return id,
            Simplified::New(expr) => expr,
        };
        if let Some(&id) = self.interned.get(&expr) {
            return id;
        }
        self.nodes.push(expr.clone());
        self.ranges.push(None);
        let id = ExprId(self.nodes.len() - 1);
        self.interned.insert(expr, id);
        id
    }

    /// The value of `id` where it is made of constants only (functions of them included),
    /// evaluated in f64 as the interpreter evaluates it; `None` where it reads a value or sums.
    pub fn constant_value(&self, id: ExprId) -> Option<f64> {
        match self.get(id) {
            Expr::Const(Constant(c)) => Some(*c),
            Expr::Unary(op, a) => Some(op.apply(self.constant_value(*a)?)),
            Expr::Binary(op, a, b) => {
                Some(op.apply(self.constant_value(*a)?, self.constant_value(*b)?))
            }
            Expr::Load { .. } | Expr::Sum { .. } => None,
        }
    }

    fn constant(&self, id: ExprId) -> Option<f64> {
        match self.get(id) {
            Expr::Const(Constant(c)) => Some(*c),
            _ => None,
        }
    }

    fn simplify(&self, expr: Expr) -> Simplified {
        use Simplified::{Existing, New};
        let zero = || New(Expr::Const(Constant(0.0)));
        match expr {
            Expr::Unary(op, a) => {
                if let Some(c) = self.constant(a) {
                    return New(Expr::Const(Constant(op.apply(c))));
                }
                match (op, self.get(a)) {
                    (UnaryOp::Neg, Expr::Unary(UnaryOp::Neg, inner)) => Existing(*inner),
                    _ => New(Expr::Unary(op, a)),
                }
            }
            Expr::Binary(op, a, b) => {
                let (ca, cb) = (self.constant(a), self.constant(b));
                if let (Some(x), Some(y)) = (ca, cb) {
                    return New(Expr::Const(Constant(op.apply(x, y))));
                }
                match (op, ca, cb) {
                    (BinaryOp::Add, Some(0.0), _) => Existing(b),
                    (BinaryOp::Add | BinaryOp::Sub, _, Some(0.0)) => Existing(a),
                    (BinaryOp::Sub, Some(0.0), _) => New(Expr::Unary(UnaryOp::Neg, b)),
                    (BinaryOp::Mul, Some(0.0), _) | (BinaryOp::Mul, _, Some(0.0)) => zero(),
                    (BinaryOp::Mul, Some(1.0), _) => Existing(b),
                    (BinaryOp::Mul | BinaryOp::Div, _, Some(1.0)) => Existing(a),
                    (BinaryOp::Mul, Some(-1.0), _) => New(Expr::Unary(UnaryOp::Neg, b)),
                    (BinaryOp::Mul, _, Some(-1.0)) => New(Expr::Unary(UnaryOp::Neg, a)),
                    (BinaryOp::Div, Some(0.0), _) => zero(),
                    _ => match (op, self.get(b)) {
                        (BinaryOp::Add, Expr::Unary(UnaryOp::Neg, negated)) => {
                            New(Expr::Binary(BinaryOp::Sub, a, *negated))
                        }
                        (BinaryOp::Sub, Expr::Unary(UnaryOp::Neg, negated)) => {
                            New(Expr::Binary(BinaryOp::Add, a, *negated))
                        }
                        _ => New(Expr::Binary(op, a, b)),
                    },
                }
            }
            Expr::Sum { index, body } => match self.constant(body) {
                Some(0.0) => zero(),
                _ => New(Expr::Sum { index, body }),
            },
            other => New(other),
        }
    }

    /// Shorthands for building derived expressions.
    pub fn constant_expr(&mut self, value: f64) -> ExprId {
        self.intern(Expr::Const(Constant(value)))
    }
    pub fn unary(&mut self, op: UnaryOp, a: ExprId) -> ExprId {
        self.intern(Expr::Unary(op, a))
    }
    pub fn binary(&mut self, op: BinaryOp, a: ExprId, b: ExprId) -> ExprId {
        self.intern(Expr::Binary(op, a, b))
    }
    pub fn add(&mut self, a: ExprId, b: ExprId) -> ExprId {
        self.binary(BinaryOp::Add, a, b)
    }
    pub fn sub(&mut self, a: ExprId, b: ExprId) -> ExprId {
        self.binary(BinaryOp::Sub, a, b)
    }
    pub fn mul(&mut self, a: ExprId, b: ExprId) -> ExprId {
        self.binary(BinaryOp::Mul, a, b)
    }
    pub fn div(&mut self, a: ExprId, b: ExprId) -> ExprId {
        self.binary(BinaryOp::Div, a, b)
    }
    pub fn neg(&mut self, a: ExprId) -> ExprId {
        self.unary(UnaryOp::Neg, a)
    }
    pub fn load(&mut self, value: Value, indices: Vec<IndexId>) -> ExprId {
        self.intern(Expr::Load { value, indices })
    }
    pub fn sum(&mut self, index: IndexId, body: ExprId) -> ExprId {
        self.intern(Expr::Sum { index, body })
    }

    /// Calls `visit` on `id` and every expression below it (each node once per path).
    pub fn walk(&self, id: ExprId, visit: &mut impl FnMut(ExprId, &Expr)) {
        let expr = self.get(id);
        visit(id, expr);
        match expr {
            Expr::Const(_) | Expr::Load { .. } => {}
            Expr::Unary(_, a) => self.walk(*a, visit),
            Expr::Binary(_, a, b) => {
                self.walk(*a, visit);
                self.walk(*b, visit);
            }
            Expr::Sum { body, .. } => self.walk(*body, visit),
        }
    }
}

/// How a parameter's values are drawn when a model is created.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ParamInit {
    Constant(f64),
    Normal { mean: f64, std: f64 },
    Uniform { low: f64, high: f64 },
}

/// A per-step input: a slice of the layer's input projection, one per head.
#[derive(Clone, Debug)]
pub struct Input {
    pub name: String,
    pub shape: Shape,
    /// Applied to the projection before the step uses it.
    pub activation: Option<UnaryOp>,
    pub range: SourceRange,
}

/// A learned per-head parameter.
#[derive(Clone, Debug)]
pub struct Param {
    pub name: String,
    pub shape: Shape,
    pub init: ParamInit,
    pub range: SourceRange,
}

/// A recurrent state, one per batch element and head.
#[derive(Clone, Debug)]
pub struct State {
    pub name: String,
    pub shape: Shape,
    /// The value every element starts from when no initial state is given.
    pub init: f64,
    pub range: SourceRange,
}

/// `target[indices] = expr` for a `let` or an `output`: the shape follows from the indices.
#[derive(Clone, Debug)]
pub struct Definition {
    pub name: String,
    pub indices: Vec<IndexId>,
    pub expr: ExprId,
    /// Filled by [`crate::check`] from the dims of `indices`.
    pub shape: Shape,
    pub range: SourceRange,
}

/// `update S[indices] = expr`.
#[derive(Clone, Debug)]
pub struct Update {
    pub state: StateId,
    pub indices: Vec<IndexId>,
    pub expr: ExprId,
    pub range: SourceRange,
}

/// One step of a recurrent cell, per batch element and head.
#[derive(Clone, Debug)]
pub struct Cell {
    pub name: String,
    /// The cell's name in the source.
    pub range: SourceRange,
    pub docs: Vec<String>,
    pub dims: Vec<Dim>,
    pub inputs: Vec<Input>,
    pub params: Vec<Param>,
    pub states: Vec<State>,
    pub lets: Vec<Definition>,
    pub updates: Vec<Update>,
    pub outputs: Vec<Definition>,
    pub indices: Vec<IndexVar>,
    pub exprs: ExprArena,
}

impl Cell {
    /// The dim an index variable ranges over. Every index has one once the cell is checked.
    pub fn index_dim(&self, index: IndexId) -> DimId {
        self.indices[index.0]
            .dim
            .expect("index dims are inferred by the check pass")
    }

    /// The shape of any value the step can read.
    pub fn value_shape(&self, value: Value) -> &Shape {
        match value {
            Value::Input(i) | Value::InputPreActivation(i) => &self.inputs[i.0].shape,
            Value::Param(p) => &self.params[p.0].shape,
            Value::State(s, _) => &self.states[s.0].shape,
            Value::Let(l) => &self.lets[l.0].shape,
            Value::Grad(grad) => self.grad_shape(grad),
        }
    }

    pub fn grad_shape(&self, grad: Grad) -> &Shape {
        match grad {
            Grad::Output(o) => &self.outputs[o.0].shape,
            Grad::StateFromNext(s) | Grad::State(s) | Grad::StatePrevious(s) => {
                &self.states[s.0].shape
            }
            Grad::Let(l) => &self.lets[l.0].shape,
            Grad::InputActivated(i) | Grad::Input(i) => &self.inputs[i.0].shape,
            Grad::Param(p) => &self.params[p.0].shape,
        }
    }

    /// The update that assigns `state` (a checked cell has exactly one).
    pub fn update_of(&self, state: StateId) -> &Update {
        self.updates
            .iter()
            .find(|u| u.state == state)
            .expect("every state is updated once")
    }

    /// A fresh index variable (for derived statements).
    pub fn fresh_index(&mut self, name: &str, dim: DimId) -> IndexId {
        let range = self.indices.first().map_or_else(
            || SourceRange::token(proc_macro2::Span::call_site()),
            |first| first.range,
        );
        self.indices.push(IndexVar {
            name: name.to_string(),
            dim: Some(dim),
            range,
        });
        IndexId(self.indices.len() - 1)
    }

    /// The index variables free in an expression, in id order.
    pub fn free_indices(&self, expr: ExprId) -> std::collections::BTreeSet<IndexId> {
        match self.exprs.get(expr) {
            Expr::Const(_) => Default::default(),
            Expr::Load { indices, .. } => indices.iter().copied().collect(),
            Expr::Unary(_, a) => self.free_indices(*a),
            Expr::Binary(_, a, b) => {
                let mut free = self.free_indices(*a);
                free.extend(self.free_indices(*b));
                free
            }
            Expr::Sum { index, body } => {
                let mut free = self.free_indices(*body);
                free.remove(index);
                free
            }
        }
    }

    /// Every expression reachable from `roots`, each once, operands before the expressions
    /// that use them.
    pub fn reachable(&self, roots: &[ExprId]) -> Vec<ExprId> {
        fn visit(
            cell: &Cell,
            expr: ExprId,
            seen: &mut std::collections::HashSet<ExprId>,
            out: &mut Vec<ExprId>,
        ) {
            if !seen.insert(expr) {
                return;
            }
            match cell.exprs.get(expr) {
                Expr::Const(_) | Expr::Load { .. } => {}
                Expr::Unary(_, a) => visit(cell, *a, seen, out),
                Expr::Binary(_, a, b) => {
                    visit(cell, *a, seen, out);
                    visit(cell, *b, seen, out);
                }
                Expr::Sum { body, .. } => visit(cell, *body, seen, out),
            }
            out.push(expr);
        }
        let (mut seen, mut out) = (Default::default(), Vec::new());
        for &root in roots {
            visit(self, root, &mut seen, &mut out);
        }
        out
    }

    /// Every `sum` reachable from `roots`, each once, inner sums before the sums that hold
    /// them.
    pub fn sums_under(&self, roots: &[ExprId]) -> Vec<ExprId> {
        let reachable = self.reachable(roots).into_iter();
        reachable
            .filter(|&expr| matches!(self.exprs.get(expr), Expr::Sum { .. }))
            .collect()
    }

    /// Whether an expression reachable from `roots` loads `value`.
    pub fn reads(&self, roots: &[ExprId], value: Value) -> bool {
        self.reachable(roots).into_iter().any(
            |expr| matches!(self.exprs.get(expr), Expr::Load { value: read, .. } if *read == value),
        )
    }

    /// Number of elements of a shape, given the size of each dim.
    pub fn numel(shape: &Shape, dim_sizes: &[usize]) -> usize {
        shape.iter().map(|d| dim_sizes[d.0]).product()
    }
}

/// One gradient statement of the backward step: `grad[indices] = expr`.
#[derive(Clone, Debug)]
pub struct GradDefinition {
    pub grad: Grad,
    pub indices: Vec<IndexId>,
    pub expr: ExprId,
}

/// The backward step derived from a [`Cell`] by [`crate::autodiff`]: given ∂L/∂o_t
/// ([`Grad::Output`]) and the gradient reaching S_t from step t+1 ([`Grad::StateFromNext`]),
/// the definitions compute, in order, every gradient of the step. Expressions may read the
/// step's primal values (inputs before and after activation, parameters, S_{t−1}, S_t, lets)
/// and gradients defined earlier.
///
/// `cell` is the forward cell extended with the backward step's expressions and index
/// variables; its forward statements are unchanged.
#[derive(Clone, Debug)]
pub struct BackwardStep {
    pub cell: Cell,
    pub definitions: Vec<GradDefinition>,
}

impl BackwardStep {
    pub fn definition(&self, grad: Grad) -> Option<&GradDefinition> {
        self.definitions.iter().find(|d| d.grad == grad)
    }
}
