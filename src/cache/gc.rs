//! `prefgen cache gc`: what no recipe's last build reaches, removed, and
//! nothing a running build may still need.
//!
//! Roots are the recipes' last builds (`refs-v1/`); an entry reaches its
//! outputs and the shard entries it was assembled from. Unreached entries
//! older than `older_than` go; then objects no remaining entry names, once
//! older than `grace` (a running build stores an object before the entry
//! naming it, and an object it finds already stored is marked as just used);
//! then lock files nobody holds, memos of files that changed or vanished,
//! refs to removed entries, and abandoned temporaries.

use super::Stored;
use super::tier::{Bucket, Tier};
use super::{ActionEntry, Cache, LOCKS, REFS, TMP, lease, lock, stat};
use crate::digest::Digest;
use anyhow::Result;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// How `gc` decides.
#[derive(Debug, Clone, Copy)]
pub struct GcOptions {
    /// Report what would be removed, and remove nothing.
    pub dry_run: bool,
    /// Nothing younger than this is removed.
    pub grace: Duration,
    /// Entries no last build reaches go once older than this.
    pub older_than: Duration,
}

/// Files of one kind that `gc` removed (or would remove).
#[derive(Debug, Default, Clone, Copy)]
pub struct Removed {
    pub files: usize,
    pub bytes: u64,
}

impl Removed {
    fn add(&mut self, bytes: u64) {
        self.files += 1;
        self.bytes += bytes;
    }
}

/// What `gc` removed, kind by kind, and kept.
#[derive(Debug, Default)]
pub struct GcSummary {
    pub entries: Removed,
    pub objects: Removed,
    pub locks: Removed,
    pub memos: Removed,
    pub refs: Removed,
    pub temporaries: Removed,
    /// Leases of workers that stopped renewing them.
    pub leases: Removed,
    pub kept_entries: usize,
    pub kept_objects: usize,
}

impl GcSummary {
    pub fn total(&self) -> Removed {
        let all = [self.entries, self.objects, self.locks, self.memos, self.refs, self.temporaries, self.leases];
        Removed { files: all.iter().map(|r| r.files).sum(), bytes: all.iter().map(|r| r.bytes).sum() }
    }
}

fn older(modified: SystemTime, age: Duration) -> bool {
    SystemTime::now().duration_since(modified).is_ok_and(|a| a > age)
}

/// Every file directly in `dir` (none if it does not exist), with its size and mtime.
fn files_in(dir: &Path) -> Vec<(std::path::PathBuf, u64, SystemTime)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| {
            let meta = e.metadata().ok().filter(|m| m.is_file())?;
            Some((e.path(), meta.len(), meta.modified().ok()?))
        })
        .collect()
}

impl Cache {
    pub fn gc(&self, o: GcOptions) -> Result<GcSummary> {
        let mut s = GcSummary::default();
        let remove = |path: &Path| if o.dry_run { Ok(()) } else { std::fs::remove_file(path) };
        // The recipes' last builds, and what they reach.
        let mut reached = BTreeSet::new();
        let mut pending: Vec<Digest> = files_in(&self.root.join(REFS))
            .iter()
            .filter_map(|(p, _, _)| std::fs::read_to_string(p).ok()?.trim().parse().ok())
            .collect();
        while let Some(key) = pending.pop() {
            if reached.insert(key)
                && let Some(entry) = self.read_entry(&key)?
            {
                pending.extend(entry.parts);
            }
        }
        let mut named = BTreeSet::new();
        for blob in self.local.list(Bucket::Actions)? {
            let keep = reached.contains(&blob.name) || !older(blob.modified, o.older_than.max(o.grace));
            if keep {
                s.kept_entries += 1;
                if let Some(entry) = self.read_entry(&blob.name)? {
                    named.extend(entry.outputs.iter().map(|out| out.digest));
                }
            } else {
                s.entries.add(blob.size);
                if !o.dry_run {
                    self.local.remove(Bucket::Actions, &blob.name)?;
                }
            }
        }
        for blob in self.local.list(Bucket::Objects)? {
            if named.contains(&blob.name) || !older(blob.modified, o.grace) {
                s.kept_objects += 1;
            } else {
                s.objects.add(blob.size);
                if !o.dry_run {
                    self.local.remove(Bucket::Objects, &blob.name)?;
                }
            }
        }
        for (path, size, _) in files_in(&self.root.join(LOCKS)) {
            let free = if o.dry_run { lock::is_free(&path)? } else { lock::remove_if_free(&path)? };
            if free {
                s.locks.add(size);
            }
        }
        for (path, size, _) in files_in(&self.root.join(stat::DIR)) {
            let memo = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<stat::Memo>(&b).ok());
            if !memo.is_some_and(|m| m.holds()) {
                remove(&path)?;
                s.memos.add(size);
            }
        }
        // Refs are roots, so only those whose entry was already gone dangle.
        for (path, size, _) in files_in(&self.root.join(REFS)) {
            let key: Option<Digest> = std::fs::read_to_string(&path).ok().and_then(|t| t.trim().parse().ok());
            let live = match key {
                Some(k) => self.local.size(Bucket::Actions, &k)?.is_some(),
                None => false,
            };
            if !live {
                remove(&path)?;
                s.refs.add(size);
            }
        }
        for (path, size, modified) in files_in(&self.root.join(TMP)) {
            if older(modified, o.grace) {
                remove(&path)?;
                s.temporaries.add(size);
            }
        }
        // Leases left by dead workers: expired longer ago than the grace period.
        let fans = std::fs::read_dir(self.root.join(Bucket::Leases.dir_name())).into_iter().flatten().flatten();
        for record in fans.flat_map(|f| std::fs::read_dir(f.path()).into_iter().flatten().flatten()) {
            let Some(key) = record.file_name().to_str().and_then(|n| n.parse::<Digest>().ok()) else { continue };
            let holder = self.local.read_record(Bucket::Leases, &key)?;
            let holder = holder.and_then(|(b, _)| serde_json::from_slice::<lease::Holder>(&b).ok());
            if holder.is_none_or(|h| h.expired_for() > o.grace) {
                if !o.dry_run {
                    self.local.remove(Bucket::Leases, &key)?;
                }
                s.leases.add(0);
            }
        }
        Ok(s)
    }

    /// An entry as stored, without the damage handling of `get_action`.
    fn read_entry(&self, key: &Digest) -> Result<Option<ActionEntry>> {
        Ok(self.local.get(Bucket::Actions, key)?.and_then(|b| Stored::open(&b, key).ok()).map(|s| s.entry))
    }
}

impl super::Remote {
    /// `gc` for a writable remote: objects none of its entries names, older
    /// than the grace period, are removed; entries never are (a remote has
    /// no last builds to keep them by). Returns what went and how many objects stayed.
    pub fn gc(&self, o: GcOptions) -> Result<(Removed, usize)> {
        let mut named = BTreeSet::new();
        for blob in self.tier().list(Bucket::Actions)? {
            if let Some(entry) = self
                .tier()
                .get(Bucket::Actions, &blob.name)?
                .and_then(|b| Stored::open(&b, &blob.name).ok())
                .map(|s| s.entry)
            {
                named.extend(entry.outputs.iter().map(|out| out.digest));
            }
        }
        let (mut removed, mut kept) = (Removed::default(), 0);
        for blob in self.tier().list(Bucket::Objects)? {
            if named.contains(&blob.name) || !older(blob.modified, o.grace) {
                kept += 1;
            } else {
                removed.add(blob.size);
                if !o.dry_run {
                    self.tier().remove(Bucket::Objects, &blob.name)?;
                }
            }
        }
        Ok((removed, kept))
    }
}
