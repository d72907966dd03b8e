//! Executing a plan: build the stale nodes (each under a lock on its key),
//! then materialise the outputs under `export.dir`.

use crate::cache::{ActionEntry, Cache, OutputFile};
use crate::plan::{Freshness, Graph, Stage, Walk};
use crate::stages::{StageOutput, annotate, binarize, export, filter, generate, prompts};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

/// A cache object that failed verification while being read; the object was
/// removed, so walking the graph again rebuilds it.
#[derive(Debug, thiserror::Error)]
#[error("cache object {0} of {1} is damaged")]
struct Damaged(String, String);

/// What a run did.
#[derive(Debug, Default)]
pub struct Summary {
    pub built: Vec<String>,
    pub fresh: usize,
    /// Files (re)written under `export.dir`.
    pub written: usize,
}

/// Builds the selected nodes and everything stale that they need.
pub fn run(graph: &Graph, cache: &Cache, targets: &[String]) -> Result<Summary> {
    let selected = graph.select(targets)?;
    // A damaged object found mid-run is removed; the next walk rebuilds it.
    for _ in 0..3 {
        match run_once(graph, cache, &selected) {
            Err(e) if e.downcast_ref::<Damaged>().is_some() => eprintln!("{e}; rebuilding it"),
            other => return other,
        }
    }
    bail!("cache objects keep failing verification: is the disk under {} healthy?", cache.root().display())
}

fn run_once(graph: &Graph, cache: &Cache, selected: &[bool]) -> Result<Summary> {
    let mut walk = Walk::new(graph, cache);
    let mut summary = Summary::default();
    for idx in (0..graph.nodes.len()).filter(|&i| selected[i]) {
        let label = graph.nodes[idx].label();
        let (material, reason) = match walk.freshness(idx)? {
            Freshness::Fresh(entry) => {
                walk.entries[idx] = Some(entry);
                summary.fresh += 1;
                continue;
            }
            Freshness::Stale(material, reason) => (material, reason),
            Freshness::Blocked(why) => unreachable!("inputs are built before {label}: {why}"),
        };
        let key = material.key();
        let _lock = cache.lock(&key, &label)?;
        // Another process may have built it while we waited for the lock.
        if let Some(entry) = cache.get_action(&key)?
            && cache.has_outputs(&entry)?
        {
            walk.entries[idx] = Some(entry);
            summary.fresh += 1;
            continue;
        }
        eprintln!("building {label}: {reason}");
        let started = Instant::now();
        let output = build_node(&mut walk, idx).with_context(|| format!("building {label}"))?;
        let mut outputs = Vec::with_capacity(output.files.len());
        for (path, bytes) in &output.files {
            let digest = cache.put_object(bytes)?;
            outputs.push(OutputFile { path: path.clone(), digest, size: bytes.len() as u64 });
        }
        let entry = ActionEntry { material, node: label.clone(), outputs, stats: output.stats };
        cache.put_action(&entry)?;
        cache.set_last_build(&graph.ref_name(idx), &key)?;
        eprintln!("built {label} in {:.2}s{}", started.elapsed().as_secs_f64(), describe_stats(&entry));
        walk.entries[idx] = Some(entry);
        summary.built.push(label);
    }
    let full = selected.iter().all(|s| *s);
    summary.written = materialise(graph, cache, &walk.entries, selected, full)?;
    Ok(summary)
}

fn describe_stats(entry: &ActionEntry) -> String {
    if entry.stats.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = entry.stats.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!(" ({})", parts.join(", "))
}

/// The bytes of output `path` of node `dep`, verified.
fn read_output(walk: &Walk, dep: usize, path: &str) -> Result<Vec<u8>> {
    let entry = walk.entries[dep].as_ref().expect("deps are resolved before their users");
    let out = entry.output(path).with_context(|| format!("{} has no output {path}", entry.node))?;
    walk.cache.get_object(&out.digest)?.ok_or_else(|| Damaged(out.digest.short(), entry.node.clone()).into())
}

fn build_node(walk: &mut Walk, idx: usize) -> Result<StageOutput> {
    let graph = walk.graph;
    let node = &graph.nodes[idx];
    let recipe = &graph.recipe;
    match node.stage {
        Stage::Prompts => {
            let split = node.split.as_deref().expect("prompts nodes have a split");
            let source = walk.source(split)?;
            eprintln!("reading prompts for {split} from {}", source.describe);
            let files = source.files.clone();
            prompts::build(&files, &recipe.prompts.column, recipe.prompts.limit)
        }
        Stage::Generate => {
            let list = prompts::parse(&read_output(walk, node.deps[0], prompts::FILE)?)?;
            let seed = node.seed.expect("generate nodes have a seed");
            generate::import(&list, &node.files["import"], seed)
        }
        Stage::Filter => {
            let mut per_seed = Vec::with_capacity(node.deps.len());
            for &d in &node.deps {
                let seed = graph.nodes[d].seed.expect("filter reads generate nodes");
                per_seed.push(generate::parse(&read_output(walk, d, &generate::file_name(seed))?)?);
            }
            filter::build(&per_seed, recipe.filter.drop_identical)
        }
        Stage::Annotate => {
            let set = prompts::parse(&read_output(walk, node.deps[0], prompts::FILE)?)?;
            let rows = filter::parse(&read_output(walk, node.deps[1], filter::FILE)?)?;
            annotate::import(&set, &rows, &node.files["import"])
        }
        Stage::Binarize => {
            let rows = annotate::parse(&read_output(walk, node.deps[0], annotate::FILE)?)?;
            binarize::build(rows, recipe.binarize.keep_ties)
        }
        Stage::Export => {
            let mut splits = Vec::new();
            let mut keys = Vec::new();
            let mut params = BTreeMap::new();
            for &d in &node.deps {
                let dep = &graph.nodes[d];
                let entry = walk.entries[d].as_ref().expect("deps are resolved before their users");
                keys.push((dep.label(), entry.key().to_hex()));
                params.extend(entry.material.params.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            params.remove("generate.seed");
            params.extend(node.params.clone());
            for spec in &graph.splits {
                let find = |stage: Stage| {
                    node.deps.iter().copied().find(|&d| graph.nodes[d].stage == stage && graph.nodes[d].split.as_deref() == Some(&spec.name))
                        .expect("export depends on every split's nodes")
                };
                let (f, b) = (find(Stage::Filter), find(Stage::Binarize));
                let mut counts = walk.entries[f].as_ref().expect("resolved").stats.clone();
                counts.extend(walk.entries[b].as_ref().expect("resolved").stats.clone());
                let rows = binarize::parse(&read_output(walk, b, binarize::FILE)?)?;
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
    digest: crate::digest::Digest,
    size: u64,
    mtime_ns: u128,
}

const MANIFEST: &str = ".prefgen/manifest.json";

fn mtime_ns(path: &Path) -> Option<(u64, u128)> {
    let meta = std::fs::metadata(path).ok()?;
    let t = meta.modified().ok()?.duration_since(SystemTime::UNIX_EPOCH).ok()?;
    Some((meta.len(), t.as_nanos()))
}

/// Copies the selected nodes' outputs from the cache into `export.dir`.
/// Each file is written atomically; the manifest is written last.
fn materialise(graph: &Graph, cache: &Cache, entries: &[Option<ActionEntry>], selected: &[bool], full: bool) -> Result<usize> {
    let dir = PathBuf::from(&graph.recipe.export.dir);
    let unwritable = |e: std::io::Error| anyhow::anyhow!("export.dir {}: cannot write there: {e}", dir.display());
    std::fs::create_dir_all(dir.join(".prefgen")).map_err(unwritable)?;
    let old: Manifest = std::fs::read(dir.join(MANIFEST))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
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
                w.digest == out.digest && mtime_ns(&dest) == Some((w.size, w.mtime_ns))
            });
            if !unchanged {
                let bytes = cache.get_object(&out.digest)?.ok_or_else(|| Damaged(out.digest.short(), entry.node.clone()))?;
                std::fs::create_dir_all(dest.parent().expect("files are inside export.dir")).map_err(unwritable)?;
                crate::cache::tier::write_atomic_in(&dir.join(".prefgen/tmp"), &dest, &bytes).map_err(unwritable)?;
                written += 1;
            }
            let (size, mtime) = mtime_ns(&dest).with_context(|| format!("{} vanished after writing", dest.display()))?;
            new.files.insert(rel, Written { digest: out.digest, size, mtime_ns: mtime });
        }
    }
    if full {
        for (rel, w) in &old.files {
            let path = dir.join(rel);
            // Remove only what prefgen wrote and nobody changed since.
            if !new.files.contains_key(rel) && mtime_ns(&path) == Some((w.size, w.mtime_ns)) {
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
        crate::cache::tier::write_atomic_in(&dir.join(".prefgen/tmp"), &dir.join(MANIFEST), &bytes).map_err(unwritable)?;
    }
    Ok(written)
}
