//! The stages: pure functions from input artifacts and parameters to output
//! files. Each stage file says what enters its key (from its recipe
//! section's declarations, never a key typed by hand) and how its output is
//! computed. Keys, caching, locking, sharding and progress live in the
//! runner; this module is the one interface the planner and the runner reach
//! stages through: [`keyed`] for what a node's key holds, [`work`] for how its
//! output is made.

pub mod annotate;
pub mod binarize;
pub mod export;
pub mod filter;
pub mod generate;
pub mod prompts;

use crate::cache::{ActionEntry, OutputFile};
use crate::digest::Digest;
use crate::formats::pyjson;
use crate::formats::simpo::{self, BinarizedRow, DecodeRow, FilteredRow, ScoredRow, TextLen};
use crate::infer::Policy;
use crate::infer::chat::Chat;
use crate::infer::reward::{Kind, RewardModel};
use crate::infer::server::{self, Server};
use crate::recipe::{PromptSource, Recipe};
use anyhow::{Result, bail};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
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

    /// The stage named `name`.
    pub fn from_name(name: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// Something a node reads from outside the cache, keyed by what it holds.
#[derive(Debug, Clone, PartialEq)]
pub enum External {
    /// A file, by its contents (an import, a template, a rubric).
    File(PathBuf),
    /// A model (a `.gguf` file or a model folder), by the files its loader reads.
    Model(PathBuf),
    /// A hosted model with no local files, by its name alone.
    Name(String),
    /// A split's prompt source: local files by contents, a hub dataset by
    /// commit and file names.
    Prompts(PromptSource),
}

impl External {
    /// The local path it names (None for a hub dataset).
    pub fn path(&self) -> Option<&Path> {
        match self {
            External::File(p) | External::Model(p) => Some(p),
            External::Prompts(PromptSource::Local { path, .. }) => Some(path),
            External::Prompts(PromptSource::Hub { .. }) | External::Name(_) => None,
        }
    }
}

/// What a node's action key holds besides the artifacts it reads:
/// parameter values and external inputs, each by the recipe key that set it.
#[derive(Debug, Clone, Default)]
pub struct Keyed {
    pub params: BTreeMap<String, Value>,
    pub externals: BTreeMap<String, External>,
}

/// A node as the stages see it: which stage, for which split and seed, and
/// what its key holds.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub stage: Stage,
    /// The output split (None for `export`, which gathers them all).
    pub split: Option<String>,
    pub seed: Option<u64>,
    pub keyed: Keyed,
}

impl NodeSpec {
    /// `filter[train]`, `generate[train/seed=13]`, `export`.
    pub fn label(&self) -> String {
        match (&self.split, self.seed) {
            (Some(s), Some(seed)) => format!("{}[{s}/seed={seed}]", self.stage.name()),
            (Some(s), None) => format!("{}[{s}]", self.stage.name()),
            _ => self.stage.name().to_string(),
        }
    }

    /// The path of the external input set by `key`.
    pub fn external(&self, key: &str) -> Option<&Path> {
        self.keyed.externals.get(key).and_then(External::path)
    }
}

/// Where a node stands in the recipe: what its key is computed from.
pub struct At<'a> {
    pub recipe: &'a Recipe,
    pub split: &'a str,
    /// The policy and the reward model as local paths, resolved once per graph.
    pub policy: Option<&'a Path>,
    pub reward: Option<&'a Path>,
}

/// What a node of `stage` keys, as its stage declares it.
pub fn keyed(stage: Stage, at: &At, seed: Option<u64>) -> Keyed {
    match stage {
        Stage::Prompts => prompts::keyed(at),
        Stage::Generate => generate::keyed(at, seed.expect("generate nodes have a seed")),
        Stage::Filter => filter::keyed(at),
        Stage::Annotate => annotate::keyed(at),
        Stage::Binarize => binarize::keyed(at),
        Stage::Export => export::keyed(at),
    }
}

/// A stage's rows in typed form.
#[derive(Clone)]
pub enum Rows {
    Prompts(Arc<Vec<String>>),
    Decoded(Arc<Vec<DecodeRow>>),
    Filtered(Arc<Vec<FilteredRow>>),
    Scored(Arc<Vec<ScoredRow>>),
    Binarized(Arc<Vec<BinarizedRow>>),
}

/// A row type a stage writes: how its rows travel as [`Rows`].
pub trait Row: Serialize + DeserializeOwned + TextLen + Send + Sync + 'static {
    fn wrap(rows: Arc<Vec<Self>>) -> Rows;
    fn unwrap(rows: &Rows) -> Option<Arc<Vec<Self>>>;
}

macro_rules! row_type {
    ($t:ty, $variant:ident) => {
        impl Row for $t {
            fn wrap(rows: Arc<Vec<Self>>) -> Rows {
                Rows::$variant(rows)
            }
            fn unwrap(rows: &Rows) -> Option<Arc<Vec<Self>>> {
                match rows {
                    Rows::$variant(r) => Some(r.clone()),
                    _ => None,
                }
            }
        }
    };
}
row_type!(String, Prompts);
row_type!(DecodeRow, Decoded);
row_type!(FilteredRow, Filtered);
row_type!(ScoredRow, Scored);
row_type!(BinarizedRow, Binarized);

impl Rows {
    /// The rows of a stage's one JSON output, parsed from the bytes prefgen wrote.
    pub fn parse(stage: Stage, bytes: &[u8], what: &str) -> Result<Rows> {
        fn of<T: Row>(bytes: &[u8], what: &str) -> Result<Rows> {
            Ok(T::wrap(Arc::new(simpo::parse_rows(bytes, what)?)))
        }
        match stage {
            Stage::Prompts => of::<String>(bytes, what),
            Stage::Generate => of::<DecodeRow>(bytes, what),
            Stage::Filter => of::<FilteredRow>(bytes, what),
            Stage::Annotate => of::<ScoredRow>(bytes, what),
            Stage::Binarize => of::<BinarizedRow>(bytes, what),
            Stage::Export => bail!("{what}: export writes no rows that another stage reads"),
        }
    }

    fn get<T: Row>(&self, what: &str) -> Arc<Vec<T>> {
        T::unwrap(self).unwrap_or_else(|| panic!("{what}: the planner wired an input of another type"))
    }
}

/// Counts a stage reports, for the build log and the card.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counts {
    /// Rows read from the prompt source.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_rows: Option<u64>,
    /// Distinct prompts among them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unique_prompts: Option<u64>,
    /// Prompts in the set (after `limit`), or entering `filter`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompts: Option<u64>,
    /// Responses a generate node produced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub responses: Option<u64>,
    /// Prompts (generate) or rows (annotate) left out as too long for the model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped_too_long: Option<u64>,
    /// Prompts whose responses were all identical.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identical: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropped_identical: Option<u64>,
    /// Rows entering `binarize`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows_in: Option<u64>,
    /// Rows whose scores are all equal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ties: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropped_ties: Option<u64>,
    /// Rows the stage wrote.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
    /// Rows of an imported score file that no filtered row used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub import_rows_unused: Option<u64>,
    /// `export`: rows per output split.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub split_rows: BTreeMap<String, u64>,
}

impl Counts {
    /// Adds a shard's counts to a node's.
    pub fn add(&mut self, other: &Counts) {
        let sum = |a: &mut Option<u64>, b: Option<u64>| {
            if let Some(b) = b {
                *a = Some(a.unwrap_or(0) + b);
            }
        };
        sum(&mut self.source_rows, other.source_rows);
        sum(&mut self.unique_prompts, other.unique_prompts);
        sum(&mut self.prompts, other.prompts);
        sum(&mut self.responses, other.responses);
        sum(&mut self.skipped_too_long, other.skipped_too_long);
        sum(&mut self.identical, other.identical);
        sum(&mut self.dropped_identical, other.dropped_identical);
        sum(&mut self.rows_in, other.rows_in);
        sum(&mut self.ties, other.ties);
        sum(&mut self.dropped_ties, other.dropped_ties);
        sum(&mut self.rows, other.rows);
        sum(&mut self.import_rows_unused, other.import_rows_unused);
        for (split, n) in &other.split_rows {
            *self.split_rows.entry(split.clone()).or_default() += n;
        }
    }

    /// `name=value, ...` for the build log.
    pub fn describe(&self) -> String {
        let Ok(Value::Object(map)) = serde_json::to_value(self) else { return String::new() };
        let parts: Vec<String> = map.iter().map(|(k, v)| format!("{k}={v}")).collect();
        parts.join(", ")
    }
}

/// What a stage produced: files (paths relative to its folder under
/// `export.dir`), counts, and the rows of its one JSON file in typed form,
/// so readers in the same run need not parse what was just written.
#[derive(Default)]
pub struct StageOutput {
    pub files: Vec<(String, Vec<u8>)>,
    pub counts: Counts,
    pub rows: Option<Rows>,
}

impl StageOutput {
    /// One JSON file of rows, written as SimPO's scripts write theirs.
    pub fn rows<T: Row>(path: &str, rows: Vec<T>, counts: Counts) -> Result<StageOutput> {
        let bytes = pyjson::to_vec(&rows, simpo::json_size(&rows))?;
        Ok(StageOutput { files: vec![(path.to_string(), bytes)], counts, rows: Some(T::wrap(Arc::new(rows))) })
    }
}

/// The models a stage runs, loaded by the runner (once per run and files).
pub trait Models {
    fn policy(&self, model: &Path, chat_template: Option<&Path>) -> Result<Rc<Policy>>;
    /// A model's tokenizer, template and stop tokens, without its weights;
    /// `section` (`generate`, `annotate`) names its keys in messages.
    fn chat(&self, section: &str, model: &Path, chat_template: Option<&Path>) -> Result<Rc<Chat>>;
    /// The inference server at `endpoint` (connected, or launched on this
    /// machine), checked to serve the model `options` describe.
    fn server(&self, endpoint: &server::Endpoint, options: &server::Options) -> Result<Rc<Server>>;
    /// The judge's rubric from `annotate.judge_rubric` (None: the built-in one).
    fn rubric(&self, path: Option<&Path>) -> Result<Option<String>>;
    fn reward(
        &self,
        model: &Path,
        kind: Option<Kind>,
        chat_template: Option<&Path>,
        rubric: Option<&Path>,
    ) -> Result<Rc<RewardModel>>;
}

/// What one shard's work produced.
pub struct ShardOut<R> {
    pub rows: Vec<R>,
    pub counts: Counts,
    /// Tokens the model ran, for throughput.
    pub tokens: usize,
    /// The engine that computed it (device, dtype, kernels, prefgen version).
    pub engine: String,
}

/// A shard as it leaves [`Shards::build`] for the cache.
pub struct ShardBuilt {
    pub bytes: Vec<u8>,
    pub counts: Counts,
    pub rows: usize,
    pub tokens: usize,
    pub engine: String,
}

/// A node's work cut into fixed shards of its input items, which the runner
/// keys, claims and caches one by one. The typed rows stay in here.
pub trait Shards {
    /// How many shards there are.
    fn count(&self) -> usize;
    /// The digest of shard `i`'s items; with the node's key material, its key.
    fn items_digest(&self, i: usize) -> Digest;
    /// Progress units in shard `i`.
    fn units(&self, i: usize) -> usize;
    /// What a progress unit is (`prompts`, `responses`).
    fn unit(&self) -> &'static str;
    /// Computes shard `i`; `progress(tokens)` is called per unit done.
    fn build(&mut self, i: usize, progress: &dyn Fn(usize)) -> Result<ShardBuilt>;
    /// Takes shard `i` as the cache holds it.
    fn cached(&mut self, i: usize, bytes: &[u8], counts: &Counts, what: &str) -> Result<()>;
    /// Every shard is done: the node's output.
    fn assemble(self: Box<Self>) -> Result<StageOutput>;
}

type ShardWork<'a, T, R> = Box<dyn FnMut(&[T], &dyn Fn(usize)) -> Result<ShardOut<R>> + 'a>;
type Assemble<'a, R> = Box<dyn FnOnce(Vec<R>, Counts) -> Result<StageOutput> + 'a>;

/// [`Shards`] over a list of items: shard `i` is items `i * size ..`.
pub struct ByShard<'a, T, R> {
    items: Arc<Vec<T>>,
    size: usize,
    unit: &'static str,
    units: fn(&T) -> usize,
    done: Vec<Option<(Vec<R>, Counts)>>,
    work: ShardWork<'a, T, R>,
    assemble: Assemble<'a, R>,
}

impl<'a, T: Serialize, R: Row> ByShard<'a, T, R> {
    pub fn new(
        items: Arc<Vec<T>>,
        size: usize,
        (unit, units): (&'static str, fn(&T) -> usize),
        work: impl FnMut(&[T], &dyn Fn(usize)) -> Result<ShardOut<R>> + 'a,
        assemble: impl FnOnce(Vec<R>, Counts) -> Result<StageOutput> + 'a,
    ) -> ByShard<'a, T, R> {
        let count = items.len().div_ceil(size.max(1));
        ByShard {
            items,
            size: size.max(1),
            unit,
            units,
            done: (0..count).map(|_| None).collect(),
            work: Box::new(work),
            assemble: Box::new(assemble),
        }
    }

    fn chunk(&self, i: usize) -> &[T] {
        let start = i * self.size;
        &self.items[start..(start + self.size).min(self.items.len())]
    }
}

impl Work<'_> {
    fn whole<'a>(build: impl FnOnce() -> Result<StageOutput> + 'a) -> Work<'a> {
        Work::Whole(Box::new(build))
    }
}

impl<T: Serialize, R: Row> Shards for ByShard<'_, T, R> {
    fn count(&self) -> usize {
        self.done.len()
    }

    fn items_digest(&self, i: usize) -> Digest {
        Digest::of_json(&self.chunk(i))
    }

    fn units(&self, i: usize) -> usize {
        self.chunk(i).iter().map(self.units).sum()
    }

    fn unit(&self) -> &'static str {
        self.unit
    }

    fn build(&mut self, i: usize, progress: &dyn Fn(usize)) -> Result<ShardBuilt> {
        let start = i * self.size;
        let chunk = &self.items[start..(start + self.size).min(self.items.len())];
        let out = (self.work)(chunk, progress)?;
        let bytes = pyjson::to_vec(&out.rows, simpo::json_size(&out.rows))?;
        let built = ShardBuilt {
            bytes,
            counts: out.counts.clone(),
            rows: out.rows.len(),
            tokens: out.tokens,
            engine: out.engine,
        };
        self.done[i] = Some((out.rows, out.counts));
        Ok(built)
    }

    fn cached(&mut self, i: usize, bytes: &[u8], counts: &Counts, what: &str) -> Result<()> {
        self.done[i] = Some((simpo::parse_rows(bytes, what)?, counts.clone()));
        Ok(())
    }

    fn assemble(self: Box<Self>) -> Result<StageOutput> {
        let mut rows = Vec::with_capacity(self.items.len());
        let mut counts = Counts::default();
        for (i, shard) in self.done.into_iter().enumerate() {
            let (shard_rows, shard_counts) =
                shard.unwrap_or_else(|| panic!("shard {i} is assembled before it is done"));
            rows.extend(shard_rows);
            counts.add(&shard_counts);
        }
        (self.assemble)(rows, counts)
    }
}

/// How a node's output is made.
pub enum Work<'a> {
    /// At once, from its inputs (when the runner holds the node's lock).
    Whole(Box<dyn FnOnce() -> Result<StageOutput> + 'a>),
    /// Shard by shard, then assembled.
    Sharded(Box<dyn Shards + 'a>),
}

/// What a node was built from: its input rows (one per dependency, in the
/// planner's order) and, for some stages, more.
pub struct Inputs {
    pub deps: Vec<Rows>,
    /// `prompts`: the resolved source files of its split.
    pub source_files: Vec<PathBuf>,
    /// `export`: what the other nodes recorded.
    pub provenance: Option<export::Provenance>,
}

/// Whether node `spec` writes a file at `path` (relative to its folder under
/// `export.dir`): the stages' own names, so that output paths never come
/// from what a cache entry says.
pub fn writes(spec: &NodeSpec, recipe: &Recipe, path: &str) -> bool {
    match spec.stage {
        Stage::Prompts => path == prompts::FILE,
        Stage::Generate => spec.seed.is_some_and(|seed| path == generate::file_name(seed)),
        Stage::Filter => path == filter::FILE,
        Stage::Annotate => path == annotate::FILE,
        Stage::Binarize => path == binarize::FILE,
        Stage::Export => export::writes(recipe, path),
    }
}

/// The first output of `entry` that node `spec` does not write, if any: an
/// entry naming one is not prefgen's (forged or damaged) and is never used.
pub fn foreign_output<'e>(spec: &NodeSpec, recipe: &Recipe, entry: &'e ActionEntry) -> Option<&'e OutputFile> {
    entry.outputs.iter().find(|o| !writes(spec, recipe, &o.path))
}

/// How node `spec` is built from its inputs.
pub fn work<'a>(spec: &'a NodeSpec, recipe: &'a Recipe, inputs: Inputs, models: &'a dyn Models) -> Result<Work<'a>> {
    let what = spec.label();
    let deps = &inputs.deps;
    Ok(match spec.stage {
        Stage::Prompts => Work::whole(move || prompts::build(&inputs.source_files, &recipe.prompts)),
        Stage::Generate => generate::work(spec, recipe, deps[0].get(&what), models)?,
        Stage::Filter => {
            let per_seed: Vec<Arc<Vec<DecodeRow>>> = deps.iter().map(|d| d.get(&what)).collect();
            Work::whole(move || {
                let slices: Vec<&[DecodeRow]> = per_seed.iter().map(|r| r.as_slice()).collect();
                filter::build(&slices, &recipe.filter)
            })
        }
        Stage::Annotate => annotate::work(spec, recipe, deps[0].get(&what), deps[1].get(&what), models)?,
        Stage::Binarize => {
            let rows: Arc<Vec<ScoredRow>> = deps[0].get(&what);
            Work::whole(move || binarize::build(&rows, &recipe.binarize))
        }
        Stage::Export => {
            let provenance = inputs.provenance.expect("the runner gives export its provenance");
            let splits: Vec<Arc<Vec<BinarizedRow>>> = deps.iter().map(|d| d.get(&what)).collect();
            Work::whole(move || export::build(recipe, &splits, provenance))
        }
    })
}
