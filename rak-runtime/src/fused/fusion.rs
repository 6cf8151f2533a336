//! The fused cell inside burn's fusion wrapper (the default `Cuda` and `Wgpu` backends): each
//! scan is a custom operation of the fusion stream, which hands its operands to the wrapped
//! backend when the stream reaches it; so are the chunked path's kernels.

use super::{BlockScores, FusedCellBackend, FusedForward, FusedGradients, FusedSettings, SumOver};
use crate::packing::Packing;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Shape};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};
use std::marker::PhantomData;

/// The forward scan as a stream operation: inputs, parameters (and initial states) in;
/// outputs, final states (and checkpoints) out.
#[derive(Debug)]
struct ForwardScan<B> {
    description: CustomOpIr,
    settings: FusedSettings,
    has_initial: bool,
    checkpoints: bool,
    backend: PhantomData<B>,
}

impl<B: FusionBackend + FusedCellBackend> Operation<B::FusionRuntime> for ForwardScan<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let operands = &self.description.inputs;
        let inputs = handles.get_float_tensor::<B>(&operands[0]);
        let params = handles.get_float_tensor::<B>(&operands[1]);
        let initial = self
            .has_initial
            .then(|| handles.get_float_tensor::<B>(&operands[2]));
        let forward =
            B::fused_cell_forward(inputs, params, initial, &self.settings, self.checkpoints);
        let results = &self.description.outputs;
        handles.register_float_tensor::<B>(&results[0].id, forward.outputs);
        handles.register_float_tensor::<B>(&results[1].id, forward.final_states);
        if let Some(checkpoints) = forward.checkpoints {
            handles.register_float_tensor::<B>(&results[2].id, checkpoints);
        }
    }
}

/// The backward scan as a stream operation: inputs, parameters, checkpoints and output
/// gradients in; input, parameter and initial-state gradients out.
#[derive(Debug)]
struct BackwardScan<B> {
    description: CustomOpIr,
    settings: FusedSettings,
    backend: PhantomData<B>,
}

impl<B: FusionBackend + FusedCellBackend> Operation<B::FusionRuntime> for BackwardScan<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let ([inputs, params, checkpoints, grad_outputs], [grad_inputs, grad_params, grad_initial]) =
            self.description.as_fixed();
        let gradients = B::fused_cell_backward(
            handles.get_float_tensor::<B>(inputs),
            handles.get_float_tensor::<B>(params),
            handles.get_float_tensor::<B>(checkpoints),
            handles.get_float_tensor::<B>(grad_outputs),
            &self.settings,
        );
        handles.register_float_tensor::<B>(&grad_inputs.id, gradients.inputs);
        handles.register_float_tensor::<B>(&grad_params.id, gradients.params);
        handles.register_float_tensor::<B>(&grad_initial.id, gradients.initial_states);
    }
}

/// The recurrence across chunks ([`super::linear_scan`]) as a stream operation: log decays,
/// writes and the initial state in; the state after every step out.
#[derive(Debug)]
struct LinearScan<B> {
    description: CustomOpIr,
    over: SumOver,
    backend: PhantomData<B>,
}

impl<B: FusionBackend + FusedCellBackend> Operation<B::FusionRuntime> for LinearScan<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let ([log_decay, writes, initial], [after]) = self.description.as_fixed();
        let result = B::linear_scan(
            handles.get_float_tensor::<B>(log_decay),
            handles.get_float_tensor::<B>(writes),
            handles.get_float_tensor::<B>(initial),
            self.over,
        );
        handles.register_float_tensor::<B>(&after.id, result);
    }
}

/// Running sums ([`super::running_sum`]) as a stream operation: values in, sums out.
#[derive(Debug)]
struct RunningSum<B> {
    description: CustomOpIr,
    over: SumOver,
    backend: PhantomData<B>,
}

impl<B: FusionBackend + FusedCellBackend> Operation<B::FusionRuntime> for RunningSum<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let ([x], [sums]) = self.description.as_fixed();
        let result = B::running_sum(handles.get_float_tensor::<B>(x), self.over);
        handles.register_float_tensor::<B>(&sums.id, result);
    }
}

/// The scores of pairs of a chunk's steps ([`FusedCellBackend::block_scores`]) as a stream
/// operation: queries, keys and factors in, scores out; or, `backward`, with the scores'
/// gradient in, the three gradients out.
#[derive(Debug)]
struct BlockScoresOp<B> {
    description: CustomOpIr,
    form: BlockScores,
    backward: bool,
    backend: PhantomData<B>,
}

impl<B: FusionBackend + FusedCellBackend> Operation<B::FusionRuntime> for BlockScoresOp<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let operands = &self.description.inputs;
        let [query, key, factors] =
            [0, 1, 2].map(|at| handles.get_float_tensor::<B>(&operands[at]));
        let results = &self.description.outputs;
        if self.backward {
            let grad = handles.get_float_tensor::<B>(&operands[3]);
            let gradients = B::block_scores_backward(self.form, query, key, factors, grad);
            for (result, gradient) in results.iter().zip(gradients) {
                handles.register_float_tensor::<B>(&result.id, gradient);
            }
        } else {
            let scores = B::block_scores(self.form, query, key, factors);
            handles.register_float_tensor::<B>(&results[0].id, scores);
        }
    }
}

/// Registers `operation`, a custom operation named `name` over `operands` into `results`, and
/// returns its results.
fn register_custom<B: FusionBackend, O: Operation<B::FusionRuntime> + 'static>(
    name: &'static str,
    operands: Vec<FloatTensor<Fusion<B>>>,
    results: Vec<TensorIr>,
    operation: impl FnOnce(CustomOpIr) -> O,
) -> Vec<FloatTensor<Fusion<B>>> {
    let client = operands[0].client.clone();
    let streams = OperationStreams::with_inputs(operands.iter());
    let operands: Vec<TensorIr> = operands.into_iter().map(|t| t.into_ir()).collect();
    let description = CustomOpIr::new(name, &operands, &results);
    client.register(
        streams,
        OperationIr::Custom(description.clone()),
        operation(description),
    )
}

impl<B: FusionBackend + FusedCellBackend> FusedCellBackend for Fusion<B> {
    fn fused_cell_forward(
        inputs: FloatTensor<Self>,
        params: FloatTensor<Self>,
        initial_states: Option<FloatTensor<Self>>,
        settings: &FusedSettings,
        checkpoints: bool,
    ) -> FusedForward<Self> {
        let compiled = settings.cell.compiled();
        let cell = &compiled.cell;
        let client = inputs.client.clone();
        let dtype = inputs.dtype;
        let [batch, time, heads, _] = inputs.shape.dims::<4>();
        let states = Packing::states(cell, &settings.dims).width;
        let outputs = Packing::outputs(cell, &settings.dims).width;
        let chunks = time.div_ceil(settings.schedule.chunk);
        let mut results = vec![
            TensorIr::uninit(
                client.create_empty_handle(),
                Shape::new([batch, time, heads, outputs]),
                dtype,
            ),
            TensorIr::uninit(
                client.create_empty_handle(),
                Shape::new([batch, heads, states]),
                dtype,
            ),
        ];
        if checkpoints {
            results.push(TensorIr::uninit(
                client.create_empty_handle(),
                Shape::new([batch, heads, chunks, states]),
                DType::F32,
            ));
        }
        let has_initial = initial_states.is_some();
        let mut operands = vec![inputs, params];
        operands.extend(initial_states);
        let mut results =
            register_custom::<B, _>("rak_forward_scan", operands, results, |description| {
                ForwardScan::<B> {
                    description,
                    settings: settings.clone(),
                    has_initial,
                    checkpoints,
                    backend: PhantomData,
                }
            })
            .into_iter();
        let mut next = || results.next().expect("the scan registers its results");
        FusedForward {
            outputs: next(),
            final_states: next(),
            checkpoints: checkpoints.then(&mut next),
        }
    }

    fn linear_scan(
        log_decay: FloatTensor<Self>,
        writes: FloatTensor<Self>,
        initial: FloatTensor<Self>,
        over: SumOver,
    ) -> FloatTensor<Self> {
        let after = TensorIr::uninit(
            writes.client.create_empty_handle(),
            writes.shape.clone(),
            writes.dtype,
        );
        let mut results = register_custom::<B, _>(
            "rak_linear_scan",
            vec![log_decay, writes, initial],
            vec![after],
            |description| LinearScan::<B> {
                description,
                over,
                backend: PhantomData,
            },
        );
        results.remove(0)
    }

    fn running_sum(x: FloatTensor<Self>, over: SumOver) -> FloatTensor<Self> {
        let sums = TensorIr::uninit(x.client.create_empty_handle(), x.shape.clone(), x.dtype);
        let mut results =
            register_custom::<B, _>("rak_running_sum", vec![x], vec![sums], |description| {
                RunningSum::<B> {
                    description,
                    over,
                    backend: PhantomData,
                }
            });
        results.remove(0)
    }

    fn block_scores(
        form: BlockScores,
        query: FloatTensor<Self>,
        key: FloatTensor<Self>,
        factors: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let [blocks, steps, _] = query.shape.dims::<3>();
        let scores = TensorIr::uninit(
            query.client.create_empty_handle(),
            Shape::new([blocks, steps, steps]),
            query.dtype,
        );
        let mut results = register_custom::<B, _>(
            "rak_block_scores",
            vec![query, key, factors],
            vec![scores],
            |description| BlockScoresOp::<B> {
                description,
                form,
                backward: false,
                backend: PhantomData,
            },
        );
        results.remove(0)
    }

    fn block_scores_backward(
        form: BlockScores,
        query: FloatTensor<Self>,
        key: FloatTensor<Self>,
        factors: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 3] {
        let gradients = [&query, &key, &factors].map(|operand| {
            TensorIr::uninit(
                operand.client.create_empty_handle(),
                operand.shape.clone(),
                operand.dtype,
            )
        });
        register_custom::<B, _>(
            "rak_block_scores_backward",
            vec![query, key, factors, grad],
            gradients.to_vec(),
            |description| BlockScoresOp::<B> {
                description,
                form,
                backward: true,
                backend: PhantomData,
            },
        )
        .try_into()
        .expect("the scores' backward registers three results")
    }

    fn fused_cell_backward(
        inputs: FloatTensor<Self>,
        params: FloatTensor<Self>,
        checkpoints: FloatTensor<Self>,
        grad_outputs: FloatTensor<Self>,
        settings: &FusedSettings,
    ) -> FusedGradients<Self> {
        let client = inputs.client.clone();
        let results = vec![
            TensorIr::uninit(
                client.create_empty_handle(),
                inputs.shape.clone(),
                inputs.dtype,
            ),
            TensorIr::uninit(
                client.create_empty_handle(),
                params.shape.clone(),
                params.dtype,
            ),
            {
                let compiled = settings.cell.compiled();
                let cell = &compiled.cell;
                let [batch, _, heads, _] = inputs.shape.dims::<4>();
                let states = Packing::states(cell, &settings.dims).width;
                TensorIr::uninit(
                    client.create_empty_handle(),
                    Shape::new([batch, heads, states]),
                    inputs.dtype,
                )
            },
        ];
        let [inputs, params, initial_states]: [FloatTensor<Self>; 3] = register_custom::<B, _>(
            "rak_backward_scan",
            vec![inputs, params, checkpoints, grad_outputs],
            results,
            |description| BackwardScan::<B> {
                description,
                settings: settings.clone(),
                backend: PhantomData,
            },
        )
        .try_into()
        .expect("the backward scan registers three results");
        FusedGradients {
            inputs,
            params,
            initial_states,
        }
    }
}
