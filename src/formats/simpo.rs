//! The rows of SimPO's on-policy files, field for field and in its key order.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use std::path::Path;

/// A row of `output_{seed}.json` (SimPO's `decode.py`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecodeRow {
    pub prompt: String,
    pub format_prompt: String,
    pub generated_text: String,
}

/// A row of `all_outputs.json` (SimPO's `post_process.py`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FilteredRow {
    pub prompt: String,
    pub all_generated_responses: Vec<String>,
}

/// A row of `all_outputs_rm.json` (SimPO's `reward_model_annotate.py`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoredRow {
    pub prompt: String,
    pub all_generated_responses: Vec<String>,
    pub all_rm_scores: Vec<f64>,
}

/// A chat message as the published datasets store it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A row of `all_outputs_bin.json`: a scored row with its preference pair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BinarizedRow {
    pub prompt: String,
    pub all_generated_responses: Vec<String>,
    pub all_rm_scores: Vec<f64>,
    pub chosen: Vec<Message>,
    pub rejected: Vec<Message>,
}

/// Parses a JSON array of rows from an artifact prefgen wrote.
pub fn parse_rows<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<Vec<T>> {
    serde_json::from_slice(bytes).with_context(|| format!("cannot parse {what}"))
}

/// Reads a JSON array of rows from a user's file, naming the file on error.
pub fn read_rows<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{}: not a JSON list of the expected rows", path.display()))
}
