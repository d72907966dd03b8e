//! Executing a plan: the build loop. Each stale node is built under a lock
//! on its key, from inputs kept in memory or read (verified) from the
//! cache; sharded work goes through `shards`, storing through `store`, and
//! the outputs are placed under `export.dir` by `materialise`.

mod materialise;
mod memory;
mod models;
mod progress;
mod shards;
mod store;

pub use materialise::INCOMPLETE;
use shards::Claims;
pub use shards::{ShardProgress, Slice};

use crate::cache::{ActionEntry, BuildLock, Cache, KeyMaterial, OutputFile};
use crate::digest::Digest;
use crate::plan::{Freshness, Graph, Walk};
use crate::stages::{self, Inputs, Rows, Stage, StageOutput, Work};
use anyhow::{Context, Result, bail};
use memory::Memory;
use shards::ShardRun;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::mpsc::{SyncSender, sync_channel};
use std::time::Instant;
use store::Store;

/// How a pass over the graph ended.
pub(crate) enum Pass<T> {
    Done(T),
    /// A cache object or entry failed verification while being read; it
    /// was removed, so walking the graph again rebuilds what it held.
    Damaged(String),
}

/// How a run goes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// One worker of many, which writes no files under `export.dir`.
    pub worker: Option<Worker>,
    /// Replace files in `export.dir` that prefgen did not write.
    pub overwrite: bool,
}

/// How a worker finds its part of the work.
#[derive(Debug, Clone, Copy)]
pub enum Worker {
    /// Only this static slice of the stale shards; nodes that need the
    /// other slices are left for a later run.
    Slice(Slice),
    /// The next stale shard no live worker holds, under a lease of this
    /// period on the shared tier; the others' shards are waited for.
    Claim(std::time::Duration),
}

/// What a run did.
#[derive(Debug, Default)]
pub struct Summary {
    pub built: Vec<String>,
    pub fresh: usize,
    /// Files (re)written under `export.dir`.
    pub written: usize,
    /// Every selected node's entry, by node index (None: deferred).
    pub entries: Vec<Option<ActionEntry>>,
    /// Nodes left for a later run, as a `--shard` worker leaves them.
    pub deferred: Vec<String>,
}

/// Builds the selected nodes and everything stale that they need. A
/// worker writes nothing under `export.dir` (the workers of a job share
/// it): the run that assembles does.
pub fn run(graph: &Graph, cache: &Cache, targets: &[String], options: Options) -> Result<Summary> {
    let selected = graph.select(targets)?;
    if options.worker.is_none() {
        materialise::check_dir(std::path::Path::new(&graph.recipe.export.dir), cache)?;
    }
    let leases = match options.worker {
        Some(Worker::Claim(period)) => Some(cache.leases(period)),
        _ => None,
    };
    let claims = match (options.worker, &leases) {
        (Some(Worker::Slice(slice)), _) => Claims::Slice(slice),
        (_, Some(leases)) => Claims::Leases(leases),
        _ => Claims::Local,
    };
    if let Some(leases) = &leases {
        eprintln!("claiming shards with leases of {}s on {}", leases.period().as_secs_f64(), leases.describe());
    }
    for pass in 1.. {
        match run_once(graph, cache, &selected, options, claims)? {
            Pass::Done(summary) => return Ok(summary),
            Pass::Damaged(what) => eprintln!("{what}; rebuilding it"),
        }
        // A remote's entry refused for the rest of the run cannot fail
        // again: only damage the local tier keeps showing counts.
        if pass >= 3 + cache.refused() {
            break;
        }
    }
    bail!("cache objects keep failing verification: is the disk under {} healthy?", cache.root().display())
}

fn run_once(
    graph: &Graph,
    cache: &Cache,
    selected: &[bool],
    options: Options,
    claims: Claims,
) -> Result<Pass<Summary>> {
    // A rendezvous: at most one node is being stored while the next is
    // computed, which bounds the bytes held in memory.
    let (queue, pending) = sync_channel::<Store>(0);
    let built = std::thread::scope(|scope| {
        let storer = scope.spawn(|| store::store_all(cache, pending));
        let built = build_all(graph, cache, selected, queue, claims);
        let stored = storer.join().expect("the storing thread does not panic");
        // A build error explains a storing error (the queue closed), not vice versa.
        let built = built?;
        stored.map(|()| built)
    })?;
    let (mut summary, entries, trusted) = match built {
        Pass::Done(b) => b,
        Pass::Damaged(what) => return Ok(Pass::Damaged(what)),
    };
    if options.worker.is_none() {
        match materialise::materialise(graph, cache, &entries, selected, &trusted, options.overwrite)? {
            Pass::Done(written) => summary.written = written,
            Pass::Damaged(what) => return Ok(Pass::Damaged(what)),
        }
    }
    summary.entries = entries;
    Ok(Pass::Done(summary))
}

/// What `build_all` resolved: the summary, every selected node's entry, and
/// the objects this run stored.
type Built = (Summary, Vec<Option<ActionEntry>>, BTreeSet<Digest>);

fn build_all(
    graph: &Graph,
    cache: &Cache,
    selected: &[bool],
    queue: SyncSender<Store>,
    claims: Claims,
) -> Result<Pass<Built>> {
    let mut walk = Walk::new(graph, cache);
    let mut summary = Summary::default();
    let mut stored = BTreeSet::new();
    let mut memory = Memory::new(graph, selected);
    let models = models::Models::new(cache.root().join("logs"));
    let mut deferred = vec![false; graph.nodes.len()];
    for idx in (0..graph.nodes.len()).filter(|&i| selected[i]) {
        let node = &graph.nodes[idx];
        let label = node.label();
        // A stage's launched servers are stopped once no node of it is left
        // (the next stage may want the GPU).
        for stage in Stage::ALL {
            if !(idx..graph.nodes.len()).any(|i| selected[i] && graph.nodes[i].stage() == stage) {
                models.stop_launched(stage.name());
            }
        }
        if node.deps.iter().chain(&node.key_deps).any(|&d| deferred[d]) {
            deferred[idx] = true;
            summary.deferred.push(label);
            continue;
        }
        let (material, reason) = match walk.freshness(idx)? {
            Freshness::Fresh(entry, _) => {
                cache.set_last_build(&graph.ref_name(idx), &entry.key())?;
                walk.entries[idx] = Some(entry);
                summary.fresh += 1;
                memory.done(idx);
                continue;
            }
            Freshness::Stale(material, reason) => (material, reason),
            Freshness::Blocked(why) => unreachable!("inputs are built before {label}: {why}"),
        };
        let key = material.key();
        eprintln!("building {label}: {reason}");
        for r in walk.externals(idx)?.iter().filter(|r| r.per_split) {
            eprintln!("reading prompts for {} from {}", node.spec.split.as_deref().unwrap_or_default(), r.source);
        }
        let started = Instant::now();
        let inputs = match inputs(&mut walk, &memory, idx)? {
            Pass::Done(inputs) => inputs,
            Pass::Damaged(what) => return Ok(Pass::Damaged(what)),
        };
        let context = || format!("building {label}");
        let work = stages::work(&node.spec, &graph.recipe, inputs, &models).with_context(context)?;
        // The node's lock is taken to build a whole node, and after a sharded
        // node's shards (each under its own lock), so processes on one cache
        // share those shards rather than wait for each other.
        let outcome = match work {
            Work::Whole(build) => {
                let lock = cache.lock(&key, &label)?;
                match built_meanwhile(cache, &key)? {
                    Some(entry) => Outcome::Meanwhile(entry),
                    None => Outcome::Built(build().with_context(context)?, vec![], vec![], lock),
                }
            }
            Work::Sharded(shards) => {
                let externals = node.spec.keyed.externals.keys().map(String::as_str).collect();
                let recover = |e| models.recover(e);
                match shards::run(cache, &label, &material, &externals, shards, claims, &recover)
                    .with_context(context)?
                {
                    ShardRun::Done { output, engines, parts } => {
                        let lock = cache.lock(&key, &label)?;
                        match built_meanwhile(cache, &key)? {
                            Some(entry) => Outcome::Meanwhile(entry),
                            None => Outcome::Built(output, engines, parts, lock),
                        }
                    }
                    ShardRun::Deferred(n) => Outcome::Deferred(n),
                }
            }
        };
        let (mut output, engines, parts, lock) = match outcome {
            Outcome::Built(output, engines, parts, lock) => (output, engines, parts, lock),
            Outcome::Meanwhile(entry) => {
                eprintln!("{label} was built by another process meanwhile");
                cache.set_last_build(&graph.ref_name(idx), &entry.key())?;
                walk.entries[idx] = Some(entry);
                summary.fresh += 1;
                memory.done(idx);
                continue;
            }
            Outcome::Deferred(n) => {
                eprintln!("left {label} for later: {n} of its shards are left to other workers");
                deferred[idx] = true;
                summary.deferred.push(label);
                continue;
            }
        };
        let mut outputs = Vec::with_capacity(output.files.len());
        let mut files = Vec::with_capacity(output.files.len());
        for (path, bytes) in std::mem::take(&mut output.files) {
            let digest = Digest::of(&bytes);
            stored.insert(digest);
            outputs.push(OutputFile { path, digest, size: bytes.len() as u64 });
            files.push(Arc::new(bytes));
        }
        let entry = ActionEntry { material, node: label.clone(), outputs, counts: output.counts, engines, parts };
        let counts = entry.counts.describe();
        let counts = if counts.is_empty() { counts } else { format!(" ({counts})") };
        eprintln!("built {label} in {:.2}s{counts}", started.elapsed().as_secs_f64());
        if entry.counts.rows == Some(0) {
            eprintln!("warning: {label} kept no rows ({}): the dataset will be empty", entry.counts.describe());
        }
        memory.keep(idx, output.rows, &label);
        walk.entries[idx] = Some(entry.clone());
        memory.done(idx);
        summary.built.push(label);
        let store = Store { entry, files, ref_name: graph.ref_name(idx), lock };
        if queue.send(store).is_err() {
            break; // the storing thread failed; its error is reported
        }
    }
    Ok(Pass::Done((summary, walk.entries, stored)))
}

/// How far along the shards of stale node `idx` (key material `material`,
/// its inputs fresh) are: None for a node that is not sharded.
pub fn shard_progress(walk: &mut Walk, idx: usize, material: &KeyMaterial) -> Result<Option<ShardProgress>> {
    let graph = walk.graph;
    let node = &graph.nodes[idx];
    let memory = Memory::new(graph, &vec![false; graph.nodes.len()]);
    let Pass::Done(inputs) = inputs(walk, &memory, idx)? else { return Ok(None) };
    let models = models::Models::new(walk.cache.root().join("logs"));
    let Work::Sharded(work) = stages::work(&node.spec, &graph.recipe, inputs, &models)? else { return Ok(None) };
    let externals = node.spec.keyed.externals.keys().map(String::as_str).collect();
    let materials = shards::materials(material, &externals, work.as_ref());
    let leases = walk.cache.leases(crate::cache::lease::DEFAULT_PERIOD);
    shards::progress(walk.cache, &leases, &materials).map(Some)
}

/// How building one node ended.
enum Outcome {
    /// Its output, the engines that computed it, its shards' keys, and the
    /// lock held until it is stored.
    Built(StageOutput, Vec<String>, Vec<Digest>, BuildLock),
    /// Another process stored it first.
    Meanwhile(ActionEntry),
    /// This many of its shards belong to other workers.
    Deferred(usize),
}

/// The entry of `key`, if another process stored it (with its outputs).
fn built_meanwhile(cache: &Cache, key: &Digest) -> Result<Option<ActionEntry>> {
    Ok(cache.get_action(key)?.filter(|e| cache.has_outputs(e).unwrap_or(false)))
}

/// The inputs of node `idx`: each dependency's rows, handed over in memory
/// when this run built it, else parsed from its cache object (verified);
/// and what its stage needs besides.
fn inputs(walk: &mut Walk, memory: &Memory, idx: usize) -> Result<Pass<Inputs>> {
    let graph = walk.graph;
    let node = &graph.nodes[idx];
    let mut deps = Vec::with_capacity(node.deps.len());
    for &d in &node.deps {
        if let Some(rows) = memory.get(d) {
            deps.push(rows.clone());
            continue;
        }
        let entry = walk.entries[d].as_ref().expect("deps are resolved before their users");
        let [out] = &entry.outputs[..] else {
            let what = format!("the cached entry of {} names {} outputs", entry.node, entry.outputs.len());
            walk.cache.remove_action(&entry.key(), &what)?;
            return Ok(Pass::Damaged(what));
        };
        let Some(bytes) = walk.cache.get_object(&out.digest)? else {
            return Ok(Pass::Damaged(format!("cache object {} of {} is damaged", out.digest.short(), entry.node)));
        };
        match Rows::parse(graph.nodes[d].stage(), &bytes, &format!("{} of {}", out.path, entry.node)) {
            Ok(rows) => deps.push(rows),
            Err(e) => {
                // An entry naming bytes that are not its stage's rows: forget it.
                let what = format!("the cached output of {} is unusable ({e:#})", entry.node);
                walk.cache.remove_action(&entry.key(), &what)?;
                return Ok(Pass::Damaged(what));
            }
        }
    }
    let provenance = match node.stage() {
        Stage::Export => Some(walk.provenance(idx)?),
        _ => None,
    };
    let source_files = match (node.stage(), &node.spec.split) {
        (Stage::Prompts, Some(split)) => walk.source_files(split).to_vec(),
        _ => Vec::new(),
    };
    Ok(Pass::Done(Inputs { deps, source_files, provenance }))
}
