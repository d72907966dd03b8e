//! Recipes: the TOML files in `recipes/` that say what to build.
//!
//! Every key lives in exactly one section below, with its doc comment, its
//! default, its role in the action keys (`section::Role`) and, in
//! `validate`, its check. Unknown keys are errors. Relative
//! paths are read from the directory prefgen runs in, as make reads them.

pub mod section;

use crate::infer::reward::{Kind, Overflow};
use crate::infer::template::{self, Kwargs};
use anyhow::{Context, Result, anyhow, bail};
use section::{Field, Role, section};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A whole recipe.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// The dataset's name: titles the card and identifies the recipe's past builds.
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub prompts: Prompts,
    #[serde(default)]
    pub generate: Generate,
    #[serde(default)]
    pub filter: Filter,
    #[serde(default)]
    pub annotate: Annotate,
    #[serde(default)]
    pub binarize: Binarize,
    #[serde(default)]
    pub export: Export,
}

/// The recipe's one top-level key.
#[allow(non_upper_case_globals)]
pub mod top {
    pub const name: &str = "name";
}

impl Recipe {
    /// `name`, declared as the sections declare their keys.
    pub const NAME: Field = Field {
        key: top::name,
        doc: "The dataset's name: titles the card and identifies the recipe's past builds.",
        default: Some("required"),
        role: Role::Key,
    };

    /// Every key a recipe can set, section by section.
    pub fn fields() -> impl Iterator<Item = &'static Field> {
        [
            std::slice::from_ref(&Recipe::NAME),
            Prompts::FIELDS,
            Generate::FIELDS,
            Filter::FIELDS,
            Annotate::FIELDS,
            Binarize::FIELDS,
            Export::FIELDS,
        ]
        .into_iter()
        .flatten()
    }
}

section! {
    /// `[prompts]`: where the prompts come from.
    pub struct Prompts in prompts {
        /// A hub dataset id, or a local `.parquet`/`.jsonl`/`.json` file or folder.
        dataset: Option<String> = None, "required unless `prompts.splits` names files",
            Source("by what it holds: a local file's contents, a hub dataset's commit and file names");
        /// The hub revision: a commit sha pins it; a branch is resolved through
        /// the hub cache's `refs/` or the hub.
        revision: Option<String> = None, "`main`",
            Source("by the commit it resolves to");
        /// The source split read into the output split `train` (a hub dataset:
        /// `train` when unset; a folder: every file).
        split: Option<String> = None, "unset",
            Source("by the contents of the files it selects");
        /// Several output splits, `{ train = "train_prefs", test = "test_prefs" }`:
        /// output name -> source split (or a local file when `dataset` is unset).
        /// Replaces `split`.
        splits: Option<BTreeMap<String, String>> = None, "unset",
            Shape("one pipeline per output split, each keyed by its own source");
        /// The column holding the prompt: a string, or a chat message list whose
        /// first user turn is the prompt.
        column: String = "prompt".into(), _, Key;
        /// Keep only the first N prompts of the sorted set (0 = all).
        limit: usize = 0, _, Key;
    }
}

section! {
    /// `[generate]`: sampling one response per prompt per seed.
    pub struct Generate in generate {
        /// The policy: a hub id (`LlamaForCausalLM`, `Gemma2ForCausalLM`), a
        /// local model folder as a hub snapshot holds it, or a `.gguf` file
        /// (Llama, Qwen2, Qwen3, Mistral, Gemma-2, Gemma-3).
        model: Option<String> = None, "required unless `import`",
            Source("by the files its loader reads (hub sha256 where recorded, else content); other files in the folder do not count");
        /// The hub revision of `model`.
        revision: Option<String> = None, "`main`",
            Source("by the files of the snapshot it resolves to");
        /// A Jinja chat template file used instead of the model's own (base
        /// models, such as a GGUF without `tokenizer.chat_template`, need one).
        chat_template: Option<String> = None, "the model's",
            Source("by its contents");
        /// Variables the chat template reads besides the conversation, as
        /// transformers' `apply_chat_template` takes them as keyword arguments:
        /// `{ enable_thinking = false }` turns Qwen3's thinking off
        /// (`--set generate.template_kwargs.enable_thinking=false`). A
        /// variable left out keeps the template's own default.
        template_kwargs: Kwargs = Kwargs::new(), "none: the template's defaults", Key;
        /// One response per prompt per seed, combined in this order; distinct.
        seeds: Vec<u64> = Vec::new(), "required",
            Shape("one generate node per seed, keyed by its seed; their order keys `filter`");
        /// Sampling temperature, >= 0; 0 is greedy.
        temperature: f64 = 0.8, _, Key;
        /// Nucleus sampling mass, in (0, 1].
        top_p: f64 = 0.95, _, Key;
        /// Most tokens generated per response, > 0.
        max_tokens: u32 = 4096, _, Key;
        /// Sequences decoded together.
        batch_size: usize = 64, _,
            Free("a response does not depend on the batch it is decoded in (tested)");
        /// Prompts per cached unit of work.
        shard_size: usize = 512, _,
            Free("each shard is keyed by its own prompts, the node by all of them");
        /// Tokenize the rendered template with special tokens added, as SimPO's
        /// decode.py fed vLLM (a second BOS for Llama-3 and Gemma-2), to
        /// reproduce the published datasets exactly; through
        /// `generate.server`, every request also carries the recipe's seed
        /// itself, as decode.py passed it to vLLM.
        vllm_compat: bool = false, _, Key;
        /// SimPO decode files instead of sampling; `{seed}` (and `{split}` with
        /// several splits) are replaced.
        import: Option<String> = None, "unset",
            Source("by the imported files' contents");
        /// Sample through an inference server instead of the built-in engine:
        /// its OpenAI-compatible base URL (`http://gpu-7:8000/v1`; vLLM, SGLang,
        /// llama.cpp's `llama-server`). `${VAR}` is read from the environment,
        /// so each worker can name its own server. prefgen still renders and
        /// tokenizes every prompt with `generate.model`'s files. With
        /// `generate.launch`, `{port}` is the launched server's port.
        server: Option<String> = None, "unset: the built-in engine",
            Source("by whether a server samples, not by its URL: moving the server keeps the cache");
        /// A command that starts the server on this machine, run by `sh`:
        /// `{port}` becomes a free port on 127.0.0.1 and `{model}` the policy's
        /// local path (its `.gguf` file or model folder). prefgen waits until
        /// it answers, restarts it should it die, and stops it (its whole
        /// process group) when this machine's generation is done, when the
        /// run fails, or when prefgen dies; its output goes to
        /// `cache/logs/`. With `generate.server` unset, prefgen talks to
        /// `http://127.0.0.1:{port}/v1`.
        launch: Option<String> = None, "unset",
            Source("as `generate.server`: by whether a server samples, not by the command that starts it");
        /// Seconds a launched server may take to answer (loading an 8B model
        /// on vLLM, compiling included, takes minutes).
        launch_timeout_secs: u64 = 900, _,
            Free("how long to wait, not what is answered");
        /// The name the server serves the policy under, when it is not
        /// `generate.model` or its file or folder name.
        served_model: Option<String> = None, "unset",
            Free("checked against the server's `/models` before any request");
        /// Requests in flight to `generate.server`.
        concurrency: usize = 256, _,
            Free("a response does not depend on it on a deterministic server (tested with llama.cpp's, one slot)");
        /// Seconds one request to `generate.server` may take.
        request_timeout_secs: u64 = 600, _,
            Free("how long to wait, not what is answered");
        /// Retries of a request after a connection error, a timeout, 429 or
        /// 5xx, with exponential backoff and jitter (or as long as a
        /// `Retry-After` header says).
        request_retries: u32 = 5, _,
            Free("how long to wait, not what is answered");
        /// Most requests per minute to `generate.server` (a hosted API's rate
        /// limit); 0 is no limit.
        requests_per_minute: u32 = 0, _,
            Free("how fast to ask, not what is answered");
        /// The environment variable whose value is sent to `generate.server` as
        /// a bearer token (an API key); never printed or stored.
        api_key_env: String = API_KEY_ENV.to_string(), _,
            Free("a credential: never stored, never shown");
    }
}

section! {
    /// `[filter]`: dropping prompts whose responses are all identical.
    pub struct Filter in filter {
        /// Drop a prompt when every seed gave the identical text.
        drop_identical: bool = true, _, Key;
    }
}

section! {
    /// `[annotate]`: scoring every response with a reward model.
    pub struct Annotate in annotate {
        /// The reward model: a hub id or a local model folder; a `.gguf` file
        /// for a judge; with `annotate.endpoint = "chat"`, a hosted judge's
        /// name (`gpt-4o-mini`), which is then its only identity.
        model: Option<String> = None, "required unless `import`",
            Source("by the files its loader reads (hub sha256 where recorded, else content); other files in the folder do not count; a hosted judge by its name alone");
        /// The hub revision of `model`.
        revision: Option<String> = None, "`main`",
            Source("by the files of the snapshot it resolves to");
        /// `armorm` (`LlamaForRewardModelWithGating`), `classifier`
        /// (`LlamaForSequenceClassification`, `Qwen2ForSequenceClassification`,
        /// `Qwen3ForSequenceClassification`, `MistralForSequenceClassification`,
        /// `Gemma2ForSequenceClassification`; one label) or `judge` (a causal
        /// LM of any supported family, a GGUF file).
        kind: Option<Kind> = None, "from `config.json`", Key;
        /// Longest conversation scored, in tokens; 0 is the model's context.
        max_length: usize = 0, _, Key;
        /// A longer conversation: `truncate` cuts the response from the right
        /// until it fits; `skip` leaves the row out. Both count the rows that
        /// cannot be scored (`skipped_too_long`).
        overflow: Overflow = Overflow::Truncate, _, Key;
        /// A Jinja chat template file used instead of the reward model's own.
        chat_template: Option<String> = None, "the model's",
            Source("by its contents");
        /// The reward model's (or judge's) template variables, as
        /// `generate.template_kwargs` are the policy's: `{ enable_thinking =
        /// false }` for a Qwen3 judge. Through `annotate.server` with
        /// `annotate.endpoint = "chat"`, sent as `chat_template_kwargs`.
        template_kwargs: Kwargs = Kwargs::new(), "none: the template's defaults", Key;
        /// The judge's rubric, a text file in which `{prompt}` and `{response}`
        /// are replaced.
        judge_rubric: Option<String> = None, "built in",
            Source("by its contents");
        /// Sequences scored together.
        batch_size: usize = 16, _,
            Free("a score does not depend on the batch it is computed in (tested)");
        /// Rows per cached unit of work.
        shard_size: usize = 512, _,
            Free("each shard is keyed by its own rows, the node by all of them");
        /// Scored rows (SimPO's `all_outputs_rm.json`) instead of scoring;
        /// `{split}` is replaced when there are several splits.
        import: Option<String> = None, "unset",
            Source("by the imported file's contents");
        /// Score with the judge through an inference server or a hosted API
        /// instead of in-process: its OpenAI-compatible base URL
        /// (`http://gpu-7:8000/v1`, `https://api.openai.com/v1`); `${VAR}` is
        /// read from the environment. The score is the in-process judge's
        /// expected rating, from the next-token log-probabilities the server
        /// returns.
        server: Option<String> = None, "unset: in-process",
            Source("by whether a server scores (and through which endpoint), not by its URL: moving the server keeps the cache");
        /// A command that starts the judge's server on this machine, as
        /// `generate.launch` starts the policy's: `{port}` and `{model}` (the
        /// judge's local path) are substituted, prefgen waits until it
        /// answers, restarts it should it die, and stops it when this
        /// machine's annotation is done, when the run fails, or when prefgen
        /// dies. With `annotate.server` unset, prefgen talks to
        /// `http://127.0.0.1:{port}/v1`.
        launch: Option<String> = None, "unset",
            Source("as `annotate.server`: by whether a server scores, not by the command that starts it");
        /// Seconds the judge's launched server may take to answer.
        launch_timeout_secs: u64 = 900, _,
            Free("how long to wait, not what is answered");
        /// How `annotate.server` is asked: `completions` sends prefgen's own
        /// prompt ids (rubric, template and the primed `Rating:`) to
        /// `/completions` (vLLM, SGLang, llama-server); `chat` sends the rubric
        /// as a user message to `/chat/completions` (hosted APIs): the server
        /// renders its template and the reply is not primed, and
        /// `annotate.model` may be a bare name with no local files.
        endpoint: Endpoint = Endpoint::Completions, _,
            Source("keyed with `annotate.server`: a different prompt, so different scores");
        /// How many of the next token's most likely candidates `annotate.server`
        /// is asked for. The score is the expected rating over the rating
        /// tokens among them, the in-process judge's when all 18 (1-9, with
        /// and without a leading space) are there or those missing are
        /// negligible. vLLM answers at most its `--max-logprobs` (20 unless
        /// raised), OpenAI 20; llama-server any number.
        top_logprobs: usize = 20, _,
            Source("keyed with `annotate.server`: candidates left out change the score");
        /// The name the server serves the judge under, when it is not
        /// `annotate.model` or its file or folder name.
        served_model: Option<String> = None, "unset",
            Free("checked against the server's `/models` before any request");
        /// Requests in flight to `annotate.server`.
        concurrency: usize = 16, _,
            Free("a score does not depend on the requests beside it");
        /// Seconds one request to `annotate.server` may take.
        request_timeout_secs: u64 = 600, _,
            Free("how long to wait, not what is answered");
        /// Retries of a request after a connection error, a timeout, 429 or
        /// 5xx, with exponential backoff and jitter (or as long as a
        /// `Retry-After` header says).
        request_retries: u32 = 5, _,
            Free("how long to wait, not what is answered");
        /// Most requests per minute to `annotate.server` (a hosted API's rate
        /// limit); 0 is no limit.
        requests_per_minute: u32 = 0, _,
            Free("how fast to ask, not what is answered");
        /// The environment variable whose value is sent to `annotate.server`
        /// as a bearer token (an API key); never printed or stored.
        api_key_env: String = API_KEY_ENV.to_string(), _,
            Free("a credential: never stored, never shown");
    }
}

/// The variable an API key is read from unless a stage names another.
pub const API_KEY_ENV: &str = "OPENAI_API_KEY";

/// How a judge on a server is asked for its rating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Endpoint {
    /// `/completions` with prefgen's own prompt ids.
    Completions,
    /// `/chat/completions` with the rubric as the user's message.
    Chat,
}

impl Annotate {
    /// The judge's name when it is a hosted model with no local files: asked
    /// through `chat` and not a local path. Its identity is only that name.
    /// A value written as a path (`./x`, `/x`, `~/x`, `x.gguf`) that does not
    /// exist stays a path, so a typo is an error, not a hosted model.
    pub fn hosted_name(&self) -> Option<&str> {
        let path_like = |m: &str| m.starts_with(['.', '/', '~']) || m.ends_with(".gguf");
        match (self.through_server(), self.endpoint, &self.model) {
            (true, Endpoint::Chat, Some(m)) if !Path::new(m).exists() && !path_like(m) && self.launch.is_none() => {
                Some(m)
            }
            _ => None,
        }
    }

    /// Whether a server scores: at `annotate.server`, or launched.
    pub fn through_server(&self) -> bool {
        self.server.is_some() || self.launch.is_some()
    }
}

section! {
    /// `[binarize]`: choosing `chosen` and `rejected`.
    pub struct Binarize in binarize {
        /// Keep rows whose scores are all equal (SimPO keeps them); they are
        /// counted either way.
        keep_ties: bool = false, _, Key;
    }
}

section! {
    /// `[export]`: the files users load.
    pub struct Export in export {
        /// The folder every stage's files are written to.
        dir: String = String::new(), "required",
            Free("where the files are placed, not what they hold");
        /// Rows per parquet and Arrow file (`train-00000-of-0000N.parquet`).
        rows_per_file: usize = 100_000, _, Key;
        /// The dataset's license as the hub names it (`mit`, `apache-2.0`,
        /// `cc-by-4.0`, ...): the card's `license`. The prompts' and the
        /// models' licenses bind the data; say theirs here.
        license: String = "unknown".to_string(), "`unknown`", Key;
    }
}

/// Where one output split's prompts come from.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptSource {
    /// A hub dataset's split at a revision.
    Hub { id: String, revision: String, split: String },
    /// A local file, or a folder whose files for `split` are read.
    Local { path: PathBuf, split: Option<String> },
}

/// One output split and its source.
#[derive(Debug, Clone)]
pub struct SplitSpec {
    pub name: String,
    pub source: PromptSource,
}

impl Recipe {
    /// Reads, overrides (`--set key=value`) and validates a recipe.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Recipe> {
        let shown = path.display();
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read recipe {shown}"))?;
        let parsed = toml::de::Deserializer::parse(&text).map_err(|e| toml_error(&shown.to_string(), &text, &e, ""))?;
        let recipe: Recipe = serde_path_to_error::deserialize(parsed).map_err(|e| {
            let key = e.path().to_string();
            toml_error(&shown.to_string(), &text, e.inner(), &key)
        })?;
        let recipe = if overrides.is_empty() {
            recipe
        } else {
            let mut table: toml::Table = toml::from_str(&text).expect("the recipe parsed above");
            for item in overrides {
                apply_override(&mut table, item)?;
            }
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let key = e.path().to_string();
                let set = overrides.iter().find(|o| o.split('=').next() == Some(key.as_str()));
                let origin = set.map_or_else(
                    || format!("{shown}: with --set {}", overrides.join(" --set ")),
                    |o| format!("--set {o}"),
                );
                anyhow!("{origin}: {}", plain(e.inner().message(), &key))
            })?
        };
        recipe.validate().map_err(|(key, msg)| {
            let origin = if overrides.iter().any(|o| o.split('=').next() == Some(key)) {
                format!("--set {key}")
            } else {
                match locate(&text, key) {
                    Some(line) => format!("{shown}:{line}: {key}"),
                    None => format!("{shown}: {key}"),
                }
            };
            anyhow!("{origin}: {msg}")
        })?;
        Ok(recipe)
    }

    /// Checks values that types alone do not: the failing key and why.
    fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        let err = |key: &'static str, msg: &str| Err((key, msg.to_string()));
        if self.name.trim().is_empty() {
            return err(top::name, "is required and must not be empty");
        }
        let p = &self.prompts;
        if p.column.is_empty() {
            return err(prompts::column, "must not be empty");
        }
        match (&p.splits, &p.split) {
            (Some(_), Some(_)) => return err(prompts::splits, "set either prompts.split or prompts.splits, not both"),
            (Some(map), None) => {
                if map.is_empty() {
                    return err(prompts::splits, "must name at least one split");
                }
                if let Some(bad) = map.keys().find(|k| !valid_split_name(k)) {
                    return err(
                        prompts::splits,
                        &format!(
                            "split name {bad:?} is not one the Hugging Face tools accept: letters, digits and '_', in parts joined by '.' (datasets' rule {SPLIT_RULE})"
                        ),
                    );
                }
            }
            (None, _) => {
                if p.dataset.is_none() {
                    return err(prompts::dataset, "is required (a hub dataset id or a local file or folder)");
                }
            }
        }
        let g = &self.generate;
        if g.seeds.is_empty() {
            return err(generate::seeds, "is required: list at least one seed");
        }
        let mut seen = std::collections::BTreeSet::new();
        if let Some(dup) = g.seeds.iter().find(|s| !seen.insert(**s)) {
            return err(generate::seeds, &format!("seed {dup} is listed twice"));
        }
        if !(g.temperature >= 0.0 && g.temperature.is_finite()) {
            return err(generate::temperature, "must be a finite number >= 0");
        }
        if !(g.top_p > 0.0 && g.top_p <= 1.0) {
            return err(generate::top_p, "must be in (0, 1]");
        }
        if g.max_tokens == 0 {
            return err(generate::max_tokens, "must be > 0");
        }
        if g.batch_size == 0 {
            return err(generate::batch_size, "must be > 0");
        }
        if g.shard_size == 0 {
            return err(generate::shard_size, "must be > 0");
        }
        if let Some(why) = template::reserved(&g.template_kwargs) {
            return err(generate::template_kwargs, &why);
        }
        let several_splits = self.splits().len() > 1;
        match (&g.import, &g.model) {
            (Some(_), Some(_)) => {
                return err(
                    generate::import,
                    "and generate.model are both set: sample from the model or import, not both",
                );
            }
            (Some(pattern), None) => {
                if g.seeds.len() > 1 && !pattern.contains("{seed}") {
                    return err(generate::import, "must contain {seed} when there are several seeds");
                }
                if several_splits && !pattern.contains("{split}") {
                    return err(generate::import, "must contain {split} when there are several splits");
                }
            }
            (None, None) => return err(generate::model, "is required unless generate.import is set"),
            (None, Some(_)) => {}
        }
        if let Some(url) = &g.server {
            if g.import.is_some() {
                return err(generate::server, "and generate.import are both set: sample or import, not both");
            }
            // `${VAR}` may give the whole URL; it is checked once read.
            if !(crate::infer::server::is_http(url) || url.starts_with("${")) {
                return err(generate::server, "must be an http:// or https:// URL (such as http://gpu-7:8000/v1)");
            }
        }
        if let Some(command) = &g.launch {
            if g.import.is_some() {
                return err(generate::launch, "and generate.import are both set: sample or import, not both");
            }
            if !command.contains("{port}") {
                return err(generate::launch, "must contain {port}, the port prefgen picks for the server");
            }
        }
        if g.concurrency == 0 {
            return err(generate::concurrency, "must be > 0");
        }
        let a = &self.annotate;
        if let Some(why) = template::reserved(&a.template_kwargs) {
            return err(annotate::template_kwargs, &why);
        }
        if a.batch_size == 0 {
            return err(annotate::batch_size, "must be > 0");
        }
        if a.shard_size == 0 {
            return err(annotate::shard_size, "must be > 0");
        }
        match (&a.import, &a.model) {
            (Some(_), Some(_)) => {
                return err(
                    annotate::import,
                    "and annotate.model are both set: score with the model or import, not both",
                );
            }
            (Some(pattern), None) if several_splits && !pattern.contains("{split}") => {
                return err(annotate::import, "must contain {split} when there are several splits");
            }
            (None, None) => return err(annotate::model, "is required unless annotate.import is set"),
            _ => {}
        }
        if let Some(url) = &a.server {
            if a.import.is_some() {
                return err(annotate::server, "and annotate.import are both set: score or import, not both");
            }
            if !(crate::infer::server::is_http(url) || url.starts_with("${")) {
                return err(annotate::server, "must be an http:// or https:// URL (such as http://gpu-7:8000/v1)");
            }
            if a.kind.is_some_and(|k| k != Kind::Judge) {
                return err(
                    annotate::kind,
                    "must be judge with annotate.server: a server gives next-token log-probabilities, not a reward head",
                );
            }
        }
        if let Some(command) = &a.launch {
            if a.import.is_some() {
                return err(annotate::launch, "and annotate.import are both set: score or import, not both");
            }
            if !command.contains("{port}") {
                return err(annotate::launch, "must contain {port}, the port prefgen picks for the server");
            }
            if a.kind.is_some_and(|k| k != Kind::Judge) {
                return err(
                    annotate::kind,
                    "must be judge with annotate.launch: a server gives next-token log-probabilities, not a reward head",
                );
            }
        }
        if a.top_logprobs == 0 {
            return err(annotate::top_logprobs, "must be > 0");
        }
        if a.concurrency == 0 {
            return err(annotate::concurrency, "must be > 0");
        }
        if self.export.dir.trim().is_empty() {
            return err(export::dir, "is required and must not be empty");
        }
        if self.export.rows_per_file == 0 {
            return err(export::rows_per_file, "must be > 0");
        }
        self.check_inputs_outside_export()
    }

    /// prefgen replaces and removes files under `export.dir`: no file or
    /// folder it reads may be there, nor may `export.dir` be inside a folder
    /// read whole (its exports would be read back as input).
    fn check_inputs_outside_export(&self) -> std::result::Result<(), (&'static str, String)> {
        let dir = Path::new(&self.export.dir);
        let Ok(export) = resolve(dir) else { return Ok(()) }; // unreadable: the run says so, naming it
        for (key, path) in self.local_inputs() {
            // A folder input is read whole; a file, from its folder.
            let whole = path.is_dir();
            let folder = match path.parent().filter(|p| !p.as_os_str().is_empty()) {
                _ if whole => path.as_path(),
                Some(parent) => parent,
                None => Path::new("."),
            };
            let Ok(folder) = resolve(folder) else { continue };
            let (dir, path) = (dir.display(), path.display());
            if folder.starts_with(&export) {
                return Err((
                    export::dir,
                    format!(
                        "{dir} holds {key}'s {path}; prefgen replaces and removes files in export.dir, so nothing it reads may be there: choose another export.dir"
                    ),
                ));
            }
            if whole && export.starts_with(&folder) {
                return Err((
                    export::dir,
                    format!(
                        "{dir} is inside {key}'s folder {path}, which is read whole (the exports would be read back as input): choose another export.dir"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The local files and folders the recipe reads, each with its key.
    fn local_inputs(&self) -> Vec<(&'static str, PathBuf)> {
        let mut out = Vec::new();
        let splits = self.splits();
        for spec in &splits {
            if let PromptSource::Local { path, .. } = &spec.source {
                let key = if self.prompts.dataset.is_some() { prompts::dataset } else { prompts::splits };
                out.push((key, path.clone()));
            }
            if let Some(pattern) = &self.generate.import {
                for &seed in &self.generate.seeds {
                    let path = crate::stages::generate::import_path(pattern, seed, &spec.name);
                    out.push((generate::import, path.into()));
                }
            }
            if let Some(pattern) = &self.annotate.import {
                out.push((annotate::import, crate::stages::annotate::import_path(pattern, &spec.name).into()));
            }
        }
        let (g, a) = (&self.generate, &self.annotate);
        for (key, path) in [
            (generate::model, &g.model),
            (generate::chat_template, &g.chat_template),
            (annotate::model, &a.model),
            (annotate::chat_template, &a.chat_template),
            (annotate::judge_rubric, &a.judge_rubric),
        ] {
            // A model that is not a local path is a hub id, read from the hub's cache.
            if let Some(path) = path.as_deref().map(PathBuf::from).filter(|p| p.exists()) {
                out.push((key, path));
            }
        }
        out
    }

    /// The output splits, in name order, each with its prompt source.
    pub fn splits(&self) -> Vec<SplitSpec> {
        let p = &self.prompts;
        // `split` is None only for a single split with no `prompts.split`: then a
        // hub dataset's `train` split, or every file of a local folder, is read.
        let source = |split: Option<&str>| match &p.dataset {
            Some(ds) if !Path::new(ds).exists() && looks_like_hub_id(ds) => PromptSource::Hub {
                id: ds.clone(),
                revision: p.revision.clone().unwrap_or_else(|| "main".into()),
                split: split.unwrap_or("train").to_string(),
            },
            Some(ds) => PromptSource::Local { path: PathBuf::from(ds), split: split.map(str::to_string) },
            None => PromptSource::Local { path: PathBuf::from(split.unwrap_or_default()), split: None },
        };
        match &p.splits {
            Some(map) => {
                map.iter().map(|(name, src)| SplitSpec { name: name.clone(), source: source(Some(src)) }).collect()
            }
            None => vec![SplitSpec { name: "train".into(), source: source(p.split.as_deref()) }],
        }
    }

    /// Where a stage's SimPO JSON files go: `export.dir`, or a folder per split
    /// when there are several.
    pub fn json_dir(&self, split: &str) -> PathBuf {
        if self.splits().len() > 1 { PathBuf::from(split) } else { PathBuf::new() }
    }
}

/// The book's table of recipe keys (docs/src/recipes.md), rendered from the sections'
/// declarations: key, default, whether it is in the action key, meaning.
pub fn reference_table() -> String {
    let defaults = serde_json::to_value(Recipe::default()).expect("recipes serialise");
    let mut out = String::from("| key | default | in the action key | meaning |\n|---|---|---|---|\n");
    for f in Recipe::fields() {
        let value = f.key.split('.').fold(&defaults, |v, part| &v[part]);
        let default = match f.default {
            Some(text) => text.to_string(),
            None => format!("`{}`", toml_value(value)),
        };
        let role = match f.role {
            Role::Key => "yes".to_string(),
            Role::Source(why) | Role::Shape(why) => why.to_string(),
            Role::Free(why) => format!("no: {why}"),
        };
        let meaning = f.doc.split_whitespace().collect::<Vec<_>>().join(" ");
        out.push_str(&format!("| `{}` | {default} | {role} | {meaning} |\n", f.key));
    }
    out
}

/// A default value as a recipe would write it.
fn toml_value(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `org/name`: how a hub id differs from a local path that does not exist.
pub fn looks_like_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
        && !s.ends_with(".json")
        && !s.ends_with(".jsonl")
        && !s.ends_with(".parquet")
        && !s.ends_with(".gguf")
}

/// The rule `datasets` checks split names against (`datasets.naming._split_re`).
const SPLIT_RULE: &str = r"^\w+(\.\w+)*$";

/// Whether `datasets` accepts `s` as a split name ([`SPLIT_RULE`]); such a
/// name is also a plain file name, never `..` or a path.
fn valid_split_name(s: &str) -> bool {
    s.split('.').all(|part| !part.is_empty() && part.chars().all(|c| c.is_alphanumeric() || c == '_'))
}

/// `path` made absolute, with its nearest existing ancestor resolved
/// (symbolic links followed) and the rest as given, so two spellings of one
/// folder compare equal even before it exists.
pub fn resolve(path: &Path) -> std::io::Result<PathBuf> {
    let path = std::path::absolute(path)?;
    let mut base = path.as_path();
    let mut rest = Vec::new();
    while !base.exists() {
        rest.push(base.file_name().map(|n| n.to_os_string()).unwrap_or_default());
        base = base.parent().unwrap_or(Path::new("/"));
    }
    let mut out = base.canonicalize()?;
    out.extend(rest.iter().rev());
    Ok(out)
}

/// Applies one `--set section.key=value`: the value is a TOML value when it parses
/// as one, otherwise a bare string (so paths need no quotes).
fn apply_override(table: &mut toml::Table, item: &str) -> Result<()> {
    let (key, raw) = item.split_once('=').ok_or_else(|| anyhow!("--set {item}: expected section.key=value"))?;
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let path: Vec<&str> = key.split('.').collect();
    if path.iter().any(|p| p.is_empty()) {
        bail!("--set {item}: {key:?} is not a key (write section.key=value)");
    }
    let mut cur = table;
    for part in &path[..path.len() - 1] {
        let entry = cur.entry(part.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry.as_table_mut().ok_or_else(|| anyhow!("--set {item}: {part} is a value, not a section"))?;
    }
    cur.insert(path[path.len() - 1].to_string(), value);
    Ok(())
}

/// One line for a TOML error: `file:line:col: key: message`.
fn toml_error(file: &str, text: &str, e: &toml::de::Error, key: &str) -> anyhow::Error {
    let msg = plain(e.message(), key);
    match e.span() {
        Some(span) => {
            let (line, col) = line_col(text, span.start);
            anyhow!("{file}:{line}:{col}: {msg}")
        }
        None => anyhow!("{file}: {msg}"),
    }
}

/// A deserializer's message in a user's words: the key first (`.` is the
/// whole recipe), and types as TOML names them, not as Rust does.
fn plain(message: &str, key: &str) -> String {
    let mut msg = message.trim().replace('\n', " ");
    // With the real limits: TOML's integers stop at i64::MAX.
    for (rust, toml) in [
        ("expected u32", "expected a whole number from 0 to 4294967295"),
        ("expected u64", "expected a whole number from 0 to 9223372036854775807"),
        ("expected usize", "expected a whole number from 0 to 9223372036854775807"),
        ("expected f64", "expected a number"),
        ("expected a sequence", "expected an array"),
        ("expected a map", "expected a table"),
    ] {
        msg = msg.replace(rust, toml);
    }
    if let Some(at) = msg.find("expected struct ") {
        msg.replace_range(at.., "expected a table");
    }
    if key.is_empty() || key == "." { msg } else { format!("{key}: {msg}") }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// The line where `section.key` is written, for messages about its value.
fn locate(text: &str, key: &str) -> Option<usize> {
    let (section, leaf) = key.rsplit_once('.').unwrap_or(("", key));
    let mut current = String::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if let Some(h) = t.strip_prefix('[').and_then(|h| h.split(']').next()) {
            current = h.trim().to_string();
            if current == key {
                return Some(i + 1);
            }
        } else if current == section && t.split('=').next().map(str::trim) == Some(leaf) && t.contains('=') {
            return Some(i + 1);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
name = "t"
[prompts]
dataset = "p.jsonl"
[generate]
import = "g/output_{seed}.json"
seeds = [1, 2]
[annotate]
import = "s.json"
[export]
dir = "out"
"#;

    fn load(text: &str, sets: &[&str]) -> Result<Recipe> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.toml");
        std::fs::write(&path, text).unwrap();
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Recipe::load(&path, &sets)
    }

    /// Every recipe the project ships loads and validates.
    #[test]
    fn shipped_recipes_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Recipe::load(&path, &[]).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                n += 1;
            }
        }
        assert!(n >= 4, "{n} recipes");
    }

    /// The published-dataset recipes carry the settings SimPO documents.
    #[test]
    fn published_recipes_follow_simpo() {
        for name in ["llama3", "gemma2"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("recipes/{name}-ultrafeedback-armorm.toml"));
            let r = Recipe::load(&path, &[]).unwrap();
            let g = &r.generate;
            assert_eq!(g.seeds, [13, 21, 42, 79, 100]);
            assert_eq!((g.temperature, g.top_p, g.max_tokens, g.vllm_compat), (0.8, 0.95, 4096, true));
            assert_eq!(r.annotate.model.as_deref(), Some("RLHFlow/ArmoRM-Llama3-8B-v0.1"));
            assert!(r.binarize.keep_ties);
            let splits: Vec<String> = r.splits().iter().map(|s| s.name.clone()).collect();
            assert_eq!(splits, ["test", "train"]);
        }
    }

    #[test]
    fn defaults_follow_simpo() {
        let r = load(BASE, &[]).unwrap();
        assert_eq!((r.generate.temperature, r.generate.top_p, r.generate.max_tokens), (0.8, 0.95, 4096));
        assert!(r.filter.drop_identical && !r.binarize.keep_ties);
        assert_eq!(r.splits()[0].name, "train");
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let text = BASE.replace("seeds = [1, 2]", "seeds = [1, 2]\ntempature = 0.5");
        let e = load(&text, &[]).unwrap_err().to_string();
        assert!(e.contains("r.toml:8:") && e.contains("tempature"), "{e}");
    }

    #[test]
    fn wrong_type_names_line_and_key_in_toml_terms() {
        let e = load(&BASE.replace("[1, 2]", "\"1, 2\""), &[]).unwrap_err().to_string();
        assert!(e.contains("r.toml:7:") && e.contains("generate.seeds: invalid type") && e.contains("array"), "{e}");
        let e =
            load(&BASE.replace("[export]\ndir = \"out\"", "").replace("name = \"t\"", "name = \"t\"\nexport = 5"), &[])
                .unwrap_err()
                .to_string();
        assert!(e.contains("export: invalid type: integer `5`, expected a table"), "{e}");
        assert!(!e.contains("struct"), "Rust's words reach the user: {e}");
        let e = load(BASE, &["prompts.limit=-3"]).unwrap_err().to_string();
        assert!(e.contains("--set prompts.limit=-3: prompts.limit:") && e.contains("whole number"), "{e}");
    }

    #[test]
    fn invalid_values_name_the_key() {
        let e = load(&BASE.replace("[1, 2]", "[1, 1]"), &[]).unwrap_err().to_string();
        assert!(e.contains("r.toml:7: generate.seeds") && e.contains("twice"), "{e}");
        let e = load(BASE, &["generate.top_p=1.5"]).unwrap_err().to_string();
        assert!(e.contains("--set generate.top_p") && e.contains("(0, 1]"), "{e}");
        let e = load(BASE, &["generate.temperature=-1"]).unwrap_err().to_string();
        assert!(e.contains("generate.temperature"), "{e}");
        let e = load(BASE, &["generate.max_tokens=0"]).unwrap_err().to_string();
        assert!(e.contains("generate.max_tokens"), "{e}");
        let e = load(BASE, &["generate.seeds=[]"]).unwrap_err().to_string();
        assert!(e.contains("generate.seeds"), "{e}");
    }

    #[test]
    fn overrides_parse_toml_or_bare_strings() {
        let r = load(BASE, &["prompts.limit=50", "export.dir=/tmp/x y", "binarize.keep_ties=true"]).unwrap();
        assert_eq!(r.prompts.limit, 50);
        assert_eq!(r.export.dir, "/tmp/x y");
        assert!(r.binarize.keep_ties);
        let e = load(BASE, &["generate.tempature=1"]).unwrap_err().to_string();
        assert!(e.contains("tempature"), "{e}");
        let e = load(BASE, &["prompts.limit=many"]).unwrap_err().to_string();
        assert!(e.contains("--set prompts.limit=many"), "{e}");
    }

    #[test]
    fn several_splits_need_split_placeholders() {
        let text = BASE.replace("dataset = \"p.jsonl\"", "splits = { train = \"a.jsonl\", test = \"b.jsonl\" }");
        let e = load(&text, &[]).unwrap_err().to_string();
        assert!(e.contains("{split}"), "{e}");
        let text = text.replace("g/output_{seed}", "g/{split}/output_{seed}").replace("s.json", "{split}.json");
        let r = load(&text, &[]).unwrap();
        let names: Vec<_> = r.splits().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["test", "train"]);
    }

    /// The keys a section accepts, as serde's unknown-field message lists them.
    fn keys_of<T: serde::de::DeserializeOwned + std::fmt::Debug>() -> Vec<String> {
        let e = toml::from_str::<T>("not_a_key = 1").unwrap_err().message().to_string();
        // "expected `a`", "expected `a` or `b`", "expected one of `a`, `b`, ..."
        let list = e.rsplit("expected").next().expect("serde lists the fields");
        list.split('`').skip(1).step_by(2).map(str::to_string).collect()
    }

    /// Every key serde accepts is declared, with a role, in its section.
    #[test]
    fn every_key_is_declared_with_a_role() {
        let sections = [
            (Prompts::SECTION, keys_of::<Prompts>(), Prompts::FIELDS),
            (Generate::SECTION, keys_of::<Generate>(), Generate::FIELDS),
            (Filter::SECTION, keys_of::<Filter>(), Filter::FIELDS),
            (Annotate::SECTION, keys_of::<Annotate>(), Annotate::FIELDS),
            (Binarize::SECTION, keys_of::<Binarize>(), Binarize::FIELDS),
            (Export::SECTION, keys_of::<Export>(), Export::FIELDS),
        ];
        for (section, accepted, declared) in sections {
            let accepted: Vec<String> = accepted.iter().map(|k| format!("{section}.{k}")).collect();
            let declared: Vec<String> = declared.iter().map(|f| f.key.to_string()).collect();
            assert_eq!(accepted, declared, "[{section}]");
        }
        assert_eq!(keys_of::<Recipe>()[0], Recipe::NAME.key);
    }

    #[test]
    fn hub_ids_and_local_paths() {
        let r = load(&BASE.replace("p.jsonl", "HuggingFaceH4/ultrafeedback_binarized"), &["prompts.split=train_prefs"])
            .unwrap();
        assert_eq!(
            r.splits()[0].source,
            PromptSource::Hub {
                id: "HuggingFaceH4/ultrafeedback_binarized".into(),
                revision: "main".into(),
                split: "train_prefs".into()
            }
        );
    }
}
