//! The schedule pass: which axis each reference cell's scans split along, and how each
//! gradient is held across the tiles.

use crate::common::{CELL_NAMES, compile_cell};
use rak_codegen::display::value_name;
use rak_codegen::ir::{BackwardStep, Expr, Grad, InputId, StateId, Value};
use rak_codegen::schedule::{
    Buffer, DeviceLimits, GradSplit, Pass, Placement, Schedule, WorkspaceLayout, carried_in_place,
    carried_register_grads, definition_phases, in_place_states, recomputed_register_states,
    register_states, split_plan, split_sum_parts,
};
use std::collections::BTreeSet;

/// The split axis of every reference cell, by name (`None`: one cube per sequence).
#[test]
fn split_axis_of_every_reference_cell() {
    let mut found = Vec::new();
    for name in CELL_NAMES {
        let compiled = compile_cell(name);
        let axis =
            split_plan(&compiled.backward).map(|plan| compiled.cell.dims[plan.dim.0].name.clone());
        found.push(format!("{name}: {}", axis.as_deref().unwrap_or("none")));
    }
    assert_eq!(
        found,
        [
            "simple_rnn: V",
            "gla: V",
            "retnet: V",
            "mamba2: P",
            "deltanet: V",
            "mlstm: V",
            "elman: none",
        ]
    );
}

/// SimpleRNN split along V: the gradients of q, k, g (over K) are per-tile parts, the gradient
/// of v and of the state are complete in each tile.
#[test]
fn simple_rnn_gradients_across_tiles() {
    let compiled = compile_cell("simple_rnn");
    let plan = split_plan(&compiled.backward).unwrap();
    let input = |name: &str| {
        let id = compiled
            .cell
            .inputs
            .iter()
            .position(|i| i.name == name)
            .unwrap();
        plan.grad(Grad::Input(InputId(id)))
    };
    assert_eq!(input("q"), GradSplit::Partial);
    assert_eq!(input("k"), GradSplit::Partial);
    assert_eq!(input("g"), GradSplit::Partial);
    assert_eq!(input("v"), GradSplit::Local);
    assert_eq!(plan.grad(Grad::StatePrevious(StateId(0))), GradSplit::Local);
}

/// mLSTM: the normaliser n and the max m have no V axis; their gradients are carried through
/// time as per-tile parts.
#[test]
fn mlstm_carries_partial_state_gradients() {
    let compiled = compile_cell("mlstm");
    let plan = split_plan(&compiled.backward).unwrap();
    let state = |name: &str| {
        let id = compiled
            .cell
            .states
            .iter()
            .position(|s| s.name == name)
            .unwrap();
        StateId(id)
    };
    assert_eq!(plan.grad(Grad::StatePrevious(state("C"))), GradSplit::Local);
    assert_eq!(
        plan.grad(Grad::StatePrevious(state("n"))),
        GradSplit::Partial
    );
    assert_eq!(
        plan.grad(Grad::StateFromNext(state("n"))),
        GradSplit::Partial
    );
    assert_eq!(
        plan.grad(Grad::StatePrevious(state("m"))),
        GradSplit::Partial
    );
}

fn limits(shared_memory_bytes: usize, min_cubes: usize) -> DeviceLimits {
    DeviceLimits {
        shared_memory_bytes,
        min_cubes,
        precise_near_zero: true,
    }
}

/// The backward's workspace holds an input before its activation only where the backward
/// step reads it: the derivatives of softplus (Mamba2's `dt`) and log-sigmoid (GLA's `a`,
/// mLSTM's `f_gate`) take their argument, that of sigmoid (SimpleRNN's `k`, `g`) its result,
/// and an input without activation has none. The forward's never holds one.
#[test]
fn inputs_before_activation_kept_only_where_read() {
    let mut found = Vec::new();
    for name in CELL_NAMES {
        let compiled = compile_cell(name);
        for pass in [Pass::Forward, Pass::Backward] {
            let layout = WorkspaceLayout::new(&compiled.backward, pass);
            for buffer in layout.buffers {
                if let Buffer::InputPreActivation(input) = buffer {
                    let input = &compiled.cell.inputs[input.0].name;
                    found.push(format!("{name} {pass:?}: {input}"));
                }
            }
        }
    }
    assert_eq!(
        found,
        [
            "gla Backward: a",
            "mamba2 Backward: dt",
            "mlstm Backward: f_gate"
        ]
    );
}

/// The backward step writes the state gradients it carries to the step before over those
/// carried from the step after, for every state of every reference cell (only the state's own
/// gradient reads the latter, first), so its workspace has no buffer for the former; the
/// forward's has neither.
#[test]
fn state_gradients_carried_in_place() {
    for name in CELL_NAMES {
        let compiled = compile_cell(name);
        let step = &compiled.backward;
        let every_state: Vec<StateId> = (0..compiled.cell.states.len()).map(StateId).collect();
        let carried: Vec<StateId> = carried_in_place(step).into_iter().collect();
        assert_eq!(carried, every_state, "{name}");
        let layout = WorkspaceLayout::new(step, Pass::Backward);
        for state in every_state {
            let from_next = Buffer::Grad(Grad::StateFromNext(state));
            let previous = Buffer::Grad(Grad::StatePrevious(state));
            assert!(layout.buffers.contains(&from_next), "{name}");
            assert!(!layout.buffers.contains(&previous), "{name}");
        }
    }
}

/// The backward step's definitions in phases between barriers: SimpleRNN's 10 definitions
/// in 3 phases (a barrier after each made 10).
#[test]
fn simple_rnn_backward_definitions_in_three_phases() {
    let compiled = compile_cell("simple_rnn");
    let step = &compiled.backward;
    let phases: Vec<Vec<String>> = definition_phases(step)
        .into_iter()
        .map(|phase| {
            let grad = |d: usize| Value::Grad(step.definitions[d].grad);
            phase
                .into_iter()
                .map(|d| value_name(&step.cell, grad(d)))
                .collect()
        })
        .collect();
    assert_eq!(
        phases,
        [
            vec!["dS", "dq"],
            vec!["dq_pre", "dk", "dv", "dg", "dS_prev"],
            vec!["dk_pre", "dv_pre", "dg_pre"],
        ]
    );
}

/// For every reference cell, each definition comes in a later phase than every definition
/// whose gradient it reads, and `dS_{t−1}` (written over `dS_from_next`) in a later phase than
/// every definition that reads `dS_from_next`; every definition is in exactly one phase.
#[test]
fn backward_phases_follow_every_dependency() {
    for name in CELL_NAMES {
        let compiled = compile_cell(name);
        let step = &compiled.backward;
        let cell = &step.cell;
        let phases = definition_phases(step);
        let mut phase_of = vec![None; step.definitions.len()];
        for (n, phase) in phases.iter().enumerate() {
            for &d in phase {
                assert_eq!(phase_of[d], None, "{name}: definition {d} twice");
                phase_of[d] = Some(n);
            }
        }
        let phase_of: Vec<usize> = phase_of.into_iter().map(|p| p.unwrap()).collect();
        let grads_read = |d: usize| -> Vec<Grad> {
            let reachable = cell.reachable(&[step.definitions[d].expr]);
            let loads = reachable.into_iter().map(|e| cell.exprs.get(e).clone());
            loads
                .filter_map(|expr| match expr {
                    Expr::Load {
                        value: Value::Grad(grad),
                        ..
                    } => Some(grad),
                    _ => None,
                })
                .collect()
        };
        for (reader, _) in step.definitions.iter().enumerate() {
            for grad in grads_read(reader) {
                if let Some(writer) = step.definitions.iter().position(|d| d.grad == grad) {
                    assert!(phase_of[writer] < phase_of[reader], "{name}: {grad:?}");
                }
                if let Grad::StateFromNext(state) = grad {
                    let mut over = step.definitions.iter();
                    let previous = over.position(|d| d.grad == Grad::StatePrevious(state));
                    assert!(phase_of[reader] < phase_of[previous.unwrap()], "{name}");
                }
            }
        }
    }
}

/// An open tile is halved until the workspace fits shared memory and the grid has enough
/// cubes; the placement follows.
#[test]
fn resolving_chooses_tile_and_placement() {
    let compiled = compile_cell("simple_rnn");
    // What `schedule` resolves to for `pass` at K = V = 128, 64 sequences, 48 KiB of shared
    // memory and at least `min_cubes` cubes.
    let simple_rnn = |schedule: Schedule, pass, min_cubes| {
        let limits = limits(48 * 1024, min_cubes);
        schedule
            .resolve(&compiled, pass, &[128, 128], 64, limits)
            .unwrap()
    };
    let open = Schedule::default();
    // S alone (updated in place) is 128 × 128 × 4 = 64 KiB; at tile 64: 8 staged steps of
    // inputs (3 × 128 + 64) + 128 × 64 + 64 floats of the sum + 64 partial sums = 46.5 KiB.
    let resolved = simple_rnn(open, Pass::Forward, 1);
    assert_eq!(resolved.tile, Some(64));
    // The backward workspace holds more per step (S_{t−1}, S_t, their gradients: 4 × 128 ×
    // 16 floats at tile 16; q, k, g activated and their gradients; no input before activation,
    // since σ' = σ(1 − σ) reads the result; dS_{t−1} over dS_from_next): tile 16 under the
    // forward's 128 units and split sums, 39 744 bytes.
    let resolved = simple_rnn(open.same_for_both_passes(), Pass::Backward, 1);
    assert_eq!(resolved.tile, Some(16));
    assert_eq!(resolved.placement, Placement::Shared);
    // The backward's own schedule by default: 64 units, unsplit sums.
    let resolved = simple_rnn(open, Pass::Backward, 1);
    assert_eq!((resolved.cube_dim, resolved.sum_parts), (64, 1));
    assert_eq!(resolved.tile, Some(16));
    assert_eq!(resolved.placement, Placement::Shared);
    // More cubes wanted: smaller tiles.
    let resolved = simple_rnn(open, Pass::Forward, 512);
    assert_eq!(resolved.tile, Some(16));
    // Elman has no split axis: no tile; too large for shared memory: global.
    let elman = compile_cell("elman");
    let resolved = open
        .resolve(&elman, Pass::Backward, &[4096], 1, limits(1024, 1))
        .unwrap();
    assert_eq!(
        (resolved.tile, resolved.placement),
        (None, Placement::Global)
    );
}

/// Every reference cell resolves in both passes from the plan kept in its compiled cell, and
/// the placement chosen agrees with the shared-memory size of a workspace laid out afresh from
/// the backward step: shared where it fits, global where it does not.
#[test]
fn every_cell_resolves_from_its_kept_plan() {
    let limit = 48 * 1024;
    let mut placements = BTreeSet::new();
    for name in CELL_NAMES {
        let compiled = compile_cell(name);
        let step = &compiled.backward;
        assert_eq!(compiled.plan.split, split_plan(step), "{name}");
        for dim in [16, 128, 512] {
            let dims = vec![dim; compiled.cell.dims.len()];
            for pass in [Pass::Forward, Pass::Backward] {
                let resolved = Schedule::default()
                    .resolve(&compiled, pass, &dims, 8, limits(limit, 16))
                    .unwrap_or_else(|error| panic!("{name} {pass:?} at {dim}: {error}"));
                let mut tiled = dims.clone();
                let mut cubes = 1;
                if let (Some(plan), Some(tile)) = (&compiled.plan.split, resolved.tile) {
                    tiled[plan.dim.0] = tile;
                    cubes = dim.div_ceil(tile);
                }
                assert_eq!(
                    compiled.plan.tiling(&dims, resolved.tile),
                    (cubes, tiled.clone()),
                    "{name} {pass:?} at {dim}"
                );
                let layout = WorkspaceLayout::new(step, pass);
                assert_eq!(layout.buffers, compiled.plan.layout(pass).buffers, "{name}");
                let bytes = layout.step_size(&step.cell, &tiled, &resolved) * 4;
                let expected = match bytes <= limit {
                    true => Placement::Shared,
                    false => Placement::Global,
                };
                assert_eq!(
                    resolved.placement, expected,
                    "{name} {pass:?} at {dim}: {bytes} bytes"
                );
                placements.insert(format!("{:?}", resolved.placement));
            }
        }
    }
    // Both outcomes occur among these shapes.
    assert_eq!(placements.len(), 2, "{placements:?}");
}

/// Cutting a sequence into cubes: the split axis (SimpleRNN's V, the second dim) tiled, the
/// last tile partial, a tile past the axis clamped to it; no tile, or no split axis (Elman):
/// one cube with every dim whole.
#[test]
fn tiling_cuts_the_split_axis_only() {
    let simple_rnn = compile_cell("simple_rnn");
    let plan = &simple_rnn.plan;
    assert_eq!(plan.tiling(&[128, 100], Some(32)), (4, vec![128, 32]));
    assert_eq!(plan.tiling(&[128, 100], Some(48)), (3, vec![128, 48]));
    assert_eq!(plan.tiling(&[128, 100], Some(512)), (1, vec![128, 100]));
    assert_eq!(plan.tiling(&[128, 100], None), (1, vec![128, 100]));
    let elman = compile_cell("elman");
    assert_eq!(elman.plan.tiling(&[64], Some(8)), (1, vec![64]));
}

/// Shared memory asked for and not enough: refused with the sizes.
#[test]
fn shared_memory_too_small_is_refused() {
    let compiled = compile_cell("simple_rnn");
    // 64 units: the split sums' buffer (one f32 per unit) is part of the figure.
    let schedule = Schedule {
        tile: Some(128),
        placement: Placement::Shared,
        cube_dim: 64,
        ..Schedule::default()
    };
    let error = schedule
        .resolve(
            &compiled,
            Pass::Forward,
            &[128, 128],
            1,
            limits(48 * 1024, 1),
        )
        .unwrap_err();
    assert!(
        error.starts_with(
            "the forward workspace of cell `SimpleRnn` needs 82688 bytes of shared memory per \
             cube (tile 128), the device offers 49152"
        ),
        "{error}"
    );
}

#[test]
fn chunked_scans_for_long_sequences_of_linear_cells_only() {
    use rak_codegen::schedule::{CHUNKED_MIN_CHUNKS, ScanKind, pick_scan};
    let long = CHUNKED_MIN_CHUNKS * 64;
    assert_eq!(pick_scan(true, long, 64), ScanKind::Chunked);
    assert_eq!(pick_scan(true, long - 1, 64), ScanKind::Recurrent);
    assert_eq!(pick_scan(false, 100 * long, 64), ScanKind::Recurrent);
    // Decoding one token at a time stays recurrent.
    assert_eq!(pick_scan(true, 1, 1), ScanKind::Recurrent);
}

/// Which states the forward step overwrites in place: every state of every reference cell;
/// none where a state's update reads other elements of it directly (not through a sum computed
/// first), or where another update or an output reads its previous value.
#[test]
fn states_updated_in_place() {
    for name in CELL_NAMES {
        let compiled = compile_cell(name);
        let all: Vec<StateId> = (0..compiled.cell.states.len()).map(StateId).collect();
        let in_place: Vec<StateId> = in_place_states(&compiled.cell).into_iter().collect();
        assert_eq!(in_place, all, "{name}");
    }
    let cases = [
        // The update is a sum over other elements of h: computed directly, element by element.
        (
            "update h[i] = sum(j) R[i, j] * h[j];",
            "state h[D];",
            vec![],
        ),
        // The same sum inside a larger expression is computed into a buffer first.
        (
            "update h[i] = tanh(sum(j) R[i, j] * h[j]);",
            "state h[D];",
            vec![0],
        ),
        // Each update reads the other's previous value: neither; only b reads a: b.
        (
            "update a[i] = b[i]; update b[i] = a[i];",
            "state a[D], b[D];",
            vec![],
        ),
        (
            "update a[i] = a[i]; update b[i] = a[i] + b[i];",
            "state a[D], b[D];",
            vec![1],
        ),
    ];
    for (updates, states, expected) in cases {
        let source = format!(
            "cell T {{ dims D; input x[D]; param R[D, D] = normal(0.0, 0.1); {states} {updates} \
             output y[i] = x[i] + h_or_a[i]; }}"
        );
        let output = if states.contains("h[D]") { "h" } else { "a" };
        let source = source.replace("h_or_a", output);
        let compiled = rak_codegen::compile_str(&source).unwrap_or_else(|e| panic!("{e}"));
        let found: Vec<usize> = in_place_states(&compiled.cell)
            .into_iter()
            .map(|s| s.0)
            .collect();
        assert_eq!(found, expected, "{updates}");
    }
}

/// The states `select` holds in registers in each reference cell, as `cell: names`.
fn held_by_reference_cells(select: fn(&BackwardStep) -> BTreeSet<StateId>) -> Vec<String> {
    let mut found = Vec::new();
    for name in CELL_NAMES {
        let compiled = compile_cell(name);
        let cell = &compiled.cell;
        let held: Vec<&str> = (select(&compiled.backward).into_iter())
            .map(|s| cell.states[s.0].name.as_str())
            .collect();
        found.push(format!("{name}: {}", held.join(" ")));
    }
    found
}

/// For each case (updates, outputs, expected state ids) of a one-dim cell with the input `x`
/// and the state `S` (and `T` where the updates name it): the states `select` holds.
fn check_held_states(
    select: fn(&BackwardStep) -> BTreeSet<StateId>,
    cases: &[(&str, &str, Vec<usize>)],
) {
    for (updates, outputs, expected) in cases {
        let states = if updates.contains("T[") {
            "state S[D, D], T[D, D];"
        } else {
            "state S[D, D];"
        };
        let source = format!("cell T {{ dims D; input x[D]; {states} {updates} {outputs} }}");
        let compiled = rak_codegen::compile_str(&source).unwrap_or_else(|e| panic!("{e}"));
        let found: Vec<usize> = (select(&compiled.backward).into_iter())
            .map(|s| s.0)
            .collect();
        assert_eq!(&found, expected, "{updates} {outputs}");
    }
}

/// Which states the forward scan may hold in registers: every state of the linear reference
/// cells, mLSTM's `C` and `n` but not `m` (its lets read `m` element-wise), not Elman's `h`
/// (each `h[i]` sums all of `h`); none where a sum reads the state at other indices than the
/// summed index followed by the sum's elements, where a sum reads two states, or where a
/// statement reads it outside a sum.
#[test]
fn states_held_in_registers() {
    assert_eq!(
        held_by_reference_cells(|step| register_states(&step.cell)),
        [
            "simple_rnn: S",
            "gla: S",
            "retnet: S",
            "mamba2: h",
            "deltanet: S",
            "mlstm: C n",
            "elman: ",
        ]
    );
    let cases = [
        // The cell's own pattern: the summed index first, then the output's.
        (
            "update S[i, j] = S[i, j] + x[i];",
            "output o[j] = sum(i) x[i] * S[i, j];",
            vec![0],
        ),
        // Summed along the second axis.
        (
            "update S[i, j] = S[i, j] + x[i];",
            "output o[i] = sum(j) x[j] * S[i, j];",
            vec![],
        ),
        // Read element-wise by an output.
        (
            "update S[i, j] = S[i, j] + x[i];",
            "output o[i, j] = S[i, j];",
            vec![],
        ),
        // Inside a larger expression: the sum is computed into a buffer first, still aligned.
        (
            "update S[i, j] = S[i, j] + x[i];",
            "output o[j] = tanh(sum(i) x[i] * S[i, j]);",
            vec![0],
        ),
        // One sum reads two states.
        (
            "update S[i, j] = S[i, j] + x[i]; update T[i, j] = T[i, j] * x[i];",
            "output o[j] = sum(i) S[i, j] * T[i, j];",
            vec![],
        ),
        // T's update is itself a sum: S only.
        (
            "update S[i, j] = S[i, j] + x[i]; update T[i, j] = sum(l) x[l] * x[j];",
            "output o[j] = sum(i) x[i] * S[i, j];",
            vec![0],
        ),
    ];
    check_held_states(|step| register_states(&step.cell), &cases);
}

/// The states the backward scan's recomputation holds in registers: updated in place and read
/// by the lets and updates only at the element their own update writes, never inside a sum
/// (the outputs, which it does not evaluate, may read them any way).
#[test]
fn states_the_recomputation_holds_in_registers() {
    assert_eq!(
        held_by_reference_cells(|step| recomputed_register_states(&step.cell)),
        [
            "simple_rnn: S",
            "gla: S",
            "retnet: S",
            "mamba2: h",
            "deltanet: ",
            "mlstm: C n",
            "elman: ",
        ]
    );
    let cases = [
        // Read by an output element-wise: the recomputation evaluates no output.
        (
            "update S[i, j] = S[i, j] + x[i];",
            "output o[i, j] = S[i, j];",
            vec![0],
        ),
        // Its update sums over it (as DeltaNet's).
        (
            "update S[i, j] = S[i, j] + sum(l) x[l] * S[l, j];",
            "output o[j] = sum(i) x[i] * S[i, j];",
            vec![],
        ),
        // Read by a let.
        (
            "let a[i, j] = S[i, j] * x[i]; update S[i, j] = S[i, j] + a[i, j];",
            "output o[j] = sum(i) x[i] * S[i, j];",
            vec![],
        ),
        // Two states summed together by an output (which keeps them out of the forward
        // scan's registers): both held.
        (
            "update S[i, j] = S[i, j] + x[i]; update T[i, j] = T[i, j] * x[i];",
            "output o[j] = sum(i) S[i, j] * T[i, j];",
            vec![0, 1],
        ),
        // Read by another state's update: not updated in place, so not held; T is.
        (
            "update S[i, j] = S[i, j] + x[i]; update T[i, j] = T[i, j] * S[i, j];",
            "output o[j] = sum(i) x[i] * T[i, j];",
            vec![1],
        ),
        // Transposed read in its own update.
        (
            "update S[i, j] = S[j, i] + x[i];",
            "output o[j] = sum(i) x[i] * S[i, j];",
            vec![],
        ),
    ];
    check_held_states(|step| recomputed_register_states(&step.cell), &cases);
}

/// Which states' gradients the backward walk carries in registers: those of the linear reference
/// cells; not Elman's (`dh_{t−1}` is a sum), nor mLSTM's (the gradients of `n` and `m` are
/// per-tile parts, and `dC_{t−1}`'s phase comes before the sums that read `dC`); none where
/// `dS_{t−1}` is a sum or reads `dS` at another element than its own.
#[test]
fn gradients_the_walk_carries_in_registers() {
    assert_eq!(
        held_by_reference_cells(carried_register_grads),
        [
            "simple_rnn: S",
            "gla: S",
            "retnet: S",
            "mamba2: h",
            "deltanet: S",
            "mlstm: ",
            "elman: ",
        ]
    );
    let cases = [
        // SimpleRNN's form.
        (
            "update S[i, j] = S[i, j] * x[i] + x[j];",
            "output o[j] = sum(i) x[i] * S[i, j];",
            vec![0],
        ),
        // dS_{t−1} is a sum over the state (as Elman's).
        (
            "update S[i, j] = sum(l) x[l] * S[l, j];",
            "output o[j] = sum(i) x[i] * S[i, j];",
            vec![],
        ),
        // dS_{t−1} reads dS at other elements than its own.
        (
            "update S[i, j] = S[j, i] + x[i];",
            "output o[j] = sum(i) x[i] * S[i, j];",
            vec![],
        ),
        // Two states: T's gradient is read by dS_{t−1}'s definition, S's by T's.
        (
            "update S[i, j] = S[i, j] * x[i] + T[i, j]; update T[i, j] = T[i, j] + x[j];",
            "output o[j] = sum(i) x[i] * S[i, j];",
            vec![0, 1],
        ),
    ];
    check_held_states(carried_register_grads, &cases);
}

/// Whether a launch holds SimpleRNN's state in registers: when each sum's elements (the tile
/// of V) fit the units, unless switched off.
#[test]
fn launches_holding_states_in_registers() {
    let compiled = compile_cell("simple_rnn");
    // Registers asked for (or not) in both scans.
    let schedule = |cube_dim: u32, tile: usize, registers: bool| Schedule {
        cube_dim,
        tile: Some(tile),
        registers,
        recompute_registers: registers,
        ..Schedule::default()
    };
    let holds = |cube_dim: u32, tile: usize, registers: bool| {
        schedule(cube_dim, tile, registers).holds_states_in_registers(&compiled, &[128, 128])
    };
    assert!(holds(256, 64, true));
    assert!(holds(64, 64, true));
    assert!(!holds(64, 128, true));
    assert!(!holds(256, 64, false));
    // The recomputation: as many units per position along K as the cube has for it, so at
    // least one wherever the tile fits the units; on unless switched off.
    let recomputes = |cube_dim: u32, tile: usize, registers: bool| {
        schedule(cube_dim, tile, registers).recomputes_in_registers(&compiled, &[128, 128])
    };
    assert!(recomputes(64, 16, true));
    assert!(recomputes(64, 64, true));
    assert!(!recomputes(64, 128, true));
    assert!(!recomputes(64, 16, false));
    assert!(Schedule::default().recompute_registers);
    assert_eq!(split_sum_parts(256, 8, 128, 64), 4);
    assert_eq!(split_sum_parts(512, 8, 128, 32), 8);
    assert_eq!(split_sum_parts(64, 8, 3, 5), 3);
    assert_eq!(split_sum_parts(64, 8, 128, 128), 0);
}
