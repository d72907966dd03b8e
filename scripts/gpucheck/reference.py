#!/usr/bin/env python3
"""The transformers side of the GPU check, one step per call, so that
check.py measures it as it measures prefgen: in its own process, by wall
clock and peak memory. It also writes the random-weight models of real
shape that both sides run.

    reference.py env
    reference.py parity-lm  --model DIR --prompts FILE --dtype D --device DEV --max-new-tokens N --out FILE
    reference.py score      --model DIR --rows FILE --dtype D --device DEV --out FILE
    reference.py make-model --shape 8b|tiny --tokenizer DIR --device DEV --out DIR
    reference.py bench-generate --model DIR --batch-size B [...] --input-len N --output-len N --dtype D --device DEV

Every step prints one JSON object as its last line of stdout.
"""
import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gpucheck import armorm  # noqa: E402

# Llama-3-8B's shape (meta-llama/Meta-Llama-3-8B-Instruct's config.json), and
# the same structure scaled down for the CPU rehearsal.
SHAPES = {
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192),
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=448, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048),
}
# ArmoRM-Llama3-8B-v0.1's heads: 19 objectives, a gating network of 3 hidden
# layers of 1024 (scaled down with the tiny shape).
ARMORM = {"8b": dict(objectives=19, gate_dim=1024, n_hidden=3), "tiny": dict(objectives=19, gate_dim=32, n_hidden=3)}
SHARD_BYTES = 4 << 30
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def torch_dtype(name):
    import torch
    return {"bf16": torch.bfloat16, "f32": torch.float32}[name]


def sync(device):
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def load(cls, path, dtype, device, **kwargs):
    """`from_pretrained` in `dtype` on `device` (`dtype=` is the newer name of `torch_dtype=`)."""
    try:
        model = cls.from_pretrained(path, dtype=torch_dtype(dtype), attn_implementation="eager", **kwargs)
    except TypeError:
        model = cls.from_pretrained(path, torch_dtype=torch_dtype(dtype), attn_implementation="eager", **kwargs)
    return model.to(device).eval()


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def env(args):
    import torch
    import transformers
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
           "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    return out


def parity_lm(args):
    """Last-position logits and greedy tokens of every prompt, batch 1."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    model = load(AutoModelForCausalLM, args.model, args.dtype, args.device)
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    rows = []
    for r in read_jsonl(args.prompts):
        text = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                       add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids.to(args.device)
        with torch.no_grad():
            logits = model(ids).logits[0, -1].float().tolist()
            seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                 do_sample=False)[0, ids.shape[1]:].tolist()
        # transformers keeps the stop token; prefgen does not.
        if seq and seq[-1] in eos:
            seq.pop()
        rows.append({"prompt": r["prompt"], "input_ids": ids[0].tolist(), "logits": logits, "output_ids": seq})
    write_jsonl(args.out, rows)
    return {"sequences": len(rows)}


def reward_model(path, dtype, device):
    """ArmoRM as the published modeling file runs it: transformers' LlamaModel
    and the heads read from the checkpoint."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer, LlamaModel

    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    n_hidden = cfg.get("gating_n_hidden", 3)
    names = set(armorm.head_names(n_hidden))
    heads = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt", device=device) as f:
                heads.update({k: f.get_tensor(k) for k in f.keys() if k in names})
    tok = AutoTokenizer.from_pretrained(path)
    pattern = tok(armorm.GATING_TEXT, add_special_tokens=False).input_ids
    # ArmoRM's pad id lies past the vocabulary (the published modeling file
    # never pads); torch's embedding refuses it as a padding index.
    config = AutoConfig.from_pretrained(path)
    config.pad_token_id = None
    backbone = load(LlamaModel, path, dtype, device, config=config)
    temperature = cfg.get("gating_temperature", 10.0)

    def score(prompt, response):
        import torch
        conv = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        ids = tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False).input_ids
        with torch.no_grad():
            h = backbone(torch.tensor([ids], device=device)).last_hidden_state[0]
            return armorm.score(h, ids, pattern, heads, n_hidden, temperature), len(ids)

    return score


def score_rows(args):
    """Every response of SimPO rows scored one at a time (the seed's loop)."""
    score = reward_model(args.model, args.dtype, args.device)
    with open(args.rows) as f:
        rows = json.load(f)
    score(rows[0]["prompt"], rows[0]["all_generated_responses"][0])  # CUDA and kernels warmed, not timed
    sync(args.device)
    start = time.perf_counter()
    scores, tokens = [], 0
    for r in rows:
        row = []
        for response in r["all_generated_responses"]:
            s, n = score(r["prompt"], response)
            row.append(s)
            tokens += n
        scores.append(row)
    sync(args.device)
    run_s = time.perf_counter() - start
    with open(args.out, "w") as f:
        json.dump(scores, f)
    sequences = sum(len(r) for r in scores)
    return {"run_s": run_s, "sequences": sequences, "tokens": tokens, "sequences_per_s": sequences / run_s}


def make_model(args):
    """A random-weight Llama of `shape` as a hub folder (`llama/`), and an
    ArmoRM on the same backbone (`armorm/`, the shards linked, not copied)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    start = time.perf_counter()
    with open(os.path.join(args.tokenizer, "config.json")) as f:
        small = json.load(f)
    shape = SHAPES[args.shape]
    config = LlamaConfig(**shape, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                         initializer_range=0.02, bos_token_id=small["bos_token_id"], eos_token_id=small["eos_token_id"])
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(args.device):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    llama, rm = os.path.join(args.out, "llama"), os.path.join(args.out, "armorm")
    for d in (llama, rm):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        for name in TOKENIZER_FILES:
            if os.path.exists(os.path.join(args.tokenizer, name)):
                shutil.copy(os.path.join(args.tokenizer, name), d)
    # The backbone in shards both folders share; the LM head and ArmoRM's heads apart.
    shards, current, size = [], {}, 0
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        current[k] = v
        size += v.numel() * v.element_size()
        if size >= SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
    shards.append(current)
    index = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.contiguous().cpu() for k, v in shard.items()}, os.path.join(llama, name), metadata={"format": "pt"})
        os.symlink(os.path.join(llama, name), os.path.join(rm, name))
        index.update({k: name for k in shard})
    save_file({"lm_head.weight": model.lm_head.weight.contiguous().cpu()}, os.path.join(llama, "lm_head.safetensors"),
              metadata={"format": "pt"})
    h, a = shape["hidden_size"], ARMORM[args.shape]
    g = torch.Generator().manual_seed(1)
    heads = {"regression_layer.weight": torch.randn(a["objectives"], h, generator=g) * h ** -0.5,
             "gating.logit_scale": torch.tensor([1.0]),
             "reward_transform_matrix": torch.eye(a["objectives"]) + torch.randn(a["objectives"], a["objectives"], generator=g) * 0.1}
    widths = [h] + [a["gate_dim"]] * a["n_hidden"] + [a["objectives"]]
    for n, (i, o) in enumerate(zip(widths, widths[1:])):
        heads[f"gating.layers.{n}.weight"] = torch.randn(o, i, generator=g) * i ** -0.5
        heads[f"gating.layers.{n}.bias"] = torch.randn(o, generator=g) * 0.1
    heads = {k: v.to(torch.bfloat16) for k, v in heads.items()}
    save_file(heads, os.path.join(rm, "heads.safetensors"), metadata={"format": "pt"})
    cfg = config.to_dict()
    cfg.pop("dtype", None), cfg.pop("torch_dtype", None)
    for d, extra, names in (
        (llama, {"architectures": ["LlamaForCausalLM"]}, {"lm_head.weight": "lm_head.safetensors"}),
        (rm, {"architectures": ["LlamaForRewardModelWithGating"], "pad_token_id": shape["vocab_size"],
              "num_objectives": a["objectives"], "gating_temperature": 10.0, "gating_hidden_dim": a["gate_dim"],
              "gating_n_hidden": a["n_hidden"]}, {k: "heads.safetensors" for k in heads}),
    ):
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump({**cfg, **extra, "torch_dtype": "bfloat16"}, f, indent=2)
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": {**index, **names}}, f, indent=2)
    params = sum(p.numel() for p in model.parameters())
    return {"shape": args.shape, "parameters": params, "write_s": time.perf_counter() - start}


def bench_generate(args):
    """transformers' `generate` in `dtype` on random prompts of the same
    length, each run to `output_len` new tokens, one batch per size."""
    import torch
    from transformers import AutoModelForCausalLM

    model = load(AutoModelForCausalLM, args.model, args.dtype, args.device)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)

    def run(batch, input_len, output_len):
        ids = torch.randint(0, vocab, (batch, input_len), generator=g).to(args.device)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                                 min_new_tokens=output_len, do_sample=False, pad_token_id=0)
        return out.shape[1] - input_len

    run(2, 8, 4)
    runs = []
    for batch in args.batch_size:
        sync(args.device)
        start = time.perf_counter()
        new = run(batch, args.input_len, args.output_len)
        sync(args.device)
        seconds = time.perf_counter() - start
        runs.append({"batch_size": batch, "input_len": args.input_len, "output_len": args.output_len,
                     "seconds": seconds, "generated_tokens": new * batch,
                     "output_tokens_per_s": new * batch / seconds,
                     "total_tokens_per_s": (new + args.input_len) * batch / seconds})
    return {"runs": runs}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("step", choices=["env", "parity-lm", "score", "make-model", "bench-generate"])
    ap.add_argument("--model")
    ap.add_argument("--prompts")
    ap.add_argument("--rows")
    ap.add_argument("--out")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--shape", choices=sorted(SHAPES))
    ap.add_argument("--tokenizer")
    ap.add_argument("--batch-size", type=int, action="append")
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=256)
    args = ap.parse_args()
    step = {"env": env, "parity-lm": parity_lm, "score": score_rows, "make-model": make_model,
            "bench-generate": bench_generate}[args.step]
    print(json.dumps(step(args)))


if __name__ == "__main__":
    main()
