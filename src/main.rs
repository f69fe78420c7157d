//! `o2tr-proxy`: the command-line entry point. Parses arguments and calls
//! the library (see `cli`); nothing else.
#![forbid(unsafe_code)]

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
