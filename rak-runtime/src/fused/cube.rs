//! The fused cell on burn's cubecl backends (`CubeBackend`, what `Cuda` and `Wgpu` wrap): the
//! packed tensors are split into one array per value, the generated kernels run through the
//! cell's [`ScanKernels`] (from [`FusedSettings::cell`]), and the results are packed again.
//! The chunked path's recurrence across chunks runs `linear_scan_kernel`, its running sums of
//! log decays `running_sum_kernel`, its scores within sub-chunks `decayed_scores_kernel`
//! and `decayed_scores_backward_kernel`, and across sub-chunks
//! `scores_across_sub_chunks_kernel` and `scores_across_sub_chunks_backward_kernel`.

use super::{BlockScores, FusedCellBackend, FusedForward, FusedGradients, FusedSettings, SumOver};
use crate::codegen::ScanShape;
use crate::kernels::{
    BackwardBuffers, DeviceArray, Dtype, ForwardBuffers, LOOP_BUDGET, ScanKernels, ScanRuntime,
    StepBuffers, checks_loop_budget,
};
use crate::packing::Packing;
use burn::tensor::Shape;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::prelude::*;

impl<R, F, I, BT> FusedCellBackend for CubeBackend<R, F, I, BT>
where
    R: CubeRuntime + ScanRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    fn fused_cell_forward(
        inputs: CubeTensor<R>,
        params: CubeTensor<R>,
        initial_states: Option<CubeTensor<R>>,
        settings: &FusedSettings,
        checkpoints: bool,
    ) -> FusedForward<Self> {
        let (runner, shape, dtype) = scan_of::<R, F>(&inputs, settings);
        let (cell, dims) = (&runner.compiled().cell, &settings.dims);
        let (batch, time, heads) = (shape.batch, shape.time, shape.heads);
        let (client, device) = (inputs.client.clone(), inputs.device.clone());
        let states = Packing::states(cell, dims);
        let chunks = time.div_ceil(settings.schedule.chunk);
        let buffers = ForwardBuffers {
            inputs: unpack::<R, F>(&inputs, &Packing::inputs(cell, dims)),
            params: unpack::<R, F>(&params, &Packing::params(cell, dims)),
            initial_states: initial_states
                .as_ref()
                .map(|initial| unpack::<R, F>(initial, &states)),
            outputs: columns::<R>(
                &client,
                batch * time * heads,
                &Packing::outputs(cell, dims),
                size_of::<F>(),
            ),
            final_states: columns::<R>(&client, batch * heads, &states, size_of::<F>()),
            checkpoints: checkpoints
                .then(|| columns::<R>(&client, batch * heads * chunks, &states, 4)),
        };
        runner
            .forward(dtype, &client, &shape, settings.schedule, &buffers)
            .unwrap_or_else(|error| panic!("fused {} forward: {error}", settings.cell.name()));
        let pack_f = |arrays: &[DeviceArray], packing: &Packing, leading: &[usize]| {
            pack::<R, F>(&client, &device, arrays, packing, leading)
        };
        FusedForward {
            outputs: pack_f(
                &buffers.outputs,
                &Packing::outputs(cell, dims),
                &[batch, time, heads],
            ),
            final_states: pack_f(&buffers.final_states, &states, &[batch, heads]),
            checkpoints: buffers.checkpoints.as_ref().map(|arrays| {
                pack::<R, f32>(&client, &device, arrays, &states, &[batch, heads, chunks])
            }),
        }
    }

    fn device_memory(device: &Self::Device) -> Option<(u64, u64)> {
        let usage = R::client(device).memory_usage().ok()?;
        Some((usage.bytes_in_use, usage.bytes_reserved))
    }

    fn fused_cell_step(
        inputs: CubeTensor<R>,
        params: CubeTensor<R>,
        states: CubeTensor<R>,
        settings: &FusedSettings,
    ) -> (CubeTensor<R>, CubeTensor<R>) {
        let (runner, shape, dtype) = scan_of::<R, F>(&inputs, settings);
        let (cell, dims) = (&runner.compiled().cell, &settings.dims);
        let (batch, heads) = (shape.batch, shape.heads);
        let (client, device) = (inputs.client.clone(), inputs.device.clone());
        let state_packing = Packing::states(cell, dims);
        let output_packing = Packing::outputs(cell, dims);
        // The states are unpacked into new arrays, which the kernel then updates in place.
        let buffers = StepBuffers {
            inputs: unpack::<R, F>(&inputs, &Packing::inputs(cell, dims)),
            params: unpack::<R, F>(&params, &Packing::params(cell, dims)),
            states: unpack::<R, F>(&states, &state_packing),
            outputs: columns::<R>(&client, batch * heads, &output_packing, size_of::<F>()),
        };
        runner
            .step(dtype, &client, &shape, settings.schedule, &buffers)
            .unwrap_or_else(|error| panic!("fused {} step: {error}", settings.cell.name()));
        (
            pack::<R, F>(
                &client,
                &device,
                &buffers.outputs,
                &output_packing,
                &[batch, 1, heads],
            ),
            pack::<R, F>(
                &client,
                &device,
                &buffers.states,
                &state_packing,
                &[batch, heads],
            ),
        )
    }

    fn linear_scan(
        log_decay: CubeTensor<R>,
        writes: CubeTensor<R>,
        initial: CubeTensor<R>,
        over: SumOver,
    ) -> CubeTensor<R> {
        let [batch, heads, steps, keys, values] = writes.meta.shape().dims::<5>();
        let [_, _, _, decay_keys, decay_values] = log_decay.meta.shape().dims::<5>();
        let [log_decay, writes, initial] = [log_decay, writes, initial].map(into_contiguous);
        let (client, device) = (writes.client.clone(), writes.device.clone());
        let after = dense::<R, F>(&client, &device, writes.meta.shape().clone());
        let elements = batch * heads * keys * values;
        let kernel = if over.reverse() {
            ChunkedKernel::LinearScanReverse
        } else {
            ChunkedKernel::LinearScan
        };
        assert_within_loop_budget::<R>(kernel, walk_passes(elements, steps), || {
            format!("a walk over {steps} steps for each of {elements} state elements")
        });
        let (cubes, units) = grid(elements);
        linear_scan_kernel::launch::<F, R>(
            &client,
            cubes,
            units,
            whole(&log_decay),
            whole(&writes),
            whole(&initial),
            whole(&after),
            steps as u32,
            keys as u32,
            values as u32,
            decay_keys as u32,
            decay_values as u32,
            over.reverse(),
            over.exclusive(),
        );
        after
    }

    fn running_sum(x: CubeTensor<R>, over: SumOver) -> CubeTensor<R> {
        let [lines, steps, across] = x.meta.shape().dims::<3>();
        let x = into_contiguous(x);
        let (client, device) = (x.client.clone(), x.device.clone());
        let sums = dense::<R, F>(&client, &device, x.meta.shape().clone());
        let walks = lines * across;
        let passes = walk_passes(walks, steps);
        assert_within_loop_budget::<R>(ChunkedKernel::RunningSum, passes, || {
            format!("{walks} walks over {steps} steps")
        });
        let (cubes, units) = grid(walks);
        running_sum_kernel::launch::<F, R>(
            &client,
            cubes,
            units,
            whole(&x),
            whole(&sums),
            steps as u32,
            across as u32,
            over.reverse(),
            over.exclusive(),
        );
        sums
    }

    fn block_scores(
        form: BlockScores,
        query: CubeTensor<R>,
        key: CubeTensor<R>,
        factors: CubeTensor<R>,
    ) -> CubeTensor<R> {
        let [blocks, steps, keys] = query.meta.shape().dims::<3>();
        let [query, key, factors] = [query, key, factors].map(into_contiguous);
        let (client, device) = (query.client.clone(), query.device.clone());
        let scores = dense::<R, F>(&client, &device, Shape::new([blocks, steps, steps]));
        assert_scores_within_loop_budget::<R>(form, false, blocks, steps, keys);
        let [query, key, factors, scores_arg] = [&query, &key, &factors, &scores].map(whole);
        let (cubes, blocks, keys) = (one_cube_per_block(blocks), blocks as u32, keys as u32);
        match form {
            BlockScores::WithinSubChunk => decayed_scores_kernel::launch::<F, R>(
                &client,
                cubes,
                block_scores_units(form, steps),
                query,
                key,
                factors,
                scores_arg,
                blocks,
                keys,
                steps,
                score_lanes(steps),
            ),
            BlockScores::AcrossSubChunks { sub_chunk } => {
                scores_across_sub_chunks_kernel::launch::<F, R>(
                    &client,
                    cubes,
                    block_scores_units(form, steps),
                    query,
                    key,
                    factors,
                    scores_arg,
                    blocks,
                    keys,
                    steps,
                    sub_chunk,
                )
            }
        }
        scores
    }

    fn block_scores_backward(
        form: BlockScores,
        query: CubeTensor<R>,
        key: CubeTensor<R>,
        factors: CubeTensor<R>,
        grad: CubeTensor<R>,
    ) -> [CubeTensor<R>; 3] {
        let [blocks, steps, keys] = query.meta.shape().dims::<3>();
        let operands = [query, key, factors, grad].map(into_contiguous);
        let (client, device) = (operands[0].client.clone(), operands[0].device.clone());
        let gradients = [&operands[0], &operands[1], &operands[2]]
            .map(|operand| dense::<R, F>(&client, &device, operand.meta.shape().clone()));
        assert_scores_within_loop_budget::<R>(form, true, blocks, steps, keys);
        let [query, key, factors, grad] = operands.each_ref().map(whole);
        let [grad_query, grad_key, grad_factors] = gradients.each_ref().map(whole);
        let (cubes, units) = (
            one_cube_per_block(blocks),
            block_scores_backward_units(keys),
        );
        let (blocks, keys) = (blocks as u32, keys as u32);
        match form {
            BlockScores::WithinSubChunk => decayed_scores_backward_kernel::launch::<F, R>(
                &client,
                cubes,
                units,
                query,
                key,
                factors,
                grad,
                grad_query,
                grad_key,
                grad_factors,
                blocks,
                keys,
                steps,
            ),
            BlockScores::AcrossSubChunks { sub_chunk } => {
                scores_across_sub_chunks_backward_kernel::launch::<F, R>(
                    &client,
                    cubes,
                    units,
                    query,
                    key,
                    factors,
                    grad,
                    grad_query,
                    grad_key,
                    grad_factors,
                    blocks,
                    keys,
                    steps,
                    sub_chunk,
                )
            }
        }
        gradients
    }

    fn fused_cell_backward(
        inputs: CubeTensor<R>,
        params: CubeTensor<R>,
        checkpoints: CubeTensor<R>,
        grad_outputs: CubeTensor<R>,
        settings: &FusedSettings,
    ) -> FusedGradients<Self> {
        let (runner, shape, dtype) = scan_of::<R, F>(&inputs, settings);
        let (cell, dims) = (&runner.compiled().cell, &settings.dims);
        let (batch, time, heads) = (shape.batch, shape.time, shape.heads);
        let (client, device) = (inputs.client.clone(), inputs.device.clone());
        let (input_packing, param_packing, states) = (
            Packing::inputs(cell, dims),
            Packing::params(cell, dims),
            Packing::states(cell, dims),
        );
        let bytes = size_of::<F>();
        let grad_final_states = states
            .slots
            .iter()
            .map(|&(_, width)| DeviceArray::zeros(&client, batch * heads * width, bytes))
            .collect();
        let buffers = BackwardBuffers {
            inputs: unpack::<R, F>(&inputs, &input_packing),
            params: unpack::<R, F>(&params, &param_packing),
            checkpoints: unpack::<R, f32>(&checkpoints, &states),
            grad_outputs: unpack::<R, F>(&grad_outputs, &Packing::outputs(cell, dims)),
            grad_final_states,
            grad_inputs: columns::<R>(&client, batch * time * heads, &input_packing, bytes),
            grad_params: columns::<R>(&client, heads, &param_packing, bytes),
            grad_initial_states: columns::<R>(&client, batch * heads, &states, bytes),
        };
        runner
            .backward(dtype, &client, &shape, settings.schedule, &buffers)
            .unwrap_or_else(|error| panic!("fused {} backward: {error}", settings.cell.name()));
        let pack_f = |arrays: &[DeviceArray], packing: &Packing, leading: &[usize]| {
            pack::<R, F>(&client, &device, arrays, packing, leading)
        };
        FusedGradients {
            inputs: pack_f(&buffers.grad_inputs, &input_packing, &[batch, time, heads]),
            params: pack_f(&buffers.grad_params, &param_packing, &[heads]),
            initial_states: pack_f(&buffers.grad_initial_states, &states, &[batch, heads]),
        }
    }
}

/// The kernels of the cell of `settings`, the shape of a scan over packed inputs
/// `[B, T, H, _]`, and the kernels' element type for burn's `F`.
fn scan_of<R: CubeRuntime + ScanRuntime, F: FloatElement>(
    inputs: &CubeTensor<R>,
    settings: &FusedSettings,
) -> (Box<dyn ScanKernels<R>>, ScanShape, Dtype) {
    let [batch, time, heads, _] = inputs.meta.shape().dims::<4>();
    let shape = ScanShape {
        batch,
        time,
        heads,
        dims: settings.dims.clone(),
    };
    let dtype = Dtype::from_burn(F::dtype()).unwrap_or_else(|| {
        panic!(
            "fused {}: the kernels take f32, f16 or bf16 tensors, not {:?}",
            settings.cell.name(),
            F::dtype()
        )
    });
    (settings.cell.kernels::<R>(), shape, dtype)
}

/// One new array per slot of `packing`, `rows` rows each, of elements of `bytes`.
fn columns<R: CubeRuntime>(
    client: &ComputeClient<R>,
    rows: usize,
    packing: &Packing,
    bytes: usize,
) -> Vec<DeviceArray> {
    packing
        .slots
        .iter()
        .map(|&(_, width)| {
            let len = rows * width;
            DeviceArray::new(client.empty((len * bytes).max(4)), len)
        })
        .collect()
}

/// Cubes and units for a grid-stride loop over `len` elements (at most [`MAX_CUBES`]).
fn grid(len: usize) -> (CubeCount, CubeDim) {
    let cubes = grid_cubes(len) as u32;
    (CubeCount::Static(cubes, 1, 1), CubeDim::new_1d(GRID_UNITS))
}

/// The cubes of [`grid`] over `len` elements.
fn grid_cubes(len: usize) -> usize {
    len.div_ceil(GRID_UNITS as usize).clamp(1, MAX_CUBES)
}

/// Cubes per launch along the one grid dimension the kernels here use: wgpu's limit.
const MAX_CUBES: usize = 65_535;

/// Units per cube of a grid-stride loop.
const GRID_UNITS: u32 = 256;

/// Units per cube of the scores' kernels over blocks of `steps` steps:
/// [`decayed_scores_kernel`](fn@decayed_scores_kernel) has [`score_lanes`] per step,
/// [`scores_across_sub_chunks_kernel`](fn@scores_across_sub_chunks_kernel) one per pair of
/// steps of two sub-chunks.
fn block_scores_units(form: BlockScores, steps: usize) -> CubeDim {
    match form {
        BlockScores::WithinSubChunk => CubeDim::new_1d((steps * score_lanes(steps)) as u32),
        BlockScores::AcrossSubChunks { sub_chunk } => {
            CubeDim::new_1d((sub_chunk * sub_chunk) as u32)
        }
    }
}

/// The units of [`decayed_scores_kernel`](fn@decayed_scores_kernel) that share the keys of one
/// step of a sub-chunk of `steps` steps: 16, or as many as the steps (its last phase takes one
/// unit per pair).
fn score_lanes(steps: usize) -> usize {
    steps.max(16)
}

/// Keys staged in shared memory at a time by
/// [`scores_across_sub_chunks_kernel`](fn@scores_across_sub_chunks_kernel).
const KEY_TILE: usize = 32;

/// Units per cube of the scores' backward kernels: one per key, at most 256 (which loop over
/// the rest).
fn block_scores_backward_units(keys: usize) -> CubeDim {
    CubeDim::new_1d(keys.clamp(1, 256) as u32)
}

/// A contiguous tensor as a kernel's array argument.
fn whole<R: CubeRuntime>(tensor: &CubeTensor<R>) -> ArrayArg<R> {
    let len = tensor.meta.shape().num_elements();
    unsafe { ArrayArg::from_raw_parts(tensor.handle.clone(), len) }
}

/// One cube per block of `blocks` (cubes past [`MAX_CUBES`] loop over the rest).
fn one_cube_per_block(blocks: usize) -> CubeCount {
    CubeCount::Static(blocks.clamp(1, MAX_CUBES) as u32, 1, 1)
}

/// Panics, on wgpu, where one unit of the chunked path's `kernel` would make more loop passes
/// (`passes`, over all its loops) than Mesa's software Vulkan driver allows one invocation
/// ([`LOOP_BUDGET`]): past it the driver ends every loop after one more pass, silently, and
/// the results would be wrong. These kernels' loop passes follow from their sizes alone (the
/// functions below count them), so the check is made before the launch and costs the device
/// nothing; `extent` says what the passes come from. (The generated scan kernels, whose
/// loops a cell's sums shape, check themselves: `rak_runtime::kernels`.)
fn assert_within_loop_budget<R: Runtime>(
    kernel: ChunkedKernel,
    passes: usize,
    extent: impl FnOnce() -> String,
) {
    if passes <= LOOP_BUDGET || !checks_loop_budget::<R>() {
        return;
    }
    let remedy = match kernel {
        ChunkedKernel::LinearScan | ChunkedKernel::LinearScanReverse => {
            "longer chunks (`model.chunk` in the configs: the walk is over the chunks)"
        }
        ChunkedKernel::RunningSum => {
            "shorter sums (the chunked path's run along a chunk: `model.chunk` in the configs)"
        }
        _ => "fewer keys, a smaller batch or shorter sequences",
    };
    panic!(
        "the chunked path's {} kernel would make {passes} loop passes in one invocation ({}), \
         past the 65,535 that Mesa's software Vulkan driver allows (over all its loops), which \
         cuts the loops short: its results would be wrong. Use {remedy}, or a GPU",
        kernel.name(),
        extent()
    );
}

/// [`assert_within_loop_budget`] for the scores' kernel of `form`, or its backward, over
/// `blocks` blocks of `steps` steps and `keys` keys.
fn assert_scores_within_loop_budget<R: Runtime>(
    form: BlockScores,
    backward: bool,
    blocks: usize,
    steps: usize,
    keys: usize,
) {
    let passes = if backward {
        block_scores_backward_passes(form, blocks, steps, keys)
    } else {
        block_scores_passes(form, blocks, steps, keys)
    };
    let kernel = match (form, backward) {
        (BlockScores::WithinSubChunk, false) => ChunkedKernel::DecayedScores,
        (BlockScores::WithinSubChunk, true) => ChunkedKernel::DecayedScoresBackward,
        (BlockScores::AcrossSubChunks { .. }, false) => ChunkedKernel::ScoresAcrossSubChunks,
        (BlockScores::AcrossSubChunks { .. }, true) => ChunkedKernel::ScoresAcrossSubChunksBackward,
    };
    assert_within_loop_budget::<R>(kernel, passes, || {
        format!("{blocks} blocks of {steps} steps, {keys} keys")
    });
}

// The loop passes of one unit of each of the chunked path's kernels, over all its loops: each
// function follows its kernel's loops (those that cubecl unrolls, `#[unroll]`, do not count; a
// loop over a comptime range without it does, though Mesa may unroll it), at the unit that
// makes the most passes. A loop costs its iterations and one pass more, which finds it done,
// and one more again where its body holds loops ([`loop_passes`]): a rule that fits every
// boundary measured with the check off on Mesa 22.3's lavapipe (`linear_scan` and
// `running_sum` right to 65,535 steps; `decayed_scores_backward_kernel` right to 3,640 keys
// per unit and wrong from 3,641, 18 passes a key; `scores_across_sub_chunks_backward_kernel`,
// 43 a key at 4 sub-chunks and 129 at 8, where counting the loops' iterations alone gave 31
// and 109), read from its behaviour, not from its source.

/// Passes of a loop of `iterations` iterations whose body's loops make `nested` passes in each
/// (`None`: a body without loops; `Some(0)`: one whose loops are counted apart): the
/// iterations, the pass that finds the loop done, and one more where the body holds loops.
fn loop_passes(iterations: usize, nested: Option<usize>) -> usize {
    match nested {
        None => iterations + 1,
        Some(nested) => iterations * (1 + nested) + 2,
    }
}

/// Iterations of a grid-stride loop over `len` elements on the grid of [`grid`].
fn grid_passes(len: usize) -> usize {
    len.div_ceil(grid_cubes(len) * GRID_UNITS as usize)
}

/// Iterations of the loop over `blocks` blocks of [`one_cube_per_block`].
fn block_passes(blocks: usize) -> usize {
    blocks.div_ceil(blocks.clamp(1, MAX_CUBES))
}

/// [`linear_scan_kernel`](fn@linear_scan_kernel) and
/// [`running_sum_kernel`](fn@running_sum_kernel): a grid-stride loop over `walks` walks, each
/// iteration of which walks `steps` steps.
fn walk_passes(walks: usize, steps: usize) -> usize {
    loop_passes(grid_passes(walks), Some(loop_passes(steps, None)))
}

/// The scores' kernel of `form` over `blocks` blocks of `steps` steps and `keys` keys.
fn block_scores_passes(form: BlockScores, blocks: usize, steps: usize, keys: usize) -> usize {
    let per_block = match form {
        // The keys split among the lanes, then the sum over the lanes.
        BlockScores::WithinSubChunk => {
            let lanes = score_lanes(steps);
            loop_passes(keys.div_ceil(lanes), None) + loop_passes(lanes, None)
        }
        // The reading sub-chunks, each with its loop over the writing ones; the pairs that
        // score walk the tiles of keys, each staged by the cube and then summed over.
        BlockScores::AcrossSubChunks { sub_chunk } => {
            let subs = steps / sub_chunk;
            let units = block_scores_units(form, steps).num_elems() as usize;
            let scoring = subs * subs.saturating_sub(1) / 2;
            let per_tile = loop_passes((sub_chunk * KEY_TILE).div_ceil(units), None)
                + loop_passes(KEY_TILE, None);
            let tiles = loop_passes(keys.div_ceil(KEY_TILE), Some(per_tile));
            loop_passes(subs, Some(loop_passes(subs, Some(0)))) + scoring * tiles
        }
    };
    loop_passes(block_passes(blocks), Some(per_block))
}

/// The scores' backward kernel of `form` over `blocks` blocks of `steps` steps and `keys` keys.
fn block_scores_backward_passes(
    form: BlockScores,
    blocks: usize,
    steps: usize,
    keys: usize,
) -> usize {
    let units = block_scores_backward_units(keys).num_elems() as usize;
    // The passes before the loop over the keys, and those of each key.
    let (before_keys, per_key) = match form {
        // The shared gradient block; per key, the walk over s.
        BlockScores::WithinSubChunk => (
            loop_passes((steps * steps).div_ceil(units), None),
            loop_passes(steps, None),
        ),
        // Per key: the reading sub-chunks and the writing ones of each, then the writing ones
        // and the later reading ones of each (subs − 1 − J of writing sub-chunk J).
        BlockScores::AcrossSubChunks { sub_chunk } => {
            let subs = steps / sub_chunk;
            let later_readers: usize = (0..subs)
                .map(|writer| loop_passes(subs - 1 - writer, None))
                .sum();
            let per_key = loop_passes(subs, Some(loop_passes(subs, None)))
                + loop_passes(subs, Some(0))
                + later_readers;
            (0, per_key)
        }
    };
    let per_block = before_keys + loop_passes(keys.div_ceil(units), Some(per_key));
    loop_passes(block_passes(blocks), Some(per_block))
}

/// The columns of each slot of a packed tensor (rows × `packing.width`), as arrays.
fn unpack<R: CubeRuntime, E: Float + CubeElement>(
    tensor: &CubeTensor<R>,
    packing: &Packing,
) -> Vec<DeviceArray> {
    let tensor = into_contiguous(tensor.clone());
    let total = tensor.meta.shape().num_elements();
    let rows = total / packing.width.max(1);
    let client = &tensor.client;
    let arrays = columns::<R>(client, rows, packing, size_of::<E>());
    for (array, &(offset, width)) in arrays.iter().zip(&packing.slots) {
        let (cubes, units) = grid(array.len);
        copy_columns::launch::<E, R>(
            client,
            cubes,
            units,
            unsafe { ArrayArg::from_raw_parts(tensor.handle.clone(), total) },
            unsafe { ArrayArg::from_raw_parts(array.handle.clone(), array.len) },
            packing.width as u32,
            offset as u32,
            width as u32,
            true,
        );
    }
    arrays
}

/// An uninitialised tensor of `shape` laid out densely, row after row, as the kernels here
/// write it. (burn's `empty_device` lets the runtime pad rows: CUDA's allocator pitches a row
/// whose byte length is not a multiple of its alignment, e.g. 6 f32, and a kernel writing
/// `shape.num_elements()` values one after the other would then not write what the strides
/// say.)
fn dense<R: CubeRuntime, E: burn_cubecl::CubeElement>(
    client: &ComputeClient<R>,
    device: &R::Device,
    shape: Shape,
) -> CubeTensor<R> {
    empty_device_contiguous_dtype(client.clone(), device.clone(), shape, E::dtype())
}

/// A packed tensor of shape `leading × packing.width` from one array per slot.
fn pack<R: CubeRuntime, E: Float + CubeElement + burn_cubecl::CubeElement>(
    client: &ComputeClient<R>,
    device: &R::Device,
    arrays: &[DeviceArray],
    packing: &Packing,
    leading: &[usize],
) -> CubeTensor<R> {
    let mut dims = leading.to_vec();
    dims.push(packing.width);
    let tensor = dense::<R, E>(client, device, Shape::from(dims));
    let total = tensor.meta.shape().num_elements();
    let packed = DeviceArray::new(tensor.handle.clone(), total);
    pack_into::<R, E>(client, arrays, packing, &packed);
    tensor
}

/// Writes every column of the packed `[rows, packing.width]` array `packed`: each slot's from
/// its array, and the columns no slot covers (a parameterless cell's unused column, whose
/// gradient this may be) with zeros, whatever `packed` held before (a fresh allocation holds
/// what its memory last held).
fn pack_into<R: CubeRuntime, E: Float + CubeElement>(
    client: &ComputeClient<R>,
    arrays: &[DeviceArray],
    packing: &Packing,
    packed: &DeviceArray,
) {
    let uncovered = packing.uncovered().map(|(offset, width)| {
        let rows = packed.len / packing.width;
        let zeros = DeviceArray::zeros(client, rows * width, size_of::<E>());
        (zeros, (offset, width))
    });
    let slots = arrays.iter().zip(packing.slots.iter().copied());
    let uncovered_slot = uncovered.iter().map(|(zeros, slot)| (zeros, *slot));
    for (array, (offset, width)) in slots.chain(uncovered_slot) {
        let (cubes, units) = grid(array.len);
        copy_columns::launch::<E, R>(
            client,
            cubes,
            units,
            unsafe { ArrayArg::from_raw_parts(array.handle.clone(), array.len) },
            unsafe { ArrayArg::from_raw_parts(packed.handle.clone(), packed.len) },
            packing.width as u32,
            offset as u32,
            width as u32,
            false,
        );
    }
}

/// Copies between a packed `[rows, packed_width]` array and the `[rows, width]` array of one
/// slot at `offset`: `from_packed` unpacks (`a` packed, `b` the slot), else packs (`a` the slot,
/// `b` packed). Grid-stride loop over the slot's elements.
#[cube(launch)]
fn copy_columns<E: Float>(
    a: &Array<E>,
    b: &mut Array<E>,
    packed_width: u32,
    offset: u32,
    width: u32,
    #[comptime] from_packed: bool,
) {
    let (packed_width, offset, width) = (packed_width as usize, offset as usize, width as usize);
    let stride = CUBE_COUNT * CUBE_DIM as usize;
    let len = if comptime![from_packed] {
        b.len()
    } else {
        a.len()
    };
    let mut e = ABSOLUTE_POS;
    while e < len {
        let packed = (e / width) * packed_width + offset + e % width;
        if comptime![from_packed] {
            b[e] = a[packed];
        } else {
            b[packed] = a[e];
        }
        e += stride;
    }
}

/// [`super::linear_scan`]: `after_n = exp(log_decay_n) ⊙ after_{n−1} + writes_n` for `steps`
/// steps, in reverse when `reverse` (from `initial` after the last step), writing each step's
/// state after its update, or before it when `exclusive`. One unit per state
/// element (grid-stride loop over `initial`'s elements) walks the steps with the state in a
/// register, in f32; neighbouring units read neighbouring values, so every step's loads and
/// stores are coalesced. The state is `keys × values`; `decay_keys` and `decay_values` are each
/// 1 or the state's size along that axis.
#[cube(launch)]
fn linear_scan_kernel<E: Float>(
    log_decay: &Array<E>,
    writes: &Array<E>,
    initial: &Array<E>,
    after: &mut Array<E>,
    steps: u32,
    keys: u32,
    values: u32,
    decay_keys: u32,
    decay_values: u32,
    #[comptime] reverse: bool,
    #[comptime] exclusive: bool,
) {
    let steps = steps as usize;
    let (keys, values) = (keys as usize, values as usize);
    let (decay_keys, decay_values) = (decay_keys as usize, decay_values as usize);
    let (state, decay_state) = (keys * values, decay_keys * decay_values);
    let stride = CUBE_COUNT * CUBE_DIM as usize;
    let mut e = ABSOLUTE_POS;
    while e < initial.len() {
        let (sequence, within) = (e / state, e % state);
        // The decay of this element: its key's, its value's, or the state's one.
        let key = (within / values) % decay_keys;
        let value = (within % values) % decay_values;
        let decay_at = sequence * steps * decay_state + key * decay_values + value;
        let mut carried = f32::cast_from(initial[e]);
        for i in 0..steps {
            let n = if comptime![reverse] { steps - 1 - i } else { i };
            let decay = f32::cast_from(log_decay[decay_at + n * decay_state]).exp();
            let at = (sequence * steps + n) * state + within;
            if comptime![exclusive] {
                after[at] = E::cast_from(carried);
            }
            carried = decay * carried + f32::cast_from(writes[at]);
            if !comptime![exclusive] {
                after[at] = E::cast_from(carried);
            }
        }
        e += stride;
    }
}

/// [`super::running_sum`] along axis 1 of `x` `[lines, steps, across]`: one unit per line
/// and position across (grid-stride loop) walks the steps, from the last when `reverse`,
/// with the sum in a register in f32, and writes it after adding its step's value, or before
/// when `exclusive`. Neighbouring units read neighbouring values when `across` > 1.
#[cube(launch)]
fn running_sum_kernel<E: Float>(
    x: &Array<E>,
    sums: &mut Array<E>,
    steps: u32,
    across: u32,
    #[comptime] reverse: bool,
    #[comptime] exclusive: bool,
) {
    let (steps, across) = (steps as usize, across as usize);
    let stride = CUBE_COUNT * CUBE_DIM as usize;
    let walks = x.len() / steps;
    let mut e = ABSOLUTE_POS;
    while e < walks {
        let (line, position) = (e / across, e % across);
        let mut sum = 0.0f32;
        for i in 0..steps {
            let n = if comptime![reverse] { steps - 1 - i } else { i };
            let at = (line * steps + n) * across + position;
            if comptime![exclusive] {
                sums[at] = E::cast_from(sum);
                sum += f32::cast_from(x[at]);
            } else {
                sum += f32::cast_from(x[at]);
                sums[at] = E::cast_from(sum);
            }
        }
        e += stride;
    }
}

/// [`super::decayed_scores`]: one cube per sub-chunk `m` of `steps` steps (looping over the
/// sub-chunks past the grid), `lanes` units per step s (`lanes` from [`score_lanes`]), which
/// split the keys among them: neighbouring units read neighbouring keys. For each of its keys
/// i a unit walks the steps t ≥ s with the exponent built up one step at a time (the sum over
/// s < u ≤ t, in that order) and adds `q_t · k_s · e^{…}` to its partial score of the pair;
/// then one unit per pair sums the lanes' partial scores, through shared memory.
#[cube(launch)]
fn decayed_scores_kernel<E: Float>(
    query: &Array<E>,
    key: &Array<E>,
    log_decay: &Array<E>,
    scores: &mut Array<E>,
    blocks: u32,
    keys: u32,
    #[comptime] steps: usize,
    #[comptime] lanes: usize,
) {
    let (blocks, keys) = (blocks as usize, keys as usize);
    let unit = UNIT_POS as usize;
    let (s, lane) = (unit / lanes, unit % lanes);
    // The partial score of each pair (t, s) and lane, a row of lanes + 1 per pair (no two
    // pairs' rows start in the same bank).
    let row = comptime![lanes + 1];
    let mut partial = SharedMemory::<f32>::new(comptime![steps * steps * (lanes + 1)]);
    let mut m = CUBE_POS;
    while m < blocks {
        let base = m * steps * keys;
        // Unrolled over the steps, so that the partial scores stay in registers.
        let mut sums = Array::<f32>::new(steps);
        #[unroll]
        for t in 0..steps {
            sums[t] = 0f32;
        }
        let mut i = lane;
        while i < keys {
            let k = f32::cast_from(key[base + s * keys + i]);
            let mut exponent = 0f32;
            #[unroll]
            for t in 0..steps {
                if t >= s {
                    if t > s {
                        exponent += f32::cast_from(log_decay[base + t * keys + i]);
                    }
                    let q = f32::cast_from(query[base + t * keys + i]);
                    sums[t] += q * k * exponent.exp();
                }
            }
            i += lanes;
        }
        #[unroll]
        for t in 0..steps {
            partial[(t * steps + s) * row + lane] = sums[t];
        }
        sync_cube();
        // Unit `t · steps + s` sums the pair (t, s) (0 for s > t: no lane walked it).
        if unit < steps * steps {
            let mut score = 0f32;
            for l in 0..lanes {
                score += partial[unit * row + l];
            }
            scores[m * steps * steps + unit] = E::cast_from(score);
        }
        // The next sub-chunk overwrites the partial scores.
        sync_cube();
        m += CUBE_COUNT;
    }
}

/// The gradients of [`decayed_scores_kernel`](fn@decayed_scores_kernel)'s operands from the scores'
/// gradient `grad`: one cube per sub-chunk, which first shares `grad`'s `[steps, steps]` block,
/// then one unit per key i (looping over the keys past the cube) reads its key's queries and log
/// decays of the sub-chunk once and walks the pairs: for each s, the steps t ≥ s with the exponent
/// built up one step at a time, giving ∂q_t and ∂k_s; the log decay of step u takes the pair's
/// contribution `grad · q_t · k_s · e^{…}` of every pair with s < u ≤ t, by suffix sums over t. The
/// walks over t are unrolled, so that the per-step values and sums stay in registers.
#[cube(launch)]
fn decayed_scores_backward_kernel<E: Float>(
    query: &Array<E>,
    key: &Array<E>,
    log_decay: &Array<E>,
    grad: &Array<E>,
    grad_query: &mut Array<E>,
    grad_key: &mut Array<E>,
    grad_log_decay: &mut Array<E>,
    blocks: u32,
    keys: u32,
    #[comptime] steps: usize,
) {
    let (blocks, keys) = (blocks as usize, keys as usize);
    let units = CUBE_DIM as usize;
    let mut tile = SharedMemory::<f32>::new(comptime![steps * steps]);
    let mut m = CUBE_POS;
    while m < blocks {
        let mut e = UNIT_POS as usize;
        while e < steps * steps {
            tile[e] = f32::cast_from(grad[m * steps * steps + e]);
            e += units;
        }
        sync_cube();
        let base = m * steps * keys;
        let mut i = UNIT_POS as usize;
        while i < keys {
            let mut q = Array::<f32>::new(steps);
            let mut x = Array::<f32>::new(steps);
            let mut grad_q = Array::<f32>::new(steps);
            let mut grad_x = Array::<f32>::new(steps);
            let mut contribution = Array::<f32>::new(steps);
            #[unroll]
            for t in 0..steps {
                q[t] = f32::cast_from(query[base + t * keys + i]);
                x[t] = f32::cast_from(log_decay[base + t * keys + i]);
                grad_q[t] = 0f32;
                grad_x[t] = 0f32;
            }
            for s in 0..steps {
                let k = f32::cast_from(key[base + s * keys + i]);
                let mut exponent = 0f32;
                let mut grad_k = 0f32;
                #[unroll]
                for t in 0..steps {
                    contribution[t] = 0f32;
                    if t >= s {
                        if t > s {
                            exponent += x[t];
                        }
                        let decayed = tile[t * steps + s] * exponent.exp();
                        grad_q[t] += decayed * k;
                        grad_k += decayed * q[t];
                        contribution[t] = decayed * q[t] * k;
                    }
                }
                grad_key[base + s * keys + i] = E::cast_from(grad_k);
                // Suffix sums from the last step down to s + 1 (the terms before s are 0).
                let mut suffix = 0f32;
                #[unroll]
                for j in 0..steps - 1 {
                    let u = steps - 1 - j;
                    suffix += contribution[u];
                    if u > s {
                        grad_x[u] += suffix;
                    }
                }
            }
            #[unroll]
            for t in 0..steps {
                grad_query[base + t * keys + i] = E::cast_from(grad_q[t]);
                grad_log_decay[base + t * keys + i] = E::cast_from(grad_x[t]);
            }
            i += units;
        }
        // The next sub-chunk overwrites the shared block.
        sync_cube();
        m += CUBE_COUNT;
    }
}

/// [`super::scores_across_sub_chunks`]: one cube per chunk `m` of `steps` steps (looping over
/// the chunks past the grid), one unit per pair of steps of two sub-chunks, which takes the
/// pairs of sub-chunks (I, J) in turn: for J earlier than I, the pair (t, s) of t in I and s
/// in J sums `q_t · (g_IJ · k_s)` over the keys, which the cube stages in shared memory
/// [`KEY_TILE`] at a time (read by neighbouring units at neighbouring keys); any other pair
/// scores 0.
#[cube(launch)]
fn scores_across_sub_chunks_kernel<E: Float>(
    query: &Array<E>,
    key: &Array<E>,
    gates: &Array<E>,
    scores: &mut Array<E>,
    blocks: u32,
    keys: u32,
    #[comptime] steps: usize,
    #[comptime] sub_chunk: usize,
) {
    let (blocks, keys) = (blocks as usize, keys as usize);
    let subs = comptime![steps / sub_chunk];
    let (tile, row) = (comptime![KEY_TILE], comptime![KEY_TILE + 1]);
    let units = comptime![sub_chunk * sub_chunk];
    let unit = UNIT_POS as usize;
    let (t_in, s_in) = (unit / sub_chunk, unit % sub_chunk);
    // One tile of keys of the reading sub-chunk's queries, then of the writing sub-chunk's
    // gated keys (from `gated` on), a row of `tile + 1` per step (no two steps' rows start in
    // the same bank). One shared array, not two of one size: cubecl lays out arrays of equal
    // size in no fixed order, and the printed kernels are compared with snapshots.
    let gated = comptime![sub_chunk * (KEY_TILE + 1)];
    let mut staged = SharedMemory::<f32>::new(comptime![2 * sub_chunk * (KEY_TILE + 1)]);
    let mut m = CUBE_POS;
    while m < blocks {
        let base = m * steps * keys;
        for reader in 0..subs {
            for writer in 0..subs {
                let (t, s) = (reader * sub_chunk + t_in, writer * sub_chunk + s_in);
                let mut score = 0f32;
                if writer < reader {
                    let gate_at = ((m * subs + reader) * subs + writer) * keys;
                    let mut first = 0usize;
                    while first < keys {
                        let mut e = unit;
                        while e < sub_chunk * tile {
                            let (step, column) = (e / tile, e % tile);
                            let i = first + column;
                            let mut q = 0f32;
                            let mut k = 0f32;
                            if i < keys {
                                q = f32::cast_from(
                                    query[base + (reader * sub_chunk + step) * keys + i],
                                );
                                k = f32::cast_from(gates[gate_at + i])
                                    * f32::cast_from(
                                        key[base + (writer * sub_chunk + step) * keys + i],
                                    );
                            }
                            staged[step * row + column] = q;
                            staged[gated + step * row + column] = k;
                            e += units;
                        }
                        sync_cube();
                        for column in 0..tile {
                            score +=
                                staged[t_in * row + column] * staged[gated + s_in * row + column];
                        }
                        // The next tile overwrites these.
                        sync_cube();
                        first += tile;
                    }
                }
                scores[(m * steps + t) * steps + s] = E::cast_from(score);
            }
        }
        m += CUBE_COUNT;
    }
}

/// The gradients of [`scores_across_sub_chunks_kernel`](fn@scores_across_sub_chunks_kernel)'s
/// operands from the scores' gradient `grad`: one cube per chunk, one unit per key i (looping over
/// the keys past the cube), all reading the same gradient at a time. With `G_ts` the gradient of
/// the score of the pair (t, s), for t in sub-chunk I and s in an earlier sub-chunk J:
/// `∂q_t = Σ_J g_IJ Σ_s G_ts k_s` and `∂g_IJ = Σ_t q_t Σ_s G_ts k_s`, walked reading sub-chunk
/// after reading sub-chunk; then `∂k_s = Σ_I g_IJ Σ_t G_ts q_t`, walked writing sub-chunk
/// after writing sub-chunk. The gates of pairs J ≥ I get 0. Within a pair of sub-chunks the
/// walks are unrolled over their steps, so that the unit's queries, keys and sums of two
/// sub-chunks stay in registers.
#[cube(launch)]
fn scores_across_sub_chunks_backward_kernel<E: Float>(
    query: &Array<E>,
    key: &Array<E>,
    gates: &Array<E>,
    grad: &Array<E>,
    grad_query: &mut Array<E>,
    grad_key: &mut Array<E>,
    grad_gates: &mut Array<E>,
    blocks: u32,
    keys: u32,
    #[comptime] steps: usize,
    #[comptime] sub_chunk: usize,
) {
    let (blocks, keys) = (blocks as usize, keys as usize);
    let subs = comptime![steps / sub_chunk];
    let units = CUBE_DIM as usize;
    let mut m = CUBE_POS;
    while m < blocks {
        let base = m * steps * keys;
        let mut i = UNIT_POS as usize;
        while i < keys {
            // One sub-chunk's values of key i: the reading one's queries and their gradients,
            // or the writing one's keys and theirs.
            let mut own = Array::<f32>::new(sub_chunk);
            let mut sums = Array::<f32>::new(sub_chunk);
            let mut other = Array::<f32>::new(sub_chunk);
            for reader in 0..subs {
                let first_t = reader * sub_chunk;
                #[unroll]
                for t in 0..sub_chunk {
                    own[t] = f32::cast_from(query[base + (first_t + t) * keys + i]);
                    sums[t] = 0f32;
                }
                for writer in 0..subs {
                    let gate_at = ((m * subs + reader) * subs + writer) * keys + i;
                    let mut grad_gate = 0f32;
                    if writer < reader {
                        let gate = f32::cast_from(gates[gate_at]);
                        let first_s = writer * sub_chunk;
                        #[unroll]
                        for s in 0..sub_chunk {
                            other[s] = f32::cast_from(key[base + (first_s + s) * keys + i]);
                        }
                        #[unroll]
                        for t in 0..sub_chunk {
                            // Σ_s G_ts k_s over the writing sub-chunk.
                            let row = (m * steps + first_t + t) * steps + first_s;
                            let mut through = 0f32;
                            #[unroll]
                            for s in 0..sub_chunk {
                                through += f32::cast_from(grad[row + s]) * other[s];
                            }
                            sums[t] += through * gate;
                            grad_gate += through * own[t];
                        }
                    }
                    grad_gates[gate_at] = E::cast_from(grad_gate);
                }
                #[unroll]
                for t in 0..sub_chunk {
                    grad_query[base + (first_t + t) * keys + i] = E::cast_from(sums[t]);
                }
            }
            for writer in 0..subs {
                let first_s = writer * sub_chunk;
                #[unroll]
                for s in 0..sub_chunk {
                    sums[s] = 0f32;
                }
                for reader in writer + 1..subs {
                    let gate_at = ((m * subs + reader) * subs + writer) * keys + i;
                    let gate = f32::cast_from(gates[gate_at]);
                    let first_t = reader * sub_chunk;
                    #[unroll]
                    for t in 0..sub_chunk {
                        other[t] = gate * f32::cast_from(query[base + (first_t + t) * keys + i]);
                    }
                    #[unroll]
                    for t in 0..sub_chunk {
                        let row = (m * steps + first_t + t) * steps + first_s;
                        #[unroll]
                        for s in 0..sub_chunk {
                            sums[s] += f32::cast_from(grad[row + s]) * other[t];
                        }
                    }
                }
                #[unroll]
                for s in 0..sub_chunk {
                    grad_key[base + (first_s + s) * keys + i] = E::cast_from(sums[s]);
                }
            }
            i += units;
        }
        m += CUBE_COUNT;
    }
}

/// The chunked path's own kernels (the rest of it is cubecl's matrix products and burn's
/// element-wise operations), for printing their sources: `rak emit`, the snapshot tests and
/// `scripts/cuda-compile.sh`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkedKernel {
    /// `linear_scan_kernel` forward: the recurrence across chunks.
    LinearScan,
    /// `linear_scan_kernel` in reverse: its backward.
    LinearScanReverse,
    /// `running_sum_kernel`, inclusive from the first step (the cumulative log decays).
    RunningSum,
    /// `decayed_scores_kernel`: the scores within a sub-chunk.
    DecayedScores,
    /// `decayed_scores_backward_kernel`.
    DecayedScoresBackward,
    /// `scores_across_sub_chunks_kernel`: the scores between a chunk's sub-chunks.
    ScoresAcrossSubChunks,
    /// `scores_across_sub_chunks_backward_kernel`.
    ScoresAcrossSubChunksBackward,
}

impl ChunkedKernel {
    pub const ALL: [ChunkedKernel; 7] = [
        ChunkedKernel::LinearScan,
        ChunkedKernel::LinearScanReverse,
        ChunkedKernel::RunningSum,
        ChunkedKernel::DecayedScores,
        ChunkedKernel::DecayedScoresBackward,
        ChunkedKernel::ScoresAcrossSubChunks,
        ChunkedKernel::ScoresAcrossSubChunksBackward,
    ];

    /// Its name in `rak emit`, snake case.
    pub fn name(self) -> &'static str {
        match self {
            ChunkedKernel::LinearScan => "linear_scan",
            ChunkedKernel::LinearScanReverse => "linear_scan_reverse",
            ChunkedKernel::RunningSum => "running_sum",
            ChunkedKernel::DecayedScores => "decayed_scores",
            ChunkedKernel::DecayedScoresBackward => "decayed_scores_backward",
            ChunkedKernel::ScoresAcrossSubChunks => "scores_across_sub_chunks",
            ChunkedKernel::ScoresAcrossSubChunksBackward => "scores_across_sub_chunks_backward",
        }
    }

    /// The kernel of that name.
    pub fn find(name: &str) -> Option<ChunkedKernel> {
        Self::ALL.into_iter().find(|kernel| kernel.name() == name)
    }

    /// Units per cube of its launches at `sizes`.
    pub fn units(self, sizes: ChunkedSizes) -> u32 {
        let units = match self {
            ChunkedKernel::LinearScan
            | ChunkedKernel::LinearScanReverse
            | ChunkedKernel::RunningSum => CubeDim::new_1d(GRID_UNITS),
            ChunkedKernel::DecayedScores => {
                block_scores_units(BlockScores::WithinSubChunk, sizes.sub_chunk)
            }
            ChunkedKernel::ScoresAcrossSubChunks => {
                let sub_chunk = sizes.sub_chunk;
                block_scores_units(BlockScores::AcrossSubChunks { sub_chunk }, sizes.chunk)
            }
            ChunkedKernel::DecayedScoresBackward | ChunkedKernel::ScoresAcrossSubChunksBackward => {
                block_scores_backward_units(sizes.keys)
            }
        };
        units.num_elems()
    }
}

/// The sizes the chunked path's kernels are specialised on or launched with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkedSizes {
    /// Steps per chunk (the scores across sub-chunks work on whole chunks).
    pub chunk: usize,
    /// Steps per sub-chunk.
    pub sub_chunk: usize,
    /// Keys (the scores' backward kernels take one unit per key).
    pub keys: usize,
}

/// The CUDA C++ or WGSL source of one of the chunked path's kernels for `dtype` operands,
/// launched as the chunked path launches it at `sizes`. Needs a wgpu adapter (the CPU one will
/// do) to build the kernel definition.
#[cfg(feature = "wgpu")]
pub fn chunked_kernel_source(
    kernel: ChunkedKernel,
    sizes: ChunkedSizes,
    target: crate::kernels::SourceTarget,
    dtype: crate::kernels::Dtype,
) -> Result<String, crate::kernels::KernelError> {
    use crate::kernels::with_element;
    let client = crate::kernels::source_client();
    let definition =
        with_element!(dtype, F => chunked_kernel_definition::<F, _>(&client, kernel, sizes));
    crate::kernels::compile_definition(definition, target).map_err(|error| {
        let name = kernel.name();
        crate::kernels::KernelError(format!("cannot compile the chunked path's {name}: {error}"))
    })
}

/// The definition of `kernel` for `E` operands, with the units per cube its launch takes.
fn chunked_kernel_definition<E: Float + CubeElement, R: Runtime>(
    client: &ComputeClient<R>,
    kernel: ChunkedKernel,
    sizes: ChunkedSizes,
) -> KernelDefinition {
    let ChunkedSizes {
        chunk, sub_chunk, ..
    } = sizes;
    let array = || ArrayCompilationArg { inplace: None };
    let settings = KernelSettings::default().cube_dim(CubeDim::new_1d(kernel.units(sizes)));
    let client = client.clone();
    match kernel {
        ChunkedKernel::LinearScan | ChunkedKernel::LinearScanReverse => {
            linear_scan_kernel::LinearScanKernel::<E, R>::new(
                settings,
                client,
                array(),
                array(),
                array(),
                array(),
                (),
                (),
                (),
                (),
                (),
                kernel == ChunkedKernel::LinearScanReverse,
                false,
            )
            .define()
        }
        ChunkedKernel::RunningSum => running_sum_kernel::RunningSumKernel::<E, R>::new(
            settings,
            client,
            array(),
            array(),
            (),
            (),
            false,
            false,
        )
        .define(),
        ChunkedKernel::DecayedScores => decayed_scores_kernel::DecayedScoresKernel::<E, R>::new(
            settings,
            client,
            array(),
            array(),
            array(),
            array(),
            (),
            (),
            sub_chunk,
            score_lanes(sub_chunk),
        )
        .define(),
        ChunkedKernel::DecayedScoresBackward => {
            decayed_scores_backward_kernel::DecayedScoresBackwardKernel::<E, R>::new(
                settings,
                client,
                array(),
                array(),
                array(),
                array(),
                array(),
                array(),
                array(),
                (),
                (),
                sub_chunk,
            )
            .define()
        }
        ChunkedKernel::ScoresAcrossSubChunks => {
            scores_across_sub_chunks_kernel::ScoresAcrossSubChunksKernel::<E, R>::new(
                settings,
                client,
                array(),
                array(),
                array(),
                array(),
                (),
                (),
                chunk,
                sub_chunk,
            )
            .define()
        }
        ChunkedKernel::ScoresAcrossSubChunksBackward => {
            scores_across_sub_chunks_backward_kernel::ScoresAcrossSubChunksBackwardKernel::<E, R>::new(
                settings,
                client,
                array(),
                array(),
                array(),
                array(),
                array(),
                array(),
                array(),
                (),
                (),
                chunk,
                sub_chunk,
            )
            .define()
        }
    }
}

#[cfg(all(test, feature = "wgpu"))]
mod tests {
    use super::pack_into;
    use crate::cells::Builtin;
    use crate::kernels::{DeviceArray, source_client};
    use crate::packing::Packing;
    use cubecl::prelude::*;

    /// `pack_into` writes every column of a packed array that held other values before (as
    /// reused memory does): the slots' values, and zeros in a parameterless cell's unused
    /// column (its gradient; garbage there would reach the optimizer).
    #[test]
    fn packing_overwrites_every_column_and_zeroes_the_uncovered_ones() {
        let client = source_client();
        let rows = 3;
        for (file, dims) in [("simple_rnn", [4, 5]), ("mamba2", [4, 5])] {
            let builtin = Builtin::find(file).unwrap();
            let cell = rak_codegen::compile_str(builtin.source).unwrap().cell;
            let packing = Packing::params(&cell, &dims);
            let mut expected = vec![0.0f32; rows * packing.width];
            let arrays: Vec<DeviceArray> = (packing.slots.iter().enumerate())
                .map(|(slot, &(offset, width))| {
                    let values: Vec<f32> = (0..rows * width)
                        .map(|e| (slot * 100 + e + 1) as f32)
                        .collect();
                    for (e, &value) in values.iter().enumerate() {
                        expected[e / width * packing.width + offset + e % width] = value;
                    }
                    DeviceArray::new(
                        client.create_from_slice(f32::as_bytes(&values)),
                        values.len(),
                    )
                })
                .collect();
            let stale = vec![7.0f32; rows * packing.width];
            let packed =
                DeviceArray::new(client.create_from_slice(f32::as_bytes(&stale)), stale.len());
            pack_into::<_, f32>(&client, &arrays, &packing, &packed);
            let bytes = client.read_one_unchecked(packed.handle.clone());
            assert_eq!(f32::from_bytes(&bytes), expected.as_slice(), "{file}");
        }
    }
}
