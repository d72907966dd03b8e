# prefgen's entry points. `make demo` and `make test` are the README's first lines.
PYTHON ?= python3
CARGO ?= cargo
PIP = PIP_ROOT_USER_ACTION=ignore $(PYTHON) -m pip install --quiet --disable-pip-version-check

.PHONY: setup demo test bench fixtures

## setup: build prefgen and install the Python packages the reference checks use
setup: pydeps
	$(CARGO) build --release

## demo: set up, then run recipes/demo.toml end to end (writes datasets/demo)
demo: setup
	./target/release/prefgen run recipes/demo.toml
	@echo "Outputs: datasets/demo (SimPO JSON, data/*.parquet, hf/, README.md)"

## test: the whole test suite, as CI runs it
test: pydeps
	$(CARGO) test

## bench: post-processing and export at the published datasets' size
bench:
	$(CARGO) bench --bench pipeline

## fixtures: regenerate the committed test fixtures
fixtures:
	$(PYTHON) scripts/make_fixtures.py

.PHONY: pydeps
pydeps:
	$(PIP) -r requirements-dev.txt
