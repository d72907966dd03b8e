//! `prefgen verify RECIPE --against PATH_OR_HUB_ID`: compares a recipe's
//! binarized rows with a published dataset (hub-layout parquet, a
//! `save_to_disk` folder, or a hub dataset id through the hub cache), split by
//! split: prompt sets, responses, scores within a tolerance, chosen and
//! rejected. Prints an agreement table and the first differing rows.

use crate::formats::simpo::{BinarizedRow, Message};
use crate::stages::generate::preview;
use anyhow::{Context, Result, anyhow, bail};
use arrow_array::{Array, RecordBatch, cast::AsArray, types};
use arrow_schema::DataType;
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The rows of a published dataset, by split, in file order.
pub type Splits = BTreeMap<String, Vec<BinarizedRow>>;

/// How a published dataset's files are laid out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Layout {
    /// `data/<split>-*.parquet` (or `<split>-*.parquet` anywhere below).
    HubParquet,
    /// A `save_to_disk` folder: `<split>/*.arrow`.
    SavedToDisk,
}

impl Layout {
    pub fn describe(self) -> &'static str {
        match self {
            Layout::HubParquet => "hub-layout parquet (<split>-*.parquet)",
            Layout::SavedToDisk => "a save_to_disk folder (<split>/*.arrow)",
        }
    }
}

/// Reads a published dataset: a folder with hub-layout parquet, or else a
/// `save_to_disk` folder (one layout, never both: prefgen's own `export.dir`
/// holds the same rows in each), or a hub dataset id (through the hub cache).
pub fn read_published(against: &str) -> Result<(Splits, Layout)> {
    let path = Path::new(against);
    let dir = if path.exists() {
        path.to_path_buf()
    } else if crate::recipe::looks_like_hub_id(against) {
        let (id, rev) = against.split_once('@').unwrap_or((against, "main"));
        let parquet = |files: &[String]| Ok(files.iter().filter(|f| f.ends_with(".parquet")).cloned().collect());
        crate::hub::snapshot(hf_hub::RepoType::Dataset, id, rev, parquet)?.0.dir
    } else {
        bail!("--against: {against} is neither a local folder nor a hub dataset id");
    };
    let files = crate::hub::list_files(&dir)?;
    let layout = if files.iter().any(|f| f.ends_with(".parquet")) { Layout::HubParquet } else { Layout::SavedToDisk };
    let mut splits: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for rel in files {
        let p = Path::new(&rel);
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let split = match (layout, p.extension().and_then(|e| e.to_str())) {
            // data/train-00000-of-00001.parquet, data/test_prefs-...parquet
            (Layout::HubParquet, Some("parquet")) => name.split('-').next().unwrap_or_default().to_string(),
            // save_to_disk: train/data-00000-of-00001.arrow
            (Layout::SavedToDisk, Some("arrow")) => {
                match p.parent().and_then(|d| d.file_name()).and_then(|n| n.to_str()) {
                    Some(split) => split.to_string(),
                    None => continue,
                }
            }
            _ => continue,
        };
        splits.entry(split).or_default().push(dir.join(p));
    }
    if splits.is_empty() {
        bail!("--against: {} holds no .parquet or .arrow files", dir.display());
    }
    let splits = splits
        .into_iter()
        .map(|(split, mut files)| {
            files.sort();
            let mut rows = Vec::new();
            for f in &files {
                for (n, row) in read_rows(f)?.into_iter().enumerate() {
                    rows.push(serde_json::from_value(Value::Object(row)).map_err(|e| {
                        anyhow!("{}: row {}: not a row of preference columns ({e})", f.display(), n + 1)
                    })?);
                }
            }
            Ok((split, rows))
        })
        .collect::<Result<Splits>>()?;
    Ok((splits, layout))
}

/// Every row of a `.parquet` or Arrow IPC stream (`.arrow`) file as JSON.
fn read_rows(path: &Path) -> Result<Vec<Map<String, Value>>> {
    let shown = path.display();
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {shown}"))?;
    let batches: Vec<RecordBatch> = if path.extension().is_some_and(|e| e == "arrow") {
        arrow_ipc::reader::StreamReader::try_new(file, None)
            .with_context(|| format!("{shown}: not an Arrow stream"))?
            .collect::<std::result::Result<_, _>>()?
    } else {
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .with_context(|| format!("{shown}: not a readable parquet file"))?
            .build()?
            .collect::<std::result::Result<_, _>>()?
    };
    let mut rows = Vec::new();
    for batch in batches {
        for i in 0..batch.num_rows() {
            let mut row = Map::new();
            for (field, col) in batch.schema().fields().iter().zip(batch.columns()) {
                let cell = value(col.as_ref(), i)
                    .with_context(|| format!("{shown}: row {}: column {:?}", rows.len() + 1, field.name()))?;
                row.insert(field.name().clone(), cell);
            }
            rows.push(row);
        }
    }
    Ok(rows)
}

/// Row `i` of an Arrow array as JSON, for the types preference data uses.
fn value(arr: &dyn Array, i: usize) -> Result<Value> {
    if arr.is_null(i) {
        return Ok(Value::Null);
    }
    let list = |items: std::sync::Arc<dyn Array>| -> Result<Value> {
        Ok(Value::Array((0..items.len()).map(|k| value(items.as_ref(), k)).collect::<Result<_>>()?))
    };
    Ok(match arr.data_type() {
        DataType::Utf8 => json!(arr.as_string::<i32>().value(i)),
        DataType::LargeUtf8 => json!(arr.as_string::<i64>().value(i)),
        DataType::Utf8View => json!(arr.as_string_view().value(i)),
        DataType::Float64 => number(arr.as_primitive::<types::Float64Type>().value(i))?,
        DataType::Float32 => number(arr.as_primitive::<types::Float32Type>().value(i) as f64)?,
        DataType::Int64 => json!(arr.as_primitive::<types::Int64Type>().value(i)),
        DataType::Int32 => json!(arr.as_primitive::<types::Int32Type>().value(i)),
        DataType::List(_) => list(arr.as_list::<i32>().value(i))?,
        DataType::LargeList(_) => list(arr.as_list::<i64>().value(i))?,
        DataType::Struct(fields) => {
            let s = arr.as_struct();
            let mut m = Map::new();
            for (f, col) in fields.iter().zip(s.columns()) {
                m.insert(f.name().clone(), value(col.as_ref(), i)?);
            }
            Value::Object(m)
        }
        other => return Err(anyhow!("a column of type {other}, which verify does not read")),
    })
}

/// A float as JSON; JSON has no NaN or infinity (serde_json would make
/// them null, read later as a missing value).
fn number(x: f64) -> Result<Value> {
    if !x.is_finite() {
        bail!("holds {x}, not a finite score");
    }
    Ok(json!(x))
}

/// `--tolerance`: a finite number >= 0.
pub fn parse_tolerance(text: &str) -> Result<f64> {
    match text.trim().parse::<f64>() {
        Ok(t) if t.is_finite() && t >= 0.0 => Ok(t),
        _ => bail!("{text:?}: expected a finite number >= 0, such as 1e-6"),
    }
}

/// One split's agreement.
#[derive(Debug, Default)]
pub struct Agreement {
    pub split: String,
    pub ours: usize,
    pub published: usize,
    pub common: usize,
    pub responses: usize,
    pub scores: usize,
    pub max_score_diff: f64,
    pub chosen: usize,
    pub rejected: usize,
    /// The first differences, described.
    pub differences: Vec<String>,
}

impl Agreement {
    pub fn agrees(&self) -> bool {
        self.ours == self.published
            && self.common == self.ours
            && [self.responses, self.scores, self.chosen, self.rejected].iter().all(|&n| n == self.common)
    }
}

const SHOWN: usize = 5;

/// Compares our rows of a split with the published ones, by prompt.
pub fn compare(split: &str, ours: &[BinarizedRow], published: &[BinarizedRow], tolerance: f64) -> Agreement {
    let mut a = Agreement { split: split.into(), ours: ours.len(), published: published.len(), ..Default::default() };
    let by_prompt: HashMap<&str, &BinarizedRow> = ours.iter().map(|r| (r.prompt.as_str(), r)).collect();
    let note = |a: &mut Agreement, line: String| {
        if a.differences.len() < SHOWN {
            a.differences.push(line);
        }
    };
    for (n, theirs) in published.iter().enumerate() {
        let at = format!("{split} row {} (prompt {:?})", n + 1, preview(&theirs.prompt));
        let Some(mine) = by_prompt.get(theirs.prompt.as_str()) else {
            note(&mut a, format!("{at}: not among the recipe's rows"));
            continue;
        };
        a.common += 1;
        if mine.all_generated_responses == theirs.all_generated_responses {
            a.responses += 1;
        } else {
            note(&mut a, format!("{at}: the responses differ"));
        }
        let diff = if mine.all_rm_scores.len() == theirs.all_rm_scores.len() {
            mine.all_rm_scores.iter().zip(&theirs.all_rm_scores).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
        } else {
            f64::INFINITY
        };
        a.max_score_diff = a.max_score_diff.max(diff);
        if diff <= tolerance {
            a.scores += 1;
        } else {
            note(&mut a, format!("{at}: scores differ by {diff:.3e}"));
        }
        for (name, count, m, t) in [
            ("chosen", &mut a.chosen, &mine.chosen, &theirs.chosen),
            ("rejected", &mut a.rejected, &mine.rejected, &theirs.rejected),
        ] {
            if m == t {
                *count += 1;
            } else if a.differences.len() < SHOWN {
                a.differences.push(format!("{at}: {name} differs: {}", first_difference(m, t)));
            }
        }
    }
    if a.ours != a.published {
        let line = format!("{split}: {} rows here, {} published", a.ours, a.published);
        note(&mut a, line);
    }
    if a.common < a.ours {
        let theirs: std::collections::HashSet<&str> = published.iter().map(|r| r.prompt.as_str()).collect();
        if let Some(r) = ours.iter().find(|r| !theirs.contains(r.prompt.as_str())) {
            note(&mut a, format!("{split}: prompt {:?} is the recipe's but not published", preview(&r.prompt)));
        }
    }
    a
}

/// Where two conversations first part: the turn, its role, and both texts
/// from a little before their first differing character (the last turn
/// alone, or the texts' first characters, could show two equal strings).
fn first_difference(ours: &[Message], published: &[Message]) -> String {
    let n = ours.iter().zip(published).take_while(|(a, b)| a == b).count();
    let (a, b) = (ours.get(n), published.get(n));
    let from = match (a, b) {
        (Some(a), Some(b)) => a.content.chars().zip(b.content.chars()).take_while(|(x, y)| x == y).count(),
        _ => 0,
    };
    let start = from.saturating_sub(20);
    let shown = |m: Option<&Message>| match m {
        None => "no such turn".to_string(),
        Some(m) => {
            let text: String = m.content.chars().skip(start).collect();
            let lead = if start > 0 { "…" } else { "" };
            format!("{} {:?}", m.role, format!("{lead}{}", preview(&text)))
        }
    };
    format!("turn {}: ours {}, published {}", n + 1, shown(a), shown(b))
}

/// The agreement table, one row per split.
pub fn table(results: &[Agreement], tolerance: f64) -> String {
    let mut out = format!(
        "| split | prompts (ours / published / common) | responses equal | scores within {tolerance:e} (largest difference) | chosen equal | rejected equal |\n|---|---|---|---|---|---|\n"
    );
    for a in results {
        out.push_str(&format!(
            "| {} | {} / {} / {} | {} / {} | {} / {} ({:.3e}) | {} / {} | {} / {} |\n",
            a.split,
            a.ours,
            a.published,
            a.common,
            a.responses,
            a.common,
            a.scores,
            a.common,
            a.max_score_diff,
            a.chosen,
            a.common,
            a.rejected,
            a.common
        ));
    }
    out
}
