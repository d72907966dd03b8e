#!/usr/bin/env bash
# prefgen's GPU check, run on the GPU machine from the folder
# `make gpu-check` assembled:
#   bash run.sh [OUT_DIR] [check.py's options, e.g. --tiny --cpu]
# It needs that machine's PyTorch and transformers, and nothing else.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/report}
shift || true
gunzip -c "$here/prefgen.gz" > "$here/prefgen"
chmod +x "$here/prefgen"
# The CUDA libraries prefgen links (cudart, cublas, cublasLt, curand, nvrtc)
# come from PyTorch's nvidia-* wheels; the driver is the machine's own.
libs=$(python3 -c '
import glob, os
try:
    import nvidia
except ImportError:
    raise SystemExit
found = {os.path.dirname(p) for base in nvidia.__path__ for p in glob.glob(os.path.join(base, "**", "lib*.so*"), recursive=True)
         if "stubs" not in p.split(os.sep)}  # a stub libcuda must never shadow the driver
print(":".join(sorted(found)))')
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
missing=$(ldd "$here/prefgen" 2>/dev/null | grep 'not found' || true)
[ -z "$missing" ] || echo "warning: prefgen's libraries not found: $missing (searched: ${libs:-no nvidia wheels})" >&2
mkdir -p "$out"
exec python3 "$here/gpucheck/check.py" --prefgen "$here/prefgen" --fixtures "$here/fixtures" --data "$here/data" \
  --out "$out" --work "${TMPDIR:-/tmp}/prefgen-gpu-check" "$@"
