//! Executing a plan: build the stale nodes (each under a lock on its key),
//! then materialise the outputs under `export.dir`.
//!
//! Storing is write-behind: a second thread writes each node's objects
//! (fsynced) and then its action entry, still holding the node's build lock,
//! while this thread computes the next node from the rows it keeps in
//! memory (typed, so they are not parsed again). Rows leave memory once
//! every node that reads them is done.

use crate::cache::tier::{FILE_MODE, write_atomic_in};
use crate::cache::{ActionEntry, BuildLock, Cache, KeyMaterial, OutputFile};
use crate::digest::Digest;
use crate::formats::pyjson;
use crate::formats::simpo::{self, DecodeRow, FilteredRow, ScoredRow, TextLen};
use crate::infer::reward::RewardModel;
use crate::infer::sampler::Sampling;
use crate::infer::{Load, Policy};
use crate::plan::{Freshness, Graph, Node, Stage, Walk};
use crate::recipe::Recipe;
use crate::stages::{Rows, StageOutput, annotate, binarize, export, filter, generate, prompts};
use anyhow::{Context, Result, bail};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Instant, SystemTime};

/// A cache object that failed verification while being read; the object was
/// removed, so walking the graph again rebuilds it.
#[derive(Debug, thiserror::Error)]
#[error("cache object {0} of {1} is damaged")]
struct Damaged(String, String);

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
        let head = u64::from_str_radix(&key.to_hex()[..16], 16).expect("digests are hex");
        head % self.count == self.index
    }
}

/// A node whose shards are not all built: the rest belong to other workers.
#[derive(Debug, thiserror::Error)]
#[error("{0} of its shards are left to other workers")]
struct Deferred(usize);

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

/// Builds the selected nodes and everything stale that they need.
/// With a `slice`, only the stale shards of that slice are built, nodes that
/// need the other slices' shards are left for a later run, and nothing is
/// written under `export.dir` (workers of a job array share it).
pub fn run(graph: &Graph, cache: &Cache, targets: &[String], slice: Option<Slice>) -> Result<Summary> {
    let selected = graph.select(targets)?;
    // A damaged object found mid-run is removed; the next walk rebuilds it.
    for _ in 0..3 {
        match run_once(graph, cache, &selected, slice) {
            Err(e) if e.downcast_ref::<Damaged>().is_some() => eprintln!("{e}; rebuilding it"),
            other => return other,
        }
    }
    bail!("cache objects keep failing verification: is the disk under {} healthy?", cache.root().display())
}

/// A built node on its way into the cache.
struct Store {
    entry: ActionEntry,
    files: Vec<Arc<Vec<u8>>>,
    ref_name: String,
    /// Released once the entry is stored, so no other process builds it meanwhile.
    _lock: BuildLock,
}

fn store_all(cache: &Cache, queue: Receiver<Store>) -> Result<()> {
    for s in queue {
        for (out, bytes) in s.entry.outputs.iter().zip(&s.files) {
            cache.store_object(&out.digest, bytes)?;
        }
        // The entry only after its objects: an entry never names a missing object.
        cache.put_action(&s.entry)?;
        cache.set_last_build(&s.ref_name, &s.entry.key())?;
    }
    Ok(())
}

fn run_once(graph: &Graph, cache: &Cache, selected: &[bool], slice: Option<Slice>) -> Result<Summary> {
    // A rendezvous: at most one node is being stored while the next is
    // computed, which bounds the bytes held in memory.
    let (queue, pending) = sync_channel::<Store>(0);
    let (mut summary, entries, fresh_objects) = std::thread::scope(|scope| {
        let storer = scope.spawn(|| store_all(cache, pending));
        let built = build_all(graph, cache, selected, queue, slice);
        let stored = storer.join().expect("the storing thread does not panic");
        // A build error explains a storing error (the queue closed), not vice versa.
        let built = built?;
        stored.map(|()| built)
    })?;
    if slice.is_none() {
        summary.written = materialise(graph, cache, &entries, selected, &fresh_objects)?;
    }
    summary.entries = entries;
    Ok(summary)
}

/// What `build_all` resolved: the summary, every selected node's entry, and
/// the objects this run wrote.
type Built = (Summary, Vec<Option<ActionEntry>>, BTreeSet<Digest>);

fn build_all(
    graph: &Graph,
    cache: &Cache,
    selected: &[bool],
    queue: SyncSender<Store>,
    slice: Option<Slice>,
) -> Result<Built> {
    let mut walk = Walk::new(graph, cache);
    let mut summary = Summary::default();
    let mut fresh_objects = BTreeSet::new();
    let mut memory = Outputs::new(graph, selected);
    let models = Models { slice, ..Models::default() };
    let mut deferred = vec![false; graph.nodes.len()];
    for idx in (0..graph.nodes.len()).filter(|&i| selected[i]) {
        let node = &graph.nodes[idx];
        let label = node.label();
        if node.deps.iter().chain(&node.key_deps).any(|&d| deferred[d]) {
            deferred[idx] = true;
            summary.deferred.push(label);
            continue;
        }
        let (material, reason) = match walk.freshness(idx)? {
            Freshness::Fresh(entry) => {
                walk.entries[idx] = Some(entry);
                summary.fresh += 1;
                memory.done(idx);
                continue;
            }
            Freshness::Stale(material, reason) => (material, reason),
            Freshness::Blocked(why) => unreachable!("inputs are built before {label}: {why}"),
        };
        let key = material.key();
        let lock = cache.lock(&key, &label)?;
        // Another process may have built it while we waited for the lock.
        if let Some(entry) = cache.get_action(&key)?
            && cache.has_outputs(&entry)?
        {
            walk.entries[idx] = Some(entry);
            summary.fresh += 1;
            memory.done(idx);
            continue;
        }
        eprintln!("building {label}: {reason}");
        let started = Instant::now();
        let mut output = match build_node(&walk, &memory, &models, idx, &material) {
            Err(e) if e.downcast_ref::<Deferred>().is_some() => {
                eprintln!("left {label} for later: {e}");
                deferred[idx] = true;
                summary.deferred.push(label);
                continue;
            }
            built => built.with_context(|| format!("building {label}"))?,
        };
        let mut outputs = Vec::with_capacity(output.files.len());
        let mut files = Vec::with_capacity(output.files.len());
        for (path, bytes) in std::mem::take(&mut output.files) {
            let digest = Digest::of(&bytes);
            fresh_objects.insert(digest);
            outputs.push(OutputFile { path, digest, size: bytes.len() as u64 });
            files.push(Arc::new(bytes));
        }
        let entry = ActionEntry { material, node: label.clone(), outputs, stats: output.stats };
        eprintln!("built {label} in {:.2}s{}", started.elapsed().as_secs_f64(), describe_stats(&entry));
        memory.keep(idx, output.rows, &label);
        walk.entries[idx] = Some(entry.clone());
        memory.done(idx);
        summary.built.push(label);
        let store = Store { entry, files, ref_name: graph.ref_name(idx), _lock: lock };
        if queue.send(store).is_err() {
            break; // the storing thread failed; its error is reported
        }
    }
    Ok((summary, walk.entries, fresh_objects))
}

/// Rows built in this run, kept in memory while a selected node still has
/// to read them (the storing thread holds the bytes meanwhile).
struct Outputs {
    rows: RefCell<HashMap<usize, Rows>>,
    /// For each node, how many selected nodes that read it are still to come.
    readers_left: Vec<usize>,
    deps: Vec<Vec<usize>>,
}

impl Outputs {
    fn new(graph: &Graph, selected: &[bool]) -> Outputs {
        let mut readers_left = vec![0; graph.nodes.len()];
        for (_, n) in graph.nodes.iter().enumerate().filter(|(i, _)| selected[*i]) {
            for &d in &n.deps {
                readers_left[d] += 1;
            }
        }
        Outputs { rows: RefCell::default(), readers_left, deps: graph.nodes.iter().map(|n| n.deps.clone()).collect() }
    }

    fn keep(&mut self, idx: usize, rows: Option<Rows>, label: &str) {
        if self.readers_left[idx] > 0 {
            let rows = rows.unwrap_or_else(|| panic!("{label} has readers, so its stage must hand over its rows"));
            self.rows.borrow_mut().insert(idx, rows);
        }
    }

    /// Node `idx` is resolved: its inputs have one reader fewer.
    fn done(&mut self, idx: usize) {
        for &d in &self.deps[idx] {
            self.readers_left[d] -= 1;
            if self.readers_left[d] == 0 {
                self.rows.borrow_mut().remove(&d);
            }
        }
    }
}

fn describe_stats(entry: &ActionEntry) -> String {
    if entry.stats.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = entry.stats.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!(" ({})", parts.join(", "))
}

/// The rows of output `path` of node `dep`: handed over in memory when this
/// run built it, else parsed from the cache object, verified.
fn read_rows<T: DeserializeOwned + Send + Sync + 'static>(
    walk: &Walk,
    memory: &Outputs,
    dep: usize,
    path: &str,
) -> Result<Arc<Vec<T>>> {
    let entry = walk.entries[dep].as_ref().expect("deps are resolved before their users");
    if let Some(rows) = memory.rows.borrow().get(&dep) {
        return rows
            .clone()
            .downcast::<Vec<T>>()
            .map_err(|_| anyhow::anyhow!("{}: rows of an unexpected type", entry.node));
    }
    let out = entry.output(path).with_context(|| format!("{} has no output {path}", entry.node))?;
    match walk.cache.get_object(&out.digest)? {
        Some(bytes) => Ok(Arc::new(simpo::parse_rows(&bytes, &format!("{path} of {}", entry.node))?)),
        None => Err(Damaged(out.digest.short(), entry.node.clone()).into()),
    }
}

/// Progress of one node's shards: a bar with units done (prompts, or
/// sequences scored), tokens/s and ETA on a terminal; otherwise a log line
/// per shard.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    started: Instant,
    tokens: std::cell::Cell<usize>,
    done: std::cell::Cell<usize>,
}

impl Progress {
    fn new(label: &str, total: usize, unit: &str) -> Progress {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let template = format!("{{prefix}} [{{bar:30}}] {{pos}}/{{len}} {unit}, {{msg}}, ETA {{eta}}");
            let style = indicatif::ProgressStyle::with_template(&template)
                .expect("the template is valid")
                .progress_chars("=> ");
            indicatif::ProgressBar::new(total as u64).with_style(style).with_prefix(label.to_string())
        });
        Progress { bar, started: Instant::now(), tokens: 0.into(), done: 0.into() }
    }

    /// One unit finished with `tokens` tokens.
    fn unit_done(&self, tokens: usize) {
        self.tokens.set(self.tokens.get() + tokens);
        self.cached(1);
        if let Some(bar) = &self.bar {
            bar.set_message(format!("{:.1} tokens/s", self.tokens.get() as f64 / self.started.elapsed().as_secs_f64()));
        }
    }

    /// Units found in the cache.
    fn cached(&self, units: usize) {
        self.done.set(self.done.get() + units);
        if let Some(bar) = &self.bar {
            bar.set_position(self.done.get() as u64);
        }
    }

    fn log(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// A loaded model's files: the model and the chat template replacing its own.
type ModelFiles = (PathBuf, Option<PathBuf>);

/// Models loaded in this run, by their files, and the slice of shards this
/// process runs them on.
#[derive(Default)]
struct Models {
    policies: RefCell<HashMap<ModelFiles, Rc<Policy>>>,
    rewards: RefCell<HashMap<ModelFiles, Rc<RewardModel>>>,
    slice: Option<Slice>,
}

impl Models {
    fn policy(&self, node: &Node) -> Result<Rc<Policy>> {
        let files = (node.files["generate.model"].clone(), node.files.get("generate.chat_template").cloned());
        if let Some(p) = self.policies.borrow().get(&files) {
            return Ok(p.clone());
        }
        eprintln!("loading {}", files.0.display());
        let load = Load { chat_template: files.1.as_deref(), dequantize: false };
        let policy = Rc::new(Policy::load(&files.0, &load)?);
        self.policies.borrow_mut().insert(files, policy.clone());
        Ok(policy)
    }

    fn reward(&self, node: &Node, recipe: &Recipe) -> Result<Rc<RewardModel>> {
        let files = (node.files["annotate.model"].clone(), node.files.get("annotate.chat_template").cloned());
        if let Some(m) = self.rewards.borrow().get(&files) {
            return Ok(m.clone());
        }
        eprintln!("loading {}", files.0.display());
        let rubric = match node.files.get("annotate.judge_rubric") {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .with_context(|| format!("annotate.judge_rubric: cannot read {}", p.display()))?,
            ),
            None => None,
        };
        let load = Load { chat_template: files.1.as_deref(), dequantize: false };
        let model = Rc::new(RewardModel::load(&files.0, recipe.annotate.kind, rubric, &load)?);
        self.rewards.borrow_mut().insert(files, model.clone());
        Ok(model)
    }
}

/// A node's work items, cut into shards of `shard_size`; an item makes
/// `units(item)` progress units named `unit`.
struct Items<'a, T> {
    all: &'a [T],
    shard_size: usize,
    units: &'a dyn Fn(&T) -> usize,
    unit: &'a str,
}

/// What one shard's work produced.
struct ShardOut<R> {
    rows: Vec<R>,
    /// Items left out (too long for the model), counted.
    skipped: u64,
    tokens: usize,
}

/// Runs a node's work shard by shard (fixed slices of its input items). Each
/// shard is its own cache entry, keyed by the node's parameters and model
/// files and the shard's items, built under its own lock: a crash loses at
/// most the shard in flight, and processes sharing a cache split the work.
/// With a `slice`, shards of other slices are not built; if any is missing,
/// the node is [`Deferred`].
fn sharded<T: serde::Serialize, R: serde::Serialize + DeserializeOwned + Send + Sync + TextLen>(
    walk: &Walk,
    idx: usize,
    material: &KeyMaterial,
    items: Items<T>,
    slice: Option<Slice>,
    mut work: impl FnMut(&[T], &dyn Fn(usize)) -> Result<ShardOut<R>>,
) -> Result<(Vec<R>, u64)> {
    let node = &walk.graph.nodes[idx];
    let cache = walk.cache;
    let label = node.label();
    let chunks: Vec<&[T]> = items.all.chunks(items.shard_size).collect();
    let units = items.units;
    let bar = Progress::new(&label, items.all.iter().map(units).sum(), items.unit);
    let mut rows = Vec::with_capacity(items.all.len());
    let (mut skipped, mut pending) = (0u64, 0);
    for (i, chunk) in chunks.iter().enumerate() {
        let mut shard = material.clone();
        shard.stage = format!("{}-shard", material.stage);
        shard.inputs.retain(|k, _| node.files.contains_key(k));
        shard.inputs.insert("items".into(), Digest::of_json(chunk));
        let key = shard.key();
        let what = format!("{label} shard {}/{}", i + 1, chunks.len());
        let cached = |cache: &Cache| -> Result<Option<(Vec<R>, u64)>> {
            let Some(entry) = cache.get_action(&key)? else { return Ok(None) };
            let Some(bytes) = cache.get_object(&entry.outputs[0].digest)? else { return Ok(None) };
            let skipped = entry.stats.get("skipped_too_long").and_then(|v| v.as_u64()).unwrap_or(0);
            Ok(Some((simpo::parse_rows(&bytes, &what)?, skipped)))
        };
        // Held until the shard is stored, so no other process builds it meanwhile.
        let mut _lock = None;
        let hit = match cached(cache)? {
            Some(hit) => Some(hit),
            None if slice.is_some_and(|s| !s.owns(&key)) => {
                pending += 1;
                continue;
            }
            None => {
                _lock = Some(cache.lock(&key, &what)?);
                cached(cache)?
            }
        };
        let (shard_rows, shard_skipped) = match hit {
            Some(hit) => {
                bar.cached(chunk.iter().map(units).sum());
                hit
            }
            None => {
                // Still under the shard's lock.
                let started = Instant::now();
                let out = work(chunk, &|tokens| bar.unit_done(tokens))?;
                let secs = started.elapsed().as_secs_f64();
                let bytes = pyjson::to_vec(&out.rows, simpo::json_size(&out.rows))?;
                let digest = cache.put_object(&bytes)?;
                let stats = BTreeMap::from([("skipped_too_long".to_string(), out.skipped.into())]);
                let file = OutputFile { path: "shard.json".into(), digest, size: bytes.len() as u64 };
                cache.put_action(&ActionEntry { material: shard, node: what.clone(), outputs: vec![file], stats })?;
                // Only now is the shard safe from a crash.
                bar.log(&format!(
                    "{what}: {} rows, {} tokens in {secs:.1}s ({:.1} tokens/s)",
                    out.rows.len(),
                    out.tokens,
                    out.tokens as f64 / secs
                ));
                (out.rows, out.skipped)
            }
        };
        rows.extend(shard_rows);
        skipped += shard_skipped;
    }
    bar.finish();
    if pending > 0 {
        return Err(Deferred(pending).into());
    }
    Ok((rows, skipped))
}

/// Samples a seed's responses, shard by shard.
fn sample(walk: &Walk, models: &Models, idx: usize, material: &KeyMaterial, prompts: &[String]) -> Result<StageOutput> {
    let node = &walk.graph.nodes[idx];
    let g = &walk.graph.recipe.generate;
    let params = generate::Params {
        sampling: Sampling { temperature: g.temperature, top_p: g.top_p },
        max_tokens: g.max_tokens as usize,
        batch_size: g.batch_size,
        seed: node.seed.expect("generate nodes have a seed"),
        vllm_compat: g.vllm_compat,
    };
    let items = Items { all: prompts, shard_size: g.shard_size, units: &|_| 1, unit: "prompts" };
    let (rows, skipped) = sharded(walk, idx, material, items, models.slice, |chunk, progress| {
        let policy = models.policy(node)?;
        let mut tokens = 0;
        let (rows, skipped) = generate::sample(chunk, &policy, &params, |n| {
            tokens += n;
            progress(n);
        })?;
        Ok(ShardOut { rows, skipped: skipped as u64, tokens })
    })?;
    let n = rows.len();
    Ok(StageOutput::rows(&generate::file_name(params.seed), rows)?
        .stat("responses", n)
        .stat("skipped_too_long", skipped))
}

/// Scores a split's filtered rows with the reward model, shard by shard.
fn score(
    walk: &Walk,
    models: &Models,
    idx: usize,
    material: &KeyMaterial,
    rows: &[FilteredRow],
) -> Result<StageOutput> {
    let node = &walk.graph.nodes[idx];
    let a = &walk.graph.recipe.annotate;
    let responses = |r: &FilteredRow| r.all_generated_responses.len();
    let items = Items { all: rows, shard_size: a.shard_size, units: &responses, unit: "responses" };
    let (scored, skipped) = sharded(walk, idx, material, items, models.slice, |chunk, progress| {
        let model = models.reward(node, &walk.graph.recipe)?;
        let max_length = if a.max_length == 0 { model.context() } else { a.max_length };
        let params = annotate::Params { max_length, overflow: a.overflow, batch_size: a.batch_size };
        let out = annotate::score(chunk, &model, &params, progress)?;
        Ok(ShardOut { rows: out.rows, skipped: out.skipped as u64, tokens: out.tokens })
    })?;
    let n = scored.len();
    Ok(StageOutput::rows(annotate::FILE, scored)?.stat("rows", n).stat("skipped_too_long", skipped))
}

fn build_node(
    walk: &Walk,
    memory: &Outputs,
    models: &Models,
    idx: usize,
    material: &KeyMaterial,
) -> Result<StageOutput> {
    let graph = walk.graph;
    let node = &graph.nodes[idx];
    let recipe = &graph.recipe;
    match node.stage {
        Stage::Prompts => {
            let split = node.split.as_deref().expect("prompts nodes have a split");
            let source = walk.resolved(split);
            eprintln!("reading prompts for {split} from {}", source.describe);
            prompts::build(&source.files, &recipe.prompts.column, recipe.prompts.limit)
        }
        Stage::Generate => {
            let list: Arc<Vec<String>> = read_rows(walk, memory, node.deps[0], prompts::FILE)?;
            let seed = node.seed.expect("generate nodes have a seed");
            match node.files.get("generate.import") {
                Some(path) => generate::import(&list, path, seed),
                None => sample(walk, models, idx, material, &list),
            }
        }
        Stage::Filter => {
            let mut per_seed: Vec<Arc<Vec<DecodeRow>>> = Vec::with_capacity(node.deps.len());
            for &d in &node.deps {
                let seed = graph.nodes[d].seed.expect("filter reads generate nodes");
                per_seed.push(read_rows(walk, memory, d, &generate::file_name(seed))?);
            }
            let slices: Vec<&[DecodeRow]> = per_seed.iter().map(|r| r.as_slice()).collect();
            filter::build(&slices, recipe.filter.drop_identical)
        }
        Stage::Annotate => {
            let set: Arc<Vec<String>> = read_rows(walk, memory, node.deps[0], prompts::FILE)?;
            let rows: Arc<Vec<FilteredRow>> = read_rows(walk, memory, node.deps[1], filter::FILE)?;
            match node.files.get("annotate.import") {
                Some(path) => annotate::import(&set, &rows, path),
                None => score(walk, models, idx, material, &rows),
            }
        }
        Stage::Binarize => {
            let rows: Arc<Vec<ScoredRow>> = read_rows(walk, memory, node.deps[0], annotate::FILE)?;
            binarize::build(&rows, recipe.binarize.keep_ties)
        }
        Stage::Export => {
            let entry = |d: usize| walk.entries[d].as_ref().expect("deps are resolved before their users");
            let mut keys = Vec::new();
            let mut params = BTreeMap::new();
            for &d in &node.key_deps {
                keys.push((graph.nodes[d].label(), entry(d).key().to_hex()));
                params.extend(entry(d).material.params.clone());
            }
            params.remove("generate.seed");
            params.extend(node.params.clone());
            let mut splits = Vec::new();
            for (spec, &b) in graph.splits.iter().zip(&node.deps) {
                let of_split = |stage: Stage| {
                    node.key_deps
                        .iter()
                        .copied()
                        .find(|&d| graph.nodes[d].stage == stage && graph.nodes[d].split.as_deref() == Some(&spec.name))
                };
                let mut counts = of_split(Stage::Filter).map(|f| entry(f).stats.clone()).unwrap_or_default();
                counts.extend(entry(b).stats.clone());
                // Every seed skips the same too-long prompts: one seed's count is the split's.
                for (stage, name) in [(Stage::Generate, "generate"), (Stage::Annotate, "annotate")] {
                    if let Some(n) = of_split(stage).and_then(|d| entry(d).stats.get("skipped_too_long").cloned()) {
                        counts.insert(format!("skipped_too_long_{name}"), n);
                    }
                }
                let rows = read_rows(walk, memory, b, binarize::FILE)?;
                splits.push(export::SplitRows { name: spec.name.clone(), rows, counts });
            }
            export::build(&recipe.name, &splits, recipe.export.rows_per_file, params, keys)
        }
    }
}

/// What prefgen last wrote under `export.dir`, so an unchanged file is not
/// rewritten and a file no node produces any more is removed.
#[derive(Default, Serialize, Deserialize)]
struct Manifest {
    files: BTreeMap<String, Written>,
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
struct Written {
    digest: Digest,
    size: u64,
    mtime_ns: u128,
    /// A hard link to the cache object (else a copy).
    linked: bool,
}

const MANIFEST: &str = ".prefgen/manifest.json";

fn size_mtime(path: &Path) -> Option<(u64, u128)> {
    let meta = std::fs::metadata(path).ok()?;
    let t = meta.modified().ok()?.duration_since(SystemTime::UNIX_EPOCH).ok()?;
    Some((meta.len(), t.as_nanos()))
}

/// Places the selected nodes' outputs under `export.dir`, from the cache.
/// Each file appears atomically; the manifest is written last. Objects in
/// `fresh_objects` were written by this run and need no re-verification.
fn materialise(
    graph: &Graph,
    cache: &Cache,
    entries: &[Option<ActionEntry>],
    selected: &[bool],
    fresh_objects: &BTreeSet<Digest>,
) -> Result<usize> {
    let dir = PathBuf::from(&graph.recipe.export.dir);
    let tmp = dir.join(".prefgen/tmp");
    let unwritable =
        |e: &dyn std::fmt::Display| anyhow::anyhow!("export.dir {}: cannot write there: {e}", dir.display());
    std::fs::create_dir_all(dir.join(".prefgen")).map_err(|e| unwritable(&e))?;
    let old: Manifest =
        std::fs::read(dir.join(MANIFEST)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    let mut new = Manifest::default();
    let mut written = 0;
    for (idx, node) in graph.nodes.iter().enumerate().filter(|(i, _)| selected[*i]) {
        let entry = entries[idx].as_ref().expect("selected nodes are resolved");
        if node.stage == Stage::Prompts {
            continue; // the prompt list is an internal artifact
        }
        for out in &entry.outputs {
            let rel = node.out_dir.join(&out.path).to_string_lossy().replace('\\', "/");
            let dest = dir.join(&rel);
            let unchanged = old.files.get(&rel).is_some_and(|w| {
                w.digest == out.digest
                    && size_mtime(&dest) == Some((w.size, w.mtime_ns))
                    && (!w.linked || cache.is_link_to(&dest, &out.digest))
            });
            let linked = if unchanged {
                old.files[&rel].linked
            } else {
                std::fs::create_dir_all(dest.parent().expect("files are inside export.dir"))
                    .map_err(|e| unwritable(&e))?;
                let placed = cache
                    .materialise(&out.digest, &dest, &tmp, fresh_objects.contains(&out.digest))
                    .map_err(|e| unwritable(&e))?;
                written += 1;
                placed.ok_or_else(|| Damaged(out.digest.short(), entry.node.clone()))?
            };
            let (size, mtime_ns) =
                size_mtime(&dest).with_context(|| format!("{} vanished after writing", dest.display()))?;
            new.files.insert(rel, Written { digest: out.digest, size, mtime_ns, linked });
        }
    }
    if selected.iter().all(|s| *s) {
        for (rel, w) in &old.files {
            let path = dir.join(rel);
            // Remove only what prefgen wrote and nobody changed since.
            if !new.files.contains_key(rel) && size_mtime(&path) == Some((w.size, w.mtime_ns)) {
                let _ = std::fs::remove_file(path);
                written += 1;
            }
        }
    } else {
        for (rel, w) in old.files {
            new.files.entry(rel).or_insert(w);
        }
    }
    let bytes = serde_json::to_vec_pretty(&new)?;
    if std::fs::read(dir.join(MANIFEST)).ok().as_deref() != Some(bytes.as_slice()) {
        write_atomic_in(&tmp, &dir.join(MANIFEST), &bytes, FILE_MODE).map_err(|e| unwritable(&e))?;
    }
    Ok(written)
}
