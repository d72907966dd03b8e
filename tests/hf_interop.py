#!/usr/bin/env python3
"""Loads prefgen's export the way users do and checks it.

    hf_interop.py EXPORT_DIR SPLIT [SPLIT...]

- `datasets.load_from_disk(EXPORT_DIR/hf)` and
  `datasets.load_dataset("parquet", data_files=EXPORT_DIR/data/{split}-*.parquet)`
  both load, with the published princeton-nlp features;
- their rows equal the SimPO JSON (`all_outputs_bin.json`), with prompt_id the
  hex SHA-256 of the prompt;
- the card's YAML front matter parses, carries the hub's license,
  task_categories and size_categories, its features are those the files
  load with, its data_files find the parquet files, and
  `datasets.load_dataset(EXPORT_DIR)` loads the folder by itself from them;
- the plots it shows exist and are SVG documents with a title, axis labels,
  ticks and (for two series) a legend.
"""
import glob
import hashlib
import json
import os
import re
import sys
import xml.etree.ElementTree as ET

import datasets
import yaml
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
with open(os.path.join(export_dir, "README.md")) as f:
    card = f.read()
front = yaml.safe_load(card.split("---\n")[1])
assert Features._from_yaml_list(front["dataset_info"]["features"]) == want, front["dataset_info"]["features"]
config = front["configs"][0]
for entry in config["data_files"]:
    assert glob.glob(os.path.join(export_dir, entry["path"])), entry
assert sorted(e["split"] for e in config["data_files"]) == sorted(splits)
total = sum(disk[s].num_rows for s in splits)
assert front["license"], front
assert front["task_categories"] == ["text-generation"], front
size = "n<1K" if total < 1000 else "1K<n<10K" if total < 10000 else "10K<n<100K" if total < 100000 else "100K<n<1M"
assert front["size_categories"] == [size], (front["size_categories"], total)
# The folder by itself: the card's configs pick the parquet files out of
# everything else in it (the JSON files, hf/, plots/).
whole = load_dataset(export_dir)
assert sorted(whole.keys()) == sorted(splits), list(whole.keys())
for split in splits:
    assert whole[split].features == want and whole[split].num_rows == disk[split].num_rows, split
plots = re.findall(r"!\[[^\]]*\]\((plots/[^)]+\.svg)\)", card)
assert len(plots) == 4 * len(splits), plots
ns = "{http://www.w3.org/2000/svg}"
for rel in plots:
    root = ET.parse(os.path.join(export_dir, rel)).getroot()
    assert root.tag == ns + "svg", (rel, root.tag)
    texts = [t.text for t in root.iter(ns + "text")]
    title = root.find(ns + "title").text
    assert title in texts and any(s in title for s in splits), (rel, title)
    numbers = [t for t in texts if re.fullmatch(r"-?[0-9.]+", t or "")]
    assert len(numbers) >= 4, (rel, texts)  # ticks on both axes
    if rel.endswith(("-scores.svg", "-length.svg")) and not rel.endswith("seed-length.svg"):
        assert any(t.startswith("chosen (n = ") for t in texts) and any(t.startswith("rejected (n = ") for t in texts), (rel, texts)
print(f"hf interop ok: {', '.join(splits)}; datasets {datasets.__version__}")
