//! Chunkwise pass: recognises cells that are linear in their state and derives what the
//! chunked (matrix-multiply) schedule computes.
//!
//! A cell fits when it has one matrix state `S[a, b]` whose update is
//!
//! ```text
//! S[i, j] = γ · S[i, j] + κ · ν          (γ, κ, ν state-free)
//! ```
//!
//! where the decay γ is positive and either a scalar or varies along one axis of `S` (a
//! diagonal gate), and the write `κ · ν` is one outer product (κ over `i`, ν over `j`); and
//! whose outputs are
//!
//! ```text
//! o[j] = σ[j] · Σ_i q[i] · S[i, j] + δ[j]      (q, σ, δ state-free; σ and δ optional)
//! ```
//!
//! The axis the readout sums over is the key axis (K), the other one the value axis (V). Per
//! step this is linear attention with a decay: with b_t = Σ_{u ≤ t} log γ_u (along its axis),
//! `o_t = σ_t · Σ_{s ≤ t} Σ_i q_t[i] · exp(b_t − b_s) · κ_s[i] · ν_s + δ_t` plus the decayed
//! initial state, which the runtime evaluates chunk by chunk with matrix products. The
//! [`ChunkForm`] holds the per-step factors as expressions of the cell.
//!
//! The delta rule (DeltaNet; Gated DeltaNet with a scalar decay) fits too:
//!
//! ```text
//! S[i, j] = γ · S[i, j] − κ[i] · Σ_l β[l] · S[l, j] + κ[i] · ν[j]    (γ scalar; κ, β, ν state-free)
//! ```
//!
//! (the state read back along β and written back along the same κ as the write, up to scalar
//! factors: those only the read-back has go with β, those only the write has with ν; factors
//! are compared by structure, up to the names of their `sum`s' indices; found through
//! DeltaNet's `error` let, which the pass expands, or written inline); the runtime evaluates it
//! chunk by chunk in its WY/UT form ([`ChunkForm::delta`]).
//!
//! The decay is carried in log space: `log γ` is derived symbolically ([`log_of`]), so that
//! `sigmoid(x)` becomes `logsigmoid(x)` (of the input before its activation) and `exp(x)`
//! becomes `x`; gates that round to 0 in f32 keep a finite logarithm. Cells that do not fit get
//! a [`NotChunkable`] saying which statement breaks the form and how (mLSTM has three states,
//! Elman's update is nonlinear, a delta rule with a per-key decay is not taken).

use crate::autodiff::rename_indices;
use crate::display::expr_text;
use crate::ir::*;
use std::fmt;

/// A per-step value of the chunked form: `expr`, ranging over `indices` (its free indices are
/// among them; a factor free of them is broadcast).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Factor {
    pub expr: ExprId,
    pub indices: Vec<IndexId>,
}

/// The axis of the state along which the decay varies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateAxis {
    /// One decay for the whole state (RetNet, Mamba2).
    Scalar,
    /// One decay per key (SimpleRNN, GLA).
    Key,
    /// One decay per value.
    Value,
}

/// How one output reads the state: `o[j] = scale[j] · Σ_i query[i] · S[i, j] + direct[j]`.
#[derive(Clone, Debug)]
pub struct Readout {
    pub output: OutputId,
    /// Over the key axis; `None` when the output does not read the state.
    pub query: Option<Factor>,
    /// Over the output's index (or a scalar); `None` for 1.
    pub scale: Option<Factor>,
    /// The state-free terms, over the output's indices; `None` for 0.
    pub direct: Option<Factor>,
}

/// A cell in the form the chunked schedule computes (see the module docs).
#[derive(Clone, Debug)]
pub struct ChunkForm {
    /// The cell, its arena extended with the derived expressions of the factors.
    pub cell: Cell,
    pub state: StateId,
    /// The state's axis (0 or 1) the readouts sum over; the other is the value axis.
    pub key_axis: usize,
    pub gate_axis: GateAxis,
    /// log γ: over the key index, the value index, or none ([`GateAxis`]).
    pub log_gate: Factor,
    /// κ over the key index of the update.
    pub key: Factor,
    /// ν over the value index of the update.
    pub value: Factor,
    /// One per output, in declaration order.
    pub readouts: Vec<Readout>,
    /// The delta rule's read-back vector β over the key axis (its own index): the update also
    /// subtracts `κ[i] · Σ_l β[l] · S[l, j]`. With it the decay is a scalar.
    pub delta: Option<Factor>,
}

/// Why a cell has no chunked form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotChunkable {
    pub cell: String,
    pub reason: String,
}

impl fmt::Display for NotChunkable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cell {} has no chunked form: {}", self.cell, self.reason)
    }
}

impl std::error::Error for NotChunkable {}

/// Recognises a cell linear in its state and derives its [`ChunkForm`].
pub fn chunk_form(cell: &Cell) -> Result<ChunkForm, NotChunkable> {
    Recognizer {
        original: cell,
        cell: cell.clone(),
    }
    .run()
}

struct Recognizer<'a> {
    original: &'a Cell,
    /// The copy whose arena receives the derived expressions.
    cell: Cell,
}

/// What the update's terms split into.
struct Update {
    indices: [IndexId; 2],
    decay: ExprId,
    /// The write's factors over the state's axis 0 and axis 1 (scalars with axis 0, or with
    /// the key of a delta rule).
    write: [ExprId; 2],
    delta: Option<DeltaTerm>,
}

/// The delta rule's term `−κ[i] · Σ_l β[l] · S[l, j]` of an update.
struct DeltaTerm {
    /// The state's axis the sum runs along.
    axis: usize,
    /// β, over `index`.
    read: ExprId,
    index: IndexId,
    /// κ as `coefficient · Π factors` (the term is its negation times the sum).
    along: Term,
}

/// One term of an expanded expression: `coefficient · Π factors`.
type Term = (f64, Vec<ExprId>);

impl Recognizer<'_> {
    fn refuse<T>(&self, reason: String) -> Result<T, NotChunkable> {
        Err(NotChunkable {
            cell: self.original.name.clone(),
            reason,
        })
    }

    fn text(&self, expr: ExprId) -> String {
        format!("`{}`", expr_text(&self.cell, expr))
    }

    fn run(mut self) -> Result<ChunkForm, NotChunkable> {
        let cell = self.original;
        if cell.states.len() != 1 {
            let names: Vec<&str> = cell.states.iter().map(|s| s.name.as_str()).collect();
            return self.refuse(format!(
                "it has {} states ({}); the chunked schedule carries one matrix state",
                names.len(),
                names.join(", ")
            ));
        }
        let state = StateId(0);
        let name = &cell.states[0].name;
        if cell.states[0].shape.len() != 2 {
            return self.refuse(format!(
                "its state {name} has rank {}; the chunked schedule needs a matrix state {name}[K, V]",
                cell.states[0].shape.len()
            ));
        }
        let update = self.update(state)?;
        let (readouts, key_axis) = self.readouts(state)?;
        let value_axis = 1 - key_axis;
        let delta = match &update.delta {
            None => None,
            Some(delta) => {
                if delta.axis != key_axis {
                    return self.refuse(format!(
                        "the update of {name} reads it back along another axis than its outputs \
                         read it; the delta rule's chunked form needs one key axis"
                    ));
                }
                if !self.cell.free_indices(update.decay).is_empty() {
                    return self.refuse(format!(
                        "the update of {name} decays it by {}, which varies along an axis, and \
                         reads it back; the delta rule's chunked form takes a scalar decay",
                        self.text(update.decay)
                    ));
                }
                Some(Factor {
                    expr: delta.read,
                    indices: vec![delta.index],
                })
            }
        };
        let decay_free = self.cell.free_indices(update.decay);
        let gate_axis = if decay_free.is_empty() {
            GateAxis::Scalar
        } else if decay_free.iter().all(|&i| i == update.indices[key_axis]) {
            GateAxis::Key
        } else if decay_free.iter().all(|&i| i == update.indices[value_axis]) {
            GateAxis::Value
        } else {
            return self.refuse(format!(
                "the decay {} of {name} varies along both of its axes; the chunked schedule needs \
                 a scalar decay or one along a single axis (a diagonal gate)",
                self.text(update.decay)
            ));
        };
        let gate_indices = match gate_axis {
            GateAxis::Scalar => vec![],
            GateAxis::Key => vec![update.indices[key_axis]],
            GateAxis::Value => vec![update.indices[value_axis]],
        };
        let log_gate = log_of(&mut self.cell, update.decay);
        Ok(ChunkForm {
            state,
            key_axis,
            gate_axis,
            log_gate: Factor {
                expr: log_gate,
                indices: gate_indices,
            },
            key: Factor {
                expr: update.write[key_axis],
                indices: vec![update.indices[key_axis]],
            },
            value: Factor {
                expr: update.write[value_axis],
                indices: vec![update.indices[value_axis]],
            },
            readouts,
            delta,
            cell: self.cell,
        })
    }

    /// Splits `S[i, j] = γ · S[i, j] + κ · ν` into its decay and write, and the delta rule's
    /// `S[i, j] − κ[i] · Σ_l β[l] · S[l, j] + κ[i] · ν[j]` into its read-back and write.
    fn update(&mut self, state: StateId) -> Result<Update, NotChunkable> {
        let cell = self.original;
        let name = &cell.states[state.0].name;
        let statement = cell.update_of(state);
        let indices = [statement.indices[0], statement.indices[1]];
        let index_name = |i: IndexId| cell.indices[i.0].name.as_str();
        let carried = format!(
            "{name}[{}, {}]",
            index_name(indices[0]),
            index_name(indices[1])
        );
        let mut decay = None;
        let mut write: Option<Term> = None;
        let mut delta: Option<DeltaTerm> = None;
        for (coefficient, mut factors) in expand(&mut self.cell, statement.expr) {
            let term = self.term_text(coefficient, &factors);
            if !factors.iter().any(|&f| reads_state(&self.cell, f)) {
                if write.is_some() {
                    return self.refuse(format!(
                        "the update of {name} adds more than one state-free term; the chunked \
                         schedule takes one outer-product write per step"
                    ));
                }
                write = Some((coefficient, factors));
                continue;
            }
            let position = factors.iter().position(|&f| {
                matches!(self.cell.exprs.get(f), Expr::Load {
                    value: Value::State(s, StateTime::Previous),
                    indices: read,
                } if *s == state && read[..] == indices[..])
            });
            let Some(position) = position else {
                let Some((position, axis, read, index)) = self.read_back(state, indices, &factors)
                else {
                    return self.refuse(format!(
                        "the update of {name} reads it in the term {term}, which is neither a \
                         decay times {carried} nor a delta rule's read-back \
                         κ · Σ_l β[l] · {name}[l, …]: the state must enter linearly"
                    ));
                };
                if delta.is_some() {
                    return self.refuse(format!(
                        "the update of {name} reads it back in more than one term"
                    ));
                }
                factors.remove(position);
                delta = Some(DeltaTerm {
                    axis,
                    read,
                    index,
                    along: (-coefficient, factors),
                });
                continue;
            };
            factors.remove(position);
            if let Some(&f) = factors.iter().find(|&&f| reads_state(&self.cell, f)) {
                return self.refuse(format!(
                    "the decay {} of {name} reads a state",
                    self.text(f)
                ));
            }
            if decay.is_some() {
                return self.refuse(format!(
                    "the update of {name} reads {carried} in more than one term"
                ));
            }
            if coefficient <= 0.0 {
                return self.refuse(format!(
                    "the decay of {name} in {term} has a constant factor {coefficient} ≤ 0; the \
                     chunked schedule needs a positive decay"
                ));
            }
            decay = Some(product(&mut self.cell, coefficient, &factors));
        }
        let Some(decay) = decay else {
            return self.refuse(format!(
                "the update of {name} does not carry it over (no term γ · {carried})"
            ));
        };
        let Some((coefficient, factors)) = write else {
            return self.refuse(format!("the update of {name} writes nothing"));
        };
        // Factors free of both indices go with the key of a delta rule, else with axis 0.
        let scalar_side = delta.as_ref().map_or(0, |d| d.axis);
        let mut sides: [Vec<ExprId>; 2] = [vec![], vec![]];
        for &factor in &factors {
            let free = self.cell.free_indices(factor);
            let side = if free.is_empty() {
                scalar_side
            } else if free.iter().all(|&i| i == indices[0]) {
                0
            } else if free.iter().all(|&i| i == indices[1]) {
                1
            } else {
                return self.refuse(format!(
                    "the write {} to {name} is not an outer product of a vector over {} and one \
                     over {}: its factor {} depends on both",
                    self.term_text(coefficient, &factors),
                    index_name(indices[0]),
                    index_name(indices[1]),
                    self.text(factor)
                ));
            };
            sides[side].push(factor);
        }
        let write = match &mut delta {
            None => [
                product(&mut self.cell, coefficient, &sides[0]),
                product(&mut self.cell, 1.0, &sides[1]),
            ],
            Some(delta) => {
                // The write must run along the vector the read-back is written along, up to
                // scalars: the factors both share are the key κ; a scalar only the read-back
                // has (a decay applied to the read-back too) goes with β, one only the write
                // has goes with the value ν. Then
                // S_t = γ_t · S_{t−1} + κ_t · (ν_t − Σ_l β_t[l] · S_{t−1}[l, ·]).
                let (along, along_factors) = delta.along.clone();
                let (shared, read_only, write_only) =
                    shared_factors(&self.cell, &along_factors, &sides[delta.axis]);
                let scalar = |f: &ExprId| self.cell.free_indices(*f).is_empty();
                let scalars_only = read_only.iter().chain(&write_only).all(scalar);
                if !scalars_only || along == 0.0 {
                    return self.refuse(format!(
                        "the update of {name} reads it back along {} but writes {}; the delta \
                         rule's chunked form needs the write along the same vector",
                        self.term_text(along, &along_factors),
                        self.term_text(coefficient, &factors)
                    ));
                }
                delta.read = product(
                    &mut self.cell,
                    1.0,
                    &[&read_only[..], &[delta.read]].concat(),
                );
                let value_factors = [&sides[1 - delta.axis][..], &write_only[..]].concat();
                let mut write = [ExprId(0); 2];
                write[delta.axis] = product(&mut self.cell, along, &shared);
                write[1 - delta.axis] =
                    product(&mut self.cell, coefficient / along, &value_factors);
                write
            }
        };
        Ok(Update {
            indices,
            decay,
            write,
            delta,
        })
    }

    /// Whether `factors` are `Σ_l β[l] · S[l, j]` (or `S[j, l]`) times factors over the
    /// update's index on the same axis as `l`: the position of the sum among them, the axis,
    /// β and `l`.
    fn read_back(
        &mut self,
        state: StateId,
        indices: [IndexId; 2],
        factors: &[ExprId],
    ) -> Option<(usize, usize, ExprId, IndexId)> {
        let reading: Vec<usize> = (0..factors.len())
            .filter(|&p| reads_state(&self.cell, factors[p]))
            .collect();
        let &[position] = &reading[..] else {
            return None;
        };
        let Expr::Sum { index, body } = *self.cell.exprs.get(factors[position]) else {
            return None;
        };
        let terms = expand(&mut self.cell, body);
        let [(coefficient, body_factors)] = &terms[..] else {
            return None;
        };
        let (loads, mut rest): (Vec<ExprId>, Vec<ExprId>) = body_factors
            .iter()
            .partition(|&&f| reads_state(&self.cell, f));
        let &[load] = &loads[..] else {
            return None;
        };
        let Expr::Load {
            value: Value::State(s, StateTime::Previous),
            indices: read,
        } = self.cell.exprs.get(load)
        else {
            return None;
        };
        let axis = read.iter().position(|&i| i == index)?;
        if *s != state || read.len() != 2 || read[1 - axis] != indices[1 - axis] {
            return None;
        }
        let over = |cell: &Cell, f: ExprId, allowed: IndexId| {
            cell.free_indices(f).iter().all(|&i| i == allowed)
        };
        let outside_ok = (0..factors.len())
            .filter(|&p| p != position)
            .all(|p| over(&self.cell, factors[p], indices[axis]));
        if !outside_ok || !rest.iter().all(|&f| over(&self.cell, f, index)) {
            return None;
        }
        rest.sort();
        let read = product(&mut self.cell, *coefficient, &rest);
        Some((position, axis, read, index))
    }

    /// A term as text: `` `coefficient * f₁ * f₂` `` (the coefficient left out when ±1).
    fn term_text(&self, coefficient: f64, factors: &[ExprId]) -> String {
        let mut parts: Vec<String> = factors
            .iter()
            .map(|&f| match self.cell.exprs.get(f) {
                Expr::Binary(BinaryOp::Add | BinaryOp::Sub, ..) => {
                    format!("({})", expr_text(&self.cell, f))
                }
                _ => expr_text(&self.cell, f),
            })
            .collect();
        if parts.is_empty() || coefficient.abs() != 1.0 {
            parts.insert(0, format!("{}", coefficient.abs()));
        }
        let sign = if coefficient < 0.0 { "-" } else { "" };
        format!("`{sign}{}`", parts.join(" * "))
    }

    /// Splits every output into `σ · Σ_i q[i] · S[i, j] + δ`; also returns the key axis.
    fn readouts(&mut self, state: StateId) -> Result<(Vec<Readout>, usize), NotChunkable> {
        let cell = self.original;
        let name = &cell.states[state.0].name;
        let mut key_axis = None;
        let mut readouts = Vec::with_capacity(cell.outputs.len());
        for (o, output) in cell.outputs.iter().enumerate() {
            let not_a_readout = |term: String| {
                format!(
                    "the output {} reads {name} in the term {term}, which is not a readout \
                     Σ_i q[i] · {name}[i, j] (times factors free of the state)",
                    output.name
                )
            };
            let mut query = None;
            let mut scale = None;
            let mut direct = None;
            for (sign, term) in split_terms(cell, output.expr) {
                if !reads_state(cell, term) {
                    let signed = product(&mut self.cell, sign, &[term]);
                    direct = Some(match direct {
                        None => signed,
                        Some(sum) => self.cell.exprs.add(sum, signed),
                    });
                    continue;
                }
                if query.is_some() {
                    return self.refuse(format!(
                        "the output {} reads {name} in more than one term",
                        output.name
                    ));
                }
                let (coefficient, mut factors) = split_factors(cell, term, sign);
                let reading: Vec<usize> = (0..factors.len())
                    .filter(|&p| reads_state(cell, factors[p]))
                    .collect();
                let &[position] = &reading[..] else {
                    return self.refuse(not_a_readout(self.text(term)));
                };
                let &Expr::Sum { index, body } = cell.exprs.get(factors[position]) else {
                    return self.refuse(not_a_readout(self.text(term)));
                };
                factors.remove(position);
                let (body_coefficient, mut body_factors) = split_factors(cell, body, 1.0);
                let reading: Vec<usize> = (0..body_factors.len())
                    .filter(|&p| reads_state(cell, body_factors[p]))
                    .collect();
                let &[load] = &reading[..] else {
                    return self.refuse(not_a_readout(self.text(term)));
                };
                let Expr::Load {
                    value: Value::State(s, StateTime::Current),
                    indices,
                } = cell.exprs.get(body_factors[load])
                else {
                    return self.refuse(not_a_readout(self.text(term)));
                };
                let axis = indices.iter().position(|&i| i == index);
                let (Some(axis), true) = (axis, *s == state) else {
                    return self.refuse(not_a_readout(self.text(term)));
                };
                if output.indices[..] != [indices[1 - axis]] {
                    return self.refuse(format!(
                        "the output {} reads {name} along an axis other than its own index; \
                         the chunked schedule needs o[j] = Σ_i q[i] · {name}[i, j]",
                        output.name
                    ));
                }
                if key_axis.is_some_and(|k| k != axis) {
                    return self.refuse(format!(
                        "the outputs sum {name} over different axes; the chunked schedule needs \
                         one key axis"
                    ));
                }
                key_axis = Some(axis);
                body_factors.remove(load);
                let query_expr = product(&mut self.cell, body_coefficient, &body_factors);
                let scale_expr = product(&mut self.cell, coefficient, &factors);
                let outside = |cell: &Cell, expr: ExprId, allowed: &[IndexId]| {
                    cell.free_indices(expr).iter().any(|i| !allowed.contains(i))
                };
                if outside(&self.cell, query_expr, &[index])
                    || outside(&self.cell, scale_expr, &output.indices)
                {
                    return self.refuse(not_a_readout(self.text(term)));
                }
                query = Some(Factor {
                    expr: query_expr,
                    indices: vec![index],
                });
                if !matches!(self.cell.exprs.get(scale_expr), Expr::Const(Constant(c)) if *c == 1.0)
                {
                    scale = Some(Factor {
                        expr: scale_expr,
                        indices: output.indices.clone(),
                    });
                }
            }
            readouts.push(Readout {
                output: OutputId(o),
                query,
                scale,
                direct: direct.map(|expr| Factor {
                    expr,
                    indices: output.indices.clone(),
                }),
            });
        }
        match key_axis {
            Some(axis) => Ok((readouts, axis)),
            None => self.refuse(format!("no output reads its state {name}")),
        }
    }
}

impl ChunkForm {
    /// The cell rewritten as the chunked schedule reads it: `S = exp(log γ) · S + κ · ν` (minus
    /// `κ · Σ_l β[l] · S[l, ·]` for the delta rule) and
    /// `o = σ · Σ_i q[i] · S[i, j] + δ`, with the same inputs, parameters and state. It equals
    /// the original cell step by step (the compiler's tests check this with the interpreter).
    pub fn canonical_cell(&self) -> Cell {
        let mut cell = self.cell.clone();
        let arena = &mut cell.exprs;
        let update = cell
            .updates
            .iter_mut()
            .find(|u| u.state == self.state)
            .expect("the state has an update");
        let decay = arena.unary(UnaryOp::Exp, self.log_gate.expr);
        let carried = arena.load(
            Value::State(self.state, StateTime::Previous),
            update.indices.clone(),
        );
        let decayed = arena.mul(decay, carried);
        let write = arena.mul(self.key.expr, self.value.expr);
        update.expr = arena.add(decayed, write);
        if let Some(delta) = &self.delta {
            // − κ[i] · Σ_l β[l] · S[l, j], l on the key axis.
            let mut indices = update.indices.clone();
            indices[self.key_axis] = delta.indices[0];
            let read = arena.load(Value::State(self.state, StateTime::Previous), indices);
            let body = arena.mul(delta.expr, read);
            let read_back = arena.sum(delta.indices[0], body);
            let correction = arena.mul(self.key.expr, read_back);
            update.expr = arena.binary(BinaryOp::Sub, update.expr, correction);
        }
        for readout in &self.readouts {
            let output = &mut cell.outputs[readout.output.0];
            let mut expr = arena.constant_expr(0.0);
            if let Some(query) = &readout.query {
                let mut indices = vec![query.indices[0], output.indices[0]];
                if self.key_axis == 1 {
                    indices.reverse();
                }
                let state = arena.load(Value::State(self.state, StateTime::Current), indices);
                let body = arena.mul(query.expr, state);
                expr = arena.sum(query.indices[0], body);
                if let Some(scale) = &readout.scale {
                    expr = arena.mul(scale.expr, expr);
                }
            }
            if let Some(direct) = &readout.direct {
                expr = arena.add(expr, direct.expr);
            }
            output.expr = expr;
        }
        cell
    }
}

/// Whether `expr` reads a state, directly or through a `let`.
pub fn reads_state(cell: &Cell, expr: ExprId) -> bool {
    let mut found = false;
    cell.exprs.walk(expr, &mut |_, node| {
        if let Expr::Load { value, .. } = node {
            found |= match value {
                Value::State(..) => true,
                Value::Let(l) => reads_state(cell, cell.lets[l.0].expr),
                _ => false,
            };
        }
    });
    found
}

/// `expr` as a sum of signed terms (through `+`, `−` and negation).
fn split_terms(cell: &Cell, expr: ExprId) -> Vec<(f64, ExprId)> {
    fn collect(cell: &Cell, expr: ExprId, sign: f64, out: &mut Vec<(f64, ExprId)>) {
        match *cell.exprs.get(expr) {
            Expr::Binary(BinaryOp::Add, a, b) => {
                collect(cell, a, sign, out);
                collect(cell, b, sign, out);
            }
            Expr::Binary(BinaryOp::Sub, a, b) => {
                collect(cell, a, sign, out);
                collect(cell, b, -sign, out);
            }
            Expr::Unary(UnaryOp::Neg, a) => collect(cell, a, -sign, out),
            _ => out.push((sign, expr)),
        }
    }
    let mut out = Vec::new();
    collect(cell, expr, 1.0, &mut out);
    out
}

/// `expr` as a constant (starting from `coefficient`) times a product of factors (through
/// `·`, negation and constants).
fn split_factors(cell: &Cell, expr: ExprId, coefficient: f64) -> (f64, Vec<ExprId>) {
    fn collect(cell: &Cell, expr: ExprId, coefficient: &mut f64, out: &mut Vec<ExprId>) {
        match *cell.exprs.get(expr) {
            Expr::Binary(BinaryOp::Mul, a, b) => {
                collect(cell, a, coefficient, out);
                collect(cell, b, coefficient, out);
            }
            Expr::Unary(UnaryOp::Neg, a) => {
                *coefficient = -*coefficient;
                collect(cell, a, coefficient, out);
            }
            Expr::Const(Constant(c)) => *coefficient *= c,
            _ => out.push(expr),
        }
    }
    let mut coefficient = coefficient;
    let mut out = Vec::new();
    collect(cell, expr, &mut coefficient, &mut out);
    (coefficient, out)
}

/// `expr` as a sum of terms `coefficient · Π factors`: split through `+`, `−`, negation and
/// constants, products distributed over the sums that read a state, and the `let`s that read a
/// state inlined (DeltaNet's `error`); a state-free sum stays one factor.
fn expand(cell: &mut Cell, expr: ExprId) -> Vec<Term> {
    let negated =
        |terms: Vec<Term>| -> Vec<Term> { terms.into_iter().map(|(c, f)| (-c, f)).collect() };
    match cell.exprs.get(expr).clone() {
        Expr::Binary(BinaryOp::Add, a, b) => {
            let mut terms = expand(cell, a);
            terms.extend(expand(cell, b));
            terms
        }
        Expr::Binary(BinaryOp::Sub, a, b) => {
            let mut terms = expand(cell, a);
            terms.extend(negated(expand(cell, b)));
            terms
        }
        Expr::Unary(UnaryOp::Neg, a) => negated(expand(cell, a)),
        Expr::Const(Constant(c)) => vec![(c, vec![])],
        Expr::Binary(BinaryOp::Mul, a, b) => {
            let mut side = |x: ExprId| {
                let terms = expand(cell, x);
                if terms.len() > 1 && !reads_state(cell, x) {
                    vec![(1.0, vec![x])]
                } else {
                    terms
                }
            };
            let (left, right) = (side(a), side(b));
            let mut terms = Vec::with_capacity(left.len() * right.len());
            for (cl, fl) in &left {
                for (cr, fr) in &right {
                    terms.push((cl * cr, [fl.as_slice(), fr.as_slice()].concat()));
                }
            }
            terms
        }
        Expr::Load {
            value: Value::Let(l),
            indices,
        } if reads_state(cell, expr) => {
            let inlined = inline_let(cell, l, &indices);
            expand(cell, inlined)
        }
        _ => vec![(1.0, vec![expr])],
    }
}

/// The definition of `let` `l` with its indices renamed to `indices`.
fn inline_let(cell: &mut Cell, l: LetId, indices: &[IndexId]) -> ExprId {
    let definition = &cell.lets[l.0];
    let (expr, from) = (definition.expr, definition.indices.clone());
    rename_indices(&mut cell.exprs, expr, &from, indices)
}

/// The factors `a` and `b` have in common (each matched once, compared by their structure,
/// not their place in the source), then those only `a` has, then those only `b` has.
fn shared_factors(
    cell: &Cell,
    a: &[ExprId],
    b: &[ExprId],
) -> (Vec<ExprId>, Vec<ExprId>, Vec<ExprId>) {
    let (mut shared, mut only_b) = (Vec::new(), Vec::new());
    let mut only_a = a.to_vec();
    for &factor in b {
        match (only_a.iter()).position(|&f| same_structure(&cell.exprs, f, factor)) {
            Some(position) => shared.push(only_a.remove(position)),
            None => only_b.push(factor),
        }
    }
    (shared, only_a, only_b)
}

/// Whether two expressions are the same tree of operations, constants and loads, wherever
/// their nodes come from (the user's source or derived), and whatever the indices their `sum`s
/// bind: `sum(l) k[l] * k[l]` written twice binds two index variables, the same sum.
fn same_structure(exprs: &ExprArena, a: ExprId, b: ExprId) -> bool {
    same_up_to_bound_indices(exprs, a, b, &mut Vec::new())
}

/// [`same_structure`] under `bound`: the pairs of indices bound by the enclosing `sum`s of `a`
/// and of `b`, innermost last.
fn same_up_to_bound_indices(
    exprs: &ExprArena,
    a: ExprId,
    b: ExprId,
    bound: &mut Vec<(IndexId, IndexId)>,
) -> bool {
    if a == b && bound.iter().all(|(x, y)| x == y) {
        return true;
    }
    let same =
        |x: ExprId, y: ExprId, bound: &mut Vec<_>| same_up_to_bound_indices(exprs, x, y, bound);
    match (exprs.get(a), exprs.get(b)) {
        (Expr::Const(x), Expr::Const(y)) => x == y,
        (
            Expr::Load { value, indices },
            Expr::Load {
                value: other,
                indices: other_indices,
            },
        ) => {
            let same_index = |(&i, &j): (&IndexId, &IndexId)| match bound
                .iter()
                .rev()
                .find(|(x, y)| *x == i || *y == j)
            {
                Some(&(x, y)) => x == i && y == j,
                None => i == j,
            };
            value == other
                && indices.len() == other_indices.len()
                && indices.iter().zip(other_indices).all(same_index)
        }
        (Expr::Unary(f, x), Expr::Unary(g, y)) => f == g && same(*x, *y, bound),
        (Expr::Binary(f, x1, x2), Expr::Binary(g, y1, y2)) => {
            f == g && same(*x1, *y1, bound) && same(*x2, *y2, bound)
        }
        (Expr::Sum { index: i, body: x }, Expr::Sum { index: j, body: y }) => {
            bound.push((*i, *j));
            let same_bodies = same(*x, *y, bound);
            bound.pop();
            same_bodies
        }
        _ => false,
    }
}

/// `coefficient · f₁ · f₂ · …` as a derived expression.
fn product(cell: &mut Cell, coefficient: f64, factors: &[ExprId]) -> ExprId {
    let mut expr = cell.exprs.constant_expr(coefficient);
    for &factor in factors {
        expr = cell.exprs.mul(expr, factor);
    }
    expr
}

/// `log(expr)` without taking a logarithm of what was just exponentiated: `log exp x = x`,
/// `log σ(x) = logsigmoid(x)` (also for inputs activated by `sigmoid` or `exp`, through their
/// value before activation), products and quotients split, `let`s inlined.
pub fn log_of(cell: &mut Cell, expr: ExprId) -> ExprId {
    match cell.exprs.get(expr).clone() {
        Expr::Const(Constant(c)) => cell.exprs.constant_expr(c.ln()),
        Expr::Unary(UnaryOp::Exp, a) => a,
        Expr::Unary(UnaryOp::Sigmoid, a) => cell.exprs.unary(UnaryOp::LogSigmoid, a),
        Expr::Binary(op @ (BinaryOp::Mul | BinaryOp::Div), a, b) => {
            let (a, b) = (log_of(cell, a), log_of(cell, b));
            let op = if op == BinaryOp::Mul {
                BinaryOp::Add
            } else {
                BinaryOp::Sub
            };
            cell.exprs.binary(op, a, b)
        }
        Expr::Load {
            value: Value::Input(input),
            indices,
        } => match cell.inputs[input.0].activation {
            Some(UnaryOp::Sigmoid) => {
                let pre = cell.exprs.load(Value::InputPreActivation(input), indices);
                cell.exprs.unary(UnaryOp::LogSigmoid, pre)
            }
            Some(UnaryOp::Exp) => cell.exprs.load(Value::InputPreActivation(input), indices),
            _ => cell.exprs.unary(UnaryOp::Log, expr),
        },
        Expr::Load {
            value: Value::Let(l),
            indices,
        } => {
            let inlined = inline_let(cell, l, &indices);
            log_of(cell, inlined)
        }
        _ => cell.exprs.unary(UnaryOp::Log, expr),
    }
}
