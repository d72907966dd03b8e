#!/usr/bin/env bash
# Builds llama.cpp tools from the source that the PyPI sdist of llama-cpp-python
# vendors: `llama-server` (the tests drive it as an inference server) and
# `llama-batched-bench` (`make bench` compares against it). Outside the
# product: nothing in prefgen links them.
# Usage: scripts/llama-cpp.sh TOOL...   Prints each tool's path, one per line.
# LLAMA_ISA=avx2 or avx-vnni builds for that instruction set alone (in
# build-$LLAMA_ISA), the peer of prefgen's kernel of the same name on a CPU
# that has more; unset, for this CPU (GGML_NATIVE).
set -euo pipefail
VERSION=0.3.36
root=target/llama.cpp
isa=${LLAMA_ISA:-native}
case "$isa" in
  native) build=$root/build isa_flags=(-DGGML_NATIVE=ON) ;;
  avx2) build=$root/build-avx2 isa_flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON) ;;
  avx-vnni) build=$root/build-avx-vnni
    isa_flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=ON) ;;
  *) echo "LLAMA_ISA=$isa: not one of native, avx2, avx-vnni" >&2; exit 2 ;;
esac
missing=()
for tool in "$@"; do
  [ -x "$build/bin/$tool" ] || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  mkdir -p "$root"
  if [ ! -d "$root/src" ]; then
    # The sdist through pip (`--no-binary` for this package only: `:all:`
    # would build cmake from source too).
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --no-binary llama-cpp-python \
      -d "$root/sdist" "llama-cpp-python==$VERSION" >&2
    tar xzf "$root"/sdist/llama_cpp_python-"$VERSION".tar.gz -C "$root"
    mv "$root/llama_cpp_python-$VERSION/vendor/llama.cpp" "$root/src"
    rm -rf "$root/llama_cpp_python-$VERSION" "$root/sdist"
  fi
  command -v cmake >/dev/null || python3 -m pip install --quiet --disable-pip-version-check cmake >&2
  # No AMX: a CPU that reports it under a hypervisor may not grant the tile
  # state, and llama.cpp's AMX kernels then die with SIGILL.
  noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  # No prebuilt web UI: it would be downloaded from the Hugging Face hub, and
  # the tests run the server with --no-webui.
  cmake -S "$root/src" -B "$build" -DCMAKE_BUILD_TYPE=Release "${isa_flags[@]}" -DLLAMA_CURL=OFF \
    -DCMAKE_C_FLAGS="$noamx" -DCMAKE_CXX_FLAGS="$noamx" -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_USE_PREBUILT_UI=OFF >&2
  # Only the named tools and what they link: for llama-server that includes
  # the multimodal library (mtmd, ~15% of the build), which its server code
  # links; no cmake option drops it, and a unity build does not compile.
  cmake --build "$build" --target "${missing[@]}" -j "$(nproc)" >&2
fi
for tool in "$@"; do echo "$build/bin/$tool"; done
