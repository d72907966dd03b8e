//! Model inference: loading a policy, chat templates, tokenizers, sampling
//! and the batched decoding engine.

pub mod engine;
pub mod gguf;
pub mod models;
pub mod sampler;
pub mod template;

use anyhow::{Result, bail};
use candle_core::Device;
use gguf::GgufFile;
use models::quantized_llama::QuantizedLlama;
use std::path::Path;
use template::{ChatTemplate, Turn};
use tokenizers::Tokenizer;

/// End-of-turn markers of the chat formats prefgen knows; any the vocabulary
/// holds as a control token stops generation, besides the file's eos id.
const END_OF_TURN: [&str; 4] = ["<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"];

/// A policy ready to generate: weights, tokenizer, template and stop tokens.
pub struct Policy {
    pub model: QuantizedLlama,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    /// Token ids that end a response (not part of its text).
    pub stop: Vec<u32>,
}

impl Policy {
    /// Loads a `.gguf` policy for the CPU.
    pub fn load(path: &Path) -> Result<Policy> {
        if path.extension().and_then(|e| e.to_str()) != Some("gguf") {
            bail!(
                "generate.model: {} is not a .gguf file; this build of prefgen samples from GGUF Llama models \
                 (hub ids and safetensors folders are not supported yet)",
                path.display()
            );
        }
        let file = GgufFile::open(path)?;
        let arch = file.architecture()?;
        if arch != "llama" {
            bail!("{}: GGUF architecture {arch:?} is not supported yet (llama is)", path.display());
        }
        let tokenizer = file.tokenizer()?;
        let bos = file.u32("tokenizer.ggml.bos_token_id").and_then(|id| file.token(id)).unwrap_or_default();
        let eos_id = file.u32("tokenizer.ggml.eos_token_id")?;
        let template = ChatTemplate::new(&file.chat_template()?, &bos, &file.token(eos_id)?)?;
        let mut stop = vec![eos_id];
        for marker in END_OF_TURN {
            if let Some(id) = tokenizer.token_to_id(marker)
                && !stop.contains(&id)
            {
                stop.push(id);
            }
        }
        let model = QuantizedLlama::load(&file, &Device::Cpu)?;
        Ok(Policy { model, tokenizer, template, stop })
    }

    /// The prompt as the model sees it: its chat template over one user turn,
    /// with the generation prompt.
    pub fn format_prompt(&self, prompt: &str) -> Result<String> {
        self.template.render(&[Turn { role: "user", content: prompt }], true)
    }

    /// Token ids of a rendered prompt (its special tokens come from the template).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.tokenizer.encode(text, false).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Response text as `transformers` decodes it with `skip_special_tokens=True`.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, true).map_err(|e| anyhow::anyhow!("detokenizing: {e}"))
    }

    /// The longest sequence (prompt and response) the model takes.
    pub fn context(&self) -> usize {
        self.model.cfg.context
    }
}
