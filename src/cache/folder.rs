//! A folder tier: the local cache, or a shared folder (NFS, Lustre) that
//! teammates with different users and umasks write to.

use super::tier::{Blob, Bucket, FILE_MODE, OBJECT_MODE, Tier, Version};
use crate::digest::Digest;
use anyhow::{Context, Result, bail};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub struct FolderTier {
    root: PathBuf,
    /// Shared with teammates: folders group-writable (and setgid, so files
    /// keep the folder's group) and files' modes set whatever the umask.
    shared: bool,
    /// A remote: its root and folders are created only with its layout
    /// marker, or below a root that the marker vouches for.
    remote: bool,
}

impl FolderTier {
    /// The local cache's folder.
    pub fn new(root: &Path) -> FolderTier {
        FolderTier { root: root.to_path_buf(), shared: false, remote: false }
    }

    /// A folder shared by teammates (the local cache of workers on a shared disk).
    pub fn shared(root: &Path) -> FolderTier {
        FolderTier { root: root.to_path_buf(), shared: true, remote: false }
    }

    /// A shared folder that is a remote, with its layout marker.
    pub fn remote(root: &Path) -> FolderTier {
        FolderTier { root: root.to_path_buf(), shared: true, remote: true }
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

    /// Creates `dir` (the root or a folder below it) and the folders between.
    /// When shared, the folders this call creates become group-writable and
    /// setgid; no other folder's mode is touched (above the root they are
    /// the user's). A remote's root is created only with its layout marker,
    /// and folders below it only while the marker is there: a remote that
    /// vanished (an unmounted mount point) is never recreated by a write.
    fn make_dirs(&self, dir: &Path, bucket: Bucket) -> io::Result<()> {
        if dir.is_dir() {
            return Ok(());
        }
        let marker = self.root.join(Bucket::Layout.path(&Digest::of(b"")));
        if self.remote && bucket != Bucket::Layout && !marker.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{} has no layout marker ({}): the remote is gone (an unmounted or removed shared folder?), and only a push to a new remote creates one",
                    self.root.display(),
                    marker.display()
                ),
            ));
        }
        let chain: Vec<&Path> = dir.ancestors().take_while(|d| d.starts_with(&self.root)).collect();
        for (i, d) in chain.into_iter().rev().enumerate() {
            let created = if i == 0 {
                // The root: its parents are the user's, created if need be
                // with the user's umask.
                let existed = d.is_dir();
                create_dirs(d)?;
                !existed
            } else {
                match std::fs::create_dir(d) {
                    Ok(()) => true,
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
                    Err(e) => return Err(e),
                }
            };
            if created && self.shared {
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o2775))?;
            }
        }
        Ok(())
    }

    /// An empty temporary file for a blob of `bucket`, to fill and `seal`.
    fn temp(&self, bucket: Bucket) -> io::Result<tempfile::NamedTempFile> {
        let dir = self.tmp_dir();
        self.make_dirs(&dir, bucket)?;
        tempfile::Builder::new().permissions(std::fs::Permissions::from_mode(self.mode(bucket))).tempfile_in(dir)
    }

    /// A filled temporary file made ready to persist: on disk, and when
    /// shared its mode set after the umask, so a teammate's umask cannot
    /// lock the others out. Its blob's folder is created.
    fn seal(&self, bucket: Bucket, tmp: &tempfile::NamedTempFile, dest: &Path) -> io::Result<()> {
        tmp.as_file().sync_all()?;
        if self.shared {
            tmp.as_file().set_permissions(std::fs::Permissions::from_mode(self.mode(bucket)))?;
        }
        self.make_dirs(dest.parent().expect("blob paths have a parent"), bucket)
    }

    /// Stores a blob written by `fill` into a temporary file: only when it
    /// returns Some (what it wrote is sound) does the blob appear, whole.
    /// An error writing the file is the outer one.
    pub fn put_with<T>(
        &self,
        bucket: Bucket,
        name: &Digest,
        fill: impl FnOnce(&mut dyn Write) -> Result<Option<T>>,
    ) -> Result<Result<Option<T>>> {
        let dest = self.blob_path(bucket, name);
        let tmp = self.temp(bucket).with_context(|| self.err("write", bucket, name))?;
        let file = tmp.as_file().try_clone().with_context(|| self.err("write", bucket, name))?;
        let mut out = Tracked { inner: io::BufWriter::with_capacity(1 << 20, file), failed: None };
        let filled = fill(&mut out).and_then(|found| {
            out.flush()?;
            Ok(found)
        });
        let Tracked { inner, failed } = out;
        drop(inner);
        if let Some(e) = failed {
            return Err(e).with_context(|| self.err("write", bucket, name));
        }
        if let Ok(Some(_)) = &filled {
            let sealed = self.seal(bucket, &tmp, &dest);
            sealed
                .and_then(|()| tmp.persist(&dest).map(|_| ()).map_err(|e| e.error))
                .with_context(|| self.err("write", bucket, name))?;
        }
        Ok(filled)
    }
}

/// A writer that remembers its own failure, so a caller tells a full disk
/// from a failing source.
struct Tracked<W> {
    inner: W,
    failed: Option<io::Error>,
}

impl<W: Write> Tracked<W> {
    fn note<T>(&mut self, r: io::Result<T>) -> io::Result<T> {
        r.inspect_err(|e| {
            self.failed.get_or_insert_with(|| io::Error::new(e.kind(), e.to_string()));
        })
    }
}

impl<W: Write> Write for Tracked<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let r = self.inner.write(buf);
        self.note(r)
    }

    fn flush(&mut self) -> io::Result<()> {
        let r = self.inner.flush();
        self.note(r)
    }
}

/// A blob's stream whose read errors name the blob.
struct Labelled<R> {
    inner: R,
    label: String,
}

impl<R: Read> Read for Labelled<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.label)))
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

    fn open(&self, bucket: Bucket, name: &Digest) -> Result<Option<Box<dyn Read + '_>>> {
        let file = match std::fs::File::open(self.blob_path(bucket, name)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| self.err("read", bucket, name)),
        };
        // A folder in a blob's place holds no valid bytes (as `get`).
        if file.metadata().with_context(|| self.err("read", bucket, name))?.is_dir() {
            return Ok(Some(Box::new(io::empty())));
        }
        Ok(Some(Box::new(Labelled { inner: file, label: self.err("read", bucket, name) })))
    }

    fn size(&self, bucket: Bucket, name: &Digest) -> Result<Option<u64>> {
        match std::fs::metadata(self.blob_path(bucket, name)) {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| self.err("read", bucket, name)),
        }
    }

    fn put_reader(&self, bucket: Bucket, name: &Digest, src: &mut dyn Read) -> Result<u64> {
        let stored = self.put_with(bucket, name, |out| Ok(Some(io::copy(src, out)?)))?;
        Ok(stored.with_context(|| self.err("write", bucket, name))?.unwrap_or(0))
    }

    fn is_empty(&self) -> Result<bool> {
        match std::fs::read_dir(&self.root) {
            Ok(mut entries) => Ok(entries.next().is_none()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
            Err(e) => Err(e).with_context(|| format!("{}: cannot list it", self.root.display())),
        }
    }

    fn create(&self, bucket: Bucket, name: &Digest, bytes: &[u8]) -> Result<bool> {
        let dest = self.blob_path(bucket, name);
        let created = self.temp(bucket).and_then(|mut tmp| {
            tmp.write_all(bytes)?;
            self.seal(bucket, &tmp, &dest)?;
            // A hard link never replaces: the first writer wins.
            match tmp.persist_noclobber(&dest) {
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
        let swapped = self.temp(bucket).and_then(|mut tmp| {
            tmp.write_all(bytes)?;
            self.seal(bucket, &tmp, &path)?;
            match tmp.persist_noclobber(&path) {
                Ok(_) => Ok(true),
                // Another writer's generation, or the record was removed meanwhile.
                Err(e) if matches!(e.error.kind(), io::ErrorKind::AlreadyExists | io::ErrorKind::NotFound) => Ok(false),
                Err(e) => Err(e.error),
            }
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
