//! Running a node's work shard by shard: each shard (a fixed slice of the
//! node's items) is its own cache entry, keyed by the node's parameters and
//! external inputs and the shard's items, and built under its own lock, so
//! a crash loses at most the shard in flight and processes sharing a cache
//! split the work. With a [`Slice`], shards of other slices are left alone;
//! with [`Leases`], workers on any machine claim shards on the shared tier.

use super::progress::Progress;
use crate::cache::lease::{Claim, Lease, Leases};
use crate::cache::{ActionEntry, BuildLock, Cache, KeyMaterial, OutputFile};
use crate::digest::Digest;
use crate::stages::{Shards, StageOutput};
use anyhow::Result;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// One worker's part of a job array (`--shard I/N`): the stale shards whose
/// key falls in slice I of N. Keys are digests, so the slices are
/// deterministic and even, whatever order workers start in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Slice {
    /// 0-based.
    pub index: u64,
    pub count: u64,
}

impl Slice {
    /// `I/N` with 1 <= I <= N.
    pub fn parse(text: &str) -> Result<Slice> {
        let bad = || anyhow::anyhow!("--shard {text:?}: expected I/N with 1 <= I <= N, such as 2/8");
        let (i, n) = text.split_once('/').ok_or_else(bad)?;
        let (i, n): (u64, u64) = (i.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
        if i == 0 || i > n {
            return Err(bad());
        }
        Ok(Slice { index: i - 1, count: n })
    }

    /// `auto`: slice I of N from the scheduler, Slurm's job array
    /// (`SLURM_ARRAY_TASK_ID` from `SLURM_ARRAY_TASK_MIN`, of
    /// `SLURM_ARRAY_TASK_COUNT`) or a Kubernetes indexed Job
    /// (`JOB_COMPLETION_INDEX`, 0-based, with the count given: `auto/N`).
    pub fn from_scheduler(count: Option<u64>, env: impl Fn(&str) -> Option<String>) -> Result<Slice> {
        let num = |var: &str| -> Result<Option<u64>> {
            env(var)
                .map(|v| {
                    v.trim().parse::<u64>().map_err(|_| anyhow::anyhow!("--shard auto: {var}={v:?} is not a number"))
                })
                .transpose()
        };
        let (index, n) = if let Some(id) = num("SLURM_ARRAY_TASK_ID")? {
            let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let n = count.or(num("SLURM_ARRAY_TASK_COUNT")?);
            (id.checked_sub(min), n)
        } else if let Some(i) = num("JOB_COMPLETION_INDEX")? {
            (Some(i), count)
        } else {
            anyhow::bail!(
                "--shard auto: neither SLURM_ARRAY_TASK_ID nor JOB_COMPLETION_INDEX is set (this is not a job array task)"
            );
        };
        let Some(n) = n else {
            anyhow::bail!("--shard auto: the scheduler does not say how many tasks there are: give it as auto/N")
        };
        match index {
            Some(i) if i < n => Ok(Slice { index: i, count: n }),
            _ => anyhow::bail!("--shard auto: this task's index is outside the {n} tasks"),
        }
    }

    fn owns(&self, key: &Digest) -> bool {
        let head = u64::from_le_bytes(key.as_bytes()[..8].try_into().expect("digests have 32 bytes"));
        head % self.count == self.index
    }
}

/// How a node's shards ended.
#[allow(clippy::large_enum_variant)] // one per node: its size does not matter
pub enum ShardRun {
    /// All shards done: the node's output, the engines that computed its
    /// shards, and the shards' keys.
    Done { output: StageOutput, engines: Vec<String>, parts: Vec<Digest> },
    /// This many shards belong to other workers.
    Deferred(usize),
}

/// How the processes building a node divide its shards.
#[derive(Clone, Copy)]
pub enum Claims<'a> {
    /// Processes on this cache: a lock file per shard.
    Local,
    /// A static slice of a job array; the other slices are left.
    Slice(Slice),
    /// Workers anywhere: a lease per shard on the shared tier.
    Leases(&'a Leases),
}

/// What a shard is built under, released once it is stored.
#[allow(dead_code)] // held only to be released when dropped
enum Held {
    Lock(BuildLock),
    Lease(Lease),
}

/// Each shard's key material: the node's parameters and external inputs
/// and the shard's own items (not the node's whole input, so shards survive
/// a change elsewhere in the list).
pub fn materials(material: &KeyMaterial, externals: &BTreeSet<&str>, shards: &dyn Shards) -> Vec<KeyMaterial> {
    (0..shards.count())
        .map(|i| {
            let mut m = material.clone();
            m.stage = format!("{}-shard", material.stage);
            m.inputs.retain(|k, _| externals.contains(k.as_str()));
            m.inputs.insert("items".into(), shards.items_digest(i));
            m
        })
        .collect()
}

/// How far along a node's shards are, as `plan` shows it while workers run.
#[derive(Debug, Default)]
pub struct ShardProgress {
    pub total: usize,
    pub built: usize,
    /// Live leases, by host.
    pub claimed: BTreeMap<String, usize>,
}

impl ShardProgress {
    pub fn describe(&self) -> String {
        let claimed: usize = self.claimed.values().sum();
        let hosts: Vec<String> = self.claimed.iter().map(|(h, n)| format!("{h}: {n}")).collect();
        let hosts = if hosts.is_empty() { String::new() } else { format!(" ({})", hosts.join(", ")) };
        format!(
            "shards: {} of {} built, {claimed} claimed{hosts}, {} waiting",
            self.built,
            self.total,
            self.total - self.built - claimed
        )
    }
}

/// The progress of shards keyed by `materials`: built (anywhere), or
/// claimed under a live lease on `leases`' tier.
pub fn progress(cache: &Cache, leases: &Leases, materials: &[KeyMaterial]) -> Result<ShardProgress> {
    let keys: Vec<Digest> = materials.iter().map(KeyMaterial::key).collect();
    let built = cache.lookup_built(&keys)?;
    let open: Vec<Digest> = keys.iter().zip(&built).filter(|(_, b)| b.is_none()).map(|(k, _)| *k).collect();
    let holders = crate::cache::parallel::map(&open, |k| leases.holder(k))?;
    let mut p = ShardProgress { total: keys.len(), built: keys.len() - open.len(), ..ShardProgress::default() };
    for h in holders.into_iter().flatten() {
        *p.claimed.entry(h.host).or_default() += 1;
    }
    Ok(p)
}

/// Held shards a waiting worker looks at per poll.
const POLL_BATCH: usize = 8;

/// The file name of a shard's one output.
const SHARD_FILE: &str = "shard.json";

/// Runs `shards` of the node whose key material is `material` and whose
/// external inputs are named `externals`. A shard another process is
/// building is left for later, so processes share a node's shards; only
/// when nothing else is left does this one wait for it (and, with leases,
/// take it over if its builder stops renewing).
pub fn run(
    cache: &Cache,
    label: &str,
    material: &KeyMaterial,
    externals: &BTreeSet<&str>,
    shards: Box<dyn Shards + '_>,
    claims: Claims,
    recover: &dyn Fn(anyhow::Error) -> Result<()>,
) -> Result<ShardRun> {
    let n = shards.count();
    let bar = Progress::new(label, (0..n).map(|i| shards.units(i)).sum(), shards.unit());
    let materials = materials(material, externals, shards.as_ref());
    cache.prefetch(&materials.iter().map(KeyMaterial::key).collect::<Vec<_>>())?;
    let mut node = Node { cache, shards, bar, recover };
    let mut entries: Vec<Option<ActionEntry>> = vec![None; n];
    let mut pending = 0;
    let mut busy = Vec::new();
    let what = |i: usize| format!("{label} shard {}/{n}", i + 1);
    for (i, m) in materials.iter().enumerate() {
        let key = m.key();
        if let Some(hit) = node.cached(&key, i, &what(i))? {
            entries[i] = Some(hit);
            continue;
        }
        let held = match claims {
            Claims::Slice(s) if !s.owns(&key) => {
                pending += 1;
                continue;
            }
            Claims::Leases(leases) => match leases.try_claim(&key, &what(i))? {
                Claim::Mine(lease) => Some(Held::Lease(lease)),
                Claim::Held(_) => None,
            },
            Claims::Local | Claims::Slice(_) => cache.try_lock(&key)?.map(Held::Lock),
        };
        match held {
            Some(held) => entries[i] = Some(node.build(m, i, &what(i), held)?),
            None => busy.push(i), // another process is building it: take the next one
        }
    }
    match claims {
        Claims::Leases(leases) => node.wait_for_others(leases, &materials, &mut entries, busy, &what)?,
        Claims::Local | Claims::Slice(_) => {
            for i in busy {
                let lock = cache.lock(&materials[i].key(), &what(i))?;
                entries[i] = Some(node.build(&materials[i], i, &what(i), Held::Lock(lock))?);
            }
        }
    }
    drop(node.bar);
    if pending > 0 {
        return Ok(ShardRun::Deferred(pending));
    }
    let mut engines = Vec::new();
    for e in entries.iter().flatten().flat_map(|e| &e.engines) {
        if !engines.contains(e) {
            engines.push(e.clone());
        }
    }
    let parts = materials.iter().map(KeyMaterial::key).collect();
    Ok(ShardRun::Done { output: node.shards.assemble()?, engines, parts })
}

/// A node's shards as they are worked through.
struct Node<'c, 's> {
    cache: &'c Cache,
    shards: Box<dyn Shards + 's>,
    bar: Progress,
    /// Whether a failed shard can be built again (a launched server restarted).
    recover: &'c dyn Fn(anyhow::Error) -> Result<()>,
}

impl Node<'_, '_> {
    /// Shard `i` from the cache, if it is there and usable (an unusable
    /// entry is removed, so the shard is built again).
    fn cached(&mut self, key: &Digest, i: usize, what: &str) -> Result<Option<ActionEntry>> {
        let Some(entry) = self.cache.get_action(key)? else { return Ok(None) };
        let object = entry.outputs.first().map(|o| self.cache.get_object(&o.digest)).transpose()?.flatten();
        let Some(bytes) = object else { return Ok(None) };
        match self.shards.cached(i, &bytes, &entry.counts, what) {
            Ok(()) => {
                self.bar.cached(self.shards.units(i));
                Ok(Some(entry))
            }
            Err(e) => {
                eprintln!("warning: the cached {what} is unusable ({e:#}); building it again");
                self.cache.remove_action(key, &format!("{e:#}"))?;
                Ok(None)
            }
        }
    }

    /// Waits for the `busy` shards, which other workers hold leases on:
    /// each is taken from the cache once stored, or claimed and built here
    /// once its lease runs out. A poll looks at [`POLL_BATCH`] of them in
    /// turn, so a thousand waiting workers cost the shared tier a bounded
    /// rate of requests, not one per held shard per worker per poll.
    fn wait_for_others(
        &mut self,
        leases: &Leases,
        materials: &[KeyMaterial],
        entries: &mut [Option<ActionEntry>],
        busy: Vec<usize>,
        what: &dyn Fn(usize) -> String,
    ) -> Result<()> {
        let poll = (leases.period() / 4).clamp(Duration::from_millis(100), Duration::from_secs(10));
        let mut queue: std::collections::VecDeque<usize> = busy.into();
        let mut holders: BTreeMap<usize, String> = BTreeMap::new();
        let mut said = String::new();
        while !queue.is_empty() {
            for _ in 0..POLL_BATCH.min(queue.len()) {
                let i = queue.pop_front().expect("not empty");
                let key = materials[i].key();
                if let Some(hit) = self.cached(&key, i, &what(i))? {
                    entries[i] = Some(hit);
                    holders.remove(&i);
                    continue;
                }
                match leases.try_claim(&key, &what(i))? {
                    Claim::Mine(lease) => {
                        holders.remove(&i);
                        entries[i] = Some(self.build(&materials[i], i, &what(i), Held::Lease(lease))?);
                    }
                    Claim::Held(h) => {
                        holders.insert(i, h.host);
                        queue.push_back(i);
                    }
                }
            }
            if !queue.is_empty() {
                let mut hosts: BTreeMap<&str, usize> = BTreeMap::new();
                for h in holders.values() {
                    *hosts.entry(h).or_default() += 1;
                }
                let by: Vec<String> = hosts.iter().map(|(h, n)| format!("{h}: {n}")).collect();
                let line = format!("waiting for {} shards that other workers hold ({})", queue.len(), by.join(", "));
                if line != said {
                    self.bar.log(&line);
                    said = line;
                }
                std::thread::sleep(poll);
            }
        }
        Ok(())
    }

    /// Builds and stores shard `i` under what claimed it (a lock or a
    /// lease), unless another process stored it before the claim was ours.
    fn build(&mut self, material: &KeyMaterial, i: usize, what: &str, _held: Held) -> Result<ActionEntry> {
        let key = material.key();
        if let Some(hit) = self.cached(&key, i, what)? {
            return Ok(hit);
        }
        let started = Instant::now();
        let bar = &self.bar;
        // Only the shard in flight is built again.
        let built = loop {
            match self.shards.build(i, &|tokens| bar.unit_done(tokens)) {
                Ok(built) => break built,
                Err(e) => {
                    (self.recover)(e)?;
                    bar.log(&format!("{what}: building it again"));
                }
            }
        };
        let secs = started.elapsed().as_secs_f64();
        let digest = self.cache.put_object(&built.bytes)?;
        let file = OutputFile { path: SHARD_FILE.into(), digest, size: built.bytes.len() as u64 };
        let entry = ActionEntry {
            material: material.clone(),
            node: what.to_string(),
            outputs: vec![file],
            counts: built.counts,
            engines: vec![built.engine],
            parts: vec![],
        };
        self.cache.put_action(&entry)?;
        // Only now is the shard safe from a crash.
        self.bar.log(&format!(
            "{what}: {} rows, {} tokens in {secs:.1}s ({:.1} tokens/s); {}",
            built.rows,
            built.tokens,
            built.tokens as f64 / secs,
            self.bar.status(self.shards.unit())
        ));
        Ok(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn auto_reads_the_scheduler() {
        let slurm = [("SLURM_ARRAY_TASK_ID", "3"), ("SLURM_ARRAY_TASK_MIN", "1"), ("SLURM_ARRAY_TASK_COUNT", "4")];
        assert_eq!(Slice::from_scheduler(None, env(&slurm)).unwrap(), Slice { index: 2, count: 4 });
        let k8s = [("JOB_COMPLETION_INDEX", "0")];
        assert_eq!(Slice::from_scheduler(Some(5), env(&k8s)).unwrap(), Slice { index: 0, count: 5 });
        let no_count = Slice::from_scheduler(None, env(&k8s)).unwrap_err().to_string();
        assert!(no_count.contains("give it as auto/N"), "{no_count}");
        let outside = Slice::from_scheduler(Some(2), env(&[("JOB_COMPLETION_INDEX", "2")])).unwrap_err();
        assert!(outside.to_string().contains("outside the 2 tasks"));
        let none = Slice::from_scheduler(None, env(&[])).unwrap_err().to_string();
        assert!(none.contains("neither SLURM_ARRAY_TASK_ID nor JOB_COMPLETION_INDEX"), "{none}");
    }
}
