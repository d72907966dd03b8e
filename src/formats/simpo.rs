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

/// The text a row carries, for sizing the buffer it is written into.
pub trait TextLen {
    fn text_len(&self) -> usize;
}

impl TextLen for String {
    fn text_len(&self) -> usize {
        self.len()
    }
}

impl TextLen for DecodeRow {
    fn text_len(&self) -> usize {
        self.prompt.len() + self.format_prompt.len() + self.generated_text.len()
    }
}

impl TextLen for FilteredRow {
    fn text_len(&self) -> usize {
        self.prompt.len() + self.all_generated_responses.iter().map(String::len).sum::<usize>()
    }
}

impl TextLen for ScoredRow {
    fn text_len(&self) -> usize {
        self.prompt.len()
            + self.all_generated_responses.iter().map(String::len).sum::<usize>()
            + 24 * self.all_rm_scores.len()
    }
}

impl TextLen for BinarizedRow {
    fn text_len(&self) -> usize {
        let messages = |m: &[Message]| m.iter().map(|m| m.content.len() + 64).sum::<usize>();
        self.prompt.len()
            + self.all_generated_responses.iter().map(String::len).sum::<usize>()
            + 24 * self.all_rm_scores.len()
            + messages(&self.chosen)
            + messages(&self.rejected)
    }
}

/// About how large the rows' JSON will be (keys and indentation included;
/// escapes not, so the buffer may still grow for non-ASCII text).
pub fn json_size<T: TextLen>(rows: &[T]) -> usize {
    rows.iter().map(|r| r.text_len() + 160).sum()
}

/// Parses a JSON array of rows from an artifact prefgen wrote.
pub fn parse_rows<T: DeserializeOwned + Send>(bytes: &[u8], what: &str) -> Result<Vec<T>> {
    parse(bytes).with_context(|| format!("cannot parse {what}"))
}

/// Reads a JSON array of rows from a user's file, naming the file on error.
pub fn read_rows<T: DeserializeOwned + Send>(path: &Path) -> Result<Vec<T>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse(&bytes).with_context(|| format!("{}: not a JSON list of the expected rows", path.display()))
}

/// Where a new top-level row begins in `json.dump(rows, indent=4)` output.
/// JSON strings cannot hold a raw newline, and nested values are indented
/// deeper, so this only ever matches between rows.
const ROW_START: &[u8] = b",\n    {";

/// Parses a list of rows, in parallel chunks when it is laid out as
/// `json.dump(indent=4)` lays it out (SimPO's files and prefgen's artifacts).
fn parse<T: DeserializeOwned + Send>(bytes: &[u8]) -> serde_json::Result<Vec<T>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads == 1 || bytes.len() < 1 << 20 || !bytes.starts_with(b"[\n    {") || !bytes.ends_with(b"\n]") {
        return serde_json::from_slice(bytes);
    }
    let mut cuts = vec![1];
    for k in 1..threads {
        let from = (bytes.len() * k / threads).max(*cuts.last().expect("cuts start non-empty"));
        if let Some(at) = bytes[from..].windows(ROW_START.len()).position(|w| w == ROW_START) {
            cuts.push(from + at + 1); // just after the comma
        }
    }
    cuts.push(bytes.len() - 1); // before the closing bracket
    cuts.dedup();
    let parts: Vec<serde_json::Result<Vec<T>>> = std::thread::scope(|scope| {
        let handles: Vec<_> =
            cuts.windows(2).map(|w| scope.spawn(move || parse_elements(&bytes[w[0]..w[1]]))).collect();
        handles.into_iter().map(|h| h.join().expect("parsing does not panic")).collect()
    });
    let mut rows = Vec::new();
    for part in parts {
        rows.extend(part?);
    }
    Ok(rows)
}

/// Parses `row, row, ..., row,` (a slice of a list's inside).
fn parse_elements<T: DeserializeOwned>(chunk: &[u8]) -> serde_json::Result<Vec<T>> {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        while pos < chunk.len() && (chunk[pos].is_ascii_whitespace() || (chunk[pos] == b',' && !out.is_empty())) {
            pos += 1;
        }
        if pos == chunk.len() {
            return Ok(out);
        }
        let mut stream = serde_json::Deserializer::from_slice(&chunk[pos..]).into_iter::<T>();
        match stream.next() {
            Some(row) => out.push(row?),
            None => return Ok(out),
        }
        pos += stream.byte_offset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_parse_equals_plain_parse() {
        let rows: Vec<FilteredRow> = (0..3000)
            .map(|i| FilteredRow {
                prompt: format!("p{i} {{\n    ,"),
                all_generated_responses: vec![format!("r,\n    {{{i} {}", "x".repeat(100)); 3],
            })
            .collect();
        let bytes = crate::formats::pyjson::to_vec(&rows, 0).unwrap();
        assert!(bytes.len() > 1 << 20);
        assert_eq!(parse::<FilteredRow>(&bytes).unwrap(), rows);
        assert_eq!(serde_json::from_slice::<Vec<FilteredRow>>(&bytes).unwrap(), rows);
        // A damaged row is an error, not a skipped row.
        let mut bad = bytes.clone();
        let i = bad.len() / 2 + bad[bad.len() / 2..].iter().position(|b| *b == b'"').unwrap();
        bad[i] = b'x';
        assert!(parse::<FilteredRow>(&bad).is_err());
    }
}
