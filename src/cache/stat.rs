//! Digests of files outside the cache (imports, prompt files, models),
//! remembered in `stat-v1/` by path, size and modification time, so large
//! inputs are not hashed again on every run (except under `run --locked`,
//! which hashes each again once: see `Cache::rehash_inputs`).

use super::Cache;
use super::tier::{FILE_MODE, write_atomic_in};
use crate::digest::Digest;
use crate::infer::files;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

pub(super) const DIR: &str = "stat-v1";

/// What is remembered of one file.
#[derive(Serialize, Deserialize)]
pub(super) struct Memo {
    pub path: PathBuf,
    pub size: u64,
    pub mtime_ns: u128,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    blake3: Option<Digest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sha256: Option<String>,
}

impl Memo {
    /// Whether the file is still what the memo describes.
    pub fn holds(&self) -> bool {
        size_mtime(&self.path).is_ok_and(|now| now == (self.size, self.mtime_ns))
    }
}

fn size_mtime(path: &Path) -> std::io::Result<(u64, u128)> {
    let meta = std::fs::metadata(path)?;
    let mtime = meta.modified()?.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos();
    Ok((meta.len(), mtime))
}

fn sha256_of(path: &Path) -> std::io::Result<String> {
    let mut hasher = sha2::Sha256::new();
    crate::digest::stream(path, |chunk| hasher.update(chunk))?;
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

impl Cache {
    fn memo_path(&self, abs: &Path) -> PathBuf {
        self.root.join(DIR).join(Digest::of(abs.as_os_str().as_encoded_bytes()).to_hex())
    }

    /// A file's memo, updated by `fill` when it lacks what is asked for.
    fn remembered(&self, path: &Path, missing: fn(&Memo) -> bool, fill: fn(&mut Memo) -> Result<()>) -> Result<Memo> {
        let abs = std::path::absolute(path)?;
        let (size, mtime_ns) = size_mtime(&abs).with_context(|| format!("cannot read {}", path.display()))?;
        let memo_path = self.memo_path(&abs);
        let trusted = self.rehashed.lock().expect("not poisoned").as_ref().is_none_or(|done| done.contains(&abs));
        let mut memo = std::fs::read(&memo_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Memo>(&b).ok())
            .filter(|m| trusted && m.path == abs && m.size == size && m.mtime_ns == mtime_ns)
            .unwrap_or(Memo { path: abs.clone(), size, mtime_ns, blake3: None, sha256: None });
        if !missing(&memo) {
            return Ok(memo);
        }
        fill(&mut memo).with_context(|| format!("cannot read {}", path.display()))?;
        if let Some(done) = self.rehashed.lock().expect("not poisoned").as_mut() {
            done.insert(abs.clone());
        }
        // A file modified within the clock's resolution of now could change again
        // without its mtime moving (git's "racily clean" problem): don't remember it.
        let mtime = SystemTime::UNIX_EPOCH + Duration::from_nanos(mtime_ns as u64);
        if SystemTime::now().duration_since(mtime).is_ok_and(|age| age > Duration::from_secs(2)) {
            std::fs::create_dir_all(memo_path.parent().expect("memo paths have a parent"))
                .map_err(|e| self.unwritable(e))?;
            write_atomic_in(&self.root.join("tmp"), &memo_path, &serde_json::to_vec(&memo)?, FILE_MODE)
                .map_err(|e| self.unwritable(e))?;
        }
        Ok(memo)
    }

    /// The BLAKE3 digest of a file's contents.
    pub fn file_digest(&self, path: &Path) -> Result<Digest> {
        let memo = self.remembered(
            path,
            |m| m.blake3.is_none(),
            |m| {
                m.blake3 = Some(Digest::of_file(&m.path)?);
                Ok(())
            },
        )?;
        Ok(memo.blake3.expect("filled above"))
    }

    /// The SHA-256 of a file's contents (what the hub records of weights).
    fn file_sha256(&self, path: &Path) -> Result<String> {
        let memo = self.remembered(
            path,
            |m| m.sha256.is_none(),
            |m| {
                m.sha256 = Some(sha256_of(&m.path)?);
                Ok(())
            },
        )?;
        Ok(memo.sha256.expect("filled above"))
    }

    /// A model's identity: the digest of the name and SHA-256 of every file
    /// its loader reads. A hub snapshot links a weight file to its blob,
    /// named by that SHA-256 (the hub's own record, free to read); other
    /// files are hashed. Files the loader does not read do not count, and a
    /// local copy of a snapshot keys the same as the snapshot.
    pub fn model_identity(&self, path: &Path) -> Result<Digest> {
        let mut parts = Vec::new();
        for (name, file) in files::read_by_loader(path)? {
            let blob = std::fs::read_link(&file).ok().and_then(|t| {
                let name = t.file_name()?.to_str()?.to_string();
                let in_blobs = t.parent().and_then(|p| p.file_name()).is_some_and(|n| n == "blobs");
                (in_blobs && name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())).then_some(name)
            });
            let sha = match blob {
                Some(sha) => sha,
                None => self.file_sha256(&file)?,
            };
            parts.push((name, sha));
        }
        Ok(Digest::of_json(&("model", parts)))
    }
}
