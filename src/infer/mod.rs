//! Model inference: loading a policy, chat templates, tokenizers, sampling,
//! the batched decoding engine, and the client for inference servers.

pub mod chat;
pub mod dense;
pub mod engine;
pub mod files;
pub mod gguf;
pub mod math;
pub mod models;
pub mod qmatmul;
pub mod reward;
pub mod sampler;
pub mod server;
pub mod template;

use anyhow::Result;
use candle_core::{DType, Device};
use chat::Chat;
use gguf::GgufFile;
use models::decoder::Decoder;
use std::path::Path;

/// The GPU when prefgen is built with `--features cuda` and one is present,
/// otherwise the CPU.
pub fn device() -> Result<Device> {
    Ok(Device::cuda_if_available(0)?)
}

/// Settles what inference needs of the process before any thread starts.
///
/// - candle's CPU thread count: its dense matmul asks for the count on
///   every call, and without `RAYON_NUM_THREADS` it counts the physical
///   cores from /proc/cpuinfo each time (3% of decoding time).
/// - glibc's malloc keeps freed memory: by default a buffer over 32 MiB
///   (a decoding step's logits: 32 rows of Gemma-3's 262,144-token
///   vocabulary) is mapped afresh on every step and its pages faulted in,
///   8% of a Gemma-3 decode at batch 32. Buffers up to 128 MiB come from
///   the heap, and up to 128 MiB of free heap stays mapped (1 GiB raised
///   `make bench`'s export peak from 1,978 to 2,517 MiB: larger buffers
///   are better mapped and unmapped whole).
///
/// # Safety
/// It sets an environment variable: no other thread may be running.
pub unsafe fn settle_process() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        // SAFETY: the caller's promise, that this process has one thread.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt changes thresholds only; no allocation is in flight
    // on another thread. A refused setting (0) leaves glibc's default.
    unsafe {
        const KEPT: libc::c_int = 128 << 20;
        libc::mallopt(libc::M_MMAP_THRESHOLD, KEPT);
        libc::mallopt(libc::M_TRIM_THRESHOLD, KEPT);
    }
}

/// How to load a policy.
#[derive(Debug, Default, Clone)]
pub struct Load<'a> {
    /// A Jinja file that replaces the model's own chat template (a base model
    /// has none).
    pub chat_template: Option<&'a Path>,
    /// Run a GGUF file's weights in f32 rather than as quantized matmuls.
    pub dequantize: bool,
    /// A model folder's weights and activations in this dtype rather than
    /// the device's (bf16 on a GPU, f32 on the CPU). bf16 on the CPU runs
    /// the GPU's tensor ops there, with the CPU's kernels.
    pub dtype: Option<DType>,
}

/// A policy ready to generate: its weights, and its tokenizer, template and
/// stop tokens.
pub struct Policy {
    pub model: Decoder,
    pub chat: Chat,
}

impl Policy {
    /// Loads a policy: a `.gguf` file, or a hub-layout model folder.
    pub fn load(path: &Path, options: &Load) -> Result<Policy> {
        let chat = Chat::load(path, options.chat_template)?;
        let model = if path.is_dir() {
            Decoder::from_safetensors(path, &device()?, options.dtype)?
        } else if let Some(dtype) = options.dtype {
            anyhow::bail!(
                "{}: a GGUF file runs in its own quantized types, so a dtype ({dtype:?}) applies only to a model folder",
                path.display()
            );
        } else {
            Decoder::from_gguf(&GgufFile::open(path)?, &device()?, options.dequantize)?
        };
        Ok(Policy { model, chat })
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

/// Deterministic pseudo-random values in [-1, 1), for the kernels' tests.
#[cfg(test)]
pub(crate) fn test_values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect()
}
