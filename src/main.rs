//! prefgen: on-policy preference datasets as a reproducible, cached,
//! make-style workflow. `main` parses the command line and dispatches.

use anyhow::Result;
use clap::{Parser, Subcommand};
use prefgen::cache::{self, Cache};
use prefgen::plan::{Freshness, Graph, Walk};
use prefgen::recipe::Recipe;
use prefgen::run;
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
    },
    /// Show every node as fresh or stale, and why; builds nothing.
    Plan {
        #[command(flatten)]
        recipe: RecipeArgs,
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

fn dispatch(cli: Cli) -> Result<ExitCode> {
    let cache = Cache::open(&cli.cache)?;
    match cli.command {
        Command::Run { recipe } => {
            let graph = load(&recipe)?;
            let summary = run::run(&graph, &cache, &recipe.targets)?;
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
