//! prefgen as a library: the command line in `main.rs` is a thin layer over
//! these modules, and the tests and benchmarks use them directly.

pub mod cache;
pub mod cli;
pub mod config;
pub mod digest;
#[cfg(test)]
mod docs;
pub mod formats;
pub mod hub;
pub mod infer;
pub mod input;
pub mod launch;
pub mod lock;
pub mod plan;
pub mod recipe;
pub mod redact;
pub mod run;
pub mod slurm;
pub mod stages;
pub mod verify;
