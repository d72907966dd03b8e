//! `prefgen cache verify` and `prefgen cache gc`.

use crate::cache::Cache;
use crate::cache::gc::{GcOptions, Removed};
use anyhow::{Result, anyhow};
use clap::Subcommand;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Subcommand)]
pub enum Command {
    /// Re-hash every object and re-check every action entry; remove and
    /// report damaged ones (exit 1 if any).
    Verify,
    /// Remove what no recipe's last build reaches: unreached action entries
    /// (after --older-than), then objects nothing names, locks nobody holds,
    /// stale memos and abandoned temporaries (after --grace).
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

pub fn cache(root: &Path, command: Command) -> Result<ExitCode> {
    let cache = Cache::open_existing(root)?;
    match command {
        Command::Verify => {
            let s = cache.verify()?;
            println!("{} objects ({} bytes) and {} action entries checked.", s.objects, s.bytes, s.actions);
            if s.damaged.is_empty() && s.damaged_actions.is_empty() {
                println!("No damage found.");
                return Ok(ExitCode::SUCCESS);
            }
            for d in &s.damaged {
                println!("damaged object {d} (removed)");
            }
            for (d, why) in &s.damaged_actions {
                println!("damaged action entry {d}: {why} (removed)");
            }
            println!("The next run rebuilds whatever used them.");
            Ok(ExitCode::FAILURE)
        }
        Command::Gc { dry_run, grace, older_than } => {
            let s = cache.gc(GcOptions { dry_run, grace, older_than })?;
            let verb = if dry_run { "Would remove" } else { "Removed" };
            let total = s.total();
            let part = |n: Removed, what: &str| format!("{} {what} ({} bytes)", n.files, n.bytes);
            println!(
                "{verb} {} files ({} bytes): {}, {}, {}, {}, {}, {}. Kept {} action entries and {} objects.",
                total.files,
                total.bytes,
                part(s.entries, "action entries"),
                part(s.objects, "objects"),
                part(s.locks, "locks"),
                part(s.memos, "stat memos"),
                part(s.refs, "refs"),
                part(s.temporaries, "temporary files"),
                s.kept_entries,
                s.kept_objects
            );
            Ok(ExitCode::SUCCESS)
        }
    }
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
