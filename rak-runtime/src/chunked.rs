//! The chunked path: the scan of a cell linear in its state, evaluated chunk by chunk with
//! matrix products, from the factors the compiler derived ([`crate::codegen::chunkwise`]).
//! It runs as burn tensor operations on any backend and is differentiated by burn's autodiff;
//! on the cubecl backends the products go to cubecl's matrix-multiply kernels, which use the
//! tensor cores (cmma) where the device has them (f32 operands rounded to tf32 there) and a
//! plain kernel elsewhere.
//!
//! With the per-step factors log γ (the decay), κ (key), ν (value), q (query), the sequence is
//! cut into chunks of C steps. Within a chunk, b_t = Σ_{u ≤ t} log γ_u is the cumulative log
//! decay from the chunk's start (along the key axis, the value axis, or a scalar). Then, for
//! the state S₀ entering the chunk:
//!
//! - **inter-chunk**: `o_t += (q_t ⊙ e^{b_t}) · S₀`; the chunk's write
//!   `U = Σ_s (κ_s ⊙ e^{b_C − b_s}) ⊗ ν_s` and decay `e^{b_C}` give the next chunk's state
//!   `S₁ = e^{b_C} ⊙ S₀ + U`; the states entering all chunks come from these affine maps
//!   applied in order by [`linear_scan`], one unit per state element, which writes the state
//!   entering each chunk (a sequential walk: memory traffic of one read and one write of each
//!   chunk's state, where a parallel prefix scan of full states reads and writes them
//!   log₂(chunks) times);
//! - **intra-chunk**: `o_t += Σ_{s ≤ t} (Σ_i q_t[i] κ_s[i] e^{b_t[i] − b_s[i]}) ν_s`, in
//!   sub-chunks of c steps: between sub-chunks, every decay is split where the later
//!   sub-chunk I starts (after step r − 1, the last of the sub-chunk before it),
//!   `e^{b_t − b_{r−1}} · e^{b_{r−1} − b_s}`, factors that never exceed 1; for a per-key decay
//!   `e^{b_{r−1} − b_s}` is in turn the factor of s's sub-chunk J after s and the gate of the
//!   sub-chunks strictly between J and I, and one kernel applies the gates pair by pair of sub-chunks
//!   ([`scores_across_sub_chunks`], which stores no keys scaled per pair); within a sub-chunk
//!   the decays are taken pairwise, by one kernel for a per-key decay ([`decayed_scores`],
//!   which stores no `[c, c, K]` factors); then the `[C, C]` scores multiply the values. A
//!   scalar decay needs neither: its `e^{b_t − b_s}` multiplies the `[C, C]` score matrix.
//!
//! No exponent is positive for decays at most 1 (every gate of the built-in cells), so no
//! factor overflows however small the gates get; masked entries are zeroed before their
//! exponential, so they add no infinities to the gradients either.
//!
//! Every exponent that is not measured from the chunk's start (`b_t − b_s`, `b_C − b_s`) is
//! summed over the steps between its ends (`segment_sums`, [`running_sum`] over the steps
//! after each, [`SumOver::After`]), never taken as the
//! difference of two sums from the start: with saturated gates those sums reach −1000 within a
//! chunk, where f32 keeps only about 1e-4 of absolute precision, and a difference would carry
//! that error into every factor (and ≈ 5e-4 into the gradient of Mamba2's `A_log` at T = 2048,
//! against ≈ 1e-6 this way; `tests/model.rs`).

use crate::codegen::chunkwise::{ChunkForm, GateAxis};
use crate::codegen::ir::{ExprId, IndexId};
use crate::fused::{
    FusedCellBackend, SumOver, decayed_scores, linear_scan, running_sum, scores_across_sub_chunks,
};
use crate::unfused::{ScanResult, UnfusedScan, reshapable};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

/// Steps per sub-chunk: the blocks whose decays are taken pairwise.
pub const SUB_CHUNK: usize = 16;

/// What one chunked scan needs besides the tensors.
pub struct ChunkedScan<'a> {
    pub form: &'a ChunkForm,
    /// The size of each dim of the cell, in declaration order.
    pub dims: &'a [usize],
    /// Steps per chunk (C).
    pub chunk: usize,
    /// Steps per sub-chunk (at most C; the largest divisor of C up to this is used).
    pub sub_chunk: usize,
}

/// The factors of one sequence, cut into chunks: `[B, H, chunks, C, width]`.
struct Chunks<B: Backend> {
    /// Each step's log decay (width 1, K or V).
    log_decay: Tensor<B, 5>,
    /// Cumulative log decay from each chunk's start, b_t.
    decay: Tensor<B, 5>,
    /// For a scalar decay: b_t − b_s `[B, H, chunks, t, s]` (see [`segment_sums`]).
    scalar_between: Option<Tensor<B, 5>>,
    key: Tensor<B, 5>,
    value: Tensor<B, 5>,
}

impl<B: Backend> Chunks<B> {
    fn scalar_between(&self) -> Tensor<B, 5> {
        let between = self.scalar_between.as_ref();
        between.expect("a scalar decay").clone()
    }
}

impl ChunkedScan<'_> {
    /// The steps per sub-chunk the scan uses: the largest divisor of the chunk up to
    /// [`ChunkedScan::sub_chunk`].
    pub fn sub_chunk_steps(&self) -> usize {
        let chunk = self.chunk.max(1);
        (1..=self.sub_chunk.clamp(1, chunk))
            .rev()
            .find(|c| chunk.is_multiple_of(*c))
            .unwrap_or(1)
    }

    /// Runs the scan over packed inputs `[B, T, H, Σ input widths]` (before activation),
    /// parameters `[H, Σ parameter sizes]` and optional initial states `[B, H, Σ state sizes]`
    /// (else the state starts from its declared value), like [`UnfusedScan::run`].
    pub fn run<B: FusedCellBackend>(
        &self,
        inputs: Tensor<B, 4>,
        params: Tensor<B, 2>,
        initial: Option<Tensor<B, 3>>,
    ) -> Result<ScanResult<B>, String> {
        let form = self.form;
        let cell = &form.cell;
        let [batch, time, heads, _] = inputs.dims();
        let device = inputs.device();
        let size = |index: IndexId| self.dims[cell.index_dim(index).0];
        let (keys, values) = (size(form.key.indices[0]), size(form.value.indices[0]));

        // Every per-step factor at every step at once.
        let mut wanted: Vec<(ExprId, &[IndexId])> = vec![
            (form.log_gate.expr, &form.log_gate.indices),
            (form.key.expr, &form.key.indices),
            (form.value.expr, &form.value.indices),
        ];
        if let Some(delta) = &form.delta {
            wanted.push((delta.expr, &delta.indices));
        }
        for readout in &form.readouts {
            for factor in [&readout.query, &readout.scale, &readout.direct]
                .into_iter()
                .flatten()
            {
                wanted.push((factor.expr, &factor.indices));
            }
        }
        let evaluator = UnfusedScan {
            cell,
            dims: self.dims,
        };
        let mut evaluated = evaluator
            .evaluate_every_step(inputs, params, &wanted)?
            .into_iter();
        let mut next = || evaluated.next().expect("one tensor per factor");

        let (chunk, sub_chunk) = (self.chunk.max(1), self.sub_chunk_steps());
        let chunks = time.div_ceil(chunk);
        // `[B, T, H, w]` → `[B, H, chunks, C, w]`, the last chunk padded with zeros: no write,
        // no decay (log 1), so the final state is unchanged by the padding.
        let cut = |x: Tensor<B, 4>| -> Tensor<B, 5> {
            let width = x.dims()[3];
            let mut x = x.swap_dims(1, 2);
            if chunks * chunk > time {
                let padding = Tensor::zeros([batch, heads, chunks * chunk - time, width], &device);
                x = Tensor::cat(vec![x, padding], 2);
            }
            x.reshape([batch, heads, chunks, chunk, width])
        };
        let log_decay = cut(next());
        let scalar_between = (form.gate_axis == GateAxis::Scalar).then(|| {
            let steps = log_decay
                .clone()
                .reshape([batch, heads, chunks, 1, chunk, 1]);
            segment_sums(steps, SumOver::UpTo).reshape([batch, heads, chunks, chunk, chunk])
        });
        let parts = Chunks {
            decay: running_sum(log_decay.clone(), 3, SumOver::UpTo),
            scalar_between,
            log_decay,
            key: cut(next()),
            value: cut(next()),
        };

        let state = &cell.states[form.state.0];
        let declared = [self.dims[state.shape[0].0], self.dims[state.shape[1].0]];
        let initial = match initial {
            Some(initial) => initial.reshape([batch, heads, declared[0], declared[1]]),
            None => Tensor::full(
                [batch, heads, declared[0], declared[1]],
                state.init,
                &device,
            ),
        };
        // The state as `[B, H, K, V]`.
        let initial = if form.key_axis == 1 {
            initial.swap_dims(2, 3)
        } else {
            initial
        };
        let (entering, last, pseudo_values) = match &form.delta {
            None => {
                let (entering, last) = self.chunk_states(&parts, initial);
                (entering, last, None)
            }
            Some(_) => {
                let read_back = cut(next());
                let delta = delta_chunk_states(&parts, read_back, initial);
                (delta.entering, delta.last, Some(delta.pseudo_values))
            }
        };

        let mut outputs = Vec::with_capacity(form.readouts.len());
        for readout in &form.readouts {
            let numel: usize = cell.outputs[readout.output.0]
                .indices
                .iter()
                .map(|&i| size(i))
                .product();
            let mut output = match &readout.query {
                Some(_) => {
                    let query = cut(next());
                    let read = match &pseudo_values {
                        None => {
                            self.intra_chunk(&parts, query.clone(), sub_chunk)
                                + self.inter_chunk(&parts, query, entering.clone())
                        }
                        Some(pseudo_values) => {
                            delta_read(&parts, query, entering.clone(), pseudo_values.clone())
                        }
                    };
                    let read = read
                        .reshape([batch, heads, chunks * chunk, values])
                        .slice([0..batch, 0..heads, 0..time, 0..values])
                        .swap_dims(1, 2);
                    match readout.scale {
                        Some(_) => read * next(),
                        None => read,
                    }
                }
                None => Tensor::zeros([batch, time, heads, numel], &device),
            };
            if readout.direct.is_some() {
                output = output + next();
            }
            outputs.push(output);
        }
        let last = if form.key_axis == 1 {
            last.swap_dims(2, 3)
        } else {
            last
        };
        Ok(ScanResult {
            outputs: Tensor::cat(outputs, 3),
            final_states: last.reshape([batch, heads, keys * values]),
        })
    }

    /// The states entering each chunk `[B, H, chunks, K, V]` and the state after the last one
    /// `[B, H, K, V]`, from the state `initial` entering the first.
    fn chunk_states<B: FusedCellBackend>(
        &self,
        parts: &Chunks<B>,
        initial: Tensor<B, 4>,
    ) -> (Tensor<B, 5>, Tensor<B, 4>) {
        let [batch, heads, chunks, chunk, width] = parts.decay.dims();
        let [keys, values] = [parts.key.dims()[4], parts.value.dims()[4]];
        // The decay over a whole chunk, b_C, and each step's decay from its write to the end.
        let total = reshapable(parts.decay.clone().slice([
            0..batch,
            0..heads,
            0..chunks,
            chunk - 1..chunk,
            0..width,
        ]));
        let to_end = running_sum(parts.log_decay.clone(), 3, SumOver::After).exp();
        let writes = match self.form.gate_axis {
            GateAxis::Scalar | GateAxis::Key => (parts.key.clone() * to_end)
                .swap_dims(3, 4)
                .matmul(parts.value.clone()),
            GateAxis::Value => parts
                .key
                .clone()
                .swap_dims(3, 4)
                .matmul(parts.value.clone() * to_end),
        };
        let total = match self.form.gate_axis {
            GateAxis::Scalar => total.reshape([batch, heads, chunks, 1, 1]),
            GateAxis::Key => total.reshape([batch, heads, chunks, keys, 1]),
            GateAxis::Value => total.reshape([batch, heads, chunks, 1, values]),
        };
        // Each chunk is the affine map S ↦ e^{total} ⊙ S + writes, applied chunk after chunk:
        // the walk writes the state entering each chunk, and the last chunk's map applied to
        // the state entering it gives the state after it.
        let entering = linear_scan(total.clone(), writes.clone(), initial, SumOver::Before);
        let last_chunk = |x: Tensor<B, 5>| -> Tensor<B, 4> {
            let [_, _, _, rows, columns] = x.dims();
            reshapable(x.narrow(2, chunks - 1, 1)).reshape([batch, heads, rows, columns])
        };
        let last = last_chunk(total).exp() * last_chunk(entering.clone()) + last_chunk(writes);
        (entering, last)
    }

    /// What each step reads of the state entering its chunk: `[B, H, chunks, C, V]`.
    fn inter_chunk<B: Backend>(
        &self,
        parts: &Chunks<B>,
        query: Tensor<B, 5>,
        entering: Tensor<B, 5>,
    ) -> Tensor<B, 5> {
        let from_start = parts.decay.clone().exp();
        match self.form.gate_axis {
            GateAxis::Scalar | GateAxis::Key => (query * from_start).matmul(entering),
            GateAxis::Value => query.matmul(entering) * from_start,
        }
    }

    /// What each step reads of the writes of its own chunk, up to itself: `[B, H, chunks, C, V]`.
    fn intra_chunk<B: FusedCellBackend>(
        &self,
        parts: &Chunks<B>,
        query: Tensor<B, 5>,
        sub_chunk: usize,
    ) -> Tensor<B, 5> {
        let [batch, heads, chunks, chunk, _] = query.dims();
        let device = query.device();
        let (key, value) = (parts.key.clone(), parts.value.clone());
        if self.form.gate_axis == GateAxis::Scalar {
            // One decay per step: e^{b_t − b_s} scales the [C, C] scores.
            let between = parts.scalar_between();
            let causal = lower_triangle::<B>(chunk, &device).reshape([1, 1, 1, chunk, chunk]);
            let scores = query.matmul(key.swap_dims(3, 4)) * masked_exp(between, causal);
            return scores.matmul(value);
        }
        let subs = chunk / sub_chunk;
        let split = |x: Tensor<B, 5>| -> Tensor<B, 6> {
            let width = x.dims()[4];
            x.reshape([batch, heads, chunks, subs, sub_chunk, width])
        };
        let log_decay = parts.log_decay.clone();
        let [q, k, v, x] = [query.clone(), key.clone(), value.clone(), log_decay].map(split);
        let width = x.dims()[5];
        let mut read = match self.form.gate_axis {
            GateAxis::Value => {
                // b_t − b_s for every pair s ≤ t, `[…, t, s, V]`, taken pairwise.
                let causal = lower_triangle::<B>(sub_chunk, &device)
                    .reshape([1, 1, 1, 1, sub_chunk, sub_chunk, 1]);
                let pairwise = masked_exp(segment_sums(x.clone(), SumOver::UpTo), causal);
                let scores = q
                    .clone()
                    .matmul(k.clone().swap_dims(4, 5))
                    .unsqueeze_dim::<7>(6);
                (scores * pairwise * v.unsqueeze_dim::<7>(4))
                    .sum_dim(5)
                    .reshape([batch, heads, chunks, subs, sub_chunk, width])
            }
            _ => {
                // The `[c, c]` scores of each sub-chunk by one kernel, which takes the
                // pairwise decays without storing them.
                let blocks = batch * heads * chunks * subs;
                let flat = |x: Tensor<B, 6>| x.reshape([blocks, sub_chunk, width]);
                decayed_scores(flat(q.clone()), flat(k.clone()), flat(x.clone()))
                    .reshape([batch, heads, chunks, subs, sub_chunk, sub_chunk])
                    .matmul(v)
            }
        };
        if subs > 1 {
            // Earlier sub-chunks: each decay split where the reading sub-chunk I starts:
            // b_t − b_{r−1} (r the first step of I), the steps of I up to t, and
            // b_{r−1} − b_s for s in an earlier sub-chunk J, the sum of the rest of J after
            // s and of the sub-chunks strictly between J and I.
            let to_reader = running_sum(x.clone(), 4, SumOver::UpTo).exp();
            let rest_of_writer = running_sum(x.clone(), 4, SumOver::After);
            // Σ_{J < K < I} of the sub-chunks' totals, `[…, I, J, width]`: the exponent of
            // the gates between sub-chunks.
            let totals = x
                .clone()
                .sum_dim(4)
                .reshape([batch, heads, chunks, 1, subs, width]);
            let between = segment_sums(totals, SumOver::Before)
                .reshape([batch, heads, chunks, subs, subs, width]);
            read = read
                + match self.form.gate_axis {
                    GateAxis::Value => {
                        // The decays multiply the values: expanded per reading sub-chunk.
                        let between = reshapable(
                            between
                                .unsqueeze_dim::<7>(5)
                                .expand([batch, heads, chunks, subs, subs, sub_chunk, width]),
                        )
                        .reshape([batch, heads, chunks, subs, chunk, width]);
                        let rest_of_writer =
                            rest_of_writer.reshape([batch, heads, chunks, 1, chunk, width]);
                        let before = earlier_sub_chunks::<B>(subs, sub_chunk, &device);
                        let from_writer = masked_exp(rest_of_writer + between, before);
                        let whole = |x: Tensor<B, 5>| -> Tensor<B, 6> {
                            let width = x.dims()[4];
                            x.unsqueeze_dim::<6>(3)
                                .expand([batch, heads, chunks, subs, chunk, width])
                        };
                        let scores = q.matmul(whole(key).swap_dims(4, 5));
                        scores.matmul(whole(value) * from_writer) * to_reader
                    }
                    _ => {
                        // The decays multiply the keys: e^{b_t − b_r} goes with the query,
                        // e^{rest of J after s} with the key, and the gates between the
                        // sub-chunks, `[…, I, J, K]`, stay apart for one kernel to apply.
                        let blocks = batch * heads * chunks;
                        let earlier = Tensor::<B, 2>::ones([subs, subs], &device)
                            .tril(-1)
                            .reshape([1, 1, 1, subs, subs, 1]);
                        let gates = masked_exp(between, earlier);
                        let flat = |x: Tensor<B, 6>| x.reshape([blocks, chunk, width]);
                        scores_across_sub_chunks(
                            flat(q * to_reader),
                            flat(k * rest_of_writer.exp()),
                            gates.reshape([blocks, subs, subs, width]),
                        )
                        .reshape([batch, heads, chunks, chunk, chunk])
                        .matmul(value.clone())
                        .reshape([
                            batch,
                            heads,
                            chunks,
                            subs,
                            sub_chunk,
                            value.dims()[4],
                        ])
                    }
                };
        }
        let values = read.dims()[5];
        read.reshape([batch, heads, chunks, chunk, values])
    }
}

/// `x` `[B, H, chunks, …]` moved `by` chunks later, the first `by` zero.
fn shifted<B: Backend>(x: Tensor<B, 5>, by: usize) -> Tensor<B, 5> {
    let [b, h, n, rows, columns] = x.dims();
    let padding = Tensor::zeros([b, h, by, rows, columns], &x.device());
    Tensor::cat(
        vec![
            padding,
            x.slice([0..b, 0..h, 0..n - by, 0..rows, 0..columns]),
        ],
        2,
    )
}

/// From the states after every chunk `[B, H, chunks, K, V]` and the initial state
/// `[B, H, 1, K, V]`: the states entering every chunk and the state after the last.
fn entering_and_last<B: Backend>(
    after: Tensor<B, 5>,
    initial: Tensor<B, 5>,
) -> (Tensor<B, 5>, Tensor<B, 4>) {
    let [batch, heads, chunks, keys, values] = after.dims();
    let last = reshapable(after.clone().slice([
        0..batch,
        0..heads,
        chunks - 1..chunks,
        0..keys,
        0..values,
    ]))
    .reshape([batch, heads, keys, values]);
    let entering = if chunks > 1 {
        let before_last = after.slice([0..batch, 0..heads, 0..chunks - 1, 0..keys, 0..values]);
        Tensor::cat(vec![initial, before_last], 2)
    } else {
        initial
    };
    (entering, last)
}

/// The delta rule's chunks: the states entering each, the last state, and the pseudo-values.
struct DeltaStates<B: Backend> {
    entering: Tensor<B, 5>,
    last: Tensor<B, 4>,
    /// u_t `[B, H, chunks, C, V]`, with `S_t = e^{b_t} S₀ + Σ_{s ≤ t} e^{b_t − b_s} κ_s u_sᵀ`
    /// in a chunk.
    pseudo_values: Tensor<B, 5>,
}

/// The delta rule with a scalar decay, `S_t = γ_t S_{t−1} + κ_t (ν_t − S_{t−1}ᵀ β_t)ᵀ`, chunk
/// by chunk in its WY/UT form (Yang et al. 2024, arXiv:2406.06484 and 2412.06464). Within a
/// chunk `S_t = e^{b_t} S₀ + Σ_{s ≤ t} e^{b_t − b_s} κ_s u_sᵀ`, so the pseudo-values
/// `u_t = ν_t − S_{t−1}ᵀ β_t` solve `(I + L) U = N − diag(e^{b_{t−1}}) B S₀` with
/// `L[t, s] = e^{b_{t−1} − b_s} β_t · κ_s` for s < t: `U = P − R S₀` for
/// `[P, R] = (I + L)⁻¹ [N, diag(e^{b_{t−1}}) B]` (the inverse by [`unit_lower_inverse`], every
/// chunk at once). Each chunk maps `S₀ ↦ (e^{b_C} I − K̃ᵀ R) S₀ + K̃ᵀ P` with
/// `κ̃_s = e^{b_C − b_s} κ_s`; the maps compose by a Hillis–Steele scan, with matrix products
/// (log₂ chunks rounds; a full map per chunk is no element-wise recurrence). Every
/// exponent is a sum of log decays between its two ends, never positive.
fn delta_chunk_states<B: FusedCellBackend>(
    parts: &Chunks<B>,
    read_back: Tensor<B, 5>,
    initial: Tensor<B, 4>,
) -> DeltaStates<B> {
    let [_, _, chunks, chunk, keys] = parts.key.dims();
    let values = parts.value.dims()[4];
    let device = read_back.device();
    let key = parts.key.clone();
    // b_{t−1} − b_s `[…, t, s]`: the segment sums moved one step later along t.
    let before_step = one_step_later(parts.scalar_between());
    let strictly_lower = Tensor::<B, 2>::ones([chunk, chunk], &device)
        .tril(-1)
        .reshape([1, 1, 1, chunk, chunk]);
    let coupling = read_back.clone().matmul(key.clone().swap_dims(3, 4))
        * masked_exp(before_step, strictly_lower);
    // e^{b_{t−1}}: the decay from the chunk's start to the step before t.
    let to_previous = one_step_later(parts.decay.clone()).exp();
    // X = (I + L)⁻¹ [N, diag(e^{b_{t−1}}) B].
    let right = Tensor::cat(vec![parts.value.clone(), read_back * to_previous], 4);
    let solved = unit_lower_inverse(coupling).matmul(right);
    let pseudo = reshapable(solved.clone().narrow(4, 0, values));
    let pseudo_keys = reshapable(solved.narrow(4, values, keys));
    // Chunk n maps S to G_n S + H_n; after round r, element n holds the composition of the
    // maps of chunks n − 2^r + 1 ..= n (the identity padding the first chunks).
    let identity = Tensor::<B, 2>::eye(keys, &device).reshape([1, 1, 1, keys, keys]);
    let whole_chunk = reshapable(parts.decay.clone().narrow(3, chunk - 1, 1)).exp();
    let key_t =
        (key * running_sum(parts.log_decay.clone(), 3, SumOver::After).exp()).swap_dims(3, 4);
    let mut map = identity.clone() * whole_chunk - key_t.clone().matmul(pseudo_keys.clone());
    let mut carried = key_t.matmul(pseudo.clone());
    let mut span = 1;
    while span < chunks {
        let earlier_map = shifted(map.clone() - identity.clone(), span) + identity.clone();
        carried = map.clone().matmul(shifted(carried.clone(), span)) + carried;
        map = map.matmul(earlier_map);
        span *= 2;
    }
    let initial = initial.unsqueeze_dim::<5>(2);
    let after = map.matmul(initial.clone()) + carried;
    let (entering, last) = entering_and_last(after, initial);
    let pseudo_values = pseudo - pseudo_keys.matmul(entering.clone());
    DeltaStates {
        entering,
        last,
        pseudo_values,
    }
}

/// `(I + L)⁻¹` for strictly lower triangular `L` `[…, C, C]`, by block forward substitution
/// in log₂ C rounds: with the inverses `A⁻¹`, `D⁻¹` of two neighbouring diagonal blocks of
/// `I + L` known, the block of twice their size is
/// `[[A, 0], [E, D]]⁻¹ = [[A⁻¹, 0], [−D⁻¹ E A⁻¹, D⁻¹]]`; every pair of every chunk at once, so a
/// round is a few batched matrix products (not one launch per row). A `C` that is not a power
/// of two is padded with identity rows.
fn unit_lower_inverse<B: Backend>(lower: Tensor<B, 5>) -> Tensor<B, 5> {
    let [batch, heads, chunks, chunk, _] = lower.dims();
    let device = lower.device();
    let padded = chunk.next_power_of_two();
    let lower = if padded > chunk {
        let rows = Tensor::zeros([batch, heads, chunks, padded - chunk, chunk], &device);
        let columns = Tensor::zeros([batch, heads, chunks, padded, padded - chunk], &device);
        Tensor::cat(vec![Tensor::cat(vec![lower, rows], 3), columns], 4)
    } else {
        lower
    };
    // The inverses of the diagonal blocks of size `size`: `[B, H, chunks, blocks, size, size]`.
    let mut inverses = Tensor::<B, 6>::ones([batch, heads, chunks, padded, 1, 1], &device);
    let mut size = 1;
    while size < padded {
        let pairs = padded / (2 * size);
        // The diagonal blocks of size 2·size of L, `[…, pairs, 2·size, 2·size]`: of the
        // `[pairs, pairs]` grid of blocks, those at p·(pairs + 1).
        let grid = reshapable(
            lower
                .clone()
                .reshape([batch, heads, chunks, pairs, 2 * size, pairs, 2 * size])
                .swap_dims(4, 5),
        )
        .reshape([batch, heads, chunks, pairs * pairs, 2 * size, 2 * size]);
        let diagonal: Vec<i64> = (0..pairs).map(|p| (p * (pairs + 1)) as i64).collect();
        let diagonal = Tensor::<B, 1, Int>::from_data(TensorData::new(diagonal, [pairs]), &device);
        let coupling = reshapable(
            grid.select(3, diagonal)
                .narrow(4, size, size)
                .narrow(5, 0, size),
        );
        let halves = inverses.reshape([batch, heads, chunks, pairs, 2 * size, size]);
        let first = reshapable(halves.clone().narrow(4, 0, size));
        let second = reshapable(halves.narrow(4, size, size));
        let below = -second.clone().matmul(coupling).matmul(first.clone());
        let zeros = Tensor::zeros([batch, heads, chunks, pairs, size, size], &device);
        inverses = Tensor::cat(
            vec![
                Tensor::cat(vec![first, zeros], 5),
                Tensor::cat(vec![below, second], 5),
            ],
            4,
        );
        size *= 2;
    }
    let inverse = inverses.reshape([batch, heads, chunks, padded, padded]);
    if padded > chunk {
        reshapable(inverse.narrow(3, 0, chunk).narrow(4, 0, chunk))
    } else {
        inverse
    }
}

/// What each step of the delta rule reads:
/// `o_t = e^{b_t} q_t S₀ + Σ_{s ≤ t} e^{b_t − b_s} (q_t · κ_s) u_s`, `[B, H, chunks, C, V]`.
fn delta_read<B: Backend>(
    parts: &Chunks<B>,
    query: Tensor<B, 5>,
    entering: Tensor<B, 5>,
    pseudo_values: Tensor<B, 5>,
) -> Tensor<B, 5> {
    let chunk = query.dims()[3];
    let causal = lower_triangle::<B>(chunk, &query.device()).reshape([1, 1, 1, chunk, chunk]);
    let scores = query.clone().matmul(parts.key.clone().swap_dims(3, 4))
        * masked_exp(parts.scalar_between(), causal);
    (query * parts.decay.clone().exp()).matmul(entering) + scores.matmul(pseudo_values)
}

/// `x` `[B, H, chunks, C, w]` moved one step later within each chunk, the first step 0.
fn one_step_later<B: Backend>(x: Tensor<B, 5>) -> Tensor<B, 5> {
    let [batch, heads, chunks, chunk, width] = x.dims();
    let first = Tensor::zeros([batch, heads, chunks, 1, width], &x.device());
    if chunk == 1 {
        return first;
    }
    Tensor::cat(vec![first, reshapable(x.narrow(3, 0, chunk - 1))], 3)
}

/// `e^x` where `mask` is 1, 0 where it is 0; the masked entries are zeroed before the
/// exponential, so that neither the value nor its gradient can overflow there.
fn masked_exp<B: Backend, const D: usize>(x: Tensor<B, D>, mask: Tensor<B, D>) -> Tensor<B, D> {
    (x * mask.clone()).exp() * mask
}

/// `[…, n, w]` → `[…, t, s, w]`: Σ_{s < u ≤ t} x_u where s ≤ t (`over` [`SumOver::UpTo`]), or
/// Σ_{s < u < t} where s < t ([`SumOver::Before`]), 0 elsewhere. Each entry is the sum of the
/// terms between s and t, not the difference of two sums from the start, so it keeps its
/// precision however far from 0 the sums from the start drift (saturated gates: by hundreds
/// within a chunk, where a difference would lose every digit a small entry has).
fn segment_sums<B: FusedCellBackend>(x: Tensor<B, 6>, over: SumOver) -> Tensor<B, 7> {
    assert!(
        matches!(over, SumOver::UpTo | SumOver::Before),
        "segment sums run from s to t"
    );
    let n = x.dims()[4];
    // 1 where s < u, `[u, s]`.
    let after = Tensor::<B, 2>::ones([n, n], &x.device())
        .tril(-1)
        .reshape([1, 1, 1, 1, n, n, 1]);
    running_sum(x.unsqueeze_dim::<7>(5) * after, 4, over)
}

/// `[n, n]`: 1 where column ≤ row.
fn lower_triangle<B: Backend>(n: usize, device: &B::Device) -> Tensor<B, 2> {
    Tensor::ones([n, n], device).tril(0)
}

/// `[1, 1, 1, subs, C, 1]`: 1 where step s of the chunk lies in a sub-chunk before sub-chunk I.
fn earlier_sub_chunks<B: Backend>(
    subs: usize,
    sub_chunk: usize,
    device: &B::Device,
) -> Tensor<B, 6> {
    let chunk = subs * sub_chunk;
    let mask: Vec<f32> = (0..subs)
        .flat_map(|reader| (0..chunk).map(move |s| f32::from(u8::from(s < reader * sub_chunk))))
        .collect();
    Tensor::from_data(TensorData::new(mask, [1, 1, 1, subs, chunk, 1]), device)
}
