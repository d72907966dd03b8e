#!/usr/bin/env python3
"""What SimPO's on-policy scripts produce, for parity tests.

    simpo_reference.py GENS_DIR SEEDS SCORES_JSON OUT_DIR

Follows princeton-nlp/SimPO's post_process.py and the binarization in
reward_model_annotate.py step for step, with their defects fixed as prefgen's
SPEC requires: seed files are read in the given (recipe) order rather than
directory-listing order, and the binarized rows go to all_outputs_bin.json
instead of over all_outputs_rm.json. Scores are taken from SCORES_JSON by
prompt instead of running the reward model.
"""
import json
import os
import sys

import numpy as np

gens_dir, seeds, scores_path, out_dir = sys.argv[1], sys.argv[2].split(","), sys.argv[3], sys.argv[4]
os.makedirs(out_dir, exist_ok=True)

# post_process.py
all_data = []
for seed in seeds:
    with open(os.path.join(gens_dir, f"output_{seed}.json")) as f:
        all_data.append(json.load(f))
all_res = []
for i in range(len(all_data[0])):
    prompt = all_data[0][i]["prompt"]
    gen_text = [data[i]["generated_text"] for data in all_data]
    if len(set(gen_text)) == 1:
        continue
    all_res.append({"prompt": prompt, "all_generated_responses": gen_text})
with open(os.path.join(out_dir, "all_outputs.json"), "w") as f:
    json.dump(all_res, f, indent=4)

# reward_model_annotate.py, scores looked up instead of computed
with open(scores_path) as f:
    scores = {row["prompt"]: row["all_rm_scores"] for row in json.load(f)}
for data in all_res:
    data["all_rm_scores"] = scores[data["prompt"]]
with open(os.path.join(out_dir, "all_outputs_rm.json"), "w") as f:
    json.dump(all_res, f, indent=4)

for data in all_res:
    chosen_idx = np.argmax(data["all_rm_scores"])
    rejected_idx = np.argmin(data["all_rm_scores"])
    data.update({
        "chosen": [{"role": "user", "content": data["prompt"]},
                   {"role": "assistant", "content": data["all_generated_responses"][chosen_idx]}],
        "rejected": [{"role": "user", "content": data["prompt"]},
                     {"role": "assistant", "content": data["all_generated_responses"][rejected_idx]}],
    })
with open(os.path.join(out_dir, "all_outputs_bin.json"), "w") as f:
    json.dump(all_res, f, indent=4)
