//! Pretty-printing of a cell's IR and of its backward step, in the DSL's notation.
//!
//! State reads are explicit: `S_prev` is S_{t−1}, `S` is S_t. Gradients print as `d` + the
//! value's name (`dS_next` is the gradient reaching S_t from step t+1, `dk_pre` the gradient
//! of `k` before its activation). Index variables are renamed apart within a statement.

use crate::ir::*;
use std::collections::HashMap;
use std::fmt::Write;

/// The forward step, one declaration or statement per line.
pub fn cell_to_string(cell: &Cell) -> String {
    let mut out = String::new();
    for line in &cell.docs {
        let _ = writeln!(out, "///{line}");
    }
    let _ = writeln!(out, "cell {} {{", cell.name);
    let dims: Vec<&str> = cell.dims.iter().map(|d| d.name.as_str()).collect();
    if !dims.is_empty() {
        let _ = writeln!(out, "    dims {};", dims.join(", "));
    }
    for input in &cell.inputs {
        let activation = input
            .activation
            .map(|op| format!(" = {}", op.name()))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "    input {}{}{activation};",
            input.name,
            shape_text(cell, &input.shape)
        );
    }
    for param in &cell.params {
        let init = match param.init {
            ParamInit::Constant(c) => format!("{c:?}"),
            ParamInit::Normal { mean, std } => format!("normal({mean:?}, {std:?})"),
            ParamInit::Uniform { low, high } => format!("uniform({low:?}, {high:?})"),
        };
        let _ = writeln!(
            out,
            "    param {}{} = {init};",
            param.name,
            shape_text(cell, &param.shape)
        );
    }
    for state in &cell.states {
        let _ = writeln!(
            out,
            "    state {}{} = {:?};",
            state.name,
            shape_text(cell, &state.shape),
            state.init
        );
    }
    for definition in &cell.lets {
        let statement =
            statement_text(cell, &definition.name, &definition.indices, definition.expr);
        let _ = writeln!(out, "    let {statement};");
    }
    for update in &cell.updates {
        let name = &cell.states[update.state.0].name;
        let _ = writeln!(
            out,
            "    update {};",
            statement_text(cell, name, &update.indices, update.expr)
        );
    }
    for definition in &cell.outputs {
        let statement =
            statement_text(cell, &definition.name, &definition.indices, definition.expr);
        let _ = writeln!(out, "    output {statement};");
    }
    out.push_str("}\n");
    out
}

/// The backward step, one gradient definition per line, in evaluation order.
pub fn backward_to_string(step: &BackwardStep) -> String {
    let cell = &step.cell;
    let mut out = format!("backward {} {{\n", cell.name);
    for definition in &step.definitions {
        let name = value_name(cell, Value::Grad(definition.grad));
        let _ = writeln!(
            out,
            "    {};",
            statement_text(cell, &name, &definition.indices, definition.expr)
        );
    }
    out.push_str("}\n");
    out
}

/// A cell's chunked form ([`crate::chunkwise`]): the key axis, the gate's axis, each derived
/// factor, then the cell rewritten in that form.
pub fn chunk_form_to_string(form: &crate::chunkwise::ChunkForm) -> String {
    let cell = &form.cell;
    let factor = |name: &str, f: &crate::chunkwise::Factor| {
        format!("    {};\n", statement_text(cell, name, &f.indices, f.expr))
    };
    let state = &cell.states[form.state.0].name;
    let mut text = format!(
        "chunked form of {}: state {state}, key axis {}, decay {:?}\n",
        cell.name, form.key_axis, form.gate_axis
    )
    .replace("Scalar", "scalar")
    .replace("decay Key", "decay per key")
    .replace("decay Value", "decay per value");
    text += &factor("log_decay", &form.log_gate);
    text += &factor("key", &form.key);
    text += &factor("value", &form.value);
    if let Some(delta) = &form.delta {
        text += &factor("read_back", delta);
    }
    for readout in &form.readouts {
        let name = &cell.outputs[readout.output.0].name;
        for (part, f) in [
            ("query", &readout.query),
            ("scale", &readout.scale),
            ("direct", &readout.direct),
        ] {
            if let Some(f) = f {
                text += &factor(&format!("{name}.{part}"), f);
            }
        }
    }
    text + "as a cell:\n" + &cell_to_string(&form.canonical_cell())
}

fn shape_text(cell: &Cell, shape: &Shape) -> String {
    if shape.is_empty() {
        return String::new();
    }
    let names: Vec<&str> = shape.iter().map(|d| cell.dims[d.0].name.as_str()).collect();
    format!("[{}]", names.join(", "))
}

/// The printed name of a value.
pub fn value_name(cell: &Cell, value: Value) -> String {
    let input = |i: InputId| cell.inputs[i.0].name.as_str();
    let state = |s: StateId| cell.states[s.0].name.as_str();
    match value {
        Value::Input(i) => input(i).to_string(),
        Value::InputPreActivation(i) => format!("{}_pre", input(i)),
        Value::Param(p) => cell.params[p.0].name.clone(),
        Value::State(s, StateTime::Previous) => format!("{}_prev", state(s)),
        Value::State(s, StateTime::Current) => state(s).to_string(),
        Value::Let(l) => cell.lets[l.0].name.clone(),
        Value::Grad(grad) => match grad {
            Grad::Output(o) => format!("d{}", cell.outputs[o.0].name),
            Grad::StateFromNext(s) => format!("d{}_next", state(s)),
            Grad::State(s) => format!("d{}", state(s)),
            Grad::StatePrevious(s) => format!("d{}_prev", state(s)),
            Grad::Let(l) => format!("d{}", cell.lets[l.0].name),
            Grad::InputActivated(i) => format!("d{}", input(i)),
            Grad::Input(i) => format!("d{}_pre", input(i)),
            Grad::Param(p) => format!("d{}", cell.params[p.0].name),
        },
    }
}

/// `name[i, j] = expr`
pub fn statement_text(cell: &Cell, name: &str, indices: &[IndexId], expr: ExprId) -> String {
    let mut printer = Printer {
        cell,
        names: HashMap::new(),
    };
    for &index in indices {
        printer.name_of(index);
    }
    let lhs = printer.indexed(name, indices);
    format!("{lhs} = {}", printer.expr(expr, 0))
}

/// One expression, its index variables named as the cell names them.
pub fn expr_text(cell: &Cell, expr: ExprId) -> String {
    Printer {
        cell,
        names: HashMap::new(),
    }
    .expr(expr, 0)
}

/// Binding strength, loosest first.
const ADDITIVE: u8 = 1;
const MULTIPLICATIVE: u8 = 2;
const PREFIX: u8 = 3;
const ATOM: u8 = 4;

struct Printer<'a> {
    cell: &'a Cell,
    names: HashMap<IndexId, String>,
}

impl Printer<'_> {
    /// A statement-unique name for an index variable.
    fn name_of(&mut self, index: IndexId) -> String {
        if let Some(name) = self.names.get(&index) {
            return name.clone();
        }
        let base = &self.cell.indices[index.0].name;
        let mut name = base.clone();
        let mut n = 2;
        while self.names.values().any(|taken| *taken == name) {
            name = format!("{base}{n}");
            n += 1;
        }
        self.names.insert(index, name.clone());
        name
    }

    fn indexed(&mut self, name: &str, indices: &[IndexId]) -> String {
        if indices.is_empty() {
            return name.to_string();
        }
        let names: Vec<String> = indices.iter().map(|&i| self.name_of(i)).collect();
        format!("{name}[{}]", names.join(", "))
    }

    fn precedence(&self, expr: ExprId) -> u8 {
        match self.cell.exprs.get(expr) {
            Expr::Const(Constant(c)) if *c < 0.0 => PREFIX,
            Expr::Const(_) | Expr::Load { .. } => ATOM,
            Expr::Unary(UnaryOp::Neg, _) => PREFIX,
            Expr::Unary(..) => ATOM,
            Expr::Binary(BinaryOp::Add | BinaryOp::Sub, ..) => ADDITIVE,
            Expr::Binary(BinaryOp::Mul | BinaryOp::Div, ..) => MULTIPLICATIVE,
            Expr::Binary(..) => ATOM,
            Expr::Sum { .. } => ADDITIVE,
        }
    }

    /// Prints `expr`, parenthesised if it binds looser than `context`.
    fn expr(&mut self, expr: ExprId, context: u8) -> String {
        let text = match self.cell.exprs.get(expr).clone() {
            Expr::Const(Constant(c)) => format!("{c}"),
            Expr::Load { value, indices } => {
                let name = value_name(self.cell, value);
                self.indexed(&name, &indices)
            }
            Expr::Unary(UnaryOp::Neg, a) => format!("-{}", self.expr(a, PREFIX)),
            Expr::Unary(op, a) => format!("{}({})", op.name(), self.expr(a, 0)),
            Expr::Binary(op @ (BinaryOp::Add | BinaryOp::Sub), a, b) => {
                let symbol = if op == BinaryOp::Add { "+" } else { "-" };
                let right = if op == BinaryOp::Sub {
                    MULTIPLICATIVE
                } else {
                    ADDITIVE
                };
                format!(
                    "{} {symbol} {}",
                    self.expr(a, ADDITIVE),
                    self.expr(b, right)
                )
            }
            Expr::Binary(op @ (BinaryOp::Mul | BinaryOp::Div), a, b) => {
                let symbol = if op == BinaryOp::Mul { "*" } else { "/" };
                let right = if op == BinaryOp::Div {
                    PREFIX
                } else {
                    MULTIPLICATIVE
                };
                // A `sum` as a factor is always parenthesised: its body would swallow the rest.
                let left = self.factor(a, MULTIPLICATIVE);
                let right = self.factor(b, right);
                format!("{left} {symbol} {right}")
            }
            Expr::Binary(op, a, b) => {
                let name = match op {
                    BinaryOp::Max => "max",
                    BinaryOp::Min => "min",
                    _ => "ge",
                };
                format!("{name}({}, {})", self.expr(a, 0), self.expr(b, 0))
            }
            Expr::Sum { index, body } => {
                let name = self.name_of(index);
                format!("sum({name}) {}", self.expr(body, MULTIPLICATIVE))
            }
        };
        if self.precedence(expr) < context {
            format!("({text})")
        } else {
            text
        }
    }

    fn factor(&mut self, expr: ExprId, context: u8) -> String {
        match self.cell.exprs.get(expr) {
            Expr::Sum { .. } => format!("({})", self.expr(expr, 0)),
            _ => self.expr(expr, context),
        }
    }
}
