//! The decoder-only transformers prefgen runs, from a GGUF file (quantized
//! weights, CPU) or a hub-layout safetensors folder (dense): one backbone,
//! Llama's, and each family a description of how it differs
//! ([`super::family`]), which the loaders below read a checkpoint through.
//!
//! Built for batched decoding with exact batch-size invariance: the linear
//! layers run on the whole batch (a quantized matmul computes each row on its
//! own), while rotary embeddings and attention run per sequence over that
//! sequence's own, unpadded KV cache. Padding would change the order of float
//! sums inside attention, and with it the sampled tokens.

use super::attention::{self, HostKv, HostRope};
pub use super::family::Activation;
use super::family::{Family, Window};
use super::norm;
use crate::infer::dense::DenseMatrix;
use crate::infer::files;
use crate::infer::gguf::GgufFile;
use crate::infer::math::{expf, gelu};
use crate::infer::qmatmul::{Fused, Kernel, PackedMatrix};
use anyhow::{Context, Result, bail};
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{D, DType, Device, Module, Tensor};
use std::path::Path;

/// Where a multimodal checkpoint keeps its language model's weights:
/// transformers >= 5, and the layout the hub's files were first written in.
const TEXT_PREFIXES: [&str; 2] = ["model.language_model.", "language_model.model."];

/// Hyper-parameters, from the GGUF metadata or `config.json` read through
/// the family's description.
#[derive(Debug, Clone)]
pub struct Config {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub hidden: usize,
    pub rms_eps: f32,
    pub rope_base: f32,
    /// Gemma-3: sliding-window layers rotate with their own base.
    pub rope_local_base: Option<f32>,
    /// Each rotary frequency of the full-attention layers is divided by its
    /// factor: Llama-3.1's `rope_scaling` (a GGUF file carries the factors
    /// as `rope_freqs.weight`), or linear scaling (Gemma-3 4B and up).
    pub rope_factors: Option<Vec<f32>>,
    pub context: usize,
    /// GGUF files store q and k permuted for interleaved rotary pairs;
    /// hub checkpoints rotate the two halves of each head.
    pub interleaved_rope: bool,
    /// Attention scores are scaled by this (1/sqrt(head_dim) unless
    /// Gemma's `query_pre_attn_scalar` says otherwise).
    pub attn_scale: f64,
    /// Gemma: embeddings are multiplied by sqrt(hidden).
    pub embed_scale: Option<f64>,
    /// Gemma-2: `cap * tanh(x / cap)` on attention scores and on logits.
    pub attn_softcap: Option<f64>,
    pub final_softcap: Option<f64>,
    /// How far back sliding-window layers see (Gemma, Mistral, Qwen when
    /// `use_sliding_window`); which layers slide is each block's.
    pub sliding_window: Option<usize>,
    pub activation: Activation,
}

/// Llama-3.1's `rope_scaling` (`rope_type = "llama3"`).
#[derive(Debug, Clone, serde::Deserialize)]
struct RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    /// transformers' default: `max_position_embeddings`.
    pub original_max_position_embeddings: Option<usize>,
}

/// One rotary embedding as config.json describes it: its base, and the
/// divisor of each frequency where it is scaled.
struct RopeSpec {
    theta: f32,
    factors: Option<Vec<f32>>,
}

/// `config.json` of a checkpoint of one of the [`super::family::FAMILIES`]
/// (the fields used here).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct HubConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    pub query_pre_attn_scalar: Option<f64>,
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    pub sliding_window: Option<usize>,
    /// Qwen2 and Qwen3 slide only with this set, from `max_window_layers` on.
    #[serde(default)]
    pub use_sliding_window: bool,
    pub max_window_layers: Option<usize>,
    /// `sliding_attention` / `full_attention` per layer (transformers >= 5).
    pub layer_types: Option<Vec<String>>,
    /// Older Gemma-3 configs' every n-th layer attends fully, where there
    /// is no `layer_types`.
    pub sliding_window_pattern: Option<usize>,
    /// EmbeddingGemma's bidirectional attention, which a causal decoder is not.
    pub use_bidirectional_attention: Option<bool>,
    pub rope_local_base_freq: Option<f32>,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    pub rope_theta: Option<f32>,
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers >= 5 writes `rope_theta` and the scaling here instead,
    /// nested by layer type where they differ (Gemma-3: `full_attention`,
    /// `sliding_attention`).
    pub rope_parameters: Option<serde_json::Value>,
    pub max_position_embeddings: usize,
    /// The family's default where left out.
    pub tie_word_embeddings: Option<bool>,
    pub vocab_size: Option<usize>,
    /// Llama's and Qwen3's switches for biases on every projection, which
    /// no family prefgen runs has: refused rather than ignored.
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
}

impl HubConfig {
    /// Sizes that cannot describe a model, named by their key.
    fn check(&self) -> std::result::Result<(), String> {
        let sizes = [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (key, v) in sizes.into_iter().chain(self.head_dim.map(|d| ("head_dim", d))) {
            if v == 0 {
                return Err(format!("{key} is 0; it must be > 0"));
            }
        }
        if let Some(kv) = self.num_key_value_heads
            && (kv == 0 || !self.num_attention_heads.is_multiple_of(kv))
        {
            return Err(format!(
                "num_key_value_heads is {kv}; it must divide num_attention_heads ({})",
                self.num_attention_heads
            ));
        }
        for (key, on) in [("attention_bias", self.attention_bias), ("mlp_bias", self.mlp_bias)] {
            if on {
                return Err(format!("{key} is true; prefgen runs checkpoints without those biases"));
            }
        }
        if self.use_bidirectional_attention == Some(true) {
            return Err("use_bidirectional_attention is true; prefgen runs causal decoders".into());
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err("hidden_size is not a multiple of num_attention_heads, and there is no head_dim".into());
        }
        Ok(())
    }

    /// The rotary embeddings of the full-attention layers and of the
    /// sliding ones, as transformers reads them: `rope_parameters` nested by
    /// layer type (Gemma-3 from transformers >= 5) or one for every layer,
    /// or the older `rope_theta`, `rope_scaling` and (the sliding layers')
    /// `rope_local_base_freq`. Bases left out are 10000.
    fn ropes(&self, head_dim: usize) -> std::result::Result<(RopeSpec, RopeSpec), String> {
        let of_type = |t: &str| self.rope_parameters.as_ref().and_then(|p| p.get(t)).filter(|v| v.is_object());
        let (full, sliding) = (of_type("full_attention"), of_type("sliding_attention"));
        let nested = full.is_some() || sliding.is_some();
        let scaling = self.rope_scaling.as_ref().filter(|v| !v.is_null());
        let shared = if nested { None } else { scaling.or(self.rope_parameters.as_ref()) };
        // The base where the parameters read carry none: `rope_theta`, else
        // the shared `rope_parameters`' (read beside an old `rope_scaling`).
        let shared_theta = || {
            let p = self.rope_parameters.as_ref().filter(|_| !nested)?;
            p.get("rope_theta")?.as_f64().map(|t| t as f32)
        };
        let theta = self.rope_theta.or_else(shared_theta);
        let global = self.rope(full.or(scaling).or(shared), theta, head_dim, "full_attention")?;
        let local = self.rope(sliding, self.rope_local_base_freq, head_dim, "sliding_attention")?;
        Ok((global, local))
    }

    /// One rotary embedding from its parameters (`rope_type`, or the older
    /// `type`; `rope_theta`, else `theta`): default, linear, or llama3.
    fn rope(
        &self,
        params: Option<&serde_json::Value>,
        theta: Option<f32>,
        head_dim: usize,
        layers: &str,
    ) -> std::result::Result<RopeSpec, String> {
        let field = |k: &str| params.and_then(|p| p.get(k));
        let theta = field("rope_theta").and_then(|t| t.as_f64()).map(|t| t as f32).or(theta).unwrap_or(10_000.0);
        let factor = || -> std::result::Result<f32, String> {
            match field("factor").and_then(|f| f.as_f64()) {
                Some(f) if f > 0.0 => Ok(f as f32),
                _ => Err(format!("the {layers} layers' rope scaling has no factor > 0")),
            }
        };
        let factors = match field("rope_type").or(field("type")).and_then(|t| t.as_str()) {
            None | Some("default") => None,
            Some("linear") => Some(vec![factor()?; head_dim / 2]),
            Some("llama3") => {
                let mut s: RopeScaling = serde_json::from_value(params.cloned().unwrap_or_default())
                    .map_err(|e| format!("the {layers} layers' llama3 rope scaling: {e}"))?;
                s.original_max_position_embeddings.get_or_insert(self.max_position_embeddings);
                Some(s.factors(theta, head_dim))
            }
            Some(other) => {
                return Err(format!("rope scaling {other:?} is not supported (linear and llama3 are)"));
            }
        };
        Ok(RopeSpec { theta, factors })
    }
}

/// A weight matrix `(out, in)`: quantized (repacked for prefgen's kernel,
/// or as candle runs it), or dense.
pub(crate) enum Linear {
    Packed(PackedMatrix),
    Quantized(QMatMul),
    /// f32 on the CPU: every row computed alike, whatever the batch.
    Rows(DenseMatrix),
    /// On the GPU: cuBLAS.
    Dense(Tensor),
}

impl Linear {
    /// `x (..., in)` to `(..., out)`.
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Linear::Packed(p) => x.contiguous()?.apply_op1_no_bwd(p),
            Linear::Quantized(q) => q.forward(x),
            Linear::Rows(d) => x.contiguous()?.apply_op1_no_bwd(d),
            Linear::Dense(w) => x.broadcast_matmul(&w.t()?),
        }
    }

    /// `x` through each of `parts`, matrices that take the same input (a
    /// layer's q, k and v; its gate and up). Where prefgen's int8 kernels
    /// run them all, one op: the input quantized once, one pass over the
    /// threads, and the outputs views of its columns.
    pub(crate) fn forward_each<const N: usize>(parts: [&Linear; N], x: &Tensor) -> candle_core::Result<[Tensor; N]> {
        let packed: Option<Vec<&PackedMatrix>> =
            parts.iter().map(|l| if let Linear::Packed(p) = l { Some(p) } else { None }).collect();
        let outs = match packed.filter(|p| p.windows(2).all(|w| w[0].fuses_with(w[1]))) {
            Some(packed) => {
                let all = x.contiguous()?.apply_op1_no_bwd(&Fused(&packed))?;
                let mut at = 0;
                packed
                    .iter()
                    .map(|p| {
                        at += p.n();
                        all.narrow(D::Minus1, at - p.n(), p.n())
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?
            }
            None => parts.iter().map(|l| l.forward(x)).collect::<candle_core::Result<Vec<_>>>()?,
        };
        Ok(outs.try_into().unwrap_or_else(|_: Vec<Tensor>| unreachable!("one output a part")))
    }

    /// A dense weight `(out, in)`: prefgen's row-exact kernel in f32 on the
    /// CPU, a tensor matmul otherwise (the GPU, or another dtype).
    pub(crate) fn dense(w: Tensor) -> candle_core::Result<Linear> {
        let exact = w.device().is_cpu() && w.dtype() == DType::F32;
        Ok(if exact { Linear::Rows(DenseMatrix::new(&w)?) } else { Linear::Dense(w) })
    }

    /// Which kernel computes it, for the engine a result records.
    fn kernel(&self) -> String {
        match self {
            // Every int8 kernel computes the same bits, so the engine names
            // the family, not the CPU's instructions.
            Linear::Packed(_) => "prefgen int8".into(),
            Linear::Quantized(QMatMul::QTensor(t)) => format!("candle {:?}", t.dtype()).to_lowercase(),
            Linear::Quantized(_) => "candle dense".into(),
            Linear::Rows(_) => "prefgen f32 (row-exact)".into(),
            Linear::Dense(w) => format!("dense {:?}", w.dtype()).to_lowercase(),
        }
    }
}

struct Block {
    /// Qwen2's q, k and v biases.
    qkv_bias: Option<(Tensor, Tensor, Tensor)>,
    /// Gemma normalises the attention and MLP outputs too.
    post_attn_norm: Option<Tensor>,
    post_ffn_norm: Option<Tensor>,
    /// Qwen3 and Gemma-3 normalise each head's queries and keys.
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    /// Attends within the sliding window.
    sliding: bool,
    attn_norm: Tensor,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

pub struct Decoder {
    pub cfg: Config,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    /// The language-model head; reward models have their own heads instead.
    head: Option<Linear>,
    rope: Rope,
}

/// Rotary tables, `(context, head_dim / 2)`: one set, or (Gemma-3) a second
/// for the sliding-window layers.
struct Rope {
    cos: Tensor,
    sin: Tensor,
    local: Option<(Tensor, Tensor)>,
    /// The same tables as slices when attention runs fused on the CPU (f32
    /// weights there); None where it runs as tensor ops (the GPU).
    host: Option<HostRope>,
}

impl Rope {
    fn new(cfg: &Config, device: &Device, dtype: DType) -> Result<Rope> {
        let (cos, sin) = rope_tables(cfg, cfg.rope_base, cfg.rope_factors.as_deref(), device, dtype)?;
        // Gemma-3's sliding layers keep their own base, unscaled.
        let local = cfg.rope_local_base.map(|base| rope_tables(cfg, base, None, device, dtype)).transpose()?;
        let host = if device.is_cpu() && dtype == DType::F32 {
            let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
            let local = local.as_ref().map(|(c, s)| Ok::<_, candle_core::Error>((flat(c)?, flat(s)?))).transpose()?;
            Some(HostRope { cos: flat(&cos)?, sin: flat(&sin)?, local })
        } else {
            None
        };
        Ok(Rope { cos, sin, local, host })
    }

    /// The tables for positions `pos..pos + l` of a layer.
    fn at(&self, sliding: bool, pos: usize, l: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let (cos, sin) = match &self.local {
            Some((cos, sin)) if sliding => (cos, sin),
            _ => (&self.cos, &self.sin),
        };
        Ok((cos.narrow(0, pos, l)?, sin.narrow(0, pos, l)?))
    }
}

/// One sequence's keys and values, per layer: on the CPU in blocks of
/// positions for the fused attention ([`HostKv`]); as tensors elsewhere,
/// `(n_kv_head, capacity, head_dim)` buffers whose first `len` positions
/// are filled, grown by doubling. Appending a token copies only that token.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    host: Vec<HostKv>,
    /// Tokens the cache holds (the next token's position).
    pub len: usize,
}

impl KvCache {
    /// Writes layer `li`'s keys and values `(n_kv_head, l, head_dim)` for
    /// positions `len..len + l` and returns all of them, `(n_kv_head, len +
    /// l, head_dim)`.
    fn append(&mut self, li: usize, k: &Tensor, v: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let (pos, end) = (self.len, self.len + k.dim(1)?);
        let layer = &mut self.layers[li];
        let capacity = layer.as_ref().map_or(0, |(kb, _)| kb.dim(1).unwrap_or(0));
        if end > capacity {
            let (n, _, d) = k.dims3()?;
            let grown = end.max(2 * capacity).max(64);
            let buffer = |old: Option<&Tensor>| -> candle_core::Result<Tensor> {
                let b = Tensor::zeros((n, grown, d), k.dtype(), k.device())?;
                if let Some(old) = old {
                    b.slice_set(&old.narrow(1, 0, pos)?.contiguous()?, 1, 0)?;
                }
                Ok(b)
            };
            let old = layer.take();
            *layer = Some((buffer(old.as_ref().map(|o| &o.0))?, buffer(old.as_ref().map(|o| &o.1))?));
        }
        let (kb, vb) = layer.as_ref().expect("allocated above");
        kb.slice_set(k, 1, pos)?;
        vb.slice_set(v, 1, pos)?;
        Ok((kb.narrow(1, 0, end)?, vb.narrow(1, 0, end)?))
    }
}

/// Which layers of a GGUF file slide: as `{arch}.attention.sliding_window_pattern`
/// says where a converter wrote it and the family reads it (Gemma-2 and -3,
/// as llama.cpp does): a flag per layer, or n (every n-th layer full; 0:
/// none); else by the family's pattern.
fn gguf_sliding_layers(file: &GgufFile, arch: &str, family: &Family, n_layer: usize) -> Result<Vec<bool>> {
    let key = format!("{arch}.attention.sliding_window_pattern");
    if !matches!(family.window, Window::FullEvery(_)) || !file.has(&key) {
        return Ok((0..n_layer).map(|i| family.slides(i, None, None, None)).collect());
    }
    let flags = match file.u32(&key) {
        Ok(0) => vec![true; n_layer],
        Ok(n) => (0..n_layer).map(|i| family.slides(i, None, None, Some(n as usize))).collect(),
        Err(_) => file.bools(&key).with_context(|| format!("{}: {key}", file.path.display()))?,
    };
    if flags.len() != n_layer {
        bail!("{}: {key} has {} flags for {n_layer} layers", file.path.display(), flags.len());
    }
    Ok(flags)
}

impl Decoder {
    /// Loads a GGUF file's weights (the families with a [`super::family::Gguf`]
    /// name: `llama`, `qwen2`, `qwen3`, `gemma2`, `gemma3`). Quantized matmuls
    /// quantize the activations too (to Q8, as llama.cpp does), which moves
    /// Gemma-3 270M's logits by up to ~0.8 from an f32 evaluation of the same
    /// weights; `dequantize` runs the weights in f32 instead, slower, and
    /// equal to that evaluation.
    pub fn from_gguf(file: &GgufFile, device: &Device, dequantize: bool) -> Result<Decoder> {
        let arch = file.architecture()?;
        let Some(family) = Family::of_gguf(&arch) else {
            bail!(
                "{}: GGUF architecture {arch:?} is not supported ({} are)",
                file.path.display(),
                Family::supported_gguf()
            )
        };
        let gguf = family.gguf.as_ref().expect("found by its GGUF name");
        let u = |key: &str| file.u32(&format!("{arch}.{key}")).map(|v| v as usize);
        let f = |key: &str| file.f32(&format!("{arch}.{key}"));
        let (hidden, n_head, n_layer) = (u("embedding_length")?, u("attention.head_count")?, u("block_count")?);
        let head_dim = u("attention.key_length").or_else(|_| u("rope.dimension_count")).unwrap_or(hidden / n_head);
        let mut reader = std::fs::File::open(&file.path)?;
        let mut tensor = |name: &str| {
            file.content
                .tensor(&mut reader, name, device)
                .with_context(|| format!("{}: tensor {name}", file.path.display()))
        };
        let rope_factors = if file.content.tensor_infos.contains_key("rope_freqs.weight") {
            let factors = tensor("rope_freqs.weight")?.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
            if factors.len() != head_dim / 2 {
                bail!(
                    "{}: rope_freqs.weight does not have head_dim / 2 = {} values",
                    file.path.display(),
                    head_dim / 2
                );
            }
            Some(factors)
        } else {
            match file.string(&format!("{arch}.rope.scaling.type")).ok().as_deref() {
                Some("none") => None,
                None | Some("linear") => {
                    f("rope.scaling.factor").ok().filter(|&x| x > 0.0).map(|x| vec![x; head_dim / 2])
                }
                Some(other) => bail!("{}: rope scaling {other:?} is not supported (linear is)", file.path.display()),
            }
        };
        let cfg = Config {
            n_layer,
            n_head,
            n_kv_head: u("attention.head_count_kv")?,
            head_dim,
            hidden,
            rms_eps: f("attention.layer_norm_rms_epsilon")?,
            rope_base: f("rope.freq_base").unwrap_or(10_000.0),
            // Gemma-3's sliding layers: llama.cpp's default when the file has no base.
            rope_local_base: family.local_rope_base.then(|| f("rope.freq_base_swa").unwrap_or(10_000.0)),
            rope_factors,
            context: u("context_length")?,
            interleaved_rope: gguf.interleaved_rope,
            attn_scale: 1.0
                / (if gguf.wide_query_depth == Some(n_layer) { hidden / n_head } else { head_dim } as f64).sqrt(),
            embed_scale: family.embed_scale.then(|| (hidden as f64).sqrt()),
            attn_softcap: f("attn_logit_softcapping").ok().map(f64::from).filter(|_| family.softcaps),
            final_softcap: f("final_logit_softcapping").ok().map(f64::from).filter(|_| family.softcaps),
            // Qwen's switch (`use_sliding_window`) is not in a GGUF file, and
            // llama.cpp's qwen2 and qwen3 never slide.
            sliding_window: u("attention.sliding_window")
                .ok()
                .filter(|_| matches!(family.window, Window::Every | Window::FullEvery(_))),
            activation: family.activation,
        };
        // Norm weights: llama.cpp's converter has already folded Gemma's 1 in.
        let dense = |t: QTensor| t.dequantize(device);
        let embed = dense(tensor("token_embd.weight")?)?;
        // Without `output.weight` the head is tied to the embedding.
        let head = match tensor("output.weight") {
            Ok(t) => t,
            Err(_) => tensor("token_embd.weight")?,
        };
        let sliding = gguf_sliding_layers(file, &arch, family, n_layer)?;
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for (i, &sliding) in sliding.iter().enumerate() {
            let mut q =
                |n: &str| -> Result<Linear> { matmul(tensor(&format!("blk.{i}.{n}.weight"))?, device, dequantize) };
            let (wq, wk, wv, wo) = (q("attn_q")?, q("attn_k")?, q("attn_v")?, q("attn_output")?);
            let (gate, up, down) = (q("ffn_gate")?, q("ffn_up")?, q("ffn_down")?);
            let mut vector = |n: &str| -> Result<Tensor> { Ok(dense(tensor(&format!("blk.{i}.{n}"))?)?) };
            let qkv_bias = family
                .qkv_bias
                .then(|| {
                    Ok::<_, anyhow::Error>((vector("attn_q.bias")?, vector("attn_k.bias")?, vector("attn_v.bias")?))
                })
                .transpose()?;
            let mut norm = |n: &str| vector(&format!("{n}.weight"));
            blocks.push(Block {
                qkv_bias,
                post_attn_norm: family.post_norms.then(|| norm("post_attention_norm")).transpose()?,
                post_ffn_norm: family.post_norms.then(|| norm("post_ffw_norm")).transpose()?,
                q_norm: family.qk_norm.then(|| norm("attn_q_norm")).transpose()?,
                k_norm: family.qk_norm.then(|| norm("attn_k_norm")).transpose()?,
                sliding,
                attn_norm: norm("attn_norm")?,
                ffn_norm: norm("ffn_norm")?,
                wq,
                wk,
                wv,
                wo,
                gate,
                up,
                down,
            });
        }
        let norm = dense(tensor("output_norm.weight")?)?;
        let rope = Rope::new(&cfg, device, DType::F32)?;
        Ok(Decoder { cfg, embed, blocks, norm, head: Some(matmul(head, device, dequantize)?), rope })
    }

    /// Loads a hub-layout folder: `config.json` and `*.safetensors` (one
    /// file, or shards listed by `model.safetensors.index.json`), in f32 on
    /// the CPU and bf16 on a GPU unless `dtype` says otherwise.
    pub fn from_safetensors(dir: &Path, device: &Device, dtype: Option<DType>) -> Result<Decoder> {
        let text = std::fs::read_to_string(dir.join(files::CONFIG))
            .with_context(|| format!("{}: no {}", dir.display(), files::CONFIG))?;
        let config = dir.join(files::CONFIG);
        let raw: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}", config.display()))?;
        let architecture = raw["architectures"][0].as_str().map(str::to_string);
        let Some((family, wrapped)) = architecture.as_deref().and_then(Family::of_architecture) else {
            bail!(
                "{}: architecture {} is not supported ({} are)",
                config.display(),
                architecture.as_deref().unwrap_or("(none given)"),
                Family::supported_architectures()
            )
        };
        let weights = Safetensors::open(dir)?;
        // A multimodal checkpoint's language model: its own config and weights.
        let text =
            family.text_config(&raw, wrapped).with_context(|| format!("{}: no text_config", config.display()))?;
        let prefix = if wrapped {
            match TEXT_PREFIXES.iter().find(|p| weights.has(&format!("{p}embed_tokens.weight"))) {
                Some(p) => *p,
                None => bail!(
                    "{}: no language model's embed_tokens.weight under {}",
                    dir.display(),
                    TEXT_PREFIXES.join(" or ")
                ),
            }
        } else {
            "model."
        };
        let hc: HubConfig = serde_json::from_value(text).with_context(|| format!("{}", config.display()))?;
        hc.check().map_err(|why| anyhow::anyhow!("{}: {why}", config.display()))?;
        let head_dim = hc.head_dim.unwrap_or(hc.hidden_size / hc.num_attention_heads);
        let refuse = |why: String| anyhow::anyhow!("{}: {why}", config.display());
        let (global, local) = hc.ropes(head_dim).map_err(refuse)?;
        // Only the full-attention layers' rotation is scaled (Gemma-3's 4B and up).
        if family.local_rope_base && local.factors.is_some() {
            return Err(refuse("rope scaling on the sliding_attention layers is not supported".into()));
        }
        let cfg = Config {
            n_layer: hc.num_hidden_layers,
            n_head: hc.num_attention_heads,
            n_kv_head: hc.num_key_value_heads.unwrap_or(hc.num_attention_heads),
            head_dim,
            hidden: hc.hidden_size,
            rms_eps: hc.rms_norm_eps as f32,
            rope_base: global.theta,
            rope_local_base: family.local_rope_base.then_some(local.theta),
            rope_factors: global.factors,
            context: hc.max_position_embeddings,
            interleaved_rope: false,
            attn_scale: 1.0
                / hc.query_pre_attn_scalar.filter(|_| family.query_scalar).unwrap_or(head_dim as f64).sqrt(),
            embed_scale: family.embed_scale.then(|| (hc.hidden_size as f64).sqrt()),
            attn_softcap: hc.attn_logit_softcapping.filter(|_| family.softcaps),
            final_softcap: hc.final_logit_softcapping.filter(|_| family.softcaps),
            sliding_window: match family.window {
                Window::Never => None,
                Window::Switched if !hc.use_sliding_window => None,
                _ => hc.sliding_window,
            },
            activation: family.activation,
        };
        let dtype = dtype.unwrap_or(if device.is_cuda() { DType::BF16 } else { DType::F32 });
        let get = |name: &str| -> Result<Tensor> { weights.tensor(name, device, dtype) };
        // Gemma's RMSNorm scales by (1 + w): fold the 1 in once, here.
        let norm = |name: &str| -> Result<Tensor> {
            let w = get(name)?;
            Ok(if family.norm_offset { (w + 1.0)? } else { w })
        };
        let dense = |name: &str| -> Result<Linear> { Ok(Linear::dense(get(name)?)?) };
        // The attention projections as config.json sizes them: else the
        // first forward fails on a shape, naming neither file nor key.
        let (q, kv) = (cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim);
        let projection = |name: &str, rows: usize, cols: usize| -> Result<Linear> {
            let w = get(name)?;
            if w.dims2()? != (rows, cols) {
                bail!(
                    "{}: {name} is {:?}, but hidden_size, num_attention_heads, num_key_value_heads and head_dim \
                     make it {rows} x {cols}",
                    config.display(),
                    w.dims()
                );
            }
            Ok(Linear::dense(w)?)
        };
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = format!("{prefix}layers.{i}");
            let layer_type = hc.layer_types.as_ref().and_then(|types| types.get(i)).map(String::as_str);
            let (ffn_norm, post_attn_norm, post_ffn_norm) = if family.post_norms {
                (
                    norm(&format!("{p}.pre_feedforward_layernorm.weight"))?,
                    Some(norm(&format!("{p}.post_attention_layernorm.weight"))?),
                    Some(norm(&format!("{p}.post_feedforward_layernorm.weight"))?),
                )
            } else {
                (norm(&format!("{p}.post_attention_layernorm.weight"))?, None, None)
            };
            let attn = |n: &str| format!("{p}.self_attn.{n}");
            let qkv_bias = family
                .qkv_bias
                .then(|| {
                    Ok::<_, anyhow::Error>((
                        get(&attn("q_proj.bias"))?,
                        get(&attn("k_proj.bias"))?,
                        get(&attn("v_proj.bias"))?,
                    ))
                })
                .transpose()?;
            blocks.push(Block {
                qkv_bias,
                post_attn_norm,
                post_ffn_norm,
                q_norm: family.qk_norm.then(|| norm(&attn("q_norm.weight"))).transpose()?,
                k_norm: family.qk_norm.then(|| norm(&attn("k_norm.weight"))).transpose()?,
                sliding: family.slides(i, layer_type, hc.max_window_layers, hc.sliding_window_pattern),
                attn_norm: norm(&format!("{p}.input_layernorm.weight"))?,
                wq: projection(&format!("{p}.self_attn.q_proj.weight"), q, cfg.hidden)?,
                wk: projection(&format!("{p}.self_attn.k_proj.weight"), kv, cfg.hidden)?,
                wv: projection(&format!("{p}.self_attn.v_proj.weight"), kv, cfg.hidden)?,
                wo: projection(&format!("{p}.self_attn.o_proj.weight"), cfg.hidden, q)?,
                ffn_norm,
                gate: dense(&format!("{p}.mlp.gate_proj.weight"))?,
                up: dense(&format!("{p}.mlp.up_proj.weight"))?,
                down: dense(&format!("{p}.mlp.down_proj.weight"))?,
            });
        }
        let embed = get(&format!("{prefix}embed_tokens.weight"))?;
        let (vocab, width) = embed.dims2()?;
        if width != cfg.hidden {
            bail!(
                "{}: hidden_size is {}, but model.embed_tokens.weight is {vocab} x {width}",
                config.display(),
                cfg.hidden
            );
        }
        if let Some(v) = hc.vocab_size.filter(|&v| v != vocab) {
            bail!("{}: vocab_size is {v}, but model.embed_tokens.weight has {vocab} rows", config.display());
        }
        let tied = hc.tie_word_embeddings.unwrap_or(family.tied_by_default);
        let head = match (tied, weights.has("lm_head.weight")) {
            (true, _) => Some(Linear::dense(embed.clone())?),
            (false, true) => Some(dense("lm_head.weight")?),
            (false, false) => None,
        };
        let rope = Rope::new(&cfg, device, dtype)?;
        Ok(Decoder { cfg, embed, blocks, norm: norm(&format!("{prefix}norm.weight"))?, head, rope })
    }

    /// What computes this model's outputs: prefgen's version, the device,
    /// the activations' dtype and the matmul kernels. Results record it.
    pub fn engine(&self) -> String {
        let mut kernels: Vec<String> = self
            .blocks
            .iter()
            .flat_map(|b| [&b.wq, &b.wk, &b.wv, &b.wo, &b.gate, &b.up, &b.down])
            .chain(&self.head)
            .map(Linear::kernel)
            .collect();
        kernels.sort();
        kernels.dedup();
        let device = if self.device().is_cuda() { "cuda" } else { "cpu" };
        let dtype = format!("{:?}", self.dtype()).to_lowercase();
        format!("prefgen {} {device} {dtype}, matmuls: {}", env!("CARGO_PKG_VERSION"), kernels.join(" + "))
    }

    /// The device and dtype the weights live in.
    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    pub fn dtype(&self) -> DType {
        self.embed.dtype()
    }

    /// Rows of the embedding: the token ids the model takes.
    pub fn vocab(&self) -> usize {
        self.embed.dim(0).unwrap_or(0)
    }

    pub fn new_cache(&self) -> KvCache {
        let n = self.cfg.n_layer;
        match self.rope.host {
            Some(_) => KvCache { layers: Vec::new(), host: (0..n).map(|_| HostKv::default()).collect(), len: 0 },
            None => KvCache { layers: (0..n).map(|_| None).collect(), host: Vec::new(), len: 0 },
        }
    }

    /// Appends `tokens[b]` to sequence `b` and returns the logits after each
    /// sequence's last token, `(batch, vocab)`.
    pub fn forward(&self, tokens: &[&[u32]], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        let h = self.hidden(tokens, Some(caches))?;
        let mut end = 0;
        let last: Vec<u32> = tokens
            .iter()
            .map(|t| {
                end += t.len();
                (end - 1) as u32
            })
            .collect();
        let last = Tensor::from_vec(last, tokens.len(), h.device())?;
        self.logits(&h.index_select(&last, 0)?)
    }

    /// Attention as tensor ops, sequence by sequence (the GPU's path):
    /// `(1, total, n_head * head_dim)`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        li: usize,
        blk: &Block,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        tokens: &[&[u32]],
        positions: &[usize],
        mut caches: Option<&mut [&mut KvCache]>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let device = self.embed.device();
        let norm = |t: Tensor, w: &Option<Tensor>| optional_norm(t, w, cfg.rms_eps);
        let mut outs = Vec::with_capacity(tokens.len());
        let mut start = 0;
        for (i, seq) in tokens.iter().enumerate() {
            let (l, pos, at) = (seq.len(), positions[i], start);
            start += l;
            let heads = |t: &Tensor, n: usize| -> candle_core::Result<Tensor> {
                t.narrow(1, at, l)?.reshape((1, l, n, cfg.head_dim))?.transpose(1, 2)?.contiguous()
            };
            let (cos, sin) = self.rope.at(blk.sliding, pos, l)?;
            let rope = |t: &Tensor| {
                if cfg.interleaved_rope {
                    candle_nn::rotary_emb::rope_i(t, &cos, &sin)
                } else {
                    candle_nn::rotary_emb::rope(t, &cos, &sin)
                }
            };
            let qi = rope(&norm(heads(q, cfg.n_head)?, &blk.q_norm)?)?;
            let ki = rope(&norm(heads(k, cfg.n_kv_head)?, &blk.k_norm)?)?;
            let vi = heads(v, cfg.n_kv_head)?;
            let (ka, va) = match caches.as_deref_mut() {
                Some(caches) => caches[i].append(li, &ki.squeeze(0)?, &vi.squeeze(0)?)?,
                None => (ki.squeeze(0)?, vi.squeeze(0)?),
            };
            // Query heads grouped by the key head they share, `(n_kv_head,
            // rep * l, head_dim)`, so keys and values are never repeated.
            let (rep, t) = (cfg.n_head / cfg.n_kv_head, pos + l);
            let qg = qi.reshape((cfg.n_kv_head, rep * l, cfg.head_dim))?;
            let mut att = (qg.matmul(&ka.t()?)? * cfg.attn_scale)?;
            if let Some(cap) = cfg.attn_softcap {
                att = ((att / cap)?.tanh()? * cap)?;
            }
            let window = cfg.sliding_window.filter(|_| blk.sliding);
            if l > 1 || window.is_some_and(|w| t > w) {
                let mask = attention_mask(l, pos, window, device)?.to_dtype(att.dtype())?;
                att = att.reshape((cfg.n_kv_head, rep, l, t))?.broadcast_add(&mask)?.reshape((
                    cfg.n_kv_head,
                    rep * l,
                    t,
                ))?;
            }
            // The softmax in f32, as transformers computes it: in bf16, its
            // sum over hundreds of keys loses most of the weights' bits.
            let att = candle_nn::ops::softmax_last_dim(&att.to_dtype(DType::F32)?)?.to_dtype(va.dtype())?;
            let o = att.matmul(&va)?.reshape((1, cfg.n_head, l, cfg.head_dim))?;
            outs.push(o.transpose(1, 2)?.reshape((1, l, cfg.n_head * cfg.head_dim))?);
        }
        Ok(Tensor::cat(&outs, 1)?)
    }

    /// Logits of final hidden states `(n, hidden)`, `(n, vocab)` in f32.
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        let head = self.head.as_ref().context("this model has no language-model head")?;
        let logits = head.forward(h)?.to_dtype(DType::F32)?;
        Ok(match self.cfg.final_softcap {
            Some(cap) => ((logits / cap)?.tanh()? * cap)?,
            None => logits,
        })
    }

    /// The final (normalised) hidden states of `tokens[b]` appended to
    /// sequence `b`, packed: `(sum of lengths, hidden)`, sequence after
    /// sequence. Sequences may differ in length; nothing is padded. Without
    /// caches every sequence starts empty and its keys are not kept (scoring).
    pub fn hidden(&self, tokens: &[&[u32]], mut caches: Option<&mut [&mut KvCache]>) -> Result<Tensor> {
        let cfg = &self.cfg;
        let device = self.embed.device();
        let ids: Vec<u32> = tokens.iter().flat_map(|t| t.iter().copied()).collect();
        let total = ids.len();
        let ids = Tensor::from_vec(ids, total, device)?;
        let mut x = self.embed.index_select(&ids, 0)?.reshape((1, total, cfg.hidden))?;
        if let Some(s) = cfg.embed_scale {
            // Gemma multiplies by sqrt(hidden) rounded to the activations' dtype.
            x = (x * (s as f32) as f64)?;
        }
        let positions: Vec<usize> = match &caches {
            Some(c) => c.iter().map(|c| c.len).collect(),
            None => vec![0; tokens.len()],
        };
        let lens: Vec<usize> = tokens.iter().map(|t| t.len()).collect();
        let norm = |t: Tensor, w: &Option<Tensor>| optional_norm(t, w, cfg.rms_eps);
        for (li, blk) in self.blocks.iter().enumerate() {
            let h = norm::rms_norm(&x, &blk.attn_norm, cfg.rms_eps)?;
            let [mut q, mut k, mut v] = Linear::forward_each([&blk.wq, &blk.wk, &blk.wv], &h)?;
            if let Some((bq, bk, bv)) = &blk.qkv_bias {
                (q, k, v) = (q.broadcast_add(bq)?, k.broadcast_add(bk)?, v.broadcast_add(bv)?);
            }
            let o = match &self.rope.host {
                Some(rope) => {
                    let flat = |t: &Tensor| host_values(t);
                    let weights = |w: &Option<Tensor>| w.as_ref().map(flat).transpose();
                    let (q_norm, k_norm) = (weights(&blk.q_norm)?, weights(&blk.k_norm)?);
                    let layer = attention::Layer {
                        cfg,
                        rope,
                        sliding: blk.sliding,
                        q_norm: q_norm.as_deref(),
                        k_norm: k_norm.as_deref(),
                    };
                    let mut host: Option<Vec<&mut HostKv>> =
                        caches.as_deref_mut().map(|c| c.iter_mut().map(|c| &mut c.host[li]).collect());
                    let out = layer.attend(&lens, &positions, flat(&q)?, flat(&k)?, flat(&v)?, host.as_deref_mut());
                    Tensor::from_vec(out, (1, total, cfg.n_head * cfg.head_dim), device)?
                }
                None => self.attention(li, blk, &q, &k, &v, tokens, &positions, caches.as_deref_mut())?,
            };
            let o = blk.wo.forward(&o)?;
            x = (x + norm(o, &blk.post_attn_norm)?)?;
            let h = norm::rms_norm(&x, &blk.ffn_norm, cfg.rms_eps)?;
            let [gate, up] = Linear::forward_each([&blk.gate, &blk.up], &h)?;
            let gated = gated(&gate, &up, cfg.activation)?;
            let mlp = blk.down.forward(&gated)?;
            x = (x + norm(mlp, &blk.post_ffn_norm)?)?;
        }
        if let Some(caches) = caches {
            for (cache, seq) in caches.iter_mut().zip(tokens) {
                cache.len += seq.len();
            }
        }
        Ok(norm::rms_norm(&x.squeeze(0)?, &self.norm, cfg.rms_eps)?)
    }
}

/// The MLP's gated product, `activation(gate) * up`. On the CPU in f32 it
/// runs on every thread (candle maps a tensor on one, and multiplies on
/// rayon's), eight values at a time, with [`expf::silu`] and
/// [`gelu::gelu`]: candle's bits, without the C library.
fn gated(gate: &Tensor, up: &Tensor, activation: Activation) -> candle_core::Result<Tensor> {
    if gate.device().is_cpu() && gate.dtype() == DType::F32 {
        return gate.apply_op2_no_bwd(up, &Gated(activation));
    }
    let gate = match activation {
        Activation::Silu => gate.silu(),
        Activation::GeluTanh => gate.gelu(),
    }?;
    gate * up
}

struct Gated(Activation);

impl candle_core::CustomOp2 for Gated {
    fn name(&self) -> &'static str {
        "parallel-gated-activation"
    }

    fn cpu_fwd(
        &self,
        gate: &candle_core::CpuStorage,
        gate_layout: &candle_core::Layout,
        up: &candle_core::CpuStorage,
        up_layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use crate::infer::dense::{par_spans, strided_rows};
        let (candle_core::CpuStorage::F32(gate), candle_core::CpuStorage::F32(up)) = (gate, up) else {
            candle_core::bail!("{} takes f32", self.name())
        };
        let (Some(g), Some(u)) = (strided_rows(gate_layout), strided_rows(up_layout)) else {
            candle_core::bail!("{}: gate and up must be rows of contiguous values", self.name())
        };
        if up_layout.dims() != gate_layout.dims() {
            candle_core::bail!("{}: gate {:?} and up {:?} differ", self.name(), gate_layout.dims(), up_layout.dims())
        }
        let (width, rows) = (g.2, g.3);
        let mut out = Vec::with_capacity(rows * width);
        if width > 0 {
            // Whole rows a work item, a few microseconds of work.
            let chunk = width * (4096 / width).max(1);
            par_spans(&mut out.spare_capacity_mut()[..rows * width], chunk, |span, out| {
                for (r, out) in (span.start / width..).zip(out.chunks_mut(width)) {
                    let (x, up) = (&gate[g.0 + r * g.1..][..width], &up[u.0 + r * u.1..][..width]);
                    match self.0 {
                        Activation::Silu => expf::silu_into(x, out),
                        Activation::GeluTanh => gelu::gelu_into(x, out),
                    }
                    for (o, &u) in out.iter_mut().zip(up) {
                        // SAFETY: the activation wrote every value of `out`.
                        o.write(unsafe { o.assume_init() } * u);
                    }
                }
            });
        }
        // SAFETY: the spans cover `out`, and each was written whole.
        unsafe { out.set_len(rows * width) };
        Ok((candle_core::CpuStorage::F32(out), gate_layout.shape().clone()))
    }
}

/// The values of a tensor on the CPU in f32, in order, copied once: a view
/// of a fused matmul's columns too (the host attention's inputs).
fn host_values(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    let (storage, layout) = t.storage_and_layout();
    if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)), Some((start, stride, width, rows))) =
        (&*storage, crate::infer::dense::strided_rows(layout))
    {
        let mut out = Vec::with_capacity(rows * width);
        for r in 0..rows {
            out.extend_from_slice(&data[start + r * stride..][..width]);
        }
        return Ok(out);
    }
    drop(storage);
    t.flatten_all()?.to_vec1()
}

/// RMS-normalises `t` by `w` where the architecture has that norm (Gemma's
/// post norms, Qwen3's and Gemma-3's q/k norms); `t` as it is otherwise.
fn optional_norm(t: Tensor, w: &Option<Tensor>, eps: f32) -> candle_core::Result<Tensor> {
    match w {
        Some(w) => norm::rms_norm(&t, w, eps),
        None => Ok(t),
    }
}

/// A quantized weight as a matmul. On the CPU the block types and the
/// K-quants (Q4_K, Q5_K, Q6_K) run in prefgen's int8 kernels (`qmatmul`),
/// on the file's weights as they are, with the same bits on every CPU; other
/// types and the GPU use candle's kernels.
fn matmul(t: QTensor, device: &Device, dequantize: bool) -> Result<Linear> {
    if dequantize {
        return Ok(Linear::dense(t.dequantize(device)?)?);
    }
    if device.is_cpu()
        && let Some(packed) = PackedMatrix::new(&t, Kernel::chosen().map_err(anyhow::Error::msg)?)?
    {
        return Ok(Linear::Packed(packed));
    }
    Ok(Linear::Quantized(QMatMul::from_qtensor(t)?))
}

/// The `*.safetensors` files of a folder, memory-mapped.
pub(crate) struct Safetensors {
    files: candle_core::safetensors::MmapedSafetensors,
    dir: std::path::PathBuf,
}

impl Safetensors {
    pub(crate) fn open(dir: &Path) -> Result<Safetensors> {
        let paths = crate::infer::files::weight_files(dir)?;
        // SAFETY: the files are only read; a file truncated under us is the
        // same hazard as for any reader of a hub snapshot.
        let files = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&paths)? };
        Ok(Safetensors { files, dir: dir.to_path_buf() })
    }

    pub(crate) fn has(&self, name: &str) -> bool {
        self.files.get(name).is_ok()
    }

    /// A tensor in `dtype`.
    pub(crate) fn tensor(&self, name: &str, device: &Device, dtype: DType) -> Result<Tensor> {
        let t = self.files.load(name, device).with_context(|| format!("{}: tensor {name}", self.dir.display()))?;
        Ok(t.to_dtype(dtype)?)
    }
}

impl RopeScaling {
    /// The divisor of each rotary frequency (what llama.cpp's converter
    /// stores as `rope_freqs.weight`): long wavelengths are slowed by
    /// `factor`, short ones kept, and the band between interpolated.
    fn factors(&self, base: f32, head_dim: usize) -> Vec<f32> {
        let old = self.original_max_position_embeddings.unwrap_or_default() as f32;
        let (low_wavelen, high_wavelen) = (old / self.low_freq_factor, old / self.high_freq_factor);
        (0..head_dim / 2)
            .map(|i| {
                let wavelen = 2.0 * std::f32::consts::PI * base.powf(2.0 * i as f32 / head_dim as f32);
                if wavelen > low_wavelen {
                    self.factor
                } else if wavelen >= high_wavelen {
                    let smooth =
                        (old / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor);
                    1.0 / ((1.0 - smooth) / self.factor + smooth)
                } else {
                    1.0
                }
            })
            .collect()
    }
}

/// `(context, head_dim / 2)` cosines and sines of the rotary angles.
/// Each frequency divided by its factor, when there are factors.
fn rope_tables(
    cfg: &Config,
    base: f32,
    factors: Option<&[f32]>,
    device: &Device,
    dtype: DType,
) -> Result<(Tensor, Tensor)> {
    let half = cfg.head_dim / 2;
    let mut inv: Vec<f32> = (0..half).map(|i| 1.0 / base.powf(2.0 * i as f32 / cfg.head_dim as f32)).collect();
    for (f, factor) in inv.iter_mut().zip(factors.unwrap_or_default()) {
        *f /= factor;
    }
    let inv = Tensor::from_vec(inv, (1, half), device)?;
    let pos = Tensor::arange(0u32, cfg.context as u32, device)?.to_dtype(DType::F32)?.reshape((cfg.context, 1))?;
    let angles = pos.broadcast_mul(&inv)?;
    Ok((angles.cos()?.to_dtype(dtype)?, angles.sin()?.to_dtype(dtype)?))
}

/// `-inf` where query `i` (at position `pos + i`) must not see key `j`: a
/// later key, or (with a sliding window) one `window` or more positions back.
fn attention_mask(l: usize, pos: usize, window: Option<usize>, device: &Device) -> candle_core::Result<Tensor> {
    let t = pos + l;
    let mask: Vec<f32> = (0..l)
        .flat_map(|i| {
            (0..t).map(move |j| {
                let q = pos + i;
                let hidden = j > q || window.is_some_and(|w| q - j >= w);
                if hidden { f32::NEG_INFINITY } else { 0.0 }
            })
        })
        .collect();
    Tensor::from_vec(mask, (l, t), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gated product on the threads gives each value's scalar
    /// `activation(gate) * up`, across work items and a ragged tail.
    #[test]
    fn the_gated_product_is_the_scalar_ones() {
        let n = 3 * 4096 + 13;
        let gate: Vec<f32> = crate::infer::test_values(n, 5).iter().map(|v| v * 9.0).collect();
        let up = crate::infer::test_values(n, 6);
        let t = |v: &[f32]| Tensor::from_vec(v.to_vec(), (1, n), &Device::Cpu).unwrap();
        for (activation, scalar) in
            [(Activation::Silu, expf::silu as fn(f32) -> f32), (Activation::GeluTanh, gelu::gelu)]
        {
            let got = gated(&t(&gate), &t(&up), activation).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (i, ((g, &x), &u)) in got.iter().zip(&gate).zip(&up).enumerate() {
                let want = scalar(x) * u;
                assert_eq!(g.to_bits(), want.to_bits(), "{activation:?}, value {i}: {g} against {want}");
            }
        }
    }

    /// The GPU's tensor path in bf16 (run here with the CPU's kernels) stays
    /// within bf16's rounding of the f32 model over a 500-token sequence:
    /// the attention softmax runs in f32, as transformers runs it. In bf16
    /// (before) its sum over hundreds of keys moved these logits by 0.28,
    /// and an ArmoRM score by 0.46 where transformers' bf16 moved it by 0.002.
    #[test]
    fn bf16_tensor_ops_stay_near_f32_over_long_sequences() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama3");
        let exact = Decoder::from_safetensors(&dir, &Device::Cpu, None).unwrap();
        let bf16 = Decoder::from_safetensors(&dir, &Device::Cpu, Some(DType::BF16)).unwrap();
        assert!(bf16.rope.host.is_none(), "bf16 runs the tensor ops");
        let seq: Vec<u32> = (0..500u32).map(|t| (t * 7 + 3) % 600).collect();
        let last = |m: &Decoder| -> Vec<f32> {
            let h = m.hidden(&[&seq], None).unwrap();
            m.logits(&h.narrow(0, seq.len() - 1, 1).unwrap()).unwrap().flatten_all().unwrap().to_vec1().unwrap()
        };
        let (a, b) = (last(&exact), last(&bf16));
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
        let worst = a.iter().zip(&b).fold(0f32, |w, (x, y)| w.max((x - y).abs()));
        eprintln!("bf16 against f32 over 500 tokens: {worst} (largest logit {scale})");
        assert!(worst <= 0.03 * scale, "bf16 logits differ from f32 by {worst} (largest logit {scale})");
    }

    /// gemma-3-4b-it's config.json names six fields of its text model; the
    /// rest are Gemma3TextConfig's defaults, resolved as transformers
    /// resolves them (checked with transformers 5.25: 8 heads, 4 KV heads,
    /// head_dim and query_pre_attn_scalar 256, bases 1e6 scaled by 8 and
    /// 1e4 unscaled, every 6th layer full).
    #[test]
    fn gemma3_4b_text_config_takes_the_config_class_defaults() {
        let config = serde_json::json!({
            "architectures": ["Gemma3ForConditionalGeneration"],
            "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                            "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                            "sliding_window": 1024},
        });
        let (family, wrapped) = Family::of_architecture("Gemma3ForConditionalGeneration").unwrap();
        let hc: HubConfig = serde_json::from_value(family.text_config(&config, wrapped).unwrap()).unwrap();
        hc.check().unwrap();
        assert_eq!((hc.num_attention_heads, hc.num_key_value_heads, hc.head_dim), (8, Some(4), Some(256)));
        assert_eq!((hc.query_pre_attn_scalar, hc.max_position_embeddings), (Some(256.0), 131072));
        let (global, local) = hc.ropes(256).unwrap();
        assert_eq!((global.theta, global.factors), (1e6, Some(vec![8.0; 128])));
        assert_eq!((local.theta, local.factors), (1e4, None));
        let full: Vec<usize> = (0..34).filter(|&i| !family.slides(i, None, None, hc.sliding_window_pattern)).collect();
        assert_eq!(full, [5, 11, 17, 23, 29]);
    }

    /// A config.json the families cannot run is refused naming the file and
    /// the key: an architecture no family reads, or biases none has.
    #[test]
    fn unsupported_configs_are_refused_by_key() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama3");
        let tmp = tempfile::tempdir().unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(fixture.join(f), tmp.path().join(f)).unwrap();
        }
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(fixture.join("config.json")).unwrap()).unwrap();
        for (key, value, says) in [
            (
                "architectures",
                serde_json::json!(["Phi3ForCausalLM"]),
                "Phi3ForCausalLM is not supported (LlamaForCausalLM, Qwen2ForCausalLM",
            ),
            ("attention_bias", serde_json::json!(true), "attention_bias is true"),
        ] {
            let mut changed = config.clone();
            changed[key] = value;
            std::fs::write(tmp.path().join("config.json"), changed.to_string()).unwrap();
            let err = format!("{:#}", Decoder::from_safetensors(tmp.path(), &Device::Cpu, None).err().unwrap());
            assert!(err.contains("config.json") && err.contains(says), "{err}");
        }
    }

    /// The CPU's fused attention and the tensor ops (the GPU's path) give
    /// the same hidden states: prompts of different lengths packed together
    /// (the longest past Gemma-2's sliding window of 8), decode steps over
    /// the caches, and scoring without caches; grouped-query heads,
    /// soft-capping, sliding layers, q/k/v biases and q/k norms.
    #[test]
    fn fused_attention_matches_the_tensor_ops() {
        for name in
            ["tiny-llama3", "tiny-gemma2", "tiny-qwen2", "tiny-qwen3", "tiny-mistral", "tiny-gemma3", "tiny-llama32"]
        {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
            let fused = Decoder::from_safetensors(&dir, &Device::Cpu, None).unwrap();
            let mut tensors = Decoder::from_safetensors(&dir, &Device::Cpu, None).unwrap();
            assert!(fused.rope.host.is_some(), "f32 on the CPU runs the fused attention");
            tensors.rope.host = None;
            let prompts: Vec<Vec<u32>> = [3u32, 11, 20]
                .iter()
                .enumerate()
                .map(|(i, &l)| (0..l).map(|t| (t * 7 + i as u32 * 13) % 600).collect())
                .collect();
            let run = |m: &Decoder| -> Vec<Vec<f32>> {
                let flat = |h: Tensor| h.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let mut caches: Vec<KvCache> = prompts.iter().map(|_| m.new_cache()).collect();
                let mut inputs = prompts.clone();
                let mut out = Vec::new();
                for step in 0..4u32 {
                    let refs: Vec<&[u32]> = inputs.iter().map(Vec::as_slice).collect();
                    out.push(flat(m.hidden(&refs, Some(&mut caches.iter_mut().collect::<Vec<_>>())).unwrap()));
                    inputs = (0..prompts.len() as u32).map(|i| vec![(step * 5 + i) % 600]).collect();
                }
                let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
                out.push(flat(m.hidden(&refs, None).unwrap()));
                out
            };
            for (step, (a, b)) in run(&fused).iter().zip(run(&tensors)).enumerate() {
                let worst = a.iter().zip(&b).fold(0f32, |w, (x, y)| w.max((x - y).abs()));
                assert!(worst <= 1e-4, "{name}, step {step}: hidden states differ by {worst:e}");
            }
        }
    }
}
