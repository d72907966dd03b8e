//! What a `.gguf` file carries besides weights: the model's hyper-parameters,
//! its tokenizer (rebuilt as `transformers`' GGUF loader rebuilds it) and its
//! chat template.

use anyhow::{Context, Result, anyhow, bail};
use candle_core::quantized::gguf_file::{Content, Value};
use std::collections::HashMap;
use std::path::Path;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

/// A GGUF file's header, opened once.
pub struct GgufFile {
    pub content: Content,
    pub path: std::path::PathBuf,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let mut f = std::fs::File::open(path).with_context(|| format!("cannot open model file {}", path.display()))?;
        let content =
            Content::read(&mut f).map_err(|e| anyhow!("{}: not a readable GGUF file: {e}", path.display()))?;
        Ok(GgufFile { content, path: path.to_path_buf() })
    }

    fn get(&self, key: &str) -> Result<&Value> {
        self.content.metadata.get(key).ok_or_else(|| anyhow!("{}: no {key} in the GGUF metadata", self.path.display()))
    }

    pub fn u32(&self, key: &str) -> Result<u32> {
        self.get(key)?.to_u32().map_err(|e| anyhow!("{key}: {e}"))
    }

    pub fn f32(&self, key: &str) -> Result<f32> {
        self.get(key)?.to_f32().map_err(|e| anyhow!("{key}: {e}"))
    }

    pub fn string(&self, key: &str) -> Result<String> {
        Ok(self.get(key)?.to_string().map_err(|e| anyhow!("{key}: {e}"))?.clone())
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        let values = self.get(key)?.to_vec().map_err(|e| anyhow!("{key}: {e}"))?;
        values.iter().map(|v| v.to_string().cloned().map_err(|e| anyhow!("{key}: {e}"))).collect()
    }

    fn ints(&self, key: &str) -> Result<Vec<i64>> {
        let values = self.get(key)?.to_vec().map_err(|e| anyhow!("{key}: {e}"))?;
        values
            .iter()
            .map(|v| {
                v.to_i32().map(i64::from).or_else(|_| v.to_u32().map(i64::from)).map_err(|e| anyhow!("{key}: {e}"))
            })
            .collect()
    }

    /// `general.architecture`: `llama`, `gemma3`, ...
    pub fn architecture(&self) -> Result<String> {
        self.string("general.architecture")
    }

    /// The chat template the file carries.
    pub fn chat_template(&self) -> Result<String> {
        self.string("tokenizer.chat_template")
            .map_err(|_| anyhow!("{}: the GGUF file carries no tokenizer.chat_template", self.path.display()))
    }

    /// The token string of an id.
    pub fn token(&self, id: u32) -> Result<String> {
        let key = "tokenizer.ggml.tokens";
        let tokens = self.get(key)?.to_vec().map_err(|e| anyhow!("{key}: {e}"))?;
        let token = tokens.get(id as usize).ok_or_else(|| anyhow!("token id {id} is outside the vocabulary"))?;
        Ok(token.to_string().map_err(|e| anyhow!("{key}: {e}"))?.clone())
    }

    /// The tokenizer, for the byte-level BPE vocabularies (`tokenizer.ggml.model = gpt2`).
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let kind = self.string("tokenizer.ggml.model")?;
        if kind != "gpt2" {
            bail!("{}: tokenizer type {kind:?} is not supported yet (byte-level BPE \"gpt2\" is)", self.path.display());
        }
        let tokens = self.strings("tokenizer.ggml.tokens")?;
        let types = self.ints("tokenizer.ggml.token_type").unwrap_or_default();
        // As transformers does: a token outside the byte alphabet (a llama.cpp
        // respelling) is spelled back in it.
        let alphabet = byte_alphabet();
        let spelled: std::collections::HashSet<char> = alphabet.values().copied().collect();
        let respell = |t: &str| -> String {
            if t.chars().all(|c| spelled.contains(&c)) {
                t.to_string()
            } else {
                t.bytes().map(|b| alphabet[&b]).collect()
            }
        };
        let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (respell(t), i as u32)).collect();
        let merges: Vec<(String, String)> = self
            .strings("tokenizer.ggml.merges")?
            .iter()
            .filter_map(|m| m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| anyhow!("building the BPE tokenizer: {e}"))?;
        let mut tok = Tokenizer::new(bpe);
        let pre = self.string("tokenizer.ggml.pre").unwrap_or_default();
        match split_regex(&pre) {
            Some(regex) => {
                let split = Split::new(SplitPattern::Regex(regex.into()), SplitDelimiterBehavior::Isolated, false)
                    .map_err(|e| anyhow!("{e}"))?;
                tok.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(vec![
                    split.into(),
                    ByteLevel::new(false, true, false).into(),
                ]))));
            }
            None => {
                tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
            }
        }
        tok.with_decoder(Some(ByteLevel::default()));
        // Control tokens (type 3) are special: matched whole, skipped when decoding.
        let control: Vec<AddedToken> = tokens
            .iter()
            .zip(types.iter())
            .filter(|(t, ty)| **ty == 3 && t.chars().all(|c| spelled.contains(&c)))
            .map(|(t, _)| AddedToken::from(t.clone(), true).normalized(false))
            .collect();
        tok.add_special_tokens(&control);
        Ok(tok)
    }
}

/// The split regex llama.cpp's pre-tokenizer names stand for; None is GPT-2's own.
fn split_regex(pre: &str) -> Option<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    matches!(pre, "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" | "dbrx").then_some(LLAMA3)
}

/// GPT-2's reversible map from bytes to printable characters.
fn byte_alphabet() -> HashMap<u8, char> {
    let mut bytes: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut chars = bytes.clone();
    let mut n = 0;
    for b in 0..=255u32 {
        if !bytes.contains(&b) {
            bytes.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    bytes.into_iter().zip(chars).map(|(b, c)| (b as u8, char::from_u32(c).expect("valid code points"))).collect()
}
