//! The chunkwise pass: which cells have a chunked form, the factors it derives (snapshots), the
//! reasons it gives for the others, and, in f64, that the rewritten cell equals the original one
//! step by step.

use crate::common::*;
use rak_codegen::chunkwise::{GateAxis, chunk_form};
use rak_codegen::display::chunk_form_to_string;
use rak_codegen::interpret::forward;
use rak_codegen::ir::Cell;

/// Cells written for these tests, which break the form in different ways; the test cells with a
/// chunked form that the built-in cells do not cover (a gate along the value axis, a state
/// stored `[V, K]` read with a scale and a direct term) are in `tests/cells/`, shared with the
/// runtime's tests.
const BOTH_AXES: &str = "cell BothAxes {
    dims K, V;
    input q[K], k[K], v[V];
    param A[K, V] = 0.5;
    state S[K, V];
    update S[i, j] = sigmoid(A[i, j]) * S[i, j] + k[i] * v[j];
    output o[j] = sum(i) q[i] * S[i, j];
}";
const TWO_WRITES: &str = "cell TwoWrites {
    dims K, V;
    input q[K], k[K], v[V];
    state S[K, V];
    update S[i, j] = S[i, j] + k[i] * v[j] + q[i] * v[j];
    output o[j] = sum(i) q[i] * S[i, j];
}";
/// The delta rule with a decay of the carried state only (not of the read-back), which has a
/// chunked form too.
const CARRY_DECAY_DELTA: &str = "cell CarryDecayDelta {
    dims K, V;
    input q[K], k[K], v[V], beta = sigmoid, g = sigmoid;
    let error[j] = sum(l) k[l] * S[l, j] - v[j];
    state S[K, V];
    update S[i, j] = g * S[i, j] - beta * k[i] * error[j];
    output o[j] = sum(i) q[i] * S[i, j];
}";
/// DeltaNet with its normalised key written out three times: the sums in each copy bind indices
/// of their own, and the pass compares the copies up to those names.
const INLINE_DELTA: &str = "cell InlineDelta {
    dims K, V;
    input q[K], k[K], v[V], beta = sigmoid;
    state S[K, V];
    update S[i, j] = S[i, j]
        - beta * k[i] / sqrt(sum(l) k[l] * k[l] + 1e-6)
            * sum(m) k[m] / sqrt(sum(l) k[l] * k[l] + 1e-6) * S[m, j]
        + beta * k[i] / sqrt(sum(l) k[l] * k[l] + 1e-6) * v[j];
    output o[j] = sum(i) q[i] * S[i, j];
}";
/// The delta rule with a scalar on the write only (β goes with the value).
const WRITE_SCALED_DELTA: &str = "cell WriteScaledDelta {
    dims K, V;
    input q[K], k[K] = sigmoid, v[V], beta = sigmoid;
    state S[K, V];
    update S[i, j] = S[i, j] - k[i] * sum(l) k[l] * S[l, j] + beta * k[i] * v[j];
    output o[j] = sum(i) q[i] * S[i, j];
}";
const KEY_GATED_DELTA: &str = "cell KeyGatedDelta {
    dims K, V;
    input q[K], k[K], v[V], beta = sigmoid, g[K] = sigmoid;
    let error[j] = sum(l) k[l] * S[l, j] - v[j];
    state S[K, V];
    update S[i, j] = g[i] * S[i, j] - beta * k[i] * error[j];
    output o[j] = sum(i) q[i] * S[i, j];
}";
const DELTA_OTHER_WRITE: &str = "cell DeltaOtherWrite {
    dims K, V;
    input q[K], k[K], v[V], beta = sigmoid;
    state S[K, V];
    update S[i, j] = S[i, j] - beta * k[i] * sum(l) k[l] * S[l, j] + q[i] * v[j];
    output o[j] = sum(i) q[i] * S[i, j];
}";
const SQUARED: &str = "cell Squared {
    dims K, V;
    input q[K], k[K], v[V];
    state S[K, V];
    update S[i, j] = S[i, j] * S[i, j] + k[i] * v[j];
    output o[j] = sum(i) q[i] * S[i, j];
}";
const NOT_OUTER: &str = "cell NotOuter {
    dims K, V;
    input q[K], k[K];
    param W[K, V] = 0.5;
    state S[K, V];
    update S[i, j] = S[i, j] + W[i, j] * k[i];
    output o[j] = sum(i) q[i] * S[i, j];
}";

/// A cell of the workspace's `tests/cells/`.
fn test_cell(name: &str) -> Cell {
    let path = format!("{}/../tests/cells/{name}.rak", env!("CARGO_MANIFEST_DIR"));
    let source = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    compile_source(&source).cell
}

/// The linear cells: the built-in ones and the test cells, with the gate axis each must get.
fn linear_cells() -> Vec<(String, Cell, GateAxis)> {
    let mut cells: Vec<(String, Cell, GateAxis)> = [
        ("simple_rnn", GateAxis::Key),
        ("gla", GateAxis::Key),
        ("retnet", GateAxis::Scalar),
        ("mamba2", GateAxis::Scalar),
        // The delta rule: no decay.
        ("deltanet", GateAxis::Scalar),
    ]
    .into_iter()
    .map(|(name, axis)| (name.to_string(), compile_cell(name).cell, axis))
    .collect();
    cells.push((
        "value_gate".into(),
        test_cell("value_gate"),
        GateAxis::Value,
    ));
    cells.push((
        "transposed".into(),
        test_cell("transposed"),
        GateAxis::Scalar,
    ));
    cells.push((
        "gated_delta".into(),
        test_cell("gated_delta"),
        GateAxis::Scalar,
    ));
    cells.push((
        "carry_decay_delta".into(),
        compile_source(CARRY_DECAY_DELTA).cell,
        GateAxis::Scalar,
    ));
    cells.push((
        "inline_delta".into(),
        compile_source(INLINE_DELTA).cell,
        GateAxis::Scalar,
    ));
    cells.push((
        "write_scaled_delta".into(),
        compile_source(WRITE_SCALED_DELTA).cell,
        GateAxis::Scalar,
    ));
    cells
}

#[test]
fn linear_cells_have_a_chunked_form() {
    for (name, cell, axis) in linear_cells() {
        let form = chunk_form(&cell).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(form.gate_axis, axis, "{name}");
        insta::assert_snapshot!(format!("chunk_form_{name}"), chunk_form_to_string(&form));
    }
    let transposed = chunk_form(&test_cell("transposed")).unwrap();
    assert_eq!(transposed.key_axis, 1);
}

#[test]
fn canonical_cells_equal_the_original_cells_step_by_step() {
    let mut rng = Rng::new(11);
    for (name, cell, _) in linear_cells() {
        assert_canonical_cell_equals(&name, &cell, &mut rng);
    }
}

/// The canonical cell of `cell`'s chunked form gives the same outputs and final states as
/// `cell`, on 3 random shapes (pre-activations widened to 8 times: gates near 0 and 1, where
/// log-space forms differ most), to 1e-9 relative.
pub(crate) fn assert_canonical_cell_equals(name: &str, cell: &Cell, rng: &mut Rng) {
    let canonical = chunk_form(cell).unwrap().canonical_cell();
    for _ in 0..3 {
        let shape = random_shape(cell, rng, 2, 9, 2, &[1, 3, 4]);
        let mut inputs = random_inputs(cell, &shape, rng);
        for input in &mut inputs.inputs {
            for x in &mut input.data {
                *x *= 8.0;
            }
        }
        let expected = forward(cell, &shape, &inputs).unwrap();
        let got = forward(&canonical, &shape, &inputs).unwrap();
        let pairs = expected
            .outputs
            .iter()
            .zip(&got.outputs)
            .chain(expected.final_states.iter().zip(&got.final_states));
        for (e, g) in pairs {
            for (a, b) in e.data.iter().zip(&g.data) {
                assert!(
                    (a - b).abs() <= 1e-9 * (1.0 + a.abs()),
                    "{name}: the canonical cell gives {b}, the cell {a}"
                );
            }
        }
    }
}

#[test]
fn cells_without_a_chunked_form_say_why() {
    let mut report = String::new();
    let cells = ["mlstm", "elman"]
        .map(|name| compile_cell(name).cell)
        .into_iter()
        .chain(
            [
                BOTH_AXES,
                TWO_WRITES,
                NOT_OUTER,
                KEY_GATED_DELTA,
                DELTA_OTHER_WRITE,
                SQUARED,
            ]
            .map(|source| compile_source(source).cell),
        );
    for cell in cells {
        let error = chunk_form(&cell).expect_err(&cell.name);
        report += &format!("{error}\n");
    }
    insta::assert_snapshot!("chunk_form_refusals", report);
}
