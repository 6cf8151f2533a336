//! The reference cells of `cells/*.rak`, compiled with their kernels: `SimpleRnn`, `Gla`,
//! `RetNet`, `Mamba2`, `DeltaNet`, `Mlstm`, `Elman`.

include!(concat!(env!("OUT_DIR"), "/builtin_cells.rs"));
