//! The DAG and its keys: which nodes a recipe has, what each depends on, the
//! action key of each, and whether the cache already holds its output.
//!
//! ```text
//! prompts[s] -> generate[s/seed=k] (one per seed) -> filter[s] -> annotate[s] -> binarize[s] -> export
//! ```
//! for every output split `s`; `export` gathers all splits and records every
//! node (so its card names them all). What a node's key holds comes from its
//! stage (`stages::keyed`); this module never names a recipe key.

use crate::cache::{ActionEntry, Cache, Found, KeyMaterial};
use crate::digest::Digest;
use crate::recipe::{self, Recipe, SplitSpec};
use crate::stages::export::{Provenance, Recorded};
use crate::stages::{self, At, External, NodeSpec, Stage, prompts};
use anyhow::{Context, Result, anyhow, bail};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One node of the DAG.
#[derive(Debug, Clone)]
pub struct Node {
    pub spec: NodeSpec,
    /// Indices of the nodes whose outputs this one reads (always earlier ones).
    pub deps: Vec<usize>,
    /// Earlier nodes that this one records (their keys, counts, sources and
    /// engines), not reads: `export` lists every node so its card names them.
    pub key_deps: Vec<usize>,
    /// Where its files go under `export.dir`.
    pub out_dir: PathBuf,
}

impl Node {
    pub fn stage(&self) -> Stage {
        self.spec.stage
    }

    /// `filter[train]`, `generate[train/seed=13]`, `export`.
    pub fn label(&self) -> String {
        self.spec.label()
    }
}

/// A recipe's nodes in dependency order.
pub struct Graph {
    pub recipe: Recipe,
    pub splits: Vec<SplitSpec>,
    pub nodes: Vec<Node>,
}

impl Graph {
    pub fn new(recipe: Recipe) -> Result<Graph> {
        let splits = recipe.splits();
        let (g, a) = (&recipe.generate, &recipe.annotate);
        // Resolved once: a hub id may mean a call to the hub.
        let resolve = |key: &str, model: &Option<String>, import: &Option<String>, revision: &Option<String>| match (
            import, model,
        ) {
            (None, Some(model)) => model_path(key, model, revision.as_deref()).map(Some),
            _ => Ok(None),
        };
        let policy = resolve(recipe::generate::model, &g.model, &g.import, &g.revision)?;
        // A hosted judge is only a name: there are no files to resolve.
        let reward = match a.hosted_name() {
            Some(_) => None,
            None => resolve(recipe::annotate::model, &a.model, &a.import, &a.revision)?,
        };
        let mut nodes: Vec<Node> = Vec::new();
        let mut push = |n: Node| {
            nodes.push(n);
            nodes.len() - 1
        };
        let mut export_reads = Vec::new();
        for spec in &splits {
            let at = At { recipe: &recipe, split: &spec.name, policy: policy.as_deref(), reward: reward.as_deref() };
            let out_dir = recipe.json_dir(&spec.name);
            let node = |stage, seed, deps| Node {
                spec: NodeSpec { stage, split: Some(spec.name.clone()), seed, keyed: stages::keyed(stage, &at, seed) },
                deps,
                key_deps: vec![],
                out_dir: out_dir.clone(),
            };
            let p = push(node(Stage::Prompts, None, vec![]));
            let gens: Vec<usize> =
                g.seeds.iter().map(|&seed| push(node(Stage::Generate, Some(seed), vec![p]))).collect();
            let f = push(node(Stage::Filter, None, gens));
            let an = push(node(Stage::Annotate, None, vec![p, f]));
            export_reads.push(push(node(Stage::Binarize, None, vec![an])));
        }
        let all: Vec<usize> = (0..nodes.len()).collect();
        let at = At { recipe: &recipe, split: "", policy: None, reward: None };
        nodes.push(Node {
            spec: NodeSpec {
                stage: Stage::Export,
                split: None,
                seed: None,
                keyed: stages::keyed(Stage::Export, &at, None),
            },
            deps: export_reads,
            key_deps: all,
            out_dir: PathBuf::new(),
        });
        Ok(Graph { recipe, splits, nodes })
    }

    /// The nodes that building `targets` (stage names; empty = all) needs.
    pub fn select(&self, targets: &[String]) -> Result<Vec<bool>> {
        let mut wanted = vec![targets.is_empty(); self.nodes.len()];
        for t in targets {
            let Some(stage) = Stage::ALL.into_iter().find(|s| s.name() == t) else {
                let names: Vec<&str> = Stage::ALL.iter().map(|s| s.name()).collect();
                bail!("unknown target {t:?}: the targets are {}", names.join(", "));
            };
            for (i, n) in self.nodes.iter().enumerate() {
                wanted[i] |= n.stage() == stage;
            }
        }
        for i in (0..self.nodes.len()).rev() {
            if wanted[i] {
                for &d in self.nodes[i].deps.iter().chain(&self.nodes[i].key_deps) {
                    wanted[d] = true;
                }
            }
        }
        Ok(wanted)
    }

    /// The name under which a node's last build is remembered.
    pub fn ref_name(&self, idx: usize) -> String {
        format!("{}/{}", self.recipe.name, self.nodes[idx].label())
    }
}

/// A model as a local path: a `.gguf` file or folder as given, or a hub id
/// resolved to its snapshot folder in the Hugging Face cache (downloaded
/// there unless `HF_HUB_OFFLINE` is set). `key` names the recipe key.
fn model_path(key: &str, model: &str, revision: Option<&str>) -> Result<PathBuf> {
    let path = PathBuf::from(model);
    if path.exists() {
        return Ok(path);
    }
    if !recipe::looks_like_hub_id(model) {
        bail!("{key}: {model} does not exist (a .gguf file, a model folder, or a hub id)");
    }
    let revision = revision.unwrap_or("main");
    let wanted = |files: &[String]| -> Result<Vec<String>> {
        let wanted = crate::infer::files::to_download(files);
        if !wanted.iter().any(|f| f == crate::infer::files::CONFIG) {
            bail!("{key}: {model}@{revision} has no {}", crate::infer::files::CONFIG);
        }
        Ok(wanted)
    };
    let (snapshot, _) =
        crate::hub::snapshot(hf_hub::RepoType::Model, model, revision, wanted).map_err(|e| anyhow!("{key}: {e:#}"))?;
    Ok(snapshot.dir)
}

/// Whether a node's output is in the cache.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per node: its size does not matter
pub enum Freshness {
    /// Cached, and where it was found.
    Fresh(ActionEntry, Found),
    /// Its key is known but nothing is cached under it: why.
    Stale(KeyMaterial, String),
    /// Its key cannot be known yet: an input is itself stale.
    Blocked(String),
}

impl Freshness {
    /// A node whose input `dep` is stale.
    fn blocked(dep: &str) -> Freshness {
        Freshness::Blocked(format!("needs {dep}, which is stale"))
    }
}

/// One external input as resolved: recipe key, what it is (`org/name@commit`
/// or a path), its identity digest.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub key: String,
    pub source: String,
    pub digest: Digest,
    /// Whether it is a split's prompt source (the lock names those per split).
    pub per_split: bool,
}

/// Walks a graph in order, computing keys from what is known so far.
pub struct Walk<'a> {
    pub graph: &'a Graph,
    pub cache: &'a Cache,
    /// The entry of each node once known (fresh, or built by the runner).
    pub entries: Vec<Option<ActionEntry>>,
    sources: BTreeMap<String, prompts::Resolved>,
    externals: Vec<Option<Vec<Resolved>>>,
}

impl<'a> Walk<'a> {
    pub fn new(graph: &'a Graph, cache: &'a Cache) -> Walk<'a> {
        Walk {
            graph,
            cache,
            entries: vec![None; graph.nodes.len()],
            sources: BTreeMap::new(),
            externals: vec![None; graph.nodes.len()],
        }
    }

    /// The prompt source of a split, resolved once per walk.
    fn source(&mut self, split: &str, source: &recipe::PromptSource) -> Result<&prompts::Resolved> {
        if !self.sources.contains_key(split) {
            let r = prompts::resolve(source, self.cache).with_context(|| format!("prompts for split {split}"))?;
            self.sources.insert(split.to_string(), r);
        }
        Ok(&self.sources[split])
    }

    /// The resolved files of a split's prompt source (once a walk has keyed it).
    pub fn source_files(&self, split: &str) -> &[PathBuf] {
        &self.sources[split].files
    }

    /// What a node reads from outside the cache, resolved once per walk.
    pub fn externals(&mut self, idx: usize) -> Result<Vec<Resolved>> {
        if let Some(done) = &self.externals[idx] {
            return Ok(done.clone());
        }
        let node = &self.graph.nodes[idx];
        let mut out = Vec::new();
        for (key, external) in &node.spec.keyed.externals {
            let described = |p: &Path| crate::hub::describe(p).unwrap_or_else(|| p.display().to_string());
            let exists = |p: &Path| {
                crate::input::kind(p).map(|_| ()).map_err(|e| anyhow!("{key}: {e} (needed by {})", node.label()))
            };
            let resolved = match external {
                External::File(p) => {
                    exists(p)?;
                    Resolved {
                        key: key.clone(),
                        source: described(p),
                        digest: self.cache.file_digest(p)?,
                        per_split: false,
                    }
                }
                External::Model(p) => {
                    exists(p)?;
                    let digest = self.cache.model_identity(p).map_err(|e| anyhow!("{key}: {e:#}"))?;
                    Resolved { key: key.clone(), source: described(p), digest, per_split: false }
                }
                External::Name(name) => Resolved {
                    key: key.clone(),
                    source: format!(
                        "{name}, a hosted model known only by this name (no local files: what the name serves may \
                         change without notice)"
                    ),
                    digest: Digest::of_json(&name),
                    per_split: false,
                },
                External::Prompts(source) => {
                    let split = node.spec.split.clone().expect("prompt sources belong to a split");
                    let r = self.source(&split, source)?;
                    Resolved { key: key.clone(), source: r.describe.clone(), digest: r.identity, per_split: true }
                }
            };
            out.push(resolved);
        }
        self.externals[idx] = Some(out.clone());
        Ok(out)
    }

    /// A node's key material, or the label of a dep whose output is unknown.
    fn material(&mut self, idx: usize) -> Result<std::result::Result<KeyMaterial, String>> {
        let node = &self.graph.nodes[idx];
        let mut inputs = BTreeMap::new();
        for &d in &node.key_deps {
            let Some(entry) = &self.entries[d] else { return Ok(Err(self.graph.nodes[d].label())) };
            let label = self.graph.nodes[d].label();
            inputs.insert(format!("key {label}"), entry.key());
            // What it records of a node beyond its key: the engines and the named sources.
            let engines = entry.engines.clone();
            let sources: Vec<(String, String)> = self.externals(d)?.into_iter().map(|r| (r.key, r.source)).collect();
            inputs.insert(format!("provenance {label}"), Digest::of_json(&(engines, sources)));
        }
        for &d in &node.deps {
            let Some(entry) = &self.entries[d] else { return Ok(Err(self.graph.nodes[d].label())) };
            for out in &entry.outputs {
                inputs.insert(format!("{}:{}", self.graph.nodes[d].label(), out.path), out.digest);
            }
        }
        for r in self.externals(idx)? {
            inputs.insert(r.key, r.digest);
        }
        let spec = &self.graph.nodes[idx].spec;
        Ok(Ok(KeyMaterial {
            stage: spec.stage.name().into(),
            version: spec.stage.version(),
            params: spec.keyed.params.clone(),
            inputs,
        }))
    }

    /// Looks a node up in the cache.
    pub fn freshness(&mut self, idx: usize) -> Result<Freshness> {
        let material = match self.material(idx)? {
            Ok(m) => m,
            Err(dep) => return Ok(Freshness::blocked(&dep)),
        };
        let hit = self.cache.lookup_built(&[material.key()])?.pop().flatten();
        self.judge(idx, material, hit)
    }

    /// Looks every selected node up, as `freshness` would in order, but a
    /// wave at a time: the nodes whose inputs are all decided are looked up
    /// together, so the round trips to a remote overlap. Fresh nodes'
    /// entries are kept in `entries`; unselected nodes are `None`.
    pub fn survey(&mut self, selected: &[bool]) -> Result<Vec<Option<Freshness>>> {
        let n = self.graph.nodes.len();
        let mut out: Vec<Option<Freshness>> = (0..n).map(|_| None).collect();
        loop {
            let ready: Vec<usize> = (0..n)
                .filter(|&i| selected[i] && out[i].is_none())
                .filter(|&i| {
                    let node = &self.graph.nodes[i];
                    node.deps.iter().chain(&node.key_deps).all(|&d| out[d].is_some())
                })
                .collect();
            if ready.is_empty() {
                return Ok(out);
            }
            let mut asked = Vec::new();
            for idx in ready {
                match self.material(idx)? {
                    Ok(m) => asked.push((idx, m)),
                    Err(dep) => out[idx] = Some(Freshness::blocked(&dep)),
                }
            }
            let keys: Vec<Digest> = asked.iter().map(|(_, m)| m.key()).collect();
            let hits = self.cache.lookup_built(&keys)?;
            for ((idx, material), hit) in asked.into_iter().zip(hits) {
                let freshness = self.judge(idx, material, hit)?;
                if let Freshness::Fresh(entry, _) = &freshness {
                    self.entries[idx] = Some(entry.clone());
                }
                out[idx] = Some(freshness);
            }
        }
    }

    /// Fresh when the lookup found it; otherwise stale, and why.
    fn judge(&self, idx: usize, material: KeyMaterial, hit: Option<(ActionEntry, Found)>) -> Result<Freshness> {
        if let Some((entry, found)) = hit {
            // Output paths are the stage's own: an entry naming any other path
            // is not one prefgen wrote. It is forgotten, as a damaged entry is
            // (best effort: the rebuild replaces it anyway), so no builder
            // takes it for one stored meanwhile, and the node is rebuilt.
            let spec = &self.graph.nodes[idx].spec;
            let Some(out) = stages::foreign_output(spec, &self.graph.recipe, &entry) else {
                return Ok(Freshness::Fresh(entry, found));
            };
            let reason = format!("its cached entry names {:?}, a file that its stage does not write", out.path);
            let _ = self.cache.remove_action(&entry.key(), &reason);
            return Ok(Freshness::Stale(material, reason));
        }
        let key = material.key();
        let reason = match self.cache.last_build(&self.graph.ref_name(idx))? {
            None => "never built".to_string(),
            Some(old) if old.key() == key => "its output is missing from the cache".to_string(),
            Some(old) => {
                let changes = material.changes_since(&old.material);
                if changes.is_empty() { "its inputs changed".to_string() } else { changes.join("; ") }
            }
        };
        Ok(Freshness::Stale(material, reason))
    }

    /// What node `idx` records of its key deps (all known by then).
    pub fn provenance(&mut self, idx: usize) -> Result<Provenance> {
        let mut nodes = Vec::new();
        for d in self.graph.nodes[idx].key_deps.clone() {
            let node = &self.graph.nodes[d];
            let entry = self.entries[d].as_ref().expect("key deps are resolved before their users");
            let (label, stage, split) = (node.label(), node.stage(), node.spec.split.clone());
            let (key, params, counts, engines) =
                (entry.key(), entry.material.params.clone(), entry.counts.clone(), entry.engines.clone());
            let sources = self.externals(d)?.into_iter().map(|r| (r.key, r.source, r.digest)).collect();
            nodes.push(Recorded { label, stage, split, key, params, counts, engines, sources });
        }
        Ok(Provenance { nodes })
    }
}
