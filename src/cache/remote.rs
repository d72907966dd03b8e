//! A shared tier (a folder teammates share, or an S3 bucket) as the cache
//! uses it: objects travel and rest zstd-compressed, named by the BLAKE3
//! digest of their uncompressed bytes, and are verified when read; entries
//! are created only if absent (the first writer wins), signed when pushed
//! with a key, and checked against the trusted keys when read. A remote
//! that fails during a run is set aside with one warning.

use super::ActionEntry;
use super::Stored;
use super::folder::FolderTier;
use super::s3::S3Tier;
use super::sign::{self, PublicKey, SecretKey};
use super::tier::{Bucket, Tier};
use crate::config::RemoteSpec;
use crate::digest::Digest;
use anyhow::{Context, Result, bail};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The layout this prefgen writes; a remote marked newer is left alone.
const LAYOUT: u64 = 1;

/// Requests and bytes a remote served, for summaries and benchmarks.
#[derive(Debug, Default)]
pub struct Traffic {
    pub requests: AtomicU64,
    pub bytes_down: AtomicU64,
    pub bytes_up: AtomicU64,
}

pub struct Remote {
    /// The URL as messages show it (no user or password).
    pub url: String,
    tier: Arc<dyn Tier>,
    pub writable: bool,
    /// None: every writer is trusted.
    trusted: Option<Vec<PublicKey>>,
    signer: Option<SecretKey>,
    /// Set once a request failed: the run goes on without it.
    down: AtomicBool,
    /// Objects and entries found damaged or untrusted in this run: never
    /// offered again (a HEAD would still find them).
    rejected: Mutex<HashSet<Digest>>,
    pub traffic: Traffic,
}

impl Remote {
    /// Opens the remote `spec` names: `s3://...`, `file:///...` or a folder.
    pub fn open(spec: &RemoteSpec) -> Result<Remote> {
        let tier: Arc<dyn Tier> = if spec.url.starts_with("s3://") {
            Arc::new(S3Tier::open(spec)?)
        } else if let Some(scheme) = spec.url.split_once("://").map(|(s, _)| s).filter(|s| *s != "file") {
            bail!("remote {}: the {scheme}:// scheme is not supported (s3:// or a folder are)", spec.url);
        } else {
            let dir = PathBuf::from(spec.url.strip_prefix("file://").unwrap_or(&spec.url));
            Arc::new(FolderTier::shared(&dir))
        };
        let trusted = match spec.trusted_keys.as_slice() {
            [] => None,
            keys => Some(
                keys.iter()
                    .map(|k| PublicKey::parse(k))
                    .collect::<Result<Vec<_>>>()
                    .with_context(|| format!("remote {}", spec.url))?,
            ),
        };
        let signer = spec.signing_key.as_deref().map(SecretKey::read).transpose()?;
        let remote = Remote {
            url: spec.shown(),
            tier,
            writable: spec.write,
            trusted,
            signer,
            down: AtomicBool::new(false),
            rejected: Mutex::default(),
            traffic: Traffic::default(),
        };
        Ok(remote)
    }

    /// Whether it trusts every writer (no `trusted_keys`).
    pub fn trusts_everyone(&self) -> bool {
        self.trusted.is_none()
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// Sets the remote aside for the rest of the run, saying so once.
    pub fn fail(&self, e: &anyhow::Error) {
        if !self.down.swap(true, Ordering::Relaxed) {
            let e = crate::redact::redact(&format!("{e:#}"));
            eprintln!("warning: remote {} failed ({e}); going on without it for this run", self.url);
        }
    }

    fn count(&self, down: usize, up: usize) {
        self.traffic.requests.fetch_add(1, Ordering::Relaxed);
        self.traffic.bytes_down.fetch_add(down as u64, Ordering::Relaxed);
        self.traffic.bytes_up.fetch_add(up as u64, Ordering::Relaxed);
    }

    /// Checks the remote's layout marker: a layout this prefgen does not
    /// know is an error (the remote is left alone). `mark` writes ours to a
    /// remote that has none.
    pub fn check_layout(&self, mark: bool) -> Result<()> {
        let marker = Digest::of(b"");
        let found = self.tier.get(Bucket::Layout, &marker)?;
        self.count(found.as_ref().map_or(0, Vec::len), 0);
        match found {
            Some(bytes) => {
                let layout =
                    serde_json::from_slice::<serde_json::Value>(&bytes).ok().and_then(|v| v["layout"].as_u64());
                match layout {
                    Some(LAYOUT) => Ok(()),
                    other => bail!(
                        "remote {}: its layout is {}, which this prefgen does not know (a newer prefgen wrote it); left alone",
                        self.url,
                        other.map_or("unreadable".to_string(), |l| l.to_string())
                    ),
                }
            }
            None if mark => {
                let body = serde_json::json!({ "layout": LAYOUT, "objects": "zstd" }).to_string();
                self.tier.create(Bucket::Layout, &marker, body.as_bytes())?;
                self.count(0, body.len());
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// An object's bytes, verified; a damaged one is reported and not served.
    pub fn get_object(&self, digest: &Digest) -> Result<Option<Vec<u8>>> {
        if self.rejected(digest) {
            return Ok(None);
        }
        let Some(packed) = self.tier.get(Bucket::Objects, digest)? else {
            self.count(0, 0);
            return Ok(None);
        };
        self.count(packed.len(), 0);
        let bytes = zstd::decode_all(packed.as_slice()).unwrap_or_default();
        if Digest::of(&bytes) != *digest {
            eprintln!("warning: remote {}: object {} is damaged; not used", self.url, digest.short());
            self.reject(digest);
            return Ok(None);
        }
        Ok(Some(bytes))
    }

    fn reject(&self, name: &Digest) {
        self.rejected.lock().expect("not poisoned").insert(*name);
    }

    fn rejected(&self, name: &Digest) -> bool {
        self.rejected.lock().expect("not poisoned").contains(name)
    }

    /// Whether the remote has the object (a HEAD, not a read).
    pub fn has_object(&self, digest: &Digest) -> Result<bool> {
        if self.rejected(digest) {
            return Ok(false);
        }
        let found = self.tier.size(Bucket::Objects, digest)?.is_some();
        self.count(0, 0);
        Ok(found)
    }

    /// Uploads an object unless the remote has it; true when uploaded.
    pub fn put_object(&self, digest: &Digest, bytes: &[u8]) -> Result<Option<usize>> {
        if self.has_object(digest)? {
            return Ok(None);
        }
        let packed = zstd::encode_all(bytes, 3).context("compressing an object")?;
        self.tier.put(Bucket::Objects, digest, &packed)?;
        self.count(0, packed.len());
        Ok(Some(packed.len()))
    }

    /// The entry under `key`, if the remote has it, its bytes match their
    /// digest, its key is its name, and (with trusted keys) a trusted key
    /// signed those bytes.
    pub fn get_entry(&self, key: &Digest) -> Result<Option<ActionEntry>> {
        if self.rejected(key) {
            return Ok(None);
        }
        let found = self.tier.get(Bucket::Actions, key)?;
        self.count(found.as_ref().map_or(0, Vec::len), 0);
        let Some(bytes) = found else { return Ok(None) };
        let stored = match Stored::open(&bytes, key) {
            Ok(s) => s,
            Err(why) => {
                self.reject_entry(key, &why);
                return Ok(None);
            }
        };
        if let Some(trusted) = &self.trusted
            && let Some(why) = sign::distrust(stored.signature.as_ref(), &stored.body, trusted)
        {
            eprintln!("warning: remote {}: entry {} is not trusted ({why}); not used", self.url, key.short());
            self.reject(key);
            return Ok(None);
        }
        Ok(Some(stored.entry))
    }

    /// Reports the entry under `key` as damaged (`why`) and never offers it
    /// again in this run, so the node is built instead.
    pub fn reject_entry(&self, key: &Digest, why: &str) {
        eprintln!("warning: remote {}: entry {} is damaged ({why}); not used", self.url, key.short());
        self.reject(key);
    }

    /// Creates the entry unless the remote has one under its key (never
    /// overwritten); signed with the remote's signing key. True when created.
    pub fn put_entry(&self, entry: &ActionEntry) -> Result<bool> {
        let bytes = entry.seal(self.signer.as_ref());
        let created = self.tier.create(Bucket::Actions, &entry.key(), &bytes)?;
        self.count(0, if created { bytes.len() } else { 0 });
        Ok(created)
    }

    /// `remote URL: N requests, X MB down, Y MB up`, when it served any.
    pub fn traffic_line(&self) -> Option<String> {
        let t = &self.traffic;
        let n = t.requests.load(Ordering::Relaxed);
        let mb = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64 / 1e6;
        (n > 0).then(|| {
            format!("remote {}: {n} requests, {:.1} MB down, {:.1} MB up", self.url, mb(&t.bytes_down), mb(&t.bytes_up))
        })
    }

    /// The tier itself, for `cache verify` and `cache gc` with `--remote`.
    pub fn tier(&self) -> &dyn Tier {
        self.tier.as_ref()
    }

    /// The tier, for leases (held by their heartbeat threads).
    pub fn shared_tier(&self) -> Arc<dyn Tier> {
        self.tier.clone()
    }
}
