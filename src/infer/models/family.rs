//! The model families, each a description of how it differs from Llama, as
//! transformers' modular files and llama.cpp's architecture table describe
//! them. Every feature one family adds is a field every family has, off in
//! Llama; the loaders in `decoder.rs` read a checkpoint's hyper-parameters
//! through the description and the forward pass reads what they resolve.
//! A new family is one entry here and one fixture.

/// Which layers attend within `sliding_window` (when the checkpoint sets one).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Window {
    /// None: every layer attends to the whole sequence.
    Never,
    /// Every layer (Mistral; none when `sliding_window` is null, as in v0.3).
    Every,
    /// Every n-th layer attends fully, the others slide: Gemma-2 (2),
    /// Gemma-3 (6). `layer_types` in config.json overrides the pattern, as
    /// older Gemma-3 configs' `sliding_window_pattern` overrides n, and a
    /// GGUF file's `{arch}.attention.sliding_window_pattern` (flags, or n).
    FullEvery(usize),
    /// Only when `use_sliding_window` is true, from layer
    /// `max_window_layers` on (Qwen2, Qwen3); `layer_types` overrides.
    Switched,
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Silu,
    /// `gelu_pytorch_tanh`
    GeluTanh,
}

/// How llama.cpp's converter writes a family to GGUF.
#[derive(Debug)]
pub struct Gguf {
    /// `general.architecture`.
    pub arch: &'static str,
    /// q and k rows permuted for interleaved rotary pairs (`llama`), rather
    /// than the hub's rotated halves.
    pub interleaved_rope: bool,
    /// GGUF does not carry `query_pre_attn_scalar`: as llama.cpp decides,
    /// the model of this depth (the 27B) scales by hidden / n_head, the
    /// others by head_dim.
    pub wide_query_depth: Option<usize>,
}

/// A family: the checkpoints it reads, and how it differs from Llama.
#[derive(Debug)]
pub struct Family {
    /// What the book's model table calls it.
    pub name: &'static str,
    /// `architectures[0]` of the config.json files it loads (causal LMs,
    /// and reward models: `*ForSequenceClassification` with one label);
    /// empty where prefgen loads it from GGUF only.
    pub architectures: &'static [&'static str],
    /// Multimodal architectures whose language model is this family's:
    /// prefgen reads their `text_config` and the language model's weights.
    pub wrapped_by: &'static [&'static str],
    /// The family's config class's defaults (a JSON object) for the fields
    /// config.json may leave out, as transformers fills them in.
    pub config_defaults: Option<&'static str>,
    pub gguf: Option<Gguf>,
    /// RMSNorm scales by `1 + w` (Gemma): folded into the weights on load.
    pub norm_offset: bool,
    /// Attention and MLP outputs are normalised before the residual add,
    /// and the MLP's input norm is `pre_feedforward_layernorm` (Gemma).
    pub post_norms: bool,
    /// Biases on the q, k and v projections (Qwen2).
    pub qkv_bias: bool,
    /// Each head's queries and keys RMS-normalised over head_dim before the
    /// rotary embedding (Qwen3, Gemma-3).
    pub qk_norm: bool,
    pub window: Window,
    /// Sliding layers rotate with their own base, `rope_local_base_freq` or
    /// `rope_parameters.sliding_attention` (Gemma-3); the full layers' may
    /// be scaled.
    pub local_rope_base: bool,
    /// Scores scaled by `query_pre_attn_scalar` rather than head_dim (Gemma).
    pub query_scalar: bool,
    /// `attn_logit_softcapping` and `final_logit_softcapping` where
    /// config.json sets them (Gemma-2 does; Gemma-3's are null); the final
    /// cap is the LM head's, so a score head's output is not capped.
    pub softcaps: bool,
    /// Embeddings multiplied by sqrt(hidden) (Gemma).
    pub embed_scale: bool,
    pub activation: Activation,
    /// `tie_word_embeddings` where config.json leaves it out (transformers'
    /// default for the family's config class).
    pub tied_by_default: bool,
    /// `pad_token_id` where config.json leaves the key out (the config
    /// class's default): a sequence classifier pools at the last token that
    /// is not it.
    pub pad_by_default: Option<u32>,
}

/// Llama: every feature off. The others say only how they differ.
const LLAMA: Family = Family {
    name: "Llama (Llama-3, 3.1 rope scaling; SmolLM2; Mistral's GGUF files)",
    architectures: &["LlamaForCausalLM", "LlamaForSequenceClassification", "LlamaForRewardModelWithGating"],
    gguf: Some(Gguf { arch: "llama", interleaved_rope: true, wide_query_depth: None }),
    wrapped_by: &[],
    config_defaults: None,
    norm_offset: false,
    post_norms: false,
    qkv_bias: false,
    qk_norm: false,
    window: Window::Never,
    local_rope_base: false,
    query_scalar: false,
    softcaps: false,
    embed_scale: false,
    activation: Activation::Silu,
    tied_by_default: false,
    pad_by_default: None,
};

/// Every family prefgen runs.
pub const FAMILIES: &[Family] = &[
    LLAMA,
    Family {
        name: "Qwen2 (Qwen2, Qwen2.5)",
        architectures: &["Qwen2ForCausalLM", "Qwen2ForSequenceClassification"],
        // Rotated halves (llama.cpp's NEOX rope), as on the hub.
        gguf: Some(Gguf { arch: "qwen2", interleaved_rope: false, wide_query_depth: None }),
        qkv_bias: true,
        window: Window::Switched,
        ..LLAMA
    },
    Family {
        name: "Qwen3",
        architectures: &["Qwen3ForCausalLM", "Qwen3ForSequenceClassification"],
        gguf: Some(Gguf { arch: "qwen3", interleaved_rope: false, wide_query_depth: None }),
        qk_norm: true,
        window: Window::Switched,
        ..LLAMA
    },
    // llama.cpp's converter writes Mistral as `llama` and leaves out
    // `sliding_window`: its GGUF files are read as Llama, with no window.
    Family {
        name: "Mistral (GGUF: as Llama, no window)",
        architectures: &["MistralForCausalLM", "MistralForSequenceClassification"],
        gguf: None,
        window: Window::Every,
        ..LLAMA
    },
    Family {
        name: "Gemma-2",
        architectures: &["Gemma2ForCausalLM", "Gemma2ForSequenceClassification"],
        gguf: Some(Gguf { arch: "gemma2", interleaved_rope: false, wide_query_depth: Some(46) }),
        norm_offset: true,
        post_norms: true,
        window: Window::FullEvery(2),
        query_scalar: true,
        softcaps: true,
        embed_scale: true,
        activation: Activation::GeluTanh,
        tied_by_default: true,
        pad_by_default: Some(0),
        ..LLAMA
    },
    Family {
        name: "Gemma-3 (text)",
        architectures: &["Gemma3ForCausalLM"],
        // gemma-3-4b, 12b and 27b ship with their vision tower.
        wrapped_by: &["Gemma3ForConditionalGeneration"],
        // Gemma3TextConfig's: the 4B's text_config names only six fields.
        config_defaults: Some(
            r#"{"vocab_size": 262208, "hidden_size": 2304, "num_hidden_layers": 26, "num_attention_heads": 8,
                "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 131072,
                "rms_norm_eps": 1e-6, "query_pre_attn_scalar": 256, "sliding_window": 4096,
                "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0}"#,
        ),
        gguf: Some(Gguf { arch: "gemma3", interleaved_rope: false, wide_query_depth: Some(62) }),
        norm_offset: true,
        post_norms: true,
        qk_norm: true,
        window: Window::FullEvery(6),
        local_rope_base: true,
        query_scalar: true,
        softcaps: true,
        embed_scale: true,
        activation: Activation::GeluTanh,
        tied_by_default: true,
        ..LLAMA
    },
];

impl Family {
    /// The family of a config.json's `architectures[0]`, and whether that
    /// architecture wraps the family's language model.
    pub fn of_architecture(name: &str) -> Option<(&'static Family, bool)> {
        FAMILIES.iter().find_map(|f| {
            (f.architectures.contains(&name) || f.wrapped_by.contains(&name)).then(|| (f, f.wrapped_by.contains(&name)))
        })
    }

    /// The language model's part of a config.json of this family (its
    /// `text_config` where the architecture wraps it; None if it has none),
    /// with the config class's defaults where it is silent.
    pub fn text_config(&self, config: &serde_json::Value, wrapped: bool) -> Option<serde_json::Value> {
        let mut text = if wrapped { config.get("text_config")?.clone() } else { config.clone() };
        if let (Some(fields), Some(defaults)) = (text.as_object_mut(), self.config_defaults) {
            let defaults: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(defaults).expect("a family's defaults are a JSON object");
            for (k, v) in defaults {
                fields.entry(k).or_insert(v);
            }
        }
        Some(text)
    }

    /// The family of a GGUF file's `general.architecture`.
    pub fn of_gguf(arch: &str) -> Option<&'static Family> {
        FAMILIES.iter().find(|f| f.gguf.as_ref().is_some_and(|g| g.arch == arch))
    }

    /// The causal-LM architectures a folder may name, for an error message.
    pub fn supported_architectures() -> String {
        let names: Vec<&str> = FAMILIES.iter().flat_map(|f| f.architectures.first().copied()).collect();
        names.join(", ")
    }

    /// The GGUF architectures prefgen reads, for an error message.
    pub fn supported_gguf() -> String {
        let names: Vec<&str> = FAMILIES.iter().flat_map(|f| f.gguf.as_ref().map(|g| g.arch)).collect();
        names.join(", ")
    }

    /// Whether layer `i` attends within the sliding window (when there is
    /// one): as config.json's `layer_types` says where it says (transformers
    /// 5 writes it; Mistral's attention does not read it), else by the
    /// family's pattern (`max_window_layers`: Qwen's first full layers).
    pub fn slides(
        &self,
        i: usize,
        layer_type: Option<&str>,
        max_window_layers: Option<usize>,
        pattern: Option<usize>,
    ) -> bool {
        match (self.window, layer_type) {
            (Window::Never, _) => false,
            (Window::Every, _) => true,
            (_, Some(t)) => t == "sliding_attention",
            (Window::FullEvery(n), None) => !(i + 1).is_multiple_of(pattern.filter(|&p| p > 0).unwrap_or(n)),
            (Window::Switched, None) => max_window_layers.is_none_or(|m| i >= m),
        }
    }

    /// How it differs from Llama, in words, for the book's model table.
    fn differences(&self) -> String {
        let window = match self.window {
            Window::Never => None,
            Window::Every => Some("sliding window on every layer (none when `sliding_window` is null)".to_string()),
            Window::FullEvery(n) => Some(format!(
                "sliding window except on every {n}-th layer (or as `layer_types`, or a GGUF file's `sliding_window_pattern`, says)"
            )),
            Window::Switched => {
                Some("sliding window only when `use_sliding_window`, from `max_window_layers` on".to_string())
            }
        };
        let activation = match self.activation {
            Activation::Silu => None,
            Activation::GeluTanh => Some("tanh-GELU MLP".to_string()),
        };
        let tied = (self.tied_by_default != LLAMA.tied_by_default)
            .then(|| format!("`tie_word_embeddings` defaults to {}", self.tied_by_default));
        let pad = self.pad_by_default.map(|id| format!("`pad_token_id` defaults to {id}"));
        let flags = [
            (self.norm_offset, "RMSNorm by 1 + w"),
            (self.post_norms, "post-attention and post-MLP norms"),
            (self.qkv_bias, "q/k/v biases"),
            (self.qk_norm, "per-head q/k RMS norms"),
            (self.local_rope_base, "sliding layers' own rope base"),
            (self.query_scalar, "`query_pre_attn_scalar`"),
            (
                self.softcaps,
                "attention and LM-head logit soft-capping where config.json sets them (not on a score head)",
            ),
            (self.embed_scale, "embeddings scaled by sqrt(hidden)"),
        ];
        let all: Vec<String> = flags
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, what)| what.to_string())
            .chain(window)
            .chain(activation)
            .chain(tied)
            .chain(pad)
            .collect();
        if all.is_empty() { "(the base)".to_string() } else { all.join("; ") }
    }
}

/// The book's table of model families (docs/src/models.md), rendered from [`FAMILIES`].
pub fn model_table() -> String {
    let mut out =
        String::from("| family | hub folder (`architectures`) | GGUF | differs from Llama by |\n|---|---|---|---|\n");
    let code = |names: &mut dyn Iterator<Item = &str>| {
        let all: Vec<String> = names.map(|n| format!("`{n}`")).collect();
        if all.is_empty() { "-".to_string() } else { all.join(", ") }
    };
    for f in FAMILIES {
        let hub = code(&mut f.architectures.iter().chain(f.wrapped_by).copied());
        let gguf = code(&mut f.gguf.iter().map(|g| g.arch));
        out.push_str(&format!("| {} | {hub} | {gguf} | {} |\n", f.name, f.differences()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each architecture and GGUF name belongs to one family.
    #[test]
    fn names_are_unique() {
        let mut names: Vec<&str> =
            FAMILIES.iter().flat_map(|f| f.architectures.iter().chain(f.wrapped_by).copied()).collect();
        names.extend(FAMILIES.iter().flat_map(|f| f.gguf.as_ref().map(|g| g.arch)));
        let n = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), n);
    }
}
