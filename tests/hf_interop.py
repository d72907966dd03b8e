#!/usr/bin/env python3
"""Loads prefgen's export the way users do and checks it.

    hf_interop.py EXPORT_DIR SPLIT [SPLIT...]

- `datasets.load_from_disk(EXPORT_DIR/hf)` and
  `datasets.load_dataset("parquet", data_files=EXPORT_DIR/data/{split}-*.parquet)`
  both load, with the published princeton-nlp features;
- their rows equal the SimPO JSON (`all_outputs_bin.json`), with prompt_id the
  hex SHA-256 of the prompt.
"""
import glob
import hashlib
import json
import os
import sys

import datasets
from datasets import Features, Value, load_dataset, load_from_disk

export_dir, splits = sys.argv[1], sys.argv[2:]

string = Value("string")
messages = datasets.List({"content": string, "role": string})
want = Features({
    "prompt_id": string,
    "prompt": string,
    "all_generated_responses": datasets.List(string),
    "all_rm_scores": datasets.List(Value("float64")),
    "chosen": messages,
    "rejected": messages,
})

disk = load_from_disk(os.path.join(export_dir, "hf"))
assert sorted(disk.keys()) == sorted(splits), (list(disk.keys()), splits)
for split in splits:
    json_dir = export_dir if len(splits) == 1 else os.path.join(export_dir, split)
    with open(os.path.join(json_dir, "all_outputs_bin.json")) as f:
        expected = json.load(f)
    files = sorted(glob.glob(os.path.join(export_dir, "data", f"{split}-*.parquet")))
    assert files, f"no parquet files for {split}"
    hub = load_dataset("parquet", data_files={split: files}, split=split)
    for name, ds in (("load_from_disk", disk[split]), ("load_dataset(parquet)", hub)):
        assert ds.features == want, f"{name} {split}: features {ds.features}"
        assert ds.num_rows == len(expected), f"{name} {split}: {ds.num_rows} rows, want {len(expected)}"
        for row, exp in zip(ds, expected):
            assert row["prompt_id"] == hashlib.sha256(exp["prompt"].encode()).hexdigest()
            for key in ("prompt", "all_generated_responses", "all_rm_scores"):
                assert row[key] == exp[key], (name, key, row[key], exp[key])
            for key in ("chosen", "rejected"):
                assert row[key] == [{"content": m["content"], "role": m["role"]} for m in exp[key]], (name, key)
print(f"hf interop ok: {', '.join(splits)}; datasets {datasets.__version__}")
