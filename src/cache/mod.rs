//! The content-addressed cache: objects named by the BLAKE3 digest of their
//! bytes, and an action cache mapping a node's key to what it produced.
//!
//! Layout of the root (`./cache` by default):
//!
//! ```text
//! CACHEDIR.TAG, .gitignore   so backup tools and git leave it alone
//! objects-v1/ab/<digest>     artifacts                  (in every tier)
//! actions-v1/ab/<key>        action entries, JSON       (in every tier)
//! refs-v1/<node>             key of a node's last build (local: explains `plan`)
//! stat-v1/<path>             remembered file digests    (local)
//! locks/<key>.lock           one builder per key        (local)
//! tmp/                       writes in progress
//! ```

mod action;
mod maintain;
pub mod tier;

pub use action::{ActionEntry, KeyMaterial, OutputFile};

use crate::digest::Digest;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use tier::{Bucket, FILE_MODE, FolderTier, Tier, write_atomic_in};

/// The cache root when neither `--cache` nor `PREFGEN_CACHE` names one.
pub const DEFAULT_ROOT: &str = "cache";

pub struct Cache {
    root: PathBuf,
    local: FolderTier,
}

/// An exclusive claim on building one action key; released on drop.
pub struct BuildLock {
    _file: File,
}

impl Cache {
    /// Opens (creating if needed) the cache at `root`.
    pub fn open(root: &Path) -> Result<Cache> {
        let ctx = || format!("cannot create the cache at {}", root.display());
        std::fs::create_dir_all(root).with_context(ctx)?;
        let tag: &[u8] =
            b"Signature: 8a477f597d28d172789f06886806bc55\n# prefgen cache: content-addressed, safe to delete.\n";
        for (name, body) in [("CACHEDIR.TAG", tag), (".gitignore", b"*\n")] {
            if !root.join(name).exists() {
                write_atomic_in(&root.join("tmp"), &root.join(name), body, FILE_MODE).with_context(ctx)?;
            }
        }
        Ok(Cache { root: root.to_path_buf(), local: FolderTier::new(root) })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Stores an artifact and returns its digest (a no-op when already present).
    pub fn put_object(&self, bytes: &[u8]) -> Result<Digest> {
        let digest = Digest::of(bytes);
        self.store_object(&digest, bytes)?;
        Ok(digest)
    }

    /// Stores an artifact whose digest the caller has computed from `bytes`.
    pub fn store_object(&self, digest: &Digest, bytes: &[u8]) -> Result<()> {
        if self.local.size(Bucket::Objects, digest)? != Some(bytes.len() as u64) {
            self.local
                .put(Bucket::Objects, digest, bytes)
                .with_context(|| format!("cannot write to the cache at {}", self.local.describe()))?;
        }
        Ok(())
    }

    /// An artifact's bytes, verified against its digest. A damaged object is
    /// removed and reported as absent, so it is rebuilt and never served.
    pub fn get_object(&self, digest: &Digest) -> Result<Option<Vec<u8>>> {
        let Some(bytes) = self.local.get(Bucket::Objects, digest)? else {
            return Ok(None);
        };
        if Digest::of(&bytes) != *digest {
            eprintln!("warning: cache object {} is damaged; removing it so it is rebuilt", digest.short());
            self.local.remove(Bucket::Objects, digest)?;
            return Ok(None);
        }
        Ok(Some(bytes))
    }

    /// Places a verified object at `dest` (atomically): a hard link to the
    /// read-only object when the file system allows (true), otherwise a copy
    /// (false). `trusted` skips re-verifying an object this process has just
    /// written. A damaged object is removed and reported as `None`.
    pub fn materialise(&self, digest: &Digest, dest: &Path, tmp_dir: &Path, trusted: bool) -> Result<Option<bool>> {
        if !trusted && self.get_object(digest)?.is_none() {
            return Ok(None);
        }
        std::fs::create_dir_all(tmp_dir)?;
        let tmp = tmp_dir.join(format!("link-{}-{}", std::process::id(), digest.to_hex()));
        let _ = std::fs::remove_file(&tmp);
        if std::fs::hard_link(self.local.blob_path(Bucket::Objects, digest), &tmp).is_ok() {
            std::fs::rename(&tmp, dest)?;
            return Ok(Some(true));
        }
        // Another file system (EXDEV), or no link support: copy.
        let Some(bytes) = self.get_object(digest)? else { return Ok(None) };
        write_atomic_in(tmp_dir, dest, &bytes, FILE_MODE)?;
        Ok(Some(false))
    }

    /// Whether `path` is a hard link to the object `digest`.
    pub fn is_link_to(&self, path: &Path, digest: &Digest) -> bool {
        use std::os::unix::fs::MetadataExt;
        let object = self.local.blob_path(Bucket::Objects, digest);
        match (std::fs::metadata(path), std::fs::metadata(object)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }

    /// Whether every output of an entry is present with its recorded size
    /// (cheap: a stat per file; contents are verified when read).
    pub fn has_outputs(&self, entry: &ActionEntry) -> Result<bool> {
        for out in &entry.outputs {
            if self.local.size(Bucket::Objects, &out.digest)? != Some(out.size) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The action entry stored under `key`, if any and if readable.
    pub fn get_action(&self, key: &Digest) -> Result<Option<ActionEntry>> {
        let Some(bytes) = self.local.get(Bucket::Actions, key)? else {
            return Ok(None);
        };
        match serde_json::from_slice::<ActionEntry>(&bytes) {
            Ok(entry) if entry.key() == *key => Ok(Some(entry)),
            _ => {
                eprintln!("warning: action entry {} is damaged; removing it so it is rebuilt", key.short());
                self.local.remove(Bucket::Actions, key)?;
                Ok(None)
            }
        }
    }

    /// Records what building `entry`'s key produced.
    pub fn put_action(&self, entry: &ActionEntry) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(entry).expect("entries serialise");
        self.local.put(Bucket::Actions, &entry.key(), &bytes)?;
        Ok(())
    }

    /// The entry of the last build of a node (named by recipe and node), which
    /// `plan` diffs against to say why a node is stale.
    pub fn last_build(&self, node: &str) -> Result<Option<ActionEntry>> {
        match std::fs::read_to_string(self.ref_path(node)) {
            Ok(s) => match s.trim().parse::<Digest>() {
                Ok(key) => self.get_action(&key),
                Err(_) => Ok(None),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Remembers `key` as the last build of `node`.
    pub fn set_last_build(&self, node: &str, key: &Digest) -> Result<()> {
        let path = self.ref_path(node);
        std::fs::create_dir_all(path.parent().expect("ref paths have a parent"))?;
        write_atomic_in(&self.root.join("tmp"), &path, key.to_hex().as_bytes(), FILE_MODE)?;
        Ok(())
    }

    fn ref_path(&self, node: &str) -> PathBuf {
        self.root.join("refs-v1").join(Digest::of(node.as_bytes()).to_hex())
    }

    /// Claims the right to build `key`, waiting while another process holds it.
    /// The lock files are never removed: removing one would let two processes
    /// hold "the same" lock on different inodes.
    pub fn lock(&self, key: &Digest, what: &str) -> Result<BuildLock> {
        let dir = self.root.join("locks");
        std::fs::create_dir_all(&dir)?;
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(format!("{}.lock", key.to_hex())))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                eprintln!("waiting for another prefgen process that is building {what}");
                file.lock()?;
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e.into()),
        }
        Ok(BuildLock { _file: file })
    }

    /// The digest of a file's contents, or of a folder's files (names and
    /// contents), each remembered as `file_digest` remembers it.
    pub fn path_digest(&self, path: &Path) -> Result<Digest> {
        if !path.is_dir() {
            return self.file_digest(path);
        }
        let mut parts = Vec::new();
        for rel in crate::hub::list_files(path)? {
            let file = path.join(&rel);
            // A hub snapshot links each file to blobs/<sha256 or git sha>: the
            // hub's own record of its contents, free to read.
            let identity = match std::fs::read_link(&file) {
                Ok(target) if target.parent().and_then(|p| p.file_name()).is_some_and(|n| n == "blobs") => {
                    target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
                }
                _ => self.file_digest(&file)?.to_hex(),
            };
            parts.push((identity, rel));
        }
        Ok(Digest::of_json(&parts))
    }

    /// The digest of a file's contents, remembered by path, size and
    /// modification time so large inputs are not re-hashed on every run.
    pub fn file_digest(&self, path: &Path) -> Result<Digest> {
        #[derive(Serialize, Deserialize, PartialEq)]
        struct Stat {
            path: PathBuf,
            size: u64,
            mtime_ns: u128,
            digest: Digest,
        }
        let abs = std::path::absolute(path)?;
        let meta = std::fs::metadata(&abs).with_context(|| format!("cannot read {}", path.display()))?;
        let mtime = meta.modified()?;
        let mtime_ns = mtime.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let memo = self.root.join("stat-v1").join(Digest::of(abs.as_os_str().as_encoded_bytes()).to_hex());
        if let Ok(bytes) = std::fs::read(&memo)
            && let Ok(stat) = serde_json::from_slice::<Stat>(&bytes)
            && stat.path == abs
            && stat.size == meta.len()
            && stat.mtime_ns == mtime_ns
        {
            return Ok(stat.digest);
        }
        let digest = Digest::of_file(&abs).with_context(|| format!("cannot read {}", path.display()))?;
        // A file modified within the clock's resolution of now could change again
        // without its mtime moving (git's "racily clean" problem): don't remember it.
        let settled = SystemTime::now().duration_since(mtime).is_ok_and(|age| age > Duration::from_secs(2));
        if settled {
            std::fs::create_dir_all(memo.parent().expect("memo paths have a parent"))?;
            let stat = Stat { path: abs, size: meta.len(), mtime_ns, digest };
            write_atomic_in(&self.root.join("tmp"), &memo, &serde_json::to_vec(&stat)?, FILE_MODE)?;
        }
        Ok(digest)
    }
}
