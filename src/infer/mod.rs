//! Model inference: loading a policy, chat templates, tokenizers, sampling
//! and the batched decoding engine.

pub mod dense;
pub mod engine;
pub mod files;
pub mod gguf;
pub mod models;
pub mod qmatmul;
pub mod reward;
pub mod sampler;
pub mod template;

use anyhow::{Context, Result, bail};
use candle_core::Device;
use gguf::GgufFile;
use models::decoder::Decoder;
use std::path::Path;
use template::{ChatTemplate, Turn};
use tokenizers::Tokenizer;

/// End-of-turn markers of the chat formats prefgen knows; any the vocabulary
/// holds as a control token stops generation, besides the file's eos id.
const END_OF_TURN: [&str; 4] = ["<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"];

/// The GPU when prefgen is built with `--features cuda` and one is present,
/// otherwise the CPU.
pub fn device() -> Result<Device> {
    Ok(Device::cuda_if_available(0)?)
}

/// Fixes candle's CPU thread count for the process. Its dense matmul asks
/// for the count on every call, and without `RAYON_NUM_THREADS` it counts
/// the physical cores from /proc/cpuinfo each time (3% of decoding time).
///
/// # Safety
/// It sets an environment variable: no other thread may be running.
pub unsafe fn settle_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        // SAFETY: the caller's promise, that this process has one thread.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
}

/// transformers' `clean_up_tokenization`, replacement for replacement.
fn clean_up_tokenization(text: &str) -> String {
    [
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ]
    .iter()
    .fold(text.to_string(), |t, (from, to)| t.replace(from, to))
}

/// How to load a policy.
#[derive(Debug, Default, Clone)]
pub struct Load<'a> {
    /// A Jinja file that replaces the model's own chat template (a base model
    /// has none).
    pub chat_template: Option<&'a Path>,
    /// Run a GGUF file's weights in f32 rather than as quantized matmuls.
    pub dequantize: bool,
}

/// A policy ready to generate: weights, tokenizer, template and stop tokens.
pub struct Policy {
    pub model: Decoder,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    /// Token ids that end a response (not part of its text).
    pub stop: Vec<u32>,
    /// Whether decoding applies `clean_up_tokenization_spaces`.
    clean_up: bool,
}

impl Policy {
    /// Loads a policy: a `.gguf` file, or a hub-layout model folder.
    pub fn load(path: &Path, options: &Load) -> Result<Policy> {
        let template = options
            .chat_template
            .map(|p| {
                std::fs::read_to_string(p).with_context(|| format!("cannot read the chat template {}", p.display()))
            })
            .transpose()?;
        let origin = || match options.chat_template {
            Some(p) => format!("the chat template {}", p.display()),
            None => format!("the chat template of {}", path.display()),
        };
        if path.is_dir() {
            return Policy::from_folder(path, template, origin);
        }
        if path.extension().and_then(|e| e.to_str()) != Some("gguf") {
            bail!("generate.model: {} is neither a .gguf file nor a model folder", path.display());
        }
        let file = GgufFile::open(path)?;
        let tokenizer = file.tokenizer()?;
        let bos = file.u32("tokenizer.ggml.bos_token_id").and_then(|id| file.token(id)).unwrap_or_default();
        let eos_id = file.u32("tokenizer.ggml.eos_token_id")?;
        let source = match template {
            Some(t) => t,
            None => file.chat_template().context("set generate.chat_template to give it one")?,
        };
        let template = ChatTemplate::new(&source, &bos, &file.token(eos_id)?).with_context(origin)?;
        let model = Decoder::from_gguf(&file, &device()?, options.dequantize)?;
        // transformers' GGUF tokenizers keep its default: no clean-up.
        Ok(Policy::assemble(model, tokenizer, template, vec![eos_id], false))
    }

    /// A folder as a hub snapshot holds it: `config.json`, `tokenizer.json`,
    /// `tokenizer_config.json` (with `chat_template`), `generation_config.json`
    /// (its `eos_token_id`, one or a list, is where generation stops) and
    /// `*.safetensors`.
    fn from_folder(dir: &Path, template: Option<String>, origin: impl Fn() -> String) -> Result<Policy> {
        let read = |name: &str| -> Result<serde_json::Value> {
            let p = dir.join(name);
            let text = std::fs::read_to_string(&p).with_context(|| format!("{}: cannot read {name}", dir.display()))?;
            serde_json::from_str(&text).with_context(|| format!("{}: {name} is not JSON", dir.display()))
        };
        let config = read(files::CONFIG)?;
        let tokenizer = Tokenizer::from_file(dir.join(files::TOKENIZER))
            .map_err(|e| anyhow::anyhow!("{}: cannot load {}: {e}", dir.display(), files::TOKENIZER))?;
        let tc = read(files::TOKENIZER_CONFIG)?;
        let token = |v: &serde_json::Value| v.as_str().or_else(|| v["content"].as_str()).unwrap_or("").to_string();
        let separate = template.or_else(|| std::fs::read_to_string(dir.join(files::CHAT_TEMPLATE)).ok());
        let source = match (&tc["chat_template"], separate) {
            (_, Some(t)) => t,
            (template, None) => match template {
                serde_json::Value::String(t) => t.clone(),
                serde_json::Value::Array(named) => named
                    .iter()
                    .find(|t| t["name"] == "default")
                    .and_then(|t| t["template"].as_str())
                    .map(str::to_string)
                    .with_context(|| format!("{}: no default chat template", dir.display()))?,
                _ => bail!("{}: no chat_template.jinja, and tokenizer_config.json has no chat_template", dir.display()),
            },
        };
        let template =
            ChatTemplate::new(&source, &token(&tc["bos_token"]), &token(&tc["eos_token"])).with_context(origin)?;
        let eos = match read(files::GENERATION_CONFIG) {
            Ok(g) => g["eos_token_id"].clone(),
            Err(_) => config["eos_token_id"].clone(),
        };
        let stop: Vec<u32> = match eos {
            serde_json::Value::Array(ids) => ids.iter().filter_map(|i| i.as_u64()).map(|i| i as u32).collect(),
            v => v.as_u64().map(|i| vec![i as u32]).unwrap_or_default(),
        };
        // As transformers decodes: `clean_up_tokenization_spaces` (default
        // false), which it skips for BPE tokenizers (it would strip real
        // spaces before punctuation) unless forced.
        let flag = |key: &str| tc[key].as_bool().unwrap_or(false);
        let bpe = matches!(tokenizer.get_model(), tokenizers::ModelWrapper::BPE(_));
        let clean_up = flag("clean_up_tokenization_spaces")
            && (!bpe || flag("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"));
        let model = Decoder::from_safetensors(dir, &device()?)?;
        Ok(Policy::assemble(model, tokenizer, template, stop, clean_up))
    }

    fn assemble(
        model: Decoder,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        mut stop: Vec<u32>,
        clean_up: bool,
    ) -> Policy {
        for marker in END_OF_TURN {
            if let Some(id) = tokenizer.token_to_id(marker)
                && !stop.contains(&id)
            {
                stop.push(id);
            }
        }
        Policy { model, tokenizer, template, stop, clean_up }
    }

    /// The prompt as the model sees it: its chat template over one user turn,
    /// with the generation prompt.
    pub fn format_prompt(&self, prompt: &str) -> Result<String> {
        self.template.render(&[Turn { role: "user", content: prompt }], true)
    }

    /// Token ids of a rendered prompt. Its special tokens come from the
    /// template; `add_special_tokens` adds the tokenizer's own again (a second
    /// BOS), as SimPO's decode.py did through vLLM.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.tokenizer.encode(text, add_special_tokens).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Response text as `transformers` decodes it with `skip_special_tokens=True`:
    /// a UTF-8 sequence cut short becomes U+FFFD, and spaces are cleaned up
    /// where the tokenizer's config says so.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let text = self.tokenizer.decode(ids, true).map_err(|e| anyhow::anyhow!("detokenizing: {e}"))?;
        Ok(if self.clean_up { clean_up_tokenization(&text) } else { text })
    }

    /// The longest sequence (prompt and response) the model takes.
    pub fn context(&self) -> usize {
        self.model.cfg.context
    }

    /// What computes its outputs (see [`Decoder::engine`]).
    pub fn engine(&self) -> String {
        self.model.engine()
    }
}
