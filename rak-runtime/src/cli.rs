//! The `rak` command line.
//!
//! - `rak check CELL...`: compiles `.rak` files and reports every error with its location;
//! - `rak show CELL [--backward]`: prints a cell's IR, and the backward step derived from it.

use clap::{Parser, Subcommand};
use rak_codegen::display::{backward_to_string, cell_to_string};
use rak_codegen::{CompiledCell, compile_str};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "rak",
    version,
    about = "A compiler for recurrent neural network cells"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// What `rak emit` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// The `#[cube]` Rust source of the forward and backward kernels.
    Rust,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Compile cells (`.rak` files) and report any error.
    Check {
        /// The `.rak` files to check.
        #[arg(required = true)]
        cells: Vec<PathBuf>,
    },
    /// Print the kernels generated for a cell.
    Emit {
        /// A `.rak` file.
        cell: PathBuf,
        /// What to print: the generated cubecl Rust source.
        #[arg(long, value_enum, default_value_t = Target::Rust)]
        target: Target,
    },
    /// Print a cell's IR, in the DSL's notation.
    Show {
        /// A `.rak` file.
        cell: PathBuf,
        /// Also print the backward step derived by automatic differentiation.
        #[arg(long)]
        backward: bool,
    },
}

/// Reads and compiles a `.rak` file; the error is ready to print (rendered diagnostics or an
/// I/O error naming the file).
pub fn compile_file(path: &Path) -> Result<CompiledCell, String> {
    let source = std::fs::read_to_string(path)
        .map_err(|error| format!("error: cannot read `{}`: {error}", path.display()))?;
    compile_str(&source).map_err(|errors| errors.render(&source, &path.display().to_string()))
}

/// Runs the command line; returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Check { cells } => {
            let mut failed = false;
            for path in cells {
                match compile_file(&path) {
                    Ok(compiled) => {
                        let cell = &compiled.cell;
                        println!(
                            "ok: {} ({}): {} dims, {} inputs, {} params, {} states, {} outputs",
                            cell.name,
                            path.display(),
                            cell.dims.len(),
                            cell.inputs.len(),
                            cell.params.len(),
                            cell.states.len(),
                            cell.outputs.len()
                        );
                    }
                    Err(report) => {
                        eprint!("{report}");
                        failed = true;
                    }
                }
            }
            if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Command::Emit {
            cell,
            target: Target::Rust,
        } => match compile_file(&cell) {
            Ok(compiled) => {
                print!("{}", rak_codegen::emit::kernels_source(&compiled.backward));
                ExitCode::SUCCESS
            }
            Err(report) => {
                eprint!("{report}");
                ExitCode::FAILURE
            }
        },
        Command::Show { cell, backward } => match compile_file(&cell) {
            Ok(compiled) => {
                print!("{}", cell_to_string(&compiled.cell));
                if backward {
                    println!();
                    print!("{}", backward_to_string(&compiled.backward));
                }
                ExitCode::SUCCESS
            }
            Err(report) => {
                eprint!("{report}");
                ExitCode::FAILURE
            }
        },
    }
}
