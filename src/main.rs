//! prefgen: on-policy preference datasets as a reproducible, cached,
//! make-style workflow. `main` parses the command line and dispatches.

use prefgen::cli::{self, Cli};
use std::process::ExitCode;

/// The commit `--version` names. Read here, in the binary's own small crate:
/// a new commit rebuilds this file, not the library.
const COMMIT: &str = git_version::git_version!(
    args = ["--always", "--exclude=*", "--abbrev=12", "--dirty=-modified"],
    fallback = "unknown"
);

fn main() -> ExitCode {
    // A launched server's reaper (src/launch.rs) is prefgen re-executed.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == prefgen::launch::REAPER) {
        return prefgen::launch::reaper(&args[2..]);
    }
    // SAFETY: nothing has started a thread yet.
    unsafe { prefgen::infer::settle_process() };
    // Rust ignores SIGPIPE, so printing to a closed pipe (`prefgen plan R |
    // head`) would panic; the default ends the process quietly, as it ends
    // `cat` or `seq`. Sockets are unaffected: std sends with MSG_NOSIGNAL.
    // SAFETY: no other thread exists yet to race on the signal disposition.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    match cli::dispatch(Cli::parse_built_from(COMMIT)) {
        Ok(code) => code,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("error: {}", prefgen::redact::redact(&chain.join(": ")));
            ExitCode::FAILURE
        }
    }
}
