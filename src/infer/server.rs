//! Sampling and judging through an inference server that speaks the
//! OpenAI-compatible API (vLLM, SGLang, llama.cpp's `llama-server`, hosted
//! APIs). One client serves both stages: the recipe section it works for
//! (`generate`, `annotate`) names it in messages. prefgen renders and
//! tokenizes each prompt itself and sends the token ids to `/completions`,
//! so the server cannot add or drop a BOS; it reads the response's token ids
//! back where the server returns them and decodes them itself.
//!
//! What each server is told, beyond the OpenAI fields: `top_k: -1`,
//! `min_p: 0` and `repetition_penalty: 1` (plain temperature and nucleus
//! sampling, whatever the server's defaults or the model's
//! `generation_config.json`); `stop_token_ids` (vLLM, SGLang);
//! `return_token_ids` (vLLM); for llama.cpp `samplers: [temperature, top_p]`
//! (vLLM's order: its default applies top-p before the temperature),
//! `return_tokens` with `verbose` (the ids), and `cache_prompt: false` (a
//! prefix reused from another request's batch is computed differently).
//! Servers ignore the fields meant for the others.
//!
//! Which model a server serves is checked by what it does, not by its name
//! (a file of the same name may hold another model): before any completion,
//! its own tokenizer (`POST /tokenize`, which llama.cpp, vLLM and SGLang
//! serve) must split fixed probe texts, the policy's rendered chat prompt
//! and its stop tokens' texts into the ids prefgen's gives, and where the
//! server tells its vocabulary size (llama.cpp's `/models` `meta.n_vocab`)
//! it must be the policy's. What a server returns is checked too: its token
//! ids must be the policy's, and its own names (`owned_by`, versions) reach
//! the entries, the lock and the card only as plain text.
//!
//! A judge asks for the next token's top log-probabilities
//! ([`Server::next_token`]): `/completions` with prefgen's prompt ids, or
//! `/chat/completions` for APIs that speak only chat.
//!
//! A hosted API is a server too: the key comes from the environment variable
//! the stage names (never shown), a 429's `Retry-After` is waited out, and
//! requests are paced to the stage's requests-per-minute limit.

use super::chat::Chat;
use super::template::Kwargs;
use crate::redact::redact;
use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

/// How prefgen talks to a server.
#[derive(Debug, Clone)]
pub struct Options {
    /// The recipe section the server works for (`generate`, `annotate`):
    /// messages name its keys (`annotate.server`, `annotate.model`).
    pub section: &'static str,
    /// The name the server serves the policy under; None: it must serve one
    /// whose name is one of `names`.
    pub served_model: Option<String>,
    /// Names the policy goes by (the recipe's `generate.model`, its file or
    /// folder name), for matching against `/models`.
    pub names: Vec<String>,
    /// One request's limit.
    pub timeout: Duration,
    /// Retries of a request after a connection error, a timeout, 429 or 5xx.
    pub retries: u32,
    /// Most requests per minute (0: no limit).
    pub requests_per_minute: u32,
    /// The environment variable holding the API key.
    pub api_key_env: String,
    /// What the model's tokenizer does, which the server's must do too; None
    /// for a hosted model with no local files, known only by its name.
    pub identity: Option<Identity>,
}

/// Where a stage's server is: at a URL, or started by the runner.
#[derive(Debug, Clone, Copy)]
pub struct Endpoint<'a> {
    /// The recipe key of the URL (`generate.server`), for messages.
    pub key: &'static str,
    /// Its base URL, `${VAR}` read from the environment; with `launch`,
    /// `{port}` is the launched server's port, and None is
    /// `http://127.0.0.1:{port}/v1`.
    pub url: Option<&'a str>,
    pub launch: Option<Launch<'a>>,
}

/// A server command the runner starts on this machine (see `crate::launch`).
#[derive(Debug, Clone, Copy)]
pub struct Launch<'a> {
    /// The recipe key that holds the command (`generate.launch`), for
    /// messages and for stopping a stage's servers once it is done.
    pub key: &'static str,
    pub command: &'a str,
    /// The model's local path, for `{model}`.
    pub model: &'a std::path::Path,
    /// How long it may take to answer.
    pub timeout: Duration,
}

/// Texts whose token ids tell tokenizers apart: words, digits, spacing,
/// code and non-ASCII text.
const PROBES: [&str; 3] = [
    "The quick brown fox jumps over the lazy dog, 1234567890 times!",
    "def f(x):\n    return x ** 2  # squared\n\n\tdone.",
    "Grüße aus Köln: café, naïve, 東京, Привет.",
];

/// The policy's token ids for the probe texts, its chat prompt and its stop
/// tokens, and its vocabulary size.
#[derive(Debug, Clone)]
pub struct Identity {
    probes: Vec<(String, Vec<u32>)>,
    vocab: usize,
}

impl Identity {
    /// What `chat` (the policy's tokenizer and template) does.
    pub fn of(chat: &Chat) -> Result<Identity> {
        let mut texts: Vec<String> = PROBES.iter().map(|p| p.to_string()).collect();
        // The template's special tokens (BOS, turn markers), and the stop
        // tokens by their text: a server must map them to the same ids.
        texts.push(chat.format_prompt(PROBES[0])?);
        texts.push(chat.stop.iter().filter_map(|&id| chat.token(id)).collect());
        let probes = texts.into_iter().map(|t| chat.encode(&t, false).map(|ids| (t, ids))).collect::<Result<_>>()?;
        Ok(Identity { probes, vocab: chat.vocab() })
    }
}

/// A server checked to serve the policy.
pub struct Server {
    /// The recipe section it works for, for messages.
    section: &'static str,
    /// The base URL, ending in `/v1` or whatever prefix the server has.
    base: String,
    /// `base` as messages show it (no user or password).
    pub shown: String,
    /// The id the server serves the policy under, sent as `model`.
    model: String,
    /// The engine's name, version and whether it is deterministic, for the
    /// entries, the card and the lock.
    pub engine: String,
    agent: ureq::Agent,
    retries: u32,
    /// When the next request may start, and the least time between two
    /// (`requests_per_minute`); None: no limit.
    pace: Option<(Mutex<Instant>, Duration)>,
    /// The API key from the environment, sent as a bearer token; never shown.
    api_key: Option<String>,
    /// The model's vocabulary size: a returned id at or past it is not one
    /// of its tokens (None: not known, for a hosted model).
    vocab: Option<usize>,
    /// How the server was checked to serve the policy, for messages.
    pub checked: String,
}

/// Sampling parameters of every request.
#[derive(Debug, Clone)]
pub struct Sampling {
    pub temperature: f64,
    pub top_p: f64,
    /// Token ids generation stops at (and that prefgen trims at).
    pub stop: Vec<u32>,
}

/// One prompt to complete.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub seed: u64,
}

/// What the server answered.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// The generated token ids, cut before the first stop token.
    Ids(Vec<u32>),
    /// Only text: the server returns no token ids.
    Text(String),
    /// The server rejected the prompt as longer than its context.
    TooLong,
}

/// A failed request: whether retrying may help, and the message.
enum Failure {
    /// Worth retrying, after the wait the server asked for (`Retry-After`)
    /// when it named one.
    Transient(String, Option<Duration>),
    TooLong,
    Rejected(String),
}

/// `${VAR}` in a server URL replaced by the environment's value, so each
/// worker of a job array can drive its own server (the URL is not part of
/// any key).
pub fn expand_env(url: &str) -> Result<String> {
    let mut out = String::new();
    let mut rest = url;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let shown = redact(url);
        let end = after.find('}').with_context(|| format!("{shown:?}: an unclosed ${{"))?;
        let name = &after[..end];
        let value = std::env::var(name).map_err(|_| anyhow!("{shown:?} names ${{{name}}}, which is not set"))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Whether `url` is one prefgen can send requests to.
pub fn is_http(url: &str) -> bool {
    url.starts_with("http://") || url.starts_with("https://")
}

/// A name a server gives itself (`owned_by`, a version), as plain text for
/// the entries, the lock and the card: letters, digits and a few
/// punctuation marks; anything else (a newline, a table's `|`, markup)
/// becomes `?`, and it is cut at 80 characters.
fn plain(text: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || " .,:;_+-/()#@=".contains(c);
    text.chars().take(80).map(|c| if safe(c) { c } else { '?' }).collect()
}

/// Up to 8 ids, for messages.
fn ids_shown<T: std::fmt::Display>(ids: &[T]) -> String {
    let mut shown: Vec<String> = ids.iter().take(8).map(T::to_string).collect();
    if ids.len() > 8 {
        shown.push(format!("... {} in all", ids.len()));
    }
    format!("[{}]", shown.join(", "))
}

/// The server's error message: `error.message`, `message`, or the body.
fn message_of(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let text = v["error"]["message"].as_str().or(v["message"].as_str()).or(v["detail"].as_str());
    let text = text.map(str::to_string).unwrap_or_else(|| body.trim().to_string());
    text.chars().take(400).collect()
}

/// Whether a rejection says the prompt does not fit the context (llama.cpp:
/// "exceeds the available context size"; vLLM: "maximum context length";
/// SGLang: "longer than the model's context length").
fn is_too_long(message: &str) -> bool {
    let m = message.to_lowercase();
    m.contains("context size") || m.contains("context length")
}

impl Server {
    /// Connects to `url` and checks, with `/models`, that it serves the
    /// policy by name, then with `/tokenize` that its model is the policy;
    /// names the engine from `owned_by` and its version endpoint.
    pub fn connect(url: &str, options: &Options) -> Result<Server> {
        let base = url.trim_end_matches('/').to_string();
        let shown = redact(&base);
        let agent = ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(10)).timeout(options.timeout).build();
        let section = options.section;
        let pace = (options.requests_per_minute > 0)
            .then(|| (Mutex::new(Instant::now()), Duration::from_secs_f64(60.0 / options.requests_per_minute as f64)));
        let mut server = Server {
            section,
            base,
            shown,
            model: String::new(),
            engine: String::new(),
            agent,
            retries: options.retries,
            pace,
            api_key: std::env::var(&options.api_key_env).ok().filter(|k| !k.is_empty()),
            vocab: options.identity.as_ref().map(|i| i.vocab),
            checked: String::new(),
        };
        let models = server.get("/models").with_context(|| format!("{section}.server"))?;
        let served: Vec<&Value> = models["data"].as_array().map(|d| d.iter().collect()).unwrap_or_default();
        let ids: Vec<String> = served.iter().filter_map(|m| m["id"].as_str().map(str::to_string)).collect();
        let aliases = |m: &Value| -> Vec<String> {
            let mut names: Vec<String> = m["id"].as_str().map(str::to_string).into_iter().collect();
            if let Some(a) = m["aliases"].as_array() {
                names.extend(a.iter().filter_map(|n| n.as_str().map(str::to_string)));
            }
            names
        };
        let chosen = served.iter().find(|m| {
            aliases(m).iter().any(|id| match &options.served_model {
                Some(name) => id == name,
                None => options.names.iter().any(|n| same_model(id, n)),
            })
        });
        let Some(chosen) = chosen else {
            let wanted = match &options.served_model {
                Some(name) => format!("{section}.served_model {name:?}"),
                None => format!("{section}.model ({})", options.names.join(", ")),
            };
            bail!(
                "{section}.server {} serves {}, not {wanted}: start it with that model, or set \
                 {section}.served_model to the name it serves the model under",
                server.shown,
                if ids.is_empty() { "no model".to_string() } else { ids.join(", ") }
            );
        };
        server.model = chosen["id"].as_str().unwrap_or_default().to_string();
        server.engine = server.identify(&plain(chosen["owned_by"].as_str().unwrap_or_default()));
        server.checked = match &options.identity {
            Some(identity) => server.check_identity(identity, chosen["meta"]["n_vocab"].as_u64(), options)?,
            None => "a hosted model, known only by its name".to_string(),
        };
        Ok(server)
    }

    /// Checks that the server's model tokenizes as the policy does (and,
    /// where it tells, has the policy's vocabulary size); says how it was
    /// checked, or refuses naming what differed.
    fn check_identity(&self, identity: &Identity, n_vocab: Option<u64>, options: &Options) -> Result<String> {
        let mut differences = Vec::new();
        if let Some(n) = n_vocab
            && n != identity.vocab as u64
        {
            differences.push(format!("its vocabulary has {n} tokens, the model's {}", identity.vocab));
        }
        let mut tokenized = Vec::new();
        for (text, wanted) in &identity.probes {
            let got = self.tokenize(text)?;
            if got.iter().copied().ne(wanted.iter().map(|&t| t as u64)) {
                tokenized.push((text, got, wanted));
            }
        }
        // The first probe that differs, and how many did.
        if let Some((text, got, wanted)) = tokenized.first() {
            differences.push(format!(
                "it tokenizes {:?} as {}, the model as {} ({} of {} probe texts differ)",
                text.chars().take(40).collect::<String>(),
                ids_shown(got),
                ids_shown(wanted),
                tokenized.len(),
                identity.probes.len()
            ));
        }
        if !differences.is_empty() {
            bail!(
                "{s}.server {} serves {:?}, which is not {s}.model ({}): {} (another model under the same \
                 name? start the server on the model's own files)",
                self.shown,
                self.model,
                options.names.join(", "),
                differences.join("; "),
                s = self.section
            );
        }
        let vocab = if n_vocab.is_some() { " and its vocabulary size" } else { "" };
        Ok(format!("its model checked by its tokenization of {} probe texts{vocab}", identity.probes.len()))
    }

    /// The server's own token ids for `text`, special tokens parsed and none
    /// added: `POST /tokenize` at the server's root (llama.cpp, vLLM,
    /// SGLang), else under the API's prefix (SGLang's `/v1/tokenize`). The
    /// body carries llama.cpp's fields and vLLM's and SGLang's; each ignores
    /// the others'.
    fn tokenize(&self, text: &str) -> Result<Vec<u64>> {
        let body = json!({
            "model": self.model,
            "content": text,
            "add_special": false,
            "parse_special": true,
            "prompt": text,
            "add_special_tokens": false,
        })
        .to_string();
        let root = self.base.strip_suffix("/v1").unwrap_or(&self.base);
        let mut answer = self.with_retries(|| self.post(&format!("{root}/tokenize"), &body));
        if answer.is_err() && root != self.base {
            answer = self.with_retries(|| self.post(&format!("{}/tokenize", self.base), &body)).or(answer);
        }
        let s = self.section;
        let v = answer.map_err(|f| {
            anyhow!(
                "{s}.server {}: POST /tokenize: {}; prefgen checks that a server serves the model by its \
                 tokenization, so a server must answer /tokenize (llama.cpp, vLLM and SGLang do)",
                self.shown,
                f.message()
            )
        })?;
        let tokens = v["tokens"]
            .as_array()
            .with_context(|| format!("{s}.server {}: POST /tokenize answered no \"tokens\" list", self.shown))?;
        tokens.iter().map(|t| t.as_u64()).collect::<Option<_>>().with_context(|| {
            format!("{s}.server {}: POST /tokenize answered tokens that are not all integers", self.shown)
        })
    }

    /// POST a JSON body to `url` once.
    fn post(&self, url: &str, body: &str) -> Result<Value, Failure> {
        let request = self.authorised(self.agent.post(url).set("Content-Type", "application/json"));
        Self::read(request.send_string(body))
    }

    /// `NAME VERSION, served over the OpenAI API, deterministic or not`.
    fn identify(&self, owned_by: &str) -> String {
        let root = self.base.strip_suffix("/v1").unwrap_or(&self.base).to_string();
        let get = |path: &str| self.fetch(&format!("{root}{path}")).ok();
        let (name, version, deterministic) = match owned_by {
            "llamacpp" => {
                let props = get("/props").unwrap_or(Value::Null);
                let slots = props["total_slots"].as_u64().unwrap_or(0);
                let version = plain(props["build_info"].as_str().unwrap_or("version unknown"));
                let determinism = match slots {
                    0 => "slots unknown: not known to be deterministic".to_string(),
                    1 => "1 slot: deterministic".to_string(),
                    n => format!("{n} slots: not deterministic (a response depends on the requests batched with it)"),
                };
                ("llama.cpp", version, determinism)
            }
            other => {
                let name = match other {
                    "vllm" => "vLLM",
                    "sglang" => "SGLang",
                    "" => "an unknown engine",
                    o => o,
                };
                let v = get("/version").unwrap_or(Value::Null);
                let version = plain(v["version"].as_str().unwrap_or("version unknown"));
                (name, version, "not known to be deterministic".to_string())
            }
        };
        format!("{name} {version} (OpenAI-compatible server, {deterministic})")
    }

    /// GET `{base}{path}` as JSON, retried like a completion.
    fn get(&self, path: &str) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        self.with_retries(|| self.fetch(&url)).map_err(|f| anyhow!("GET {}{path}: {}", self.shown, f.message()))
    }

    /// GET an absolute URL once (engine details: absent on some servers).
    fn fetch(&self, url: &str) -> Result<Value, Failure> {
        Self::read(self.authorised(self.agent.get(url)).call())
    }

    /// `request` with the API key, when there is one.
    fn authorised(&self, request: ureq::Request) -> ureq::Request {
        match &self.api_key {
            Some(key) => request.set("Authorization", &format!("Bearer {key}")),
            None => request,
        }
    }

    fn read(response: Result<ureq::Response, ureq::Error>) -> Result<Value, Failure> {
        match response {
            Ok(r) => {
                let body =
                    r.into_string().map_err(|e| Failure::Transient(format!("reading the response: {e}"), None))?;
                serde_json::from_str(&body).map_err(|e| Failure::Rejected(format!("the response is not JSON: {e}")))
            }
            Err(ureq::Error::Status(code, r)) => {
                let wait = r.header("Retry-After").and_then(retry_after);
                let message = message_of(&r.into_string().unwrap_or_default());
                match code {
                    408 | 429 | 500..=599 => Err(Failure::Transient(format!("HTTP {code}: {message}"), wait)),
                    400 | 413 if is_too_long(&message) => Err(Failure::TooLong),
                    _ => Err(Failure::Rejected(format!("HTTP {code}: {message}"))),
                }
            }
            Err(ureq::Error::Transport(t)) => Err(Failure::Transient(redact(&t.to_string()), None)),
        }
    }

    /// Runs `attempt` until it succeeds or fails for good: transient
    /// failures are retried `retries` times, after the server's `Retry-After`
    /// when it gives one, else exponential backoff with full jitter (0.5 s
    /// doubling, at most 20 s).
    fn with_retries<T>(&self, mut attempt: impl FnMut() -> Result<T, Failure>) -> Result<T, Failure> {
        let mut tries = 0;
        loop {
            match attempt() {
                Err(Failure::Transient(m, asked)) if tries < self.retries => {
                    let ceiling = (0.5 * 2f64.powi(tries as i32)).min(20.0);
                    let mut noise = [0u8; 4];
                    let _ = getrandom::fill(&mut noise);
                    let fraction = u32::from_le_bytes(noise) as f64 / u32::MAX as f64;
                    let (wait, why) = match asked {
                        Some(wait) => (wait, " as its Retry-After asks"),
                        None => (Duration::from_secs_f64(ceiling * fraction), ""),
                    };
                    tries += 1;
                    eprintln!(
                        "{}: {m}; retrying ({tries} of {}) in {:.1}s{why}",
                        self.shown,
                        self.retries,
                        wait.as_secs_f64()
                    );
                    std::thread::sleep(wait);
                }
                Err(Failure::Transient(m, _)) if tries > 0 => {
                    return Err(Failure::Transient(format!("{m} (after {tries} retries)"), None));
                }
                other => return other,
            }
        }
    }

    /// Waits for the request's turn under `requests_per_minute`.
    fn paced(&self) {
        let Some((next, gap)) = &self.pace else { return };
        let at = {
            let mut next = next.lock().unwrap_or_else(|e| e.into_inner());
            let at = (*next).max(Instant::now());
            *next = at + *gap;
            at
        };
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
    }

    /// POSTs `body` to `{base}{path}`, paced and retried; "too long" is
    /// None, any other failure the error, naming the URL.
    fn ask(&self, path: &str, body: &Value) -> Result<Option<Value>> {
        let (url, body) = (format!("{}{path}", self.base), body.to_string());
        match self.with_retries(|| {
            self.paced();
            self.post(&url, &body)
        }) {
            Ok(v) => Ok(Some(v)),
            Err(Failure::TooLong) => Ok(None),
            Err(f) => bail!("POST {}{path}: {}", self.shown, f.message()),
        }
    }

    /// The body of one completion request.
    fn body(&self, request: &Request, sampling: &Sampling) -> Value {
        json!({
            "model": self.model,
            "prompt": request.prompt,
            "max_tokens": request.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "seed": request.seed,
            "n": 1,
            "stream": false,
            "top_k": -1,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "stop_token_ids": sampling.stop,
            "skip_special_tokens": true,
            "return_token_ids": true,
            "samplers": ["temperature", "top_p"],
            "return_tokens": true,
            "verbose": true,
            "cache_prompt": false,
        })
    }

    /// Completes one prompt (retried); a rejection other than "too long" is
    /// the error, with the server's message.
    pub fn complete(&self, request: &Request, sampling: &Sampling) -> Result<Reply> {
        let Some(v) = self.ask("/completions", &self.body(request, sampling))? else { return Ok(Reply::TooLong) };
        let choice = &v["choices"][0];
        let ids = choice["token_ids"].as_array().or(v["__verbose"]["tokens"].as_array());
        if let Some(ids) = ids {
            // An id that is not one of the policy's tokens is an error, never
            // wrapped to another token or dropped from the text.
            let ids: Vec<u32> = ids.iter().map(|t| self.id(t, "/completions")).collect::<Result<_>>()?;
            let end = ids.iter().position(|t| sampling.stop.contains(t)).unwrap_or(ids.len());
            return Ok(Reply::Ids(ids[..end.min(request.max_tokens)].to_vec()));
        }
        match choice["text"].as_str() {
            Some(text) => Ok(Reply::Text(text.to_string())),
            None => bail!("POST {}/completions: the response has neither token ids nor text", self.shown),
        }
    }

    /// A token id the server returned, checked to be one of the model's.
    fn id(&self, t: &Value, path: &str) -> Result<u32> {
        match (t.as_u64(), self.vocab) {
            (Some(id), Some(vocab)) if id < vocab as u64 => Ok(id as u32),
            (Some(id), None) if id <= u32::MAX as u64 => Ok(id as u32),
            _ => bail!(
                "POST {}{path}: the response's token id {t} is not one of the model's {} tokens (does the server \
                 serve another model?)",
                self.shown,
                self.vocab.unwrap_or_default()
            ),
        }
    }

    /// Completes every request, `concurrency` in flight; `progress(tokens)`
    /// is called as each one finishes. The first request that fails for good
    /// stops the rest, and its error names its index.
    pub fn complete_all(
        &self,
        requests: &[Request],
        sampling: &Sampling,
        concurrency: usize,
        mut progress: impl FnMut(usize),
    ) -> Result<Vec<Reply>, (usize, anyhow::Error)> {
        let tokens = |r: &Reply| match r {
            Reply::Ids(ids) => ids.len(),
            _ => 0,
        };
        each(requests, concurrency, |r| self.complete(r, sampling), |r| progress(tokens(r)))
    }

    /// The next token's `n` most likely candidates and their log-probabilities
    /// after `ask` (greedy, one token); None when the server rejects the
    /// prompt as longer than its context. An answer without log-probabilities
    /// is an error naming the server.
    pub fn next_token(&self, ask: &Ask, n: usize, kwargs: &Kwargs) -> Result<Option<Vec<(Token, f64)>>> {
        let (path, mut body) = match ask {
            // `logprobs` is the count for vLLM, SGLang and llama.cpp (its
            // `n_probs`, from the full softmax before any sampler);
            // `return_tokens_as_token_ids` has vLLM name ids, not texts.
            Ask::Ids(ids) => (
                "/completions",
                json!({
                    "model": self.model, "prompt": ids, "max_tokens": 1, "temperature": 0.0, "n": 1,
                    "stream": false, "logprobs": n, "return_tokens_as_token_ids": true, "cache_prompt": false,
                }),
            ),
            Ask::Chat(text) => (
                "/chat/completions",
                json!({
                    "model": self.model, "messages": [{"role": "user", "content": text}], "max_tokens": 1,
                    "temperature": 0.0, "n": 1, "stream": false, "logprobs": true, "top_logprobs": n,
                }),
            ),
        };
        // The server renders a chat: the template variables go with it (vLLM,
        // SGLang and llama.cpp read `chat_template_kwargs`); left out when
        // none, for APIs that refuse fields they do not know.
        if matches!(ask, Ask::Chat(_)) && !kwargs.is_empty() {
            body["chat_template_kwargs"] = json!(kwargs);
        }
        let Some(v) = self.ask(path, &body)? else { return Ok(None) };
        let logprobs = &v["choices"][0]["logprobs"];
        let entry = |token: Token, lp: &Value| lp.as_f64().map(|lp| (token, lp));
        // Chat, llama.cpp and newer servers: a list of {id?, token, logprob};
        // the legacy completions format (vLLM, SGLang, OpenAI): {token: logprob}.
        let candidates: Option<Vec<(Token, f64)>> =
            match (logprobs["content"][0]["top_logprobs"].as_array(), logprobs["top_logprobs"][0].as_object()) {
                (Some(list), _) => list
                    .iter()
                    .map(|c| {
                        let token = match (ask, c["id"].as_u64()) {
                            // Chat: the server's ids are not checked to be the model's.
                            (Ask::Ids(_), Some(_)) => Token::Id(self.id(&c["id"], path).ok()?),
                            _ => Token::of(c["token"].as_str()?),
                        };
                        entry(token, &c["logprob"])
                    })
                    .collect(),
                (None, Some(map)) => map.iter().map(|(t, lp)| entry(Token::of(t), lp)).collect(),
                (None, None) => None,
            };
        match candidates {
            Some(c) if !c.is_empty() => Ok(Some(c)),
            _ => bail!(
                "{}.server {}: POST {path} answered no next-token log-probabilities, which the judge's score is \
                 computed from (vLLM, SGLang and llama-server return them; a hosted API must support \
                 `logprobs` with `top_logprobs`)",
                self.section,
                self.shown
            ),
        }
    }
}

/// What a judge asks a server.
#[derive(Debug, Clone)]
pub enum Ask {
    /// prefgen's own prompt ids, to `/completions`.
    Ids(Vec<u32>),
    /// One user message, to `/chat/completions` (the server renders it).
    Chat(String),
}

/// A candidate next token: its id where the server names ids, else its text.
#[derive(Debug, Clone, PartialEq)]
pub enum Token {
    Id(u32),
    Text(String),
}

impl Token {
    /// A token as a server spells it: `token_id:42` (vLLM's
    /// `return_tokens_as_token_ids`) is an id; anything else its text.
    fn of(text: &str) -> Token {
        match text.strip_prefix("token_id:").and_then(|id| id.parse().ok()) {
            Some(id) => Token::Id(id),
            None => Token::Text(text.to_string()),
        }
    }
}

/// `work` on every item, `concurrency` at a time on scoped threads;
/// `done` is called as each finishes. The first item that fails stops the
/// rest, and its error names its index.
pub fn each<I: Sync, T: Send>(
    items: &[I],
    concurrency: usize,
    work: impl Fn(&I) -> Result<T> + Sync,
    mut done: impl FnMut(&T),
) -> Result<Vec<T>, (usize, anyhow::Error)> {
    let next = Mutex::new(0usize);
    let failed = AtomicBool::new(false);
    let mut out: Vec<Option<T>> = (0..items.len()).map(|_| None).collect();
    let (tx, rx) = mpsc::channel::<(usize, Result<T>)>();
    let first_error = std::thread::scope(|scope| {
        for _ in 0..concurrency.clamp(1, items.len().max(1)) {
            let tx = tx.clone();
            let (next, failed, work) = (&next, &failed, &work);
            scope.spawn(move || {
                loop {
                    let i = {
                        let mut n = next.lock().expect("the item counter is never poisoned");
                        let i = *n;
                        *n += 1;
                        i
                    };
                    if i >= items.len() || failed.load(Ordering::Relaxed) {
                        break;
                    }
                    let result = work(&items[i]);
                    if result.is_err() {
                        failed.store(true, Ordering::Relaxed);
                    }
                    if tx.send((i, result)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let mut first_error = None;
        for (i, result) in rx {
            match result {
                Ok(r) => {
                    done(&r);
                    out[i] = Some(r);
                }
                Err(e) => {
                    if first_error.is_none() {
                        first_error = Some((i, e));
                    }
                }
            }
        }
        first_error
    });
    match first_error {
        Some(e) => Err(e),
        None => Ok(out.into_iter().map(|r| r.expect("every item is done")).collect()),
    }
}

impl Failure {
    fn message(self) -> String {
        match self {
            Failure::Transient(m, _) | Failure::Rejected(m) => m,
            Failure::TooLong => "rejected as longer than the model's context".to_string(),
        }
    }
}

/// A `Retry-After` header's wait: seconds (an HTTP date is left to the
/// backoff), at most 10 minutes.
fn retry_after(value: &str) -> Option<Duration> {
    let secs: f64 = value.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(600.0)))
}

/// Whether a served model id names the policy `name`: equal, or equal file
/// names (a server started on `/models/x.gguf` serves `x.gguf` from any
/// folder; a hub id's last part is its folder's name).
fn same_model(id: &str, name: &str) -> bool {
    let last = |s: &str| s.trim_end_matches('/').rsplit('/').next().unwrap_or(s).to_string();
    id == name || last(id) == last(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_variables_and_hide_passwords() {
        // SAFETY: no other thread of this test binary reads this variable.
        unsafe { std::env::set_var("PREFGEN_TEST_NODE", "gpu-7") };
        assert_eq!(expand_env("http://${PREFGEN_TEST_NODE}:8000/v1").unwrap(), "http://gpu-7:8000/v1");
        let err = expand_env("http://me:pw-${PREFGEN_TEST_UNSET_VAR}@h/v1").unwrap_err().to_string();
        assert!(err.contains("PREFGEN_TEST_UNSET_VAR") && !err.contains("pw-"), "{err}");
    }

    #[test]
    fn a_server_s_names_are_plain_text() {
        assert_eq!(plain("b4589-4b4ba4e9"), "b4589-4b4ba4e9");
        assert_eq!(plain("evil\n| row |<script>"), "evil?? row ??script?");
        assert_eq!(plain(&"x".repeat(200)).len(), 80);
    }

    #[test]
    fn served_names_match_by_file_name() {
        assert!(same_model("models/SmolLM2-135M-Instruct.Q4_1.gguf", "/abs/SmolLM2-135M-Instruct.Q4_1.gguf"));
        assert!(same_model("meta-llama/Meta-Llama-3-8B-Instruct", "meta-llama/Meta-Llama-3-8B-Instruct"));
        assert!(!same_model("gemma-3-270m-q4_k_m.gguf", "SmolLM2-135M-Instruct.Q4_1.gguf"));
    }

    #[test]
    fn retry_after_is_read_in_seconds() {
        assert_eq!(retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(retry_after(" 0.5 "), Some(Duration::from_millis(500)));
        assert_eq!(retry_after("86400"), Some(Duration::from_secs(600)));
        assert_eq!(retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(Token::of("token_id:42"), Token::Id(42));
        assert_eq!(Token::of(" 7"), Token::Text(" 7".into()));
    }

    #[test]
    fn context_rejections_are_told_apart() {
        assert!(is_too_long("request (5000 tokens) exceeds the available context size (4096 tokens)"));
        assert!(is_too_long("This model's maximum context length is 8192 tokens. However, you requested 9000"));
        assert!(!is_too_long("Unsupported param: best_of"));
        assert_eq!(message_of(r#"{"error":{"code":400,"message":"bad"}}"#), "bad");
        assert_eq!(message_of("plain text"), "plain text");
    }
}
