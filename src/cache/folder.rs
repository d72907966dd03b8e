//! A folder tier: the local cache, or a shared folder (NFS, Lustre) that
//! teammates with different users and umasks write to.

use super::tier::{Blob, Bucket, FILE_MODE, OBJECT_MODE, Tier, Version, write_atomic_in, write_temp};
use crate::digest::Digest;
use anyhow::{Context, Result, bail};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub struct FolderTier {
    root: PathBuf,
    /// Shared with teammates: folders group-writable (and setgid, so files
    /// keep the folder's group) and files' modes set whatever the umask.
    shared: bool,
}

impl FolderTier {
    /// The local cache's folder.
    pub fn new(root: &Path) -> FolderTier {
        FolderTier { root: root.to_path_buf(), shared: false }
    }

    /// A folder shared by teammates.
    pub fn shared(root: &Path) -> FolderTier {
        FolderTier { root: root.to_path_buf(), shared: true }
    }

    /// Where a blob lives on disk.
    pub fn blob_path(&self, bucket: Bucket, name: &Digest) -> PathBuf {
        self.root.join(bucket.path(name))
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn mode(&self, bucket: Bucket) -> u32 {
        match (bucket, self.shared) {
            (Bucket::Objects, _) => OBJECT_MODE,
            // Entries are never rewritten on a shared folder.
            (_, true) => 0o444,
            (_, false) => FILE_MODE,
        }
    }

    fn err(&self, what: &str, bucket: Bucket, name: &Digest) -> String {
        format!("{}: cannot {what} {}", self.root.display(), bucket.path(name))
    }

    /// Creates the blob's folder (group-writable and setgid when shared).
    fn make_dirs(&self, dest: &Path) -> io::Result<()> {
        let dir = dest.parent().expect("blob paths have a parent");
        create_dirs(dir)?;
        if self.shared {
            for d in [dir, dir.parent().unwrap_or(dir), &self.tmp_dir()] {
                create_dirs(d)?;
                let _ = std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o2775));
            }
        }
        Ok(())
    }

    /// Writes through a temporary file; the mode is set after the umask
    /// when shared, so a teammate's umask cannot lock the others out.
    fn temp(&self, bucket: Bucket, bytes: &[u8]) -> io::Result<tempfile::NamedTempFile> {
        let tmp = write_temp(&self.tmp_dir(), bytes, self.mode(bucket))?;
        if self.shared {
            tmp.as_file().set_permissions(std::fs::Permissions::from_mode(self.mode(bucket)))?;
        }
        Ok(tmp)
    }
}

/// `create_dir_all`, again when it fails with "exists": it does when the
/// folder is removed between its `mkdir` and its check (a record taken back
/// by another claimer while this one recreates it).
fn create_dirs(dir: &Path) -> io::Result<()> {
    let mut tries = 0;
    loop {
        match std::fs::create_dir_all(dir) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries < 16 => tries += 1,
            done => return done,
        }
    }
}

/// A record on a folder is a folder of generations, `<record>/<generation>`,
/// each created once (a hard link never replaces), so a compare-and-swap is
/// creating the next generation; readers take the highest. Generation 0
/// stays until the record is removed, so a second creation always fails.
fn generation_name(generation: u64) -> String {
    format!("{generation:020}")
}

/// The highest generation in a record's folder.
fn latest_generation(dir: &Path) -> io::Result<Option<u64>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(it) => it,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut latest = None;
    for entry in entries {
        if let Some(g) = entry?.file_name().to_str().and_then(|n| n.parse::<u64>().ok()) {
            latest = latest.max(Some(g));
        }
    }
    Ok(latest)
}

impl Tier for FolderTier {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn get(&self, bucket: Bucket, name: &Digest) -> Result<Option<Vec<u8>>> {
        match std::fs::read(self.blob_path(bucket, name)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            // Something else in a blob's place holds no valid bytes: the
            // cache sees damage, removes it and rebuilds.
            Err(e) if e.kind() == io::ErrorKind::IsADirectory => Ok(Some(Vec::new())),
            Err(e) => Err(e).with_context(|| self.err("read", bucket, name)),
        }
    }

    fn size(&self, bucket: Bucket, name: &Digest) -> Result<Option<u64>> {
        match std::fs::metadata(self.blob_path(bucket, name)) {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| self.err("read", bucket, name)),
        }
    }

    fn put(&self, bucket: Bucket, name: &Digest, bytes: &[u8]) -> Result<()> {
        let dest = self.blob_path(bucket, name);
        let written = self.make_dirs(&dest).and_then(|()| {
            if self.shared {
                self.temp(bucket, bytes)?.persist(&dest).map_err(|e| e.error).map(|_| ())
            } else {
                write_atomic_in(&self.tmp_dir(), &dest, bytes, self.mode(bucket))
            }
        });
        written.with_context(|| self.err("write", bucket, name))
    }

    fn create(&self, bucket: Bucket, name: &Digest, bytes: &[u8]) -> Result<bool> {
        let dest = self.blob_path(bucket, name);
        let created = self.make_dirs(&dest).and_then(|()| {
            // A hard link never replaces: the first writer wins.
            match self.temp(bucket, bytes)?.persist_noclobber(&dest) {
                Ok(_) => Ok(true),
                Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(e.error),
            }
        });
        created.with_context(|| self.err("write", bucket, name))
    }

    fn remove(&self, bucket: Bucket, name: &Digest) -> Result<()> {
        let path = self.blob_path(bucket, name);
        let removed = match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
        match removed {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e).with_context(|| self.err("remove", bucket, name)),
            _ => Ok(()),
        }
    }

    fn list(&self, bucket: Bucket) -> Result<Vec<Blob>> {
        let mut out = Vec::new();
        let dir = self.root.join(bucket.dir_name());
        let context = || format!("{}: cannot list {}", self.root.display(), bucket.dir_name());
        let fans = match std::fs::read_dir(&dir) {
            Ok(it) => it,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e).with_context(context),
        };
        for fan in fans {
            let fan = fan.with_context(context)?;
            if !fan.file_type().with_context(context)?.is_dir() {
                continue;
            }
            for entry in std::fs::read_dir(fan.path()).with_context(context)? {
                let entry = entry.with_context(context)?;
                // Anything not named by a digest is not ours (an editor's backup, say).
                if let Some(name) = entry.file_name().to_str().and_then(|n| n.parse::<Digest>().ok()) {
                    let meta = entry.metadata().with_context(context)?;
                    out.push(Blob { name, size: meta.len(), modified: meta.modified().with_context(context)? });
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn read_record(&self, bucket: Bucket, name: &Digest) -> Result<Option<(Vec<u8>, Version)>> {
        let dir = self.blob_path(bucket, name);
        // A generation can be pruned between listing and reading: list again.
        for _ in 0..16 {
            let Some(generation) = latest_generation(&dir).with_context(|| self.err("read", bucket, name))? else {
                return Ok(None);
            };
            match std::fs::read(dir.join(generation_name(generation))) {
                Ok(bytes) => return Ok(Some((bytes, Version(generation.to_string())))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).with_context(|| self.err("read", bucket, name)),
            }
        }
        bail!("{}: it changes faster than it can be read", self.err("read", bucket, name))
    }

    fn swap_record(
        &self,
        bucket: Bucket,
        name: &Digest,
        expected: Option<&Version>,
        bytes: &[u8],
    ) -> Result<Option<Version>> {
        let dir = self.blob_path(bucket, name);
        let next = match expected {
            None => 0,
            Some(v) => v.0.parse::<u64>().with_context(|| self.err("update", bucket, name))? + 1,
        };
        let path = dir.join(generation_name(next));
        let swapped = self.make_dirs(&path).and_then(|()| match self.temp(bucket, bytes)?.persist_noclobber(&path) {
            Ok(_) => Ok(true),
            // Another writer's generation, or the record was removed meanwhile.
            Err(e) if matches!(e.error.kind(), io::ErrorKind::AlreadyExists | io::ErrorKind::NotFound) => Ok(false),
            Err(e) => Err(e.error),
        });
        if !swapped.with_context(|| self.err("update", bucket, name))? {
            return Ok(None);
        }
        // Older generations were pruned, so `next` could be recreated by a
        // writer that read long ago: it then lies below the latest, is
        // never read, and is taken back.
        if latest_generation(&dir).ok().flatten().is_some_and(|g| g > next) {
            let _ = std::fs::remove_file(&path);
            return Ok(None);
        }
        for old in (1..next.saturating_sub(1)).rev().take(4) {
            let _ = std::fs::remove_file(dir.join(generation_name(old)));
        }
        Ok(Some(Version(next.to_string())))
    }
}
