//! Reward models: one score per (prompt, response). ArmoRM
//! (`LlamaForRewardModelWithGating`), sequence classifiers
//! (`*ForSequenceClassification` of any family in `FAMILIES`, one label:
//! Skywork-Reward(-V2), FsfairX), and a judge (an instruct model of any
//! family asked to rate the response; the score is its expected rating).
//! All three share the decoder backbone of generation and score sequences
//! of different lengths packed in one batch.

use super::chat::Chat;
use super::models::decoder::{Linear, Safetensors};
use super::models::family::Family;
use super::server::Token;
use super::template::{Kwargs, Turn};
use super::{Load, Policy};
use anyhow::{Context, Result, bail};
use candle_core::{D, DType, Tensor};
use std::path::Path;

/// Which reward a model gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// ArmoRM's gated mixture of objectives.
    Armorm,
    /// A one-label score head on the last token.
    Classifier,
    /// The expected rating an instruct model gives under a rubric.
    Judge,
}

/// What to do with a conversation longer than the scoring length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Overflow {
    /// Cut the response from the right until the conversation fits.
    Truncate,
    /// Leave the row out, and count it.
    Skip,
}

/// The judge's default rubric; `{prompt}` and `{response}` are replaced. The
/// assistant turn is then primed with [`JUDGE_PRIMER`], so the next token is
/// the rating.
pub const DEFAULT_RUBRIC: &str = "Rate how well the response answers the user's request, considering \
helpfulness, correctness and clarity. Use a scale from 1 (useless or wrong) to 9 (excellent). Reply with a \
single digit.\n\n[Request]\n{prompt}\n\n[Response]\n{response}";
pub const JUDGE_PRIMER: &str = "Rating:";

/// The heads' weights run as the backbone's linear layers do, so a score
/// does not depend on the sequences scored beside it.
enum Head {
    Armorm {
        regression: Linear,
        gating: Vec<(Linear, Tensor)>,
        temperature: f64,
        logit_scale: f64,
        /// `reward_transform_matrix`, transposed: rewards (m, objectives) to (m, dims).
        transform: Linear,
        /// The ids of `<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n`.
        pattern: Vec<u32>,
        pad: Option<u32>,
    },
    Classifier {
        score: Linear,
        pad: Option<u32>,
    },
    Judge(Judge),
}

/// The judge's question and how its answer is read, wherever the model runs
/// (in-process, or on a server that returns next-token log-probabilities).
#[derive(Debug, Clone)]
pub struct Judge {
    rubric: String,
    /// Rating tokens and their values (a digit may be spelled with and
    /// without a leading space); empty for a model with no local tokenizer.
    ratings: Vec<(u32, f64)>,
}

impl Judge {
    /// A judge with `rubric` (None: the built-in one); `chat`, the model's
    /// tokenizer when it has local files, names its rating tokens.
    pub fn new(chat: Option<&Chat>, rubric: Option<String>) -> Result<Judge> {
        let ratings = match chat {
            Some(chat) => rating_tokens(chat)?,
            None => Vec::new(),
        };
        Ok(Judge { rubric: rubric.unwrap_or_else(|| DEFAULT_RUBRIC.to_string()), ratings })
    }

    /// The user's turn: the rubric with the prompt and the response.
    pub fn ask(&self, prompt: &str, response: &str) -> String {
        self.rubric.replace("{prompt}", prompt).replace("{response}", response)
    }

    /// The token ids the judge reads: `chat`'s template over the question
    /// as the user's turn, then the assistant's turn primed with
    /// [`JUDGE_PRIMER`], so the next token is the rating.
    pub fn render(&self, chat: &Chat, prompt: &str, response: &str, kwargs: &Kwargs) -> Result<Vec<u32>> {
        let mut text = chat.render(&[Turn { role: "user", content: &self.ask(prompt, response) }], true, kwargs)?;
        text.push_str(JUDGE_PRIMER);
        // The template writes the special tokens, as apply_chat_template's
        // tokenization (no special tokens added) has it.
        chat.encode(&text, false)
    }

    /// The rating a next token stands for: a rating token by id, or by its
    /// text (a digit 1-9, with or without a leading space) where a server
    /// names no ids.
    fn rating(&self, token: &Token) -> Option<f64> {
        match token {
            Token::Id(id) => self.ratings.iter().find(|(r, _)| r == id).map(|&(_, v)| v),
            Token::Text(text) => match text.strip_prefix(' ').unwrap_or(text).as_bytes() {
                [d @ b'1'..=b'9'] => Some((d - b'0') as f64),
                _ => None,
            },
        }
    }

    /// The expected rating over the rating tokens among `candidates` (next
    /// tokens with their probabilities): the score. None when none of them
    /// is a rating token.
    pub fn expected(&self, candidates: impl IntoIterator<Item = (Token, f64)>) -> Option<f64> {
        let (mass, sum) = candidates.into_iter().fold((0f64, 0f64), |(m, s), (token, p)| match self.rating(&token) {
            Some(v) => (m + p, s + p * v),
            None => (m, s),
        });
        (mass > 0.0).then(|| sum / mass)
    }
}

/// A loaded reward model.
pub struct RewardModel {
    policy: Policy,
    head: Head,
    pub kind: Kind,
}

/// `config.json`'s fields the heads need.
#[derive(serde::Deserialize)]
struct HeadConfig {
    #[serde(default)]
    architectures: Vec<String>,
    /// None where the key is absent (the family's default applies), Some(None)
    /// where it is null.
    #[serde(default, deserialize_with = "present")]
    pad_token_id: Option<Option<u32>>,
    num_objectives: Option<usize>,
    gating_temperature: Option<f64>,
    gating_n_hidden: Option<usize>,
}

impl RewardModel {
    /// Loads `path` (a model folder, or a `.gguf` file for a judge). The kind
    /// comes from `config.json`'s `architectures` unless `kind` names it.
    pub fn load(path: &Path, kind: Option<Kind>, rubric: Option<String>, options: &Load) -> Result<RewardModel> {
        let config: Option<HeadConfig> = match path.is_dir() {
            true => {
                let p = path.join(super::files::CONFIG);
                let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
                Some(serde_json::from_str(&text).with_context(|| format!("{}", p.display()))?)
            }
            false => None,
        };
        let architecture = config.as_ref().and_then(|c| c.architectures.first()).map(String::as_str);
        let classifier = architecture.is_some_and(|a| a.ends_with("ForSequenceClassification"));
        let detected = match architecture {
            Some("LlamaForRewardModelWithGating") => Kind::Armorm,
            _ if classifier => Kind::Classifier,
            _ => Kind::Judge,
        };
        let kind = kind.unwrap_or(detected);
        let shown = path.display();
        if kind == Kind::Judge && classifier {
            // Its tied embeddings would pass for an LM head (Qwen2, Gemma-2).
            bail!("annotate.kind: {shown} is a sequence classifier, which has no LM head to judge with");
        }
        let policy = Policy::load(path, options)?;
        // transformers reads the pad id of config.json, else the config class's default.
        let pad = |c: &HeadConfig| {
            c.pad_token_id
                .unwrap_or_else(|| architecture.and_then(Family::of_architecture).and_then(|(f, _)| f.pad_by_default))
        };
        let head = match (kind, &config) {
            (Kind::Judge, _) => Head::Judge(Judge::new(Some(&policy.chat), rubric)?),
            (_, None) => bail!("annotate.kind: {shown} is a GGUF file, which can only be a judge"),
            (Kind::Armorm, Some(c)) => {
                let w = Safetensors::open(path)?;
                let device = policy.model.device();
                let get = |name: &str| w.tensor(name, device, DType::F32);
                let n_hidden = c.gating_n_hidden.unwrap_or(3);
                let gating = (0..=n_hidden)
                    .map(|i| {
                        let w = Linear::dense(get(&format!("gating.layers.{i}.weight"))?)?;
                        Ok((w, get(&format!("gating.layers.{i}.bias"))?))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let regression = get("regression_layer.weight")?;
                if let Some(n) = c.num_objectives
                    && regression.dim(0)? != n
                {
                    bail!("{shown}: regression_layer has {} objectives, config.json says {n}", regression.dim(0)?);
                }
                let text = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n";
                Head::Armorm {
                    regression: Linear::dense(regression)?,
                    gating,
                    temperature: c.gating_temperature.unwrap_or(10.0),
                    logit_scale: get("gating.logit_scale")?.flatten_all()?.to_vec1::<f32>()?[0] as f64,
                    transform: Linear::dense(get("reward_transform_matrix")?.t()?.contiguous()?)?,
                    pattern: policy.chat.encode(text, false)?,
                    pad: pad(c),
                }
            }
            (Kind::Classifier, Some(c)) => {
                let score = Safetensors::open(path)?.tensor("score.weight", policy.model.device(), DType::F32)?;
                if score.dim(0)? != 1 {
                    bail!("{shown}: the score head has {} labels; a reward model has one", score.dim(0)?);
                }
                Head::Classifier { score: Linear::dense(score)?, pad: pad(c) }
            }
        };
        Ok(RewardModel { policy, head, kind })
    }

    /// The longest sequence the model takes.
    pub fn context(&self) -> usize {
        self.policy.context()
    }

    /// What computes its scores: the backbone's engine and the kind of head.
    pub fn engine(&self) -> String {
        let kind = match self.kind {
            Kind::Armorm => "armorm",
            Kind::Classifier => "classifier",
            Kind::Judge => "judge",
        };
        format!("{}, {kind} head", self.policy.engine())
    }

    /// The token ids the model scores for one response: the reward model's
    /// chat template over `[user prompt, assistant response]` without a
    /// generation prompt (the judge: its rubric as the user turn, and the
    /// primed assistant turn), with the template variables `kwargs`. Longer
    /// than `max_len`: truncated or (None) skipped, as `overflow` says; None
    /// too when even an empty response does not fit.
    pub fn encode(
        &self,
        prompt: &str,
        response: &str,
        max_len: usize,
        overflow: Overflow,
        kwargs: &Kwargs,
    ) -> Result<Option<Vec<u32>>> {
        let chat = &self.policy.chat;
        fit(chat, response, max_len, overflow, |response| match &self.head {
            Head::Judge(judge) => judge.render(chat, prompt, response, kwargs),
            // The template writes the special tokens, as apply_chat_template's
            // tokenization (no special tokens added) has it.
            _ => chat.encode(
                &chat.render(
                    &[Turn { role: "user", content: prompt }, Turn { role: "assistant", content: response }],
                    false,
                    kwargs,
                )?,
                false,
            ),
        })
    }

    /// Scores of sequences from [`RewardModel::encode`], run as one packed
    /// batch.
    pub fn score(&self, seqs: &[&[u32]]) -> Result<Vec<f64>> {
        let h = self.policy.model.hidden(seqs, None)?;
        let device = h.device().clone();
        // Rows of the packed hidden states, one per sequence.
        let rows = |at: &dyn Fn(&[u32]) -> Result<usize>| -> Result<Tensor> {
            let mut start = 0;
            let mut idx = Vec::with_capacity(seqs.len());
            for s in seqs {
                idx.push((start + at(s)?) as u32);
                start += s.len();
            }
            Ok(h.index_select(&Tensor::from_vec(idx, seqs.len(), &device)?, 0)?.to_dtype(DType::F32)?)
        };
        let scores = match &self.head {
            Head::Armorm { regression, gating, temperature, logit_scale, transform, pattern, pad } => {
                // The published model reads the token before the first pad (the
                // last one when there is none).
                let last =
                    rows(&|s| Ok(pad.and_then(|p| s.iter().position(|&t| t == p)).unwrap_or(s.len()).max(1) - 1))?;
                let gate = rows(&|s| {
                    s.windows(pattern.len()).rposition(|w| w == pattern.as_slice()).with_context(|| {
                        "annotate.model: the reward model's chat template does not produce the end of the user turn \
                         (<|eot_id|><|start_header_id|>assistant<|end_header_id|>), where ArmoRM's gating reads"
                    })
                })?;
                let rewards = regression.forward(&last)?;
                let mut g = gate;
                for (i, (w, b)) in gating.iter().enumerate() {
                    g = w.forward(&g)?.broadcast_add(b)?;
                    if i + 1 < gating.len() {
                        g = g.relu()?;
                    }
                }
                let g = (candle_nn::ops::softmax_last_dim(&(g / *temperature)?)? * *logit_scale)?;
                (g * transform.forward(&rewards)?)?.sum(D::Minus1)?
            }
            Head::Classifier { score, pad } => {
                // The last token that is not the pad token, as transformers
                // pools (the first when all are; the last without a pad id).
                // The score head's output is not soft-capped (Gemma-2 caps
                // only its LM head's).
                let last = rows(&|s| Ok(s.iter().rposition(|&t| Some(t) != *pad).unwrap_or(0)))?;
                score.forward(&last)?.squeeze(1)?
            }
            Head::Judge(judge) => {
                let last = rows(&|s| Ok(s.len() - 1))?;
                let probs = candle_nn::ops::softmax_last_dim(&self.policy.model.logits(&last)?)?.to_vec2::<f32>()?;
                let expected = probs
                    .iter()
                    .map(|p| {
                        let tokens = judge.ratings.iter().map(|&(id, _)| (Token::Id(id), p[id as usize] as f64));
                        judge.expected(tokens).unwrap_or(f64::NAN)
                    })
                    .collect();
                return Ok(expected);
            }
        };
        Ok(scores.to_vec1::<f32>()?.into_iter().map(f64::from).collect())
    }
}

/// `render(response)`'s ids when they fit in `max_len`; longer: the
/// response cut from the right until they do (`truncate`), or None
/// (`skip`, or when even an empty response does not fit).
pub fn fit(
    chat: &Chat,
    response: &str,
    max_len: usize,
    overflow: Overflow,
    render: impl Fn(&str) -> Result<Vec<u32>>,
) -> Result<Option<Vec<u32>>> {
    let ids = render(response)?;
    if ids.len() <= max_len {
        return Ok(Some(ids));
    }
    if overflow == Overflow::Skip {
        return Ok(None);
    }
    let words = chat.encode(response, false)?;
    let mut keep = words.len().saturating_sub(ids.len() - max_len);
    loop {
        let ids = render(&chat.decode(&words[..keep])?)?;
        if ids.len() <= max_len {
            return Ok(Some(ids));
        }
        if keep == 0 {
            return Ok(None);
        }
        keep = keep.saturating_sub(ids.len() - max_len).min(keep - 1);
    }
}

/// The judge's rating tokens: each digit 1-9 as a single token, with and
/// without a leading space.
fn rating_tokens(chat: &Chat) -> Result<Vec<(u32, f64)>> {
    let mut out = Vec::new();
    for d in 1..=9u32 {
        for text in [format!("{d}"), format!(" {d}")] {
            if let [id] = chat.encode(&text, false)?[..]
                && !out.iter().any(|&(i, _)| i == id)
            {
                out.push((id, d as f64));
            }
        }
    }
    if !out.iter().any(|&(_, v)| v == 1.0) || !out.iter().any(|&(_, v)| v == 9.0) {
        bail!("annotate.model: the judge's tokenizer has no single-token digits to rate with");
    }
    Ok(out)
}

/// Deserialises a key that may be null into Some, so that an absent key
/// (serde's default, None) differs from a null one.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<Option<u32>>, D::Error> {
    <Option<u32> as serde::Deserialize>::deserialize(d).map(Some)
}
