//! The interpreter against the formulas of `shared/reference/simple-rnn.md`, written out by hand.
//!
//! Forward: S_t[i,j] = g_t[i]·S_{t−1}[i,j] + k_t[i]·v_t[j], o_t[j] = Σ_i q_t[i]·S_t[i,j], with
//! k = sigmoid, g = sigmoid. The hand-written loops perform the same floating-point operations
//! in the same order as the interpreter, so outputs and states must be bitwise equal.
//!
//! Backward (the document's "Gradients of one step"): dS_t += q_t ⊗ do_t, dq = S_t·do,
//! dk = dS_t·v, dv = dS_tᵀ·k, dg = Σ_j dS_t ⊙ S_{t−1}, dS_{t−1} = g ⊙ dS_t, and the sigmoid
//! derivative x(1−x) for k and g. The order of multiplications differs slightly, so gradients
//! are compared to 1e-12 relative.

use crate::common::*;
use rak_codegen::interpret::{ScanInputs, ScanShape, Tensor, backward, forward};

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        x.exp() / (1.0 + x.exp())
    }
}

struct Formulas {
    outputs: Vec<f64>,
    final_state: Vec<f64>,
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
    dg: Vec<f64>,
    d_initial: Vec<f64>,
}

/// SimpleRNN by the reference formulas; inputs are [B, T, H, width] pre-activation.
fn simple_rnn_formulas(
    shape: &ScanShape,
    inputs: &ScanInputs,
    d_out: &Tensor,
    d_final: &Tensor,
) -> Formulas {
    let (b_n, t_n, h_n, k_n, v_n) = (
        shape.batch,
        shape.time,
        shape.heads,
        shape.dims[0],
        shape.dims[1],
    );
    let [q_in, k_in, v_in, g_in] = [0, 1, 2, 3].map(|i| &inputs.inputs[i].data);
    let initial = &inputs.initial_states.as_ref().unwrap()[0].data;
    let at = |b: usize, t: usize, h: usize, width: usize, x: usize| {
        ((b * t_n + t) * h_n + h) * width + x
    };
    let mut f = Formulas {
        outputs: vec![0.0; b_n * t_n * h_n * v_n],
        final_state: vec![0.0; b_n * h_n * k_n * v_n],
        dq: vec![0.0; b_n * t_n * h_n * k_n],
        dk: vec![0.0; b_n * t_n * h_n * k_n],
        dv: vec![0.0; b_n * t_n * h_n * v_n],
        dg: vec![0.0; b_n * t_n * h_n * k_n],
        d_initial: vec![0.0; b_n * h_n * k_n * v_n],
    };
    for b in 0..b_n {
        for h in 0..h_n {
            let base = (b * h_n + h) * k_n * v_n;
            let mut states = vec![initial[base..base + k_n * v_n].to_vec()];
            for t in 0..t_n {
                let prev = states.last().unwrap().clone();
                let mut s = vec![0.0; k_n * v_n];
                for i in 0..k_n {
                    let g = sigmoid(g_in[at(b, t, h, k_n, i)]);
                    let k = sigmoid(k_in[at(b, t, h, k_n, i)]);
                    for j in 0..v_n {
                        s[i * v_n + j] = g * prev[i * v_n + j] + k * v_in[at(b, t, h, v_n, j)];
                    }
                }
                for j in 0..v_n {
                    let mut o = 0.0;
                    for i in 0..k_n {
                        o += q_in[at(b, t, h, k_n, i)] * s[i * v_n + j];
                    }
                    f.outputs[at(b, t, h, v_n, j)] = o;
                }
                states.push(s);
            }
            f.final_state[base..base + k_n * v_n].copy_from_slice(states.last().unwrap());
            // Backward, with dS_T from the final state's gradient.
            let mut ds_next = d_final.data[base..base + k_n * v_n].to_vec();
            for t in (0..t_n).rev() {
                let (prev, s) = (&states[t], &states[t + 1]);
                let mut ds = ds_next.clone();
                for i in 0..k_n {
                    for j in 0..v_n {
                        ds[i * v_n + j] +=
                            q_in[at(b, t, h, k_n, i)] * d_out.data[at(b, t, h, v_n, j)];
                    }
                }
                for i in 0..k_n {
                    let (mut dq, mut dk, mut dg) = (0.0, 0.0, 0.0);
                    for j in 0..v_n {
                        dq += s[i * v_n + j] * d_out.data[at(b, t, h, v_n, j)];
                        dk += ds[i * v_n + j] * v_in[at(b, t, h, v_n, j)];
                        dg += ds[i * v_n + j] * prev[i * v_n + j];
                    }
                    let k = sigmoid(k_in[at(b, t, h, k_n, i)]);
                    let g = sigmoid(g_in[at(b, t, h, k_n, i)]);
                    f.dq[at(b, t, h, k_n, i)] = dq;
                    f.dk[at(b, t, h, k_n, i)] = dk * k * (1.0 - k);
                    f.dg[at(b, t, h, k_n, i)] = dg * g * (1.0 - g);
                }
                for j in 0..v_n {
                    let mut dv = 0.0;
                    for i in 0..k_n {
                        dv += ds[i * v_n + j] * sigmoid(k_in[at(b, t, h, k_n, i)]);
                    }
                    f.dv[at(b, t, h, v_n, j)] = dv;
                }
                for i in 0..k_n {
                    let g = sigmoid(g_in[at(b, t, h, k_n, i)]);
                    for j in 0..v_n {
                        ds_next[i * v_n + j] = g * ds[i * v_n + j];
                    }
                }
            }
            f.d_initial[base..base + k_n * v_n].copy_from_slice(&ds_next);
        }
    }
    f
}

fn assert_close(what: &str, interpreter: &[f64], formulas: &[f64]) {
    assert_eq!(interpreter.len(), formulas.len(), "{what}: lengths differ");
    for (n, (a, b)) in interpreter.iter().zip(formulas).enumerate() {
        let error = (a - b).abs() / a.abs().max(b.abs()).max(1e-300);
        assert!(
            error <= 1e-12 || a == b,
            "{what}[{n}]: interpreter {a} vs formulas {b}"
        );
    }
}

#[test]
fn simple_rnn_interpreter_matches_the_reference_formulas() {
    let compiled = compile_cell("simple_rnn");
    let cell = &compiled.cell;
    let mut rng = Rng::new(42);
    for (batch, time, heads, k, v) in [(2, 9, 3, 5, 7), (1, 1, 1, 1, 1), (3, 17, 2, 4, 3)] {
        let shape = ScanShape::new(cell, batch, time, heads, &[("K", k), ("V", v)]).unwrap();
        let inputs = random_inputs(cell, &shape, &mut rng);
        let d_out = random_tensor(
            &mut rng,
            shape.output(cell, rak_codegen::ir::OutputId(0)),
            -1.0,
            1.0,
        );
        let d_final = random_tensor(
            &mut rng,
            shape.state(cell, rak_codegen::ir::StateId(0)),
            -1.0,
            1.0,
        );
        let expected = simple_rnn_formulas(&shape, &inputs, &d_out, &d_final);

        let out = forward(cell, &shape, &inputs).unwrap();
        assert_eq!(
            out.outputs[0].data, expected.outputs,
            "outputs must be bitwise equal"
        );
        assert_eq!(
            out.final_states[0].data, expected.final_state,
            "final state must be bitwise equal"
        );

        let grads = backward(&compiled.backward, &shape, &inputs, &[d_out], &[d_final]).unwrap();
        assert_close("dq", &grads.inputs[0].data, &expected.dq);
        assert_close("dk", &grads.inputs[1].data, &expected.dk);
        assert_close("dv", &grads.inputs[2].data, &expected.dv);
        assert_close("dg", &grads.inputs[3].data, &expected.dg);
        assert_close("dS_0", &grads.initial_states[0].data, &expected.d_initial);
    }
}

#[test]
fn missing_initial_state_starts_from_the_declared_value() {
    let compiled = compile_cell("mlstm");
    let cell = &compiled.cell;
    let mut rng = Rng::new(3);
    let shape = ScanShape::new(cell, 2, 6, 2, &[("K", 3), ("V", 4)]).unwrap();
    let mut inputs = random_inputs(cell, &shape, &mut rng);
    let explicit: Vec<Tensor> = cell
        .states
        .iter()
        .enumerate()
        .map(|(s, state)| {
            Tensor::filled(shape.state(cell, rak_codegen::ir::StateId(s)), state.init)
        })
        .collect();
    inputs.initial_states = Some(explicit);
    let with_explicit = forward(cell, &shape, &inputs).unwrap();
    inputs.initial_states = None;
    let with_default = forward(cell, &shape, &inputs).unwrap();
    assert_eq!(with_explicit.outputs, with_default.outputs);
}

#[test]
fn interpreter_rejects_tensors_of_the_wrong_shape() {
    let compiled = compile_cell("simple_rnn");
    let cell = &compiled.cell;
    let shape = ScanShape::new(cell, 2, 3, 1, &[("K", 4), ("V", 5)]).unwrap();
    let mut inputs = random_inputs(cell, &shape, &mut Rng::new(1));
    inputs.inputs[2] = Tensor::zeros(vec![2, 3, 1, 4]);
    let error = forward(cell, &shape, &inputs).unwrap_err();
    assert_eq!(
        error.0,
        "input `v` has shape [2, 3, 1, 4] (with 24 values); expected [2, 3, 1, 5]"
    );
    let error = ScanShape::new(cell, 1, 1, 1, &[("K", 4)]).unwrap_err();
    assert_eq!(error.0, "no size given for dim `V`");
    let error = ScanShape::new(cell, 1, 1, 1, &[("K", 4), ("V", 2), ("W", 3)]).unwrap_err();
    assert_eq!(error.0, "cell `SimpleRnn` has no dim `W`");
}
