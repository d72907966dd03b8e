//! Leases: which worker is building a shard, kept on a tier every worker
//! sees (the shared remote, or the cache folder when it is itself shared).
//!
//! A lease is a record named by the shard's key holding its owner, host and
//! expiry. It is taken with a compare-and-swap (a conditional put on an
//! object store, an exclusive create on a folder), renewed by a heartbeat
//! while the shard is built, and removed once the shard is stored. A worker
//! that dies stops renewing: after at most one lease period another worker
//! takes the shard over, with a compare-and-swap on the expired record, so
//! two takers never both win. Expiry is judged by the clocks of the hosts,
//! which a cluster keeps in step (NTP); a host whose clock runs ahead takes
//! leases early, which costs a duplicated build and nothing else (the first
//! entry stored wins).

use super::tier::{Bucket, Tier, Version};
use crate::digest::Digest;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The lease period when none is given: a dead worker's shard waits this
/// long at most, and a live one renews three times per period.
pub const DEFAULT_PERIOD: Duration = Duration::from_secs(60);

/// What a lease record holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Holder {
    /// Unique per process: host, pid and a random tag.
    pub owner: String,
    pub host: String,
    pub pid: u32,
    /// The shard, as progress lines name it.
    pub what: String,
    /// Milliseconds since the Unix epoch.
    pub expires_ms: u64,
}

impl Holder {
    /// How long ago it expired (zero while live).
    pub fn expired_for(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.expires_ms))
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// This host's name, as `hostname` prints it.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// A process's leases on one tier.
#[derive(Clone)]
pub struct Leases {
    tier: Arc<dyn Tier>,
    owner: String,
    host: String,
    period: Duration,
}

/// How an attempt to claim a shard ended.
pub enum Claim {
    Mine(Lease),
    /// A live lease of another worker.
    Held(Holder),
}

impl Leases {
    pub fn new(tier: Arc<dyn Tier>, period: Duration) -> Leases {
        let host = host_name();
        let mut tag = [0u8; 4];
        let _ = getrandom::fill(&mut tag);
        let owner = format!("{host}:{}:{}", std::process::id(), Digest::of(&tag).short());
        Leases { tier, owner, host, period }
    }

    pub fn period(&self) -> Duration {
        self.period
    }

    /// Where the leases are, for messages.
    pub fn describe(&self) -> String {
        self.tier.describe()
    }

    fn record(&self, what: &str) -> Vec<u8> {
        let holder = Holder {
            owner: self.owner.clone(),
            host: self.host.clone(),
            pid: std::process::id(),
            what: what.to_string(),
            expires_ms: now_ms() + self.period.as_millis() as u64,
        };
        serde_json::to_vec(&holder).expect("holders serialise")
    }

    /// The live holder of `key`'s lease, if any.
    pub fn holder(&self, key: &Digest) -> Result<Option<Holder>> {
        Ok(self.read(key)?.and_then(|(h, _)| h).filter(|h| h.expires_ms > now_ms()))
    }

    /// The record under `key` (None inside: unreadable, as good as expired).
    fn read(&self, key: &Digest) -> Result<Option<(Option<Holder>, Version)>> {
        Ok(self.tier.read_record(Bucket::Leases, key)?.map(|(b, v)| (serde_json::from_slice(&b).ok(), v)))
    }

    /// Claims `key` unless another worker holds a live lease on it; an
    /// expired lease is taken over (and said so).
    pub fn try_claim(&self, key: &Digest, what: &str) -> Result<Claim> {
        let (expired, expected) = match self.read(key)? {
            None => (None, None),
            Some((Some(h), _)) if h.expires_ms > now_ms() => return Ok(Claim::Held(h)),
            Some((old, version)) => (old, Some(version)),
        };
        match self.tier.swap_record(Bucket::Leases, key, expected.as_ref(), &self.record(what))? {
            Some(version) => {
                if let Some(h) = expired {
                    let ago = now_ms().saturating_sub(h.expires_ms) as f64 / 1e3;
                    eprintln!("taking over {what} from {} (pid {}): its lease expired {ago:.1}s ago", h.host, h.pid);
                }
                Ok(Claim::Mine(Lease::hold(self, *key, what, version)))
            }
            // Another worker claimed it first: say who.
            None => Ok(match self.holder(key)? {
                Some(h) => Claim::Held(h),
                None => Claim::Held(Holder {
                    owner: String::new(),
                    host: "another worker".into(),
                    pid: 0,
                    what: what.into(),
                    expires_ms: now_ms(),
                }),
            }),
        }
    }
}

/// A lease this process holds: a heartbeat renews it until it is dropped,
/// which removes it.
pub struct Lease {
    stop: Option<mpsc::Sender<()>>,
    /// Ends with the lease's last version, or None once it was taken over.
    heartbeat: Option<std::thread::JoinHandle<Option<Version>>>,
    tier: Arc<dyn Tier>,
    key: Digest,
}

impl Lease {
    fn hold(leases: &Leases, key: Digest, what: &str, version: Version) -> Lease {
        let (stop, stopped) = mpsc::channel::<()>();
        let (leases2, what) = (leases.clone(), what.to_string());
        let heartbeat = std::thread::spawn(move || {
            let mut version = version;
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(leases2.period / 3) {
                match leases2.tier.swap_record(Bucket::Leases, &key, Some(&version), &leases2.record(&what)) {
                    Ok(Some(v)) => version = v,
                    Ok(None) => {
                        eprintln!(
                            "warning: the lease on {what} was taken over; building it anyway (the first result stored wins)"
                        );
                        return None;
                    }
                    // A blip on the shared tier: the next beat tries again,
                    // well before the lease runs out.
                    Err(e) => eprintln!("warning: cannot renew the lease on {what}: {e:#}"),
                }
            }
            Some(version)
        });
        Lease { stop: Some(stop), heartbeat: Some(heartbeat), tier: leases.tier.clone(), key }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        drop(self.stop.take());
        let held = self.heartbeat.take().and_then(|h| h.join().ok()).flatten();
        // A lease taken over is the new holder's: left alone.
        if held.is_some() {
            // Best effort: a lease left behind only expires.
            let _ = self.tier.remove(Bucket::Leases, &self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::folder::FolderTier;

    #[test]
    fn a_live_lease_is_held_an_expired_one_taken_over_once() {
        let dir = tempfile::tempdir().unwrap();
        let tier: Arc<dyn Tier> = Arc::new(FolderTier::shared(dir.path()));
        let (a, b) =
            (Leases::new(tier.clone(), Duration::from_secs(60)), Leases::new(tier.clone(), Duration::from_secs(60)));
        let key = Digest::of(b"shard");
        let Claim::Mine(lease) = a.try_claim(&key, "shard 1/1").unwrap() else { panic!("free") };
        assert!(matches!(b.try_claim(&key, "shard 1/1").unwrap(), Claim::Held(h) if h.owner == a.owner));
        drop(lease);
        assert!(a.holder(&key).unwrap().is_none(), "released");
        // An expired lease (a dead worker's): one of two takers wins.
        let dead =
            Holder { owner: "dead".into(), host: "h".into(), pid: 1, what: "x".into(), expires_ms: now_ms() - 1 };
        tier.swap_record(Bucket::Leases, &key, None, &serde_json::to_vec(&dead).unwrap()).unwrap().unwrap();
        assert!(a.holder(&key).unwrap().is_none(), "expired");
        let (ra, rb) = (a.read(&key).unwrap().unwrap().1, b.read(&key).unwrap().unwrap().1);
        let first = tier.swap_record(Bucket::Leases, &key, Some(&ra), &a.record("x")).unwrap();
        let second = tier.swap_record(Bucket::Leases, &key, Some(&rb), &b.record("x")).unwrap();
        assert!(first.is_some() && second.is_none());
        assert!(matches!(b.try_claim(&key, "shard 1/1").unwrap(), Claim::Held(h) if h.owner == a.owner));
    }
}
