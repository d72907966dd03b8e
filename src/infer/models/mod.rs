//! Model architectures, each in its own file.

mod attention;
pub mod decoder;
pub mod family;
mod norm;
