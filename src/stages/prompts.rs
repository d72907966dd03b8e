//! `prompts`: a dataset split's column, de-duplicated and sorted by code point
//! (Python's `sorted(set(...))`; UTF-8 byte order is code point order).

use super::{At, Counts, External, Keyed, StageOutput};
use crate::cache::Cache;
use crate::digest::Digest;
use crate::formats::table::{self, Cell};
use crate::hub;
use crate::input::Kind;
use crate::recipe::{self, PromptSource};
use anyhow::{Result, anyhow, bail};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

pub const VERSION: u32 = 1;
pub const FILE: &str = "prompts.json";

/// `[prompts]`'s keyed values, and the split's source, keyed by what it holds.
pub fn keyed(at: &At) -> Keyed {
    let spec = at.recipe.splits().into_iter().find(|s| s.name == at.split).expect("nodes name recipe splits");
    Keyed {
        params: at.recipe.prompts.keyed(),
        externals: BTreeMap::from([(recipe::prompts::dataset.to_string(), External::Prompts(spec.source))]),
    }
}

/// A prompt source resolved to files, with an identity for the action key.
pub struct Resolved {
    pub files: Vec<PathBuf>,
    /// Local files: their contents; hub: repository, commit and file names.
    pub identity: Digest,
    /// For messages and the card: `org/name@<sha>` or the local path.
    pub describe: String,
}

/// The data files of `split` among a folder's files: `split.ext`, `split-*.ext`
/// (the hub's `data/train-00000-of-00001.parquet`) or anything under a `split/`
/// folder; every data file when `split` is None.
pub fn split_files(files: &[String], split: Option<&str>) -> Vec<String> {
    files
        .iter()
        .filter(|f| table::is_table_file(Path::new(f)) && !f.split('/').any(|p| p.starts_with('.')))
        .filter(|f| {
            let Some(split) = split else { return true };
            let stem = Path::new(f).file_stem().and_then(|s| s.to_str()).unwrap_or("");
            stem == split || stem.starts_with(&format!("{split}-")) || f.split('/').rev().skip(1).any(|d| d == split)
        })
        .cloned()
        .collect()
}

/// Finds the files behind a source and what identifies their contents.
pub fn resolve(source: &PromptSource, cache: &Cache) -> Result<Resolved> {
    match source {
        PromptSource::Hub { id, revision, split } => {
            let pick = |files: &[String]| {
                let picked = split_files(files, Some(split));
                if picked.is_empty() {
                    bail!("dataset {id}@{revision} has no data files for split {split:?}");
                }
                Ok(picked)
            };
            let (snap, files) = hub::snapshot(hf_hub::RepoType::Dataset, id, revision, pick)?;
            let names: Vec<String> =
                files.iter().map(|f| f.strip_prefix(&snap.dir).unwrap_or(f).to_string_lossy().into_owned()).collect();
            // Files at a commit never change: the commit and names identify them.
            let identity = Digest::of_json(&("hub-dataset", &snap.id, &snap.commit, &names));
            Ok(Resolved { files, identity, describe: format!("{id}@{}", snap.commit) })
        }
        PromptSource::Local { path, split } => {
            let files = if crate::input::kind(path).map_err(|e| anyhow!("prompt source {e}"))? == Kind::Folder {
                let all = hub::list_files(path)?;
                let picked = split_files(&all, split.as_deref());
                if picked.is_empty() {
                    match split {
                        Some(s) => bail!(
                            "{}: no .parquet/.jsonl/.json files for split {s:?} (named {s}.*, {s}-*, or under {s}/)",
                            path.display()
                        ),
                        None => bail!("{}: no .parquet, .jsonl or .json files", path.display()),
                    }
                }
                picked.iter().map(|f| path.join(f)).collect()
            } else {
                vec![path.clone()]
            };
            let mut parts = Vec::new();
            for f in &files {
                let rel = f.strip_prefix(path).unwrap_or(f).to_string_lossy().into_owned();
                parts.push((rel, cache.file_digest(f)?));
            }
            Ok(Resolved { files, identity: Digest::of_json(&("local", &parts)), describe: path.display().to_string() })
        }
    }
}

/// The prompt of one cell: the string, or the first user turn of a chat.
fn prompt_of(cell: Cell, file: &Path, row: usize, column: &str) -> Result<String> {
    match cell {
        Cell::Text(s) => Ok(s),
        Cell::Messages(msgs) => msgs
            .into_iter()
            .find(|m| m.role == "user")
            .map(|m| m.content)
            .ok_or_else(|| anyhow!("{}: row {row}: the {column:?} chat has no user turn", file.display())),
        Cell::Unusable(what) => bail!("{}: row {row}: column {column:?} holds {what}, not a prompt", file.display()),
    }
}

/// Builds the sorted prompt set from the source files.
pub fn build(files: &[PathBuf], section: &recipe::Prompts) -> Result<StageOutput> {
    let (column, limit) = (section.column.as_str(), section.limit);
    let mut set = BTreeSet::new();
    let mut rows = 0usize;
    for file in files {
        for (i, cell) in table::read_column(file, column)?.into_iter().enumerate() {
            set.insert(prompt_of(cell, file, i + 1, column)?);
            rows += 1;
        }
    }
    if set.is_empty() {
        let shown: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        bail!("the prompt set is empty ({} has no rows)", shown.join(", "));
    }
    let unique = set.len();
    let take = if limit == 0 { unique } else { limit.min(unique) };
    let prompts: Vec<String> = set.into_iter().take(take).collect();
    let counts = Counts {
        source_rows: Some(rows as u64),
        unique_prompts: Some(unique as u64),
        prompts: Some(take as u64),
        ..Counts::default()
    };
    StageOutput::rows(FILE, prompts, counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_files_follow_hub_naming() {
        let files: Vec<String> = [
            "README.md",
            "data/train_prefs-00000-of-00001.parquet",
            "data/train_gen-00000-of-00001.parquet",
            "data/test_prefs-00000-of-00001.parquet",
            "test/part.jsonl",
            ".cache/x.json",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(split_files(&files, Some("train_prefs")), ["data/train_prefs-00000-of-00001.parquet"]);
        assert_eq!(split_files(&files, Some("test")), ["test/part.jsonl"]);
        assert_eq!(split_files(&files, None).len(), 4);
    }

    #[test]
    fn prompts_are_sorted_unique_and_limited() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("p.jsonl");
        let rows = [
            r#"{"prompt": "b"}"#,
            r#"{"prompt": "a"}"#,
            r#"{"prompt": "b"}"#,
            r#"{"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "é"}]}"#,
            r#"{"prompt": "Z"}"#,
        ];
        std::fs::write(&f, rows.join("\n")).unwrap();
        let parse = |out: StageOutput| crate::formats::simpo::parse_rows::<String>(&out.files[0].1, "prompts").unwrap();
        let section = |column: &str, limit| recipe::Prompts { column: column.into(), limit, ..Default::default() };
        assert_eq!(parse(build(std::slice::from_ref(&f), &section("prompt", 0)).unwrap()), ["Z", "a", "b", "é"]);
        assert_eq!(parse(build(std::slice::from_ref(&f), &section("prompt", 2)).unwrap()), ["Z", "a"]);
        let e = build(&[f], &section("question", 0)).err().expect("no such column").to_string();
        assert!(e.contains("p.jsonl: line 1 has no column \"question\""), "{e}");
    }
}
