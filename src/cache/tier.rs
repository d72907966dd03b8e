//! Storage tiers: where blobs (objects and action entries) physically live.
//!
//! The cache above only ever calls `Tier`, so a shared folder or a remote
//! object store can stand behind the local folder without the runner knowing
//! (sccache's `Storage` shape). A tier stores bytes; it never judges them:
//! verification is the cache's job, so it applies to every tier alike.

use crate::digest::Digest;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

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
            Bucket::Actions => "actions-v1",
        }
    }
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
    /// Every blob in a bucket, with its size.
    fn list(&self, bucket: Bucket) -> io::Result<Vec<(Digest, u64)>>;
}

/// A folder on a local or shared disk.
pub struct FolderTier {
    root: PathBuf,
}

impl FolderTier {
    pub fn new(root: &Path) -> FolderTier {
        FolderTier { root: root.to_path_buf() }
    }

    fn path(&self, bucket: Bucket, name: &Digest) -> PathBuf {
        let hex = name.to_hex();
        self.root.join(bucket.dir_name()).join(&hex[..2]).join(&hex)
    }

    /// Where a blob lives on disk.
    pub fn blob_path(&self, bucket: Bucket, name: &Digest) -> PathBuf {
        self.path(bucket, name)
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }
}

impl Tier for FolderTier {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn get(&self, bucket: Bucket, name: &Digest) -> io::Result<Option<Vec<u8>>> {
        match std::fs::read(self.path(bucket, name)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn size(&self, bucket: Bucket, name: &Digest) -> io::Result<Option<u64>> {
        match std::fs::metadata(self.path(bucket, name)) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn put(&self, bucket: Bucket, name: &Digest, bytes: &[u8]) -> io::Result<()> {
        let dest = self.path(bucket, name);
        std::fs::create_dir_all(dest.parent().expect("blob paths have a parent"))?;
        let mode = if bucket == Bucket::Objects { OBJECT_MODE } else { FILE_MODE };
        write_atomic_in(&self.tmp_dir(), &dest, bytes, mode)
    }

    fn remove(&self, bucket: Bucket, name: &Digest) -> io::Result<()> {
        match std::fs::remove_file(self.path(bucket, name)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn list(&self, bucket: Bucket) -> io::Result<Vec<(Digest, u64)>> {
        let mut out = Vec::new();
        let dir = self.root.join(bucket.dir_name());
        let fans = match std::fs::read_dir(&dir) {
            Ok(it) => it,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for fan in fans {
            let fan = fan?;
            if !fan.file_type()?.is_dir() {
                continue;
            }
            for entry in std::fs::read_dir(fan.path())? {
                let entry = entry?;
                // Anything not named by a digest is not ours (an editor's backup, say).
                if let Some(d) = entry.file_name().to_str().and_then(|n| n.parse::<Digest>().ok()) {
                    out.push((d, entry.metadata()?.len()));
                }
            }
        }
        out.sort();
        Ok(out)
    }
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
