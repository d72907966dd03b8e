#!/usr/bin/env bash
# Builds prefgen with CUDA on a machine without a GPU (`make build-cuda`), as
# follows: the CUDA 13.0 toolkit from PyPI (the GPU
# machines' driver is CUDA 13.0, so newer nvcc makes PTX it cannot load), a
# stub libcuda.so for the linker (the real driver is loaded on the GPU
# machine), sm_90 kernels for H100/H200. Output: target/cuda/prefgen (stripped,
# ~73 MB) and target/cuda/prefgen.gz (~20 MB, under the device's 64 MiB carry
# limit). On the GPU machine, gunzip it and put the CUDA 13 libraries that its
# PyTorch installed (site-packages/nvidia/cu13/lib) on LD_LIBRARY_PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP_ROOT_USER_ACTION=ignore $PY -m pip install --quiet --disable-pip-version-check \
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85 \
  nvidia-cuda-nvrtc==13.0.88 nvidia-curand==10.4.0.35 nvidia-cublas==13.0.2.14 nvidia-nvvm==13.0.88
CUDA_HOME=$($PY -c "import nvidia, os; print(os.path.join(nvidia.__path__[0], 'cu13'))")
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH" CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
lib=$CUDA_HOME/lib
# The wheels ship versioned libraries only.
for l in cudart nvrtc cublas cublasLt; do [ -e "$lib/lib$l.so" ] || ln -s "$(ls "$lib"/lib$l.so.1[0-9]* | head -1)" "$lib/lib$l.so"; done
[ -e "$lib/libcurand.so" ] || ln -s "$(ls "$lib"/libcurand.so.10* | head -1)" "$lib/libcurand.so"
# A stub driver library: every cu* function cudarc declares, empty.
cargo fetch --quiet
cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-* | sort -V | tail -1)
mkdir -p "$lib/stubs"
grep -rhoE 'pub (unsafe )?fn cu[A-Za-z0-9_]+' "$cudarc/src/driver/sys" | sed -E 's/.*fn //' | sort -u \
  | awk '{print "void " $1 "(void) {}"}' > "$lib/stubs/libcuda.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$lib/stubs/libcuda.so" "$lib/stubs/libcuda.c"
ln -sf libcuda.so "$lib/stubs/libcuda.so.1"
export LIBRARY_PATH="$lib/stubs:$lib${LIBRARY_PATH:+:$LIBRARY_PATH}" LD_LIBRARY_PATH="$lib/stubs:$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Built here and run on another host: a portable x86-64 level, not this CPU.
RUSTFLAGS="-C target-cpu=x86-64-v3" cargo build --release --features cuda --target-dir target/cuda-build
mkdir -p target/cuda
strip -o target/cuda/prefgen target/cuda-build/release/prefgen
gzip -6 -c target/cuda/prefgen > target/cuda/prefgen.gz
ls -la target/cuda/prefgen target/cuda/prefgen.gz
