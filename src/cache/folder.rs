//! The local (or shared-disk) folder tier.

use super::tier::{Blob, Bucket, FILE_MODE, OBJECT_MODE, Tier, write_atomic_in};
use crate::digest::Digest;
use std::io;
use std::path::{Path, PathBuf};

/// A folder on a local or shared disk.
pub struct FolderTier {
    root: PathBuf,
}

impl FolderTier {
    pub fn new(root: &Path) -> FolderTier {
        FolderTier { root: root.to_path_buf() }
    }

    /// Where a blob lives on disk: `<bucket>/<first two hex digits>/<name>`.
    pub fn blob_path(&self, bucket: Bucket, name: &Digest) -> PathBuf {
        let hex = name.to_hex();
        self.root.join(bucket.dir_name()).join(&hex[..2]).join(&hex)
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
        match std::fs::read(self.blob_path(bucket, name)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            // Something else in a blob's place holds no valid bytes: the
            // cache sees damage, removes it and rebuilds.
            Err(e) if e.kind() == io::ErrorKind::IsADirectory => Ok(Some(Vec::new())),
            Err(e) => Err(e),
        }
    }

    fn size(&self, bucket: Bucket, name: &Digest) -> io::Result<Option<u64>> {
        match std::fs::metadata(self.blob_path(bucket, name)) {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn put(&self, bucket: Bucket, name: &Digest, bytes: &[u8]) -> io::Result<()> {
        let dest = self.blob_path(bucket, name);
        std::fs::create_dir_all(dest.parent().expect("blob paths have a parent"))?;
        let mode = if bucket == Bucket::Objects { OBJECT_MODE } else { FILE_MODE };
        write_atomic_in(&self.tmp_dir(), &dest, bytes, mode)
    }

    fn remove(&self, bucket: Bucket, name: &Digest) -> io::Result<()> {
        let path = self.blob_path(bucket, name);
        let removed = match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
        match removed {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn list(&self, bucket: Bucket) -> io::Result<Vec<Blob>> {
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
                if let Some(name) = entry.file_name().to_str().and_then(|n| n.parse::<Digest>().ok()) {
                    let meta = entry.metadata()?;
                    out.push(Blob { name, size: meta.len(), modified: meta.modified()? });
                }
            }
        }
        out.sort();
        Ok(out)
    }
}
