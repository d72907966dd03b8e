//! The lock file beside a recipe (`recipes/x.toml` -> `recipes/x.lock`), as
//! Cargo.lock and dvc.lock are: what every external input resolved to (hub
//! commits, file digests) and every node's key and output digests. `run`
//! writes it; `run --locked` refuses inputs that resolve differently and
//! outputs that differ; `plan` shows the drift. Committing it pins a dataset.

use crate::cache::ActionEntry;
use crate::plan::{Freshness, Walk};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const VERSION: u32 = 2;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lock {
    pub version: u32,
    /// Recipe key (`generate.model`, `prompts.dataset[train]`, ...) -> what it
    /// resolved to.
    pub inputs: BTreeMap<String, Input>,
    /// Node label -> its key and outputs.
    pub nodes: BTreeMap<String, Built>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Input {
    /// `org/name@commit` for the hub, else the path the recipe gives.
    pub source: String,
    pub digest: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Built {
    pub key: String,
    /// Output path -> digest.
    pub outputs: BTreeMap<String, String>,
    /// The engines that computed it (sampled and scored nodes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub engines: Vec<String>,
}

/// Where a recipe's lock lives.
pub fn path_for(recipe: &Path) -> PathBuf {
    recipe.with_extension("lock")
}

impl Lock {
    /// The lock at `path`, if any. One of another version is an error when
    /// it is `needed` (`--locked`), and otherwise treated as absent (the run
    /// rewrites it).
    pub fn read(path: &Path, needed: bool) -> Result<Option<Lock>> {
        match std::fs::read(path) {
            Ok(bytes) => {
                #[derive(Deserialize)]
                struct Versioned {
                    version: u32,
                }
                let version = serde_json::from_slice::<Versioned>(&bytes)
                    .with_context(|| format!("{}: not a prefgen lock", path.display()))?
                    .version;
                if version != VERSION {
                    if needed {
                        bail!(
                            "{}: lock version {version}, and this prefgen writes {VERSION}: run without --locked to \
                             rewrite it",
                            path.display()
                        );
                    }
                    eprintln!("note: {} is a version {version} lock; this run rewrites it", path.display());
                    return Ok(None);
                }
                let lock: Lock = serde_json::from_slice(&bytes)
                    .with_context(|| format!("{}: not a prefgen lock", path.display()))?;
                Ok(Some(lock))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Writes the lock when it changed (a fresh rerun leaves it untouched).
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut text = serde_json::to_string_pretty(self)?;
        text.push('\n');
        if std::fs::read_to_string(path).is_ok_and(|old| old == text) {
            return Ok(());
        }
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        crate::cache::tier::write_atomic_in(dir, path, text.as_bytes(), crate::cache::tier::FILE_MODE)
            .with_context(|| format!("cannot write {}", path.display()))
    }

    /// The lock after a run: the inputs and entries of the nodes the walk
    /// knows; after a partial run (some targets), the rest as `old` had them.
    pub fn current(walk: &mut Walk, old: Option<&Lock>) -> Result<Lock> {
        let known: Vec<bool> = walk.entries.iter().map(Option::is_some).collect();
        let partial = known.contains(&false);
        let mut nodes = old.filter(|_| partial).map(|l| l.nodes.clone()).unwrap_or_default();
        for (node, entry) in walk.graph.nodes.iter().zip(&walk.entries) {
            if let Some(entry) = entry {
                nodes.insert(node.label(), built(entry));
            }
        }
        nodes.retain(|label, _| walk.graph.nodes.iter().any(|n| &n.label() == label));
        let mut inputs = inputs(walk, &known)?;
        if let Some(old) = old.filter(|_| partial) {
            for (name, input) in &old.inputs {
                inputs.entry(name.clone()).or_insert_with(|| input.clone());
            }
        }
        Ok(Lock { version: VERSION, inputs, nodes })
    }

    /// How the `selected` nodes depart from this lock as far as can be known
    /// without building: inputs that resolve differently, and nodes whose key
    /// (or, for fresh nodes, outputs) differ: `survey` is the walk's
    /// [`Walk::survey`] of the selected nodes.
    pub fn drift(&self, walk: &mut Walk, survey: &[Option<Freshness>]) -> Result<Vec<String>> {
        let selected: Vec<bool> = survey.iter().map(Option::is_some).collect();
        let now = inputs(walk, &selected)?;
        let mut out = self.input_drift(&now, !selected.contains(&false));
        for (idx, freshness) in survey.iter().enumerate() {
            let Some(freshness) = freshness else { continue };
            let label = walk.graph.nodes[idx].label();
            let now = match freshness {
                Freshness::Fresh(entry, _) => built(entry),
                Freshness::Stale(material, _) => {
                    Built { key: material.key().to_hex(), outputs: BTreeMap::new(), engines: vec![] }
                }
                Freshness::Blocked(_) => continue,
            };
            out.extend(self.node_drift(&label, &now));
        }
        Ok(out)
    }

    /// How a finished run departs from this lock.
    pub fn drift_after_run(&self, now: &Lock) -> Vec<String> {
        let mut out = self.input_drift(&now.inputs, true);
        for (label, built) in &now.nodes {
            out.extend(self.node_drift(label, built));
        }
        out
    }

    /// `complete`: `now` covers the whole recipe, so a locked input it lacks
    /// is gone from the recipe.
    fn input_drift(&self, now: &BTreeMap<String, Input>, complete: bool) -> Vec<String> {
        let show = |i: &Input| format!("{} ({})", i.source, &i.digest[..12.min(i.digest.len())]);
        let mut out = Vec::new();
        for (name, was) in &self.inputs {
            match now.get(name) {
                Some(is) if is == was => {}
                Some(is) => out.push(format!("{name}: the lock has {}, it now resolves to {}", show(was), show(is))),
                None if complete => out.push(format!("{name}: in the lock, no longer in the recipe")),
                None => {}
            }
        }
        for (name, is) in now {
            if !self.inputs.contains_key(name) {
                out.push(format!("{name}: not in the lock (now {})", show(is)));
            }
        }
        out
    }

    fn node_drift(&self, label: &str, now: &Built) -> Option<String> {
        let was = self.nodes.get(label)?;
        if was.key != now.key {
            Some(format!("{label}: its key differs from the lock's"))
        } else if !now.outputs.is_empty() && was.outputs != now.outputs {
            let engines = if !now.engines.is_empty() && now.engines != was.engines {
                format!(
                    ": another engine computed them ({}; the lock's: {})",
                    now.engines.join(", "),
                    if was.engines.is_empty() { "none recorded".to_string() } else { was.engines.join(", ") }
                )
            } else {
                String::new()
            };
            Some(format!("{label}: same key, but its outputs differ from the lock's{engines}"))
        } else {
            None
        }
    }
}

fn built(entry: &ActionEntry) -> Built {
    Built {
        key: entry.key().to_hex(),
        outputs: entry.outputs.iter().map(|o| (o.path.clone(), o.digest.to_hex())).collect(),
        engines: entry.engines.clone(),
    }
}

/// The external inputs of the `nodes` by recipe key. A key that resolves the
/// same for every node (a model) appears once; one that differs per node (an
/// import pattern with `{seed}`) once per file, named with its source.
fn inputs(walk: &mut Walk, nodes: &[bool]) -> Result<BTreeMap<String, Input>> {
    let mut by_name: BTreeMap<String, Vec<Input>> = BTreeMap::new();
    for idx in (0..walk.graph.nodes.len()).filter(|&i| nodes[i]) {
        for r in walk.externals(idx)? {
            // A split's prompt source is named by its split.
            let name = match (&walk.graph.nodes[idx].spec.split, r.per_split) {
                (Some(split), true) => format!("{}[{split}]", r.key),
                _ => r.key,
            };
            let found = by_name.entry(name).or_default();
            let input = Input { source: r.source, digest: r.digest.to_hex() };
            if !found.contains(&input) {
                found.push(input);
            }
        }
    }
    let mut out = BTreeMap::new();
    for (name, found) in by_name {
        if let [one] = &found[..] {
            out.insert(name, one.clone());
        } else {
            for input in found {
                out.insert(format!("{name} {}", input.source), input);
            }
        }
    }
    Ok(out)
}
