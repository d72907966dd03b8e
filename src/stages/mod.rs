//! The stages: pure functions from input artifacts and parameters to output
//! files. Keys, caching, locking and progress live in the runner, not here.

pub mod annotate;
pub mod binarize;
pub mod export;
pub mod filter;
pub mod generate;
pub mod prompts;

use serde_json::Value;
use std::collections::BTreeMap;

/// What a stage produced: files (paths relative to its folder under
/// `export.dir`) and counts for the card.
#[derive(Debug, Default)]
pub struct StageOutput {
    pub files: Vec<(String, Vec<u8>)>,
    pub stats: BTreeMap<String, Value>,
}

impl StageOutput {
    pub fn file(path: impl Into<String>, bytes: Vec<u8>) -> StageOutput {
        StageOutput { files: vec![(path.into(), bytes)], stats: BTreeMap::new() }
    }

    pub fn stat(mut self, name: &str, value: impl Into<Value>) -> StageOutput {
        self.stats.insert(name.to_string(), value.into());
        self
    }
}
