//! Llama from a GGUF file (quantized weights), for CPU generation.
//!
//! Built for batched decoding with exact batch-size invariance: the linear
//! layers run on the whole batch (a quantized matmul computes each row on its
//! own), while rotary embeddings and attention run per sequence over that
//! sequence's own, unpadded KV cache. Padding would change the order of float
//! sums inside attention, and with it the sampled tokens.

use crate::infer::gguf::GgufFile;
use anyhow::{Context, Result};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, IndexOp, Module, Tensor};

/// Hyper-parameters from the `llama.*` metadata.
#[derive(Debug, Clone)]
pub struct Config {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub hidden: usize,
    pub rms_eps: f32,
    pub rope_base: f32,
    pub context: usize,
}

struct Block {
    attn_norm: Tensor,
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    wo: QMatMul,
    ffn_norm: Tensor,
    gate: QMatMul,
    up: QMatMul,
    down: QMatMul,
}

pub struct QuantizedLlama {
    pub cfg: Config,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    head: QMatMul,
    cos: Tensor,
    sin: Tensor,
}

/// One sequence's keys and values, per layer: `(1, n_kv_head, len, head_dim)`.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Tokens the cache holds (the next token's position).
    pub len: usize,
}

impl QuantizedLlama {
    pub fn load(file: &GgufFile, device: &Device) -> Result<QuantizedLlama> {
        let cfg = Config {
            n_layer: file.u32("llama.block_count")? as usize,
            n_head: file.u32("llama.attention.head_count")? as usize,
            n_kv_head: file.u32("llama.attention.head_count_kv")? as usize,
            head_dim: file.u32("llama.rope.dimension_count")? as usize,
            hidden: file.u32("llama.embedding_length")? as usize,
            rms_eps: file.f32("llama.attention.layer_norm_rms_epsilon")?,
            rope_base: file.f32("llama.rope.freq_base").unwrap_or(10_000.0),
            context: file.u32("llama.context_length")? as usize,
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
            let mut q = |n: &str| -> Result<QMatMul> { matmul(tensor(&format!("blk.{i}.{n}.weight"))?, device) };
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
        Ok(QuantizedLlama { cfg, embed, blocks, norm, head: matmul(head, device)?, cos, sin })
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
                let qi = candle_nn::rotary_emb::rope_i(&heads(&q, cfg.n_head)?, &cos, &sin)?;
                let ki = candle_nn::rotary_emb::rope_i(&heads(&k, cfg.n_kv_head)?, &cos, &sin)?;
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
fn matmul(t: QTensor, device: &Device) -> Result<QMatMul> {
    let t = match t.dtype() {
        GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 => QTensor::quantize(&t.dequantize(device)?, GgmlDType::Q8_0)?,
        _ => t,
    };
    Ok(QMatMul::from_qtensor(t)?)
}

/// `(context, head_dim / 2)` cosines and sines of the rotary angles.
fn rope_tables(cfg: &Config, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = cfg.head_dim / 2;
    let inv: Vec<f32> = (0..half).map(|i| 1.0 / cfg.rope_base.powf(2.0 * i as f32 / cfg.head_dim as f32)).collect();
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

