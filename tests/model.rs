//! The fused cell as a burn operation, against the unfused path (the same cell's step as plain
//! burn tensor operations in a loop over time, differentiated by burn's own autodiff): outputs,
//! final states and every gradient, on burn's wgpu backend with and without its fusion wrapper
//! (in CI: Mesa's Vulkan software driver on the CPU).
//!
//! Error measure: max |fused − unfused| / max |unfused| per tensor, ≤ 1e-4 in f32.

use rak::cells::*;
use rak::codegen::schedule::Schedule;
use rak::kernels::CellKernels;
use rak::runtime::burn;
use rak::runtime::fused::{FusedCellBackend, FusedSettings, fused_cell};
use rak::runtime::packing::Packing;
use rak::runtime::unfused::UnfusedScan;

use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};

const TOLERANCE: f32 = 1e-4;

/// burn's default wgpu backend: the cubecl backend inside the fusion wrapper.
type Fused = Autodiff<burn::backend::Wgpu>;
/// The cubecl backend alone.
type Plain = Autodiff<burn_cubecl_backend::Backend>;

mod burn_cubecl_backend {
    pub type Backend = rak::runtime::burn_cubecl::CubeBackend<
        rak::runtime::cubecl::wgpu::WgpuRuntime,
        f32,
        i32,
        u32,
    >;
}

fn setup() {
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        let dir = std::env::temp_dir().join("rak-xdg");
        std::fs::create_dir_all(&dir).ok();
        unsafe { std::env::set_var("XDG_RUNTIME_DIR", dir) };
    }
}

/// SplitMix64 values in [−scale, scale).
fn random(seed: u64, len: usize, scale: f32) -> Vec<f32> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            ((z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32 * scale
        })
        .collect()
}

fn tensor<B: burn::tensor::backend::Backend, const D: usize>(
    values: Vec<f32>,
    shape: [usize; D],
) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(values, shape), &Default::default())
}

fn values<B: burn::tensor::backend::Backend, const D: usize>(tensor: Tensor<B, D>) -> Vec<f32> {
    tensor.into_data().to_vec::<f32>().expect("f32 tensor")
}

fn relative_error(got: &[f32], expected: &[f32]) -> f32 {
    assert_eq!(got.len(), expected.len());
    let scale = expected.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    let error = got
        .iter()
        .zip(expected)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    error / scale
}

/// Everything one path produced.
struct Results {
    outputs: Vec<f32>,
    final_states: Vec<f32>,
    grad_inputs: Vec<f32>,
    grad_params: Vec<f32>,
    grad_initial: Vec<f32>,
}

/// Random packed operands of cell `C` at `[B, T, H]` with every dim of size `dim`.
struct Problem {
    shape: [usize; 3],
    dims: Vec<usize>,
    inputs: Vec<f32>,
    params: Vec<f32>,
    initial: Vec<f32>,
    /// The loss is Σ outputs · weights.
    weights: Vec<f32>,
    widths: [usize; 4],
}

impl Problem {
    fn new<C: CellKernels>(shape: [usize; 3], dim: usize, seed: u64) -> Self {
        let cell = C::compile().cell;
        let dims = vec![dim; cell.dims.len()];
        let widths = [
            Packing::inputs(&cell, &dims).width,
            Packing::params(&cell, &dims).width,
            Packing::states(&cell, &dims).width,
            Packing::outputs(&cell, &dims).width,
        ];
        let [batch, time, heads] = shape;
        // Parameters scaled by 1/√dim, as an initialisation would (Elman's matrix).
        let param_scale = 1.0 / (dim as f32).sqrt();
        Problem {
            inputs: random(seed, batch * time * heads * widths[0], 1.0),
            params: random(seed + 1, heads * widths[1], param_scale),
            initial: random(seed + 2, batch * heads * widths[2], 1.0),
            weights: random(seed + 3, batch * time * heads * widths[3], 1.0),
            shape,
            dims,
            widths,
        }
    }

    /// Runs `scan` on backend `B` and differentiates Σ outputs · weights.
    fn run<B: AutodiffBackend>(
        &self,
        scan: impl Fn(Tensor<B, 4>, Tensor<B, 2>, Tensor<B, 3>) -> (Tensor<B, 4>, Tensor<B, 3>),
    ) -> Results {
        let [batch, time, heads] = self.shape;
        let [input_width, param_width, state_width, output_width] = self.widths;
        let inputs =
            tensor::<B, 4>(self.inputs.clone(), [batch, time, heads, input_width]).require_grad();
        let params = tensor::<B, 2>(self.params.clone(), [heads, param_width]).require_grad();
        let initial =
            tensor::<B, 3>(self.initial.clone(), [batch, heads, state_width]).require_grad();
        let weights = tensor::<B, 4>(self.weights.clone(), [batch, time, heads, output_width]);
        let (outputs, final_states) = scan(inputs.clone(), params.clone(), initial.clone());
        let loss = (outputs.clone() * weights).sum();
        let grads = loss.backward();
        let grad = |t: &Tensor<B, 4>| values(t.grad(&grads).expect("input gradient"));
        Results {
            outputs: values(outputs),
            final_states: values(final_states),
            grad_inputs: grad(&inputs),
            // A cell without parameters has an empty parameter tensor, with no gradient.
            grad_params: params.grad(&grads).map(values).unwrap_or_default(),
            grad_initial: values(initial.grad(&grads).expect("initial-state gradient")),
        }
    }
}

fn check<C: CellKernels, B: AutodiffBackend + FusedCellBackend>(
    shape: [usize; 3],
    dim: usize,
    schedule: Schedule,
) where
    B::InnerBackend: FusedCellBackend,
{
    let problem = Problem::new::<C>(shape, dim, 11);
    let settings = FusedSettings {
        dims: problem.dims.clone(),
        schedule,
    };
    let fused = problem.run::<B>(|inputs, params, initial| {
        fused_cell::<B, C>(inputs, params, Some(initial), &settings)
    });
    let compiled = C::compile();
    let unfused = problem.run::<B>(|inputs, params, initial| {
        let scan = UnfusedScan {
            cell: &compiled.cell,
            dims: &problem.dims,
        };
        let result = scan
            .run(inputs, params, Some(initial))
            .expect("unfused scan");
        (result.outputs, result.final_states)
    });
    let pairs = [
        ("outputs", &fused.outputs, &unfused.outputs),
        ("final states", &fused.final_states, &unfused.final_states),
        ("input gradient", &fused.grad_inputs, &unfused.grad_inputs),
        (
            "parameter gradient",
            &fused.grad_params,
            &unfused.grad_params,
        ),
        (
            "initial-state gradient",
            &fused.grad_initial,
            &unfused.grad_initial,
        ),
    ];
    for (what, got, expected) in pairs {
        if expected.is_empty() {
            continue;
        }
        let error = relative_error(got, expected);
        assert!(
            error <= TOLERANCE,
            "{}: {what} differs by {error:e} (relative)",
            C::NAME
        );
    }
}

/// Calls `check::<Cell, $backend>($args)` for each of the seven reference cells.
macro_rules! for_each_cell {
    ($backend:ty, $($args:expr),*) => {
        check::<SimpleRnn, $backend>($($args),*);
        check::<Gla, $backend>($($args),*);
        check::<RetNet, $backend>($($args),*);
        check::<Mamba2, $backend>($($args),*);
        check::<DeltaNet, $backend>($($args),*);
        check::<Mlstm, $backend>($($args),*);
        check::<Elman, $backend>($($args),*);
    };
}

/// One launch per chunk on the software adapter (Mesa caps loops at 65,535 iterations).
fn schedule() -> Schedule {
    Schedule {
        chunk: 4,
        chunks_per_launch: Some(1),
        ..Default::default()
    }
}

#[test]
fn fused_operation_matches_the_unfused_path_for_every_cell() {
    setup();
    // T = 9 with checkpoints every 4 steps; dims of 5 split into tiles (chosen at launch).
    for_each_cell!(Fused, [2, 9, 2], 5, schedule());
}

#[test]
fn fused_operation_without_the_fusion_wrapper() {
    setup();
    check::<SimpleRnn, Plain>([2, 9, 2], 5, schedule());
    check::<Mlstm, Plain>([1, 6, 1], 3, schedule());
}
