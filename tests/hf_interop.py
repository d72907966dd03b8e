#!/usr/bin/env python3
"""Loads prefgen's export the way users do and checks it.

    hf_interop.py EXPORT_DIR SPLIT [SPLIT...]

- `datasets.load_from_disk(EXPORT_DIR/hf)` and
  `datasets.load_dataset("parquet", data_files=EXPORT_DIR/data/{split}-*.parquet)`
  both load, with the published princeton-nlp features;
- their rows equal the SimPO JSON (`all_outputs_bin.json`), with prompt_id the
  hex SHA-256 of the prompt;
- the card's YAML front matter parses, its features are those the files
  load with, its data_files find the parquet files, and the plots it shows
  exist and are valid PNGs.
"""
import glob
import hashlib
import json
import os
import re
import struct
import sys
import zlib

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
plots = re.findall(r"!\[[^\]]*\]\((plots/[^)]+\.png)\)", card)
assert len(plots) == 4 * len(splits), plots
for rel in plots:
    with open(os.path.join(export_dir, rel), "rb") as f:
        png = f.read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n", rel
    width, height = struct.unpack(">II", png[16:24])
    chunks, at = {}, 8
    while at < len(png):
        (n,) = struct.unpack(">I", png[at:at + 4])
        kind, data = png[at + 4:at + 8], png[at + 8:at + 8 + n]
        assert zlib.crc32(kind + data) == struct.unpack(">I", png[at + 8 + n:at + 12 + n])[0], (rel, kind)
        chunks[kind] = chunks.get(kind, b"") + data
        at += 12 + n
    pixels = zlib.decompress(chunks[b"IDAT"])
    assert len(pixels) == height * (1 + 3 * width), (rel, len(pixels))
print(f"hf interop ok: {', '.join(splits)}; datasets {datasets.__version__}")
