//! The schedule pass: which axis each reference cell's scans split along, and how each
//! gradient is held across the tiles.

use crate::common::{CELL_NAMES, compile_cell};
use rak_codegen::ir::{Grad, InputId, StateId};
use rak_codegen::schedule::{DeviceLimits, GradSplit, Pass, Placement, Schedule, split_plan};

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
    }
}

/// An open tile is halved until the workspace fits shared memory and the grid has enough
/// cubes; the placement follows.
#[test]
fn resolving_chooses_tile_and_placement() {
    let compiled = compile_cell("simple_rnn");
    let step = &compiled.backward;
    let open = Schedule::default();
    // K = V = 128, 64 sequences: S and its new value alone are 2 × 128 × 128 × 4 = 128 KiB;
    // at tile 32: 8 staged steps of inputs (3 × 128 + 32) + 2 × 128 × 32 + 32 floats = 45 KiB.
    let resolved = open
        .resolve(step, Pass::Forward, &[128, 128], 64, limits(48 * 1024, 1))
        .unwrap();
    assert_eq!(resolved.tile, Some(32));
    assert_eq!(resolved.placement, Placement::Shared);
    // More cubes wanted: smaller tiles.
    let resolved = open
        .resolve(step, Pass::Forward, &[128, 128], 64, limits(48 * 1024, 512))
        .unwrap();
    assert_eq!(resolved.tile, Some(16));
    // Elman has no split axis: no tile; too large for shared memory: global.
    let elman = compile_cell("elman");
    let resolved = open
        .resolve(&elman.backward, Pass::Backward, &[4096], 1, limits(1024, 1))
        .unwrap();
    assert_eq!(
        (resolved.tile, resolved.placement),
        (None, Placement::Global)
    );
}

/// Shared memory asked for and not enough: refused with the sizes.
#[test]
fn shared_memory_too_small_is_refused() {
    let compiled = compile_cell("simple_rnn");
    let schedule = Schedule {
        tile: Some(128),
        placement: Placement::Shared,
        ..Schedule::default()
    };
    let error = schedule
        .resolve(
            &compiled.backward,
            Pass::Forward,
            &[128, 128],
            1,
            limits(48 * 1024, 1),
        )
        .unwrap_err();
    assert!(
        error.starts_with(
            "the forward workspace of cell `SimpleRnn` needs 147968 bytes of shared memory per \
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
