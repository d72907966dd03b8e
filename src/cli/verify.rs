//! `prefgen verify`: bring the recipe up to date, then compare its
//! binarized rows with a published dataset.

use super::{Caches, RecipeArgs};
use crate::formats::simpo::{self, BinarizedRow};
use crate::run::Options;
use crate::stages::{Stage, binarize};
use crate::verify;
use anyhow::{Context, Result, bail};
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub recipe: RecipeArgs,
    /// The published dataset: a folder (hub-layout parquet, or a
    /// `save_to_disk` folder) or a hub dataset id (`org/name[@revision]`).
    #[arg(long, value_name = "PATH_OR_HUB_ID")]
    pub against: String,
    /// Largest score difference counted as agreement (a number >= 0).
    #[arg(long, default_value_t = 1e-6, value_parser = verify::parse_tolerance)]
    pub tolerance: f64,
    /// As for `run`.
    #[arg(long)]
    pub locked: bool,
}

pub fn verify(caches: &Caches, args: Args) -> Result<ExitCode> {
    if !args.recipe.targets.is_empty() {
        bail!("verify builds the whole recipe; it takes no targets");
    }
    let cache = caches.open()?;
    let graph = args.recipe.graph()?;
    let summary = super::run::build_and_lock(&graph, &cache, &args.recipe, args.locked, Options::default())?;
    let against = &args.against;
    let (published, layout) = verify::read_published(against)?;
    println!("Reading {against} as {}.", layout.describe());
    let mut results = Vec::new();
    for (idx, node) in graph.nodes.iter().enumerate().filter(|(_, n)| n.stage() == Stage::Binarize) {
        let split = node.spec.split.clone().expect("binarize nodes have a split");
        let Some(theirs) = published.get(&split) else {
            let names: Vec<&String> = published.keys().collect();
            bail!("--against {against}: no split {split:?} (it has {names:?})");
        };
        let entry = summary.entries[idx].as_ref().expect("run resolves every node");
        let out = entry.output(binarize::FILE).expect("binarize writes its rows");
        let bytes = cache.get_object(&out.digest)?.context("a cache object vanished during verify")?;
        let ours: Vec<BinarizedRow> = simpo::parse_rows(&bytes, binarize::FILE)?;
        results.push(verify::compare(&split, &ours, theirs, args.tolerance));
    }
    print!("{}", verify::table(&results, args.tolerance));
    let disagree: Vec<&verify::Agreement> = results.iter().filter(|a| !a.agrees()).collect();
    for a in &disagree {
        for line in &a.differences {
            println!("differs: {line}");
        }
    }
    if !disagree.is_empty() {
        eprintln!("error: {} of {} splits disagree with {against}", disagree.len(), results.len());
        return Ok(ExitCode::FAILURE);
    }
    println!("Every split agrees with {against}.");
    Ok(ExitCode::SUCCESS)
}
