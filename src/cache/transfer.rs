//! Moving builds between the local cache and a remote: objects first (only
//! those the other side lacks, several at a time, with a progress bar),
//! entries last and only where absent, so an interrupted push or pull never
//! leaves an entry naming a missing object, and the next one completes it.
//! Objects stream between files and the remote, compressed and hashed on
//! the way, so memory is bounded by the transfers in flight, not by the
//! size of an object.

use super::tier::Bucket;
use super::{ActionEntry, Cache, Remote, parallel};
use crate::digest::Digest;
use anyhow::{Context, Result, bail};
use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Instant;

/// What a push or pull moved.
#[derive(Debug, Default)]
pub struct Moved {
    pub objects: usize,
    /// Bytes as they travelled (compressed).
    pub bytes: u64,
    /// Objects the other side already had.
    pub objects_present: usize,
    pub entries: usize,
    pub entries_present: usize,
    pub seconds: f64,
}

impl Moved {
    pub fn describe(&self, verb: &str) -> String {
        let mb = self.bytes as f64 / 1e6;
        format!(
            "{verb} {} objects ({mb:.1} MB, {:.1} MB/s) and {} entries; {} objects and {} entries were there already ({:.1} s)",
            self.objects,
            mb / self.seconds.max(1e-9),
            self.entries,
            self.objects_present,
            self.entries_present,
            self.seconds
        )
    }
}

fn bar(what: &str, total: u64) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let style = indicatif::ProgressStyle::with_template(&format!(
        "{what} [{{bar:30}}] {{bytes}}/{{total_bytes}}, {{bytes_per_sec}}, ETA {{eta}}"
    ))
    .expect("the template is valid")
    .progress_chars("=> ");
    indicatif::ProgressBar::new(total).with_style(style)
}

/// The objects `entries` name.
fn objects_of(entries: &[ActionEntry]) -> Vec<(Digest, u64)> {
    let set: BTreeSet<(Digest, u64)> =
        entries.iter().flat_map(|e| e.outputs.iter().map(|o| (o.digest, o.size))).collect();
    set.into_iter().collect()
}

/// Uploads `entries` (each node after the shards it names) and their
/// objects to `remote`.
pub fn push(cache: &Cache, remote: &Remote, entries: &[ActionEntry]) -> Result<Moved> {
    let started = Instant::now();
    remote.check_layout(true)?;
    let objects = objects_of(entries);
    let progress = bar(&format!("pushing to {}", remote.url), objects.iter().map(|o| o.1).sum());
    let moved = Mutex::new(Moved::default());
    parallel::map(&objects, |(digest, size)| {
        let sent = push_object(cache, remote, digest)?;
        let mut m = moved.lock().expect("not poisoned");
        match sent {
            Some(n) => {
                m.objects += 1;
                m.bytes += n;
            }
            None => m.objects_present += 1,
        }
        progress.inc(*size);
        Ok(())
    })?;
    progress.finish_and_clear();
    let mut m = moved.into_inner().expect("not poisoned");
    for entry in entries {
        if remote.put_entry(entry)? {
            m.entries += 1;
        } else {
            m.entries_present += 1;
        }
    }
    m.seconds = started.elapsed().as_secs_f64();
    Ok(m)
}

/// Uploads an object of the local cache unless the remote has it, streamed
/// from its file: the bytes sent, or None when it was there.
fn push_object(cache: &Cache, remote: &Remote, digest: &Digest) -> Result<Option<u64>> {
    let path = cache.local.blob_path(Bucket::Objects, digest);
    let mut file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("object {} is not in the local cache (run `prefgen cache verify`)", digest.short())
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    remote.put_object(digest, &mut file)
}

/// Uploads one entry's objects the remote lacks, then the entry (`run --push`).
pub fn push_entry(cache: &Cache, remote: &Remote, entry: &ActionEntry) -> Result<()> {
    for out in &entry.outputs {
        push_object(cache, remote, &out.digest)?;
    }
    remote.put_entry(entry)?;
    Ok(())
}

/// Downloads the objects of `entries` that the local cache lacks, from its
/// remotes in order, then the entries: an interrupted pull leaves no entry
/// without its objects.
pub fn pull(cache: &Cache, entries: &[ActionEntry]) -> Result<Moved> {
    let started = Instant::now();
    let objects = objects_of(entries);
    let progress = bar("pulling", objects.iter().map(|o| o.1).sum());
    let moved = Mutex::new(Moved { entries: entries.len(), ..Moved::default() });
    parallel::map(&objects, |(digest, size)| {
        let path = cache.local.blob_path(Bucket::Objects, digest);
        let present = Digest::of_file(&path).is_ok_and(|d| d == *digest);
        if !present && !cache.fetch_object(digest)? {
            bail!("object {} is on no remote (or only damaged)", digest.short());
        }
        let mut m = moved.lock().expect("not poisoned");
        if present {
            m.objects_present += 1;
        } else {
            m.objects += 1;
            m.bytes += *size;
        }
        progress.inc(*size);
        Ok(())
    })?;
    progress.finish_and_clear();
    for entry in entries {
        cache.put_action(entry)?;
    }
    let mut m = moved.into_inner().expect("not poisoned");
    m.seconds = started.elapsed().as_secs_f64();
    Ok(m)
}

impl Cache {
    /// Streams an object from the first remote that has it into the local
    /// tier, verified before it lands. False when no remote has it sound.
    pub(super) fn fetch_object(&self, digest: &Digest) -> Result<bool> {
        for r in self.live() {
            match self.local.put_with(Bucket::Objects, digest, |out| r.get_object(digest, out)) {
                Ok(Ok(Some(_))) => return Ok(true),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => r.fail(&e),
                Err(e) => return Err(self.unwritable(format!("{e:#}"))),
            }
        }
        Ok(false)
    }
}
