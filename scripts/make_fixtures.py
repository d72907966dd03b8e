#!/usr/bin/env python3
"""Makes the small test fixtures committed under tests/fixtures/.

    python3 scripts/make_fixtures.py            # SimPO-style imports (stdlib only)
                                                # and a hub-layout parquet (pyarrow)

Everything is seeded, so re-running reproduces the committed files.
"""
import hashlib
import json
import os
import random

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


if __name__ == "__main__":
    simpo_fixture()
    hub_fixture()
    print("fixtures written under", os.path.normpath(ROOT))
