//! The `rak` command line; see [`rak::runtime::cli`].

use clap::Parser;

fn main() -> std::process::ExitCode {
    rak::runtime::cli::run(rak::runtime::cli::Cli::parse())
}
