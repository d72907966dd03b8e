//! `prefgen infer`: one model run outside a recipe, on files. Responses to
//! prompts with their token ids and logits, scores of a SimPO file, and
//! generation throughput: what a user runs to try a model or to size
//! `batch_size` for a machine, and what the GPU check
//! (`scripts/gpucheck`) compares with transformers on the same GPU.
//!
//! Each command prints one JSON object on stdout: what ran (`engine`), how
//! long loading and running took, and the token counts.

use crate::cache::tier::{FILE_MODE, write_atomic_in};
use crate::formats::{pyjson, simpo};
use crate::infer::engine::{self, Job, Outcome};
use crate::infer::reward::RewardModel;
use crate::infer::sampler::{Sampling, Stream};
use crate::infer::{Load, Policy};
use crate::recipe;
use crate::stages::annotate;
use anyhow::{Context, Result, bail};
use candle_core::DType;
use serde_json::{Value, json};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Responses to prompts: a JSON-lines file of `{"prompt": ...}`; writes
    /// one line per prompt with its token ids, the response's ids and text,
    /// and with --logits the logits after the prompt.
    Generate(GenerateArgs),
    /// Scores rows of SimPO's `all_outputs.json` (prompt,
    /// all_generated_responses) with a reward model as the annotate stage
    /// does; writes `all_outputs_rm.json` rows.
    Score(ScoreArgs),
    /// Generation throughput: for each batch size, that many random prompts
    /// of --input-len tokens decoded together, each to --output-len new
    /// tokens (end of turn ignored), as `vllm bench throughput` measures.
    Bench(BenchArgs),
}

/// The model a command runs.
#[derive(clap::Args)]
pub struct ModelArgs {
    /// A local model folder (hub layout) or a `.gguf` file.
    pub model: PathBuf,
    /// The weights' and activations' dtype for a model folder (default:
    /// bf16 on a GPU, f32 on the CPU). bf16 on the CPU runs the GPU's tensor
    /// ops with the CPU's kernels.
    #[arg(long)]
    pub dtype: Option<Dtype>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Dtype {
    F32,
    Bf16,
}

impl ModelArgs {
    fn load(&self) -> Load<'static> {
        let dtype = self.dtype.map(|d| match d {
            Dtype::F32 => DType::F32,
            Dtype::Bf16 => DType::BF16,
        });
        Load { dtype, ..Load::default() }
    }
}

#[derive(clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompts: JSON lines, each an object with a `prompt` string.
    pub prompts: PathBuf,
    /// Where the responses go (JSON lines).
    #[arg(long, short)]
    pub out: PathBuf,
    /// New tokens at most per response (at least 1).
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write each prompt's last-position logits (a vocabulary's worth
    /// of numbers per prompt).
    #[arg(long)]
    pub logits: bool,
}

#[derive(clap::Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// SimPO's `all_outputs.json`: a JSON list of rows with `prompt` and
    /// `all_generated_responses`.
    pub rows: PathBuf,
    /// Where the scored rows go (`all_outputs_rm.json`).
    #[arg(long, short)]
    pub out: PathBuf,
    /// Sequences scored together.
    #[arg(long, default_value_t = recipe::Annotate::default().batch_size)]
    pub batch_size: usize,
}

#[derive(clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Batch sizes to measure, one after another (repeatable).
    #[arg(long = "batch-size", default_values_t = [64])]
    pub batch_sizes: Vec<usize>,
    /// Tokens in each random prompt.
    #[arg(long, default_value_t = 256)]
    pub input_len: usize,
    /// New tokens each prompt runs to.
    #[arg(long, default_value_t = 256)]
    pub output_len: usize,
}

pub fn infer(command: Command) -> Result<ExitCode> {
    let report = match command {
        Command::Generate(args) => generate(args)?,
        Command::Score(args) => score(args)?,
        Command::Bench(args) => bench(args)?,
    };
    println!("{report}");
    Ok(ExitCode::SUCCESS)
}

fn load_policy(args: &ModelArgs) -> Result<(Policy, f64)> {
    let start = Instant::now();
    let policy = Policy::load(&args.model, &args.load())
        .with_context(|| format!("cannot load the model {}", args.model.display()))?;
    Ok((policy, start.elapsed().as_secs_f64()))
}

fn generate(args: GenerateArgs) -> Result<Value> {
    // The engine decodes a first token before it checks the limit; 0 is
    // refused as the recipe's generate.max_tokens = 0 is.
    if args.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    let prompts = read_prompts(&args.prompts)?;
    let (policy, load_s) = load_policy(&args.model)?;
    let ids = prompts
        .iter()
        .map(|p| policy.chat.encode(&policy.chat.format_prompt(p)?, false))
        .collect::<Result<Vec<_>>>()?;
    let start = Instant::now();
    let logits = match args.logits {
        true => Some(last_logits(&policy, &ids, args.batch_size)?),
        false => None,
    };
    let jobs = ids.iter().zip(&prompts).map(|(ids, p)| Job { prompt: ids.clone(), stream: Stream::new(args.seed, p) });
    let sampling = Sampling { temperature: args.temperature, top_p: args.top_p };
    let outcomes = engine::generate(&policy, jobs.collect(), sampling, args.max_tokens, args.batch_size, |_| {})?;
    let run_s = start.elapsed().as_secs_f64();
    let mut out = Vec::new();
    let mut generated = 0;
    for (i, (prompt, outcome)) in prompts.iter().zip(outcomes).enumerate() {
        let Outcome::Done(tokens) = outcome else {
            bail!("{}: prompt {} does not fit the model's context", args.prompts.display(), i + 1);
        };
        generated += tokens.len();
        let mut row = json!({
            "prompt": prompt,
            "input_ids": ids[i],
            "output_ids": tokens,
            "text": policy.chat.decode(&tokens)?,
        });
        if let Some(logits) = &logits {
            row["logits"] = json!(logits[i]);
        }
        serde_json::to_writer(&mut out, &row)?;
        out.push(b'\n');
    }
    write_file(&args.out, &out)?;
    let prompt_tokens: usize = ids.iter().map(Vec::len).sum();
    Ok(json!({
        "engine": policy.engine(), "load_s": load_s, "run_s": run_s, "sequences": prompts.len(),
        "prompt_tokens": prompt_tokens, "generated_tokens": generated,
    }))
}

/// The logits after each prompt, `batch` prompts packed in a forward.
fn last_logits(policy: &Policy, ids: &[Vec<u32>], batch: usize) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(batch.max(1)) {
        let mut caches: Vec<_> = chunk.iter().map(|_| policy.model.new_cache()).collect();
        let tokens: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
        let mut refs: Vec<&mut _> = caches.iter_mut().collect();
        out.extend(policy.model.forward(&tokens, &mut refs)?.to_vec2::<f32>()?);
    }
    Ok(out)
}

fn score(args: ScoreArgs) -> Result<Value> {
    let rows: Vec<simpo::FilteredRow> = simpo::read_rows(&args.rows)?;
    let start = Instant::now();
    let rm = RewardModel::load(&args.model.model, None, None, &args.model.load())
        .with_context(|| format!("cannot load the reward model {}", args.model.model.display()))?;
    let load_s = start.elapsed().as_secs_f64();
    let settings = recipe::Annotate { batch_size: args.batch_size, ..Default::default() };
    let start = Instant::now();
    let scored = annotate::score(&rows, &rm, rm.context(), &settings, |_| {})?;
    let run_s = start.elapsed().as_secs_f64();
    write_file(&args.out, &pyjson::to_vec(&scored.rows, simpo::json_size(&rows))?)?;
    let sequences: usize = scored.rows.iter().map(|r| r.all_rm_scores.len()).sum();
    Ok(json!({
        "engine": rm.engine(), "load_s": load_s, "run_s": run_s, "sequences": sequences,
        "tokens": scored.tokens, "skipped_too_long": scored.skipped,
        "sequences_per_s": sequences as f64 / run_s,
    }))
}

fn bench(args: BenchArgs) -> Result<Value> {
    let (mut policy, load_s) = load_policy(&args.model)?;
    if args.input_len == 0 || args.output_len == 0 {
        bail!("--input-len and --output-len must be at least 1");
    }
    if args.input_len + args.output_len > policy.context() {
        bail!(
            "--input-len {} and --output-len {} exceed {}'s context of {} tokens",
            args.input_len,
            args.output_len,
            args.model.model.display(),
            policy.context()
        );
    }
    // Every response runs to its length, as vLLM's `ignore_eos`.
    policy.chat.stop.clear();
    let vocab = policy.model.vocab() as u64;
    let prompts = |n: usize, len: usize, salt: u64| -> Vec<Job> {
        (0..n as u64)
            .map(|i| {
                let mut s = Stream::new(salt, &i.to_string());
                let prompt = (0..len).map(|_| (s.next_f64() * vocab as f64) as u32 % vocab as u32).collect();
                Job { prompt, stream: Stream::new(0, &i.to_string()) }
            })
            .collect()
    };
    let greedy = Sampling { temperature: 0.0, top_p: 1.0 };
    // A first short run, so kernel loading and allocator growth are not timed.
    engine::generate(&policy, prompts(2, 8, 1), greedy, 4, 2, |_| {})?;
    let mut runs = Vec::new();
    for &batch in &args.batch_sizes {
        let start = Instant::now();
        let out = engine::generate(&policy, prompts(batch, args.input_len, 0), greedy, args.output_len, batch, |_| {})?;
        let seconds = start.elapsed().as_secs_f64();
        let generated: usize = out.iter().map(|o| if let Outcome::Done(t) = o { t.len() } else { 0 }).sum();
        runs.push(json!({
            "batch_size": batch, "input_len": args.input_len, "output_len": args.output_len,
            "seconds": seconds, "generated_tokens": generated,
            "output_tokens_per_s": generated as f64 / seconds,
            "total_tokens_per_s": (generated + batch * args.input_len) as f64 / seconds,
        }));
    }
    Ok(json!({ "engine": policy.engine(), "load_s": load_s, "runs": runs }))
}

/// Prompts from JSON lines of `{"prompt": ...}`, naming the line that is not.
fn read_prompts(path: &Path) -> Result<Vec<String>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut prompts = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("cannot read {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let row: Value = serde_json::from_str(&line).with_context(|| format!("{}:{}", path.display(), n + 1))?;
        match row.get("prompt").and_then(Value::as_str) {
            Some(p) => prompts.push(p.to_string()),
            None => bail!("{}:{}: no \"prompt\" string", path.display(), n + 1),
        }
    }
    Ok(prompts)
}

/// Writes `bytes` whole or not at all (a temporary file beside it, renamed).
fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    write_atomic_in(dir, path, bytes, FILE_MODE).with_context(|| format!("cannot write {}", path.display()))
}
