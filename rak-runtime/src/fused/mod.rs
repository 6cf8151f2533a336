//! The fused cell as a burn operation: a cell's generated scan kernels inside burn's tensor
//! world, on the cubecl backends ([`cube`]), inside their fusion wrapper as a custom operation
//! of the fusion stream ([`fusion`]), and under burn's autodiff with the generated backward
//! kernel as the operation's backward ([`autodiff`]).
//!
//! The same backends run parts of the chunked path ([`crate::chunked`]) as kernels of
//! their own: the recurrence across chunks ([`linear_scan`]), a diagonal linear recurrence
//! walked sequentially by one unit per state element, the running sums of log decays
//! ([`running_sum`]), walked the same way, and the scores within a sub-chunk
//! under a per-key decay ([`decayed_scores`]), whose pairwise decays burn operations would
//! materialise (`c` times the size of the queries), and across sub-chunks
//! ([`scores_across_sub_chunks`]), whose keys scaled per pair of sub-chunks they would
//! (`C / c` times the size of the keys).
//!
//! Tensors are packed as [`crate::packing`] describes. The final states are returned without
//! a gradient (truncated backpropagation through time detaches them anyway): the backward
//! scan starts from a zero final-state gradient.

pub mod autodiff;
pub mod cube;
pub mod fusion;

#[cfg(feature = "wgpu")]
pub use cube::chunked_kernel_source;
pub use cube::{ChunkedKernel, ChunkedSizes};

use crate::codegen::schedule::Schedule;
use crate::kernels::CellRef;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

/// The cell, sizes and schedule of a fused scan (batch, time and heads come from the tensors).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FusedSettings {
    pub cell: CellRef,
    /// The size of each dim of the cell, in declaration order.
    pub dims: Vec<usize>,
    pub schedule: Schedule,
}

/// What the forward scan returns.
#[derive(Debug)]
pub struct FusedForward<B: Backend> {
    /// `[B, T, H, Σ output widths]`.
    pub outputs: FloatTensor<B>,
    /// `[B, H, Σ state sizes]`, without gradient.
    pub final_states: FloatTensor<B>,
    /// `[B, H, ceil(T / C), Σ state sizes]` in f32, for the backward scan; `None` when not asked.
    pub checkpoints: Option<FloatTensor<B>>,
}

/// What the backward scan returns.
#[derive(Debug)]
pub struct FusedGradients<B: Backend> {
    /// `[B, T, H, Σ input widths]`, before activation.
    pub inputs: FloatTensor<B>,
    /// `[H, Σ parameter sizes]`, summed over batch and time.
    pub params: FloatTensor<B>,
    /// `[B, H, Σ state sizes]`.
    pub initial_states: FloatTensor<B>,
}

/// Which pairs of steps of a chunk [`FusedCellBackend::block_scores`] scores, and what its
/// third operand (the factors) is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockScores {
    /// Pairs s ≤ t within one sub-chunk ([`decayed_scores`]); the factors are the log decays.
    WithinSubChunk,
    /// Pairs in different sub-chunks of `sub_chunk` steps, s in an earlier one than t
    /// ([`scores_across_sub_chunks`]); the factors are the gates between sub-chunks.
    AcrossSubChunks { sub_chunk: usize },
}

/// Which steps [`running_sum`] adds up for each step t of its axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SumOver {
    /// `Σ_{u ≤ t} x_u`, summed from the first step.
    UpTo,
    /// `Σ_{u < t} x_u` (0 at the first step), summed from the first step.
    Before,
    /// `Σ_{u ≥ t} x_u`, summed from the last step.
    From,
    /// `Σ_{u > t} x_u` (0 at the last step), summed from the last step.
    After,
}

impl SumOver {
    /// Whether the sums start from the last step.
    pub fn reverse(self) -> bool {
        matches!(self, SumOver::From | SumOver::After)
    }

    /// Whether step t's own value is left out of its sum.
    pub fn exclusive(self) -> bool {
        matches!(self, SumOver::Before | SumOver::After)
    }

    /// The sums whose map is the transpose of this one's: x_u reaches y_t exactly when y_t's
    /// gradient reaches x_u through the adjoint (so it is the backward).
    pub fn adjoint(self) -> SumOver {
        match self {
            SumOver::UpTo => SumOver::From,
            SumOver::From => SumOver::UpTo,
            SumOver::Before => SumOver::After,
            SumOver::After => SumOver::Before,
        }
    }
}

/// Backends that run a cell's generated kernels.
pub trait FusedCellBackend: Backend {
    /// The forward scan; writes checkpoints if `checkpoints` is true.
    fn fused_cell_forward(
        inputs: FloatTensor<Self>,
        params: FloatTensor<Self>,
        initial_states: Option<FloatTensor<Self>>,
        settings: &FusedSettings,
        checkpoints: bool,
    ) -> FusedForward<Self>;

    /// One step of every stream, for streaming inference: inputs `[B, 1, H, Σ input widths]`,
    /// states `[B, H, Σ state sizes]` → outputs `[B, 1, H, Σ output widths]` and the new
    /// states (no gradient). By default the forward scan over one step; the cubecl backends
    /// run the cell's single-step kernel.
    fn fused_cell_step(
        inputs: FloatTensor<Self>,
        params: FloatTensor<Self>,
        states: FloatTensor<Self>,
        settings: &FusedSettings,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let forward = Self::fused_cell_forward(inputs, params, Some(states), settings, false);
        (forward.outputs, forward.final_states)
    }

    /// Device memory of `device` as the backend's allocator sees it: bytes in use and bytes
    /// reserved, where the backend can tell.
    fn device_memory(_device: &Self::Device) -> Option<(u64, u64)> {
        None
    }

    /// The diagonal linear recurrence across chunks ([`linear_scan`]): log decays
    /// `[B, H, N, Dk, Dv]` (`Dk` 1 or K, `Dv` 1 or V: broadcast along the state), writes
    /// `[B, H, N, K, V]` and the state `[B, H, K, V]` before the first step of the walk → a
    /// state for each of the N steps, `[B, H, N, K, V]`: with `over` [`SumOver::UpTo`] the
    /// state after the step, [`SumOver::Before`] the state before it (the first step gets
    /// `initial`); [`SumOver::From`] and [`SumOver::After`] walk the N steps from the last,
    /// starting from `initial` after it (what the backward of a forward walk needs).
    fn linear_scan(
        log_decay: FloatTensor<Self>,
        writes: FloatTensor<Self>,
        initial: FloatTensor<Self>,
        over: SumOver,
    ) -> FloatTensor<Self>;

    /// Running sums along axis 1 of `x` `[lines, steps, across]` ([`running_sum`]), over
    /// the steps `over` says.
    fn running_sum(x: FloatTensor<Self>, over: SumOver) -> FloatTensor<Self>;

    /// The scores of pairs of steps of a chunk under a per-key decay, `[M, C, C]`, of the
    /// pairs `form` says: within sub-chunks ([`decayed_scores`]: queries, keys and log decays
    /// `[M, c, K]`, C = c) or across them ([`scores_across_sub_chunks`]: queries and keys
    /// `[M, C, K]`, gates between sub-chunks `[M, C / c, C / c, K]`).
    fn block_scores(
        form: BlockScores,
        query: FloatTensor<Self>,
        key: FloatTensor<Self>,
        factors: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    /// The gradients of [`FusedCellBackend::block_scores`]'s queries, keys and factors from
    /// the scores' gradient `[M, C, C]` (entries of pairs outside `form` are ignored).
    fn block_scores_backward(
        form: BlockScores,
        query: FloatTensor<Self>,
        key: FloatTensor<Self>,
        factors: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 3];

    /// The backward scan from the output gradient (the final-state gradient is zero).
    fn fused_cell_backward(
        inputs: FloatTensor<Self>,
        params: FloatTensor<Self>,
        checkpoints: FloatTensor<Self>,
        grad_outputs: FloatTensor<Self>,
        settings: &FusedSettings,
    ) -> FusedGradients<Self>;
}

/// Runs the cell of `settings` over packed inputs `[B, T, H, Σ input widths]` (before
/// activation), parameters `[H, Σ parameter sizes]` and optional initial states
/// `[B, H, Σ state sizes]`; returns the outputs `[B, T, H, Σ output widths]` (differentiable on
/// an autodiff backend) and the final states (detached). One step from given states runs
/// [`FusedCellBackend::fused_cell_step`].
pub fn fused_cell<B: FusedCellBackend>(
    inputs: Tensor<B, 4>,
    params: Tensor<B, 2>,
    initial_states: Option<Tensor<B, 3>>,
    settings: &FusedSettings,
) -> (Tensor<B, 4>, Tensor<B, 3>) {
    // One step from given states: the single-step kernel (streaming inference).
    if let (1, Some(states)) = (inputs.dims()[1], &initial_states) {
        let (outputs, states) = B::fused_cell_step(
            inputs.into_primitive().tensor(),
            params.into_primitive().tensor(),
            states.clone().into_primitive().tensor(),
            settings,
        );
        return (
            Tensor::from_primitive(TensorPrimitive::Float(outputs)),
            Tensor::from_primitive(TensorPrimitive::Float(states)),
        );
    }
    let forward = B::fused_cell_forward(
        inputs.into_primitive().tensor(),
        params.into_primitive().tensor(),
        initial_states.map(|s| s.into_primitive().tensor()),
        settings,
        false,
    );
    (
        Tensor::from_primitive(TensorPrimitive::Float(forward.outputs)),
        Tensor::from_primitive(TensorPrimitive::Float(forward.final_states)),
    )
}

/// `after_n = exp(log_decay_n) ⊙ after_{n−1} + writes_n` along axis 2 (n = 0 … N − 1), from
/// `after_{−1} = initial`: log decays `[B, H, N, Dk, Dv]` (broadcast along a state axis of
/// size 1), writes `[B, H, N, K, V]`, initial `[B, H, K, V]` → every `after_n`
/// (`over` [`SumOver::UpTo`]) or every `after_{n−1}`, the state before step n
/// ([`SumOver::Before`]), `[B, H, N, K, V]`; the other two walk from the last step. One unit
/// per state element walks the N steps in order and keeps the state in a register: the work
/// and the memory traffic grow with N, not N log N as in a parallel prefix scan of full
/// states; each product of decays is taken step by step, so no exponent is formed from sums
/// over many steps. Differentiable on an autodiff backend.
pub fn linear_scan<B: FusedCellBackend>(
    log_decay: Tensor<B, 5>,
    writes: Tensor<B, 5>,
    initial: Tensor<B, 4>,
    over: SumOver,
) -> Tensor<B, 5> {
    let after = B::linear_scan(
        log_decay.into_primitive().tensor(),
        writes.into_primitive().tensor(),
        initial.into_primitive().tensor(),
        over,
    );
    Tensor::from_primitive(TensorPrimitive::Float(after))
}

/// The running sums of `x` along `dim`, over the steps `over` says: `Σ_{u ≤ t} x_u`,
/// `Σ_{u < t}`, `Σ_{u ≥ t}` or `Σ_{u > t}` for each step t, each summed in order from the end
/// it starts at (so a sum of the steps after t is never a difference of two sums from the
/// start, whose digits would go with the size of those sums). One unit per line along `dim`
/// walks it, each value read once (burn's `cumsum` reads the whole prefix again for every
/// position: `n²/2` reads along an axis of `n`; the sums from the far end took two flips
/// besides, and the exclusive ones a copy and a concatenation). Differentiable on an autodiff
/// backend: the backward is the running sum over [`SumOver::adjoint`].
pub fn running_sum<B: FusedCellBackend, const D: usize>(
    x: Tensor<B, D>,
    dim: usize,
    over: SumOver,
) -> Tensor<B, D> {
    let dims = x.dims();
    let lines: usize = dims[..dim].iter().product();
    let across: usize = dims[dim + 1..].iter().product();
    let sums = B::running_sum(
        x.reshape([lines, dims[dim], across])
            .into_primitive()
            .tensor(),
        over,
    );
    Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(sums)).reshape(dims)
}

/// The scores of every pair of steps s ≤ t of a sub-chunk under a per-key decay:
/// `A[m, t, s] = Σ_i q[m, t, i] · k[m, s, i] · exp(Σ_{s < u ≤ t} x[m, u, i])`, 0 for s > t,
/// from queries `q`, keys `k` and log decays `x`, each `[M, c, K]` (M sub-chunks of c steps),
/// → `[M, c, c]`. Each exponent is summed over the steps between its two ends (never
/// positive for decays at most 1, never a difference of two sums). One cube per sub-chunk,
/// whose units split the keys of each step s and walk the steps t ≥ s with the exponent built
/// up step by step; the backward, one unit per key, walks the pairs the same way. Nothing
/// `[M, c, c, K]` is stored. Differentiable on an autodiff backend.
pub fn decayed_scores<B: FusedCellBackend>(
    query: Tensor<B, 3>,
    key: Tensor<B, 3>,
    log_decay: Tensor<B, 3>,
) -> Tensor<B, 3> {
    block_scores(BlockScores::WithinSubChunk, query, key, log_decay)
}

/// The scores of every pair of steps of a chunk in different sub-chunks, s in an earlier
/// one than t: `A[m, t, s] = Σ_i q[m, t, i] · g[m, I, J, i] · k[m, s, i]` for t in
/// sub-chunk I and s in sub-chunk J < I, 0 elsewhere (the diagonal blocks included), from
/// queries `q` and keys `k` `[M, C, K]` and gates between sub-chunks `g` `[M, n, n, K]`
/// (C = n · c; entries with J ≥ I are ignored), → `[M, C, C]`. With a per-key decay, the
/// chunked path splits each pair's decay where t's sub-chunk I starts into factors of t (in
/// `q`), of s (in `k`) and of the sub-chunks strictly between (in `g`); the
/// product of queries and keys scaled per pair (I, J), `n` times the size of the keys,
/// is never stored. One cube per chunk, one unit per pair of steps of two sub-chunks, the
/// keys staged in shared memory a tile at a time; the backward, one unit per key, walks the
/// pairs. Differentiable on an autodiff backend.
pub fn scores_across_sub_chunks<B: FusedCellBackend>(
    query: Tensor<B, 3>,
    key: Tensor<B, 3>,
    gates: Tensor<B, 4>,
) -> Tensor<B, 3> {
    let (steps, subs) = (query.dims()[1], gates.dims()[1]);
    assert_eq!(
        steps % subs,
        0,
        "{steps} steps do not split into {subs} sub-chunks"
    );
    let sub_chunk = steps / subs;
    block_scores(
        BlockScores::AcrossSubChunks { sub_chunk },
        query,
        key,
        gates,
    )
}

fn block_scores<B: FusedCellBackend, const D: usize>(
    form: BlockScores,
    query: Tensor<B, 3>,
    key: Tensor<B, 3>,
    factors: Tensor<B, D>,
) -> Tensor<B, 3> {
    let scores = B::block_scores(
        form,
        query.into_primitive().tensor(),
        key.into_primitive().tensor(),
        factors.into_primitive().tensor(),
    );
    Tensor::from_primitive(TensorPrimitive::Float(scores))
}
