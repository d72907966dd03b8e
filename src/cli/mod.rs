//! The command line: one file per command; `main` parses and dispatches.

pub mod cache;
pub mod completions;
pub mod infer;
pub mod plan;
pub mod run;
pub mod slurm;
pub mod verify;
pub mod version;

use crate::cache::{Cache, Remote};
use crate::config::{Flags, RemoteSpec, Settings};
use crate::plan::Graph;
use crate::recipe::Recipe;
use anyhow::Result;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Build on-policy preference datasets (SimPO, DPO) from recipes, caching every
/// stage by the hash of its inputs.
#[derive(Parser)]
#[command(name = "prefgen", version, about)]
pub struct Cli {
    /// The local cache folder (default: prefgen.toml's `cache.dir`, else ./cache).
    #[arg(long, global = true, env = "PREFGEN_CACHE")]
    pub cache: Option<PathBuf>,
    /// The configuration file (default: ./prefgen.toml when there is one).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// One more remote to read through and push to: `s3://bucket/prefix` or a
    /// folder; with `cache verify` and `cache gc`, the remote they work on.
    #[arg(long, global = true, env = "PREFGEN_REMOTE", value_name = "URL")]
    pub remote: Option<String>,
    /// Ignore every remote (prefgen.toml's, --remote's, PREFGEN_REMOTE's).
    #[arg(long, global = true)]
    pub no_remote: bool,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parses this process's arguments (exiting on a usage error, `--help`
    /// or `--version`); `commit` is the git commit the binary was built from.
    pub fn parse_built_from(commit: &str) -> Cli {
        let matches = Cli::command().long_version(version::long_version(commit)).get_matches();
        Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }

    fn flags(&self) -> Flags {
        Flags {
            config: self.config.clone(),
            cache: self.cache.clone(),
            remote: self.remote.clone(),
            no_remote: self.no_remote,
        }
    }
}

/// Where this invocation's caches are, opened.
pub struct Caches {
    pub settings: Settings,
    flags: Flags,
}

impl Caches {
    fn new(flags: Flags) -> Result<Caches> {
        Ok(Caches { settings: Settings::resolve(&flags)?, flags })
    }

    /// The global options that give another prefgen process (a Slurm
    /// worker, started in this folder) these very caches.
    pub fn worker_flags(&self) -> Result<Vec<String>> {
        let abs = |p: &std::path::Path| std::path::absolute(p).map(|p| p.display().to_string());
        let mut out = Vec::new();
        if let Some(config) = &self.flags.config {
            out.extend(["--config".to_string(), abs(config)?]);
        }
        out.extend(["--cache".to_string(), abs(&self.settings.cache_dir)?]);
        match (&self.flags.remote, self.flags.no_remote) {
            (_, true) => out.push("--no-remote".into()),
            (Some(url), false) => out.extend(["--remote".to_string(), url.clone()]),
            (None, false) => {}
        }
        Ok(out)
    }

    /// The local cache (created if needed) with the remotes to read through.
    pub fn open(&self) -> Result<Cache> {
        Ok(Cache::open(&self.settings.cache_dir)?.with_remotes(self.remotes(|_| true)?))
    }

    /// The local cache, which must exist (commands that inspect or clean).
    pub fn open_existing(&self) -> Result<Cache> {
        Cache::open_existing(&self.settings.cache_dir)
    }

    /// The configured remotes that `keep` keeps, opened.
    pub fn remotes(&self, keep: impl Fn(&RemoteSpec) -> bool) -> Result<Vec<Remote>> {
        self.settings.remotes.iter().filter(|r| keep(r)).map(Remote::open).collect()
    }
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
    /// Build on a Slurm cluster: an array of workers that claim stale shards
    /// over a shared cache, then a job that assembles and writes the files.
    Slurm(slurm::Args),
    /// Inspect and maintain the cache.
    Cache {
        #[command(subcommand)]
        command: cache::Command,
    },
    /// Run one model on files, outside a recipe: responses, scores,
    /// throughput.
    Infer {
        #[command(subcommand)]
        command: infer::Command,
    },
    /// Print a completion script to stdout, e.g. `prefgen completions bash >
    /// ~/.local/share/bash-completion/completions/prefgen`.
    Completions {
        /// The shell whose script to print.
        shell: clap_complete::Shell,
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
    let flags = cli.flags();
    // Resolved by the commands that use a cache only, so `completions` and
    // `infer` work wherever the command is installed.
    let caches = || Caches::new(flags.clone());
    let remote = cli.remote.clone().filter(|_| !cli.no_remote);
    match cli.command {
        Command::Run(args) => run::run(&caches()?, args),
        Command::Plan(args) => plan::plan(&caches()?, args),
        Command::Verify(args) => verify::verify(&caches()?, args),
        Command::Slurm(args) => slurm::slurm(&caches()?, args),
        Command::Cache { command } => cache::cache(&caches()?, remote.as_deref(), command),
        Command::Infer { command } => infer::infer(command),
        Command::Completions { shell } => Ok(completions::completions(shell)),
    }
}
