#!/usr/bin/env python3
"""Makes the small test fixtures committed under tests/fixtures/.

    python3 scripts/make_fixtures.py            # SimPO-style imports (stdlib only)
                                                # and a hub-layout parquet (pyarrow)
    python3 scripts/make_fixtures.py smollm2    # tokenizer and chat-template references
                                                # (transformers, gguf; needs `make models`)
    python3 scripts/make_fixtures.py llama3     # a tiny random-weight Llama-3 and its
                                                # greedy tokens and logits (torch, transformers)
    python3 scripts/make_fixtures.py gemma2     # the same for a tiny Gemma-2
    python3 scripts/make_fixtures.py qwen2      # ... Qwen2 (q/k/v biases, tied embeddings)
    python3 scripts/make_fixtures.py qwen3      # ... Qwen3 (q/k norms, explicit head_dim)
    python3 scripts/make_fixtures.py mistral    # ... Mistral (sliding window on every layer)
                                                # (qwen2, qwen3, mistral: also converted to GGUF by
                                                # llama.cpp's converter, target/llama.cpp/src)
    python3 scripts/make_fixtures.py gemma3-tiny  # ... Gemma-3 (q/k norms, sliding pattern, local rope base)
    python3 scripts/make_fixtures.py llama32    # ... Llama-3.2 (tied embeddings, rope factor 32)
                                                # (both also converted to GGUF by llama.cpp's converter)
    python3 scripts/make_fixtures.py reward     # a tiny ArmoRM and sequence classifier of each family
                                                # with transformers' scores, and the judge's ratings on
                                                # every causal fixture (run after the families')
    python3 scripts/make_fixtures.py decode     # decoded text under each clean_up_tokenization_spaces
                                                # setting, and a cut UTF-8 sequence (transformers)
    python3 scripts/make_fixtures.py templates  # template switches (enable_thinking) rendered and
                                                # tokenized by transformers

Everything is seeded, so re-running reproduces the committed files.
"""
import hashlib
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpucheck.armorm  # noqa: E402  (the ArmoRM reference the GPU check shares)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
SEEDS = [13, 21, 42, 79, 100]


def dump(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=4)  # SimPO's own format


def simpo_fixture():
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud".split()
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + "?" for _ in range(40)]
    prompts += [
        "Explain 量子计算 in one line.",
        "Write a haiku about 🌸 and ☕",
        "Zebra first, uppercase sorts before lowercase",
        "tab\tand\nnewline and \"quotes\" and \\backslash",
        "control \x01 and DEL \x7f characters",
        "  leading and trailing spaces  ",
        "Ça va? Ñandú, naïve façade.",
        "x" * 3000,
    ]
    rows = [{"prompt": p} for p in prompts]
    rows.append({"prompt": prompts[3]})  # a duplicate prompt
    rows.append({"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is a chat-format prompt?"}]})
    rng.shuffle(rows)
    base = os.path.join(ROOT, "simpo")
    os.makedirs(base, exist_ok=True)
    with open(os.path.join(base, "prompts.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")

    prompt_set = sorted(set(p if isinstance(p, str) else p[1]["content"] for p in (r["prompt"] for r in rows)))
    responses = {}
    for i, p in enumerate(prompt_set):
        kind = i % 9
        if kind == 0:  # identical across every seed: filtered out
            same = "The same answer " + str(i)
            responses[p] = [same] * len(SEEDS)
        elif kind == 1:  # an empty response among others
            responses[p] = ["" if s == 42 else f"answer {i} seed {s}" for s in SEEDS]
        elif kind == 2:  # unicode and escapes
            responses[p] = [f"Réponse {s}: 你好 🌍 \"q\" \\ \n\tend" for s in SEEDS]
        elif kind == 3:  # four seeds agree, one differs
            responses[p] = ["agreed" if s != 79 else "dissent" for s in SEEDS]
        else:
            responses[p] = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 30))) for _ in SEEDS]
    for k, s in enumerate(SEEDS):
        out = [
            {
                "prompt": p,
                "format_prompt": f"<|user|>\n{p}<|end|>\n<|assistant|>\n",
                "generated_text": responses[p][k],
            }
            for p in prompt_set
        ]
        dump(os.path.join(base, "gens", f"output_{s}.json"), out)

    def scores_for(i, salt):
        kind = (i + salt) % 7
        if kind == 0:  # every score equal: a tie
            return [0.125] * len(SEEDS)
        if kind == 1:  # the maximum and minimum each appear twice: first index wins
            return [1.0, 3.0, 3.0, -2.0, -2.0]
        if kind == 2:  # values whose Python repr is unusual
            return [1e-05, 1e16, -0.0, 3.0, -2.5e-07]
        return [round(rng.gauss(0, 3), rng.randint(1, 17)) for _ in SEEDS]

    # Scores for every prompt, including those the filter drops: a file scored
    # before filtering must still import.
    for name, salt in (("scores.json", 0), ("scores_v2.json", 3)):
        scored = [
            {"prompt": p, "all_generated_responses": responses[p], "all_rm_scores": scores_for(i, salt)}
            for i, p in enumerate(prompt_set)
        ]
        dump(os.path.join(base, name), scored)


def hub_fixture():
    """A dataset laid out as the Hugging Face cache lays out a snapshot."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = os.path.join(ROOT, "hf_home", "hub", "datasets--prefgen-test--tiny_prefs")
    snap = os.path.join(repo, "snapshots", commit, "data")
    os.makedirs(snap, exist_ok=True)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    # As huggingface_hub stores it: contents in blobs/, snapshot entries are
    # relative symlinks to them.
    blobs = os.path.join(repo, "blobs")
    os.makedirs(blobs, exist_ok=True)
    for split, n in (("train_prefs", 12), ("test_prefs", 5)):
        prompts = [f"{split} prompt {i % (n - 2)}" for i in range(n)]  # with duplicates
        messages = [[{"content": p, "role": "user"}, {"content": "reply", "role": "assistant"}] for p in prompts]
        table = pa.table({"prompt": prompts, "messages": messages, "score": [float(i) for i in range(n)]})
        tmp = os.path.join(blobs, "tmp")
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:
            blob = hashlib.sha256(f.read()).hexdigest()
        os.replace(tmp, os.path.join(blobs, blob))
        link = os.path.join(snap, f"{split}-00000-of-00001.parquet")
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.join("..", "..", "..", "blobs", blob), link)


# Chat templates of the families the published datasets used (as in their
# tokenizer_config.json), rendered by transformers as the reference.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# ChatML as Qwen2.5's tokenizer_config.json writes it (its tools branches
# left out: the fixtures' conversations have no tools), with its default
# system prompt.
QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif %}{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
# Qwen3's: ChatML without a default system prompt, and its `enable_thinking`
# switch on the generation prompt (tools and reasoning_content branches left out).
QWEN3_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}"
)
# Mistral-7B-Instruct v0.1 / v0.2's.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# Gemma-3's (google/gemma-3-1b-it, tokenizer_config.json), image parts included.
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""
# Llama-3.2 Instruct's (1B and 3B, tokenizer_config.json). Its system turn
# carries a date: transformers' `strftime_now` (today) where defined, else
# the template's own "26 Jul 2024". prefgen renders the fallback, so a
# response does not depend on the day it was sampled: the reference is
# rendered with that date.
LLAMA32_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

TEXTS = [
    "Hello world",
    "What is 2 + 2? 12345 67890 3.14159 1,000,000",
    "  leading spaces, trailing   ",
    "tabs\tand\nnewlines\n\n\nand \r\n crlf",
    "Unicode: café naïve Ñandú 你好世界 こんにちは 🌍🎉 👩‍👩‍👧",
    "def f(x):\n    return [i**2 for i in range(x)]  # code\n",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "don't we'll I'm they've",
    "URL https://example.com/a?b=c&d=e and email a.b@example.org",
    "",
    " ",
    "ALL CAPS and MiXeD",
]


def smollm2_fixture():
    """Tokenizer and template references for the SmolLM2 GGUF, from transformers' own converter."""
    import gguf
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    path = os.path.join(ROOT, "..", "..", "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
    r = gguf.GGUFReader(path)
    f = lambda k: r.fields[k].contents()
    tokens = f("tokenizer.ggml.tokens")
    # The dict transformers' get_gguf_tokenizer builds from the same metadata.
    d = {
        "tokenizer_type": f("tokenizer.ggml.model"),
        "pre_tokenizer_type": f("tokenizer.ggml.pre"),
        "tokens": tokens,
        "merges": f("tokenizer.ggml.merges"),
        "token_type": f("tokenizer.ggml.token_type"),
    }
    backend, _ = convert_gguf_tokenizer(f("general.architecture"), d)
    bos, eos = tokens[f("tokenizer.ggml.bos_token_id")], tokens[f("tokenizer.ggml.eos_token_id")]
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos)
    cases = []
    for text in TEXTS:
        ids = backend.encode(text, add_special_tokens=False).ids
        cases.append({"text": text, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=True)})
    convs = [
        [{"role": "user", "content": "Hi there"}],
        [{"role": "user", "content": "  Spaces around  "}],
        [{"role": "user", "content": "Q: 你好?\nSecond line"}, {"role": "assistant", "content": "A: 🌍 fine"}],
    ]
    templates = {"smollm2": f("tokenizer.chat_template"), "llama3": LLAMA3_TEMPLATE, "gemma2": GEMMA2_TEMPLATE}
    specials = {"smollm2": (bos, eos), "llama3": ("<|begin_of_text|>", "<|eot_id|>"), "gemma2": ("<bos>", "<eos>")}
    renders = []
    for name, template in templates.items():
        t = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=specials[name][0], eos_token=specials[name][1])
        t.chat_template = template
        for conv in convs:
            for gen in (True, False):
                text = t.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
                renders.append({"template": name, "messages": conv, "add_generation_prompt": gen, "text": text})
    out = {
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "templates": templates,
        "specials": specials,
        "tokenizer": cases,
        "renders": renders,
    }
    dump(os.path.join(ROOT, "smollm2_reference.json"), out)


GEMMA3_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n   ",
    "Once upon a time, in a small village by the sea, there lived",
    "1, 2, 3, 4,",
]


def gemma3_fixture():
    """Tokenizer and model references for the Gemma-3 270M GGUF, from
    transformers' own GGUF loaders (weights dequantized to f32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = os.path.join(ROOT, "..", "..", "models")
    name = "gemma-3-270m-q4_k_m.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    texts = TEXTS + ["<start_of_turn>user\nHi<end_of_turn>\n", "a  b   c    d\n\n\ne", "x" * 40, "0123456789 ½ ⅓ 10⁶"]
    cases = []
    for text in texts:
        ids = tok(text, add_special_tokens=False).input_ids
        cases.append({"text": text, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=True),
                      "with_specials": tok(text).input_ids})
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32).eval()
    gens = []
    for prompt in GEMMA3_PROMPTS:
        input_ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(input_ids).logits[0, -1]
            seq = model.generate(input_ids, max_new_tokens=16, do_sample=False)[0, input_ids.shape[1]:].tolist()
        top = torch.topk(logits, 20)
        gens.append({"prompt": prompt, "input_ids": input_ids[0].tolist(), "top_ids": top.indices.tolist(),
                     "top_logits": top.values.tolist(), "generated": seq})
    dump(os.path.join(ROOT, "gemma3_reference.json"), {"model": name, "tokenizer": cases, "generation": gens})


def train_tokenizer(specials, bos="", qwen=False):
    """A small byte-level BPE trained on real prompts, with a family's special
    tokens; like the real ones, it adds the BOS (`bos`; by default the first
    special if it is Llama-3's, else `<bos>`) when asked for special tokens,
    or none when `bos` is None (Qwen). `qwen`: NFC and Qwen2's split regex
    (single digits), as Qwen2.5's and Qwen3's tokenizer.json have them."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    texts = []
    for name in ("mt_bench_questions.jsonl", "vicuna_bench_questions.jsonl"):
        with open(os.path.join(ROOT, "..", "..", "benches", "data", name)) as f:
            for line in f:
                q = json.loads(line)
                texts.extend(q.get("turns") or [q.get("text", "")])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if qwen:
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if bos is None:
        return tok
    bos = bos or (specials[0] if specials[0].startswith("<|begin") else "<bos>")
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


PARITY_PROMPTS = [
    "Hi",
    "What is the capital of France?",
    "Write a short poem about the sea and the wind, please.",
    "Explain photosynthesis to a child in simple words, with an example from a garden.",
    "café 你好 🌍",
    "List three prime numbers.",
    "Tell me a story about a robot who learns to paint, in a few sentences, ending happily.",
    "2 + 2 = ?",
]


def parity_reference(name, model, tok, template_kwargs=None, **extra):
    """Greedy tokens and last-position logits of every parity prompt, the
    template rendered with `template_kwargs` (and `extra` keys)."""
    import torch

    cases, margin = [], float("inf")
    for prompt in PARITY_PROMPTS:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True,
                                       **(template_kwargs or {}))
        input_ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(input_ids).logits[0, -1]
            gen = model.generate(input_ids, max_new_tokens=32, do_sample=False, output_scores=True, return_dict_in_generate=True)
        for step in gen.scores:
            top = torch.topk(step[0], 2).values
            margin = min(margin, float(top[0] - top[1]))
        new = gen.sequences[0, input_ids.shape[1]:].tolist()
        # What SimPO's decode.py fed vLLM: the template string tokenized again
        # with special tokens, hence a second BOS.
        vllm_ids = tok(text, add_special_tokens=True).input_ids
        cases.append({"prompt": prompt, "text": text, "input_ids": input_ids[0].tolist(), "vllm_input_ids": vllm_ids,
                      "logits": logits.tolist(), "generated": new})
    print(f"{name}: smallest greedy top-1 margin {margin:.2e} (a tie would make the test fragile)")
    dump(os.path.join(ROOT, f"tiny-{name}-reference.json"), {"max_new_tokens": 32, "cases": cases, **extra})


def tokenizer_cases(tok, specials):
    """transformers' ids (with and without special tokens) and decoded text
    of strings that exercise a tokenizer: digits, whitespace runs, unicode
    (composed and decomposed), the family's special tokens inside text."""
    texts = TEXTS + PARITY_PROMPTS + [
        "".join(specials) + " between " + " ".join(specials),
        "e\u0301 vs \u00e9, A\u030a, \ufb01 ligature, \u2460 \uff21",
        "1234567890 12.5% 3/4 2024-01-01 0x1F 1e-5",
        "a  b   c    d\n\n\ne\t\tf \u00a0nbsp",
        "Ελληνικά Русский العربية हिन्दी 한국어 ไทย",
        "I've they'll we'd YOU'RE It'S",
        "```python\nprint('hi')\n```",
    ]
    return [{"text": t, "ids": tok(t, add_special_tokens=False).input_ids, "with_specials": tok(t).input_ids,
             "decoded": tok.decode(tok(t, add_special_tokens=False).input_ids, skip_special_tokens=True)}
            for t in texts]


LLAMA_CPP = os.path.join(ROOT, "..", "..", "target", "llama.cpp", "src")


def to_gguf(folder, out, pre, outtype="f32"):
    """Converts a hub folder to GGUF with llama.cpp's own converter (the
    llama.cpp source the tests build), as a user converts a checkpoint.

    `pre` is the llama.cpp pre-tokenizer name written as tokenizer.ggml.pre
    (e.g. "qwen2", "llama-bpe", "gpt-2"): the converter recognises a
    pre-tokenizer by a hash of the tokenizer's ids on a test string, and no
    tiny trained vocabulary gives a real model's hash, so the fixture states
    the name its tokenizer's split rules belong to."""
    import importlib

    for path in (LLAMA_CPP, os.path.join(LLAMA_CPP, "gguf-py")):
        if path not in sys.path:
            sys.path.insert(0, path)
    converter = importlib.import_module("convert_hf_to_gguf")
    from conversion.base import TextModel

    TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
    argv = sys.argv
    sys.argv = ["convert_hf_to_gguf.py", folder, "--outfile", out, "--outtype", outtype]
    try:
        converter.main()
    finally:
        sys.argv = argv


def gemma2_fixture():
    """A tiny Gemma2ForCausalLM with Gemma-2's config fields (soft-capping,
    alternating sliding window shorter than the longer prompts,
    query_pre_attn_scalar != head_dim), special tokens and chat template."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast

    out = os.path.join(ROOT, "tiny-gemma2")
    specials = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
    backend = train_tokenizer(specials)
    ids = {t: backend.token_to_id(t) for t in specials}
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    tok.chat_template = GEMMA2_TEMPLATE
    config = Gemma2Config(
        vocab_size=backend.get_vocab_size(), hidden_size=64, intermediate_size=176, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        sliding_window=8, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0, initializer_range=0.3,
        hidden_activation="gelu_pytorch_tanh", bos_token_id=ids["<bos>"], eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
        pad_token_id=ids["<pad>"], attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():  # random norm weights, so (1 + w) is exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    model.generation_config.eos_token_id = [ids["<eos>"], ids["<end_of_turn>"]]
    model.generation_config.pad_token_id = ids["<pad>"]
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    parity_reference("gemma2", model, tok)


def llama3_fixture():
    """A tiny LlamaForCausalLM with Llama-3's config fields (rope scaling too),
    special tokens and chat template, and its greedy tokens and logits."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = os.path.join(ROOT, "tiny-llama3")
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    backend = train_tokenizer(specials)
    ids = {t: backend.token_to_id(t) for t in specials}
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    tok.chat_template = LLAMA3_TEMPLATE
    config = LlamaConfig(
        vocab_size=backend.get_vocab_size(), hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=False, initializer_range=0.15,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
        bos_token_id=ids["<|begin_of_text|>"], eos_token_id=[ids["<|end_of_text|>"], ids["<|eot_id|>"]],
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = [ids["<|end_of_text|>"], ids["<|eot_id|>"]]
    model.generation_config.pad_token_id = ids["<|end_of_text|>"]
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    parity_reference("llama3", model, tok)


def family_fixture(name, config_class, model_class, specials, bos, eos, template, randomize, pre, qwen=False,
                   stops=None, norm_mean=1.0, template_kwargs=None, **config):
    """A tiny random-weight model of a family, with its special tokens and
    chat template, its greedy tokens and logits and its tokenizer's ids, and
    the same model converted to GGUF (f32) by llama.cpp's converter, with
    `pre` as its pre-tokenizer. `randomize`: parameter names whose
    transformers initialisation (zero biases, unit norms) would leave the
    family's feature without effect (norms drawn around `norm_mean`: 0 where
    the family scales by 1 + w). `stops`: the generation config's stop tokens
    (`eos` alone by default); `template_kwargs`: what the reference renders
    the template with; `config` overrides the shared tiny shape. Returns the
    model and its tokenizer."""
    import torch
    import transformers
    from transformers import PreTrainedTokenizerFast

    out = os.path.join(ROOT, f"tiny-{name}")
    backend = train_tokenizer(specials, bos=bos, qwen=qwen)
    ids = {t: backend.token_to_id(t) for t in specials}
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos, pad_token=specials[0])
    tok.chat_template = template
    stops = [ids[t] for t in (stops or [eos])]
    shape = dict(
        vocab_size=backend.get_vocab_size(), hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
        initializer_range=0.15, bos_token_id=ids[bos] if bos else None, eos_token_id=stops,
        pad_token_id=ids[specials[0]], attn_implementation="eager",
    )
    shape.update(config)
    config = getattr(transformers, config_class)(**shape)
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if any(r in pname for r in randomize):
                p.normal_(norm_mean if "norm" in pname else 0.0, 0.3)
    model.generation_config.eos_token_id = stops
    model.generation_config.pad_token_id = ids[specials[0]]
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    parity_reference(name, model, tok, template_kwargs, tokenizer=tokenizer_cases(tok, specials))
    to_gguf(out, os.path.join(ROOT, f"tiny-{name}.gguf"), pre)
    return model, tok


def qwen2_fixture():
    """Qwen2.5-shaped: q/k/v biases (random, so they matter), embeddings tied
    as the small Qwen2.5 checkpoints tie them, no sliding window."""
    family_fixture("qwen2", "Qwen2Config", "Qwen2ForCausalLM", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                   None, "<|im_end|>", QWEN2_TEMPLATE, ["_proj.bias"], "qwen2", qwen=True,
                   tie_word_embeddings=True, rope_theta=1000000.0, use_sliding_window=False)
    # Also quantized, as users download GGUF files, to run prefgen's int8 kernels.
    to_gguf(os.path.join(ROOT, "tiny-qwen2"), os.path.join(ROOT, "tiny-qwen2.q8_0.gguf"), "qwen2", "q8_0")


def qwen3_fixture():
    """Qwen3-shaped: per-head q/k RMS norms (random weights) and a head_dim
    (32) that is not hidden / heads (16)."""
    family_fixture("qwen3", "Qwen3Config", "Qwen3ForCausalLM", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                   None, "<|im_end|>", QWEN3_TEMPLATE, ["q_norm", "k_norm"], "qwen2", qwen=True, head_dim=32,
                   tie_word_embeddings=False, rope_theta=1000000.0, use_sliding_window=False)


def mistral_fixture():
    """Mistral-shaped: a sliding window (8) on every layer, shorter than
    every prompt."""
    model, tok = family_fixture("mistral", "MistralConfig", "MistralForCausalLM", ["<unk>", "<s>", "</s>"], "<s>",
                                "</s>", MISTRAL_TEMPLATE, [], "gpt-2", sliding_window=8, tie_word_embeddings=False,
                                rope_theta=10000.0)
    # llama.cpp's converter writes Mistral as `llama` and drops
    # `sliding_window`: its GGUF is the model without a window (as v0.3 is),
    # so its reference is transformers' with the window off.
    model.config.sliding_window = None
    parity_reference("mistral-gguf", model, tok)


def gemma3_tiny_fixture():
    """Gemma-3-shaped (Gemma3ForCausalLM, gemma3_text): per-head q/k norms
    (random weights, scaled by 1 + w), sliding layers (window 8, shorter
    than the longer prompts) beside a full one as `layer_types` says, the
    sliding layers' own rope base (`rope_local_base_freq`), linear rope
    scaling on the full layer (as the 4B and up have it), and
    query_pre_attn_scalar != head_dim. Stops at <eos> and <end_of_turn>, as
    the instruct models' generation config says.

    Also converted to GGUF (`gemma3`, f32) by llama.cpp's converter, which
    records neither `layer_types` nor `query_pre_attn_scalar`: llama.cpp
    reads such a file with every 6th layer full (here: none) and scores
    scaled by head_dim, so the file's reference is transformers' model with
    those two settings."""
    import torch
    from transformers import Gemma3ForCausalLM

    name = "gemma3"
    model, tok = family_fixture(
        name, "Gemma3TextConfig", "Gemma3ForCausalLM",
        ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>",
        GEMMA3_TEMPLATE, ["norm"], "gpt-2", stops=["<eos>", "<end_of_turn>"], norm_mean=0.0,
        num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    config.query_pre_attn_scalar = config.head_dim
    as_read = Gemma3ForCausalLM(config).eval()
    as_read.load_state_dict(model.state_dict())
    as_read.generation_config = model.generation_config
    with torch.no_grad():
        assert not torch.equal(as_read(torch.tensor([[2, 5, 9]])).logits, model(torch.tensor([[2, 5, 9]])).logits)
    parity_reference(f"{name}-gguf", as_read, tok)


def llama32_fixture():
    """Llama-3.2-shaped (1B/3B): embeddings tied, so the safetensors hold no
    lm_head.weight, as the real ones ship; llama3 rope scaling with factor
    32; Llama-3.2's own chat template (its system turn and date), and its
    three stop tokens."""
    specials = ["<|end_of_text|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<|eom_id|>", "<|python_tag|>"]
    family_fixture("llama32", "LlamaConfig", "LlamaForCausalLM", specials, "<|begin_of_text|>", "<|eot_id|>",
                   LLAMA32_TEMPLATE, [], "gpt-2", stops=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
                   template_kwargs={"date_string": "26 Jul 2024"}, rms_norm_eps=1e-5, head_dim=16,
                   rope_parameters={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                                    "rope_theta": 500000.0},
                   tie_word_embeddings=True)
    # Its GGUF (llama.cpp's converter): `llama`, the rope scaling as
    # rope_freqs.weight, no output.weight (the head is the embedding).
    assert "lm_head.weight" not in safetensors_names(os.path.join(ROOT, "tiny-llama32", "model.safetensors"))


def safetensors_names(path):
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return set(f.keys())


REWARD_CONVERSATIONS = [
    ("Hi", "Hello! How can I help you today?"),
    ("What is the capital of France?", "Paris."),
    ("What is the capital of France?", "The capital of France is Paris, a city on the Seine."),
    ("Write a short poem about the sea.", "Waves roll in,\nwaves roll out;\nthe sea keeps time\nwithout a doubt."),
    ("café 你好 🌍", "Bonjour ! 你好！ The world 🌍 says hi."),
    ("List three prime numbers.", "2, 3 and 5."),
    ("List three prime numbers.", ""),
    ("2 + 2 = ?", "4"),
    ("2 + 2 = ?", "It is 5.\n\nJust kidding: 4."),
    ("Explain photosynthesis to a child.", "Plants eat sunlight. They take light, water and air, and make sugar to grow."),
    ("Tell me a joke.", "Why did the robot paint?\nBecause it had a lot of *art* ware."),
    ("Translate 'good morning' to Spanish.", "Buenos días."),
    ("Give me a Python one-liner to reverse a list.", "```python\nxs[::-1]\n```"),
    ("What is 12 * 12?", "144"),
    ("Describe the color blue to someone who cannot see.", "Blue feels like cool water on your hands, or a calm breeze."),
    ("Say nothing.", " "),
    ("Why is the sky blue?", "Sunlight scatters off air molecules; blue light scatters most, so the sky looks blue."),
]


def reward_fixtures():
    """A tiny ArmoRM (LlamaForRewardModelWithGating: a Llama-3-shaped backbone,
    regression layer, gating network, transform matrix) and a tiny
    LlamaForSequenceClassification, with reference scores: transformers'
    LlamaModel plus the heads as the published modeling file writes them, and
    transformers' own classifier, one conversation at a time, f32 on CPU."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForSequenceClassification, LlamaModel, PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    backend = train_tokenizer(specials)
    ids = {t: backend.token_to_id(t) for t in specials}
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    tok.chat_template = LLAMA3_TEMPLATE
    vocab = backend.get_vocab_size()
    shape = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=500000.0,
        initializer_range=0.15, bos_token_id=ids["<|begin_of_text|>"], eos_token_id=ids["<|eot_id|>"],
    )
    convs = [[{"role": "user", "content": p}, {"role": "assistant", "content": r}] for p, r in REWARD_CONVERSATIONS]
    inputs = [tok(tok.apply_chat_template(c, tokenize=False), add_special_tokens=False).input_ids for c in convs]
    # ArmoRM finds the gating position by the ids of this text.
    pattern = tok(gpucheck.armorm.GATING_TEXT, add_special_tokens=False).input_ids

    # ArmoRM, as RLHFlow's modeling_custom.py defines it; its pad id lies
    # outside the vocabulary, as the real one's (128256) does.
    objectives, gate_dim, gate_layers, temperature = 19, 32, 3, 10.0
    config = LlamaConfig(**shape)
    torch.manual_seed(1)
    backbone = LlamaModel(config).eval()
    regression = torch.randn(objectives, 64) * 0.3
    widths = [64] + [gate_dim] * gate_layers + [objectives]
    gating = [(torch.randn(o, i) * (1.0 / i) ** 0.5, torch.randn(o) * 0.1) for i, o in zip(widths, widths[1:])]
    logit_scale = torch.tensor([1.7])
    transform = torch.eye(objectives) + torch.randn(objectives, objectives) * 0.1

    weights = {f"model.{k}": v.contiguous() for k, v in backbone.state_dict().items()}
    weights["regression_layer.weight"] = regression
    for n, (w, b) in enumerate(gating):
        weights[f"gating.layers.{n}.weight"], weights[f"gating.layers.{n}.bias"] = w, b
    weights["gating.logit_scale"] = logit_scale
    weights["reward_transform_matrix"] = transform

    def armorm(input_ids):
        with torch.no_grad():
            h = backbone(torch.tensor([input_ids])).last_hidden_state[0]
            return gpucheck.armorm.score(h, input_ids, pattern, weights, gate_layers, temperature)

    out = os.path.join(ROOT, "tiny-armorm")
    os.makedirs(out, exist_ok=True)
    save_file(weights, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    cfg = config.to_dict()
    cfg.update(architectures=["LlamaForRewardModelWithGating"], pad_token_id=vocab, num_objectives=objectives,
               gating_temperature=temperature, gating_hidden_dim=gate_dim, gating_n_hidden=gate_layers)
    dump(os.path.join(out, "config.json"), cfg)
    tok.save_pretrained(out)
    cases = [{"prompt": p, "response": r, "input_ids": i, "score": armorm(i)}
             for (p, r), i in zip(REWARD_CONVERSATIONS, inputs)]
    dump(os.path.join(ROOT, "tiny-armorm-reference.json"), {"pattern": pattern, "cases": cases})

    # A sequence classifier (Skywork-Reward and FsfairX are this class).
    config = LlamaConfig(**shape, pad_token_id=ids["<|end_of_text|>"], num_labels=1)
    torch.manual_seed(2)
    model = LlamaForSequenceClassification(config).eval()
    out = os.path.join(ROOT, "tiny-classifier")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    with torch.no_grad():
        scores = [float(model(torch.tensor([i])).logits[0, 0]) for i in inputs]
    cases = [{"prompt": p, "response": r, "input_ids": i, "score": sc}
             for (p, r), i, sc in zip(REWARD_CONVERSATIONS, inputs, scores)]
    dump(os.path.join(ROOT, "tiny-classifier-reference.json"), {"cases": cases})

    for family, features in CLASSIFIER_FAMILIES.items():
        family_classifier(family, *features)
    judge_reference()


def fixture_tokenizer(folder):
    """A fixture's tokenizer as its tokenizer.json writes it. (transformers
    5's AutoTokenizer picks Qwen2Tokenizer by model_type, which imposes
    Qwen2's split regex over a tokenizer.json that lacks it; real Qwen files
    carry that regex, so the two agree on them.)"""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(folder)


# The other families' sequence classifiers, each on its causal fixture's
# config and tokenizer: (pad_token_id in config.json, parameters whose
# transformers initialisation would hide the family's feature). "eos": the
# eos id, which Mistral's template writes after the response, so the score
# is read one token earlier; None: no pad id, so the last token;
# "absent": no key, so the config class's default (Gemma-2's is 0).
CLASSIFIER_FAMILIES = {
    "qwen2": ("<|endoftext|>", ["_proj.bias"]),
    "qwen3": (None, ["q_norm", "k_norm"]),
    "gemma2": ("absent", ["norm"]),
    "mistral": ("eos", []),
}


def family_classifier(family, pad, randomize):
    """A tiny `{Family}ForSequenceClassification` with one label, and
    transformers' scores of the reward conversations, one at a time, read
    back from the saved folder; plus the longest conversation right-padded
    with the pad id, as a padded batch would hold it. The score head is
    scaled so scores lie near +-5, where Gemma-2's final soft-cap (its LM
    head's, not the score head's) would move them by 1e-2."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    src = os.path.join(ROOT, f"tiny-{family}")
    tok = fixture_tokenizer(src)
    config = AutoConfig.from_pretrained(src)
    arch = config.architectures[0].replace("ForCausalLM", "ForSequenceClassification")
    config.architectures, config.num_labels = [arch], 1
    special = {"eos": tok.eos_token_id, None: None, "absent": None}
    config.pad_token_id = special[pad] if pad in special else tok.convert_tokens_to_ids(pad)
    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if any(r in pname for r in randomize):
                p.normal_(0.0 if family.startswith("gemma") else 1.0 if "norm" in pname else 0.0, 0.3)
        model.score.weight.mul_(4.0)
    out = os.path.join(ROOT, f"tiny-{family}-classifier")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    if pad == "absent":
        path = os.path.join(out, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        del cfg["pad_token_id"]
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(model).__name__ == arch
    pad_id = model.config.pad_token_id
    convs = [[{"role": "user", "content": p}, {"role": "assistant", "content": r}] for p, r in REWARD_CONVERSATIONS]
    inputs = [tok(tok.apply_chat_template(c, tokenize=False), add_special_tokens=False).input_ids for c in convs]
    padded = [max(inputs, key=len) + [pad_id] * 3] if pad_id is not None else []

    def score(ids):
        with torch.no_grad():
            return float(model(torch.tensor([ids])).logits[0, 0])

    cases = [{"prompt": p, "response": r, "input_ids": i, "score": score(i)}
             for (p, r), i in zip(REWARD_CONVERSATIONS, inputs)]
    ends_in_pad = sum(i[-1] == pad_id for i in inputs)
    print(f"{family} classifier: pad id {pad_id}, {ends_in_pad} conversations end in it, "
          f"scores {min(c['score'] for c in cases):.2f} to {max(c['score'] for c in cases):.2f}")
    dump(os.path.join(ROOT, f"tiny-{family}-classifier-reference.json"),
         {"pad_token_id": pad_id, "cases": cases, "padded": [{"input_ids": i, "score": score(i)} for i in padded]})


# prefgen's built-in rubric and primer (src/infer/reward.rs; the test checks
# they still agree).
JUDGE_RUBRIC = ("Rate how well the response answers the user's request, considering "
                "helpfulness, correctness and clarity. Use a scale from 1 (useless or wrong) to 9 (excellent). Reply with a "
                "single digit.\n\n[Request]\n{prompt}\n\n[Response]\n{response}")
JUDGE_PRIMER = "Rating:"


def judge_reference():
    """The judge on every causal family's tiny fixture: the rubric as the
    user turn, the generation prompt primed with `Rating:`, and the expected
    rating under transformers' next-token probabilities of the single-token
    digits 1-9 (with and without a leading space), renormalised over them."""
    import torch
    from transformers import AutoModelForCausalLM

    families = {}
    for family in ("llama3", "qwen2", "qwen3", "mistral", "gemma2", "gemma3"):
        src = os.path.join(ROOT, f"tiny-{family}")
        tok = fixture_tokenizer(src)
        model = AutoModelForCausalLM.from_pretrained(src).eval()
        ratings = {}
        for d in range(1, 10):
            for text in (f"{d}", f" {d}"):
                ids = tok(text, add_special_tokens=False).input_ids
                if len(ids) == 1:
                    ratings.setdefault(ids[0], d)
        cases = []
        for p, r in REWARD_CONVERSATIONS:
            ask = JUDGE_RUBRIC.replace("{prompt}", p).replace("{response}", r)
            text = tok.apply_chat_template([{"role": "user", "content": ask}], tokenize=False, add_generation_prompt=True)
            ids = tok(text + JUDGE_PRIMER, add_special_tokens=False).input_ids
            with torch.no_grad():
                probs = torch.softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
            mass = sum(float(probs[i]) for i in ratings)
            cases.append({"prompt": p, "response": r, "input_ids": ids,
                          "score": sum(float(probs[i]) * v for i, v in ratings.items()) / mass})
        print(f"judge on {family}: {len(ratings)} rating tokens, ratings "
              f"{min(c['score'] for c in cases):.3f} to {max(c['score'] for c in cases):.3f}")
        families[family] = cases
    dump(os.path.join(ROOT, "judge-reference.json"), {"rubric": JUDGE_RUBRIC, "primer": JUDGE_PRIMER, "families": families})


def decode_fixture():
    """How transformers decodes the tiny Llama-3 tokenizer's ids under each
    `clean_up_tokenization_spaces` setting, and a response cut inside a
    UTF-8 sequence (tokenizer only: needs transformers, not torch)."""
    import shutil
    import tempfile
    from transformers import AutoTokenizer

    src = os.path.join(ROOT, "tiny-llama3")
    texts = ["Hello , world . Isn 't it ? I 'm here ! We 're , you 've", "Explain 量子计算 ."]
    settings = [
        {},
        {"clean_up_tokenization_spaces": False},
        {"clean_up_tokenization_spaces": True},
        {"clean_up_tokenization_spaces": True, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output": True},
    ]
    cases = []
    for setting in settings:
        with tempfile.TemporaryDirectory() as d:
            for f in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(os.path.join(src, f), d)
            with open(os.path.join(d, "tokenizer_config.json")) as f:
                config = json.load(f)
            config.update(setting)
            with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
                json.dump(config, f)
            tok = AutoTokenizer.from_pretrained(d)
            for text in texts:
                ids = tok.encode(text, add_special_tokens=False)
                # Cut inside the last multi-byte character: drop tokens until the text changes mid-character.
                cuts = [ids[:k] for k in range(len(ids) - 1, 0, -1) if tok.decode(ids[:k]).endswith("\ufffd")]
                for case_ids in [ids] + cuts[:1]:
                    cases.append({"config": setting, "ids": case_ids, "text": tok.decode(case_ids, skip_special_tokens=True)})
    dump(os.path.join(ROOT, "decode-reference.json"), {"tokenizer": "tiny-llama3", "cases": cases})


# A template in the style of Qwen3's published one, written for this test:
# the constructs it relies on (a namespace, a reversed walk over the
# messages, Python string methods with arguments, `is string`), its
# reasoning split of assistant turns, and the `enable_thinking` switch.
THINKING_TEMPLATE = """{%- set ns = namespace(last_user=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- if message.role == 'user' and message.content is string and not message.content.startswith('<tool_response>') %}
        {%- set ns.last_user = (messages|length - 1) - loop.index0 %}
        {%- break %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'assistant' %}
        {%- set content = message.content %}
        {%- set thought = '' %}
        {%- if '</think>' in content %}
            {%- set thought = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_user and loop.last %}
            {{- '<|im_start|>assistant\\n<think>\\n' + thought.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""


def templates_fixture():
    """Template switches (`apply_chat_template(..., enable_thinking=False)`)
    as transformers renders and tokenizes them, with the tiny Qwen3's
    tokenizer (tokenizer only: needs transformers, not torch)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(ROOT, "tiny-qwen3"))
    convs = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "café 你好 🌍"}],
        [{"role": "user", "content": "2 + 2 = ?"},
         {"role": "assistant", "content": "<think>\nTwo and two.\n</think>\n\nFour."}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "List three prime numbers."}],
    ]
    cases = []
    for conv in convs:
        for gen in (True, False):
            for kwargs in ({}, {"enable_thinking": False}, {"enable_thinking": True}):
                text = tok.apply_chat_template(conv, chat_template=THINKING_TEMPLATE, tokenize=False,
                                               add_generation_prompt=gen, **kwargs)
                ids = tok(text, add_special_tokens=False).input_ids
                cases.append({"messages": conv, "add_generation_prompt": gen, "kwargs": kwargs, "text": text, "ids": ids})
    dump(os.path.join(ROOT, "template-kwargs-reference.json"),
         {"tokenizer": "tiny-qwen3", "template": THINKING_TEMPLATE, "cases": cases})


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["smollm2"]:
        smollm2_fixture()
    elif sys.argv[1:] == ["llama3"]:
        llama3_fixture()
    elif sys.argv[1:] == ["reward"]:
        reward_fixtures()
    elif sys.argv[1:] == ["gemma3"]:
        gemma3_fixture()
    elif sys.argv[1:] == ["gemma2"]:
        gemma2_fixture()
    elif sys.argv[1:] == ["qwen2"]:
        qwen2_fixture()
    elif sys.argv[1:] == ["qwen3"]:
        qwen3_fixture()
    elif sys.argv[1:] == ["mistral"]:
        mistral_fixture()
    elif sys.argv[1:] == ["gemma3-tiny"]:
        gemma3_tiny_fixture()
    elif sys.argv[1:] == ["llama32"]:
        llama32_fixture()
    elif sys.argv[1:] == ["decode"]:
        decode_fixture()
    elif sys.argv[1:] == ["templates"]:
        templates_fixture()
    else:
        simpo_fixture()
        hub_fixture()
    print("fixtures written under", os.path.normpath(ROOT))
