//! Running a node's work shard by shard: each shard (a fixed slice of the
//! node's items) is its own cache entry, keyed by the node's parameters and
//! external inputs and the shard's items, and built under its own lock, so
//! a crash loses at most the shard in flight and processes sharing a cache
//! split the work. With a [`Slice`], shards of other slices are left alone.

use super::progress::Progress;
use crate::cache::{ActionEntry, Cache, KeyMaterial, OutputFile};
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
/// external inputs are named `externals`.
pub fn run(
    cache: &Cache,
    label: &str,
    material: &KeyMaterial,
    externals: &BTreeSet<&str>,
    mut shards: Box<dyn Shards + '_>,
    slice: Option<Slice>,
) -> Result<ShardRun> {
    let n = shards.count();
    let bar = Progress::new(label, (0..n).map(|i| shards.units(i)).sum(), shards.unit());
    let (mut engines, mut parts, mut pending) = (Vec::new(), Vec::with_capacity(n), 0);
    for i in 0..n {
        // Keyed by the node's parameters and external inputs and the shard's
        // own items (not the node's whole input, so shards survive a change
        // elsewhere in the list).
        let mut key_material = material.clone();
        key_material.stage = format!("{}-shard", material.stage);
        key_material.inputs.retain(|k, _| externals.contains(k.as_str()));
        key_material.inputs.insert("items".into(), shards.items_digest(i));
        let key = key_material.key();
        let what = format!("{label} shard {}/{n}", i + 1);
        let cached = |shards: &mut Box<dyn Shards + '_>| -> Result<Option<ActionEntry>> {
            let Some(entry) = cache.get_action(&key)? else { return Ok(None) };
            let Some(bytes) = entry.outputs.first().map(|o| cache.get_object(&o.digest)).transpose()?.flatten() else {
                return Ok(None);
            };
            match shards.cached(i, &bytes, &entry.counts, &what) {
                Ok(()) => Ok(Some(entry)),
                Err(e) => {
                    eprintln!("warning: the cached {what} is unusable ({e:#}); building it again");
                    cache.remove_action(&key)?;
                    Ok(None)
                }
            }
        };
        // Held until the shard is stored, so no other process builds it meanwhile.
        let mut _lock = None;
        let hit = match cached(&mut shards)? {
            Some(hit) => Some(hit),
            None if slice.is_some_and(|s| !s.owns(&key)) => {
                pending += 1;
                continue;
            }
            None => {
                _lock = Some(cache.lock(&key, &what)?);
                cached(&mut shards)?
            }
        };
        let entry = match hit {
            Some(entry) => {
                bar.cached(shards.units(i));
                entry
            }
            None => {
                let started = Instant::now();
                let built = shards.build(i, &|tokens| bar.unit_done(tokens))?;
                let secs = started.elapsed().as_secs_f64();
                let digest = cache.put_object(&built.bytes)?;
                let file = OutputFile { path: SHARD_FILE.into(), digest, size: built.bytes.len() as u64 };
                let entry = ActionEntry {
                    material: key_material,
                    node: what.clone(),
                    outputs: vec![file],
                    counts: built.counts,
                    engines: vec![built.engine],
                    parts: vec![],
                };
                cache.put_action(&entry)?;
                // Only now is the shard safe from a crash.
                bar.log(&format!(
                    "{what}: {} rows, {} tokens in {secs:.1}s ({:.1} tokens/s)",
                    built.rows,
                    built.tokens,
                    built.tokens as f64 / secs
                ));
                entry
            }
        };
        for e in entry.engines {
            if !engines.contains(&e) {
                engines.push(e);
            }
        }
        parts.push(key);
    }
    drop(bar);
    if pending > 0 {
        return Ok(ShardRun::Deferred(pending));
    }
    Ok(ShardRun::Done { output: shards.assemble()?, engines, parts })
}
