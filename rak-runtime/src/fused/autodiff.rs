//! The fused cell under burn's autodiff: the forward scan writes checkpoints when any operand
//! needs a gradient, and the operation's backward runs the generated backward scan.

use super::{FusedCellBackend, FusedForward, FusedGradients, FusedSettings};
use crate::kernels::CellKernels;
use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ops::FloatTensor;
use std::marker::PhantomData;

/// The backward of a fused scan with `N` differentiable operands: inputs, parameters and, when
/// given, initial states.
#[derive(Debug)]
struct ScanBackward<C, const N: usize>(PhantomData<C>);

impl<B: FusedCellBackend, C: CellKernels, const N: usize> Backward<B, N> for ScanBackward<C, N> {
    /// Inputs, parameters, checkpoints and the settings.
    type State = (
        FloatTensor<B>,
        FloatTensor<B>,
        FloatTensor<B>,
        FusedSettings,
    );

    fn backward(
        self,
        ops: Ops<Self::State, N>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let (inputs, params, checkpoints, settings) = ops.state;
        let grad_outputs = grads.consume::<B>(&ops.node);
        let gradients =
            B::fused_cell_backward::<C>(inputs, params, checkpoints, grad_outputs, &settings);
        let mut results = [
            Some(gradients.inputs),
            Some(gradients.params),
            Some(gradients.initial_states),
        ];
        for (parent, result) in ops.parents.into_iter().zip(results.iter_mut()) {
            if let (Some(parent), Some(gradient)) = (parent, result.take()) {
                grads.register::<B>(parent.id, gradient);
            }
        }
    }
}

impl<B: FusedCellBackend, CS: CheckpointStrategy> FusedCellBackend for Autodiff<B, CS> {
    fn fused_cell_forward<C: CellKernels>(
        inputs: FloatTensor<Self>,
        params: FloatTensor<Self>,
        initial_states: Option<FloatTensor<Self>>,
        settings: &FusedSettings,
        _checkpoints: bool,
    ) -> FusedForward<Self> {
        let untracked = |forward: FusedForward<B>| FusedForward::<Self> {
            outputs: <Self as AutodiffBackend>::from_inner(forward.outputs),
            final_states: <Self as AutodiffBackend>::from_inner(forward.final_states),
            checkpoints: None,
        };
        // The same steps for both arities: run forward with checkpoints if tracked, keep what
        // the backward needs, and return the outputs as the operation's result.
        macro_rules! scan {
            ($n:literal, $nodes:expr, $initial:expr) => {
                match ScanBackward::<C, $n>(PhantomData)
                    .prepare::<CS>($nodes)
                    .compute_bound()
                    .stateful()
                {
                    OpsKind::Tracked(prep) => {
                        let forward = B::fused_cell_forward::<C>(
                            inputs.primitive.clone(),
                            params.primitive.clone(),
                            $initial,
                            settings,
                            true,
                        );
                        let checkpoints = forward
                            .checkpoints
                            .expect("a forward scan asked for checkpoints writes them");
                        let state = (
                            inputs.primitive.clone(),
                            params.primitive.clone(),
                            checkpoints,
                            settings.clone(),
                        );
                        FusedForward {
                            outputs: prep.finish(state, forward.outputs),
                            final_states: <Self as AutodiffBackend>::from_inner(
                                forward.final_states,
                            ),
                            checkpoints: None,
                        }
                    }
                    OpsKind::UnTracked(prep) => {
                        let forward = B::fused_cell_forward::<C>(
                            inputs.primitive.clone(),
                            params.primitive.clone(),
                            $initial,
                            settings,
                            false,
                        );
                        let result = untracked(forward);
                        FusedForward {
                            outputs: prep.finish(result.outputs.primitive),
                            ..result
                        }
                    }
                }
            };
        }
        match initial_states {
            Some(initial) => scan!(
                3,
                [
                    inputs.node.clone(),
                    params.node.clone(),
                    initial.node.clone()
                ],
                Some(initial.primitive.clone())
            ),
            None => scan!(2, [inputs.node.clone(), params.node.clone()], None),
        }
    }

    fn fused_cell_backward<C: CellKernels>(
        inputs: FloatTensor<Self>,
        params: FloatTensor<Self>,
        checkpoints: FloatTensor<Self>,
        grad_outputs: FloatTensor<Self>,
        settings: &FusedSettings,
    ) -> FusedGradients<Self> {
        // Not differentiated again (no second-order gradients of a scan).
        let gradients = B::fused_cell_backward::<C>(
            inputs.primitive,
            params.primitive,
            checkpoints.primitive,
            grad_outputs.primitive,
            settings,
        );
        FusedGradients {
            inputs: Self::from_inner(gradients.inputs),
            params: Self::from_inner(gradients.params),
            initial_states: Self::from_inner(gradients.initial_states),
        }
    }
}
