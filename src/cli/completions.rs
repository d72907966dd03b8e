//! `prefgen completions SHELL`: a completion script written from the command
//! line's own definition, so it never lags behind a new flag.

use super::Cli;
use clap::CommandFactory;
use std::process::ExitCode;

/// Prints `shell`'s completion script for prefgen to stdout.
pub fn completions(shell: clap_complete::Shell) -> ExitCode {
    clap_complete::generate(shell, &mut Cli::command(), "prefgen", &mut std::io::stdout());
    ExitCode::SUCCESS
}
