//! Llama (Llama-3 and 3.1 rope scaling; SmolLM2 is one too), from a GGUF file
//! (quantized weights, CPU) or a hub-layout safetensors folder (dense).
//!
//! Built for batched decoding with exact batch-size invariance: the linear
//! layers run on the whole batch (a quantized matmul computes each row on its
//! own), while rotary embeddings and attention run per sequence over that
//! sequence's own, unpadded KV cache. Padding would change the order of float
//! sums inside attention, and with it the sampled tokens.

use crate::infer::gguf::GgufFile;
use anyhow::{Context, Result, bail};
use std::path::Path;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, IndexOp, Module, Tensor};

/// Hyper-parameters, from the `llama.*` GGUF metadata or `config.json`.
#[derive(Debug, Clone)]
pub struct Config {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub hidden: usize,
    pub rms_eps: f32,
    pub rope_base: f32,
    pub rope_scaling: Option<RopeScaling>,
    pub context: usize,
    /// GGUF files store q and k permuted for interleaved rotary pairs;
    /// hub checkpoints rotate the two halves of each head.
    pub interleaved_rope: bool,
}

/// Llama-3.1's `rope_scaling` (`rope_type = "llama3"`).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

/// `config.json` of a `LlamaForCausalLM` checkpoint (the fields used here).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct HubConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    pub rope_theta: Option<f32>,
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers >= 5 writes `rope_theta` and the scaling here instead.
    pub rope_parameters: Option<serde_json::Value>,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

/// A weight matrix `(out, in)`: quantized, or dense.
enum Linear {
    Quantized(QMatMul),
    Dense(Tensor),
}

impl Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Linear::Quantized(q) => q.forward(x),
            Linear::Dense(w) => x.broadcast_matmul(&w.t()?),
        }
    }
}

struct Block {
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

pub struct Llama {
    pub cfg: Config,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    head: Linear,
    cos: Tensor,
    sin: Tensor,
}

/// One sequence's keys and values, per layer: `(1, n_kv_head, len, head_dim)`.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Tokens the cache holds (the next token's position).
    pub len: usize,
}

impl Llama {
    /// Loads a GGUF file's weights (quantized matmuls on the CPU).
    pub fn from_gguf(file: &GgufFile, device: &Device) -> Result<Llama> {
        let cfg = Config {
            n_layer: file.u32("llama.block_count")? as usize,
            n_head: file.u32("llama.attention.head_count")? as usize,
            n_kv_head: file.u32("llama.attention.head_count_kv")? as usize,
            head_dim: file.u32("llama.rope.dimension_count")? as usize,
            hidden: file.u32("llama.embedding_length")? as usize,
            rms_eps: file.f32("llama.attention.layer_norm_rms_epsilon")?,
            rope_base: file.f32("llama.rope.freq_base").unwrap_or(10_000.0),
            rope_scaling: None,
            context: file.u32("llama.context_length")? as usize,
            interleaved_rope: true,
        };
        let mut reader = std::fs::File::open(&file.path)?;
        let mut tensor = |name: &str| {
            file.content
                .tensor(&mut reader, name, device)
                .with_context(|| format!("{}: tensor {name}", file.path.display()))
        };
        let dense = |t: QTensor| t.dequantize(device);
        let embed_q = tensor("token_embd.weight")?;
        let embed = dense(embed_q)?;
        // Without `output.weight` the head is tied to the embedding.
        let head = match tensor("output.weight") {
            Ok(t) => t,
            Err(_) => tensor("token_embd.weight")?,
        };
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let mut q = |n: &str| -> Result<Linear> { matmul(tensor(&format!("blk.{i}.{n}.weight"))?, device) };
            blocks.push(Block {
                wq: q("attn_q")?,
                wk: q("attn_k")?,
                wv: q("attn_v")?,
                wo: q("attn_output")?,
                gate: q("ffn_gate")?,
                up: q("ffn_up")?,
                down: q("ffn_down")?,
                attn_norm: dense(tensor(&format!("blk.{i}.attn_norm.weight"))?)?,
                ffn_norm: dense(tensor(&format!("blk.{i}.ffn_norm.weight"))?)?,
            });
        }
        let norm = dense(tensor("output_norm.weight")?)?;
        let (cos, sin) = rope_tables(&cfg, device)?;
        Ok(Llama { cfg, embed, blocks, norm, head: matmul(head, device)?, cos, sin })
    }

    /// Loads a hub-layout folder: `config.json` and `*.safetensors` (one
    /// file, or shards listed by `model.safetensors.index.json`), in f32.
    pub fn from_safetensors(dir: &Path, device: &Device) -> Result<Llama> {
        let text = std::fs::read_to_string(dir.join("config.json")).with_context(|| format!("{}: no config.json", dir.display()))?;
        let hc: HubConfig = serde_json::from_str(&text).with_context(|| format!("{}/config.json", dir.display()))?;
        let params = hc.rope_scaling.as_ref().or(hc.rope_parameters.as_ref()).filter(|v| !v.is_null());
        let rope_scaling = match params.map(|v| (v, v.get("rope_type").or(v.get("type")).and_then(|t| t.as_str()))) {
            Some((v, Some("llama3"))) => Some(serde_json::from_value(v.clone())?),
            Some((_, None | Some("default"))) | None => None,
            Some((v, _)) => bail!("{}/config.json: rope scaling {v} is not supported (llama3 is)", dir.display()),
        };
        let rope_theta = hc
            .rope_theta
            .or_else(|| hc.rope_parameters.as_ref().and_then(|p| p["rope_theta"].as_f64()).map(|t| t as f32))
            .unwrap_or(10_000.0);
        let cfg = Config {
            n_layer: hc.num_hidden_layers,
            n_head: hc.num_attention_heads,
            n_kv_head: hc.num_key_value_heads.unwrap_or(hc.num_attention_heads),
            head_dim: hc.head_dim.unwrap_or(hc.hidden_size / hc.num_attention_heads),
            hidden: hc.hidden_size,
            rms_eps: hc.rms_norm_eps as f32,
            rope_base: rope_theta,
            rope_scaling,
            context: hc.max_position_embeddings,
            interleaved_rope: false,
        };
        let weights = Safetensors::open(dir)?;
        let get = |name: &str| -> Result<Tensor> { weights.tensor(name, device) };
        let dense = |name: &str| -> Result<Linear> { Ok(Linear::Dense(get(name)?)) };
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = format!("model.layers.{i}");
            blocks.push(Block {
                attn_norm: get(&format!("{p}.input_layernorm.weight"))?,
                wq: dense(&format!("{p}.self_attn.q_proj.weight"))?,
                wk: dense(&format!("{p}.self_attn.k_proj.weight"))?,
                wv: dense(&format!("{p}.self_attn.v_proj.weight"))?,
                wo: dense(&format!("{p}.self_attn.o_proj.weight"))?,
                ffn_norm: get(&format!("{p}.post_attention_layernorm.weight"))?,
                gate: dense(&format!("{p}.mlp.gate_proj.weight"))?,
                up: dense(&format!("{p}.mlp.up_proj.weight"))?,
                down: dense(&format!("{p}.mlp.down_proj.weight"))?,
            });
        }
        let embed = get("model.embed_tokens.weight")?;
        let head = if hc.tie_word_embeddings { Linear::Dense(embed.clone()) } else { dense("lm_head.weight")? };
        let (cos, sin) = rope_tables(&cfg, device)?;
        Ok(Llama { cfg, embed, blocks, norm: get("model.norm.weight")?, head, cos, sin })
    }

    pub fn new_cache(&self) -> KvCache {
        KvCache { layers: (0..self.cfg.n_layer).map(|_| None).collect(), len: 0 }
    }

    /// Appends `tokens[b]` to sequence `b` and returns the logits after each
    /// sequence's last token, `(batch, vocab)`. All sequences append the same
    /// number of tokens: one prompt (prefill), or one token each (decode).
    pub fn forward(&self, tokens: &[&[u32]], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, l) = (tokens.len(), tokens[0].len());
        let device = self.embed.device();
        let ids: Vec<u32> = tokens.iter().flat_map(|t| t.iter().copied()).collect();
        let ids = Tensor::from_vec(ids, b * l, device)?;
        let mut x = self.embed.index_select(&ids, 0)?.reshape((b, l, cfg.hidden))?;
        let scale = 1.0 / (cfg.head_dim as f64).sqrt();
        for (li, blk) in self.blocks.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &blk.attn_norm, cfg.rms_eps)?;
            let (q, k, v) = (blk.wq.forward(&h)?, blk.wk.forward(&h)?, blk.wv.forward(&h)?);
            let mut outs = Vec::with_capacity(b);
            for (i, cache) in caches.iter_mut().enumerate() {
                let heads = |t: &Tensor, n: usize| -> candle_core::Result<Tensor> {
                    t.i(i)?.reshape((1, l, n, cfg.head_dim))?.transpose(1, 2)?.contiguous()
                };
                let pos = cache.len;
                let cos = self.cos.narrow(0, pos, l)?;
                let sin = self.sin.narrow(0, pos, l)?;
                let rope = |t: &Tensor| {
                    if cfg.interleaved_rope {
                        candle_nn::rotary_emb::rope_i(t, &cos, &sin)
                    } else {
                        candle_nn::rotary_emb::rope(t, &cos, &sin)
                    }
                };
                let qi = rope(&heads(&q, cfg.n_head)?)?;
                let ki = rope(&heads(&k, cfg.n_kv_head)?)?;
                let vi = heads(&v, cfg.n_kv_head)?;
                let (ka, va) = match cache.layers[li].take() {
                    None => (ki, vi),
                    Some((kc, vc)) => (Tensor::cat(&[&kc, &ki], 2)?, Tensor::cat(&[&vc, &vi], 2)?),
                };
                cache.layers[li] = Some((ka.clone(), va.clone()));
                let rep = cfg.n_head / cfg.n_kv_head;
                let (kr, vr) = (repeat_kv(&ka, rep)?, repeat_kv(&va, rep)?);
                let mut att = (qi.matmul(&kr.t()?)? * scale)?;
                if l > 1 {
                    att = att.broadcast_add(&causal_mask(l, pos, device)?)?;
                }
                let att = candle_nn::ops::softmax_last_dim(&att)?;
                let o = att.matmul(&vr)?;
                outs.push(o.transpose(1, 2)?.reshape((1, l, cfg.n_head * cfg.head_dim))?);
            }
            let o = Tensor::cat(&outs, 0)?;
            x = (x + blk.wo.forward(&o)?)?;
            let h = candle_nn::ops::rms_norm(&x, &blk.ffn_norm, cfg.rms_eps)?;
            let mlp = blk.down.forward(&(blk.gate.forward(&h)?.silu()? * blk.up.forward(&h)?)?)?;
            x = (x + mlp)?;
        }
        for cache in caches.iter_mut() {
            cache.len += l;
        }
        let last = x.narrow(1, l - 1, 1)?.squeeze(1)?;
        let h = candle_nn::ops::rms_norm(&last, &self.norm, cfg.rms_eps)?;
        Ok(self.head.forward(&h)?.to_dtype(DType::F32)?)
    }
}

/// A quantized weight as a matmul. candle has SIMD kernels for Q4_0, Q8_0
/// and the K-quants but only scalar code for Q4_1, Q5_0 and Q5_1 (80% of
/// SmolLM2's decode time went there), so those are re-quantized to Q8_0 at
/// load: the fast kernel, rows still computed independently, and a weight
/// change of at most half a Q8_0 step (1/254 of the block's largest weight).
fn matmul(t: QTensor, device: &Device) -> Result<Linear> {
    let t = match t.dtype() {
        GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 => QTensor::quantize(&t.dequantize(device)?, GgmlDType::Q8_0)?,
        _ => t,
    };
    Ok(Linear::Quantized(QMatMul::from_qtensor(t)?))
}

/// The `*.safetensors` files of a folder, memory-mapped.
struct Safetensors {
    files: candle_core::safetensors::MmapedSafetensors,
    dir: std::path::PathBuf,
}

impl Safetensors {
    fn open(dir: &Path) -> Result<Safetensors> {
        let index = dir.join("model.safetensors.index.json");
        let paths: Vec<std::path::PathBuf> = if index.is_file() {
            let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index)?)?;
            let mut names: Vec<String> = v["weight_map"]
                .as_object()
                .with_context(|| format!("{}: no weight_map", index.display()))?
                .values()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect();
            names.sort();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        for p in &paths {
            if !p.is_file() {
                bail!("{}: missing weights file {}", dir.display(), p.display());
            }
        }
        // SAFETY: the files are only read; a file truncated under us is the
        // same hazard as for any reader of a hub snapshot.
        let files = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&paths)? };
        Ok(Safetensors { files, dir: dir.to_path_buf() })
    }

    /// A tensor in f32.
    fn tensor(&self, name: &str, device: &Device) -> Result<Tensor> {
        let t = self.files.load(name, device).with_context(|| format!("{}: tensor {name}", self.dir.display()))?;
        Ok(t.to_dtype(DType::F32)?)
    }
}

/// `(context, head_dim / 2)` cosines and sines of the rotary angles.
fn rope_tables(cfg: &Config, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = cfg.head_dim / 2;
    let mut inv: Vec<f32> = (0..half).map(|i| 1.0 / cfg.rope_base.powf(2.0 * i as f32 / cfg.head_dim as f32)).collect();
    if let Some(s) = &cfg.rope_scaling {
        // Llama-3.1: long wavelengths are slowed by `factor`, short ones kept,
        // and the band between interpolated.
        let old = s.original_max_position_embeddings as f32;
        let (low_wavelen, high_wavelen) = (old / s.low_freq_factor, old / s.high_freq_factor);
        for f in inv.iter_mut() {
            let wavelen = 2.0 * std::f32::consts::PI / *f;
            if wavelen > low_wavelen {
                *f /= s.factor;
            } else if wavelen >= high_wavelen {
                let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                *f = (1.0 - smooth) * *f / s.factor + smooth * *f;
            }
        }
    }
    let inv = Tensor::from_vec(inv, (1, half), device)?;
    let pos = Tensor::arange(0u32, cfg.context as u32, device)?.to_dtype(DType::F32)?.reshape((cfg.context, 1))?;
    let angles = pos.broadcast_mul(&inv)?;
    Ok((angles.cos()?, angles.sin()?))
}

fn repeat_kv(x: &Tensor, rep: usize) -> candle_core::Result<Tensor> {
    if rep == 1 {
        return Ok(x.clone());
    }
    let (b, n, t, d) = x.dims4()?;
    x.unsqueeze(2)?.expand((b, n, rep, t, d))?.reshape((b, n * rep, t, d))
}

/// `-inf` where query `i` (at position `pos + i`) would see a later key.
fn causal_mask(l: usize, pos: usize, device: &Device) -> candle_core::Result<Tensor> {
    let t = pos + l;
    let mask: Vec<f32> = (0..l).flat_map(|i| (0..t).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(mask, (l, t), device)
}

