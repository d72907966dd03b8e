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
use anyhow::{Context, Result, anyhow, bail};
use std::collections::HashSet;
use std::io::{self, Read, Write};
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
            Arc::new(FolderTier::remote(&dir))
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
    /// know is an error (the remote is left alone), and so is a remote that
    /// holds files but no marker (a shared folder unmounted or moved: not
    /// the remote prefgen wrote). `create` (a push) writes ours to a remote
    /// that holds nothing yet; nothing else creates a remote.
    pub fn check_layout(&self, create: bool) -> Result<()> {
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
            None => {
                let empty = self.tier.is_empty()?;
                self.count(0, 0);
                // A push creating the remote meanwhile writes its marker first.
                if !empty && self.tier.size(Bucket::Layout, &marker)?.is_some() {
                    return self.check_layout(false);
                }
                if !empty {
                    bail!(
                        "remote {}: it holds files but no layout marker ({}), so it is not the remote prefgen wrote (a shared folder unmounted or moved?); left alone",
                        self.url,
                        Bucket::Layout.path(&marker)
                    );
                }
                if create {
                    let body = serde_json::json!({ "layout": LAYOUT, "objects": "zstd" }).to_string();
                    self.tier.create(Bucket::Layout, &marker, body.as_bytes())?;
                    self.count(0, body.len());
                }
                Ok(())
            }
        }
    }

    /// Streams an object into `out`, decompressed, verifying it on the way:
    /// its size when it is sound; None when the remote lacks it, or it is
    /// damaged (reported; what `out` got must then be discarded). Memory
    /// stays at a buffer's worth whatever the object's size.
    pub fn get_object(&self, digest: &Digest, out: &mut dyn Write) -> Result<Option<u64>> {
        if self.rejected(digest) {
            return Ok(None);
        }
        let Some(packed) = self.tier.open(Bucket::Objects, digest)? else {
            self.count(0, 0);
            return Ok(None);
        };
        let mut packed = Counted { inner: packed, bytes: 0, failed: false };
        let unpacked = unpack(&mut packed, out);
        self.count(packed.bytes as usize, 0);
        match unpacked {
            Ok((found, size)) if found == *digest => return Ok(Some(size)),
            Err(Fault::Source(e)) if packed.failed => return Err(anyhow!(e)),
            Err(Fault::Sink(e)) => return Err(e).context("cannot write a downloaded object"),
            // Bytes that do not decompress, or not to the digest.
            Ok(_) | Err(Fault::Source(_)) => {}
        }
        eprintln!("warning: remote {}: object {} is damaged; not used", self.url, digest.short());
        self.reject(digest);
        Ok(None)
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

    /// Uploads an object unless the remote has it, streamed from `object`
    /// (its bytes, say a file of the local cache) and compressed on the way:
    /// the bytes sent, or None when it was there. Bytes that do not hash to
    /// `digest` are never stored.
    pub fn put_object(&self, digest: &Digest, object: &mut dyn Read) -> Result<Option<u64>> {
        if self.has_object(digest)? {
            return Ok(None);
        }
        let checked = Checked { inner: object, hasher: blake3::Hasher::new(), expected: *digest };
        let mut packed = zstd::stream::read::Encoder::new(checked, 3).context("compressing an object")?;
        let sent = self.tier.put_reader(Bucket::Objects, digest, &mut packed)?;
        self.count(0, sent as usize);
        Ok(Some(sent))
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

/// A remote blob's stream, counted; and whether reading it failed (the
/// remote's fault, not the bytes').
struct Counted<R> {
    inner: R,
    bytes: u64,
    failed: bool,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf).inspect_err(|_| self.failed = true)?;
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Where unpacking an object failed.
enum Fault {
    /// Reading or decompressing what the remote sent.
    Source(io::Error),
    /// Writing what it decompressed to.
    Sink(io::Error),
}

/// Decompresses `packed` into `out`, a buffer at a time: the digest and the
/// size of what came out.
fn unpack(packed: &mut dyn Read, out: &mut dyn Write) -> Result<(Digest, u64), Fault> {
    let mut decoder = zstd::stream::read::Decoder::new(packed).map_err(Fault::Source)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = match decoder.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Fault::Source(e)),
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(Fault::Sink)?;
        size += n as u64;
    }
    out.flush().map_err(Fault::Sink)?;
    Ok((Digest::from(hasher.finalize()), size))
}

/// An object's bytes on their way up, hashed: at their end, a read fails
/// unless they hash to the object's name, so a tier stores nothing damaged.
struct Checked<'a> {
    inner: &'a mut dyn Read,
    hasher: blake3::Hasher,
    expected: Digest,
}

impl Read for Checked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.hasher.update(&buf[..n]);
        } else if Digest::from(self.hasher.finalize()) != self.expected {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "object {} of the local cache does not hash to its name (run `prefgen cache verify`)",
                    self.expected.short()
                ),
            ));
        }
        Ok(n)
    }
}
