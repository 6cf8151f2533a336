//! The backward step from autodiff, run by the interpreter's backward scan, against finite
//! differences of the forward scan, in f64, for all seven cells (and the random cells of
//! `random_cells.rs`).
//!
//! The loss is L = Σ W·outputs + Σ U·final states with random W, U, so ∂L/∂outputs = W and
//! ∂L/∂final states = U. Derivatives are taken with the 7-point stencil
//! (45(L(x+h) − L(x−h)) − 9(L(x+2h) − L(x−2h)) + (L(x+3h) − L(x−3h))) / 60h, h = 1e-3, whose
//! truncation error (O(h⁶)) and round-off (≈ 1e-12·|L|) are far below the tolerance. (The
//! 5-point stencil's O(h⁴) was enough for the reference cells, not for random cells that feed
//! their state back through strongly curved functions: one gave an error of 6e-5 at h = 1e-3,
//! shrinking as h⁴ towards autodiff's value; a smaller h instead brings round-off up to the
//! tolerance of gradients near the floor.)
//!
//! Relative error = |fd − ad| / max(|fd|, |ad|, 1e-4) must be ≤ 1e-6; the 1e-4 floor keeps the
//! round-off of the difference quotient from counting where a gradient is (near) zero.

use crate::common::*;
use rak_codegen::CompiledCell;
use rak_codegen::interpret::{ScanInputs, ScanShape, Tensor, backward, forward};

const TOLERANCE: f64 = 1e-6;
const FLOOR: f64 = 1e-4;
const STEP: f64 = 1e-3;

struct Problem<'a> {
    compiled: &'a CompiledCell,
    shape: ScanShape,
    output_weights: Vec<Tensor>,
    state_weights: Vec<Tensor>,
}

fn dot(a: &Tensor, b: &Tensor) -> f64 {
    a.data.iter().zip(&b.data).map(|(x, y)| x * y).sum()
}

impl Problem<'_> {
    fn loss(&self, inputs: &ScanInputs) -> f64 {
        let out = forward(&self.compiled.cell, &self.shape, inputs).expect("forward");
        let outputs: f64 = out
            .outputs
            .iter()
            .zip(&self.output_weights)
            .map(|(o, w)| dot(o, w))
            .sum();
        let states: f64 = out
            .final_states
            .iter()
            .zip(&self.state_weights)
            .map(|(s, u)| dot(s, u))
            .sum();
        outputs + states
    }

    /// d/dt L(inputs + t·direction) at t = 0, by the 7-point stencil.
    fn directional_fd(&self, inputs: &ScanInputs, direction: &dyn Fn(&mut ScanInputs, f64)) -> f64 {
        let at = |t: f64| {
            let mut moved = inputs.clone();
            direction(&mut moved, t);
            self.loss(&moved)
        };
        let difference = |k: f64| at(k * STEP) - at(-k * STEP);
        (45.0 * difference(1.0) - 9.0 * difference(2.0) + difference(3.0)) / (60.0 * STEP)
    }
}

fn relative_error(fd: f64, ad: f64) -> f64 {
    (fd - ad).abs() / fd.abs().max(ad.abs()).max(FLOOR)
}

/// Which tensor of the scan's arguments.
#[derive(Clone, Copy, Debug)]
enum Arg {
    Input(usize),
    Param(usize),
    InitialState(usize),
}

fn arg_tensor(inputs: &mut ScanInputs, arg: Arg) -> &mut Tensor {
    match arg {
        Arg::Input(i) => &mut inputs.inputs[i],
        Arg::Param(p) => &mut inputs.params[p],
        Arg::InitialState(s) => &mut inputs.initial_states.as_mut().expect("initial states")[s],
    }
}

/// Checks the gradients of `compiled` at `shape` against finite differences: all of them along
/// a random direction, then a sample of elements of every tensor.
pub(crate) fn check_cell(name: &str, compiled: &CompiledCell, shape: ScanShape, rng: &mut Rng) {
    let cell = &compiled.cell;
    let inputs = random_inputs(cell, &shape, rng);
    let problem = Problem {
        compiled,
        output_weights: (0..cell.outputs.len())
            .map(|o| {
                random_tensor(
                    rng,
                    shape.output(cell, rak_codegen::ir::OutputId(o)),
                    -1.0,
                    1.0,
                )
            })
            .collect(),
        state_weights: (0..cell.states.len())
            .map(|s| {
                random_tensor(
                    rng,
                    shape.state(cell, rak_codegen::ir::StateId(s)),
                    -1.0,
                    1.0,
                )
            })
            .collect(),
        shape,
    };
    let grads = backward(
        &compiled.backward,
        &problem.shape,
        &inputs,
        &problem.output_weights,
        &problem.state_weights,
    )
    .expect("backward");
    let mut args: Vec<(Arg, String, &Tensor)> = Vec::new();
    for (i, g) in grads.inputs.iter().enumerate() {
        args.push((Arg::Input(i), format!("input `{}`", cell.inputs[i].name), g));
    }
    for (p, g) in grads.params.iter().enumerate() {
        args.push((Arg::Param(p), format!("param `{}`", cell.params[p].name), g));
    }
    for (s, g) in grads.initial_states.iter().enumerate() {
        args.push((
            Arg::InitialState(s),
            format!("initial state `{}`", cell.states[s].name),
            g,
        ));
    }
    let context = format!("cell {name}, shape {:?}", problem.shape);

    // All gradients at once, along a random direction.
    let directions: Vec<(Arg, Tensor)> = args
        .iter()
        .map(|(arg, _, g)| (*arg, random_tensor(rng, g.shape.clone(), -1.0, 1.0)))
        .collect();
    let analytic: f64 = args
        .iter()
        .zip(&directions)
        .map(|((_, _, g), (_, d))| dot(g, d))
        .sum();
    let numeric = problem.directional_fd(&inputs, &|moved, t| {
        for (arg, direction) in &directions {
            for (x, d) in arg_tensor(moved, *arg).data.iter_mut().zip(&direction.data) {
                *x += t * d;
            }
        }
    });
    let error = relative_error(numeric, analytic);
    assert!(
        error <= TOLERANCE,
        "{context}: directional derivative fd {numeric} vs autodiff {analytic} (relative error {error:e})"
    );

    // Element by element, on a sample of every tensor.
    for (arg, label, gradient) in &args {
        for _ in 0..gradient.data.len().min(6) {
            let element = rng.below(gradient.data.len());
            let numeric = problem.directional_fd(&inputs, &|moved, t| {
                arg_tensor(moved, *arg).data[element] += t
            });
            let analytic = gradient.data[element];
            let error = relative_error(numeric, analytic);
            assert!(
                error <= TOLERANCE,
                "{context}: {label} element {element}: fd {numeric} vs autodiff {analytic} (relative error {error:e})"
            );
        }
    }
}

#[test]
fn autodiff_matches_finite_differences_for_every_cell() {
    for (seed, name) in CELL_NAMES.iter().enumerate() {
        let compiled = compile_cell(name);
        let mut rng = Rng::new(1000 + seed as u64);
        // The largest shape first, then random ones: T up to 20, B and H up to 3, odd dims.
        let cell = &compiled.cell;
        let dims: Vec<(String, usize)> = cell
            .dims
            .iter()
            .zip([5, 3, 1])
            .map(|(d, s)| (d.name.clone(), s))
            .collect();
        let named: Vec<(&str, usize)> = dims.iter().map(|(n, s)| (n.as_str(), *s)).collect();
        check_cell(
            name,
            &compiled,
            ScanShape::new(cell, 3, 20, 3, &named).unwrap(),
            &mut rng,
        );
        for _ in 0..4 {
            let shape = random_shape(cell, &mut rng, 3, 20, 3, &[1, 3, 5, 7]);
            check_cell(name, &compiled, shape, &mut rng);
        }
    }
}

#[test]
fn gradient_check_detects_a_wrong_derivative() {
    // The check above must be able to fail: corrupt one gradient definition of SimpleRNN
    // (drop the sigmoid's derivative from dk_pre) and expect a mismatch.
    use rak_codegen::ir::{Grad, InputId};
    let mut compiled = compile_cell("simple_rnn");
    let k = InputId(1);
    let activated = compiled
        .backward
        .definition(Grad::InputActivated(k))
        .unwrap()
        .clone();
    let position = compiled
        .backward
        .definitions
        .iter()
        .position(|d| d.grad == Grad::Input(k))
        .unwrap();
    let exprs = &mut compiled.backward.cell.exprs;
    compiled.backward.definitions[position].expr = exprs.load(
        rak_codegen::ir::Value::Grad(Grad::InputActivated(k)),
        activated.indices.clone(),
    );
    compiled.backward.definitions[position].indices = activated.indices;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut rng = Rng::new(7);
        let cell = &compiled.cell;
        let shape = ScanShape::new(cell, 1, 5, 1, &[("K", 3), ("V", 3)]).unwrap();
        check_cell("simple_rnn (corrupted)", &compiled, shape, &mut rng);
    }));
    assert!(
        result.is_err(),
        "a wrong derivative passed the gradient check"
    );
}
