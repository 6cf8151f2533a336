//! Declare a brand-new cell with `rak::cell!`, then run it with the f64 reference interpreter,
//! forward and backward: `cargo run --release --example custom_cell`.

use rak::CellDefinition;
use rak::codegen::display::backward_to_string;
use rak::codegen::interpret::{ScanInputs, ScanShape, Tensor, backward, forward};
use rak::codegen::ir::{InputId, OutputId, StateId};

rak::cell! {
    /// A SimpleRNN variant whose write strength is gated by a learned per-head scalar.
    pub cell ScaledWrite {
        dims K, V;
        input q[K], k[K] = sigmoid, v[V], g[K] = sigmoid;
        param strength = 1.0;
        state S[K, V];
        update S[i, j] = g[i] * S[i, j] + softplus(strength) * k[i] * v[j];
        output o[j] = sum(i) q[i] * S[i, j];
    }
}

fn main() {
    let compiled = ScaledWrite::compile();
    let cell = &compiled.cell;
    println!("{}", backward_to_string(&compiled.backward));

    let shape = ScanShape::new(cell, 1, 4, 1, &[("K", 2), ("V", 3)]).expect("valid shape");
    let ramp = |shape: Vec<usize>| {
        let len: usize = shape.iter().product();
        Tensor {
            shape,
            data: (0..len).map(|x| (x as f64 * 0.37).sin()).collect(),
        }
    };
    let inputs = ScanInputs {
        inputs: (0..cell.inputs.len())
            .map(|i| ramp(shape.input(cell, InputId(i))))
            .collect(),
        params: vec![Tensor::filled(
            shape.param(cell, rak::codegen::ir::ParamId(0)),
            0.5,
        )],
        initial_states: None,
    };
    let result = forward(cell, &shape, &inputs).expect("forward");
    println!("outputs o[t, j]: {:.4?}", result.outputs[0].data);

    // L = Σ outputs: gradients with ∂L/∂o = 1 and no gradient on the final state.
    let d_outputs = vec![Tensor::filled(shape.output(cell, OutputId(0)), 1.0)];
    let d_final = vec![Tensor::zeros(shape.state(cell, StateId(0)))];
    let grads =
        backward(&compiled.backward, &shape, &inputs, &d_outputs, &d_final).expect("backward");
    println!("dL/dstrength: {:.6}", grads.params[0].data[0]);
}
