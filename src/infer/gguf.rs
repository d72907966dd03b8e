//! What a `.gguf` file carries besides weights: the model's hyper-parameters,
//! its tokenizer (rebuilt as `transformers`' GGUF loader rebuilds it) and its
//! chat template.

use anyhow::{Context, Result, anyhow, bail};
use candle_core::quantized::gguf_file::{Content, Value};
use std::collections::HashMap;
use std::path::Path;
use tokenizers::decoders::{self, DecoderWrapper, byte_fallback::ByteFallback, fuse::Fuse};
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{self, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
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

    /// Each element of the array at `key`, converted by `one`.
    fn list<T, E: std::fmt::Display>(&self, key: &str, one: impl Fn(&Value) -> Result<T, E>) -> Result<Vec<T>> {
        let values = self.get(key)?.to_vec().map_err(|e| anyhow!("{key}: {e}"))?;
        values.iter().map(|v| one(v).map_err(|e| anyhow!("{key}: {e}"))).collect()
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        self.list(key, |v| v.to_string().cloned())
    }

    pub fn bools(&self, key: &str) -> Result<Vec<bool>> {
        self.list(key, Value::to_bool)
    }

    /// Whether the metadata holds `key`.
    pub fn has(&self, key: &str) -> bool {
        self.content.metadata.contains_key(key)
    }

    fn ints(&self, key: &str) -> Result<Vec<i64>> {
        self.list(key, |v| v.to_i32().map(i64::from).or_else(|_| v.to_u32().map(i64::from)))
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

    /// The tokenizer: byte-level BPE (`tokenizer.ggml.model = gpt2`, Llama-3,
    /// SmolLM2), or Gemma's sentencepiece BPE (`llama` in a `gemma*` file).
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let kind = self.string("tokenizer.ggml.model")?;
        let arch = self.architecture()?;
        let tokens = self.strings("tokenizer.ggml.tokens")?;
        let types = self.ints("tokenizer.ggml.token_type").unwrap_or_default();
        let mut tok = match kind.as_str() {
            "gpt2" => self.byte_level(&tokens)?,
            "llama" if arch.starts_with("gemma") => self.gemma(&tokens)?,
            _ => bail!(
                "{}: tokenizer type {kind:?} of a {arch:?} model is not supported (byte-level BPE \"gpt2\", and \
                 Gemma's sentencepiece are)",
                self.path.display()
            ),
        };
        // As transformers does: control tokens (type 3) are special (matched
        // whole, skipped when decoding); user-defined ones (type 4) are matched
        // whole. A byte-level control token spelled outside the byte alphabet
        // is a llama.cpp mislabel and left out.
        let spelled: std::collections::HashSet<char> = byte_alphabet().into_values().collect();
        let typed = |ty: i64| tokens.iter().zip(types.iter()).filter(move |(_, t)| **t == ty).map(|(t, _)| t);
        let control: Vec<AddedToken> = typed(3)
            .filter(|t| kind != "gpt2" || t.chars().all(|c| spelled.contains(&c)))
            .map(|t| AddedToken::from(t.clone(), true).normalized(false))
            .collect();
        tok.add_special_tokens(&control);
        // The vocabulary as a map once: `get_vocab` builds it afresh, and
        // building it for each of Gemma-3's 165 user-defined tokens took
        // ten of the thirteen seconds its file took to load.
        let vocab = tok.get_vocab(false);
        let user: Vec<AddedToken> = typed(4)
            .filter(|t| vocab.contains_key(t.as_str()))
            .map(|t| AddedToken::from(t.clone(), false).normalized(false))
            .collect();
        tok.add_tokens(&user);
        // Sentencepiece vocabularies add BOS unless the file says not to,
        // byte-level ones only where it says to (Mistral's).
        let add_bos = self.get("tokenizer.ggml.add_bos_token").ok().and_then(|v| v.to_bool().ok());
        if add_bos.unwrap_or(kind == "llama") {
            let bos_id = self.u32("tokenizer.ggml.bos_token_id")?;
            let bos = self.token(bos_id)?;
            let post = TemplateProcessing::builder()
                .try_single(format!("{bos} $A"))
                .and_then(|b| b.try_pair(format!("{bos} $A {bos} $B")))
                .map_err(|e| anyhow!("{e}"))?
                .special_tokens(vec![(bos, bos_id)])
                .build()
                .map_err(|e| anyhow!("{e}"))?;
            tok.with_post_processor(Some(post));
        }
        Ok(tok)
    }

    fn byte_level(&self, tokens: &[String]) -> Result<Tokenizer> {
        // A token outside the byte alphabet (a llama.cpp respelling) is
        // spelled back in it.
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
        match split_rules(&pre) {
            Some(rules) => {
                let split =
                    split::Split::new(SplitPattern::Regex(rules.regex.into()), SplitDelimiterBehavior::Isolated, false)
                        .map_err(|e| anyhow!("{e}"))?;
                tok.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(vec![
                    split.into(),
                    ByteLevel::new(false, true, false).into(),
                ]))));
                if rules.nfc {
                    tok.with_normalizer(Some(NFC));
                }
            }
            None => {
                tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
            }
        }
        tok.with_decoder(Some(ByteLevel::default()));
        Ok(tok)
    }

    /// Gemma's BPE over `▁`-spelled text with byte fallback. The file lists no
    /// merges; as transformers does, they are rebuilt by cutting every token
    /// into two tokens of the vocabulary, best first in the order the tokens
    /// appear in the file (Gemma's scores do not follow its merge order), and
    /// for one token the longer left piece first. Tokens of two or more real
    /// spaces are respelled with `▁`, as the text they must match is.
    fn gemma(&self, tokens: &[String]) -> Result<Tokenizer> {
        let spelled: Vec<String> = tokens
            .iter()
            .map(|t| if t.len() > 1 && t.chars().all(|c| c == ' ') { "\u{2581}".repeat(t.len()) } else { t.clone() })
            .collect();
        // The last id of a repeated token wins, as in a Python dict.
        let vocab: HashMap<&str, u32> = spelled.iter().enumerate().map(|(i, t)| (t.as_str(), i as u32)).collect();
        let mut order: Vec<(&str, u32)> = vocab.iter().map(|(t, i)| (*t, *i)).collect();
        order.sort_by_key(|(_, i)| *i);
        let mut merges = Vec::new();
        for (token, _) in order {
            let cuts: Vec<usize> = token.char_indices().map(|(at, _)| at).skip(1).collect();
            for &at in cuts.iter().rev() {
                let (l, r) = token.split_at(at);
                if vocab.contains_key(l) && vocab.contains_key(r) {
                    merges.push((l.to_string(), r.to_string()));
                }
            }
        }
        let unk = self.token(self.u32("tokenizer.ggml.unknown_token_id").unwrap_or(3))?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab.iter().map(|(t, i)| (t.to_string(), *i)).collect::<Vocab>(), merges)
            .unk_token(unk)
            .fuse_unk(true)
            .byte_fallback(true)
            .build()
            .map_err(|e| anyhow!("building the sentencepiece tokenizer: {e}"))?;
        let mut tok = Tokenizer::new(bpe);
        tok.with_normalizer(Some(Replace::new(" ", "\u{2581}").map_err(|e| anyhow!("{e}"))?));
        tok.with_decoder(Some(DecoderWrapper::Sequence(decoders::sequence::Sequence::new(vec![
            Replace::new("\u{2581}", " ").map_err(|e| anyhow!("{e}"))?.into(),
            ByteFallback::default().into(),
            Fuse::default().into(),
        ]))));
        Ok(tok)
    }
}

/// How the text is split before BPE under a llama.cpp pre-tokenizer name (as
/// transformers' GGUF loader and the family's tokenizer.json split it), and
/// whether it is NFC-normalised first; None is GPT-2's own split.
struct Split {
    regex: &'static str,
    /// Qwen2's tokenizer.json normalises to NFC (llama.cpp does not;
    /// prefgen tokenizes as transformers does).
    nfc: bool,
}

fn split_rules(pre: &str) -> Option<Split> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    // Llama-3's with single digits.
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" | "dbrx" => Some(Split { regex: LLAMA3, nfc: false }),
        "qwen2" | "deepseek-r1-qwen" => Some(Split { regex: QWEN2, nfc: true }),
        _ => None,
    }
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
