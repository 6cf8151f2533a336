//! Tests of the compiler: the seven reference cells, the reference interpreter against the
//! formulas and against finite differences, error reports, snapshots of the IR, and fuzzing of
//! the front end. One test binary for the whole crate.

mod chunkwise;
mod common;
mod errors;
mod fuzz;
mod gradients;
mod random_cells;
mod reference;
mod schedule;
mod snapshots;
