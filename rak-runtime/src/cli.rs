//! The `rak` command line.
//!
//! - `rak check CELL...`: compiles `.rak` files and reports every error with its location;
//! - `rak show CELL [--backward]`: prints a cell's IR, and the backward step derived from it;
//! - `rak emit CELL [--target rust|cuda|wgsl]`: prints the kernels generated for a cell.

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
    /// CUDA C++ (what NVRTC compiles on an NVIDIA GPU).
    Cuda,
    /// WGSL (what wgpu runs).
    Wgsl,
}

/// Which kernel `rak emit` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelPass {
    Forward,
    Backward,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Compile cells (`.rak` files) and report any error.
    Check {
        /// The `.rak` files to check.
        #[arg(required = true)]
        cells: Vec<PathBuf>,
    },
    /// Print the kernels generated for a cell: the cubecl Rust source, or the CUDA C++ or WGSL
    /// that cubecl compiles it to (built-in cells only; no GPU needed).
    Emit {
        /// A `.rak` file, or a built-in cell (`simple_rnn`, `gla`, `retnet`, `mamba2`,
        /// `deltanet`, `mlstm`, `elman`).
        cell: String,
        #[arg(long, value_enum, default_value_t = Target::Rust)]
        target: Target,
        /// Which kernel (CUDA and WGSL only; the Rust source holds both).
        #[arg(long, value_enum, default_value_t = KernelPass::Forward)]
        pass: KernelPass,
        /// The size of every dim (CUDA and WGSL kernels are specialised on them).
        #[arg(long, default_value_t = 64)]
        dim: usize,
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

/// The source `rak emit` prints.
fn emit(cell: &str, target: Target, pass: KernelPass, dim: usize) -> Result<String, String> {
    let builtin = crate::cells::Builtin::find(cell);
    if target == Target::Rust {
        let compiled = match builtin {
            Some(builtin) => compile_str(builtin.source).map_err(|e| e.to_string())?,
            None => compile_file(Path::new(cell))?,
        };
        return Ok(rak_codegen::emit::kernels_source(&compiled.backward));
    }
    let Some(builtin) = builtin else {
        let names: Vec<&str> = crate::cells::all().iter().map(|b| b.file).collect();
        return Err(format!(
            "error: CUDA and WGSL sources exist for the cells compiled into rak ({}); `{cell}` is not one. \
             Declare your cell with `rak::cell!` and call `rak::kernels::kernel_source` from your crate.",
            names.join(", ")
        ));
    };
    let compiled = compile_str(builtin.source).map_err(|e| e.to_string())?;
    let dims = vec![dim; compiled.cell.dims.len()];
    let pass = match pass {
        KernelPass::Forward => rak_codegen::schedule::Pass::Forward,
        KernelPass::Backward => rak_codegen::schedule::Pass::Backward,
    };
    let target = match target {
        Target::Cuda => crate::kernels::SourceTarget::Cuda,
        _ => crate::kernels::SourceTarget::Wgsl,
    };
    builtin
        .kernel_source(&dims, 1, Default::default(), pass, target)
        .map_err(|e| format!("error: {e}"))
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
            target,
            pass,
            dim,
        } => match emit(&cell, target, pass, dim) {
            Ok(source) => {
                print!("{source}");
                ExitCode::SUCCESS
            }
            Err(report) => {
                eprintln!("{}", report.trim_end());
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
