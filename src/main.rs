//! The `rak` command line; see [`rak::runtime::cli`].

fn main() -> std::process::ExitCode {
    rak::runtime::cli::run(rak::runtime::cli::parse_args())
}
