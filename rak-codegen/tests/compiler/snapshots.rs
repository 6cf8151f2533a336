//! Snapshots of every reference cell's IR, of the backward step autodiff derives from it, and
//! of the cubecl kernels the emitter generates (`snapshots/*.snap`; review changes with
//! `cargo insta review`). The CUDA and WGSL those kernels compile to are snapshotted in the
//! root crate's kernel tests.

use crate::common::*;
use rak_codegen::display::{backward_to_string, cell_to_string};

#[test]
fn ir_and_backward_step_of_every_cell() {
    for name in CELL_NAMES {
        let compiled = compile_cell(name);
        let text = format!(
            "{}\n{}",
            cell_to_string(&compiled.cell),
            backward_to_string(&compiled.backward)
        );
        insta::assert_snapshot!(name, text);
    }
}

#[test]
fn generated_kernels_of_every_cell() {
    for name in CELL_NAMES {
        let compiled = compile_cell(name);
        let source = rak_codegen::emit::kernels_source(&compiled);
        insta::assert_snapshot!(format!("{name}_kernels"), source);
    }
}

#[test]
fn the_reference_cells_are_all_present() {
    let mut found: Vec<String> = std::fs::read_dir(cell_path("x").parent().unwrap())
        .unwrap()
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            (path.extension()? == "rak")
                .then(|| path.file_stem().unwrap().to_string_lossy().into_owned())
        })
        .collect();
    found.sort();
    let mut expected: Vec<String> = CELL_NAMES.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(
        found, expected,
        "cells/ holds exactly the reference cells tested here"
    );
}
