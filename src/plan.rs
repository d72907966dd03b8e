//! The DAG and its keys: which nodes a recipe has, what each depends on, the
//! action key of each, and whether the cache already holds its output.
//!
//! ```text
//! prompts[s] -> generate[s/seed=k] (one per seed) -> filter[s] -> annotate[s] -> binarize[s] -> export
//! ```
//! for every output split `s`; `export` gathers all splits, and records every
//! node's key (so its card names them all).

use crate::cache::{ActionEntry, Cache, KeyMaterial};
use crate::digest::Digest;
use crate::recipe::{Recipe, SplitSpec};
use crate::stages::{annotate, binarize, export, filter, generate, prompts};
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    Prompts,
    Generate,
    Filter,
    Annotate,
    Binarize,
    Export,
}

impl Stage {
    pub const ALL: [Stage; 6] =
        [Stage::Prompts, Stage::Generate, Stage::Filter, Stage::Annotate, Stage::Binarize, Stage::Export];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Prompts => "prompts",
            Stage::Generate => "generate",
            Stage::Filter => "filter",
            Stage::Annotate => "annotate",
            Stage::Binarize => "binarize",
            Stage::Export => "export",
        }
    }

    /// Bumped in a stage's file when its code changes what it produces.
    pub fn version(self) -> u32 {
        match self {
            Stage::Prompts => prompts::VERSION,
            Stage::Generate => generate::VERSION,
            Stage::Filter => filter::VERSION,
            Stage::Annotate => annotate::VERSION,
            Stage::Binarize => binarize::VERSION,
            Stage::Export => export::VERSION,
        }
    }
}

/// One node of the DAG.
#[derive(Debug, Clone)]
pub struct Node {
    pub stage: Stage,
    /// The output split (None for `export`, which gathers them all).
    pub split: Option<String>,
    pub seed: Option<u64>,
    /// Indices of the nodes whose outputs this one reads (always earlier ones).
    pub deps: Vec<usize>,
    /// Earlier nodes whose keys and counts (not outputs) this one records:
    /// `export` lists every node so the card names every key.
    pub key_deps: Vec<usize>,
    /// Recipe key -> value, for every key that can change the output.
    pub params: BTreeMap<String, Value>,
    /// Files outside the cache that the node reads (imports, model files), by
    /// the recipe key that names them.
    pub files: BTreeMap<String, PathBuf>,
    /// Where its files go under `export.dir`.
    pub out_dir: PathBuf,
}

impl Node {
    /// `filter[train]`, `generate[train/seed=13]`, `export`.
    pub fn label(&self) -> String {
        match (&self.split, self.seed) {
            (Some(s), Some(seed)) => format!("{}[{s}/seed={seed}]", self.stage.name()),
            (Some(s), None) => format!("{}[{s}]", self.stage.name()),
            _ => self.stage.name().to_string(),
        }
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
        let mut nodes: Vec<Node> = Vec::new();
        let mut push = |n: Node| {
            nodes.push(n);
            nodes.len() - 1
        };
        let (g, a) = (&recipe.generate, &recipe.annotate);
        let mut export_reads = Vec::new();
        // Resolved once: a hub id may mean a call to the hub.
        let policy = match (&g.import, &g.model) {
            (None, Some(model)) => Some(model_path(model, g.revision.as_deref())?),
            _ => None,
        };
        let reward = match (&a.import, &a.model) {
            (None, Some(model)) => Some(model_path(model, a.revision.as_deref())?),
            _ => None,
        };
        for spec in &splits {
            let split = Some(spec.name.clone());
            let out_dir = recipe.json_dir(&spec.name);
            let node = |stage, seed, deps, params, files| Node {
                stage,
                split: split.clone(),
                seed,
                deps,
                key_deps: vec![],
                params,
                files,
                out_dir: out_dir.clone(),
            };
            let p = push(node(
                Stage::Prompts,
                None,
                vec![],
                BTreeMap::from([
                    ("prompts.column".into(), json!(recipe.prompts.column)),
                    ("prompts.limit".into(), json!(recipe.prompts.limit)),
                ]),
                BTreeMap::new(),
            ));
            let mut gens = Vec::new();
            for &seed in &g.seeds {
                let (params, files) = match (&g.import, &g.model) {
                    (Some(pattern), _) => {
                        let file = PathBuf::from(generate::import_path(pattern, seed, &spec.name));
                        (
                            BTreeMap::from([("generate.seed".into(), json!(seed))]),
                            BTreeMap::from([("generate.import".into(), file)]),
                        )
                    }
                    (None, Some(_)) => {
                        let path = policy.clone().expect("resolved above when generate.model is set");
                        let params = BTreeMap::from([
                            ("generate.seed".into(), json!(seed)),
                            ("generate.temperature".into(), json!(g.temperature)),
                            ("generate.top_p".into(), json!(g.top_p)),
                            ("generate.max_tokens".into(), json!(g.max_tokens)),
                            ("generate.vllm_compat".into(), json!(g.vllm_compat)),
                            ("generate.sampler_version".into(), json!(generate::SAMPLER_VERSION)),
                        ]);
                        let mut files = BTreeMap::from([("generate.model".into(), path)]);
                        if let Some(t) = &g.chat_template {
                            files.insert("generate.chat_template".into(), PathBuf::from(t));
                        }
                        (params, files)
                    }
                    (None, None) => unreachable!("validation requires generate.model or generate.import"),
                };
                gens.push(push(node(Stage::Generate, Some(seed), vec![p], params, files)));
            }
            let f = push(node(
                Stage::Filter,
                None,
                gens,
                BTreeMap::from([
                    ("generate.seeds".into(), json!(g.seeds)),
                    ("filter.drop_identical".into(), json!(recipe.filter.drop_identical)),
                ]),
                BTreeMap::new(),
            ));
            let (params, files) = match &a.import {
                Some(pattern) => (
                    BTreeMap::new(),
                    BTreeMap::from([("annotate.import".into(), PathBuf::from(pattern.replace("{split}", &spec.name)))]),
                ),
                None => {
                    let model = reward.clone().expect("resolved above when annotate.model is set");
                    let mut files = BTreeMap::from([("annotate.model".into(), model)]);
                    for (key, path) in
                        [("annotate.chat_template", &a.chat_template), ("annotate.judge_rubric", &a.judge_rubric)]
                    {
                        if let Some(path) = path {
                            files.insert(key.into(), PathBuf::from(path));
                        }
                    }
                    let params = BTreeMap::from([
                        ("annotate.kind".into(), json!(a.kind)),
                        ("annotate.max_length".into(), json!(a.max_length)),
                        ("annotate.overflow".into(), json!(a.overflow)),
                        ("annotate.scorer_version".into(), json!(annotate::SCORER_VERSION)),
                    ]);
                    (params, files)
                }
            };
            let an = push(node(Stage::Annotate, None, vec![p, f], params, files));
            let b = push(node(
                Stage::Binarize,
                None,
                vec![an],
                BTreeMap::from([("binarize.keep_ties".into(), json!(recipe.binarize.keep_ties))]),
                BTreeMap::new(),
            ));
            export_reads.push(b);
        }
        let all: Vec<usize> = (0..nodes.len()).collect();
        nodes.push(Node {
            stage: Stage::Export,
            split: None,
            seed: None,
            deps: export_reads,
            key_deps: all,
            params: BTreeMap::from([
                ("name".into(), json!(recipe.name)),
                ("export.rows_per_file".into(), json!(recipe.export.rows_per_file)),
            ]),
            files: BTreeMap::new(),
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
                wanted[i] |= n.stage == stage;
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
/// there unless `HF_HUB_OFFLINE` is set).
fn model_path(model: &str, revision: Option<&str>) -> Result<PathBuf> {
    let path = PathBuf::from(model);
    if path.exists() {
        return Ok(path);
    }
    if !crate::recipe::looks_like_hub_id(model) {
        bail!("generate.model: {model} does not exist (a .gguf file, a model folder, or a hub id)");
    }
    let revision = revision.unwrap_or("main");
    let wanted = |files: &[String]| -> Result<Vec<String>> {
        let wanted: Vec<String> = files
            .iter()
            .filter(|f| {
                matches!(
                    f.as_str(),
                    "config.json"
                        | "generation_config.json"
                        | "tokenizer.json"
                        | "tokenizer_config.json"
                        | "chat_template.jinja"
                ) || f.ends_with(".safetensors")
                    || f.as_str() == "model.safetensors.index.json"
            })
            .cloned()
            .collect();
        if !wanted.iter().any(|f| f == "config.json") {
            bail!("generate.model: {model}@{revision} has no config.json");
        }
        Ok(wanted)
    };
    let (snapshot, _) = crate::hub::snapshot(hf_hub::RepoType::Model, model, revision, wanted)
        .map_err(|e| anyhow::anyhow!("generate.model: {e:#}"))?;
    Ok(snapshot.dir)
}

/// Whether a node's output is in the cache.
#[derive(Debug)]
pub enum Freshness {
    Fresh(ActionEntry),
    /// Its key is known but nothing is cached under it: why.
    Stale(KeyMaterial, String),
    /// Its key cannot be known yet: an input is itself stale.
    Blocked(String),
}

/// Walks a graph in order, computing keys from what is known so far.
pub struct Walk<'a> {
    pub graph: &'a Graph,
    pub cache: &'a Cache,
    /// The entry of each node once known (fresh, or built by the runner).
    pub entries: Vec<Option<ActionEntry>>,
    resolved: BTreeMap<String, prompts::Resolved>,
}

impl<'a> Walk<'a> {
    pub fn new(graph: &'a Graph, cache: &'a Cache) -> Walk<'a> {
        Walk { graph, cache, entries: vec![None; graph.nodes.len()], resolved: BTreeMap::new() }
    }

    /// The prompt source of a split, resolved once per walk.
    pub fn source(&mut self, split: &str) -> Result<&prompts::Resolved> {
        if !self.resolved.contains_key(split) {
            let spec = self.graph.splits.iter().find(|s| s.name == split).expect("nodes name recipe splits");
            let r = prompts::resolve(&spec.source, self.cache).with_context(|| format!("prompts for split {split}"))?;
            self.resolved.insert(split.to_string(), r);
        }
        Ok(&self.resolved[split])
    }

    /// The prompt source of a split that this walk has already resolved.
    pub fn resolved(&self, split: &str) -> &prompts::Resolved {
        &self.resolved[split]
    }

    /// What a node reads from outside the cache, as (recipe key, source,
    /// digest): its files (models, templates, imports) and, for `prompts`,
    /// its split's dataset. The source is what a lock shows: `org/name@commit`
    /// for a hub snapshot, else the path.
    pub fn externals(&mut self, idx: usize) -> Result<Vec<(String, String, Digest)>> {
        let node = &self.graph.nodes[idx];
        let mut out = Vec::new();
        for (name, path) in &node.files {
            if !path.exists() {
                bail!("{name}: {} does not exist (needed by {})", path.display(), node.label());
            }
            let source = crate::hub::describe(path).unwrap_or_else(|| path.display().to_string());
            out.push((name.clone(), source, self.cache.path_digest(path)?));
        }
        if node.stage == Stage::Prompts {
            let split = node.split.clone().expect("prompts nodes have a split");
            let source = self.source(&split)?;
            out.push((format!("prompts.dataset[{split}]"), source.describe.clone(), source.identity));
        }
        Ok(out)
    }

    /// A node's key material, or the label of a dep whose output is unknown.
    fn material(&mut self, idx: usize) -> Result<std::result::Result<KeyMaterial, String>> {
        let node = &self.graph.nodes[idx];
        let mut inputs = BTreeMap::new();
        let params = node.params.clone();
        for &d in &node.key_deps {
            let dep = &self.graph.nodes[d];
            let Some(entry) = &self.entries[d] else { return Ok(Err(dep.label())) };
            inputs.insert(format!("key {}", dep.label()), entry.key());
        }
        for &d in &node.deps {
            let dep = &self.graph.nodes[d];
            let Some(entry) = &self.entries[d] else { return Ok(Err(dep.label())) };
            for out in &entry.outputs {
                inputs.insert(format!("{}:{}", dep.label(), out.path), out.digest);
            }
        }
        for (name, _, digest) in self.externals(idx)? {
            // A split's dataset is keyed as `dataset` (the node names its split).
            inputs.insert(if name.starts_with("prompts.dataset") { "dataset".into() } else { name }, digest);
        }
        Ok(Ok(KeyMaterial { stage: node.stage.name().into(), version: node.stage.version(), params, inputs }))
    }

    /// Looks a node up in the cache.
    pub fn freshness(&mut self, idx: usize) -> Result<Freshness> {
        let material = match self.material(idx)? {
            Ok(m) => m,
            Err(dep) => return Ok(Freshness::Blocked(format!("needs {dep}, which is stale"))),
        };
        let key = material.key();
        if let Some(entry) = self.cache.get_action(&key)?
            && self.cache.has_outputs(&entry)?
        {
            return Ok(Freshness::Fresh(entry));
        }
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
}
