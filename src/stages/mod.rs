//! The stages: pure functions from input artifacts and parameters to output
//! files. Keys, caching, locking and progress live in the runner, not here.

pub mod annotate;
pub mod binarize;
pub mod export;
pub mod filter;
pub mod generate;
pub mod prompts;

use crate::formats::{
    pyjson,
    simpo::{self, TextLen},
};
use serde::Serialize;
use serde_json::Value;
use std::any::Any;
use std::collections::BTreeMap;
use std::sync::Arc;

/// A stage's rows in typed form (a `Vec` of its row type).
pub type Rows = Arc<dyn Any + Send + Sync>;

/// What a stage produced: files (paths relative to its folder under
/// `export.dir`), counts for the card, and the rows of its one JSON file in
/// typed form, so readers in the same run need not parse what was just written.
#[derive(Default)]
pub struct StageOutput {
    pub files: Vec<(String, Vec<u8>)>,
    pub stats: BTreeMap<String, Value>,
    pub rows: Option<Rows>,
}

impl StageOutput {
    /// One JSON file of rows, written as SimPO's scripts write theirs.
    pub fn rows<T: Serialize + TextLen + Send + Sync + 'static>(
        path: &str,
        rows: Vec<T>,
    ) -> serde_json::Result<StageOutput> {
        let bytes = pyjson::to_vec(&rows, simpo::json_size(&rows))?;
        Ok(StageOutput { files: vec![(path.to_string(), bytes)], stats: BTreeMap::new(), rows: Some(Arc::new(rows)) })
    }

    pub fn stat(mut self, name: &str, value: impl Into<Value>) -> StageOutput {
        self.stats.insert(name.to_string(), value.into());
        self
    }
}
