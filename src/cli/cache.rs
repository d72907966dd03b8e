//! `prefgen cache ...`: verify, gc, push, pull, keygen.

use super::{Caches, RecipeArgs};
use crate::cache::gc::{GcOptions, Removed};
use crate::cache::sign::SecretKey;
use crate::cache::verify::VerifySummary;
use crate::cache::{ActionEntry, Cache, Remote, parallel, transfer};
use crate::config::RemoteSpec;
use crate::plan::{Freshness, Walk};
use anyhow::{Result, anyhow, bail};
use clap::Subcommand;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Subcommand)]
pub enum Command {
    /// Re-hash every object and re-check every action entry of the local
    /// cache (or, with --remote, of that remote); remove and report damaged
    /// ones (exit 1 if any). A remote is only reported on, never changed.
    Verify,
    /// Remove what no recipe's last build reaches: unreached action entries
    /// (after --older-than), then objects nothing names, locks nobody holds,
    /// stale memos and abandoned temporaries (after --grace). With --remote,
    /// a writable remote's objects that none of its entries names.
    Gc {
        /// Report what would be removed without removing it.
        #[arg(long)]
        dry_run: bool,
        /// Keep everything younger than this, so a build running meanwhile
        /// loses nothing (`30s`, `15m`, `1h`, `7d`; `0` for none).
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        grace: Duration,
        /// Remove action entries no recipe's last build reaches once they
        /// are older than this.
        #[arg(long, default_value = "7d", value_parser = parse_duration)]
        older_than: Duration,
    },
    /// Upload what the recipe's current build consists of (its nodes'
    /// entries, their shard entries, their objects) to the writable remotes,
    /// skipping what they have.
    Push(RecipeArgs),
    /// Download the recipe's current build from the remotes into the local
    /// cache.
    Pull(RecipeArgs),
    /// Make a signing key: writes the secret key file and prints the public
    /// key (`NAME:BASE64`) to put in a remote's `trusted_keys`.
    Keygen {
        /// The key's name, as signatures and trusted_keys name it.
        name: String,
        /// Where to write the secret key (default: NAME.key here).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

/// `90`, `90s`, `15m`, `1h`, `7d`.
fn parse_duration(text: &str) -> Result<Duration> {
    let t = text.trim();
    let (digits, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = digits.parse().map_err(|_| anyhow!("{text:?}: expected a duration such as 30s, 15m, 1h or 7d"))?;
    let secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(anyhow!("{text:?}: the unit must be s, m, h or d")),
    };
    Ok(Duration::from_secs(n * secs))
}

/// The remote `--remote URL` names, with prefgen.toml's settings for it if it has some.
fn explicit_remote(caches: &Caches, url: &str) -> Result<Remote> {
    let spec = caches.settings.remotes.iter().find(|r| r.url.trim_end_matches('/') == url.trim_end_matches('/'));
    Remote::open(&spec.cloned().unwrap_or_else(|| RemoteSpec::read_write(url)))
}

pub fn cache(caches: &Caches, remote: Option<&str>, command: Command) -> Result<ExitCode> {
    match command {
        Command::Verify => {
            let s = match remote {
                Some(url) => {
                    let r = explicit_remote(caches, url)?;
                    r.check_layout(false)?;
                    r.verify()?
                }
                None => caches.open_existing()?.verify()?,
            };
            Ok(report(&s, remote))
        }
        Command::Gc { dry_run, grace, older_than } => {
            let options = GcOptions { dry_run, grace, older_than };
            let verb = if dry_run { "Would remove" } else { "Removed" };
            if let Some(url) = remote {
                let r = explicit_remote(caches, url)?;
                if !r.writable && !dry_run {
                    bail!("remote {url} is not writable (prefgen.toml says write = false): gc leaves it alone");
                }
                r.check_layout(false)?;
                let (removed, kept) = r.gc(options)?;
                println!(
                    "{verb} {} objects ({} bytes) of {url} that no entry there names; kept {kept}.",
                    removed.files, removed.bytes
                );
                return Ok(ExitCode::SUCCESS);
            }
            let s = caches.open_existing()?.gc(options)?;
            let total = s.total();
            let part = |n: Removed, what: &str| format!("{} {what} ({} bytes)", n.files, n.bytes);
            println!(
                "{verb} {} files ({} bytes): {}, {}, {}, {}, {}, {}, {}. Kept {} action entries and {} objects.",
                total.files,
                total.bytes,
                part(s.entries, "action entries"),
                part(s.objects, "objects"),
                part(s.locks, "locks"),
                part(s.memos, "stat memos"),
                part(s.refs, "refs"),
                part(s.temporaries, "temporary files"),
                part(s.leases, "expired leases"),
                s.kept_entries,
                s.kept_objects
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Push(args) => {
            let targets = caches.remotes(|r| r.write)?;
            if targets.is_empty() {
                bail!("cache push: no writable remote (give --remote URL, or `write = true` to one in prefgen.toml)");
            }
            // The build as this machine has it: the local cache alone.
            let cache = Cache::open(&caches.settings.cache_dir)?;
            let (entries, missing) = build_entries(&cache, &args)?;
            for r in &targets {
                let moved =
                    transfer::push(&cache, r, &entries).map_err(|e| anyhow!("cache push to {}: {e:#}", r.url))?;
                println!("{}.", moved.describe(&format!("Pushed to {}:", r.url)));
                if let Some(line) = r.traffic_line() {
                    eprintln!("{line}");
                }
            }
            missing_nodes(&missing, "push")
        }
        Command::Pull(args) => {
            // Lookups only look: `transfer::pull` moves the objects, then the entries.
            let cache = caches.open()?.only_looking();
            if cache.remotes().is_empty() {
                bail!("cache pull: no remote (give --remote URL, or add one to prefgen.toml)");
            }
            let (entries, missing) = build_entries(&cache, &args)?;
            let moved = transfer::pull(&cache, &entries);
            if let Some(r) = cache.remotes().iter().find(|r| r.is_down()) {
                bail!("cache pull: remote {} failed (see the warning above)", r.url);
            }
            println!("{}.", moved?.describe("Pulled"));
            cache.report_traffic();
            missing_nodes(&missing, "pull")
        }
        Command::Keygen { name, out } => {
            let key = SecretKey::generate(&name)?;
            let path = out.unwrap_or_else(|| PathBuf::from(format!("{name}.key")));
            key.write(&path)?;
            eprintln!(
                "Wrote the secret key to {} (keep it private; name it in a remote's signing_key).",
                path.display()
            );
            println!("{}", key.public());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn report(s: &VerifySummary, remote: Option<&str>) -> ExitCode {
    println!("{} objects ({} bytes) and {} action entries checked.", s.objects, s.bytes, s.actions);
    if s.damaged.is_empty() && s.damaged_actions.is_empty() {
        println!("No damage found.");
        return ExitCode::SUCCESS;
    }
    let done = if remote.is_some() { "left in place" } else { "removed" };
    for d in &s.damaged {
        println!("damaged object {d} ({done})");
    }
    for (d, why) in &s.damaged_actions {
        println!("damaged action entry {d}: {why} ({done})");
    }
    if remote.is_none() {
        println!("The next run rebuilds whatever used them.");
    }
    ExitCode::FAILURE
}

/// The entries of the recipe's current build (each node after the shard
/// entries it names), and the nodes no tier has.
fn build_entries(cache: &Cache, args: &RecipeArgs) -> Result<(Vec<ActionEntry>, Vec<String>)> {
    let graph = args.graph()?;
    let selected = graph.select(&args.targets)?;
    let mut walk = Walk::new(&graph, cache);
    let (mut entries, mut missing) = (Vec::new(), Vec::new());
    for (idx, freshness) in walk.survey(&selected)?.into_iter().enumerate() {
        match freshness {
            None => {}
            Some(Freshness::Fresh(entry, _)) => {
                let shards = parallel::map(&entry.parts, |part| {
                    cache
                        .get_action(part)?
                        .ok_or_else(|| anyhow!("{}: its shard entry {} is in no cache", entry.node, part.short()))
                })?;
                entries.extend(shards);
                entries.push(entry);
            }
            Some(Freshness::Stale(..) | Freshness::Blocked(_)) => missing.push(graph.nodes[idx].label()),
        }
    }
    Ok((entries, missing))
}

fn missing_nodes(missing: &[String], verb: &str) -> Result<ExitCode> {
    if missing.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    bail!(
        "{} nodes are built nowhere, so there was nothing to {verb} for them: {} (run the recipe first)",
        missing.len(),
        missing.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(7 * 86_400));
        assert!(parse_duration("1w").is_err() && parse_duration("h").is_err() && parse_duration("-1h").is_err());
    }
}
