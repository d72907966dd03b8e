#!/usr/bin/env bash
# CI's check of the wheel, as a user meets it: the binary the tests built
# (dev profile, optimised; `cargo test --no-run` first) packed by maturin, no
# second release build; installed with pip into a fresh virtual environment;
# then the installed `prefgen` prints its version and runs the demo with
# --locked, which must reproduce recipes/demo.lock.
# Usage: scripts/wheel-check.sh   (`make wheel-check` installs maturin)
set -euo pipefail
root=$(pwd)
work=$root/target/wheel-check
rm -rf "$work"
mkdir -p "$work"

python3 -m maturin build --profile dev --out "$work/dist" >"$work/maturin.log" 2>&1 || {
  cat "$work/maturin.log" >&2
  exit 1
}
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-index "$work"/dist/prefgen-*.whl
export PATH="$work/venv/bin:$PATH"
[ "$(command -v prefgen)" = "$work/venv/bin/prefgen" ] || { echo "error: prefgen is not the wheel's" >&2; exit 1; }
prefgen --version

# The demo in a folder of its own: its recipe, lock and prompts, and the model.
demo=$work/demo
mkdir -p "$demo/recipes/prompts" "$demo/models"
cp recipes/demo.toml recipes/demo.lock "$demo/recipes/"
cp recipes/prompts/demo.jsonl "$demo/recipes/prompts/"
ln -s "$root/models/SmolLM2-135M-Instruct.Q4_1.gguf" "$demo/models/"
(cd "$demo" && env -u PREFGEN_INT8_KERNEL prefgen --cache cache --no-remote run recipes/demo.toml --locked)
cmp recipes/demo.lock "$demo/recipes/demo.lock"
echo "wheel check: $(basename "$work"/dist/prefgen-*.whl) installed; its prefgen reproduced recipes/demo.lock"
