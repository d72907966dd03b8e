//! `export`: the files users load, from every split's binarized rows: hub-layout
//! parquet, a `load_from_disk` folder and the dataset card.

use super::StageOutput;
use crate::formats::card::{self, CardInput, CardSplit};
use crate::formats::simpo::BinarizedRow;
use crate::formats::{hf_disk, hub_parquet};
use anyhow::Result;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;

pub const VERSION: u32 = 2;

/// One split's rows and the counts the upstream stages reported.
pub struct SplitRows {
    pub name: String,
    pub rows: Arc<Vec<BinarizedRow>>,
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
    let pairs: Vec<(&str, &[BinarizedRow])> = splits.iter().map(|s| (s.name.as_str(), s.rows.as_slice())).collect();
    // The two encodings are independent: write them on two cores.
    let (parquet, arrow) = std::thread::scope(|scope| {
        let arrow = scope.spawn(|| hf_disk::write(&pairs, rows_per_file));
        let parquet: Result<Vec<_>> =
            splits.iter().map(|s| hub_parquet::write_split(&s.name, &s.rows, rows_per_file)).collect();
        (parquet, arrow.join().expect("writing Arrow does not panic"))
    });
    out.files.extend(parquet?.into_iter().flatten());
    out.files.extend(arrow?);
    for s in splits {
        out.stats.insert(format!("rows.{}", s.name), s.rows.len().into());
    }
    let card = CardInput {
        name,
        splits: splits.iter().map(|s| CardSplit { name: &s.name, rows: &s.rows, counts: s.counts.clone() }).collect(),
        params,
        keys,
    };
    out.files.extend(card::render(&card)?);
    Ok(out)
}
