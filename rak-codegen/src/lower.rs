//! Lowering pass: [`CellSyntax`] → IR [`Cell`], resolving every name.
//!
//! Reports: duplicate names, unknown dims, unknown values, unknown functions and wrong
//! numbers of arguments, bad parameter initialisers, the wrong number of indices on a value,
//! an index used twice in one access, indices not bound by the left-hand side or an enclosing
//! `sum` (free indices), and `sum` over an index that is already bound. Index *dims* are left
//! to [`crate::check`].

use crate::diagnostic::{Diagnostic, Diagnostics, SourceRange};
use crate::ir::*;
use crate::syntax::*;
use proc_macro2::Ident;
use std::collections::{HashMap, HashSet};

/// What a name declared in the cell refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Symbol {
    Dim(DimId),
    Input(InputId),
    Param(ParamId),
    State(StateId),
    Let(LetId),
    Output(OutputId),
}

impl Symbol {
    fn kind(self) -> &'static str {
        match self {
            Symbol::Dim(_) => "a dim",
            Symbol::Input(_) => "an input",
            Symbol::Param(_) => "a parameter",
            Symbol::State(_) => "a state",
            Symbol::Let(_) => "a let",
            Symbol::Output(_) => "an output",
        }
    }
}

/// Which kind of statement an expression belongs to (it decides what a state name reads).
#[derive(Clone, Copy, PartialEq, Eq)]
enum StatementKind {
    Let(LetId),
    Update,
    Output,
}

/// Lowers a parsed cell, reporting every problem found.
pub fn lower(syntax: &CellSyntax) -> Result<Cell, Diagnostics> {
    let mut lowering = Lowering {
        cell: Cell {
            name: syntax.name.to_string(),
            range: range_of(&syntax.name),
            docs: syntax.docs.clone(),
            dims: Vec::new(),
            inputs: Vec::new(),
            params: Vec::new(),
            states: Vec::new(),
            lets: Vec::new(),
            updates: Vec::new(),
            outputs: Vec::new(),
            indices: Vec::new(),
            exprs: ExprArena::default(),
        },
        symbols: HashMap::new(),
        let_ranks: Vec::new(),
        poisoned: HashSet::new(),
        errors: Vec::new(),
    };
    lowering.declare(syntax);
    lowering.define(syntax);
    match Diagnostics::from_vec(lowering.errors) {
        Some(errors) => Err(errors),
        None => Ok(lowering.cell),
    }
}

struct Lowering {
    cell: Cell,
    symbols: HashMap<String, (Symbol, SourceRange)>,
    /// The number of indices on each let's left-hand side (its rank, known before its
    /// definition is lowered).
    let_ranks: Vec<usize>,
    /// Declarations whose shape names an unknown dim: already reported, so their uses are
    /// not checked again (that would only repeat the same mistake).
    poisoned: HashSet<String>,
    errors: Vec<Diagnostic>,
}

fn range_of(ident: &Ident) -> SourceRange {
    SourceRange::token(ident.span())
}

impl Lowering {
    fn error(&mut self, range: impl Into<SourceRange>, message: impl Into<String>) {
        self.errors.push(Diagnostic::new(range, message));
    }

    /// Registers a name, reporting a clash with an earlier declaration.
    fn bind_name(&mut self, name: &Ident, symbol: Symbol) {
        let key = name.to_string();
        if let Some((previous, _)) = self.symbols.get(&key) {
            let kind = previous.kind();
            self.error(
                name.span(),
                format!("`{key}` is already declared as {kind}"),
            );
            return;
        }
        self.symbols.insert(key, (symbol, range_of(name)));
    }

    /// First pass: dims, inputs, parameters, states, and the names of lets and outputs (so
    /// that a misplaced reference can be explained rather than reported as unknown).
    fn declare(&mut self, syntax: &CellSyntax) {
        for item in &syntax.items {
            if let Item::Dims(dims) = item {
                for name in dims {
                    let id = DimId(self.cell.dims.len());
                    self.cell.dims.push(Dim {
                        name: name.to_string(),
                        range: range_of(name),
                    });
                    self.bind_name(name, Symbol::Dim(id));
                }
            }
        }
        for item in &syntax.items {
            match item {
                Item::Dims(_) => {}
                Item::Inputs(inputs) => {
                    for input in inputs {
                        let shape = self.shape(&input.name, &input.shape);
                        let activation = input
                            .activation
                            .as_ref()
                            .and_then(|name| self.activation(name));
                        let id = InputId(self.cell.inputs.len());
                        self.cell.inputs.push(Input {
                            name: input.name.to_string(),
                            shape,
                            activation,
                            range: range_of(&input.name),
                        });
                        self.bind_name(&input.name, Symbol::Input(id));
                    }
                }
                Item::Params(params) => {
                    for param in params {
                        let shape = self.shape(&param.name, &param.shape);
                        let init = param
                            .init
                            .as_ref()
                            .map_or(ParamInit::Constant(0.0), |init| self.param_init(init));
                        let id = ParamId(self.cell.params.len());
                        self.cell.params.push(Param {
                            name: param.name.to_string(),
                            shape,
                            init,
                            range: range_of(&param.name),
                        });
                        self.bind_name(&param.name, Symbol::Param(id));
                    }
                }
                Item::States(states) => {
                    for state in states {
                        let shape = self.shape(&state.name, &state.shape);
                        let id = StateId(self.cell.states.len());
                        self.cell.states.push(State {
                            name: state.name.to_string(),
                            shape,
                            init: state.init.map_or(0.0, |n| n.value),
                            range: range_of(&state.name),
                        });
                        self.bind_name(&state.name, Symbol::State(id));
                    }
                }
                Item::Let(assign) => {
                    let id = LetId(self.cell.lets.len());
                    self.cell.lets.push(placeholder_definition(assign));
                    self.let_ranks.push(assign.indices.len());
                    self.bind_name(&assign.target, Symbol::Let(id));
                }
                Item::Output(assign) => {
                    let id = OutputId(self.cell.outputs.len());
                    self.cell.outputs.push(placeholder_definition(assign));
                    self.bind_name(&assign.target, Symbol::Output(id));
                }
                Item::Update(_) => {}
            }
        }
    }

    fn shape(&mut self, owner: &Ident, dims: &[Ident]) -> Shape {
        let mut shape = Vec::new();
        for name in dims {
            match self.symbols.get(&name.to_string()) {
                Some((Symbol::Dim(id), _)) => shape.push(*id),
                _ => {
                    let declared = self.cell.dims.iter().map(|d| format!("`{}`", d.name));
                    let declared = declared.collect::<Vec<_>>().join(", ");
                    let hint = if declared.is_empty() {
                        "no dims are declared; add `dims ...;`".to_string()
                    } else {
                        format!("the declared dims are {declared}")
                    };
                    self.error(name.span(), format!("unknown dim `{name}`: {hint}"));
                    self.poisoned.insert(owner.to_string());
                }
            }
        }
        shape
    }

    fn activation(&mut self, name: &Ident) -> Option<UnaryOp> {
        let key = name.to_string();
        if let Some((_, op)) = UnaryOp::CALLABLE.iter().find(|(n, _)| *n == key) {
            return Some(*op);
        }
        if key == "identity" {
            return None;
        }
        self.error(
            name.span(),
            format!(
                "unknown activation `{key}`: expected `identity` or one of {}",
                unary_names()
            ),
        );
        None
    }

    fn param_init(&mut self, init: &InitSyntax) -> ParamInit {
        match init {
            InitSyntax::Constant(number) => ParamInit::Constant(number.value),
            InitSyntax::Call {
                function,
                args,
                range,
            } => {
                let values: Vec<f64> = args.iter().map(|a| a.value).collect();
                match (function.to_string().as_str(), values.as_slice()) {
                    ("normal", [mean, std]) if *std >= 0.0 => ParamInit::Normal {
                        mean: *mean,
                        std: *std,
                    },
                    ("uniform", [low, high]) if low <= high => ParamInit::Uniform {
                        low: *low,
                        high: *high,
                    },
                    ("normal", [_, _]) => {
                        self.error(*range, "`normal(mean, std)` needs std >= 0");
                        ParamInit::Constant(0.0)
                    }
                    ("uniform", [_, _]) => {
                        self.error(*range, "`uniform(low, high)` needs low <= high");
                        ParamInit::Constant(0.0)
                    }
                    (name @ ("normal" | "uniform"), _) => {
                        let found = values.len();
                        self.error(*range, format!("`{name}` takes 2 arguments, found {found}"));
                        ParamInit::Constant(0.0)
                    }
                    (other, _) => {
                        self.error(
                            function.span(),
                            format!(
                                "unknown initialiser `{other}`: expected a number, \
                                 `normal(mean, std)` or `uniform(low, high)`"
                            ),
                        );
                        ParamInit::Constant(0.0)
                    }
                }
            }
        }
    }

    /// Second pass: the statements, in order.
    fn define(&mut self, syntax: &CellSyntax) {
        let (mut next_let, mut next_output) = (0, 0);
        for item in &syntax.items {
            match item {
                Item::Let(assign) => {
                    let id = LetId(next_let);
                    next_let += 1;
                    let (indices, expr) = self.statement(assign, StatementKind::Let(id));
                    let definition = &mut self.cell.lets[id.0];
                    (definition.indices, definition.expr) = (indices, expr);
                }
                Item::Output(assign) => {
                    let id = OutputId(next_output);
                    next_output += 1;
                    let (indices, expr) = self.statement(assign, StatementKind::Output);
                    let definition = &mut self.cell.outputs[id.0];
                    (definition.indices, definition.expr) = (indices, expr);
                }
                Item::Update(assign) => {
                    let target = assign.target.to_string();
                    let state = match self.symbols.get(&target) {
                        Some((Symbol::State(id), _)) => Some(*id),
                        Some((other, _)) => {
                            let kind = other.kind();
                            self.error(
                                assign.target.span(),
                                format!("`update` assigns a state, but `{target}` is {kind}"),
                            );
                            None
                        }
                        None => {
                            self.error(
                                assign.target.span(),
                                format!("unknown state `{target}`: declare it with `state`"),
                            );
                            None
                        }
                    };
                    let (indices, expr) = self.statement(assign, StatementKind::Update);
                    if let Some(state) = state
                        && !self.poisoned.contains(&target)
                    {
                        self.check_target_rank(assign, &self.cell.states[state.0].shape.clone());
                        self.cell.updates.push(Update {
                            state,
                            indices,
                            expr,
                            range: assign.range,
                        });
                    }
                }
                Item::Dims(_) | Item::Inputs(_) | Item::Params(_) | Item::States(_) => {}
            }
        }
    }

    fn check_target_rank(&mut self, assign: &AssignSyntax, shape: &Shape) {
        if assign.indices.len() != shape.len() {
            let (name, want, got) = (&assign.target, shape.len(), assign.indices.len());
            let dims = self.dim_list(shape);
            self.error(
                assign.target_range,
                format!(
                    "`{name}` has {} {dims} but is assigned with {}",
                    count(want, "dim"),
                    count(got, "index")
                ),
            );
        }
    }

    fn dim_list(&self, shape: &Shape) -> String {
        let names: Vec<&str> = shape
            .iter()
            .map(|d| self.cell.dims[d.0].name.as_str())
            .collect();
        format!("[{}]", names.join(", "))
    }

    /// Binds the left-hand side's indices and lowers the right-hand side.
    fn statement(&mut self, assign: &AssignSyntax, kind: StatementKind) -> (Vec<IndexId>, ExprId) {
        let mut scope: Vec<(String, IndexId)> = Vec::new();
        let state_shape = match (kind, self.symbols.get(&assign.target.to_string())) {
            (StatementKind::Update, Some((Symbol::State(s), _))) => {
                Some(self.cell.states[s.0].shape.clone())
            }
            _ => None,
        };
        for (position, name) in assign.indices.iter().enumerate() {
            // An update's indices range over the state's dims; the others are inferred.
            let dim = state_shape
                .as_ref()
                .and_then(|shape| shape.get(position).copied());
            if let Some(id) = self.bind_index(name, dim, &scope) {
                scope.push((name.to_string(), id));
            }
        }
        let indices = scope.iter().map(|(_, id)| *id).collect();
        let expr = self.expr(&assign.value, kind, &mut scope);
        (indices, expr)
    }

    /// Creates the index variable for a binding occurrence of `name`.
    fn bind_index(
        &mut self,
        name: &Ident,
        dim: Option<DimId>,
        scope: &[(String, IndexId)],
    ) -> Option<IndexId> {
        let key = name.to_string();
        if let Some((Symbol::Dim(_), _)) = self.symbols.get(&key) {
            self.error(
                name.span(),
                format!("`{key}` is a dim; index with a variable that ranges over it, such as `i`"),
            );
            return None;
        }
        if scope.iter().any(|(n, _)| *n == key) {
            self.error(
                name.span(),
                format!("index `{key}` appears twice on the left-hand side"),
            );
            return None;
        }
        self.cell.indices.push(IndexVar {
            name: key,
            dim,
            range: range_of(name),
        });
        Some(IndexId(self.cell.indices.len() - 1))
    }

    fn expr(
        &mut self,
        syntax: &ExprSyntax,
        kind: StatementKind,
        scope: &mut Vec<(String, IndexId)>,
    ) -> ExprId {
        let range = syntax.range();
        let expr = match syntax {
            ExprSyntax::Number(number) => Expr::Const(Constant(number.value)),
            ExprSyntax::Paren { inner, .. } => return self.expr(inner, kind, scope),
            ExprSyntax::Neg { operand, .. } => {
                Expr::Unary(UnaryOp::Neg, self.expr(operand, kind, scope))
            }
            ExprSyntax::Binary { op, lhs, rhs, .. } => {
                let op = match op {
                    BinarySyntaxOp::Add => BinaryOp::Add,
                    BinarySyntaxOp::Sub => BinaryOp::Sub,
                    BinarySyntaxOp::Mul => BinaryOp::Mul,
                    BinarySyntaxOp::Div => BinaryOp::Div,
                };
                Expr::Binary(op, self.expr(lhs, kind, scope), self.expr(rhs, kind, scope))
            }
            ExprSyntax::Sum { indices, body, .. } => {
                let depth = scope.len();
                let mut bound = Vec::new();
                for name in indices {
                    let key = name.to_string();
                    if scope.iter().any(|(n, _)| *n == key) {
                        self.error(
                            name.span(),
                            format!(
                                "cannot sum over `{key}`: it is already bound (by the left-hand \
                                 side or an enclosing `sum`); sum over a new index"
                            ),
                        );
                        continue;
                    }
                    if let Some(id) = self.bind_index(name, None, scope) {
                        scope.push((key, id));
                        bound.push(id);
                    }
                }
                let mut result = self.expr(body, kind, scope);
                scope.truncate(depth);
                for index in bound.into_iter().rev() {
                    result = self.cell.exprs.push(
                        Expr::Sum {
                            index,
                            body: result,
                        },
                        range,
                    );
                }
                return result;
            }
            ExprSyntax::Call { function, args, .. } => self.call(function, args, kind, scope),
            ExprSyntax::Access {
                name,
                indices,
                range,
            } => self.access(name, indices, *range, kind, scope),
        };
        self.cell.exprs.push(expr, range)
    }

    fn call(
        &mut self,
        function: &Ident,
        args: &[ExprSyntax],
        kind: StatementKind,
        scope: &mut Vec<(String, IndexId)>,
    ) -> Expr {
        let lowered: Vec<ExprId> = args.iter().map(|a| self.expr(a, kind, scope)).collect();
        let key = function.to_string();
        let unary = UnaryOp::CALLABLE
            .iter()
            .find(|(n, _)| *n == key)
            .map(|(_, op)| *op);
        let binary = BinaryOp::CALLABLE
            .iter()
            .find(|(n, _)| *n == key)
            .map(|(_, op)| *op);
        let expected = match (unary, binary) {
            (Some(op), _) if lowered.len() == 1 => return Expr::Unary(op, lowered[0]),
            (_, Some(op)) if lowered.len() == 2 => {
                return Expr::Binary(op, lowered[0], lowered[1]);
            }
            (Some(_), _) => "1 argument",
            (_, Some(_)) => "2 arguments",
            (None, None) => {
                let hint = if key == "sum" {
                    "`sum` is written `sum(i) term`".to_string()
                } else {
                    format!("the functions are {}, `max` and `min`", unary_names())
                };
                self.error(function.span(), format!("unknown function `{key}`: {hint}"));
                return Expr::Const(Constant(0.0));
            }
        };
        let found = lowered.len();
        self.error(
            function.span(),
            format!("`{key}` takes {expected}, found {found}"),
        );
        Expr::Const(Constant(0.0))
    }

    fn access(
        &mut self,
        name: &Ident,
        indices: &[Ident],
        range: SourceRange,
        kind: StatementKind,
        scope: &[(String, IndexId)],
    ) -> Expr {
        let fallback = Expr::Const(Constant(0.0));
        let key = name.to_string();
        if self.poisoned.contains(&key) {
            // Its shape is unknown: check only that the indices are bound.
            self.resolve_indices(indices, scope);
            return fallback;
        }
        let value = match self.symbols.get(&key).map(|(symbol, _)| *symbol) {
            Some(Symbol::Input(id)) => Value::Input(id),
            Some(Symbol::Param(id)) => Value::Param(id),
            Some(Symbol::State(id)) => {
                let time = match kind {
                    StatementKind::Output => StateTime::Current,
                    StatementKind::Let(_) | StatementKind::Update => StateTime::Previous,
                };
                Value::State(id, time)
            }
            Some(Symbol::Let(id)) => match kind {
                StatementKind::Let(current) if id.0 >= current.0 => {
                    let message = if id == current {
                        format!("`{key}` is used in its own definition")
                    } else {
                        format!(
                            "`{key}` is used before its `let`; a `let` can use only lets above it"
                        )
                    };
                    self.error(name.span(), message);
                    return fallback;
                }
                _ => Value::Let(id),
            },
            Some(Symbol::Output(_)) => {
                self.error(
                    name.span(),
                    format!("`{key}` is an output; outputs cannot be read"),
                );
                return fallback;
            }
            Some(Symbol::Dim(_)) => {
                self.error(
                    name.span(),
                    format!("`{key}` is a dim, not a value; use a number for a scale"),
                );
                return fallback;
            }
            None => {
                self.error(
                    name.span(),
                    format!("unknown name `{key}`: not an input, parameter, state or let"),
                );
                return fallback;
            }
        };
        // A let's shape is inferred later; only its rank is known now.
        let shape = match value {
            Value::Let(id) => vec![DimId(usize::MAX); self.let_ranks[id.0]],
            _ => self.cell.value_shape(value).clone(),
        };
        if indices.len() != shape.len() {
            let dims = match value {
                Value::Let(_) => String::new(),
                _ => format!(" {}", self.dim_list(&shape)),
            };
            let message = if shape.is_empty() {
                format!("`{key}` is a scalar; use it without indices")
            } else {
                let example = ["i", "j", "l", "m", "n"][..shape.len().min(5)].join(", ");
                format!(
                    "`{key}` has {}{dims} but is indexed with {}; write `{key}[{example}]`",
                    count(shape.len(), "dim"),
                    count(indices.len(), "index")
                )
            };
            self.error(range, message);
            return fallback;
        }
        match self.resolve_indices(indices, scope) {
            Some(ids) => Expr::Load {
                value,
                indices: ids,
            },
            None => fallback,
        }
    }

    /// The index variables named in an access, or `None` (reported) if one is not bound or
    /// appears twice.
    fn resolve_indices(
        &mut self,
        indices: &[Ident],
        scope: &[(String, IndexId)],
    ) -> Option<Vec<IndexId>> {
        let mut ids = Vec::new();
        for index in indices {
            let index_name = index.to_string();
            let Some((_, id)) = scope.iter().rev().find(|(n, _)| *n == index_name) else {
                self.error(
                    index.span(),
                    format!(
                        "unknown index `{index_name}`: it is not bound by the left-hand side \
                         nor by an enclosing `sum({index_name})`"
                    ),
                );
                return None;
            };
            if ids.contains(id) {
                self.error(
                    index.span(),
                    format!("index `{index_name}` appears twice in one access; diagonals are not supported"),
                );
                return None;
            }
            ids.push(*id);
        }
        Some(ids)
    }
}

fn placeholder_definition(assign: &AssignSyntax) -> Definition {
    Definition {
        name: assign.target.to_string(),
        indices: Vec::new(),
        expr: ExprId(usize::MAX),
        shape: Vec::new(),
        range: assign.range,
    }
}

/// `1 dim`, `2 dims`, `0 indices`.
fn count(n: usize, noun: &str) -> String {
    match (n, noun) {
        (1, _) => format!("1 {noun}"),
        (_, "index") => format!("{n} indices"),
        _ => format!("{n} {noun}s"),
    }
}

fn unary_names() -> String {
    let names: Vec<String> = UnaryOp::CALLABLE
        .iter()
        .map(|(n, _)| format!("`{n}`"))
        .collect();
    names.join(", ")
}
