//! The f64 interpreter's answers to random problems, and how results are compared with them:
//! shared by the kernel tests (`kernels.rs`) and the chunked form's tests (`model.rs`).
//!
//! Error measure: for each tensor, max |result − reference| / max |reference| (the ∞-norm
//! relative error).

// Each test binary uses part of it.
#![allow(dead_code)]

use rak::codegen::ScanShape;
use rak::codegen::interpret::{ScanInputs, Tensor, backward, forward};
use rak::codegen::ir::{Cell, InputId, OutputId, ParamId, StateId};

/// The largest relative error a result in f32 may have against the interpreter (the recurrent
/// kernels', and the chunked form's where its matrix products are exact f32 products).
pub const TOLERANCE: f64 = 1e-4;

/// Steps per chunk in these tests (C): between the recurrent kernels' checkpoints, and per
/// chunk of the chunked form.
pub const CHUNK: usize = 16;

/// The shapes every cell is compared with the interpreter at, (B, T, H, size of every dim):
/// T covers 1, 7, C − 1, C, C + 1 and 300; dims 5, 33 and 64.
pub const SHAPES: [(usize, usize, usize, usize); 6] = [
    (1, 1, 1, 5),
    (3, 7, 2, 5),
    (1, CHUNK - 1, 2, 33),
    (3, CHUNK, 1, 33),
    (1, CHUNK + 1, 2, 64),
    (3, 300, 2, 5),
];

/// SplitMix64.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn tensor(&mut self, shape: Vec<usize>, scale: f64) -> Tensor {
        let mut tensor = Tensor::zeros(shape);
        for x in &mut tensor.data {
            *x = scale * (2.0 * self.next() - 1.0);
        }
        tensor
    }
}

/// max |kernel − reference| / max |reference| (the ∞-norm relative error).
pub fn relative_error(kernel: &[f32], reference: &[f64]) -> f64 {
    assert_eq!(kernel.len(), reference.len());
    let scale = reference
        .iter()
        .fold(0f64, |m, x| m.max(x.abs()))
        .max(1e-30);
    let error = kernel
        .iter()
        .zip(reference)
        .fold(0f64, |m, (k, r)| m.max((*k as f64 - r).abs()));
    error / scale
}

/// Everything a scan produced, read back: outputs, final states and every gradient.
pub struct ScanResults {
    pub outputs: Vec<Vec<f32>>,
    pub final_states: Vec<Vec<f32>>,
    pub grad_inputs: Vec<Vec<f32>>,
    pub grad_params: Vec<Vec<f32>>,
    pub grad_initial: Vec<Vec<f32>>,
}

/// Random inputs, parameters, initial states and output and final-state gradients for `cell`
/// at `shape`: inputs in ±`input_scale`.
pub fn random_problem(
    cell: &Cell,
    shape: &ScanShape,
    rng: &mut Rng,
    input_scale: f64,
) -> (ScanInputs, Vec<Tensor>, Vec<Tensor>) {
    let inputs = ScanInputs {
        inputs: (0..cell.inputs.len())
            .map(|i| rng.tensor(shape.input(cell, InputId(i)), input_scale))
            .collect(),
        // Matrices scaled by 1/√fan-in, as an initialisation would: a random uniform(−1, 1)
        // recurrent matrix makes Elman chaotic, where f32 and f64 trajectories rightly diverge.
        params: (0..cell.params.len())
            .map(|p| {
                let param = &cell.params[p];
                let fan_in = match param.shape.last() {
                    Some(dim) if param.shape.len() >= 2 => shape.dims[dim.0],
                    _ => 1,
                };
                rng.tensor(shape.param(cell, ParamId(p)), 1.0 / (fan_in as f64).sqrt())
            })
            .collect(),
        initial_states: Some(
            (0..cell.states.len())
                .map(|s| rng.tensor(shape.state(cell, StateId(s)), 1.0))
                .collect(),
        ),
    };
    let grad_outputs = (0..cell.outputs.len())
        .map(|o| rng.tensor(shape.output(cell, OutputId(o)), 1.0))
        .collect();
    let grad_finals = (0..cell.states.len())
        .map(|s| rng.tensor(shape.state(cell, StateId(s)), 1.0))
        .collect();
    (inputs, grad_outputs, grad_finals)
}

/// A random problem and the interpreter's answer: outputs, final states and every gradient.
pub struct Reference {
    pub inputs: ScanInputs,
    pub grad_outputs: Vec<Tensor>,
    pub grad_finals: Vec<Tensor>,
    pub expected: rak::codegen::interpret::ScanOutputs,
    pub gradients: rak::codegen::interpret::ScanGradients,
}

impl Reference {
    /// Inputs drawn in ±`input_scale` (parameters scaled by 1/√fan-in) from seed `seed`.
    pub fn new(
        compiled: &rak::CompiledCell,
        shape: &ScanShape,
        seed: u64,
        input_scale: f64,
    ) -> Self {
        let cell = &compiled.cell;
        let (inputs, grad_outputs, grad_finals) =
            random_problem(cell, shape, &mut Rng(seed), input_scale);
        let expected = forward(cell, shape, &inputs).unwrap();
        let gradients = backward(
            &compiled.backward,
            shape,
            &inputs,
            &grad_outputs,
            &grad_finals,
        )
        .unwrap();
        Reference {
            inputs,
            grad_outputs,
            grad_finals,
            expected,
            gradients,
        }
    }

    /// The relative error of each tensor of `got` (NaN where it holds a value that is not
    /// finite), and what it is.
    pub fn errors(&self, cell: &Cell, got: &ScanResults) -> Vec<(String, f64)> {
        let (expected, gradients) = (&self.expected, &self.gradients);
        let mut pairs: Vec<(String, &[f32], &Tensor)> = Vec::new();
        for (o, output) in cell.outputs.iter().enumerate() {
            let what = format!("output `{}`", output.name);
            pairs.push((what, &got.outputs[o], &expected.outputs[o]));
        }
        for (s, state) in cell.states.iter().enumerate() {
            let what = format!("final state `{}`", state.name);
            pairs.push((what, &got.final_states[s], &expected.final_states[s]));
            let what = format!("gradient of initial state `{}`", state.name);
            pairs.push((what, &got.grad_initial[s], &gradients.initial_states[s]));
        }
        for (i, input) in cell.inputs.iter().enumerate() {
            let what = format!("gradient of input `{}`", input.name);
            pairs.push((what, &got.grad_inputs[i], &gradients.inputs[i]));
        }
        for (p, param) in cell.params.iter().enumerate() {
            let what = format!("gradient of parameter `{}`", param.name);
            pairs.push((what, &got.grad_params[p], &gradients.params[p]));
        }
        pairs
            .into_iter()
            .map(|(what, got, reference)| {
                let finite = got.iter().all(|x| x.is_finite());
                let error = relative_error(got, &reference.data);
                (what, if finite { error } else { f64::NAN })
            })
            .collect()
    }
}

/// One line, starting with `context`, for each of `errors` (from [`Reference::errors`]) above
/// `tolerance` or NaN (a value that is not finite).
pub fn beyond(errors: Vec<(String, f64)>, context: &str, tolerance: f64) -> Vec<String> {
    errors
        .into_iter()
        .filter(|(_, error)| error.is_nan() || *error > tolerance)
        .map(|(what, error)| format!("{context}: {what}: relative error {error:e}"))
        .collect()
}
