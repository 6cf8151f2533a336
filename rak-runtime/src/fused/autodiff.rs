//! The fused cell under burn's autodiff: the forward scan writes checkpoints when any operand
//! needs a gradient, and the operation's backward runs the generated backward scan. The
//! chunked path's recurrence across chunks ([`super::linear_scan`]) is differentiated by the
//! same recurrence walked the other way (`LinearScanBackward`), its running sums by the
//! running sums the other way (`RunningSumBackward`), and its scores of pairs of steps by
//! their backward kernels (`BlockScoresBackward`).

use super::{BlockScores, FusedCellBackend, FusedForward, FusedGradients, FusedSettings, SumOver};
use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

/// The backward of a fused scan with `N` differentiable operands: inputs, parameters and, when
/// given, initial states.
#[derive(Debug)]
struct ScanBackward<const N: usize>;

impl<B: FusedCellBackend, const N: usize> Backward<B, N> for ScanBackward<N> {
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
            B::fused_cell_backward(inputs, params, checkpoints, grad_outputs, &settings);
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

/// The backward of [`FusedCellBackend::running_sum`]: a running sum is a linear map whose
/// transpose is the running sum over [`SumOver::adjoint`] (x_u reaches y_t for u ≤ t exactly
/// when y_t's gradient reaches x_u for t ≥ u).
#[derive(Debug)]
struct RunningSumBackward {
    over: SumOver,
}

impl<B: FusedCellBackend> Backward<B, 1> for RunningSumBackward {
    type State = ();

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        if let [Some(parent)] = ops.parents {
            grads.register::<B>(parent.id, B::running_sum(grad, self.over.adjoint()));
        }
    }
}

/// The backward of [`FusedCellBackend::linear_scan`] walking in either direction, with
/// respect to its log decays, writes and initial state. In the walk's order (step `n − 1`
/// before step `n`; the reverse walk's steps taken from the last), with G the gradient of
/// every output, `R_n`, the gradient reaching the state after step n, is what the writes
/// get; the log decays get `R_n ⊙ e^{d_n} ⊙ state before step n`, summed along the state
/// axes a decay is broadcast along.
///
/// - Outputs after each step ([`SumOver::UpTo`], [`SumOver::From`]):
///   `R_n = G_n + e^{d_{n+1}} ⊙ R_{n+1}`, the same recurrence walked the other way with each
///   step's decay moved one step against the walk; the initial state gets `e^{d_0} ⊙ R_0`.
/// - Outputs before each step ([`SumOver::Before`], [`SumOver::After`]): output n + 1 is the
///   state after step n, so `R_n = G_{n+1} + e^{d_{n+1}} ⊙ R_{n+1}` is the exclusive walk the
///   other way with the decays where they are (no step moved, no concatenation); the outputs
///   are the states before each step, and the initial state, output 0 itself, gets
///   `G_0 + e^{d_0} ⊙ R_0`.
#[derive(Debug)]
struct LinearScanBackward {
    over: SumOver,
}

impl<B: FusedCellBackend> Backward<B, 3> for LinearScanBackward {
    /// Log decays, the initial state and the walk's outputs.
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let (log_decay, initial, outputs) = ops.state;
        let tensor = |primitive| Tensor::<B, 5>::from_primitive(TensorPrimitive::Float(primitive));
        let (log_decay, outputs) = (tensor(log_decay), tensor(outputs));
        let initial = Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(initial));
        let grad = tensor(grads.consume::<B>(&ops.node));
        let [batch, heads, steps, keys, values] = outputs.dims();
        let [_, _, _, decay_keys, decay_values] = log_decay.dims();
        let device = outputs.device();
        let reverse = self.over.reverse();
        let first = if reverse { steps - 1 } else { 0 };
        let nothing_after = Tensor::<B, 4>::zeros([batch, heads, keys, values], &device);
        let walk_back = |log_decay: Tensor<B, 5>, grad: Tensor<B, 5>| {
            tensor(B::linear_scan(
                log_decay.into_primitive().tensor(),
                grad.into_primitive().tensor(),
                nothing_after.clone().into_primitive().tensor(),
                self.over.adjoint(),
            ))
        };
        let decay = log_decay.clone().exp();
        // Step `first` of the walk, `[B, H, rows, columns]` (a decay's: broadcast along the state).
        let at_first = |x: Tensor<B, 5>| {
            let [_, _, _, rows, columns] = x.dims();
            x.narrow(2, first, 1).reshape([batch, heads, rows, columns])
        };
        let (reaching, before, initial_gradient) = if self.over.exclusive() {
            let reaching = walk_back(log_decay, grad.clone());
            let initial_gradient =
                at_first(grad) + at_first(decay.clone()) * at_first(reaching.clone());
            (reaching, outputs, initial_gradient)
        } else {
            // Along axis 2, each step gets the value of the step before it in the walk
            // (`previous`) or after it (`next`), `padding` where there is none.
            let moved = |x: Tensor<B, 5>, padding: Tensor<B, 5>, previous: bool| match steps {
                1 => padding,
                _ if previous != reverse => {
                    Tensor::cat(vec![padding, x.narrow(2, 0, steps - 1)], 2)
                }
                _ => Tensor::cat(vec![x.narrow(2, 1, steps - 1), padding], 2),
            };
            let next_decay = moved(
                log_decay,
                Tensor::zeros([batch, heads, 1, decay_keys, decay_values], &device),
                false,
            );
            let reaching = walk_back(next_decay, grad);
            let before = moved(outputs, initial.unsqueeze_dim::<5>(2), true);
            let initial_gradient = at_first(reaching.clone()) * at_first(decay.clone());
            (reaching, before, initial_gradient)
        };
        let [decay_parent, writes_parent, initial_parent] = ops.parents;
        if let Some(parent) = decay_parent {
            let mut gradient = reaching.clone() * decay * before;
            if decay_keys < keys {
                gradient = gradient.sum_dim(3);
            }
            if decay_values < values {
                gradient = gradient.sum_dim(4);
            }
            grads.register::<B>(parent.id, gradient.into_primitive().tensor());
        }
        if let Some(parent) = initial_parent {
            grads.register::<B>(parent.id, initial_gradient.into_primitive().tensor());
        }
        if let Some(parent) = writes_parent {
            grads.register::<B>(parent.id, reaching.into_primitive().tensor());
        }
    }
}

/// The backward of [`FusedCellBackend::block_scores`] of either form: its backward kernel,
/// from the queries, keys and factors kept from the forward.
#[derive(Debug)]
struct BlockScoresBackward(BlockScores);

impl<B: FusedCellBackend> Backward<B, 3> for BlockScoresBackward {
    type State = [FloatTensor<B>; 3];

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [query, key, factors] = ops.state;
        let grad = grads.consume::<B>(&ops.node);
        let gradients = B::block_scores_backward(self.0, query, key, factors, grad);
        for (parent, gradient) in ops.parents.into_iter().zip(gradients) {
            if let Some(parent) = parent {
                grads.register::<B>(parent.id, gradient);
            }
        }
    }
}

impl<B: FusedCellBackend, CS: CheckpointStrategy> FusedCellBackend for Autodiff<B, CS> {
    fn fused_cell_forward(
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
                match ScanBackward::<$n>
                    .prepare::<CS>($nodes)
                    .compute_bound()
                    .stateful()
                {
                    OpsKind::Tracked(prep) => {
                        let forward = B::fused_cell_forward(
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
                        let forward = B::fused_cell_forward(
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

    fn linear_scan(
        log_decay: FloatTensor<Self>,
        writes: FloatTensor<Self>,
        initial: FloatTensor<Self>,
        over: SumOver,
    ) -> FloatTensor<Self> {
        let parents = [
            log_decay.node.clone(),
            writes.node.clone(),
            initial.node.clone(),
        ];
        match (LinearScanBackward { over })
            .prepare::<CS>(parents)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let after = B::linear_scan(
                    log_decay.primitive.clone(),
                    writes.primitive,
                    initial.primitive.clone(),
                    over,
                );
                prep.finish(
                    (log_decay.primitive, initial.primitive, after.clone()),
                    after,
                )
            }
            OpsKind::UnTracked(prep) => prep.finish(B::linear_scan(
                log_decay.primitive,
                writes.primitive,
                initial.primitive,
                over,
            )),
        }
    }

    fn running_sum(x: FloatTensor<Self>, over: SumOver) -> FloatTensor<Self> {
        (RunningSumBackward { over })
            .prepare::<CS>([x.node.clone()])
            .compute_bound()
            .stateless(B::running_sum(x.primitive, over))
    }

    fn block_scores(
        form: BlockScores,
        query: FloatTensor<Self>,
        key: FloatTensor<Self>,
        factors: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let parents = [query.node.clone(), key.node.clone(), factors.node.clone()];
        let operands = [query.primitive, key.primitive, factors.primitive];
        match BlockScoresBackward(form)
            .prepare::<CS>(parents)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let [query, key, factors] = operands.clone();
                prep.finish(operands, B::block_scores(form, query, key, factors))
            }
            OpsKind::UnTracked(prep) => {
                let [query, key, factors] = operands;
                prep.finish(B::block_scores(form, query, key, factors))
            }
        }
    }

    fn block_scores_backward(
        form: BlockScores,
        query: FloatTensor<Self>,
        key: FloatTensor<Self>,
        factors: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 3] {
        // Not differentiated again.
        B::block_scores_backward(
            form,
            query.primitive,
            key.primitive,
            factors.primitive,
            grad.primitive,
        )
        .map(Self::from_inner)
    }

    fn fused_cell_backward(
        inputs: FloatTensor<Self>,
        params: FloatTensor<Self>,
        checkpoints: FloatTensor<Self>,
        grad_outputs: FloatTensor<Self>,
        settings: &FusedSettings,
    ) -> FusedGradients<Self> {
        // Not differentiated again (no second-order gradients of a scan).
        let gradients = B::fused_cell_backward(
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
