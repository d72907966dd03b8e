//! `prefgen slurm`: an array of workers and an assembling job over a shared
//! cache, submitted with sbatch.

use super::{Caches, RecipeArgs};
use crate::cache::lease;
use crate::plan::{Freshness, Walk};
use crate::slurm::{self, Job};
use crate::stages::Stage;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub recipe: RecipeArgs,
    /// How many workers (array tasks); with `--sbatch=--gres=gpu:1`, one per GPU.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub workers: u64,
    /// An sbatch option for both jobs (repeatable), such as
    /// `--sbatch=--partition=gpu --sbatch=--gres=gpu:1 --sbatch=--time=12:00:00`.
    #[arg(long = "sbatch", value_name = "OPTION", allow_hyphen_values = true)]
    pub sbatch: Vec<String>,
    /// Wait for the assembling job to end, and exit with its status.
    #[arg(long)]
    pub wait: bool,
    /// Print the job scripts; submit nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// The workers' lease period in seconds (see `run --worker`).
    #[arg(long, value_name = "SECS", default_value_t = lease::DEFAULT_PERIOD.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..))]
    pub lease: u64,
}

/// Workers build up to the scoring shards; what comes after is the assembling job's.
fn worker_targets(targets: &[String]) -> Vec<String> {
    let last = Stage::ALL.iter().position(|s| *s == Stage::Annotate).expect("annotate is a stage");
    let mut out: Vec<String> = Vec::new();
    let wanted = if targets.is_empty() { vec![Stage::Annotate.name().to_string()] } else { targets.to_vec() };
    for t in wanted {
        let at = Stage::ALL.iter().position(|s| s.name() == t).unwrap_or(last).min(last);
        let name = Stage::ALL[at].name().to_string();
        if !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

fn absolute(p: &Path) -> Result<String> {
    Ok(std::path::absolute(p).with_context(|| format!("cannot resolve {}", p.display()))?.display().to_string())
}

/// A new run folder, `slurm/<recipe>-<n>`.
fn run_dir(name: &str) -> Result<PathBuf> {
    std::fs::create_dir_all("slurm").context("cannot create ./slurm")?;
    for n in 1.. {
        let dir = PathBuf::from("slurm").join(format!("{name}-{n}"));
        match std::fs::create_dir(&dir) {
            Ok(()) => return Ok(std::path::absolute(&dir)?),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
        }
    }
    unreachable!("some run folder name is free")
}

pub fn slurm(caches: &Caches, args: Args) -> Result<ExitCode> {
    let cache = caches.open()?;
    let graph = args.recipe.graph()?;
    let selected = graph.select(&args.recipe.targets)?;
    let survey = Walk::new(&graph, &cache).survey(&selected)?;
    let nodes = survey.iter().flatten().count();
    let stale = survey.iter().flatten().filter(|f| !matches!(f, Freshness::Fresh(..))).count();
    if stale == 0 {
        println!("Nothing is stale ({nodes} nodes fresh): nothing submitted.");
        return Ok(ExitCode::SUCCESS);
    }
    let writable = cache.remotes().iter().any(|r| r.writable);
    if !writable && let Some(fs) = slurm::fs_type(cache.root()).filter(|fs| slurm::is_local_fs(fs)) {
        let partition = slurm::partition(&args.sbatch);
        let nodes = match slurm::partition_nodes(partition.as_deref()) {
            Ok(n) => n,
            Err(e) if args.dry_run => {
                eprintln!("note: cannot count the partition's nodes ({e:#})");
                1
            }
            Err(e) => return Err(e),
        };
        if nodes > 1 {
            bail!(
                "the cache {} is on a local file system ({fs}) and partition {} has {nodes} nodes: workers on \
                 other nodes would neither see each other's shards nor leave them for the assembling job. Give a \
                 cache on a shared file system (--cache /shared/...) or a writable shared remote (--remote \
                 s3://bucket/prefix, or a shared folder)",
                cache.root().display(),
                partition.as_deref().unwrap_or("(the default)")
            );
        }
    }

    let exe = std::env::current_exe().context("cannot find the prefgen binary")?.display().to_string();
    let cwd = std::env::current_dir().context("cannot read the current folder")?;
    let recipe = absolute(&args.recipe.recipe)?;
    let mut common = vec![exe];
    common.extend(caches.worker_flags()?);
    common.extend(["run".to_string(), recipe]);
    let sets: Vec<String> = args.recipe.overrides.iter().flat_map(|o| ["--set".to_string(), o.clone()]).collect();
    let mut worker = common.clone();
    worker.extend(worker_targets(&args.recipe.targets));
    worker.extend(sets.iter().cloned());
    worker.extend(["--worker".into(), "--lease".into(), args.lease.to_string()]);
    let mut assemble = common;
    assemble.extend(args.recipe.targets.iter().cloned());
    assemble.extend(sets);
    if writable {
        assemble.push("--push".into());
    }

    let name = &graph.recipe.name;
    let dir = if args.dry_run { PathBuf::from(format!("slurm/{name}-N")) } else { run_dir(name)? };
    let job = |kind: &str, array: Option<u64>, log: &str, command: Vec<String>| Job {
        name: format!("prefgen-{name}-{kind}"),
        array,
        log: dir.join(log),
        options: &args.sbatch,
        cwd: &cwd,
        command,
    };
    let scripts = [
        job("worker", Some(args.workers), "worker-%a.log", worker).script("worker.sbatch"),
        job("assemble", None, "assemble.log", assemble).script("assemble.sbatch"),
    ];
    if args.dry_run {
        for s in &scripts {
            println!("# {}\n{}", dir.join(s.file).display(), s.text);
        }
        println!(
            "# submitted as: sbatch {0}/worker.sbatch, then sbatch --dependency=afterany:WORKERS {0}/assemble.sbatch",
            dir.display()
        );
        println!("Dry run: {stale} of {nodes} nodes stale; nothing submitted.");
        return Ok(ExitCode::SUCCESS);
    }
    for s in &scripts {
        let path = dir.join(s.file);
        std::fs::write(&path, &s.text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let workers = slurm::submit(&dir.join(scripts[0].file), &[])?;
    let assembler = slurm::submit(&dir.join(scripts[1].file), &[format!("--dependency=afterany:{workers}")])?;
    println!(
        "Submitted {} workers (job {workers}) and the assembling job {assembler}, which runs once they end.",
        args.workers
    );
    println!("Scripts and logs: {}", dir.display());
    println!("Follow: tail -f {}/*.log   or   prefgen plan {}", dir.display(), args.recipe.recipe.display());
    if !args.wait {
        return Ok(ExitCode::SUCCESS);
    }
    let ended = slurm::wait(&assembler, Duration::from_secs(2))?;
    println!("The assembling job {assembler} ended: {} (exit code {}).", ended.state, ended.exit_code);
    Ok(match (ended.state.as_str(), ended.exit_code) {
        ("COMPLETED", 0) => ExitCode::SUCCESS,
        (_, code) => ExitCode::from(code.clamp(1, 255) as u8),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_stop_at_the_scoring_shards() {
        let t = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(worker_targets(&[]), t(&["annotate"]));
        assert_eq!(worker_targets(&t(&["generate"])), t(&["generate"]));
        assert_eq!(worker_targets(&t(&["export", "binarize"])), t(&["annotate"]));
    }
}
