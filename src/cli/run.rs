//! `prefgen run`: build what is stale, then write the lock.

use super::{Caches, RecipeArgs};
use crate::cache::Cache;
use crate::lock::{self, Lock};
use crate::plan::{Graph, Walk};
use crate::run::{self, Options, Slice, Summary};
use anyhow::{Result, bail};
use std::process::ExitCode;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub recipe: RecipeArgs,
    /// Refuse to run when an input resolves differently than the recipe's
    /// lock file records, and fail when a result differs from it.
    #[arg(long)]
    pub locked: bool,
    /// Build only slice I of N of the stale shards (1-based), as one
    /// worker of a job array; a run without it then assembles the rest.
    #[arg(long, value_name = "I/N", value_parser = Slice::parse)]
    pub shard: Option<Slice>,
    /// Replace files in `export.dir` that prefgen did not write.
    #[arg(long)]
    pub overwrite: bool,
    /// Upload each shard and node to the writable remotes as it is stored,
    /// so workers elsewhere see it.
    #[arg(long)]
    pub push: bool,
}

pub fn run(caches: &Caches, args: Args) -> Result<ExitCode> {
    let cache = caches.open()?.push_as_stored(args.push);
    if args.push && !cache.remotes().iter().any(|r| r.writable) {
        anyhow::bail!("--push: no writable remote (give --remote URL, or `write = true` to one in prefgen.toml)");
    }
    let graph = args.recipe.graph()?;
    let options = Options { slice: args.shard, overwrite: args.overwrite };
    let summary = build_and_lock(&graph, &cache, &args.recipe, args.locked, options)?;
    cache.report_traffic();
    if let Some(slice) = args.shard {
        println!(
            "Shard {}/{}: built {} nodes, {} fresh; {} left for the other workers. Once every worker is done, \
             `prefgen run` without --shard builds the rest and writes the files.",
            slice.index + 1,
            slice.count,
            summary.built.len(),
            summary.fresh,
            summary.deferred.len()
        );
    } else if summary.built.is_empty() && summary.written == 0 {
        println!("Everything is fresh ({} nodes): nothing to do.", summary.fresh);
    } else {
        println!(
            "Built {} nodes, {} fresh; {} files written under {}.",
            summary.built.len(),
            summary.fresh,
            summary.written,
            graph.recipe.export.dir
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Builds the recipe's targets as `run` does, then writes its lock; with
/// `locked`, refuses to start when an input resolves differently than the
/// lock records, and fails when a result differs from it (the lock is left
/// alone). A `--shard` worker leaves the lock to the run that assembles.
pub fn build_and_lock(
    graph: &Graph,
    cache: &Cache,
    recipe: &RecipeArgs,
    locked: bool,
    options: Options,
) -> Result<Summary> {
    let lock_path = lock::path_for(&recipe.recipe);
    let old = Lock::read(&lock_path, locked)?;
    if locked {
        let Some(old) = &old else {
            bail!("--locked: there is no lock file {} (a run without --locked writes it)", lock_path.display());
        };
        let selected = graph.select(&recipe.targets)?;
        let drift = old.drift(&mut Walk::new(graph, cache), &selected)?;
        if !drift.is_empty() {
            let lines = drift.join("\n  ");
            bail!("--locked: the recipe no longer resolves as {} records:\n  {lines}", lock_path.display());
        }
    }
    let summary = run::run(graph, cache, &recipe.targets, options)?;
    if options.slice.is_some() {
        return Ok(summary);
    }
    let mut walk = Walk::new(graph, cache);
    walk.entries = summary.entries.clone();
    let now = Lock::current(&mut walk, old.as_ref())?;
    match (&old, locked) {
        (Some(old), true) => {
            let drift = old.drift_after_run(&now);
            if !drift.is_empty() {
                bail!("--locked: the run departs from {}:\n  {}", lock_path.display(), drift.join("\n  "));
            }
        }
        _ => now.write(&lock_path)?,
    }
    Ok(summary)
}
