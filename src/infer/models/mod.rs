//! Model architectures, each in its own file.

pub mod decoder;
