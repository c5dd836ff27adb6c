# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv at the repository root and install what they need into it: konfuzio-watch
# (editable) and a lean konfuzio-sdk, without the dependencies the daemon never imports
# (requirements/lean.txt; docs/service.md: "Why the install is lean").
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed
PIP    := $(VENV)/bin/python -m pip --disable-pip-version-check
# The SDK pin, read from pyproject.toml (the only place it is written)
SDK    := $(shell sed -n 's/^ *"\(konfuzio-sdk==[^"]*\)".*/\1/p' pyproject.toml)

# Checked only when .venv is (re)built: "3.9.18" from `python -V`, and whether it is >= 3.11
PYTHON_V = $(shell command -v $(PYTHON) >/dev/null 2>&1 && $(PYTHON) -V 2>&1)
PYTHON_VERSION = $(if $(filter Python,$(firstword $(PYTHON_V))),$(word 2,$(PYTHON_V)))
PYTHON_OK = $(shell v='$(PYTHON_VERSION)'; IFS=.; set -- $$v; \
	{ [ "$${1:-0}" -gt 3 ] || { [ "$${1:-0}" -eq 3 ] && [ "$${2:-0}" -ge 11 ]; }; } 2>/dev/null && echo yes)

.PHONY: demo test bench lint clean

# A .venv whose python is gone, broken or older than 3.11 (made by an older python3) is rebuilt.
ifneq ($(shell $(VENV)/bin/python -c 'import sys; print(sys.version_info >= (3, 11))' 2>/dev/null),True)
.PHONY: $(STAMP)
endif

$(STAMP): pyproject.toml requirements/lean.txt requirements/test.txt
	@$(if $(PYTHON_OK),,$(error konfuzio-watch needs Python >= 3.11, and $(PYTHON) is $(if $(PYTHON_VERSION),$(PYTHON_VERSION),not found): run make PYTHON=python3.11 (or newer)))
	@echo "==> $(VENV): a new virtualenv with $(PYTHON) (Python $(PYTHON_VERSION))"
	@rm -rf $(VENV)
	@$(PYTHON) -m venv $(VENV)
	@echo "==> installing konfuzio-watch's dependencies, the part of konfuzio-sdk's that it imports, and pytest"
	@echo "    (requirements/test.txt: flask, waitress, watchdog, pyngrok, pyyaml, requests, numpy, pandas, pillow, ...)"
	@$(PIP) install --quiet --no-compile -r requirements/test.txt
	@echo "==> installing $(SDK) without its AI/training dependencies, and konfuzio-watch (editable)"
	@$(PIP) install --quiet --no-compile --no-deps $(SDK) -e .
	@touch $(STAMP)
	@echo "==> $(VENV) ready: $$(du -sh $(VENV) | cut -f1), $$($(PIP) list --format=freeze | wc -l) packages"

demo: $(STAMP)
	$(VENV)/bin/konfuzio-watch demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest --numprocesses=3 --dist=worksteal

# `make bench` compares this checkout with the code before the scaling work (docs/performance.md):
# a detached worktree of BEFORE_REV, made on first use. BENCH_ARGS: e.g. --quick, --runs 3, --only burst.
BEFORE_REV ?= be7dd22
BEFORE     ?= .bench-before
bench: $(STAMP)
	@test -d $(BEFORE)/konfuzio_watch || git worktree add --detach $(BEFORE) $(BEFORE_REV)
	$(VENV)/bin/python -m bench --before $(BEFORE) --before-label $(BEFORE_REV) $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/python -m pip install --quiet ruff
	$(VENV)/bin/ruff check konfuzio_watch tests bench
	$(VENV)/bin/ruff format --check konfuzio_watch tests bench

clean:
	rm -rf $(VENV) .pytest_cache
