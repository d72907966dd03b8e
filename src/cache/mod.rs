//! The content-addressed cache: objects named by the BLAKE3 digest of their
//! bytes, and an action cache mapping a node's key to what it produced.
//!
//! Layout of the root (`./cache` by default):
//!
//! ```text
//! CACHEDIR.TAG, .gitignore   so backup tools and git leave it alone
//! objects-v1/ab/<digest>     artifacts                  (in every tier)
//! actions-v3/ab/<key>        action entries: a header with the digest
//!                            (and signature) of the JSON that follows (in every tier)
//! refs-v1/<node>             key of a node's last build (local: explains `plan`, roots `gc`)
//! stat-v1/<path>             remembered file digests    (local)
//! locks/<key>.lock           one builder per key        (local)
//! tmp/                       writes in progress
//! ```

mod action;
mod folder;
pub mod gc;
pub mod lease;
pub mod lock;
pub mod parallel;
pub mod remote;
mod s3;
pub mod sign;
mod stat;
pub mod tier;
pub mod transfer;
pub mod verify;

pub use action::{ActionEntry, KeyMaterial, OutputFile, Stored};
pub use lock::BuildLock;
pub use remote::Remote;

use crate::digest::Digest;
use anyhow::{Context, Result, bail};
use folder::FolderTier;
use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::SystemTime;
use tier::{Bucket, FILE_MODE, Tier, write_atomic_in};

/// The cache root when neither `--cache` nor `PREFGEN_CACHE` names one.
pub const DEFAULT_ROOT: &str = "cache";
const TAG: &str = "CACHEDIR.TAG";
const REFS: &str = "refs-v1";
const LOCKS: &str = "locks";
const TMP: &str = "tmp";

pub struct Cache {
    root: PathBuf,
    local: FolderTier,
    /// Shared tiers, read through in order after the local one.
    remotes: Vec<Remote>,
    /// Upload each entry (and its objects) to the writable remotes as it is stored.
    push: bool,
    /// Keep what is read through: a remote entry is copied into the local
    /// tier, after its objects (off where only looking: `only_looking`).
    keep: bool,
    /// The remote (by index) each entry read through in this process came
    /// from, so an entry found unusable later is refused there too.
    origins: Mutex<HashMap<Digest, usize>>,
    /// How many of them were refused so.
    refused: AtomicUsize,
    /// With `run --locked`: the files hashed again in this process, whose
    /// remembered digests are trusted again (None: trust the stat memo).
    rehashed: Mutex<Option<HashSet<PathBuf>>>,
}

/// Where a lookup found an entry.
#[derive(Debug, Clone, PartialEq)]
pub enum Found {
    Local,
    /// On this remote (and, unless only looking, now copied into the local
    /// cache with its objects).
    Remote(String),
}

/// What fetching an entry's objects found.
enum Fetched {
    All,
    /// One is on no tier.
    Missing,
    /// One is not the size the entry says: why.
    Wrong(String),
}

impl Cache {
    /// Opens the cache at `root`, creating it if needed (commands that build).
    pub fn open(root: &Path) -> Result<Cache> {
        let ctx = || format!("cannot create the cache at {}", root.display());
        std::fs::create_dir_all(root).with_context(ctx)?;
        let tag: &[u8] =
            b"Signature: 8a477f597d28d172789f06886806bc55\n# prefgen cache: content-addressed, safe to delete.\n";
        for (name, body) in [(TAG, tag), (".gitignore", b"*\n")] {
            if !root.join(name).exists() {
                write_atomic_in(&root.join(TMP), &root.join(name), body, FILE_MODE).with_context(ctx)?;
            }
        }
        Ok(Cache::at(root))
    }

    fn at(root: &Path) -> Cache {
        Cache {
            root: root.to_path_buf(),
            local: FolderTier::new(root),
            remotes: vec![],
            push: false,
            keep: true,
            origins: Mutex::default(),
            refused: AtomicUsize::new(0),
            rehashed: Mutex::default(),
        }
    }

    /// The remotes to read through, in order; one whose layout this prefgen
    /// does not know, or that cannot be reached, is set aside with a warning.
    pub fn with_remotes(mut self, remotes: Vec<Remote>) -> Cache {
        for r in &remotes {
            if let Err(e) = r.check_layout(false) {
                r.fail(&e);
            }
        }
        self.remotes = remotes;
        self
    }

    /// How many entries read through from remotes were found unusable and
    /// refused for the rest of the run (each is built instead).
    pub fn refused(&self) -> usize {
        self.refused.load(Ordering::Relaxed)
    }

    /// Uploads each stored entry and its objects to the writable remotes
    /// (giving one that holds nothing yet its layout, as `cache push` does).
    pub fn push_as_stored(mut self, push: bool) -> Cache {
        self.push = push;
        if push {
            for r in self.live().filter(|r| r.writable) {
                if let Err(e) = r.check_layout(true) {
                    r.fail(&e);
                }
            }
        }
        self
    }

    pub fn remotes(&self) -> &[Remote] {
        &self.remotes
    }

    /// One line per remote that served this process (on stderr).
    pub fn report_traffic(&self) {
        for line in self.remotes.iter().filter_map(Remote::traffic_line) {
            eprintln!("{line}");
        }
    }

    /// The remotes still in use this run.
    fn live(&self) -> impl Iterator<Item = &Remote> {
        self.remotes.iter().filter(|r| !r.is_down())
    }

    /// Opens an existing cache (commands that only inspect or clean it).
    pub fn open_existing(root: &Path) -> Result<Cache> {
        if !root.join(TAG).is_file() {
            bail!("there is no prefgen cache at {} (give --cache or PREFGEN_CACHE the cache's folder)", root.display());
        }
        Ok(Cache::at(root))
    }

    /// Copies nothing that a lookup finds on a remote into the local tier:
    /// for `plan`, which only looks (it would otherwise download every fresh
    /// node's objects), and `cache pull`, which moves them itself.
    pub fn only_looking(mut self) -> Cache {
        self.keep = false;
        self
    }

    /// Hashes every input file again, once in this process, instead of
    /// trusting its remembered digest (`run --locked`: a file edited with
    /// its size and modification time restored is caught).
    pub fn rehash_inputs(&self) {
        self.rehashed.lock().expect("not poisoned").get_or_insert_default();
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn unwritable(&self, e: impl std::fmt::Display) -> anyhow::Error {
        anyhow::anyhow!("cannot write to the cache at {}: {e:#}", self.local.describe())
    }

    /// Stores an artifact and returns its digest.
    pub fn put_object(&self, bytes: &[u8]) -> Result<Digest> {
        let digest = Digest::of(bytes);
        self.store_object(&digest, bytes)?;
        Ok(digest)
    }

    /// Stores an artifact whose digest the caller computed from `bytes`.
    /// An object already there is compared byte for byte (a damaged one is
    /// replaced) and marked as just used, so a `gc` running meanwhile keeps
    /// it: afterwards the object holds exactly `bytes`.
    pub fn store_object(&self, digest: &Digest, bytes: &[u8]) -> Result<()> {
        match self.local.get(Bucket::Objects, digest)? {
            Some(existing) if existing == bytes => {
                let path = self.local.blob_path(Bucket::Objects, digest);
                // Best effort: an object of another user's keeps its time.
                let _ = std::fs::File::open(&path).and_then(|f| f.set_modified(SystemTime::now()));
                return Ok(());
            }
            Some(_) => {
                eprintln!("warning: cache object {} is damaged; replacing it", digest.short());
                self.local.remove(Bucket::Objects, digest).map_err(|e| self.unwritable(e))?;
            }
            None => {}
        }
        self.local.put(Bucket::Objects, digest, bytes).map_err(|e| self.unwritable(e))
    }

    /// An artifact's bytes, verified against its digest: from the local
    /// tier, else from the first remote that has it (then kept locally). A
    /// damaged object is removed and reported as absent, so it is rebuilt
    /// and never served.
    pub fn get_object(&self, digest: &Digest) -> Result<Option<Vec<u8>>> {
        let Some(bytes) = self.local.get(Bucket::Objects, digest)? else {
            // Verified on its way in.
            return Ok(if self.fetch_object(digest)? { self.local.get(Bucket::Objects, digest)? } else { None });
        };
        if Digest::of(&bytes) != *digest {
            eprintln!("warning: cache object {} is damaged; removing it so it is rebuilt", digest.short());
            self.local.remove(Bucket::Objects, digest)?;
            return Ok(None);
        }
        Ok(Some(bytes))
    }

    /// Places an object at `dest` (atomically): a hard link to the read-only
    /// object when the file system allows (true), otherwise a copy (false).
    /// Unless `trusted` (this process stored those very bytes), the object is
    /// verified first; a damaged one is removed and reported as `None`.
    pub fn materialise(&self, digest: &Digest, dest: &Path, tmp_dir: &Path, trusted: bool) -> Result<Option<bool>> {
        let local = self.local.size(Bucket::Objects, digest)?.is_some();
        if (!trusted || !local) && self.get_object(digest)?.is_none() {
            return Ok(None);
        }
        std::fs::create_dir_all(tmp_dir)?;
        let tmp = tmp_dir.join(format!("link-{}-{}", std::process::id(), digest.to_hex()));
        let _ = std::fs::remove_file(&tmp);
        if std::fs::hard_link(self.local.blob_path(Bucket::Objects, digest), &tmp).is_ok() {
            // Renaming a link onto another link of the same inode does
            // nothing and leaves the temporary: remove it either way.
            let renamed = std::fs::rename(&tmp, dest);
            let _ = std::fs::remove_file(&tmp);
            renamed?;
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

    /// Whether every output of an entry is present with its recorded size,
    /// locally or on a remote (cheap: a stat or a HEAD per file; contents
    /// are verified when read).
    pub fn has_outputs(&self, entry: &ActionEntry) -> Result<bool> {
        'outputs: for out in &entry.outputs {
            if self.local.size(Bucket::Objects, &out.digest)? == Some(out.size) {
                continue;
            }
            for r in self.live() {
                match r.has_object(&out.digest) {
                    Ok(true) => continue 'outputs,
                    Ok(false) => {}
                    Err(e) => r.fail(&e),
                }
            }
            return Ok(false);
        }
        Ok(true)
    }

    /// The action entry stored under `key`, if any and if readable.
    pub fn get_action(&self, key: &Digest) -> Result<Option<ActionEntry>> {
        Ok(self.lookup(key)?.map(|(entry, _)| entry))
    }

    /// The entry under `key` and where it was found: the local tier, else
    /// the first remote that has a valid, trusted one. Unless only looking,
    /// a remote's entry is kept locally once every object it names is
    /// (objects first, so the local tier never holds an entry without them).
    pub fn lookup(&self, key: &Digest) -> Result<Option<(ActionEntry, Found)>> {
        if let Some(bytes) = self.local.get(Bucket::Actions, key)? {
            match Stored::open(&bytes, key) {
                Ok(stored) => return Ok(Some((stored.entry, Found::Local))),
                Err(why) => {
                    eprintln!("warning: action entry {} is damaged ({why}); removing it so it is rebuilt", key.short());
                    self.local.remove(Bucket::Actions, key)?;
                }
            }
        }
        for (i, r) in self.remotes.iter().enumerate().filter(|(_, r)| !r.is_down()) {
            let entry = match r.get_entry(key) {
                Ok(Some(entry)) => entry,
                Ok(None) => continue,
                Err(e) => {
                    r.fail(&e);
                    continue;
                }
            };
            if self.keep {
                match self.fetch_outputs(&entry)? {
                    Fetched::All => {
                        self.local.put(Bucket::Actions, key, &entry.seal(None)).map_err(|e| self.unwritable(e))?;
                        self.origins.lock().expect("not poisoned").insert(*key, i);
                    }
                    // Not built there after all: `has_outputs` says so.
                    Fetched::Missing => {}
                    Fetched::Wrong(why) => {
                        r.reject_entry(key, &why);
                        continue;
                    }
                }
            }
            return Ok(Some((entry, Found::Remote(r.url.clone()))));
        }
        Ok(None)
    }

    /// Streams every object `entry` names that the local tier lacks into it
    /// (verified on the way in).
    fn fetch_outputs(&self, entry: &ActionEntry) -> Result<Fetched> {
        for out in &entry.outputs {
            let size = match self.local.size(Bucket::Objects, &out.digest)? {
                Some(size) => size,
                None if self.fetch_object(&out.digest)? => self.local.size(Bucket::Objects, &out.digest)?.unwrap_or(0),
                None => return Ok(Fetched::Missing),
            };
            if size != out.size {
                return Ok(Fetched::Wrong(format!("its output {} is {size} bytes, not {}", out.path, out.size)));
            }
        }
        Ok(Fetched::All)
    }

    /// For each key, its entry and where it was found, if every output is
    /// there too (what makes a node fresh); the keys are looked up
    /// concurrently, so asking about many costs about one round trip each
    /// per [`parallel::WORKERS`] keys.
    pub fn lookup_built(&self, keys: &[Digest]) -> Result<Vec<Option<(ActionEntry, Found)>>> {
        parallel::map(keys, |key| match self.lookup(key)? {
            Some((entry, found)) if self.has_outputs(&entry)? => Ok(Some((entry, found))),
            _ => Ok(None),
        })
    }

    /// Copies the entries under `keys` that only a remote has, and their
    /// objects, into the local cache (as a lookup does), several at a time:
    /// a run on an empty local cache then waits on bandwidth, not on one
    /// round trip per shard.
    pub fn prefetch(&self, keys: &[Digest]) -> Result<()> {
        if self.live().next().is_none() {
            return Ok(());
        }
        parallel::map(keys, |key| self.lookup(key).map(drop))?;
        Ok(())
    }

    /// Forgets the entry under `key`, found unusable (`why`), so the key is
    /// rebuilt; one read through from a remote is refused there for the
    /// rest of the run, named in a warning, so the next lookup does not
    /// serve it again.
    pub fn remove_action(&self, key: &Digest, why: &str) -> Result<()> {
        if let Some(i) = self.origins.lock().expect("not poisoned").remove(key) {
            self.remotes[i].reject_entry(key, why);
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        self.local.remove(Bucket::Actions, key).map_err(|e| self.unwritable(e))
    }

    /// Records what building `entry`'s key produced (and, when pushing as
    /// stored, uploads it with its objects; a remote that fails is set aside).
    pub fn put_action(&self, entry: &ActionEntry) -> Result<()> {
        self.local.put(Bucket::Actions, &entry.key(), &entry.seal(None)).map_err(|e| self.unwritable(e))?;
        if self.push {
            for r in self.live().filter(|r| r.writable) {
                if let Err(e) = transfer::push_entry(self, r, entry) {
                    r.fail(&e);
                }
            }
        }
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

    /// Remembers `key` as the last build of `node` (built or found fresh:
    /// what the recipe last used, which `gc` keeps). Unchanged, nothing is written.
    pub fn set_last_build(&self, node: &str, key: &Digest) -> Result<()> {
        let path = self.ref_path(node);
        if std::fs::read_to_string(&path).is_ok_and(|k| k.trim() == key.to_hex()) {
            return Ok(());
        }
        std::fs::create_dir_all(path.parent().expect("ref paths have a parent")).map_err(|e| self.unwritable(e))?;
        write_atomic_in(&self.root.join(TMP), &path, key.to_hex().as_bytes(), FILE_MODE).map_err(|e| self.unwritable(e))
    }

    fn ref_path(&self, node: &str) -> PathBuf {
        self.root.join(REFS).join(Digest::of(node.as_bytes()).to_hex())
    }

    fn lock_path(&self, key: &Digest) -> Result<PathBuf> {
        let dir = self.root.join(LOCKS);
        std::fs::create_dir_all(&dir).map_err(|e| self.unwritable(format!("cannot create {}: {e}", dir.display())))?;
        Ok(dir.join(format!("{}.lock", key.to_hex())))
    }

    /// A lock file's error, naming the file.
    fn lock_error(&self, path: &Path, e: io::Error) -> anyhow::Error {
        self.unwritable(format!("cannot lock {}: {e}", path.display()))
    }

    /// Claims the right to build `key`, waiting while another process holds it.
    pub fn lock(&self, key: &Digest, what: &str) -> Result<BuildLock> {
        let path = self.lock_path(key)?;
        lock::acquire(&path, || eprintln!("waiting for another prefgen process that is building {what}"))
            .map_err(|e| self.lock_error(&path, e))
    }

    /// Leases of `period` on the tier every worker sees: the first writable
    /// remote, else this cache's own folder (shared by the workers when it
    /// is on a shared file system).
    pub fn leases(&self, period: std::time::Duration) -> lease::Leases {
        let tier = match self.live().find(|r| r.writable) {
            Some(r) => r.shared_tier(),
            None => std::sync::Arc::new(FolderTier::shared(&self.root)),
        };
        lease::Leases::new(tier, period)
    }

    /// Claims the right to build `key` if no other process holds it.
    pub fn try_lock(&self, key: &Digest) -> Result<Option<BuildLock>> {
        let path = self.lock_path(key)?;
        lock::try_acquire(&path).map_err(|e| self.lock_error(&path, e))
    }
}
