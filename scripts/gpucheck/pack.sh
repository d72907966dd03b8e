#!/usr/bin/env bash
# Assembles the GPU check's folder: a gzipped prefgen binary (the CUDA build
# for a GPU machine, the CPU build for the rehearsal), the check's scripts,
# the tiny fixtures and the prompt sets. Nothing in it is fetched on the GPU
# machine; it must stay under the 64 MiB a device run carries.
#   scripts/gpucheck/pack.sh PREFGEN_GZ OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/../.."
gz=${1:?usage: pack.sh PREFGEN_GZ OUT_DIR}
out=${2:?usage: pack.sh PREFGEN_GZ OUT_DIR}
[ -f "$gz" ] || { echo "error: $gz: no such file (make build-cuda writes target/cuda/prefgen.gz)" >&2; exit 1; }
rm -rf "$out"
mkdir -p "$out/gpucheck" "$out/fixtures" "$out/data"
cp "$gz" "$out/prefgen.gz"
cp scripts/gpucheck/run.sh "$out/"
cp scripts/gpucheck/__init__.py scripts/gpucheck/armorm.py scripts/gpucheck/reference.py scripts/gpucheck/check.py "$out/gpucheck/"
for m in tiny-llama3 tiny-gemma2 tiny-armorm; do cp -r "tests/fixtures/$m" "$out/fixtures/"; done
cp tests/fixtures/tiny-llama3-reference.json tests/fixtures/tiny-armorm-reference.json "$out/fixtures/"
cp benches/data/mt_bench_questions.jsonl benches/data/vicuna_bench_questions.jsonl benches/data/NOTICE.md "$out/data/"
size=$(du -sbL "$out" | cut -f1)
limit=$((64 << 20))
if [ "$size" -ge "$limit" ]; then
  echo "error: $out is $size bytes, over the $limit a device run carries" >&2
  exit 1
fi
echo "$out: $size bytes. On the GPU machine, from the folder that holds $(basename "$out"):"
echo "  bash $(basename "$out")/run.sh OUT_DIR    # at most 8 minutes; OUT_DIR gets report.md, report.json, logs/"
