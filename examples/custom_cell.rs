//! Declare a brand-new cell with `rak::cell!`, run it with the f64 reference interpreter, then
//! with the kernels the macro generated for it, on wgpu's default device:
//! `cargo run --release --example custom_cell` (without a GPU, set
//! `CUBECL_WGPU_DEFAULT_DEVICE=Cpu` to use Mesa's software Vulkan driver).

use rak::CellDefinition;
use rak::codegen::ScanShape;
use rak::codegen::display::backward_to_string;
use rak::codegen::interpret::{ScanInputs, Tensor, forward};
use rak::codegen::ir::{InputId, OutputId, ParamId, StateId};
use rak::cubecl::{Runtime, prelude::*};
use rak::kernels::{CellRunner, DeviceArray, ForwardBuffers};

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

    // The f64 reference interpreter.
    let shape = ScanShape::new(cell, 2, 50, 2, &[("K", 8), ("V", 16)]).expect("valid shape");
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
        params: vec![Tensor::filled(shape.param(cell, ParamId(0)), 0.5)],
        initial_states: None,
    };
    let reference = forward(cell, &shape, &inputs).expect("forward");

    // The generated kernels, on wgpu's default device.
    type Wgpu = rak::cubecl::wgpu::WgpuRuntime;
    let client = Wgpu::client(&Default::default());
    let upload = |t: &Tensor| {
        let values: Vec<f32> = t.data.iter().map(|&x| x as f32).collect();
        DeviceArray::new(
            client.create_from_slice(f32::as_bytes(&values)),
            values.len(),
        )
    };
    let numel = |dims: Vec<usize>| dims.iter().product::<usize>();
    let buffers = ForwardBuffers {
        inputs: inputs.inputs.iter().map(upload).collect(),
        params: inputs.params.iter().map(upload).collect(),
        initial_states: None,
        outputs: vec![DeviceArray::zeros(
            &client,
            numel(shape.output(cell, OutputId(0))),
            4,
        )],
        final_states: vec![DeviceArray::zeros(
            &client,
            numel(shape.state(cell, StateId(0))),
            4,
        )],
        checkpoints: None,
    };
    // On Mesa's software driver, launch a chunk at a time (it caps loops); on a GPU, one launch.
    let schedule = rak::codegen::schedule::Schedule {
        chunk: 16,
        chunks_per_launch: Some(1),
        ..Default::default()
    };
    CellRunner::<ScaledWrite>::new()
        .forward::<f32, Wgpu>(&client, &shape, schedule, &buffers)
        .expect("launch");
    let bytes = client.read_one_unchecked(buffers.outputs[0].handle.clone());
    let kernel = &f32::from_bytes(&bytes)[..buffers.outputs[0].len];
    let largest = reference.outputs[0]
        .data
        .iter()
        .fold(0f64, |m, x| m.max(x.abs()));
    let error = kernel
        .iter()
        .zip(&reference.outputs[0].data)
        .fold(0f64, |m, (k, r)| m.max((*k as f64 - r).abs()));
    println!("kernel vs interpreter: max |difference| {error:.2e} (outputs up to {largest:.2})");
}
