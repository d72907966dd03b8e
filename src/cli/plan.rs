//! `prefgen plan`: every node fresh or stale, and why; the lock's drift.

use super::{Caches, RecipeArgs};
use crate::cache::Found;
use crate::lock::{self, Lock};
use crate::plan::{Freshness, Walk};
use crate::run;
use anyhow::Result;
use std::process::ExitCode;

pub fn plan(caches: &Caches, args: RecipeArgs) -> Result<ExitCode> {
    let cache = caches.open()?.only_looking();
    for r in cache.remotes().iter().filter(|r| r.trusts_everyone()) {
        println!("note: remote {} has no trusted_keys: it serves entries from anyone who can write to it", r.url);
    }
    let graph = args.graph()?;
    let selected = graph.select(&args.targets)?;
    let mut walk = Walk::new(&graph, &cache);
    let mut stale = 0;
    let survey = walk.survey(&selected)?;
    for (idx, freshness) in survey.iter().enumerate() {
        let Some(freshness) = freshness else { continue };
        let label = graph.nodes[idx].label();
        match freshness {
            Freshness::Fresh(entry, found) => {
                let at = match found {
                    Found::Local => String::new(),
                    Found::Remote(url) => format!(" (remote {url})"),
                };
                println!("fresh  {label}  {}{at}", entry.key().short());
            }
            Freshness::Stale(material, why) => {
                stale += 1;
                // While workers run: how far along its shards are.
                let progress = match run::shard_progress(&mut walk, idx, material)? {
                    Some(p) => format!("; {}", p.describe()),
                    None => String::new(),
                };
                println!("stale  {label}  {why}{progress}");
            }
            Freshness::Blocked(why) => {
                stale += 1;
                println!("stale  {label}  {why}");
            }
        }
    }
    eprintln!("{stale} of {} nodes stale", selected.iter().filter(|s| **s).count());
    cache.report_traffic();
    let lock_path = lock::path_for(&args.recipe);
    match Lock::read(&lock_path, false)? {
        None => println!("lock: none yet ({} is written by `prefgen run`)", lock_path.display()),
        Some(lock) => {
            let drift = lock.drift(&mut walk, &survey)?;
            if drift.is_empty() {
                println!("lock: matches {}", lock_path.display());
            }
            for line in drift {
                println!("lock drift: {line}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
