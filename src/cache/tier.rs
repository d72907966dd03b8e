//! Storage tiers: where blobs (objects and action entries) physically live.
//!
//! The cache above only ever calls `Tier`, so a shared folder or a remote
//! object store stands behind the local folder without the runner knowing
//! (sccache's `Storage` shape). A tier stores bytes; it never judges them:
//! verification is the cache's job, so it applies to every tier alike.
//! Every tier lays its blobs out alike (`Bucket::path`).

use crate::digest::Digest;
use anyhow::Result;
use std::io::{self, Read, Write};
use std::path::Path;

/// The kinds of blob a tier holds; the versioned folder names let a format
/// change start a new bucket instead of misreading an old one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bucket {
    /// Artifacts, named by the BLAKE3 digest of their bytes.
    Objects,
    /// Action entries, named by their action key.
    Actions,
    /// A remote's one layout marker (its name is ignored).
    Layout,
    /// Claims on shards being built, named by the shard's key: records
    /// that change in place (`read_record`, `swap_record`).
    Leases,
}

impl Bucket {
    pub fn dir_name(self) -> &'static str {
        match self {
            Bucket::Objects => "objects-v1",
            Bucket::Actions => "actions-v3",
            Bucket::Layout => "",
            Bucket::Leases => "leases-v1",
        }
    }

    /// Where a blob lives below a tier's root: `objects-v1/ab/<digest>`.
    pub fn path(self, name: &Digest) -> String {
        match self {
            Bucket::Layout => "prefgen-layout.json".into(),
            _ => {
                let hex = name.to_hex();
                format!("{}/{}/{hex}", self.dir_name(), &hex[..2])
            }
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

/// One storage tier. Errors name the tier and the blob.
pub trait Tier: Send + Sync {
    /// Where the tier is, for messages (never a credential).
    fn describe(&self) -> String;
    /// The blob's bytes, or None when the tier lacks it.
    fn get(&self, bucket: Bucket, name: &Digest) -> Result<Option<Vec<u8>>>;
    /// The blob's bytes as a stream (objects can be larger than memory), or
    /// None when the tier lacks it. Read errors name the tier and the blob.
    fn open(&self, bucket: Bucket, name: &Digest) -> Result<Option<Box<dyn Read + '_>>>;
    /// The blob's size, or None when the tier lacks it; reads nothing else.
    fn size(&self, bucket: Bucket, name: &Digest) -> Result<Option<u64>>;
    /// Stores what `src` yields up to its end, streamed, so that readers see
    /// all of it or none of it: when `src` fails (a source found damaged at
    /// its end) nothing is stored. Returns the bytes stored.
    fn put_reader(&self, bucket: Bucket, name: &Digest, src: &mut dyn Read) -> Result<u64>;
    /// Stores a blob so that readers see all of it or none of it.
    fn put(&self, bucket: Bucket, name: &Digest, bytes: &[u8]) -> Result<()> {
        self.put_reader(bucket, name, &mut &bytes[..]).map(|_| ())
    }
    /// Whether the tier holds nothing at all (a remote nobody pushed to yet).
    fn is_empty(&self) -> Result<bool>;
    /// Stores a blob unless the tier has one of that name (the first writer
    /// wins); true when this call stored it.
    fn create(&self, bucket: Bucket, name: &Digest, bytes: &[u8]) -> Result<bool>;
    /// Removes a blob; removing a missing blob is not an error.
    fn remove(&self, bucket: Bucket, name: &Digest) -> Result<()>;
    /// Every blob in a bucket, with its size and modification time.
    fn list(&self, bucket: Bucket) -> Result<Vec<Blob>>;
    /// A record's bytes and its version (which changes with every write).
    fn read_record(&self, bucket: Bucket, name: &Digest) -> Result<Option<(Vec<u8>, Version)>>;
    /// Writes a record if it is still at `expected` (None: if there is
    /// none), a compare-and-swap: the new version, or None when another
    /// writer got there first.
    fn swap_record(
        &self,
        bucket: Bucket,
        name: &Digest,
        expected: Option<&Version>,
        bytes: &[u8],
    ) -> Result<Option<Version>>;
}

/// A record's version as its tier tells it (an ETag, a generation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version(pub String);

/// Writes `bytes` to `dest` through a temporary file in `tmp_dir` (same file
/// system), fsynced before the rename, so a crash leaves the old file or the
/// new one, never a torn one. `mode` is applied through the umask.
pub fn write_atomic_in(tmp_dir: &Path, dest: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let tmp = write_temp(tmp_dir, bytes, mode)?;
    tmp.persist(dest).map_err(|e| e.error)?;
    Ok(())
}

/// `bytes` in a fsynced temporary file of `tmp_dir`, to be persisted.
pub fn write_temp(tmp_dir: &Path, bytes: &[u8], mode: u32) -> io::Result<tempfile::NamedTempFile> {
    use std::os::unix::fs::PermissionsExt;
    // The temporary folder is named: "File exists" alone says nothing of where.
    let named = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", tmp_dir.display()));
    std::fs::create_dir_all(tmp_dir).map_err(named)?;
    let mut tmp = tempfile::Builder::new()
        .permissions(std::fs::Permissions::from_mode(mode))
        .tempfile_in(tmp_dir)
        .map_err(named)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    Ok(tmp)
}

/// Mode of cache objects: read-only, because exports are hard links to them
/// and an edit through a link must not silently change an artifact.
pub const OBJECT_MODE: u32 = 0o444;
/// Mode of every other file prefgen writes (before the umask).
pub const FILE_MODE: u32 = 0o666;
