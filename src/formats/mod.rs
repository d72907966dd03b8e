//! File formats: what prefgen reads from users and writes for them.

pub mod card;
pub mod features;
pub mod hf_disk;
pub mod hub_parquet;
pub mod plot;
pub mod pyjson;
pub mod simpo;
pub mod table;
