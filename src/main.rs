//! prefgen: on-policy preference datasets as a reproducible, cached,
//! make-style workflow. `main` parses the command line and dispatches.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use prefgen::cache::{self, Cache};
use prefgen::formats::simpo::{self, BinarizedRow};
use prefgen::lock::{self, Lock};
use prefgen::plan::{Freshness, Graph, Stage, Walk};
use prefgen::recipe::Recipe;
use prefgen::run;
use prefgen::stages::binarize;
use prefgen::verify;
use std::path::PathBuf;
use std::process::ExitCode;

/// Build on-policy preference datasets (SimPO, DPO) from recipes, caching every
/// stage by the hash of its inputs.
#[derive(Parser)]
#[command(name = "prefgen", version, about)]
struct Cli {
    /// The cache folder.
    #[arg(long, global = true, env = "PREFGEN_CACHE", default_value = cache::DEFAULT_ROOT)]
    cache: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the targets (default: everything) and only what is stale.
    Run {
        #[command(flatten)]
        recipe: RecipeArgs,
        /// Refuse to run when an input resolves differently than the recipe's
        /// lock file records, or when a result differs from it.
        #[arg(long)]
        locked: bool,
        /// Build only slice I of N of the stale shards (1-based), as one
        /// worker of a job array; a run without it then assembles the rest.
        #[arg(long, value_name = "I/N", value_parser = run::Slice::parse)]
        shard: Option<run::Slice>,
    },
    /// Show every node as fresh or stale, and why; builds nothing.
    Plan {
        #[command(flatten)]
        recipe: RecipeArgs,
    },
    /// Bring the recipe up to date, then compare its binarized rows with a
    /// published dataset, split by split; exit 1 on any disagreement.
    Verify {
        #[command(flatten)]
        recipe: RecipeArgs,
        /// The published dataset: a folder (hub-layout parquet or
        /// `save_to_disk`) or a hub dataset id (`org/name[@revision]`).
        #[arg(long, value_name = "PATH_OR_HUB_ID")]
        against: String,
        /// Largest score difference counted as agreement.
        #[arg(long, default_value_t = 1e-6)]
        tolerance: f64,
        /// As for `run`.
        #[arg(long)]
        locked: bool,
    },
    /// Inspect and maintain the cache.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
}

#[derive(clap::Args)]
struct RecipeArgs {
    /// The recipe file (TOML).
    recipe: PathBuf,
    /// Stages to build: prompts, generate, filter, annotate, binarize, export.
    targets: Vec<String>,
    /// Override a recipe key, e.g. `--set prompts.limit=50` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
}

#[derive(Subcommand)]
enum CacheCommand {
    /// Re-hash every object; remove and report damaged ones (exit 1 if any).
    Verify,
    /// Remove objects that no action entry references.
    Gc {
        /// Report what would be removed without removing it.
        #[arg(long)]
        dry_run: bool,
    },
}

fn main() -> ExitCode {
    // SAFETY: nothing has started a thread yet.
    unsafe { prefgen::infer::settle_thread_count() };
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            eprintln!("error: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}

fn load(args: &RecipeArgs) -> Result<Graph> {
    Graph::new(Recipe::load(&args.recipe, &args.overrides)?)
}

/// Builds the recipe's targets as `run` does, then writes its lock; with
/// `locked`, refuses to start when an input resolves differently than the lock
/// records, and fails when a result differs from it (the lock is left alone).
/// A `--shard` worker leaves the lock to the run that assembles the shards.
fn run_and_lock(
    graph: &Graph,
    cache: &Cache,
    recipe: &RecipeArgs,
    locked: bool,
    slice: Option<run::Slice>,
) -> Result<run::Summary> {
    let lock_path = lock::path_for(&recipe.recipe);
    let old = Lock::read(&lock_path)?;
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
    let summary = run::run(graph, cache, &recipe.targets, slice)?;
    if slice.is_some() {
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

fn dispatch(cli: Cli) -> Result<ExitCode> {
    let cache = Cache::open(&cli.cache)?;
    match cli.command {
        Command::Run { recipe, locked, shard } => {
            let graph = load(&recipe)?;
            let summary = run_and_lock(&graph, &cache, &recipe, locked, shard)?;
            if let Some(slice) = shard {
                println!(
                    "Shard {}/{}: built {} nodes, {} fresh; {} left for the other workers. Once every worker is done, \
                     `prefgen run` without --shard builds the rest and writes the files.",
                    slice.index + 1,
                    slice.count,
                    summary.built.len(),
                    summary.fresh,
                    summary.deferred.len()
                );
                return Ok(ExitCode::SUCCESS);
            }
            let dir = &graph.recipe.export.dir;
            if summary.built.is_empty() && summary.written == 0 {
                println!("Everything is fresh ({} nodes): nothing to do.", summary.fresh);
            } else {
                println!(
                    "Built {} nodes, {} fresh; {} files written under {dir}.",
                    summary.built.len(),
                    summary.fresh,
                    summary.written
                );
            }
        }
        Command::Plan { recipe } => {
            let graph = load(&recipe)?;
            let selected = graph.select(&recipe.targets)?;
            let mut walk = Walk::new(&graph, &cache);
            let mut stale = 0;
            for idx in (0..graph.nodes.len()).filter(|&i| selected[i]) {
                let label = graph.nodes[idx].label();
                match walk.freshness(idx)? {
                    Freshness::Fresh(entry) => {
                        println!("fresh  {label}  {}", entry.key().short());
                        walk.entries[idx] = Some(entry);
                    }
                    Freshness::Stale(_, why) | Freshness::Blocked(why) => {
                        stale += 1;
                        println!("stale  {label}  {why}");
                    }
                }
            }
            eprintln!("{stale} of {} nodes stale", selected.iter().filter(|s| **s).count());
            let lock_path = lock::path_for(&recipe.recipe);
            match Lock::read(&lock_path)? {
                None => println!("lock: none yet ({} is written by `prefgen run`)", lock_path.display()),
                Some(lock) => {
                    let drift = lock.drift(&mut Walk::new(&graph, &cache), &selected)?;
                    if drift.is_empty() {
                        println!("lock: matches {}", lock_path.display());
                    }
                    for line in drift {
                        println!("lock drift: {line}");
                    }
                }
            }
        }
        Command::Verify { recipe, against, tolerance, locked } => {
            if !recipe.targets.is_empty() {
                bail!("verify builds the whole recipe; it takes no targets");
            }
            let graph = load(&recipe)?;
            let summary = run_and_lock(&graph, &cache, &recipe, locked, None)?;
            let published = verify::read_published(&against)?;
            let mut results = Vec::new();
            for (idx, node) in graph.nodes.iter().enumerate().filter(|(_, n)| n.stage == Stage::Binarize) {
                let split = node.split.clone().expect("binarize nodes have a split");
                let Some(theirs) = published.get(&split) else {
                    let names: Vec<&String> = published.keys().collect();
                    bail!("--against {against}: no split {split:?} (it has {names:?})");
                };
                let entry = summary.entries[idx].as_ref().expect("run resolves every node");
                let out = entry.output(binarize::FILE).expect("binarize writes its rows");
                let bytes = cache.get_object(&out.digest)?.context("a cache object vanished during verify")?;
                let ours: Vec<BinarizedRow> = simpo::parse_rows(&bytes, binarize::FILE)?;
                results.push(verify::compare(&split, &ours, theirs, tolerance));
            }
            print!("{}", verify::table(&results, tolerance));
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
        }
        Command::Cache { command: CacheCommand::Verify } => {
            let s = cache.verify()?;
            println!("{} objects ({} bytes) and {} action entries checked.", s.objects, s.bytes, s.actions);
            if s.damaged.is_empty() && s.damaged_actions.is_empty() {
                println!("No damage found.");
            } else {
                for d in &s.damaged {
                    println!("damaged object {d} (removed)");
                }
                for d in &s.damaged_actions {
                    println!("damaged action entry {d} (removed)");
                }
                println!("The next run rebuilds whatever used them.");
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Cache { command: CacheCommand::Gc { dry_run } } => {
            let s = cache.gc(dry_run)?;
            let verb = if dry_run { "Would remove" } else { "Removed" };
            println!(
                "{verb} {} unreferenced objects ({} bytes) and {} stale temporary files; {} objects kept.",
                s.removed, s.removed_bytes, s.tmp_removed, s.kept
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
