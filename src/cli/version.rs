//! `prefgen --version`: which build this is and what it runs on this CPU,
//! for a bug report or a cluster's login node.

use crate::infer::qmatmul::{KERNEL_VAR, Kernel};

/// The text after `prefgen ` that `--version` prints: the version, the git
/// commit the binary was built from (`unknown` outside a git checkout, e.g.
/// from an sdist), the optional features compiled in, and the int8 kernel
/// this CPU gets.
pub fn long_version(commit: &str) -> String {
    let features = if cfg!(feature = "cuda") { "cuda" } else { "none (CPU only)" };
    let kernel = match Kernel::chosen() {
        Ok(k) if std::env::var_os(KERNEL_VAR).is_some() => format!("{} (set by {KERNEL_VAR})", k.name()),
        Ok(k) => format!("{} (the fastest this CPU has)", k.name()),
        Err(e) => format!("none: {e}"),
    };
    format!("{}\ncommit: {commit}\nfeatures: {features}\nint8 kernel: {kernel}", env!("CARGO_PKG_VERSION"))
}
