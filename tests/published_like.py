"""Makes a dataset shaped like princeton-nlp/llama3-ultrafeedback-armorm (the
published columns, hub-layout parquet, train and test splits; chosen = first
argmax and rejected = first argmin of the scores, ties kept), and the SimPO
files its responses and scores would be imported from.

Usage: published_like.py OUT [--flip|--user-turn|--nan SPLIT ROW]
  OUT/published/data/{train,test}-00000-of-00001.parquet  the "published" set
  OUT/import/{split}/output_{seed}.json                   SimPO decode files
  OUT/import/{split}/all_outputs_rm.json                  SimPO scored rows
Each option changes one published row (a disagreement): --flip swaps its
chosen and rejected, --user-turn edits the user turn of its chosen late in
the text, --nan makes its first score NaN."""
import hashlib
import json
import os
import random
import sys

import pyarrow as pa
import pyarrow.parquet as pq

SEEDS = [13, 21, 42, 79, 100]
SIZES = {"train": 300, "test": 40}

out = sys.argv[1]
edit = (sys.argv[2], sys.argv[3], int(sys.argv[4])) if len(sys.argv) == 5 else None
rng = random.Random(7)
words = "sea wind tree light stone river cloud fire ice sand bird moon road glass".split()


def text(n):
    return " ".join(rng.choice(words) for _ in range(n))


def pair(prompt, response):
    return [{"content": prompt, "role": "user"}, {"content": response, "role": "assistant"}]


messages = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
schema = pa.schema([
    ("prompt_id", pa.string()), ("prompt", pa.string()), ("all_generated_responses", pa.list_(pa.string())),
    ("all_rm_scores", pa.list_(pa.float64())), ("chosen", messages), ("rejected", messages),
])
for split, n in SIZES.items():
    rows = []
    for i in range(n):
        prompt = f"{split} question {i}: {text(rng.randint(3, 12))}?"
        if i % 17 == 3:
            prompt += "\nWith a second line, ünïcode and 🌍."
        responses = [text(rng.randint(0, 30)) for _ in SEEDS]
        if i % 11 == 5:
            responses[1] = responses[3]  # two seeds agree
        scores = [round(rng.uniform(-3, 3), rng.randint(1, 6)) for _ in SEEDS]
        if i % 13 == 7:
            scores = [0.5] * len(SEEDS)  # a tie, kept
        if i % 7 == 2:
            scores[4] = max(scores)  # a later equal maximum: the first one wins
        best = max(range(len(scores)), key=lambda k: (scores[k], -k))
        worst = min(range(len(scores)), key=lambda k: (scores[k], k))
        rows.append({
            "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(), "prompt": prompt,
            "all_generated_responses": responses, "all_rm_scores": scores,
            "chosen": pair(prompt, responses[best]), "rejected": pair(prompt, responses[worst]),
        })
    rng.shuffle(rows)  # published order is not the recipe's
    published = rows
    if edit and edit[1] == split:
        published = [dict(r) for r in rows]  # the imports keep the true row
        r = published[edit[2]]
        if edit[0] == "--flip":
            r["chosen"], r["rejected"] = r["rejected"], r["chosen"]
        elif edit[0] == "--user-turn":
            user = r["chosen"][0]["content"]
            r["chosen"] = [{**r["chosen"][0], "content": user + " (edited)"}, r["chosen"][1]]
        elif edit[0] == "--nan":
            r["all_rm_scores"] = [float("nan")] + r["all_rm_scores"][1:]
        else:
            sys.exit(f"unknown option {edit[0]}")
    os.makedirs(f"{out}/published/data", exist_ok=True)
    pq.write_table(pa.Table.from_pylist(published, schema=schema), f"{out}/published/data/{split}-00000-of-00001.parquet")
    os.makedirs(f"{out}/import/{split}", exist_ok=True)
    for k, seed in enumerate(SEEDS):
        decode = [{"prompt": r["prompt"], "format_prompt": r["prompt"], "generated_text": r["all_generated_responses"][k]}
                  for r in rows]
        with open(f"{out}/import/{split}/output_{seed}.json", "w") as f:
            json.dump(decode, f, indent=4)
    scored = [{k: r[k] for k in ("prompt", "all_generated_responses", "all_rm_scores")} for r in rows]
    with open(f"{out}/import/{split}/all_outputs_rm.json", "w") as f:
        json.dump(scored, f, indent=4)
