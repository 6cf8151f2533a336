//! Check pass: infers the dim of every index variable and validates the cell.
//!
//! Reports: an index used with two different dims (`v[i]` where `i` ranges over `K`), an
//! index whose dim cannot be inferred, a state updated twice or never, a cell without states or
//! outputs, and an output that depends on nothing. On success every [`IndexVar::dim`] is set
//! and every let and output has its shape.

use crate::diagnostic::{Diagnostic, Diagnostics, SourceRange};
use crate::ir::*;

/// Checks a lowered cell and completes its index dims and shapes.
pub fn check(cell: &mut Cell) -> Result<(), Diagnostics> {
    let mut checker = Checker {
        evidence: vec![None; cell.indices.len()],
        errors: Vec::new(),
    };
    // Update indices get their dims from the state at lowering; note where.
    for update in &cell.updates {
        for &index in &update.indices {
            let state = &cell.states[update.state.0].name;
            checker.evidence[index.0] = Some(format!("the left-hand side of `update {state}`"));
        }
    }
    for id in 0..cell.lets.len() {
        let (expr, indices) = (cell.lets[id].expr, cell.lets[id].indices.clone());
        checker.infer(cell, expr);
        cell.lets[id].shape = checker.shape_of(cell, &indices);
    }
    for id in 0..cell.updates.len() {
        checker.infer(cell, cell.updates[id].expr);
    }
    for id in 0..cell.outputs.len() {
        let (expr, indices) = (cell.outputs[id].expr, cell.outputs[id].indices.clone());
        checker.infer(cell, expr);
        cell.outputs[id].shape = checker.shape_of(cell, &indices);
    }
    checker.report_uninferred(cell);
    checker.check_updates(cell);
    checker.check_outputs(cell);
    match Diagnostics::from_vec(checker.errors) {
        Some(errors) => Err(errors),
        None => Ok(()),
    }
}

struct Checker {
    /// For each index variable, the access that fixed its dim, for error messages.
    evidence: Vec<Option<String>>,
    errors: Vec<Diagnostic>,
}

impl Checker {
    fn error(&mut self, range: SourceRange, message: String) {
        self.errors.push(Diagnostic::new(range, message));
    }

    /// Unifies the dims of the indices in every access under `expr` with the accessed value's
    /// shape.
    fn infer(&mut self, cell: &mut Cell, expr: ExprId) {
        let mut loads = Vec::new();
        cell.exprs.walk(expr, &mut |id, node| {
            if let Expr::Load { value, indices } = node {
                loads.push((id, *value, indices.clone()));
            }
        });
        for (id, value, indices) in loads {
            let shape = cell.value_shape(value).clone();
            if shape.len() != indices.len() {
                continue; // a let whose shape could not be inferred; already reported
            }
            let range = cell.exprs.range(id).unwrap_or(cell.range);
            for (position, (&index, &dim)) in indices.iter().zip(&shape).enumerate() {
                match cell.indices[index.0].dim {
                    None => {
                        cell.indices[index.0].dim = Some(dim);
                        self.evidence[index.0] =
                            Some(format!("`{}`", access_text(cell, value, &indices)));
                    }
                    Some(bound) if bound != dim => {
                        let var = &cell.indices[index.0].name;
                        let because = self.evidence[index.0].clone().unwrap_or_default();
                        let message = format!(
                            "index `{var}` is used with the wrong dim: `{}` expects `{}` in \
                             position {}, but `{var}` ranges over `{}` (because of {because})",
                            access_text(cell, value, &indices),
                            cell.dims[dim.0].name,
                            position + 1,
                            cell.dims[bound.0].name,
                        );
                        self.error(range, message);
                    }
                    Some(_) => {}
                }
            }
        }
    }

    fn shape_of(&self, cell: &Cell, indices: &[IndexId]) -> Shape {
        indices
            .iter()
            .filter_map(|index| cell.indices[index.0].dim)
            .collect()
    }

    fn report_uninferred(&mut self, cell: &Cell) {
        for index in &cell.indices {
            if index.dim.is_none() {
                let message = format!(
                    "cannot infer the dim of index `{}`: use it to index a value on the \
                     right-hand side",
                    index.name
                );
                self.error(index.range, message);
            }
        }
    }

    fn check_updates(&mut self, cell: &Cell) {
        if cell.states.is_empty() {
            let message = "the cell declares no `state`; add one, e.g. `state S[K, V];`";
            self.error(cell.range, message.to_string());
        }
        for (id, state) in cell.states.iter().enumerate() {
            let updates: Vec<&Update> = cell.updates.iter().filter(|u| u.state.0 == id).collect();
            match updates.as_slice() {
                [] => self.error(
                    state.range,
                    format!(
                        "state `{}` is never updated: add `update {}{} = ...;`",
                        state.name,
                        state.name,
                        example_indices(state.shape.len())
                    ),
                ),
                [_] => {}
                [_, again, ..] => self.error(
                    again.range,
                    format!(
                        "state `{}` is updated twice: a state has exactly one `update`, which \
                         reads the previous value of every state",
                        state.name
                    ),
                ),
            }
        }
    }

    fn check_outputs(&mut self, cell: &Cell) {
        if cell.outputs.is_empty() {
            let message = "the cell has no `output`; add one, e.g. `output o[j] = ...;`";
            self.error(cell.range, message.to_string());
        }
        for output in &cell.outputs {
            let mut reads_something = false;
            cell.exprs.walk(output.expr, &mut |_, node| {
                reads_something |= matches!(node, Expr::Load { .. });
            });
            if !reads_something {
                let message = format!(
                    "output `{}` depends on nothing: it reads no state, input, parameter or let",
                    output.name
                );
                self.error(output.range, message);
            }
        }
    }
}

/// `[i, j]` for a rank-2 value, nothing for a scalar.
fn example_indices(rank: usize) -> String {
    if rank == 0 {
        return String::new();
    }
    let names: Vec<&str> = ["i", "j", "l", "m", "n", "p"]
        .iter()
        .cycle()
        .take(rank)
        .copied()
        .collect();
    format!("[{}]", names.join(", "))
}

/// `name[i, j]` as the user wrote it.
fn access_text(cell: &Cell, value: Value, indices: &[IndexId]) -> String {
    let name = match value {
        Value::Input(i) | Value::InputPreActivation(i) => &cell.inputs[i.0].name,
        Value::Param(p) => &cell.params[p.0].name,
        Value::State(s, _) => &cell.states[s.0].name,
        Value::Let(l) => &cell.lets[l.0].name,
        Value::Grad(_) => "gradient",
    };
    if indices.is_empty() {
        return name.to_string();
    }
    let names: Vec<&str> = indices
        .iter()
        .map(|i| cell.indices[i.0].name.as_str())
        .collect();
    format!("{name}[{}]", names.join(", "))
}
