//! The reference cells of `cells/*.rak`, compiled with their kernels: `SimpleRnn`, `Gla`,
//! `RetNet`, `Mamba2`, `DeltaNet`, `Mlstm`, `Elman`; and [`all`], a table of them by file name.

use crate::codegen::schedule::{Pass, Schedule};
use crate::kernels::{CellKernels, KernelError, SourceTarget};

/// Prints one kernel of a cell: dims, heads, schedule, which kernel, which language.
type KernelSourceFn =
    fn(&[usize], usize, Schedule, Pass, SourceTarget) -> Result<String, KernelError>;

/// A built-in cell, for code that picks one by name (the command line).
#[derive(Clone, Copy, Debug)]
pub struct Builtin {
    /// The `.rak` file's name without extension, e.g. `simple_rnn`.
    pub file: &'static str,
    /// The cell's type name, e.g. `SimpleRnn`.
    pub name: &'static str,
    pub source: &'static str,
    kernel_source: KernelSourceFn,
}

impl Builtin {
    fn new<C: CellKernels>(file: &'static str) -> Self {
        Builtin {
            file,
            name: C::NAME,
            source: C::SOURCE,
            kernel_source: source_of::<C>,
        }
    }

    /// The CUDA C++ or WGSL source of one of its kernels (see [`crate::kernels::kernel_source`]).
    pub fn kernel_source(
        &self,
        dims: &[usize],
        heads: usize,
        schedule: Schedule,
        pass: Pass,
        target: SourceTarget,
    ) -> Result<String, KernelError> {
        (self.kernel_source)(dims, heads, schedule, pass, target)
    }

    /// The built-in cell with this file name (`simple_rnn`) or type name (`SimpleRnn`).
    pub fn find(name: &str) -> Option<Builtin> {
        all().into_iter().find(|b| b.file == name || b.name == name)
    }
}

#[cfg(feature = "wgpu")]
fn source_of<C: CellKernels>(
    dims: &[usize],
    heads: usize,
    schedule: Schedule,
    pass: Pass,
    target: SourceTarget,
) -> Result<String, KernelError> {
    crate::kernels::kernel_source::<C>(dims, heads, schedule, pass, target)
}

#[cfg(not(feature = "wgpu"))]
fn source_of<C: CellKernels>(
    _: &[usize],
    _: usize,
    _: Schedule,
    _: Pass,
    _: SourceTarget,
) -> Result<String, KernelError> {
    Err(KernelError(format!(
        "printing the kernels of {} needs rak built with the `wgpu` feature",
        C::NAME
    )))
}

include!(concat!(env!("OUT_DIR"), "/builtin_cells.rs"));
