//! # rak-codegen: the rak compiler
//!
//! Turns a cell written in rak's DSL into a checked, differentiated IR, in passes that each
//! live in their own module:
//!
//! 1. [`parse`]: tokens (from `rak::cell!` or a `.rak` file) → [`syntax`] tree;
//! 2. [`lower`]: syntax tree → [`ir`], resolving names and index scopes;
//! 3. [`check`]: index dim inference and the cell's semantic rules;
//! 4. [`autodiff`]: the backward step ([`ir::BackwardStep`]) by symbolic reverse-mode
//!    differentiation;
//! 5. [`chunkwise`]: recognises cells linear in their state and derives the factors of the
//!    chunked (matrix-multiply) form, which the runtime evaluates chunk by chunk;
//! 6. [`schedule`]: how the scans map onto the device (cubes, workspace, chunks), and whether a
//!    scan runs recurrent or chunked;
//! 7. [`emit`]: cubecl `#[cube]` kernels for the forward and backward scans, as Rust tokens.
//!
//! Around them: [`diagnostic`] (errors spanned to the user's tokens), [`interpret`] (the f64
//! reference interpreter, forward and backward, the oracle of every kernel test) and
//! [`display`] (the IR in the DSL's notation). This crate has no GPU dependency: it emits kernel
//! source, which the `rak::cell!` macro hands to cubecl.

pub mod autodiff;
pub mod check;
pub mod chunkwise;
pub mod diagnostic;
pub mod display;
pub mod emit;
pub mod interpret;
pub mod ir;
pub mod lower;
pub mod parse;
pub mod schedule;
pub mod syntax;

pub use diagnostic::{Diagnostic, Diagnostics};
pub use interpret::ScanShape;

use proc_macro2::TokenStream;

/// A cell that passed every check, with its derived backward step and what its launches need
/// from the passes after autodiff, worked out once.
#[derive(Clone, Debug)]
pub struct CompiledCell {
    pub cell: ir::Cell,
    pub backward: ir::BackwardStep,
    /// The launch-independent part of the schedule: split axis and workspace layouts.
    pub plan: schedule::ScanPlan,
    /// The chunked form of the cell, or why it has none.
    pub chunk_form: Result<chunkwise::ChunkForm, chunkwise::NotChunkable>,
}

/// Runs the front end and autodiff on a parsed cell.
pub fn compile_syntax(syntax: &syntax::CellSyntax) -> Result<CompiledCell, Diagnostics> {
    let mut cell = lower::lower(syntax)?;
    check::check(&mut cell)?;
    let backward = autodiff::differentiate(&cell);
    Ok(CompiledCell {
        plan: schedule::ScanPlan::new(&backward),
        chunk_form: chunkwise::chunk_form(&cell),
        cell,
        backward,
    })
}

/// Compiles the tokens of a cell (what `rak::cell!` receives).
pub fn compile(tokens: TokenStream) -> Result<CompiledCell, Diagnostics> {
    compile_syntax(&parse::parse_cell(tokens)?)
}

/// Compiles cell source text (the contents of a `.rak` file).
pub fn compile_str(source: &str) -> Result<CompiledCell, Diagnostics> {
    compile_syntax(&parse::parse_cell_str(source)?)
}

/// Implemented by every type that `rak::cell!` declares.
pub trait CellDefinition {
    /// The cell's name, as declared.
    const NAME: &'static str;
    /// The cell's source, as the macro received it.
    const SOURCE: &'static str;

    /// Compiles the cell again from its source (0.1–0.4 ms for the built-in cells; the macro
    /// already checked it). rak-runtime keeps one compiled cell per cell type and thread
    /// (`rak::kernels::compiled_cell`) rather than calling this at every launch.
    fn compile() -> CompiledCell {
        match compile_str(Self::SOURCE) {
            Ok(compiled) => compiled,
            Err(errors) => panic!(
                "`rak::cell!` accepted {} but it no longer compiles: {errors}",
                Self::NAME
            ),
        }
    }
}
