# Two commands a newcomer needs: `make demo` and `make test`. Both build the virtual
# environment on first use (TensorFlow CPU, DALI CPU, the test references).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo

.PHONY: demo test test-fast bench install config-docs clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	# torch is pinned to the CPU build 2.13.0 (a test reference only).
	$(PIP) install -q -e '.[cpu,dali,remote,tests]'
	# DALI's TensorFlow plugin compiles against the installed TensorFlow.
	$(PIP) install -q --no-build-isolation nvidia-dali-tf-plugin-cuda120
	# Debian's chromium + chromium-driver for the page test in a real browser (the test is
	# skipped, saying why, where apt-get cannot install them).
	command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1; } || \
	  echo "chromium could not be installed: tests/test_serve.py's browser test will be skipped"
	touch $(STAMP)

# The demo needs only TensorFlow and the scorers: a fresh clone reaches training sooner.
$(DEMO_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -e '.[cpu,eval]'
	touch $(DEMO_STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -ra

# The quick half, for the edit loop: everything not marked slow (end-to-end training runs,
# multi-process and subprocess tests). CI runs `make test`.
test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow"

demo: $(DEMO_STAMP)
	$(PY) -m gpt2_effnet.cli demo --out demo_run

# The headline figures at the top of BENCHMARKS.md (~6 minutes on 2 cores); a subset:
# make bench BENCH_ARGS="--only train serve". export and serve need `make demo`'s run first.
bench: $(STAMP)
	$(PY) bench/run_all.py $(BENCH_ARGS)

# docs/CONFIG.md, from the one-line meanings beside config.py's fields (a test fails when
# a key has none, or when the file is stale).
config-docs: $(STAMP)
	$(PY) -m gpt2_effnet.config_reference

clean:
	rm -rf $(VENV) demo_run .pytest_cache
