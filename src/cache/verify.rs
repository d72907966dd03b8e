//! `prefgen cache verify`: every object re-hashed, every action entry
//! re-read (its bytes against their digest) and checked against the
//! objects it names.

use super::Cache;
use super::Stored;
use super::tier::{Bucket, Tier};
use crate::digest::Digest;
use crate::stages::{Rows, Stage};
use anyhow::Result;

/// What `verify` found.
#[derive(Debug, Default)]
pub struct VerifySummary {
    pub objects: usize,
    pub bytes: u64,
    /// Objects whose bytes no longer hash to their name (removed).
    pub damaged: Vec<Digest>,
    pub actions: usize,
    /// Action entries that are unreadable, changed since written, keyed
    /// wrongly, or name outputs that
    /// are missing or not what their stage writes (removed), and why.
    pub damaged_actions: Vec<(Digest, String)>,
}

impl Cache {
    /// Re-hashes every object and re-reads every action entry; damaged ones
    /// are removed so the next run rebuilds them.
    pub fn verify(&self) -> Result<VerifySummary> {
        let mut s = VerifySummary::default();
        for blob in self.local.list(Bucket::Objects)? {
            s.objects += 1;
            s.bytes += blob.size;
            let Some(bytes) = self.local.get(Bucket::Objects, &blob.name)? else { continue };
            if Digest::of(&bytes) != blob.name {
                self.local.remove(Bucket::Objects, &blob.name)?;
                s.damaged.push(blob.name);
            }
        }
        for blob in self.local.list(Bucket::Actions)? {
            s.actions += 1;
            if let Some(why) = self.entry_fault(&blob.name)? {
                self.local.remove(Bucket::Actions, &blob.name)?;
                s.damaged_actions.push((blob.name, why));
            }
        }
        Ok(s)
    }

    /// Why the entry under `key` cannot be used, if it cannot.
    fn entry_fault(&self, key: &Digest) -> Result<Option<String>> {
        let Some(bytes) = self.local.get(Bucket::Actions, key)? else { return Ok(None) };
        let entry = match Stored::open(&bytes, key) {
            Ok(stored) => stored.entry,
            Err(why) => return Ok(Some(why)),
        };
        if entry.material.stage.ends_with("-shard") && entry.outputs.len() != 1 {
            return Ok(Some(format!("a shard names {} outputs, not one", entry.outputs.len())));
        }
        // The stage whose rows its JSON outputs must be (a shard's are its node's).
        let stage = Stage::from_name(entry.material.stage.trim_end_matches("-shard"));
        for out in &entry.outputs {
            let Some(object) = self.get_object(&out.digest)? else {
                return Ok(Some(format!("its output {} ({}) is missing", out.path, out.digest.short())));
            };
            if object.len() as u64 != out.size {
                return Ok(Some(format!("its output {} is {} bytes, not {}", out.path, object.len(), out.size)));
            }
            if let Some(stage) = stage.filter(|s| *s != Stage::Export)
                && let Err(e) = Rows::parse(stage, &object, &out.path)
            {
                return Ok(Some(format!("its output {} is not {} rows ({e:#})", out.path, stage.name())));
            }
        }
        Ok(None)
    }
}

impl super::Remote {
    /// `verify` for a remote: every object fetched and re-hashed, every
    /// entry re-read (and its signature checked, with trusted keys) and its
    /// outputs looked for. Nothing on the remote is changed.
    pub fn verify(&self) -> Result<VerifySummary> {
        let mut s = VerifySummary::default();
        for blob in self.tier().list(Bucket::Objects)? {
            s.objects += 1;
            s.bytes += blob.size;
            if self.get_object(&blob.name, &mut std::io::sink())?.is_none() {
                s.damaged.push(blob.name);
            }
        }
        for blob in self.tier().list(Bucket::Actions)? {
            s.actions += 1;
            let Some(entry) = self.get_entry(&blob.name)? else {
                s.damaged_actions.push((blob.name, "it is damaged or not trusted (see the warning above)".into()));
                continue;
            };
            for out in &entry.outputs {
                if !self.has_object(&out.digest)? {
                    s.damaged_actions
                        .push((blob.name, format!("its output {} ({}) is missing", out.path, out.digest.short())));
                    break;
                }
            }
        }
        Ok(s)
    }
}
