//! Moving builds between the local cache and a remote: objects first (only
//! those the other side lacks, several at a time, with a progress bar),
//! entries last and only where absent, so an interrupted push never leaves
//! an entry naming a missing object, and the next push completes it.

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
        let bytes = cache.local_object(digest)?.with_context(|| {
            format!("object {} is not in the local cache (run `prefgen cache verify`)", digest.short())
        })?;
        let sent = remote.put_object(digest, &bytes)?;
        let mut m = moved.lock().expect("not poisoned");
        match sent {
            Some(n) => {
                m.objects += 1;
                m.bytes += n as u64;
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

/// Uploads one entry's objects the remote lacks, then the entry (`run --push`).
pub fn push_entry(cache: &Cache, remote: &Remote, entry: &ActionEntry) -> Result<()> {
    for out in &entry.outputs {
        let bytes =
            cache.local_object(&out.digest)?.with_context(|| format!("object {} vanished", out.digest.short()))?;
        remote.put_object(&out.digest, &bytes)?;
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
        let present = cache.local_object(digest)?.is_some();
        if !present && cache.get_object(digest)?.is_none() {
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
