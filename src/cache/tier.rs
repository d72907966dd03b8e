//! Storage tiers: where blobs (objects and action entries) physically live.
//!
//! The cache above only ever calls `Tier`, so a shared folder or a remote
//! object store can stand behind the local folder without the runner knowing
//! (sccache's `Storage` shape). A tier stores bytes; it never judges them:
//! verification is the cache's job, so it applies to every tier alike.

use crate::digest::Digest;
use std::io::{self, Write};
use std::path::Path;

/// The kinds of blob a tier holds; the versioned folder names let a format
/// change start a new bucket instead of misreading an old one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bucket {
    /// Artifacts, named by the BLAKE3 digest of their bytes.
    Objects,
    /// Action entries, named by their action key.
    Actions,
}

impl Bucket {
    pub fn dir_name(self) -> &'static str {
        match self {
            Bucket::Objects => "objects-v1",
            Bucket::Actions => "actions-v2",
        }
    }
}

/// A blob as a tier lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Blob {
    pub name: Digest,
    pub size: u64,
    pub modified: std::time::SystemTime,
}

/// One storage tier.
pub trait Tier: Send + Sync {
    /// Where the tier is, for messages.
    fn describe(&self) -> String;
    /// The blob's bytes, or None when the tier lacks it.
    fn get(&self, bucket: Bucket, name: &Digest) -> io::Result<Option<Vec<u8>>>;
    /// The blob's size, or None when the tier lacks it; reads nothing else.
    fn size(&self, bucket: Bucket, name: &Digest) -> io::Result<Option<u64>>;
    /// Stores a blob so that readers see all of it or none of it.
    fn put(&self, bucket: Bucket, name: &Digest, bytes: &[u8]) -> io::Result<()>;
    /// Removes a blob; removing a missing blob is not an error.
    fn remove(&self, bucket: Bucket, name: &Digest) -> io::Result<()>;
    /// Every blob in a bucket, with its size and modification time.
    fn list(&self, bucket: Bucket) -> io::Result<Vec<Blob>>;
}

/// Writes `bytes` to `dest` through a temporary file in `tmp_dir` (same file
/// system), fsynced before the rename, so a crash leaves the old file or the
/// new one, never a torn one. `mode` is applied through the umask.
pub fn write_atomic_in(tmp_dir: &Path, dest: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(tmp_dir)?;
    let mut tmp = tempfile::Builder::new().permissions(std::fs::Permissions::from_mode(mode)).tempfile_in(tmp_dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(dest).map_err(|e| e.error)?;
    Ok(())
}

/// Mode of cache objects: read-only, because exports are hard links to them
/// and an edit through a link must not silently change an artifact.
pub const OBJECT_MODE: u32 = 0o444;
/// Mode of every other file prefgen writes (before the umask).
pub const FILE_MODE: u32 = 0o666;
