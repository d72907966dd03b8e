//! `export`: the files users load, from every split's binarized rows: hub-layout
//! parquet, a `load_from_disk` folder and the dataset card.

use super::{At, Counts, Keyed, Stage, StageOutput, generate};
use crate::digest::Digest;
use crate::formats::card::{self, CardInput, CardSplit, Source, SplitCounts};
use crate::formats::simpo::BinarizedRow;
use crate::formats::{hf_disk, hub_parquet};
use crate::recipe::{self, Recipe};
use anyhow::Result;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;

pub const VERSION: u32 = 6;

/// The recipe's name (the card's title) and `[export]`'s keyed values.
pub fn keyed(at: &At) -> Keyed {
    let mut params = at.recipe.export.keyed();
    params.insert(recipe::top::name.into(), json!(at.recipe.name));
    Keyed { params, externals: Default::default() }
}

/// What one node of the recipe recorded, as the card reports it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub label: String,
    pub stage: Stage,
    pub split: Option<String>,
    pub key: Digest,
    /// Its keyed parameter values, by recipe key.
    pub params: BTreeMap<String, Value>,
    pub counts: Counts,
    /// The engines that computed it (sampled and scored nodes).
    pub engines: Vec<String>,
    /// What it read from outside: (recipe key, source, digest).
    pub sources: Vec<(String, String, Digest)>,
}

/// Every other node of the recipe, in graph order.
#[derive(Debug, Clone, Default)]
pub struct Provenance {
    pub nodes: Vec<Recorded>,
}

impl Provenance {
    fn of(&self, stage: Stage, split: &str) -> Option<&Recorded> {
        self.nodes.iter().find(|n| n.stage == stage && n.split.as_deref() == Some(split))
    }
}

/// Whether `path` is a file this stage writes for `recipe` (with any number
/// of rows): an action entry naming any other path is not this stage's.
pub fn writes(recipe: &Recipe, path: &str) -> bool {
    let names: Vec<String> = recipe.splits().into_iter().map(|s| s.name).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    card::writes(&names, path)
        || names.iter().any(|split| hub_parquet::writes(split, path) || hf_disk::writes(split, path))
}

/// `splits` holds each output split's binarized rows, in the recipe's split order.
pub fn build(recipe: &Recipe, splits: &[Arc<Vec<BinarizedRow>>], provenance: Provenance) -> Result<StageOutput> {
    let names: Vec<String> = recipe.splits().into_iter().map(|s| s.name).collect();
    let rows_per_file = recipe.export.rows_per_file;
    let mut out = StageOutput::default();
    let pairs: Vec<(&str, &[BinarizedRow])> =
        names.iter().map(String::as_str).zip(splits.iter().map(|s| s.as_slice())).collect();
    // The two encodings are independent: write them on two cores.
    let (parquet, arrow) = std::thread::scope(|scope| {
        let arrow = scope.spawn(|| hf_disk::write(&pairs, rows_per_file));
        let parquet: Result<Vec<_>> =
            pairs.iter().map(|(name, rows)| hub_parquet::write_split(name, rows, rows_per_file)).collect();
        (parquet, arrow.join().expect("writing Arrow does not panic"))
    });
    let arrow = arrow?;
    out.files.extend(parquet?.into_iter().flatten());
    out.files.extend(arrow.files);
    for (name, rows) in &pairs {
        out.counts.split_rows.insert(name.to_string(), rows.len() as u64);
    }
    let count = |stage, split: &str, pick: fn(&Counts) -> Option<u64>| {
        provenance.of(stage, split).and_then(|n| pick(&n.counts))
    };
    let card_splits = pairs
        .iter()
        .zip(arrow.num_bytes)
        .map(|((name, rows), num_bytes)| CardSplit {
            name,
            rows,
            num_bytes,
            counts: SplitCounts {
                prompts: count(Stage::Filter, name, |c| c.prompts),
                // Every seed skips the same too-long prompts: one seed's count is the split's.
                skipped_generate: count(Stage::Generate, name, |c| c.skipped_too_long),
                skipped_annotate: count(Stage::Annotate, name, |c| c.skipped_too_long),
                dropped_identical: count(Stage::Filter, name, |c| c.dropped_identical),
                rows_in: count(Stage::Binarize, name, |c| c.rows_in),
                ties: count(Stage::Binarize, name, |c| c.ties),
                dropped_ties: count(Stage::Binarize, name, |c| c.dropped_ties),
            },
        })
        .collect();
    let mut params = BTreeMap::new();
    for n in &provenance.nodes {
        params.extend(n.params.clone());
    }
    params.remove(generate::SEED);
    params.extend(keyed(&At { recipe, split: "", policy: None, reward: None }).params);
    // What the data came from: each source once, in graph order.
    let mut sources: Vec<Source> = Vec::new();
    for n in &provenance.nodes {
        for (key, source, digest) in &n.sources {
            let s = Source { key: key.clone(), source: source.clone(), digest: digest.to_hex() };
            if !sources.contains(&s) {
                sources.push(s);
            }
        }
    }
    let mut engines: Vec<(String, String)> = Vec::new();
    for n in &provenance.nodes {
        for e in &n.engines {
            let pair = (n.stage.name().to_string(), e.clone());
            if !engines.contains(&pair) {
                engines.push(pair);
            }
        }
    }
    let card = CardInput {
        name: &recipe.name,
        license: &recipe.export.license,
        splits: card_splits,
        params,
        seeds: recipe.generate.seeds.clone(),
        sources,
        engines,
        keys: provenance.nodes.iter().map(|n| (n.label.clone(), n.key.to_hex())).collect(),
    };
    out.files.extend(card::render(&card)?);
    Ok(out)
}
