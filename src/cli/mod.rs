//! The command line: one file per command; `main` parses and dispatches.

pub mod cache;
pub mod plan;
pub mod run;
pub mod verify;

use crate::cache::DEFAULT_ROOT;
use crate::plan::Graph;
use crate::recipe::Recipe;
use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Build on-policy preference datasets (SimPO, DPO) from recipes, caching every
/// stage by the hash of its inputs.
#[derive(Parser)]
#[command(name = "prefgen", version, about)]
pub struct Cli {
    /// The cache folder.
    #[arg(long, global = true, env = "PREFGEN_CACHE", default_value = DEFAULT_ROOT)]
    pub cache: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Build the targets (default: everything) and only what is stale.
    Run(run::Args),
    /// Show every node as fresh or stale, and why; builds nothing.
    Plan(RecipeArgs),
    /// Bring the recipe up to date, then compare its binarized rows with a
    /// published dataset, split by split; exit 1 on any disagreement.
    Verify(verify::Args),
    /// Inspect and maintain the cache.
    Cache {
        #[command(subcommand)]
        command: cache::Command,
    },
}

/// The recipe a command works on.
#[derive(clap::Args)]
pub struct RecipeArgs {
    /// The recipe file (TOML).
    pub recipe: PathBuf,
    /// Stages to build: prompts, generate, filter, annotate, binarize, export.
    pub targets: Vec<String>,
    /// Override a recipe key, e.g. `--set prompts.limit=50` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

impl RecipeArgs {
    /// The recipe as a graph.
    pub fn graph(&self) -> Result<Graph> {
        Graph::new(Recipe::load(&self.recipe, &self.overrides)?)
    }
}

/// Runs a parsed command line.
pub fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run(args) => run::run(&cli.cache, args),
        Command::Plan(args) => plan::plan(&cli.cache, args),
        Command::Verify(args) => verify::verify(&cli.cache, args),
        Command::Cache { command } => cache::cache(&cli.cache, command),
    }
}
