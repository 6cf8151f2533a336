//! The fused cell as a burn operation, and the chunked scan of the cells linear in their state,
//! against the unfused path (the same cell's step as plain burn tensor operations in a loop over
//! time, differentiated by burn's own autodiff): outputs, final states and every gradient, on
//! burn's wgpu backend with and without its fusion wrapper (in CI: Mesa's Vulkan software
//! driver on the CPU).
//!
//! Error measure: max |fused − unfused| / max |unfused| per tensor, ≤ 1e-4 in f32.
//!
//! The chunked form is also checked against the f64 interpreter here (`chunked_form`, with the
//! problems and error measure of `reference`, shared with `kernels.rs`): this binary builds
//! burn's cubecl backend for the other tests anyway.

mod reference;

use rak::CellDefinition;
use rak::cells::*;
use rak::codegen::chunkwise::{ChunkForm, chunk_form};
use rak::codegen::ir::Cell;
use rak::codegen::schedule::Schedule;
use rak::kernels::CellRef;
use rak::runtime::burn;
use rak::runtime::chunked::ChunkedScan;
use rak::runtime::fused::{FusedCellBackend, FusedSettings, SumOver, fused_cell};
use rak::runtime::packing::Packing;
use rak::runtime::unfused::{UnfusedScan, dense_copy, reshapable};

use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData, TensorPrimitive};

const TOLERANCE: f32 = 1e-4;

/// burn's default wgpu backend: the cubecl backend inside the fusion wrapper (built with
/// `--features cuda`, burn's CUDA backend: scripts/gpu-run.sh runs some of these tests there).
#[cfg(not(feature = "cuda"))]
type Fused = Autodiff<burn::backend::Wgpu>;
#[cfg(feature = "cuda")]
type Fused = Autodiff<burn::backend::Cuda>;
/// The cubecl backend alone.
type Plain = Autodiff<burn_cubecl_backend::Backend>;

mod burn_cubecl_backend {
    #[cfg(not(feature = "cuda"))]
    type Runtime = rak::runtime::cubecl::wgpu::WgpuRuntime;
    #[cfg(feature = "cuda")]
    type Runtime = rak::runtime::cubecl::cuda::CudaRuntime;
    /// The element of boolean tensors burn's backend uses on that runtime.
    #[cfg(not(feature = "cuda"))]
    type Bool = u32;
    #[cfg(feature = "cuda")]
    type Bool = u8;
    pub type Backend = rak::runtime::burn_cubecl::CubeBackend<Runtime, f32, i32, Bool>;
}

fn setup() {
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        let dir = std::env::temp_dir().join("rak-xdg");
        std::fs::create_dir_all(&dir).ok();
        unsafe { std::env::set_var("XDG_RUNTIME_DIR", dir) };
    }
}

/// The built-in cell of this file name, its kernels compiled in rak-runtime (so this binary
/// compiles none of them).
fn builtin(file: &str) -> CellRef {
    Builtin::find(file).expect("a built-in cell").cell
}

/// SimpleRNN, the model tests' cell.
fn simple_rnn() -> CellRef {
    builtin("simple_rnn")
}

/// Seeded values in [−scale, scale).
fn random(seed: u64, len: usize, scale: f32) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..len)
        .map(|_| (rng.unit() * 2.0 - 1.0) as f32 * scale)
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
    fn for_cell(cell: &Cell, shape: [usize; 3], dim: usize, seed: u64) -> Self {
        // Every dim a different size (K ≠ V), so that no two axes can be confused.
        let dims: Vec<usize> = (0..cell.dims.len()).map(|d| dim + d).collect();
        let widths = [
            Packing::inputs(cell, &dims).width,
            Packing::params(cell, &dims).width,
            Packing::states(cell, &dims).width,
            Packing::outputs(cell, &dims).width,
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

/// The fused operation of `cell` on backend `B` against the unfused path.
fn check<B: AutodiffBackend + FusedCellBackend>(
    cell: CellRef,
    shape: [usize; 3],
    dim: usize,
    schedule: Schedule,
) where
    B::InnerBackend: FusedCellBackend,
{
    let compiled = cell.compiled();
    let problem = Problem::for_cell(&compiled.cell, shape, dim, 11);
    let settings = FusedSettings {
        cell,
        dims: problem.dims.clone(),
        schedule,
    };
    let fused = problem.run::<B>(|inputs, params, initial| {
        fused_cell::<B>(inputs, params, Some(initial), &settings)
    });
    let unfused = run_unfused::<B>(&problem, &compiled.cell);
    compare(cell.name(), &fused, &unfused);
}

/// The unfused path on `problem`: the reference of the other paths.
fn run_unfused<B: AutodiffBackend>(problem: &Problem, cell: &Cell) -> Results {
    problem.run::<B>(|inputs, params, initial| {
        let scan = UnfusedScan {
            cell,
            dims: &problem.dims,
        };
        let result = scan
            .run(inputs, params, Some(initial))
            .expect("unfused scan");
        (result.outputs, result.final_states)
    })
}

/// Asserts that `got` equals `expected` (the unfused path) within [`TOLERANCE`].
fn compare(name: &str, got: &Results, expected: &Results) {
    let found = differences(name, got, expected);
    assert!(found.is_empty(), "{}", found.join("\n"));
}

impl Results {
    /// Each tensor of `self` beside the same one of `other`, with its name.
    fn beside<'a>(&'a self, other: &'a Results) -> [(&'static str, &'a [f32], &'a [f32]); 5] {
        [
            ("outputs", &self.outputs, &other.outputs),
            ("final states", &self.final_states, &other.final_states),
            ("input gradient", &self.grad_inputs, &other.grad_inputs),
            ("parameter gradient", &self.grad_params, &other.grad_params),
            (
                "initial-state gradient",
                &self.grad_initial,
                &other.grad_initial,
            ),
        ]
    }
}

/// What differs between `got` and `expected` by more than [`TOLERANCE`], one line each.
fn differences(name: &str, got: &Results, expected: &Results) -> Vec<String> {
    let mut found = Vec::new();
    for (what, got, expected) in got.beside(expected) {
        if expected.is_empty() {
            continue;
        }
        let error = relative_error(got, expected);
        if error > TOLERANCE || error.is_nan() {
            found.push(format!("{name}: {what} differs by {error:e} (relative)"));
        }
    }
    found
}

/// One launch per chunk on the software adapter (Mesa allows an invocation 65,535 loop
/// iterations in all).
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
    let cells = rak::cells::all();
    assert_eq!(cells.len(), 7, "the seven reference cells");
    for builtin in cells {
        check::<Fused>(builtin.cell, [2, 9, 2], 5, schedule());
    }
}

#[test]
fn fused_operation_without_the_fusion_wrapper() {
    setup();
    check::<Plain>(builtin("simple_rnn"), [2, 9, 2], 5, schedule());
    check::<Plain>(builtin("mlstm"), [1, 6, 1], 3, schedule());
}

// ---------------------------------------------------------------------------------------------
// The chunked path.

/// The chunked scan of `cell` against the unfused path: outputs, final states, every gradient.
/// Inputs are drawn in [−input_scale, input_scale): large scales give gates near 0, whose
/// cumulative log decay over a chunk is far below what `exp` of its negation can hold in f32.
fn check_chunked<B: AutodiffBackend + FusedCellBackend>(
    cell: &Cell,
    shape: [usize; 3],
    dim: usize,
    chunk: usize,
    sub_chunk: usize,
    input_scale: f32,
) -> Vec<String> {
    let mut problem = Problem::for_cell(cell, shape, dim, 21);
    for x in &mut problem.inputs {
        *x *= input_scale;
    }
    let form = chunk_form(cell).unwrap_or_else(|error| panic!("{error}"));
    let chunked = problem.run::<B>(|inputs, params, initial| {
        chunked_scan(
            &form,
            &problem.dims,
            (chunk, sub_chunk),
            inputs,
            params,
            initial,
        )
    });
    let unfused = run_unfused::<B>(&problem, cell);
    let backend = backend_name::<B>();
    let what = format!(
        "{} on {backend} (T = {}, C = {chunk}, c = {sub_chunk}, inputs ×{input_scale})",
        cell.name, shape[1]
    );
    let mut found = differences(&what, &chunked, &unfused);
    let finite = [
        &chunked.outputs,
        &chunked.grad_inputs,
        &chunked.grad_initial,
    ]
    .iter()
    .all(|tensor| tensor.iter().all(|x| x.is_finite()));
    if !finite {
        found.push(format!("{what}: not finite"));
    }
    found
}

/// "fusion" for a backend inside burn's fusion wrapper, else "cubecl" (the cubecl backend alone).
fn backend_name<B>() -> &'static str {
    match std::any::type_name::<B>().contains("Fusion") {
        true => "fusion",
        false => "cubecl",
    }
}

/// The chunked scan of `form` at `dims` (chunks of `chunk` steps in sub-chunks of `sub_chunk`)
/// over packed tensors: the outputs and the final states.
fn chunked_scan<B: FusedCellBackend>(
    form: &ChunkForm,
    dims: &[usize],
    (chunk, sub_chunk): (usize, usize),
    inputs: Tensor<B, 4>,
    params: Tensor<B, 2>,
    initial: Tensor<B, 3>,
) -> (Tensor<B, 4>, Tensor<B, 3>) {
    let scan = ChunkedScan {
        form,
        dims,
        chunk,
        sub_chunk,
    };
    let result = scan
        .run(inputs, params, Some(initial))
        .expect("chunked scan");
    (result.outputs, result.final_states)
}

/// Every cell with a chunked form: the five built-in ones (DeltaNet's the delta rule's) and three
/// test cells for what they do not cover (a gate along the value axis; a state stored `[V, K]`
/// read with a scale and a direct term; the delta rule under a decay, Gated DeltaNet).
fn chunkable_cells() -> Vec<rak::CompiledCell> {
    let test_cell = |name: &str| {
        let path = format!("{}/tests/cells/{name}.rak", env!("CARGO_MANIFEST_DIR"));
        let source = std::fs::read_to_string(&path).expect("test cell");
        rak::codegen::compile_str(&source).expect("test cell")
    };
    vec![
        SimpleRnn::compile(),
        Gla::compile(),
        RetNet::compile(),
        Mamba2::compile(),
        DeltaNet::compile(),
        test_cell("value_gate"),
        test_cell("transposed"),
        test_cell("gated_delta"),
    ]
}

#[test]
fn chunked_scan_matches_the_unfused_path_for_every_linear_cell() {
    setup();
    let cells: Vec<Cell> = chunkable_cells().into_iter().map(|c| c.cell).collect();
    let mut found = Vec::new();
    for cell in &cells {
        // 3 chunks (the last padded) of 2 sub-chunks each; more shapes (one chunk, T = 300,
        // dims 33 and 64, T = 2048) are in `chunked_form` below, against the f64 interpreter.
        found.extend(check_chunked::<Fused>(cell, [2, 11, 2], 5, 4, 2, 1.0));
    }
    // Without the fusion wrapper (the cubecl backend alone, where a reshaped slice can be
    // misread): a per-key decay, and Mamba2, whose parameters are broadcast over every step.
    for cell in [&cells[0], &cells[3]] {
        found.extend(check_chunked::<Plain>(cell, [2, 11, 2], 5, 4, 2, 1.0));
    }
    // Gates near 0 (log decay ≈ −12 a step, ≈ −190 over a chunk of 16), per key (SimpleRNN)
    // and scalar (Mamba2); 5 chunks in a row, 4 sub-chunks per chunk.
    for cell in [&cells[0], &cells[3]] {
        found.extend(check_chunked::<Fused>(cell, [1, 70, 1], 4, 16, 4, 12.0));
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Operands laid out as views.

/// How far the chunked scan on views may differ from it on dense operands, relative: its burn
/// operations go through burn's fusion compiler, which fuses and vectorises them according to
/// their operands' layout. Seen: 8.3e-8 (SimpleRNN's outputs, operands at an offset, on the
/// fusion wrapper; 63 of 264 elements differ in their last bits; the same scan on dense operands
/// twice gives the same bits). A view read wrongly gives errors of order 1, or NaN from the
/// padding.
const ROUNDING: f32 = 1e-6;

/// One scan over packed operands (inputs, parameters, initial states): outputs and final states.
type Scan<'a, B> =
    &'a dyn Fn(Tensor<B, 4>, Tensor<B, 2>, Tensor<B, 3>) -> (Tensor<B, 4>, Tensor<B, 3>);

/// Elements that pad each row of a [`pitched`] view: 256 bytes of f32, so that burn slices
/// the wider tensor into a view (a slice whose ends are not aligned is copied instead).
const ROW_PADDING: usize = 64;

/// `x` as a view whose rows are [`ROW_PADDING`] elements longer than its last axis, as CUDA's
/// allocator pitches rows, cut from a wider tensor whose padding holds NaN: a kernel that read
/// the view as dense rows would read NaNs and misplaced elements.
fn pitched<B: burn::tensor::backend::Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let mut dims = x.dims();
    let width = dims[D - 1];
    dims[D - 1] = ROW_PADDING;
    let padding = Tensor::full(dims, f32::NAN, &x.device());
    Tensor::cat(vec![x, padding], D - 1).narrow(D - 1, 0, width)
}

/// `x` as a dense view that starts [`ROW_PADDING`] elements into a larger buffer, after NaNs.
fn offset<B: burn::tensor::backend::Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let (dims, device) = (x.dims(), x.device());
    let len = dims.iter().product();
    let before = Tensor::full([ROW_PADDING], f32::NAN, &device);
    let flat = Tensor::cat(vec![before, x.reshape([len])], 0);
    flat.narrow(0, ROW_PADDING, len).reshape(dims)
}

/// `x` as a view of a copy laid out with its first two axes swapped.
fn transposed<B: burn::tensor::backend::Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    dense_copy(&x.swap_dims(0, 1)).swap_dims(0, 1)
}

/// The fused operation and the chunked scan given their operands as views (starting inside a
/// buffer; rows padded as CUDA pitches them; copies laid out transposed) give what they give on
/// dense operands, bit for bit for the fused operation (rak's kernels alone) and within
/// [`ROUNDING`] for the chunked scan: outputs, final states and every gradient, on the fusion
/// wrapper and on the cubecl backend alone. wgpu pitches no allocation, so this is what CI sees
/// of CUDA's layouts; `scripts/gpu-run.sh` runs it on CUDA too.
#[test]
fn operands_given_as_views_give_what_dense_ones_give() {
    setup();
    let mut found = views_against_dense::<Fused>();
    found.extend(views_against_dense::<Plain>());
    assert!(found.is_empty(), "{}", found.join("\n"));
}

/// SimpleRNN (no cell parameters, a per-key decay) and Mamba2 (parameters, a scalar decay)
/// through both paths on backend `B`, each on dense operands and on views of them: what differs.
fn views_against_dense<B: AutodiffBackend + FusedCellBackend>() -> Vec<String>
where
    B::InnerBackend: FusedCellBackend,
{
    let backend = backend_name::<B>();
    let mut found = Vec::new();
    for cell in [builtin("simple_rnn"), builtin("mamba2")] {
        let compiled = cell.compiled();
        let problem = Problem::for_cell(&compiled.cell, [2, 11, 2], 5, 17);
        let settings = FusedSettings {
            cell,
            dims: problem.dims.clone(),
            schedule: schedule(),
        };
        let form = chunk_form(&compiled.cell).unwrap_or_else(|error| panic!("{error}"));
        let fused: Scan<B> =
            &|inputs, params, initial| fused_cell::<B>(inputs, params, Some(initial), &settings);
        let chunked: Scan<B> = &|inputs, params, initial| {
            chunked_scan(&form, &problem.dims, (4, 2), inputs, params, initial)
        };
        for (path, scan) in [("fused", fused), ("chunked", chunked)] {
            let dense = problem.run::<B>(scan);
            let layouts: [(&str, Scan<B>); 3] = [
                ("at an offset", &|inputs, params, initial| {
                    scan(offset(inputs), offset(params), offset(initial))
                }),
                ("rows pitched", &|inputs, params, initial| {
                    scan(pitched(inputs), pitched(params), pitched(initial))
                }),
                ("transposed, rows pitched", &|inputs, params, initial| {
                    scan(
                        pitched(transposed(inputs)),
                        transposed(params),
                        pitched(transposed(initial)),
                    )
                }),
            ];
            for (layout, on_views) in layouts {
                let viewed = problem.run::<B>(on_views);
                for (what, got, expected) in viewed.beside(&dense) {
                    assert_eq!(got.len(), expected.len(), "{what}");
                    let pairs = got.iter().zip(expected);
                    let unequal = pairs.filter(|(a, b)| a.to_bits() != b.to_bits()).count();
                    let not_finite = got.iter().filter(|x| !x.is_finite()).count();
                    let error = relative_error(got, expected);
                    let rounding = path == "chunked" && not_finite == 0 && error <= ROUNDING;
                    if unequal > 0 && !rounding {
                        found.push(format!(
                            "{} {path} on {backend}, operands {layout}: {what}: {unequal} of {} \
                             elements differ from dense operands' ({not_finite} not finite; the \
                             finite ones by {error:e} relative at most)",
                            cell.name(),
                            got.len(),
                        ));
                    }
                }
            }
        }
    }
    found
}

/// burn 0.21 reshapes a strided view with an axis of size 1 to a higher rank with wrong strides
/// (see `reshapable`): here a `[2, 3, 1]` slice (the first or the last column of a `[2, 3, 65]`
/// tensor: views on any device whose buffers align to at most 256 bytes) reshaped to
/// `[2, 3, 1, 1, 1, 1]` on burn's cubecl backend reads other elements than the slice's. Through
/// `reshapable` (which copies them) these views, views without a unit axis (kept as views) and
/// a slice its own buffer holds alone give their elements on both backends. If burn stops
/// misreading, the first check says so, and the copies in `reshapable` can go.
#[test]
fn views_with_a_unit_axis_are_copied_before_burn_reshapes_them() {
    setup();
    let read_right: Vec<String> = [0, 64]
        .into_iter()
        .filter_map(|column| {
            let whole = counting::<Plain, 3>([2, 3, 65]);
            let view = whole.clone().slice([0..2, 0..3, column..column + 1]);
            let got = values(view.reshape([2, 3, 1, 1, 1, 1]));
            let expected = slice_of_counting([2, 3, 65], column..column + 1);
            (got == expected).then(|| format!("column {column}"))
        })
        .collect();
    assert!(
        read_right.is_empty(),
        "burn now reshapes these views with a unit axis right ({}): the copies of `reshapable` \
         can go",
        read_right.join(", ")
    );
    let mut wrong = reshapable_views::<Fused>();
    wrong.extend(reshapable_views::<Plain>());
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// `[0, 1, 2, …]` as a tensor of `shape`.
fn counting<B: burn::tensor::backend::Backend, const D: usize>(shape: [usize; D]) -> Tensor<B, D> {
    let len = shape.iter().product::<usize>();
    tensor::<B, D>((0..len).map(|i| i as f32).collect(), shape)
}

/// The elements of `counting([rows.., width])` in `columns`, row by row.
fn slice_of_counting(shape: [usize; 3], columns: std::ops::Range<usize>) -> Vec<f32> {
    let [batch, heads, width] = shape;
    (0..batch * heads)
        .flat_map(|row| columns.clone().map(move |c| (row * width + c) as f32))
        .collect()
}

/// Views of `counting` tensors through `reshapable` and reshaped to a higher rank on backend
/// `B`: those whose elements are not the view's.
fn reshapable_views<B: burn::tensor::backend::Backend>() -> Vec<String> {
    let backend = backend_name::<B>();
    let shape = [2, 3, 65];
    let mut wrong = Vec::new();
    for (columns, whole_kept) in [(0..1, true), (64..65, true), (0..64, true), (0..1, false)] {
        let whole = counting::<B, 3>(shape);
        let kept = whole_kept.then(|| whole.clone());
        // Without `kept`, the slice holds its buffer alone.
        let view = whole.slice([0..2, 0..3, columns.clone()]);
        let width = columns.len();
        let got = values(
            reshapable(view)
                .reshape([2, 3, width, 1, 1, 1])
                .mul_scalar(2.0),
        );
        drop(kept);
        let expected: Vec<f32> = slice_of_counting(shape, columns.clone())
            .into_iter()
            .map(|x| 2.0 * x)
            .collect();
        if got != expected {
            wrong.push(format!(
                "{backend}: columns {columns:?} of {shape:?} (whole tensor kept: {whole_kept}) \
                 reshaped to [2, 3, {width}, 1, 1, 1]: {got:?}, expected {expected:?}"
            ));
        }
    }
    wrong
}

/// `B::linear_scan` over `over` on seeded tensors (log decays `[2, 3, 5, dk, dv]`, writes and
/// states with K = 4, V = 3), and the gradients of `Σ weights ⊙ outputs` with respect to the
/// log decays, the writes and the initial state.
fn linear_scan_on<B: AutodiffBackend + FusedCellBackend>(
    [decay, writes, initial, weights]: [&[f32]; 4],
    [dk, dv]: [usize; 2],
    over: SumOver,
) -> [Vec<f32>; 4] {
    let decay = tensor::<B, 5>(decay.to_vec(), [2, 3, 5, dk, dv]).require_grad();
    let writes = tensor::<B, 5>(writes.to_vec(), [2, 3, 5, 4, 3]).require_grad();
    let initial = tensor::<B, 4>(initial.to_vec(), [2, 3, 4, 3]).require_grad();
    let after = Tensor::<B, 5>::from_primitive(TensorPrimitive::Float(B::linear_scan(
        decay.clone().into_primitive().tensor(),
        writes.clone().into_primitive().tensor(),
        initial.clone().into_primitive().tensor(),
        over,
    )));
    let weights = tensor::<B, 5>(weights.to_vec(), [2, 3, 5, 4, 3]);
    let grads = (after.clone() * weights).sum().backward();
    [
        values(after),
        values(decay.grad(&grads).expect("a gradient")),
        values(writes.grad(&grads).expect("a gradient")),
        values(initial.grad(&grads).expect("a gradient")),
    ]
}

/// `running_sum` of `x` along `dim` over `over` and the gradient of `Σ weights · sums` with
/// respect to `x`, on backend `B`.
fn running_sum_on<B: AutodiffBackend + FusedCellBackend>(
    x: &[f32],
    weights: &[f32],
    shape: [usize; 3],
    dim: usize,
    over: SumOver,
) -> [Vec<f32>; 2] {
    let x = tensor::<B, 3>(x.to_vec(), shape).require_grad();
    let sums = rak::runtime::fused::running_sum(x.clone(), dim, over);
    let grads = (sums.clone() * tensor::<B, 3>(weights.to_vec(), shape))
        .sum()
        .backward();
    [values(sums), values(x.grad(&grads).expect("a gradient"))]
}

/// The recurrence across chunks of the chunked path and its three gradients against loops
/// in f64, for each way a decay spreads over the state (scalar, per key, per value), walked
/// forward and in reverse, writing the states after or before each step, on the fusion
/// wrapper and on the cubecl backend alone; and
/// `running_sum` and its gradient against sums in f64 along each axis, over each span of
/// steps, on both.
#[test]
fn linear_scan_matches_a_loop_for_every_decay_axis_and_direction() {
    setup();
    let ([sequences, steps, keys, values], mut found) = ([6, 5, 4, 3], Vec::new());
    let writes = random(2, sequences * steps * keys * values, 1.0);
    let initial = random(3, sequences * keys * values, 1.0);
    let weights = random(4, writes.len(), 1.0);
    for (axis, [dk, dv]) in [
        ("scalar", [1, 1]),
        ("key", [keys, 1]),
        ("value", [1, values]),
    ] {
        let decay: Vec<f32> = random(1, sequences * steps * dk * dv, 2.0)
            .into_iter()
            .map(|x| -x.abs())
            .collect();
        for over in [
            SumOver::UpTo,
            SumOver::Before,
            SumOver::From,
            SumOver::After,
        ] {
            let (reverse, exclusive) = (over.reverse(), over.exclusive());
            // The walk, then the gradient reaching each step from the later ones, in f64.
            let mut expected = [
                vec![0f64; writes.len()],
                vec![0f64; decay.len()],
                vec![0f64; writes.len()],
                vec![0f64; initial.len()],
            ];
            for (sequence, element) in
                (0..sequences).flat_map(|s| (0..keys * values).map(move |e| (s, e)))
            {
                let (key, value) = (element / values, element % values);
                let start = sequence * keys * values + element;
                let step = |i: usize| if reverse { steps - 1 - i } else { i };
                let decay_at =
                    |n: usize| ((sequence * steps + n) * dk + key % dk) * dv + value % dv;
                let gate = |n: usize| f64::from(decay[decay_at(n)]).exp();
                let at = |n: usize| (sequence * steps + n) * keys * values + element;
                // states[i]: the state before the walk's step i (states[0] the initial one).
                let mut states = vec![f64::from(initial[start])];
                for i in 0..steps {
                    let n = step(i);
                    states.push(gate(n) * states[i] + f64::from(writes[at(n)]));
                }
                for i in 0..steps {
                    expected[0][at(step(i))] = states[if exclusive { i } else { i + 1 }];
                }
                // The gradient reaching the state after the walk's step i: from the output
                // that is that state (output i, or i + 1 when the outputs are the states
                // before their steps) and through the next step.
                let mut reaching = 0f64;
                for i in (0..steps).rev() {
                    let n = step(i);
                    if i + 1 < steps {
                        reaching *= gate(step(i + 1));
                    }
                    let output = if exclusive { i + 1 } else { i };
                    if output < steps {
                        reaching += f64::from(weights[at(step(output))]);
                    }
                    let decayed = reaching * gate(n);
                    expected[1][decay_at(n)] += decayed * states[i];
                    expected[2][at(n)] = reaching;
                    if i == 0 {
                        // The initial state is output 0 itself when the outputs come before.
                        let own = if exclusive {
                            f64::from(weights[at(n)])
                        } else {
                            0.0
                        };
                        expected[3][start] = decayed + own;
                    }
                }
            }
            let operands = [&decay[..], &writes[..], &initial[..], &weights[..]];
            let runs = [
                ("fusion", linear_scan_on::<Fused>(operands, [dk, dv], over)),
                ("cubecl", linear_scan_on::<Plain>(operands, [dk, dv], over)),
            ];
            for (backend, got) in runs {
                for (what, (got, expected)) in ["after", "∂log decay", "∂writes", "∂initial"]
                    .iter()
                    .zip(got.iter().zip(&expected))
                {
                    let error = max_error(got, expected);
                    if error > 1e-5 {
                        found.push(format!(
                            "decay per {axis}, over {over:?}, {backend} {what}: error {error:.2e}"
                        ));
                    }
                }
            }
        }
    }
    // Running sums along each axis of a `[2, 3, 5]` tensor over each span of steps, and their
    // gradients, against sums in f64.
    let (x, weights) = (random(5, 30, 1.0), random(6, 30, 1.0));
    let (shape, strides) = ([2, 3, 5], [15, 5, 1]);
    for dim in 0..3 {
        for over in [
            SumOver::UpTo,
            SumOver::Before,
            SumOver::From,
            SumOver::After,
        ] {
            let counted = |u: usize, t: usize| match over {
                SumOver::UpTo => u <= t,
                SumOver::Before => u < t,
                SumOver::From => u >= t,
                SumOver::After => u > t,
            };
            // y_t = Σ_{u counted at t} x_u, and ∂x_u = Σ_{t counting u} w_t, in f64.
            let (mut sums, mut gradient) = (vec![0f64; x.len()], vec![0f64; x.len()]);
            for (flat, (sum, gradient)) in sums.iter_mut().zip(&mut gradient).enumerate() {
                let position = (flat / strides[dim]) % shape[dim];
                let at = |u: usize| flat - position * strides[dim] + u * strides[dim];
                for u in 0..shape[dim] {
                    if counted(u, position) {
                        *sum += f64::from(x[at(u)]);
                    }
                    if counted(position, u) {
                        *gradient += f64::from(weights[at(u)]);
                    }
                }
            }
            let expected = [sums, gradient];
            let runs = [
                (
                    "fusion",
                    running_sum_on::<Fused>(&x, &weights, shape, dim, over),
                ),
                (
                    "cubecl",
                    running_sum_on::<Plain>(&x, &weights, shape, dim, over),
                ),
            ];
            for (backend, got) in runs {
                for (what, (got, expected)) in ["sums", "∂x"].iter().zip(got.iter().zip(&expected))
                {
                    let error = max_error(got, expected);
                    if error > 1e-5 {
                        found.push(format!(
                            "running_sum along {dim} over {over:?}, {backend} {what}: error {error:.2e}"
                        ));
                    }
                }
            }
        }
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
}

/// On the software driver the chunked path's own kernels refuse a launch whose units would
/// make more loop passes than it allows one invocation (65,535 over all its loops; past them
/// it cuts the loops short, silently), before they launch. `linear_scan` and `running_sum`
/// over 65,531 steps (65,535 passes by the count) run and match loops in f64; over 65,532
/// they are refused, naming the kernel and the walk (measured with the check off: both are
/// right to 65,535 steps and wrong from 65,536, from step 65,535 on, by up to 1.4 and 21). The
/// scores' backward kernels, whose units take the keys one after another, each key's
/// gradients from its column alone, at the most keys accepted: the last keys' gradients equal
/// those of a launch over those keys alone (past the budget they differ), and one key more is
/// refused. At 16 steps `decayed_scores_backward` is accepted to 3,640 keys per unit, where
/// it was measured right with the check off, and wrong from 3,641; before the count took a
/// loop's last pass it accepted 3,854. (On CUDA there is no such budget: not built with
/// `--features cuda`.)
#[cfg(not(feature = "cuda"))]
#[test]
fn chunked_kernels_past_the_software_drivers_loop_budget_are_refused() {
    use rak::runtime::fused::BlockScores;
    /// The message of a launch refused with a panic.
    fn refusal<T>(result: std::thread::Result<T>) -> String {
        let payload = result.err().expect("the launch is refused");
        payload
            .downcast_ref::<String>()
            .expect("a formatted message")
            .clone()
    }
    setup();
    type B = burn_cubecl_backend::Backend;
    // One state element decaying by e^(−1/64) a step (exact in f32), writes of ±0.6.
    let writes =
        |steps: usize| -> Vec<f32> { (0..steps).map(|n| ((n % 13) as f32 - 6.0) / 10.0).collect() };
    let linear_scan = |steps: usize| {
        values(Tensor::<B, 5>::from_primitive(TensorPrimitive::Float(
            B::linear_scan(
                tensor::<B, 5>(vec![-1.0 / 64.0; steps], [1, 1, steps, 1, 1])
                    .into_primitive()
                    .tensor(),
                tensor::<B, 5>(writes(steps), [1, 1, steps, 1, 1])
                    .into_primitive()
                    .tensor(),
                tensor::<B, 4>(vec![1.0], [1, 1, 1, 1])
                    .into_primitive()
                    .tensor(),
                SumOver::UpTo,
            ),
        )))
    };
    // Integers whose running sums stay within ±21: exact in f32.
    let running_sum = |steps: usize| {
        let x: Vec<f32> = (0..steps).map(|n| (n % 13) as f32 - 6.0).collect();
        values(rak::runtime::fused::running_sum(
            tensor::<B, 3>(x, [1, steps, 1]),
            1,
            SumOver::UpTo,
        ))
    };
    let steps = 65_531;
    let (mut state, mut sum) = (1f64, 0f64);
    let (mut expected_states, mut expected_sums) = (Vec::new(), Vec::new());
    for (n, write) in writes(steps).into_iter().enumerate() {
        state = (-1f64 / 64.0).exp() * state + f64::from(write);
        sum += (n % 13) as f64 - 6.0;
        expected_states.push(state);
        expected_sums.push(sum);
    }
    let scale = expected_states.iter().fold(0f64, |m, s| m.max(s.abs()));
    let error = max_error(&linear_scan(steps), &expected_states) / scale;
    // (The decay's rounding in f32 is amplified up to 64 times by the sum it weighs.)
    assert!(
        error <= f64::from(TOLERANCE),
        "linear_scan over {steps} steps: error {error:.2e}"
    );
    assert_eq!(max_error(&running_sum(steps), &expected_sums), 0.0);
    for (kernel, refused) in [
        (
            "linear_scan",
            std::panic::catch_unwind(|| linear_scan(steps + 1)),
        ),
        (
            "running_sum",
            std::panic::catch_unwind(|| running_sum(steps + 1)),
        ),
    ] {
        let message = refusal(refused);
        let named = format!("the chunked path's {kernel} kernel would make 65536 loop passes");
        assert!(
            message.contains(&named) && message.contains("over 65532 steps"),
            "{message}"
        );
    }

    // The scores' backward kernels: queries, keys, factors (log decays, or gates between
    // sub-chunks) and the scores' gradient, `keys` wide; the three gradients.
    type Operands = [Vec<f32>; 4];
    let backward = |form: BlockScores, steps: usize, subs: usize, [q, k, f, g]: &Operands| {
        let keys = q.len() / steps;
        let operand = |x: &[f32]| {
            tensor::<B, 3>(x.to_vec(), [1, steps, keys])
                .into_primitive()
                .tensor()
        };
        let factors = match form {
            BlockScores::WithinSubChunk => operand(f),
            BlockScores::AcrossSubChunks { .. } => tensor::<B, 4>(f.clone(), [1, subs, subs, keys])
                .into_primitive()
                .tensor(),
        };
        let grad = tensor::<B, 3>(g.clone(), [1, steps, steps])
            .into_primitive()
            .tensor();
        B::block_scores_backward(form, operand(q), operand(k), factors, grad).map(|x| {
            let shape = x.meta.shape().clone();
            let flat = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(x))
                .reshape([shape.num_elements()]);
            values(flat)
        })
    };
    for (form, kernel, steps, subs, units_keys) in [
        (
            BlockScores::WithinSubChunk,
            "decayed_scores_backward",
            16,
            1,
            3_640,
        ),
        (
            BlockScores::AcrossSubChunks { sub_chunk: 16 },
            "scores_across_sub_chunks_backward",
            64,
            4,
            1_523,
        ),
    ] {
        // 256 units, each taking `units_keys` keys.
        let keys = 256 * units_keys;
        let operands = |keys: usize| -> Operands {
            let factors = match form {
                BlockScores::WithinSubChunk => random(13, steps * keys, 0.5)
                    .into_iter()
                    .map(|x| -x.abs())
                    .collect(),
                BlockScores::AcrossSubChunks { .. } => random(13, subs * subs * keys, 1.0)
                    .into_iter()
                    .map(f32::abs)
                    .collect(),
            };
            let [q, k] = [11, 12].map(|seed| random(seed, steps * keys, 1.0));
            [q, k, factors, random(14, steps * steps, 1.0)]
        };
        let all = operands(keys);
        // Columns `from..` of a `[rows, keys]` array.
        let last = |x: &[f32], from: usize| -> Vec<f32> {
            x.chunks(keys)
                .flat_map(|row| row[from..].to_vec())
                .collect()
        };
        let from = keys - 512;
        let [q, k, f, g] = &all;
        let alone = backward(
            form,
            steps,
            subs,
            &[last(q, from), last(k, from), last(f, from), g.clone()],
        );
        for (what, (got, expected)) in ["∂query", "∂key", "∂factors"]
            .iter()
            .zip(backward(form, steps, subs, &all).iter().zip(&alone))
        {
            assert!(
                last(got, from) == *expected,
                "{kernel} over {keys} keys: {what} of the last 512 keys differs from a launch \
                 over them alone"
            );
        }
        let more = operands(keys + 1);
        let message = refusal(std::panic::catch_unwind(|| {
            backward(form, steps, subs, &more)
        }));
        let named = format!("the chunked path's {kernel} kernel would make");
        assert!(
            message.contains(&named) && message.contains(&format!("{} keys", keys + 1)),
            "{message}"
        );
    }
}

/// The largest absolute difference between `got` and the f64 reference `expected`.
fn max_error(got: &[f32], expected: &[f64]) -> f64 {
    got.iter()
        .zip(expected)
        .map(|(g, e)| (f64::from(*g) - e).abs())
        .fold(0f64, f64::max)
}

/// The scores within sub-chunks under a per-key decay against a loop in f64, with decays
/// near 0 (exponents down to −60), on the fusion wrapper and on the cubecl backend alone (its
/// gradients are checked with the chunked scans above).
#[test]
fn decayed_scores_match_a_loop() {
    setup();
    // Small blocks, and sub-chunks of the path's 16 steps with more keys than the kernel has
    // units per step (16), not a multiple of them.
    for [blocks, steps, keys] in [[3, 4, 5], [2, 16, 37]] {
        decayed_scores_match_a_loop_at([blocks, steps, keys]);
    }
}

fn decayed_scores_match_a_loop_at([blocks, steps, keys]: [usize; 3]) {
    let len = blocks * steps * keys;
    let (query, key) = (random(4, len, 1.0), random(5, len, 1.0));
    let decay: Vec<f32> = random(6, len, 20.0).into_iter().map(|x| -x.abs()).collect();
    let at = |m: usize, t: usize, i: usize| (m * steps + t) * keys + i;
    let mut expected = vec![0f64; blocks * steps * steps];
    for (m, t, s) in
        (0..blocks).flat_map(|m| (0..steps).flat_map(move |t| (0..=t).map(move |s| (m, t, s))))
    {
        expected[(m * steps + t) * steps + s] = (0..keys)
            .map(|i| {
                let exponent: f64 = (s + 1..=t).map(|u| f64::from(decay[at(m, u, i)])).sum();
                f64::from(query[at(m, t, i)]) * f64::from(key[at(m, s, i)]) * exponent.exp()
            })
            .sum();
    }
    fn scores<B: FusedCellBackend>(operands: [&[f32]; 3], shape: [usize; 3]) -> Vec<f32> {
        let [query, key, decay] = operands.map(|x| tensor::<B, 3>(x.to_vec(), shape));
        values(rak::runtime::fused::decayed_scores(query, key, decay))
    }
    let operands = [&query[..], &key[..], &decay[..]];
    for (backend, got) in [
        ("fusion", scores::<Fused>(operands, [blocks, steps, keys])),
        ("cubecl", scores::<Plain>(operands, [blocks, steps, keys])),
    ] {
        let error = max_error(&got, &expected);
        assert!(
            error < 1e-5,
            "{backend}, {blocks} blocks of {steps} steps, {keys} keys: error {error:.2e}"
        );
    }
}

/// The scores across sub-chunks and their three gradients (of `Σ w ⊙ A` for a random `w`)
/// against loops in f64, on the fusion wrapper and on the cubecl backend alone; the gates of
/// pairs of sub-chunks J ≥ I and the weights of pairs not scored must change nothing.
#[test]
fn scores_across_sub_chunks_and_their_gradients_match_loops() {
    setup();
    // Small blocks, and chunks of sub-chunks of the path's 16 steps with more keys than the
    // kernel stages at a time (32), not a multiple of them.
    let mut found = Vec::new();
    for shape in [[2, 3, 3, 4], [1, 3, 16, 37]] {
        found.extend(scores_across_sub_chunks_match_loops_at(shape));
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
}

fn scores_across_sub_chunks_match_loops_at(
    [blocks, subs, sub_chunk, keys]: [usize; 4],
) -> Vec<String> {
    let steps = subs * sub_chunk;
    let len = blocks * steps * keys;
    let (query, key) = (random(7, len, 1.0), random(8, len, 1.0));
    let gates: Vec<f32> = random(9, blocks * subs * subs * keys, 1.0)
        .into_iter()
        .map(f32::abs)
        .collect();
    let weights = random(10, blocks * steps * steps, 1.0);
    let at = |m: usize, t: usize, i: usize| (m * steps + t) * keys + i;
    let gate_at = |m: usize, t: usize, s: usize, i: usize| {
        ((m * subs + t / sub_chunk) * subs + s / sub_chunk) * keys + i
    };
    let f = |x: &[f32], at: usize| f64::from(x[at]);
    let mut expected = [
        vec![0f64; blocks * steps * steps],
        vec![0f64; len],
        vec![0f64; len],
        vec![0f64; gates.len()],
    ];
    for (m, t, s) in (0..blocks)
        .flat_map(|m| (0..steps).flat_map(move |t| (0..steps).map(move |s| (m, t, s))))
        .filter(|&(_, t, s)| s / sub_chunk < t / sub_chunk)
    {
        let w = f(&weights, (m * steps + t) * steps + s);
        for i in 0..keys {
            let (q, k, g) = (
                f(&query, at(m, t, i)),
                f(&key, at(m, s, i)),
                f(&gates, gate_at(m, t, s, i)),
            );
            expected[0][(m * steps + t) * steps + s] += q * g * k;
            expected[1][at(m, t, i)] += w * g * k;
            expected[2][at(m, s, i)] += w * g * q;
            expected[3][gate_at(m, t, s, i)] += w * q * k;
        }
    }
    fn run<B: AutodiffBackend + FusedCellBackend>(
        operands: [&[f32]; 4],
        [blocks, subs, steps, keys]: [usize; 4],
    ) -> [Vec<f32>; 4] {
        let [query, key] = [operands[0], operands[1]]
            .map(|x| tensor::<B, 3>(x.to_vec(), [blocks, steps, keys]).require_grad());
        let gates = tensor::<B, 4>(operands[2].to_vec(), [blocks, subs, subs, keys]).require_grad();
        let weights = tensor::<B, 3>(operands[3].to_vec(), [blocks, steps, steps]);
        let scores = rak::runtime::fused::scores_across_sub_chunks(
            query.clone(),
            key.clone(),
            gates.clone(),
        );
        let grads = (scores.clone() * weights).sum().backward();
        let grad = |x: &Tensor<B, 3>| values(x.grad(&grads).expect("a gradient"));
        [
            values(scores),
            grad(&query),
            grad(&key),
            values(gates.grad(&grads).expect("a gradient")),
        ]
    }
    let operands = [&query[..], &key[..], &gates[..], &weights[..]];
    let shape = [blocks, subs, steps, keys];
    let mut found = Vec::new();
    for (backend, got) in [
        ("fusion", run::<Fused>(operands, shape)),
        ("cubecl", run::<Plain>(operands, shape)),
    ] {
        for (what, (got, expected)) in ["scores", "∂query", "∂key", "∂gates"]
            .iter()
            .zip(got.iter().zip(&expected))
        {
            let error = max_error(got, expected);
            if error > 1e-5 {
                found.push(format!(
                    "{backend} {what}, {blocks} chunks of {subs} × {sub_chunk} steps, \
                     {keys} keys: error {error:.2e}"
                ));
            }
        }
    }
    found
}

#[test]
fn cells_without_a_chunked_form_are_refused_with_the_reason() {
    setup();
    let mut config = model_config(Strategy::Chunked);
    config.cell = "mlstm".into();
    let error = config
        .init::<Fused>(builtin("mlstm"), schedule(), &Default::default())
        .map(|_| ())
        .expect_err("mLSTM has no chunked form");
    assert!(
        error.starts_with("model.strategy: \"chunked\" does not fit: cell Mlstm has no chunked form: it has 3 states"),
        "{error}"
    );
    // The same cell runs under `auto` (as fused).
    config.strategy = Strategy::Auto;
    assert!(
        config
            .init::<Fused>(builtin("mlstm"), schedule(), &Default::default())
            .is_ok()
    );
}

// ---------------------------------------------------------------------------------------------
// The language model and its training.

use burn::module::{Module, ModuleVisitor, Param};
use rak::runtime::data::{DataConfig, Rng, Split};
use rak::runtime::model::{ModelConfig, Projection, Strategy};
use rak::runtime::train::{OptimizerConfig, RunOptions, RunSummary, TrainConfig, train};

/// Every float parameter's gradient, in the model's visiting order.
struct CollectGradients<'g, B: AutodiffBackend> {
    grads: &'g B::Gradients,
    found: Vec<(String, Vec<f32>)>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for CollectGradients<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let shape = format!("{:?}", param.val().dims());
        let grad = param.val().grad(self.grads).map(values).unwrap_or_default();
        self.found.push((shape, grad));
    }
}

/// Trains SimpleRNN on the default backend.
fn train_simple_rnn(config: &TrainConfig, options: &RunOptions) -> Result<RunSummary, String> {
    train::<Fused>(simple_rnn(), config, options, &Default::default())
}

fn model_config(strategy: Strategy) -> ModelConfig {
    ModelConfig {
        cell: "simple_rnn".into(),
        vocab: 12,
        d_model: 16,
        layers: 2,
        heads: 2,
        dims: vec![5, 6],
        residual: false,
        strategy,
        projection: Projection::Fused,
        chunk: 4,
    }
}

/// A 2-layer seed-compatible LM: the fused, the chunked and the unfused model, with the same
/// weights, give the same loss and the same gradient for every parameter.
#[test]
fn language_model_fused_chunked_and_unfused_agree() {
    setup();
    for strategy in [Strategy::Fused, Strategy::Chunked] {
        check_language_model(strategy);
    }
}

fn check_language_model(strategy: Strategy) {
    type B = Fused;
    let device = Default::default();
    <B as burn::tensor::backend::Backend>::seed(&device, 3);
    let fused = model_config(strategy)
        .init::<B>(simple_rnn(), schedule(), &device)
        .unwrap();
    let unfused = model_config(Strategy::Unfused)
        .init::<B>(simple_rnn(), schedule(), &device)
        .unwrap()
        .load_record(fused.clone().into_record());
    let tokens: Vec<i64> = random(5, 2 * 9, 6.0)
        .iter()
        .map(|x| (x + 6.0) as i64)
        .collect();
    let tokens =
        Tensor::<B, 2, burn::tensor::Int>::from_data(TensorData::new(tokens, [2, 9]), &device);
    let loss_and_grads = |model: &rak::runtime::model::LanguageModel<B>| {
        let logits = model.forward(tokens.clone(), None).logits;
        let loss = burn::tensor::activation::log_softmax(logits, 2)
            .slice([0..2, 0..9, 0..1])
            .mean()
            .neg();
        let grads = loss.backward();
        let mut collect = CollectGradients::<B> {
            grads: &grads,
            found: Vec::new(),
        };
        model.visit(&mut collect);
        (values(loss)[0], collect.found)
    };
    let (fused_loss, fused_grads) = loss_and_grads(&fused);
    let (unfused_loss, unfused_grads) = loss_and_grads(&unfused);
    assert!(
        (fused_loss - unfused_loss).abs() <= TOLERANCE * unfused_loss.abs(),
        "loss: {strategy:?} {fused_loss}, unfused {unfused_loss}"
    );
    assert_eq!(fused_grads.len(), unfused_grads.len());
    assert!(
        fused_grads.len() >= 10,
        "every layer's parameters are visited"
    );
    for ((shape, got), (_, expected)) in fused_grads.iter().zip(&unfused_grads) {
        // No tensor is empty (CUDA refuses to copy or launch over one): SimpleRNN, which has
        // no cell parameters, gets one unused column of them, whose gradient is zero.
        assert!(
            !shape.contains(" 0]") && !shape.contains("[0"),
            "empty parameter {shape}"
        );
        // Only the unused column (`[H, 1]`) is outside the unfused path's graph, without a
        // gradient; the fused operation's gradient of it is zero.
        if expected.is_empty() {
            assert_eq!(shape, "[2, 1]", "parameter {shape} has a gradient");
        }
        if expected.iter().all(|&g| g == 0.0) {
            assert!(
                got.iter().all(|&g| g == 0.0),
                "{strategy:?}: {shape}: {got:?}"
            );
            continue;
        }
        let error = relative_error(got, expected);
        assert!(
            error <= TOLERANCE,
            "{strategy:?}: gradient of the parameter of shape {shape} differs by {error:e}"
        );
    }
}

fn recall_config() -> TrainConfig {
    TrainConfig {
        job: Default::default(),
        model: ModelConfig {
            cell: "simple_rnn".into(),
            vocab: 16,
            d_model: 32,
            layers: 1,
            heads: 2,
            dims: vec![8, 8],
            residual: true,
            strategy: Strategy::Fused,
            projection: Projection::Fused,
            chunk: 16,
        },
        data: DataConfig::Recall {
            vocab: 16,
            pairs: 3,
        },
        optimizer: OptimizerConfig {
            lr: 1e-2,
            min_lr: 1e-3,
            warmup_steps: 10,
            weight_decay: 0.0,
            grad_clip: 1.0,
        },
        steps: 150,
        batch_size: 32,
        accumulation: 1,
        tbptt: None,
        seed: 1,
        log_every: 50,
        eval_every: 150,
        eval_batches: 4,
        test_batches: 4,
        checkpoint_every: 50,
    }
}

fn options(run_dir: &std::path::Path, resume: bool, stop_after: Option<usize>) -> RunOptions {
    RunOptions {
        run_dir: run_dir.to_path_buf(),
        resume,
        stop_after,
        schedule: Schedule {
            chunks_per_launch: Some(1),
            ..Default::default()
        },
        progress: false,
    }
}

fn run_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("rak-test-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    dir
}

/// A tiny LM learns the embedded recall task: its test recall accuracy is at least twice chance
/// (150 steps on the CPU adapter reach 1/3 against 1/8).
/// Then: resuming from a checkpoint reproduces the same next losses; a damaged checkpoint and a
/// checkpoint of another model are refused with their reasons.
#[test]
fn training_learns_recall_resumes_exactly_and_refuses_bad_checkpoints() {
    setup();
    let config = recall_config();
    let dir = run_dir("recall");
    let full = train_simple_rnn(&config, &options(&dir, false, None)).expect("training");
    let test = full.test.expect("test metrics");
    assert!(
        test.accuracy >= 2.0 * full.chance_accuracy,
        "recall accuracy {} is not clearly above chance {}",
        test.accuracy,
        full.chance_accuracy
    );
    let first = full.losses[0].1;
    let last = full.losses.last().unwrap().1;
    assert!(last < 0.8 * first, "loss fell only from {first} to {last}");
    for name in ["config.json", "metrics.jsonl", "summary.json"] {
        assert!(dir.join(name).exists(), "{name} written");
    }

    // The exported safetensors weights, loaded into a model drawn from another seed, give the
    // same test metrics.
    let device = Default::default();
    <Fused as burn::tensor::backend::Backend>::seed(&device, 99);
    let mut imported = config
        .model
        .init::<Fused>(simple_rnn(), options(&dir, false, None).schedule, &device)
        .unwrap();
    let dataset = config.data.load().unwrap();
    let metrics = |model: &rak::runtime::model::LanguageModel<Fused>| {
        rak::runtime::train::evaluate::<Fused>(
            model,
            &dataset,
            &config,
            Split::Test,
            config.test_batches,
            &device,
        )
    };
    let before = metrics(&imported);
    let weights = dir.join("model.safetensors");
    rak::runtime::checkpoint::import_safetensors(&mut imported, &weights).expect("import");
    let after = metrics(&imported);
    assert!(
        (after.loss - test.loss).abs() < 1e-5 && after.accuracy == test.accuracy,
        "imported weights: {after:?}, trained model: {test:?}"
    );
    assert!(
        (before.loss - test.loss).abs() > 1e-3,
        "a fresh model differs"
    );

    // Stop at step 50 (a checkpoint is written there), resume, and run steps 51..60.
    let short = TrainConfig {
        steps: 60,
        ..config.clone()
    };
    let resumed_dir = run_dir("resume");
    let straight =
        train_simple_rnn(&short, &options(&resumed_dir, false, None)).expect("straight run");
    std::fs::remove_dir_all(&resumed_dir).ok();
    train_simple_rnn(&short, &options(&resumed_dir, false, Some(50))).expect("first half");
    let resumed =
        train_simple_rnn(&short, &options(&resumed_dir, true, None)).expect("resumed half");
    assert_eq!(resumed.losses.first().map(|l| l.0), Some(51));
    assert_eq!(resumed.losses, straight.losses[50..].to_vec());

    // Another model shape: refused, naming the key.
    let wider = TrainConfig {
        model: ModelConfig {
            d_model: 48,
            ..short.model.clone()
        },
        ..short.clone()
    };
    let error = train_simple_rnn(&wider, &options(&resumed_dir, true, None)).unwrap_err();
    assert!(
        error.contains("refused")
            && error.contains("model.d_model = 32 in the checkpoint, 48 in this run"),
        "{error}"
    );

    // A damaged model record: refused.
    let latest = rak::runtime::checkpoint::latest(&resumed_dir)
        .unwrap()
        .unwrap();
    let model_file = latest.join("model.mpk");
    let mut bytes = std::fs::read(&model_file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&model_file, &bytes).unwrap();
    let error = train_simple_rnn(&short, &options(&resumed_dir, true, None)).unwrap_err();
    assert!(error.contains("model.mpk is damaged"), "{error}");
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_dir_all(&resumed_dir).ok();
}

/// A loss that is not finite stops the run, naming the step.
#[test]
fn a_diverging_loss_stops_the_run_with_its_step() {
    setup();
    let config = TrainConfig {
        optimizer: OptimizerConfig {
            lr: 1e30,
            min_lr: 1e30,
            warmup_steps: 0,
            weight_decay: 0.0,
            grad_clip: 0.0,
        },
        steps: 20,
        ..recall_config()
    };
    let dir = run_dir("nan");
    let error = train_simple_rnn(&config, &options(&dir, false, None)).unwrap_err();
    assert!(
        error.starts_with("step ") && error.contains("the training loss is"),
        "{error}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// The command line end to end, as CI runs it: a multirun of two tiny experiments (the seed's
/// per-step loop with separate projections, and the generated kernels) ends with a table of
/// one row per run; `rak test` evaluates both checkpoints (the same test losses as at the end
/// of training); `rak plot` draws their curves.
#[test]
fn multirun_of_three_experiments_ends_with_the_table_then_tests_and_plots_them() {
    setup();
    let dir = run_dir("multirun");
    let run_dir = format!("job.run_dir={}/{{name}}", dir.display());
    let tiny = [
        "steps=4",
        "eval_every=4",
        "checkpoint_every=4",
        "log_every=2",
        "batch_size=4",
        "eval_batches=1",
        "test_batches=1",
        "model.d_model=16",
        "model.dims=[4, 4]",
        "model.layers=1",
        "data.pairs=2",
        &run_dir,
    ];
    let rak = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_rak"))
            .args(args)
            .args(tiny)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("rak runs");
        let stdout = String::from_utf8_lossy(&output.stdout).to_string();
        let stderr = String::from_utf8_lossy(&output.stderr).to_string();
        assert!(output.status.success(), "rak {args:?}: {stderr}");
        stdout
    };
    // Table rows: `| name | mode | train s | val s | test s | val loss | test loss | acc | tok/s |`.
    let rows = |table: &str| -> Vec<Vec<String>> {
        table
            .lines()
            .filter(|line| line.starts_with("| ") && !line.starts_with("| run "))
            .map(|line| {
                line.trim_matches('|')
                    .split('|')
                    .map(|c| c.trim().to_string())
                    .collect()
            })
            .collect()
    };
    let table_file = dir.join("table.md");
    let trained = rak(&[
        "train",
        "-m",
        "experiment=unfused,fused,chunked",
        "--table",
        table_file.to_str().unwrap(),
    ]);
    let train_rows = rows(&trained);
    assert_eq!(train_rows.len(), 3, "{trained}");
    assert_eq!(std::fs::read_to_string(&table_file).unwrap(), trained);
    for (row, name) in train_rows.iter().zip(["unfused", "fused", "chunked"]) {
        assert_eq!(
            (row[0].as_str(), row[1].as_str()),
            (name, "train"),
            "{trained}"
        );
        for column in [2, 3, 5, 6, 8] {
            let value: f64 = row[column].parse().unwrap_or_else(|_| panic!("{trained}"));
            assert!(value > 0.0, "{trained}");
        }
        let config = rak::runtime::train::read_config(&dir.join(name)).unwrap();
        assert_eq!(config.job.name, name);
        assert_eq!(config.steps, 4);
        assert!(dir.join(name).join("model.safetensors").exists());
    }
    let unfused = rak::runtime::train::read_config(&dir.join("unfused")).unwrap();
    assert_eq!(
        (unfused.model.strategy, unfused.model.projection),
        (Strategy::Unfused, Projection::Separate)
    );

    // The same model trained with the fused kernels and with the chunked form: the same losses.
    let test_loss = |row: &Vec<String>| row[6].parse::<f64>().unwrap();
    let (fused_loss, chunked_loss) = (test_loss(&train_rows[1]), test_loss(&train_rows[2]));
    assert!(
        (fused_loss - chunked_loss).abs() <= 1e-3 * fused_loss,
        "{trained}"
    );

    let tested = rak(&["test", "-m", "experiment=unfused,fused,chunked"]);
    let test_rows = rows(&tested);
    assert_eq!(test_rows.len(), 3, "{tested}");
    for (test_row, train_row) in test_rows.iter().zip(&train_rows) {
        assert_eq!(test_row[0], train_row[0]);
        assert_eq!(test_row[1], "test");
        assert_eq!(
            test_row[6], train_row[6],
            "test loss of the checkpoint: {tested}"
        );
        let written = dir.join(&train_row[0]).join("test-config.json");
        let written = std::fs::read_to_string(written).expect("test-config.json written");
        assert!(written.contains("\"mode\": \"test\""), "{written}");
    }

    // Streaming generation from a trained run: one prompt (streamed), then a batch of two.
    let fused_run = dir.join("fused");
    let generate = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_rak"))
            .args(["generate", "--checkpoint", fused_run.to_str().unwrap()])
            .args(["--max-tokens", "5", "--temperature", "0"])
            .args(args)
            .output()
            .expect("rak generate runs");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).to_string()
    };
    let streamed = generate(&["--prompt", "1 2 3"]);
    let words: Vec<usize> = streamed
        .split_whitespace()
        .map(|w| w.parse().unwrap())
        .collect();
    assert!(
        words.len() == 5 && words.iter().all(|&t| t < 32),
        "{streamed}"
    );
    let batch = generate(&["--prompt", "1 2 3", "--prompt", "4 5"]);
    let lines: Vec<&str> = batch.lines().collect();
    assert_eq!(lines.len(), 2, "{batch}");
    assert_eq!(
        lines[0],
        format!("1 2 3 → {}", streamed.trim_end_matches('\n'))
    );
    let bench = std::process::Command::new(env!("CARGO_BIN_EXE_rak"))
        .args([
            "bench",
            "generate",
            "--checkpoint",
            fused_run.to_str().unwrap(),
        ])
        .args(["--prompt-lengths", "10,40", "--tokens", "2", "--block", "8"])
        .output()
        .expect("rak bench generate runs");
    let bench = String::from_utf8_lossy(&bench.stdout).to_string();
    let bench_rows: Vec<&str> = bench
        .lines()
        .filter(|l| l.starts_with("| 10 |") || l.starts_with("| 40 |"))
        .collect();
    assert_eq!(bench_rows.len(), 2, "{bench}");
    let bench_chunked = |cell: &str, dtype: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_rak"))
            .args(["bench", "--strategy", "chunked", "--cell", cell])
            .args(["--dtype", dtype])
            .args(["--shape", "1,24,1,4", "--chunk", "8", "--warmup", "0"])
            .args(["--repetitions", "1", "--fusion", "false"])
            .output()
            .expect("rak bench --strategy chunked runs")
    };
    // Without burn's fusion wrapper here; with it (the default, as training runs) below.
    // f16 inputs, parameters and outputs (Mesa's software adapter offers f16), cast to f32
    // for the scan and back.
    let output = bench_chunked("gla", "f16");
    let table = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("| gla | F16 | Wgpu | 1 | 24 | 1 | 4 |")
                && l.contains("chunked, 8 steps per chunk, no fusion")),
        "{table}"
    );
    // `--parts`: the chunked path's own kernels timed alone, with their shares of the scan
    // (chunks of 32 steps: two sub-chunks of 16, so the scores across them run too).
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_rak"))
        .args([
            "bench",
            "--strategy",
            "chunked",
            "--cell",
            "simple_rnn",
            "--parts",
        ])
        .args(["--shape", "1,40,2,4", "--chunk", "32", "--warmup", "0"])
        .args(["--repetitions", "1"])
        .output()
        .expect("rak bench --strategy chunked --parts runs");
    let table = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(output.status.success(), "{output:?}");
    assert!(
        table.contains("chunked, 32 steps per chunk, fusion;"),
        "{table}"
    );
    for (kernel, launch) in [
        ("linear_scan", "2 states [4, 4] through 2 chunks"),
        ("decayed_scores", "8 sub-chunks of 16 steps"),
        ("scores_across_sub_chunks", "4 chunks of 2 sub-chunks"),
        ("the rest (whole scan: ", ""),
    ] {
        let prefix = format!("| 1 | 40 | 2 | 4 | {kernel}");
        assert!(
            table
                .lines()
                .any(|l| l.starts_with(&prefix) && l.contains(launch) && l.ends_with(" % |")),
            "no row for {kernel}: {table}"
        );
    }
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_rak"))
        .args([
            "bench",
            "--cell",
            "simple_rnn",
            "--parts",
            "--shape",
            "1,8,1,4",
        ])
        .output()
        .expect("rak bench --parts runs");
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("it needs --strategy chunked"),
        "{output:?}"
    );
    let output = bench_chunked("mlstm", "f32");
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("cell Mlstm has no chunked form"),
        "{output:?}"
    );

    let picture = dir.join("loss.png");
    let unfused_dir = dir.join("unfused");
    let fused_dir = dir.join("fused");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_rak"))
        .args([
            "plot",
            unfused_dir.to_str().unwrap(),
            fused_dir.to_str().unwrap(),
            "-o",
        ])
        .arg(&picture)
        .output()
        .expect("rak plot runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let bytes = std::fs::read(&picture).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    std::fs::remove_dir_all(&dir).ok();
}

/// Streaming inference on the cubecl backend itself (the single-step kernel): greedy decoding
/// of two prompts at once gives the same tokens as the unfused path; reading a prompt in blocks
/// gives the logits of one scan over it; and the generated tokens are what a scan over the
/// whole sequence predicts at each position.
fn check_generation(cell: CellRef, dims: Vec<usize>) {
    use rak::runtime::generate::{Sampling, generate, read_prompt};
    type Raw = burn_cubecl_backend::Backend;
    let device = Default::default();
    <Raw as burn::tensor::backend::Backend>::seed(&device, 11);
    let config = |strategy| ModelConfig {
        cell: cell.name().into(),
        dims: dims.clone(),
        residual: true,
        ..model_config(strategy)
    };
    let fused = config(Strategy::Fused)
        .init::<Raw>(cell, schedule(), &device)
        .unwrap();
    let unfused = config(Strategy::Unfused)
        .init::<Raw>(cell, schedule(), &device)
        .unwrap()
        .load_record(fused.clone().into_record());
    let prompts = vec![vec![1, 5, 7, 2, 9, 3, 4], vec![0, 11, 6]];
    let greedy = Sampling::greedy();
    let run = |model| generate::<Raw>(model, &prompts, 8, &greedy, 3, &device, |_, _| {});
    let tokens = run(&fused);
    assert_eq!(
        tokens,
        run(&unfused),
        "{}: fused and unfused decoding",
        cell.name()
    );

    let whole: Vec<i64> = prompts[0].iter().chain(&tokens[0][..7]).copied().collect();
    let input = Tensor::<Raw, 2, burn::tensor::Int>::from_data(
        TensorData::new(whole.clone(), [1, whole.len()]),
        &device,
    );
    let logits = values(fused.forward(input, None).logits);
    let vocab = 12;
    let (blocked, _) = read_prompt::<Raw>(&fused, &prompts[0], 3, &device);
    let at = |t: usize| &logits[t * vocab..(t + 1) * vocab];
    let last_prompt = at(prompts[0].len() - 1);
    for (a, b) in blocked.iter().zip(last_prompt) {
        assert!(
            (a - b).abs() < 1e-4,
            "{}: prompt read in blocks: {a} vs {b}",
            cell.name()
        );
    }
    let predicted: Vec<i64> = (prompts[0].len() - 1..whole.len())
        .map(|t| greedy.draw(at(t), &mut Rng::new(0)) as i64)
        .collect();
    assert_eq!(predicted, tokens[0], "{}: steps vs one scan", cell.name());
}

#[test]
fn streaming_generation_matches_the_unfused_path_and_the_whole_scan() {
    setup();
    check_generation(builtin("simple_rnn"), vec![5, 6]);
    check_generation(builtin("mlstm"), vec![5, 6]);
    check_generation(builtin("elman"), vec![5]);
}

// ---------------------------------------------------------------------------------------------
// The chunked form (`rak::runtime::chunked`) against the f64 interpreter: burn operations on
// the cubecl backend alone (the matrix products are cubecl's, with tensor cores where the
// device has them), differentiated by burn's autodiff; every tensor within
// `CHUNKED_TOLERANCE` of the interpreter's, in the ∞-norm relative error of `reference`.

mod chunked_form {
    use super::{Plain, chunkable_cells, tensor, values};
    use crate::reference::{CHUNK, Reference, SHAPES, ScanResults, beyond};
    use rak::codegen::ScanShape;
    use rak::codegen::interpret::Tensor;

    /// The chunked form's tolerance. Its matrix products are cubecl's autotuned matmuls: exact
    /// f32 products on wgpu, but on CUDA the tensor-core kernels the autotuner picks when they
    /// are the fastest round f32 operands to tf32 (10-bit mantissa, unit roundoff u = 2⁻¹¹ ≈
    /// 4.9e-4; what Triton, and so flash-linear-attention, does with f32 inputs too). A product
    /// of two rounded operands is then off by up to 2u of the sum of its terms' magnitudes, and
    /// a gradient here passes through up to four products: 8u, set before any run on a GPU.
    #[cfg(not(feature = "cuda"))]
    const CHUNKED_TOLERANCE: f64 = crate::reference::TOLERANCE;
    #[cfg(feature = "cuda")]
    const CHUNKED_TOLERANCE: f64 = 8.0 / 2048.0;

    /// The values of `tensors` (each `rows × width_i`, row-major) side by side:
    /// `rows × Σ width_i`, the packed layout of `rak::runtime::packing`.
    fn pack(tensors: &[Tensor], rows: usize) -> Vec<f32> {
        let widths: Vec<usize> = tensors.iter().map(|t| t.data.len() / rows).collect();
        let mut packed = Vec::with_capacity(rows * widths.iter().sum::<usize>());
        for row in 0..rows {
            for (tensor, width) in tensors.iter().zip(&widths) {
                packed.extend(
                    tensor.data[row * width..(row + 1) * width]
                        .iter()
                        .map(|&x| x as f32),
                );
            }
        }
        packed
    }

    /// The inverse of [`pack`]: each value of `widths`, row-major.
    fn unpack(packed: &[f32], widths: &[usize]) -> Vec<Vec<f32>> {
        let total: usize = widths.iter().sum();
        let mut values: Vec<Vec<f32>> = widths.iter().map(|_| Vec::new()).collect();
        for row in packed.chunks(total.max(1)) {
            let mut offset = 0;
            for (value, width) in values.iter_mut().zip(widths) {
                value.extend_from_slice(&row[offset..offset + width]);
                offset += width;
            }
        }
        values
    }

    /// Runs the chunked form of `compiled` at one shape (chunks of `chunk` steps in sub-chunks
    /// of `sub_chunk`, inputs drawn in ±`input_scale`) and the interpreter on the same problem;
    /// one line per tensor that differs by more than [`CHUNKED_TOLERANCE`] or is not finite.
    #[allow(clippy::too_many_arguments)]
    fn compare_chunked(
        compiled: &rak::CompiledCell,
        (batch, time, heads): (usize, usize, usize),
        dims: &[usize],
        chunk: usize,
        sub_chunk: usize,
        input_scale: f64,
        seed: u64,
    ) -> Vec<String> {
        let cell = &compiled.cell;
        let form = rak::codegen::chunkwise::chunk_form(cell).unwrap_or_else(|e| panic!("{e}"));
        let named: Vec<(&str, usize)> = (cell.dims.iter().zip(dims))
            .map(|(d, &s)| (d.name.as_str(), s))
            .collect();
        let shape = ScanShape::new(cell, batch, time, heads, &named).unwrap();
        let reference = Reference::new(compiled, &shape, seed, input_scale);
        let (inputs, grad_outputs, grad_finals) = (
            &reference.inputs,
            &reference.grad_outputs,
            &reference.grad_finals,
        );

        let width = |tensors: &[Tensor], rows: usize| -> Vec<usize> {
            tensors.iter().map(|t| t.data.len() / rows).collect()
        };
        let (steps, sequences) = (batch * time * heads, batch * heads);
        let initial = inputs.initial_states.as_deref().unwrap();
        let widths = [
            width(&inputs.inputs, steps),
            width(&inputs.params, heads),
            width(initial, sequences),
            width(grad_outputs, steps),
        ];
        let sum = |w: &[usize]| w.iter().sum::<usize>();
        let packed_inputs = tensor::<Plain, _>(
            pack(&inputs.inputs, steps),
            [batch, time, heads, sum(&widths[0])],
        )
        .require_grad();
        let packed_params =
            tensor::<Plain, _>(pack(&inputs.params, heads), [heads, sum(&widths[1])])
                .require_grad();
        let packed_initial =
            tensor::<Plain, _>(pack(initial, sequences), [batch, heads, sum(&widths[2])])
                .require_grad();
        let (outputs, final_states) = super::chunked_scan(
            &form,
            &shape.dims,
            (chunk, sub_chunk),
            packed_inputs.clone(),
            packed_params.clone(),
            packed_initial.clone(),
        );
        // L = Σ outputs · ∂L/∂outputs + Σ final states · ∂L/∂final states.
        let loss = (outputs.clone()
            * tensor::<Plain, _>(
                pack(grad_outputs, steps),
                [batch, time, heads, sum(&widths[3])],
            ))
        .sum()
            + (final_states.clone()
                * tensor::<Plain, _>(
                    pack(grad_finals, sequences),
                    [batch, heads, sum(&widths[2])],
                ))
            .sum();
        let grads = loss.backward();
        let got = ScanResults {
            outputs: unpack(&values(outputs), &widths[3]),
            final_states: unpack(&values(final_states), &widths[2]),
            grad_inputs: unpack(
                &values(packed_inputs.grad(&grads).expect("input gradient")),
                &widths[0],
            ),
            // A cell without parameters has an empty parameter tensor, with no gradient.
            grad_params: packed_params
                .grad(&grads)
                .map(|g| unpack(&values(g), &widths[1]))
                .unwrap_or_default(),
            grad_initial: unpack(
                &values(packed_initial.grad(&grads).expect("initial-state gradient")),
                &widths[2],
            ),
        };
        let context = format!(
            "{} B={batch} T={time} H={heads} dims={dims:?} C={chunk} c={sub_chunk} inputs ×{input_scale}",
            cell.name
        );
        // The worst error, for the log of a run on a GPU (`--nocapture`).
        let errors = reference.errors(cell, &got);
        let worst = errors.iter().max_by(|a, b| a.1.total_cmp(&b.1));
        if let Some((what, error)) = worst {
            println!("{context}: worst relative error {error:.2e} ({what})");
        }
        beyond(errors, &context, CHUNKED_TOLERANCE)
    }

    /// The chunked form at the shapes of `kernels_match_the_interpreter_for_every_cell` (T = 1,
    /// 7, C − 1, C, C + 1, 300 with chunks of C = 16 in sub-chunks of 4; dims 5, 33, 64, each
    /// dim a different size), outputs, final states and every gradient.
    #[test]
    fn chunked_form_matches_the_interpreter() {
        let mut found = Vec::new();
        for compiled in chunkable_cells() {
            for (n, (batch, time, heads, dim)) in SHAPES.into_iter().enumerate() {
                let dims: Vec<usize> = (0..compiled.cell.dims.len()).map(|d| dim + d).collect();
                found.extend(compare_chunked(
                    &compiled,
                    (batch, time, heads),
                    &dims,
                    CHUNK,
                    4,
                    1.0,
                    200 + n as u64,
                ));
            }
        }
        assert!(found.is_empty(), "{}", found.join("\n"));
    }

    /// T = 2048 with inputs scaled by 30, as `saturated_gates_and_long_sequences_stay_finite`:
    /// gates near 0 and 1, cumulative log decays far below what `exp` of their negation holds in
    /// f32 (chunks of 64 steps in sub-chunks of 16, 32 chunks).
    #[test]
    fn chunked_form_with_saturated_gates_and_long_sequences() {
        let mut found = Vec::new();
        for compiled in chunkable_cells() {
            let dims = vec![3; compiled.cell.dims.len()];
            found.extend(compare_chunked(
                &compiled,
                (1, 2048, 1),
                &dims,
                64,
                16,
                30.0,
                11,
            ));
        }
        assert!(found.is_empty(), "{}", found.join("\n"));
    }
}
