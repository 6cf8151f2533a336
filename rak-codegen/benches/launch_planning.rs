//! What the host works out about a cell, per built-in cell: compiling it (`compile_str`: parse,
//! check, autodiff, chunked form, scan plan), which rak-runtime does once per cell and thread,
//! and, per launch, resolving the schedule of both scans at K = V = 128 for 64 sequences on an
//! H100's limits: from the plan kept in the compiled cell (what a launch does), and with the
//! plan built afresh first (split axis and workspace layouts: what every launch paid before
//! they were kept). Medians of 25 rounds of 40 calls each; prints a Markdown table.
//!
//! `cargo bench -p rak-codegen --bench launch_planning`

use rak_codegen::CompiledCell;
use rak_codegen::schedule::{DeviceLimits, Pass, ScanPlan, Schedule};
use std::hint::black_box;
use std::time::Instant;

const ROUNDS: usize = 25;
const CALLS: usize = 40;

/// The median over rounds of the time per call of `f`, in µs.
fn median_us(mut f: impl FnMut()) -> f64 {
    f();
    let mut rounds: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..CALLS {
                f();
            }
            start.elapsed().as_secs_f64() * 1e6 / CALLS as f64
        })
        .collect();
    rounds.sort_by(f64::total_cmp);
    rounds[ROUNDS / 2]
}

/// Resolves the forward and the backward schedule of `compiled`.
fn resolve_both(compiled: &CompiledCell, dims: &[usize], limits: DeviceLimits) {
    for pass in [Pass::Forward, Pass::Backward] {
        let resolved = Schedule::default().resolve(compiled, pass, dims, 64, limits);
        black_box(resolved.expect("the schedule resolves"));
    }
}

fn main() {
    let cells = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../cells");
    let mut paths: Vec<_> = std::fs::read_dir(&cells)
        .expect("the cells folder")
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "rak"))
        .collect();
    paths.sort();
    // An H100: 228 KiB of shared memory capped at 48 KiB, 132 multiprocessors.
    let limits = DeviceLimits {
        shared_memory_bytes: 48 * 1024,
        min_cubes: 264,
        precise_near_zero: true,
    };
    println!(
        "| cell | compile (µs) | both scans resolved from the kept plan (µs) | plan built afresh, then resolved (µs) |"
    );
    println!("|---|---:|---:|---:|");
    for path in paths {
        let source = std::fs::read_to_string(&path).expect("a readable cell");
        let compile = || rak_codegen::compile_str(&source).expect("a built-in cell compiles");
        let compiled = compile();
        let dims = vec![128; compiled.cell.dims.len()];
        let compile_us = median_us(|| {
            black_box(compile());
        });
        let kept_us = median_us(|| resolve_both(&compiled, &dims, limits));
        // The resolution reads the same plan whether it was built just before or kept.
        let afresh_us = median_us(|| {
            black_box(ScanPlan::new(&compiled.backward));
            resolve_both(&compiled, &dims, limits)
        });
        let name = compiled.cell.name;
        println!("| {name} | {compile_us:.1} | {kept_us:.2} | {afresh_us:.2} |");
    }
}
