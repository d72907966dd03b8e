//! `export`: the files users load, from every split's binarized rows: hub-layout
//! parquet, a `load_from_disk` folder and the dataset card.

use super::StageOutput;
use crate::formats::card::{self, CardInput, CardSplit};
use crate::formats::simpo::BinarizedRow;
use crate::formats::{hf_disk, hub_parquet};
use anyhow::Result;
use serde_json::Value;
use std::collections::BTreeMap;

pub const VERSION: u32 = 1;

/// One split's rows and the counts the upstream stages reported.
pub struct SplitRows {
    pub name: String,
    pub rows: Vec<BinarizedRow>,
    pub counts: BTreeMap<String, Value>,
}

pub fn build(
    name: &str,
    splits: &[SplitRows],
    rows_per_file: usize,
    params: BTreeMap<String, Value>,
    keys: Vec<(String, String)>,
) -> Result<StageOutput> {
    let mut out = StageOutput::default();
    for s in splits {
        out.files.extend(hub_parquet::write_split(&s.name, &s.rows, rows_per_file)?);
        out.stats.insert(format!("rows.{}", s.name), s.rows.len().into());
    }
    let pairs: Vec<(&str, &[BinarizedRow])> = splits.iter().map(|s| (s.name.as_str(), s.rows.as_slice())).collect();
    out.files.extend(hf_disk::write(&pairs, rows_per_file)?);
    let card = CardInput {
        name,
        splits: splits
            .iter()
            .map(|s| CardSplit { name: &s.name, rows: &s.rows, counts: s.counts.clone() })
            .collect(),
        params,
        keys,
    };
    out.files.push(("README.md".into(), card::render(&card).into_bytes()));
    Ok(out)
}
