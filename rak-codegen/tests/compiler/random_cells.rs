//! Random well-formed cells, written by a small generator that follows the DSL's grammar and
//! index rules: every one must compile; its derived backward step must match finite
//! differences (as the reference cells do in `gradients.rs`); its kernels must be emitted as
//! valid Rust. Random cells of a linear form (a decay along either axis or a scalar one, the
//! delta rule, gated or not) must get a chunked form, with the gate axis and the delta rule
//! they were written with, whose canonical cell equals them step by step (as in
//! `chunkwise.rs`) and whose gradients match finite differences too.
//!
//! The reference cells cover the shapes of the published variants; these cover what a
//! researcher may write next: lets and updates reading several states, contractions in gates
//! and writes, parameters of every shape, nested functions. Expressions use smooth functions
//! only (no `max`, `min`, `abs`, `relu`, …), so that finite differences hold everywhere, and
//! every state update is a sigmoid gate times the state plus a bounded write (the delta rule's
//! keys are bounded too), so that states stay bounded over the sequence. The seeds are fixed:
//! a failure names its cell's source, to paste into a `.rak` file.

use crate::common::*;
use crate::gradients::check_cell;
use rak_codegen::chunkwise::{GateAxis, chunk_form};

/// How many random cells each test writes (its seeds: 0, 1, …). Each seed of the first test
/// takes about 0.1 s, of the second 0.01 s; a thousand of each passed when these were written.
const RANDOM_CELLS: u64 = 150;
const RANDOM_LINEAR_CELLS: u64 = 500;

/// A value a cell can read: its name and the dims of its axes (0 is `K`, 1 is `V`).
#[derive(Clone)]
struct Value {
    name: String,
    dims: Vec<usize>,
}

const DIM_NAMES: [&str; 2] = ["K", "V"];
/// The index a left-hand side uses for each dim.
const LHS_INDEX: [&str; 2] = ["i", "j"];
/// Activations of inputs, all smooth.
const ACTIVATIONS: [&str; 6] = ["", "sigmoid", "tanh", "softplus", "silu", "logsigmoid"];

/// Writes random expressions over the values declared so far.
struct Writer<'a> {
    rng: &'a mut Rng,
    /// Values an expression may read.
    values: Vec<Value>,
    /// Counter of the indices `sum` introduces (`l0`, `l1`, …), unique within a cell.
    fresh: usize,
}

impl Writer<'_> {
    /// An expression whose free indices are among `scope` (index, dim), of depth at most `depth`.
    fn expr(&mut self, scope: &[(String, usize)], depth: usize) -> String {
        if depth == 0 || self.rng.unit() < 0.3 {
            return self.leaf(scope);
        }
        match self.rng.below(10) {
            0..=2 => {
                let op = self.rng.pick(&["+", "-", "*"]);
                let (a, b) = (self.expr(scope, depth - 1), self.expr(scope, depth - 1));
                format!("({a} {op} {b})")
            }
            3 => {
                let (a, b) = (self.expr(scope, depth - 1), self.expr(scope, depth - 1));
                format!("({a} / (1.5 + sigmoid({b})))")
            }
            4 => {
                let a = self.expr(scope, depth - 1);
                let f = self
                    .rng
                    .pick(&["sigmoid", "tanh", "softplus", "silu", "logsigmoid"]);
                format!("{f}({a})")
            }
            5 => format!("exp(tanh({}))", self.expr(scope, depth - 1)),
            6 => format!("log(2 + tanh({}))", self.expr(scope, depth - 1)),
            7 => {
                let a = self.expr(scope, depth - 1);
                format!("sqrt(1 + {a} * {a})")
            }
            8 => format!("(-{})", self.expr(scope, depth - 1)),
            _ => self.contraction(scope, depth - 1),
        }
    }

    /// A number or a read of one value.
    fn leaf(&mut self, scope: &[(String, usize)]) -> String {
        if self.values.is_empty() || self.rng.unit() < 0.15 {
            return self.rng.pick(&["0.5", "2", "0.25", "1.5"]).to_string();
        }
        let value = self.values[self.rng.below(self.values.len())].clone();
        self.read(&value, scope)
    }

    /// A read of `value`, each axis indexed by an index of its dim from `scope`, or summed
    /// over a fresh index where `scope` has none.
    fn read(&mut self, value: &Value, scope: &[(String, usize)]) -> String {
        let mut summed = Vec::new();
        let indices: Vec<String> = value
            .dims
            .iter()
            .map(|&dim| match self.bound(scope, dim) {
                Some(index) => index,
                None => {
                    let index = self.fresh_index();
                    summed.push(index.clone());
                    index
                }
            })
            .collect();
        let read = access(&value.name, &indices);
        match summed.is_empty() {
            true => read,
            false => format!("(sum({}) {read})", summed.join(", ")),
        }
    }

    /// One of the indices of `scope` of `dim`, if any.
    fn bound(&mut self, scope: &[(String, usize)], dim: usize) -> Option<String> {
        let bound: Vec<&String> = scope
            .iter()
            .filter(|(_, d)| *d == dim)
            .map(|(name, _)| name)
            .collect();
        (!bound.is_empty()).then(|| bound[self.rng.below(bound.len())].clone())
    }

    /// `sum(l) a * b`: a contraction over a fresh index of a random dim, whose first factor
    /// reads the index (or the sum would not say which dim it runs over).
    fn contraction(&mut self, scope: &[(String, usize)], depth: usize) -> String {
        let index = self.fresh_index();
        let dim = self.rng.below(2);
        // Values with an axis of `dim` whose other axes `scope` can index (`x_k` and `x_v`
        // always qualify).
        let readable: Vec<Value> = (self.values.iter())
            .filter(|v| v.dims.contains(&dim))
            .filter(|v| {
                v.dims
                    .iter()
                    .all(|&d| d == dim || scope.iter().any(|s| s.1 == d))
            })
            .cloned()
            .collect();
        let value = readable[self.rng.below(readable.len())].clone();
        let indices: Vec<String> = value
            .dims
            .iter()
            .map(|&d| match d == dim {
                true => index.clone(),
                false => self.bound(scope, d).expect("filtered above"),
            })
            .collect();
        let mut inner = scope.to_vec();
        inner.push((index.clone(), dim));
        let factor = self.expr(&inner, depth);
        format!(
            "(sum({index}) {} * {factor})",
            access(&value.name, &indices)
        )
    }

    /// A read that uses every index of a left-hand side's `scope` (the compiler infers a
    /// let's or an output's dims from its right-hand side): a value over exactly those dims,
    /// or one input per index.
    fn anchor(&mut self, scope: &[(String, usize)]) -> String {
        let dims: Vec<usize> = scope.iter().map(|s| s.1).collect();
        let exact: Vec<Value> = (self.values.iter())
            .filter(|v| v.dims == dims)
            .cloned()
            .collect();
        if !exact.is_empty() && self.rng.unit() < 0.7 {
            let value = exact[self.rng.below(exact.len())].clone();
            return self.read(&value, scope);
        }
        let reads: Vec<String> = scope
            .iter()
            .map(|(index, dim)| format!("x_{}[{index}]", DIM_NAMES[*dim].to_lowercase()))
            .collect();
        match reads.is_empty() {
            true => "1".to_string(),
            false => reads.join(" * "),
        }
    }

    fn fresh_index(&mut self) -> String {
        self.fresh += 1;
        format!("l{}", self.fresh - 1)
    }
}

/// The dims of a random shape among scalar, `[K]`, `[V]` and (where allowed) `[K, V]`.
fn random_dims(rng: &mut Rng, matrix: bool) -> Vec<usize> {
    match rng.below(if matrix { 4 } else { 3 }) {
        0 => vec![],
        1 => vec![0],
        2 => vec![1],
        _ => vec![0, 1],
    }
}

/// `name[indices]`, or `name` for a scalar.
fn access(name: &str, indices: &[String]) -> String {
    match indices.is_empty() {
        true => name.to_string(),
        false => format!("{name}[{}]", indices.join(", ")),
    }
}

fn declared(name: &str, dims: &[usize]) -> String {
    match dims.is_empty() {
        true => name.to_string(),
        false => {
            let dims: Vec<&str> = dims.iter().map(|&d| DIM_NAMES[d]).collect();
            format!("{name}[{}]", dims.join(", "))
        }
    }
}

/// The left-hand side of a statement over `dims` and the scope it binds.
fn left_hand_side(name: &str, dims: &[usize]) -> (String, Vec<(String, usize)>) {
    let scope: Vec<(String, usize)> = dims
        .iter()
        .map(|&d| (LHS_INDEX[d].to_string(), d))
        .collect();
    let indices: Vec<&str> = scope.iter().map(|(i, _)| i.as_str()).collect();
    match indices.is_empty() {
        true => (name.to_string(), scope),
        false => (format!("{name}[{}]", indices.join(", ")), scope),
    }
}

/// The start of a random cell: `dims K, V`, inputs (among them `x_k[K]` and `x_v[V]`, so that
/// both dims are used, and 1 to 3 more of random shapes and activations) and 0 to 2
/// parameters; the lines and the values they declare.
fn declarations(rng: &mut Rng) -> (Vec<String>, Vec<Value>) {
    let mut lines = vec!["dims K, V;".to_string()];
    let value = |name: &str, dims: Vec<usize>| Value {
        name: name.to_string(),
        dims,
    };
    let mut values = vec![value("x_k", vec![0]), value("x_v", vec![1])];
    let mut inputs = vec!["x_k[K]".to_string(), "x_v[V]".to_string()];
    for n in 0..1 + rng.below(3) {
        let dims = random_dims(rng, false);
        let activation = rng.pick(&ACTIVATIONS);
        let name = format!("x{n}");
        inputs.push(match activation {
            "" => declared(&name, &dims),
            f => format!("{} = {f}", declared(&name, &dims)),
        });
        values.push(value(&name, dims));
    }
    lines.push(format!("input {};", inputs.join(", ")));
    let params: Vec<Value> = (0..rng.below(3))
        .map(|n| value(&format!("p{n}"), random_dims(rng, true)))
        .collect();
    if !params.is_empty() {
        let declarations: Vec<String> = params
            .iter()
            .map(|p| format!("{} = uniform(-0.5, 0.5)", declared(&p.name, &p.dims)))
            .collect();
        lines.push(format!("param {};", declarations.join(", ")));
    }
    values.extend(params);
    (lines, values)
}

/// 0 to 2 lets of random shapes, over what `writer` may read; they become readable too.
fn lets(writer: &mut Writer, lines: &mut Vec<String>) {
    for n in 0..writer.rng.below(3) {
        let dims = random_dims(writer.rng, false);
        let (lhs, scope) = left_hand_side(&format!("h{n}"), &dims);
        let anchor = writer.anchor(&scope);
        let expr = writer.expr(&scope, 3);
        lines.push(format!("let {lhs} = {anchor} * {expr};"));
        writer.values.push(Value {
            name: format!("h{n}"),
            dims,
        });
    }
}

fn cell_source(name: &str, lines: &[String]) -> String {
    let body: Vec<String> = lines.iter().map(|line| format!("    {line}")).collect();
    format!("cell {name} {{\n{}\n}}", body.join("\n"))
}

/// A random cell: the declarations above, a matrix state `S[K, V]` and maybe a second state
/// of a random shape, lets reading the previous states, gated updates, and 1 or 2 outputs
/// that each read a new state.
fn random_cell(seed: u64) -> String {
    let mut rng = Rng::new(seed);
    let (mut lines, mut values) = declarations(&mut rng);
    let mut states = vec![Value {
        name: "S".into(),
        dims: vec![0, 1],
    }];
    if rng.unit() < 0.5 {
        states.push(Value {
            name: "n".into(),
            dims: random_dims(&mut rng, true),
        });
    }
    let declarations: Vec<String> = states.iter().map(|s| declared(&s.name, &s.dims)).collect();
    lines.push(format!("state {};", declarations.join(", ")));
    values.extend(states.iter().cloned());
    let mut writer = Writer {
        rng: &mut rng,
        values,
        fresh: 0,
    };
    lets(&mut writer, &mut lines);
    for state in &states {
        let (lhs, scope) = left_hand_side(&state.name, &state.dims);
        let gate = writer.expr(&scope, 2);
        let write = writer.expr(&scope, 3);
        lines.push(format!(
            "update {lhs} = sigmoid({gate}) * {lhs} + tanh({write});"
        ));
    }
    for n in 0..1 + writer.rng.below(2) {
        let dims = random_dims(writer.rng, false);
        let (lhs, scope) = left_hand_side(&format!("o{n}"), &dims);
        let state = states[writer.rng.below(states.len())].clone();
        let read = writer.read(&state, &scope);
        let anchor = writer.anchor(&scope);
        let rest = writer.expr(&scope, 3);
        lines.push(format!("output {lhs} = {read} * {anchor} * {rest};"));
    }
    cell_source(&format!("Random{seed}"), &lines)
}

/// The update a random linear cell is written with.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Update {
    /// `gate * S[i, j] + key[i] * value[j]`, the gate along this axis.
    Decay(GateAxis),
    /// The delta rule, `S[i, j] - key[i] * sum(l) back[l] * S[l, j] + key[i] * value[j]`.
    Delta,
    /// The delta rule under a scalar gate,
    /// `gate * (S[i, j] - key[i] * sum(l) back[l] * S[l, j]) + key[i] * value[j]`.
    GatedDelta,
}

/// A random cell of a linear form the chunkwise pass recognises (see [`Update`]), with
/// `output o[j] = [scale[j] *] sum(i) query[i] * S[i, j] [+ other[j]]`, every factor a random
/// expression (through lets or not) that does not read the state; gates are `sigmoid(…)` or
/// `exp(-softplus(…))`.
fn random_linear_cell(seed: u64) -> (String, Update) {
    let mut rng = Rng::new(seed);
    let (mut lines, values) = declarations(&mut rng);
    lines.push("state S[K, V];".to_string());
    let mut writer = Writer {
        rng: &mut rng,
        values,
        fresh: 0,
    };
    lets(&mut writer, &mut lines);
    let update = match writer.rng.below(5) {
        0 => Update::Decay(GateAxis::Scalar),
        1 => Update::Decay(GateAxis::Key),
        2 => Update::Decay(GateAxis::Value),
        3 => Update::Delta,
        _ => Update::GatedDelta,
    };
    let over_k = [("i".to_string(), 0)];
    let over_v = [("j".to_string(), 1)];
    let mut factor = |scope: &[(String, usize)]| {
        let anchor = writer.anchor(scope);
        let expr = writer.expr(scope, 2);
        format!("({anchor} * {expr})")
    };
    let gate_scope: &[(String, usize)] = match update {
        Update::Decay(GateAxis::Key) => &over_k,
        Update::Decay(GateAxis::Value) => &over_v,
        _ => &[],
    };
    let exponent = factor(gate_scope);
    let gate = match seed % 2 {
        0 => format!("exp(-softplus({exponent}))"),
        _ => format!("sigmoid({exponent})"),
    };
    let (key, value, query) = (factor(&over_k), factor(&over_v), factor(&over_k));
    let statement = match update {
        Update::Decay(_) => format!("{gate} * S[i, j] + {key} * {value}"),
        Update::Delta | Update::GatedDelta => {
            // Bounded keys and read-backs, so that the state stays bounded.
            let key = format!("0.25 * tanh({key})");
            let back = factor(&[("l".to_string(), 0)]);
            let read_back = format!("S[i, j] - {key} * sum(l) tanh({back}) * S[l, j]");
            match update {
                Update::Delta => format!("{read_back} + {key} * {value}"),
                _ => format!("{gate} * ({read_back}) + {key} * {value}"),
            }
        }
    };
    lines.push(format!("update S[i, j] = {statement};"));
    let scale = match seed % 3 {
        0 => format!("{} * ", factor(&over_v)),
        _ => String::new(),
    };
    let other = match seed % 4 {
        0 => format!(" + {}", factor(&over_v)),
        _ => String::new(),
    };
    lines.push(format!(
        "output o[j] = {scale}sum(i) {query} * S[i, j]{other};"
    ));
    (cell_source(&format!("Linear{seed}"), &lines), update)
}

#[test]
fn random_cells_compile_and_their_gradients_match_finite_differences() {
    let mut chunkable = 0;
    for seed in 0..RANDOM_CELLS {
        let source = random_cell(seed);
        let compiled = compile_source(&source);
        let tokens = rak_codegen::emit::emit_kernels(&compiled);
        if let Err(error) = syn::parse2::<syn::File>(tokens) {
            panic!("the kernels of this cell are not valid Rust ({error}):\n{source}");
        }
        let mut rng = Rng::new(5000 + seed);
        for _ in 0..2 {
            let shape = random_shape(&compiled.cell, &mut rng, 2, 6, 2, &[1, 2, 3]);
            check_cell(&source, &compiled, shape, &mut rng);
        }
        // Some happen to be linear: a chunked form, when the pass finds one, must be exact.
        if chunk_form(&compiled.cell).is_ok() {
            chunkable += 1;
            crate::chunkwise::assert_canonical_cell_equals(&source, &compiled.cell, &mut rng);
        }
    }
    eprintln!("{chunkable} of {RANDOM_CELLS} random cells had a chunked form");
}

#[test]
fn random_linear_cells_have_a_chunked_form_equal_to_them_step_by_step() {
    let mut rng = Rng::new(77);
    for seed in 0..RANDOM_LINEAR_CELLS {
        let (source, update) = random_linear_cell(seed);
        let compiled = compile_source(&source);
        let form = chunk_form(&compiled.cell)
            .unwrap_or_else(|reason| panic!("no chunked form for\n{source}\n{reason}"));
        let axis = match update {
            Update::Decay(axis) => axis,
            Update::Delta | Update::GatedDelta => GateAxis::Scalar,
        };
        assert_eq!(form.gate_axis, axis, "the gate axis of\n{source}");
        let delta = matches!(update, Update::Delta | Update::GatedDelta);
        assert_eq!(form.delta.is_some(), delta, "the delta rule of\n{source}");
        crate::chunkwise::assert_canonical_cell_equals(&source, &compiled.cell, &mut rng);
        let shape = random_shape(&compiled.cell, &mut rng, 2, 6, 2, &[1, 2, 3]);
        check_cell(&source, &compiled, shape, &mut rng);
    }
}
