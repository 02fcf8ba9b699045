# musc — everything a user runs goes through these targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

DEMO_DIR ?= demo
DEMO_N ?= 16
DEMO_SIZE ?= 224
CHAOS_LOG ?= build/chaos-records.jsonl

.PHONY: install system-deps test-deps demo test chaos bench bench-fpfh lint screenshot clean

## install: system packages (when missing) + virtual environment in .venv with the project
install: system-deps $(STAMP)

system-deps:
	@bash infra/install_system_deps.sh

## test-deps: also the headless browser of the report test (chromium, chromium-driver)
test-deps:
	@bash infra/install_system_deps.sh --with-browser

$(STAMP): pyproject.toml
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

## demo: generate a small synthetic line, score it 2D+3D, print where the results are
demo: install
	$(BIN)/musc demo --out $(DEMO_DIR) --num-samples $(DEMO_N) --image-size $(DEMO_SIZE)

## test: install everything and run the test suite
test: install test-deps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

## chaos: the bad-input, fault and security tests (pytest -m chaos), then a summary table
chaos: install
	@mkdir -p $(dir $(CHAOS_LOG)) && rm -f $(CHAOS_LOG)
	@MUSC_CHAOS_LOG=$(CHAOS_LOG) $(BIN)/python -m pytest -q -m chaos; tests=$$?; \
	$(BIN)/python -m tests.chaos_summary $(CHAOS_LOG); summary=$$?; \
	exit $$(( tests ? tests : summary ))

## bench: kernel and pipeline benchmarks (long: about an hour on 2 cores); figures in benchmarks/out
bench: install
	$(BIN)/python -m benchmarks.bench_cli --out benchmarks/out/cli.json
	$(BIN)/python -m benchmarks.bench_kernels --out benchmarks/out/kernels.json
	$(BIN)/python -m benchmarks.bench_pipeline --out benchmarks/out/pipeline.json

## bench-fpfh: quality ablation of the weight-free FPFH 3D backbone (about 10 min on 2 cores)
bench-fpfh: install
	$(BIN)/python -m benchmarks.bench_fpfh --out benchmarks/out/fpfh.json

lint: install
	$(BIN)/ruff check .

## screenshot: regenerate docs/report-screenshot.png from a real run (random weights)
screenshot: install test-deps
	$(BIN)/python docs/make_screenshot.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .ruff_cache
