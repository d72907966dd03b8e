//! The text side of a model: its tokenizer, chat template and stop tokens,
//! read without its weights (a policy served by an inference server needs
//! only these).

use super::files;
use super::gguf::GgufFile;
use super::models::family::Family;
use super::template::{ChatTemplate, Kwargs, Turn};
use anyhow::{Context, Result, bail};
use std::path::Path;
use tokenizers::Tokenizer;

/// End-of-turn markers of the chat formats prefgen knows; any the vocabulary
/// holds as a control token stops generation, besides the file's eos id.
const END_OF_TURN: [&str; 4] = ["<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"];

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

/// A model's tokenizer, chat template and stop tokens.
pub struct Chat {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    /// Token ids that end a response (not part of its text).
    pub stop: Vec<u32>,
    /// Whether decoding applies `clean_up_tokenization_spaces`.
    clean_up: bool,
    /// The longest sequence (prompt and response) the model takes, as its
    /// config gives it.
    pub context: usize,
}

impl Chat {
    /// Reads a `.gguf` file's header, or a hub-layout model folder's
    /// tokenizer and configs; `chat_template` replaces the model's own.
    pub fn load(path: &Path, chat_template: Option<&Path>) -> Result<Chat> {
        let template = chat_template
            .map(|p| {
                std::fs::read_to_string(p).with_context(|| format!("cannot read the chat template {}", p.display()))
            })
            .transpose()?;
        let origin = || match chat_template {
            Some(p) => format!("the chat template {}", p.display()),
            None => format!("the chat template of {}", path.display()),
        };
        if path.is_dir() {
            return Chat::from_folder(path, template, origin);
        }
        if path.extension().and_then(|e| e.to_str()) != Some("gguf") {
            bail!("{} is neither a .gguf file nor a model folder", path.display());
        }
        let file = GgufFile::open(path)?;
        let tokenizer = file.tokenizer()?;
        let bos = file.u32("tokenizer.ggml.bos_token_id").and_then(|id| file.token(id)).unwrap_or_default();
        let eos_id = file.u32("tokenizer.ggml.eos_token_id")?;
        let source = match template {
            Some(t) => t,
            None => file.chat_template().context("set generate.chat_template to give it one")?,
        };
        let template = ChatTemplate::new(&source, &bos, &file.token(eos_id)?, origin())?;
        let context = file.u32(&format!("{}.context_length", file.architecture()?))? as usize;
        // transformers' GGUF tokenizers keep its default: no clean-up.
        Ok(Chat::assemble(tokenizer, template, vec![eos_id], false, context))
    }

    /// A folder as a hub snapshot holds it: `config.json`, `tokenizer.json`,
    /// `tokenizer_config.json` (with `chat_template`) and
    /// `generation_config.json` (its `eos_token_id`, one or a list, is where
    /// generation stops).
    fn from_folder(dir: &Path, template: Option<String>, origin: impl Fn() -> String) -> Result<Chat> {
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
        let template = ChatTemplate::new(&source, &token(&tc["bos_token"]), &token(&tc["eos_token"]), origin())?;
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
        // A multimodal checkpoint's is its language model's.
        let text = match config["architectures"][0].as_str().and_then(Family::of_architecture) {
            Some((family, wrapped)) => family.text_config(&config, wrapped),
            None => None,
        };
        let context = text.as_ref().unwrap_or(&config)["max_position_embeddings"]
            .as_u64()
            .with_context(|| format!("{}: config.json has no max_position_embeddings", dir.display()))?;
        Ok(Chat::assemble(tokenizer, template, stop, clean_up, context as usize))
    }

    fn assemble(
        tokenizer: Tokenizer,
        template: ChatTemplate,
        mut stop: Vec<u32>,
        clean_up: bool,
        context: usize,
    ) -> Chat {
        for marker in END_OF_TURN {
            if let Some(id) = tokenizer.token_to_id(marker)
                && !stop.contains(&id)
            {
                stop.push(id);
            }
        }
        Chat { tokenizer, template, stop, clean_up, context }
    }

    /// The prompt as the model sees it: its chat template over one user turn,
    /// with the generation prompt, the template's variables at their defaults.
    pub fn format_prompt(&self, prompt: &str) -> Result<String> {
        self.prompt_with(prompt, &Kwargs::new())
    }

    /// [`Chat::format_prompt`] with the template variables `kwargs`.
    pub fn prompt_with(&self, prompt: &str, kwargs: &Kwargs) -> Result<String> {
        self.render(&[Turn { role: "user", content: prompt }], true, kwargs)
    }

    /// The chat template over `turns`.
    pub fn render(&self, turns: &[Turn], add_generation_prompt: bool, kwargs: &Kwargs) -> Result<String> {
        self.template.render(turns, add_generation_prompt, kwargs)
    }

    /// Token ids of a rendered prompt. Its special tokens come from the
    /// template; `add_special_tokens` adds the tokenizer's own again (a second
    /// BOS), as SimPO's decode.py did through vLLM.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.tokenizer.encode(text, add_special_tokens).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Tokens in the vocabulary, added tokens included.
    pub fn vocab(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Token `id` as the vocabulary writes it (`<|im_end|>`).
    pub fn token(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }

    /// Response text as `transformers` decodes it with `skip_special_tokens=True`:
    /// a UTF-8 sequence cut short becomes U+FFFD, and spaces are cleaned up
    /// where the tokenizer's config says so.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let text = self.tokenizer.decode(ids, true).map_err(|e| anyhow::anyhow!("detokenizing: {e}"))?;
        Ok(if self.clean_up { clean_up_tokenization(&text) } else { text })
    }
}
