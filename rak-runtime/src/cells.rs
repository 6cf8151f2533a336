//! The reference cells of `cells/*.rak`, compiled with their kernels: `SimpleRnn`, `Gla`,
//! `RetNet`, `Mamba2`, `DeltaNet`, `Mlstm`, `Elman`; and [`all`], a table of them by file name
//! for code that picks one at run time (the command line).

use crate::kernels::{
    CellKernels, CellRef, KernelError, KernelSource, ScanKernels, ScanRuntime, SourceOf,
};

/// Code generic over a cell type, run on a cell picked at run time ([`Builtin::visit`]).
pub trait CellVisitor {
    type Output;
    fn visit<C: CellKernels>(self) -> Self::Output;
}

/// A built-in cell.
#[derive(Clone, Copy, Debug)]
pub struct Builtin {
    /// The `.rak` file's name without extension, e.g. `simple_rnn`.
    pub file: &'static str,
    /// The cell's type name, e.g. `SimpleRnn`.
    pub name: &'static str,
    pub source: &'static str,
    /// The cell itself, its kernels compiled in this crate.
    pub cell: CellRef,
}

impl Builtin {
    fn new<C: CellKernels>(file: &'static str) -> Self {
        Builtin {
            file,
            name: C::NAME,
            source: C::SOURCE,
            cell: CellRef::of::<C>(),
        }
    }

    /// The built-in cell with this file name (`simple_rnn`) or type name (`SimpleRnn`).
    pub fn find(name: &str) -> Option<Builtin> {
        all().into_iter().find(|b| b.file == name || b.name == name)
    }

    /// This cell's kernels on runtime `R` (wgpu, or CUDA with the `cuda` feature), compiled in
    /// this crate: the caller compiles none of them.
    pub fn kernels<R: ScanRuntime>(&self) -> Box<dyn ScanKernels<R>> {
        self.cell.kernels::<R>()
    }

    /// The source of one of this cell's kernels ([`crate::kernels::kernel_source`]), compiled
    /// in this crate.
    pub fn kernel_source(&self, request: SourceOf) -> Result<KernelSource, KernelError> {
        self.visit(request)
    }

    /// Runs `visitor` with this cell's type.
    pub fn visit<V: CellVisitor>(&self, visitor: V) -> V::Output {
        visit_file(self.file, visitor).expect("every built-in cell has a visit arm")
    }
}

include!(concat!(env!("OUT_DIR"), "/builtin_cells.rs"));
