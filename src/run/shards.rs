//! Running a node's work shard by shard: each shard (a fixed slice of the
//! node's items) is its own cache entry, keyed by the node's parameters and
//! external inputs and the shard's items, and built under its own lock, so
//! a crash loses at most the shard in flight and processes sharing a cache
//! split the work. With a [`Slice`], shards of other slices are left alone.

use super::progress::Progress;
use crate::cache::{ActionEntry, BuildLock, Cache, KeyMaterial, OutputFile};
use crate::digest::Digest;
use crate::stages::{Shards, StageOutput};
use anyhow::Result;
use std::collections::BTreeSet;
use std::time::Instant;

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

/// The file name of a shard's one output.
const SHARD_FILE: &str = "shard.json";

/// Runs `shards` of the node whose key material is `material` and whose
/// external inputs are named `externals`. A shard another process is
/// building is left for later, so processes on one cache share a node's
/// shards; only when nothing else is left does this one wait for it.
pub fn run(
    cache: &Cache,
    label: &str,
    material: &KeyMaterial,
    externals: &BTreeSet<&str>,
    shards: Box<dyn Shards + '_>,
    slice: Option<Slice>,
) -> Result<ShardRun> {
    let n = shards.count();
    let bar = Progress::new(label, (0..n).map(|i| shards.units(i)).sum(), shards.unit());
    let mut node = Node { cache, shards, bar };
    // Keyed by the node's parameters and external inputs and the shard's
    // own items (not the node's whole input, so shards survive a change
    // elsewhere in the list).
    let materials: Vec<KeyMaterial> = (0..n)
        .map(|i| {
            let mut m = material.clone();
            m.stage = format!("{}-shard", material.stage);
            m.inputs.retain(|k, _| externals.contains(k.as_str()));
            m.inputs.insert("items".into(), node.shards.items_digest(i));
            m
        })
        .collect();
    let mut entries: Vec<Option<ActionEntry>> = vec![None; n];
    let mut pending = 0;
    let mut busy = Vec::new();
    let what = |i: usize| format!("{label} shard {}/{n}", i + 1);
    for (i, m) in materials.iter().enumerate() {
        let key = m.key();
        if let Some(hit) = node.cached(&key, i, &what(i))? {
            entries[i] = Some(hit);
        } else if slice.is_some_and(|s| !s.owns(&key)) {
            pending += 1;
        } else if let Some(lock) = cache.try_lock(&key)? {
            entries[i] = Some(node.build(m, i, &what(i), lock)?);
        } else {
            busy.push(i); // another process is building it: take the next one
        }
    }
    for i in busy {
        let lock = cache.lock(&materials[i].key(), &what(i))?;
        entries[i] = Some(node.build(&materials[i], i, &what(i), lock)?);
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
                self.cache.remove_action(key)?;
                Ok(None)
            }
        }
    }

    /// Builds and stores shard `i` under its `lock`, unless another process
    /// stored it before the lock was ours.
    fn build(&mut self, material: &KeyMaterial, i: usize, what: &str, _lock: BuildLock) -> Result<ActionEntry> {
        let key = material.key();
        if let Some(hit) = self.cached(&key, i, what)? {
            return Ok(hit);
        }
        let started = Instant::now();
        let bar = &self.bar;
        let built = self.shards.build(i, &|tokens| bar.unit_done(tokens))?;
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
            signature: None,
        };
        self.cache.put_action(&entry)?;
        // Only now is the shard safe from a crash.
        self.bar.log(&format!(
            "{what}: {} rows, {} tokens in {secs:.1}s ({:.1} tokens/s)",
            built.rows,
            built.tokens,
            built.tokens as f64 / secs
        ));
        Ok(entry)
    }
}
