#!/usr/bin/env bash
# Builds llama.cpp's own batched benchmark tool (llama-batched-bench) from the source that the
# PyPI sdist of llama-cpp-python vendors, for `make bench` to compare against.
# Outside the product: nothing in prefgen links it. Prints the binary's path.
set -euo pipefail
VERSION=0.3.36
root=target/llama.cpp
bin=$root/build/bin/llama-batched-bench
if [ ! -x "$bin" ]; then
  mkdir -p "$root"
  if [ ! -d "$root/src" ]; then
    # The sdist's URL from the registry's JSON API (pip would build it to read metadata).
    url=$(python3 - "$VERSION" <<'PY'
import json, sys, urllib.parse, urllib.request
api = "https://pypi.org/pypi/llama-cpp-python/json"
meta = json.load(urllib.request.urlopen(api))
print(urllib.parse.urljoin(api, next(u["url"] for u in meta["releases"][sys.argv[1]] if u["packagetype"] == "sdist")))
PY
)
    curl -sfL "$url" -o "$root/sdist.tar.gz"
    tar xzf "$root/sdist.tar.gz" -C "$root"
    mv "$root/llama_cpp_python-$VERSION/vendor/llama.cpp" "$root/src"
    rm -rf "$root/llama_cpp_python-$VERSION" "$root/sdist.tar.gz"
  fi
  command -v cmake >/dev/null || python3 -m pip install --quiet --disable-pip-version-check cmake >&2
  # No AMX: a CPU that reports it under a hypervisor may not grant the tile
  # state, and llama.cpp's AMX kernels then die with SIGILL.
  noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  cmake -S "$root/src" -B "$root/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DCMAKE_C_FLAGS="$noamx" -DCMAKE_CXX_FLAGS="$noamx" -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >&2
  cmake --build "$root/build" --target llama-batched-bench -j "$(nproc)" >&2
fi
echo "$bin"
