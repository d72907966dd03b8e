//! prefgen: on-policy preference datasets as a reproducible, cached,
//! make-style workflow. `main` parses the command line and dispatches.

use clap::Parser;
use prefgen::cli::{self, Cli};
use std::process::ExitCode;

fn main() -> ExitCode {
    // SAFETY: nothing has started a thread yet.
    unsafe { prefgen::infer::settle_thread_count() };
    match cli::dispatch(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("error: {}", prefgen::redact::redact(&chain.join(": ")));
            ExitCode::FAILURE
        }
    }
}
