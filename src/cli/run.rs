//! `prefgen run`: build what is stale, then write the lock.

use super::{Caches, RecipeArgs};
use crate::cache::Cache;
use crate::cache::lease;
use crate::lock::{self, Lock};
use crate::plan::{Graph, Walk};
use crate::run::{self, Options, Slice, Summary, Worker};
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
    /// `auto` takes I and N from Slurm's array variables, `auto/N` from a
    /// Kubernetes indexed Job's JOB_COMPLETION_INDEX.
    #[arg(long, value_name = "I/N|auto", value_parser = parse_shard, conflicts_with = "worker")]
    pub shard: Option<Slice>,
    /// Work as one of many workers (what `prefgen slurm` runs): claim the
    /// next stale shard that no live worker holds, under a lease on the
    /// shared tier, and push what is built; writes nothing under export.dir.
    #[arg(long)]
    pub worker: bool,
    /// A --worker's lease period in seconds: a worker that dies holds its
    /// shard this long at most.
    #[arg(long, value_name = "SECS", default_value_t = lease::DEFAULT_PERIOD.as_secs(), requires = "worker",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub lease: u64,
    /// Replace files in `export.dir` that prefgen did not write.
    #[arg(long)]
    pub overwrite: bool,
    /// Upload each shard and node to the writable remotes as it is stored,
    /// so workers elsewhere see it.
    #[arg(long)]
    pub push: bool,
}

pub fn run(caches: &Caches, args: Args) -> Result<ExitCode> {
    let cache = caches.open()?;
    let writable = cache.remotes().iter().any(|r| r.writable);
    if args.push && !writable {
        anyhow::bail!("--push: no writable remote (give --remote URL, or `write = true` to one in prefgen.toml)");
    }
    // Workers push what they build, so the others see it.
    let cache = cache.push_as_stored(args.push || (args.worker && writable));
    let graph = args.recipe.graph()?;
    let worker = match (args.shard, args.worker) {
        (Some(slice), _) => Some(Worker::Slice(slice)),
        (None, true) => Some(Worker::Claim(std::time::Duration::from_secs(args.lease))),
        (None, false) => None,
    };
    let options = Options { worker, overwrite: args.overwrite };
    let summary = build_and_lock(&graph, &cache, &args.recipe, args.locked, options)?;
    cache.report_traffic();
    if args.worker {
        println!(
            "Worker: built {} nodes, {} fresh. Once every worker is done, `prefgen run` builds the rest and writes the files.",
            summary.built.len(),
            summary.fresh
        );
    } else if let Some(slice) = args.shard {
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
/// alone). A worker leaves the lock to the run that assembles.
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
        // An input edited with its size and modification time restored
        // would pass the stat memo: --locked reads every input again.
        cache.rehash_inputs();
        let Some(old) = &old else {
            bail!("--locked: there is no lock file {} (a run without --locked writes it)", lock_path.display());
        };
        let selected = graph.select(&recipe.targets)?;
        let mut walk = Walk::new(graph, cache);
        let survey = walk.survey(&selected)?;
        let drift = old.drift(&mut walk, &survey)?;
        if !drift.is_empty() {
            let lines = drift.join("\n  ");
            bail!("--locked: the recipe no longer resolves as {} records:\n  {lines}", lock_path.display());
        }
    }
    let summary = run::run(graph, cache, &recipe.targets, options)?;
    if options.worker.is_some() {
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

/// `--shard`: `I/N`, `auto` or `auto/N`.
fn parse_shard(text: &str) -> Result<Slice> {
    let env = |var: &str| std::env::var(var).ok();
    match text.split_once('/') {
        _ if text == "auto" => Slice::from_scheduler(None, env),
        Some(("auto", n)) => {
            let n = n.trim().parse::<u64>().ok().filter(|&n| n > 0);
            let n = n.ok_or_else(|| anyhow::anyhow!("--shard {text:?}: expected auto/N with N >= 1"))?;
            Slice::from_scheduler(Some(n), env)
        }
        _ => Slice::parse(text),
    }
}
