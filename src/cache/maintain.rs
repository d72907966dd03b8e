//! `prefgen cache verify` and `prefgen cache gc`.

use super::{
    ActionEntry, Cache,
    tier::{Bucket, Tier},
};
use crate::digest::Digest;
use anyhow::Result;
use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

/// What `verify` found.
#[derive(Debug, Default)]
pub struct VerifySummary {
    pub objects: usize,
    pub bytes: u64,
    /// Objects whose bytes no longer hash to their name (removed).
    pub damaged: Vec<Digest>,
    pub actions: usize,
    /// Action entries that do not parse or whose key does not match (removed).
    pub damaged_actions: Vec<Digest>,
}

/// What `gc` removed (or would remove, in a dry run).
#[derive(Debug, Default)]
pub struct GcSummary {
    pub kept: usize,
    pub removed: usize,
    pub removed_bytes: u64,
    pub tmp_removed: usize,
}

impl Cache {
    /// Re-hashes every object and re-reads every action entry; damaged ones
    /// are removed so the next run rebuilds them.
    pub fn verify(&self) -> Result<VerifySummary> {
        let mut s = VerifySummary::default();
        for (digest, size) in self.local.list(Bucket::Objects)? {
            s.objects += 1;
            s.bytes += size;
            let Some(bytes) = self.local.get(Bucket::Objects, &digest)? else { continue };
            if Digest::of(&bytes) != digest {
                self.local.remove(Bucket::Objects, &digest)?;
                s.damaged.push(digest);
            }
        }
        for (key, _) in self.local.list(Bucket::Actions)? {
            s.actions += 1;
            let ok = self
                .local
                .get(Bucket::Actions, &key)?
                .and_then(|b| serde_json::from_slice::<ActionEntry>(&b).ok())
                .is_some_and(|e| e.key() == key);
            if !ok {
                self.local.remove(Bucket::Actions, &key)?;
                s.damaged_actions.push(key);
            }
        }
        Ok(s)
    }

    /// Removes every object no action entry references, and temporary files
    /// left by crashed writes (older than an hour, so live writes are safe).
    pub fn gc(&self, dry_run: bool) -> Result<GcSummary> {
        let mut referenced = BTreeSet::new();
        for (key, _) in self.local.list(Bucket::Actions)? {
            if let Some(entry) =
                self.local.get(Bucket::Actions, &key)?.and_then(|b| serde_json::from_slice::<ActionEntry>(&b).ok())
            {
                referenced.extend(entry.outputs.iter().map(|o| o.digest));
            }
        }
        let mut s = GcSummary::default();
        for (digest, size) in self.local.list(Bucket::Objects)? {
            if referenced.contains(&digest) {
                s.kept += 1;
            } else {
                s.removed += 1;
                s.removed_bytes += size;
                if !dry_run {
                    self.local.remove(Bucket::Objects, &digest)?;
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(self.root.join("tmp")) {
            let hour_ago = SystemTime::now() - Duration::from_secs(3600);
            for entry in entries.flatten() {
                let old = entry.metadata().and_then(|m| m.modified()).is_ok_and(|t| t < hour_ago);
                if old {
                    s.tmp_removed += 1;
                    if !dry_run {
                        let _ = std::fs::remove_file(entry.path());
                    }
                }
            }
        }
        Ok(s)
    }
}
