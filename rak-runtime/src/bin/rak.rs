//! The `rak` command line; see [`rak_runtime::cli`].

use clap::Parser;

fn main() -> std::process::ExitCode {
    rak_runtime::cli::run(rak_runtime::cli::Cli::parse())
}
