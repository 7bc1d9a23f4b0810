# One entry point for students, readers and instructors.
# Every target creates (once) and reuses a local virtual environment in .venv.

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON_BOOT ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pip warns about every local index folder missing on the course machines: keep only real messages
PIP_INSTALL = $(PY) -m pip install --quiet
QUIET_INDEX = 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }
# `make serve` listens where MLDEPLOY_HOST/PORT/ADMIN_PORT say (mldeploy.settings), else here
SERVE_HOST ?= $(or $(MLDEPLOY_HOST),127.0.0.1)
PORT ?= $(or $(MLDEPLOY_PORT),8000)
ADMIN_PORT ?= $(or $(MLDEPLOY_ADMIN_PORT),8081)
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))
# pytest worker processes (pytest-xdist); each test file or notebook runs whole on one worker, and
# the browser and container tests share one (tests/conftest.py says why). 3 on 2 cores: the suite
# waits (sockets, child processes, chromium) more than it computes, so a third worker fills the gaps.
# TEST_WORKERS=0 runs everything in one process, in file order.
TEST_WORKERS ?= 3
PARALLEL = -n $(TEST_WORKERS) --dist loadfile
# llama.cpp built for any x86-64 CPU (no -march=native), without the multimodal part the course never uses
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF

.PHONY: help venv demo serve book pdf lab refresh test test-lib test-notebooks test-book test-browser page-weight axe bench-serve bench-llm constraints clean lint format second-machine mutation-check

help:  ## list the commands
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	@$(PYTHON_BOOT) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required, found " + sys.version.split()[0])'
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	@$(PY) -c 'import llama_cpp' 2>/dev/null || echo "first install: pip builds llama-cpp-python from source (measured 4-8 minutes on 2 cores; then reused from pip's wheel cache)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP_INSTALL) -r requirements-dev.txt -c constraints.txt $(QUIET_INDEX)
	$(PIP_INSTALL) --no-deps -e . $(QUIET_INDEX)
	$(PY) -m mldeploy.llm.converter $(QUIET_INDEX)
	@touch $@

venv: $(STAMP)  ## create or update the virtual environment

demo: $(STAMP)  ## run the full pipeline demo (train, export, quantize, serve, check)
	$(PY) code/serve_model.py

serve: $(STAMP)  ## serve the demo's ONNX model on $(SERVE_HOST):$(PORT), probes on $(ADMIN_PORT) (run `make demo` first)
	$(PY) -m mldeploy.serving --host $(SERVE_HOST) --port $(PORT) --admin-port $(ADMIN_PORT)

# _ext/static_refresh.py copies a changed _static/ afresh: consecutive builds all pass
book: $(STAMP)  ## build the static HTML book into _build/html (no re-execution)
	$(VENV)/bin/jupyter-book build . --builder html --warningiserror --keep-going --quiet

pdf: $(STAMP)  ## the whole book as PDF (双语, 中文, English) printed by chromium, linked from the book
	BOOK_PDF=1 $(VENV)/bin/jupyter-book build . --all --builder html --warningiserror --keep-going --quiet
	$(PY) tests/bookpdf.py _build/html

# The repository root is served (notebooks/ opens first) so that links from a notebook to
# ../chapters/glossary.md resolve; Markdown files open rendered (settings in .jupyter/lab/).
lab: $(STAMP)  ## open the notebooks in JupyterLab
	JUPYTERLAB_SETTINGS_DIR=$(CURDIR)/.jupyter/lab/user-settings $(VENV)/bin/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) \
	  --ServerApp.root_dir=$(CURDIR) --LabApp.default_url=/lab/tree/notebooks

refresh: $(STAMP)  ## re-execute every notebook in place (updates stored outputs)
	$(PY) -m mldeploy.book.notebooks refresh $(NOTEBOOKS)

test-lib: $(STAMP)
	$(PY) -m pytest tests -m "not book and not image" $(PARALLEL)

# 5.4's image cells need the image: build it where a container engine answers (always under CI)
define image_where_an_engine_answers
@if [ "$$CI" = true ] || $(PY) -m mldeploy.image.build --check >/dev/null 2>&1; then \
  $(MAKE) --no-print-directory image; fi
endef

test-notebooks: $(STAMP)
	$(image_where_an_engine_answers)
	$(PY) -m pytest --nbval --nbval-sanitize-with tests/sanitize.cfg -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile $(NOTEBOOKS)

test-book: $(STAMP)
	$(PY) -m pytest tests -m book

AXE := node_modules/axe-core/axe.min.js
$(AXE): package.json package-lock.json
	npm ci --no-audit --no-fund --ignore-scripts
	@touch $@

axe: $(AXE)  ## install axe-core (npm) for the accessibility audit in the browser tests

test-browser: $(STAMP) $(AXE)  ## the built book in headless chromium; screenshots go to _build/screenshots/
	MLDEPLOY_SCREENSHOTS=1 $(PY) -m pytest tests/test_browser.py tests/test_notebook_views.py $(PARALLEL)

page-weight: $(STAMP)  ## bytes a first visit to each page of the book transfers
	$(PY) -m pytest tests/test_browser.py -q -k page_weight && cat _build/page-weight.txt

test: $(STAMP) $(AXE) lint  ## lint, image tests (where an engine answers), unit + service tests, nbval over every notebook, book build
	$(image_where_an_engine_answers)
	@# its own line: make runs a line that starts a sub-make even under `make -n`
	@if [ "$$CI" = true ] || $(PY) -m mldeploy.image.build --check >/dev/null 2>&1; then marks=""; \
	else echo "image tests not run: $$($(PY) -m mldeploy.image.build --check 2>&1 | sed 's/^error: //')"; \
	  marks="not image"; fi; \
	set -x; $(PY) -m pytest tests -m "$$marks" --nbval --nbval-sanitize-with tests/sanitize.cfg $(PARALLEL) $(NOTEBOOKS)

LINT_PATHS := code tests _ext notebooks

lint: $(STAMP)  ## ruff: lint and format check of the library, tests, book extensions and notebook code cells
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

format: $(STAMP)  ## apply ruff's fixes and formatting (then re-run `make lint`)
	$(VENV)/bin/ruff check --fix $(LINT_PATHS)
	$(VENV)/bin/ruff format $(LINT_PATHS)

second-machine: $(STAMP)  ## re-run every notebook as another CPU would; MKL and training on an emulated Intel and AMD, ONNX Runtime on an emulated Haswell (qemu-user)
	$(PY) -m mldeploy.book.second_machine notebooks
	@if command -v qemu-x86_64 >/dev/null; then $(PY) -m mldeploy.book.second_machine kernels && $(PY) -m mldeploy.book.second_machine ort; \
	else echo "qemu-x86_64 not found (apt-get install -y qemu-user): ONNX Runtime's kernels not checked on an AVX2-only CPU"; fi

mutation-check: $(STAMP)  ## apply each deliberate bug of code/mldeploy/book/mutations.toml to a temporary copy; its check must go red (ONLY="id ..." for some)
	@if [ "$$CI" = true ] || $(PY) -m mldeploy.image.build --check >/dev/null 2>&1; then $(MAKE) --no-print-directory image; \
	else echo "no container engine: 5.4's image cells cannot pass, so its mutations count as missed"; fi
	$(PY) -m mldeploy.book.mutations $(if $(ONLY),--only $(ONLY)) --out _build/mutations

constraints:  ## after changing a pin in requirements*.txt: install without the old lock, then re-pin everything
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP_INSTALL) -r requirements-dev.txt $(QUIET_INDEX)
	{ sed -n '1,3p' constraints.txt; $(PY) -m pip freeze --exclude-editable | sed 's/^torch==2.13.0+cpu$$/torch==2.13.0/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:  ## remove built and generated files (keeps .venv)
	-@if [ -d artifacts/cache/podman/storage ]; then $(PY) -m mldeploy.image.build --reset; fi
	rm -rf _build artifacts .pytest_cache

# --- section 5.4: the serving image -------------------------------------------------------------
SERVE_DIR := artifacts/serve
SERVE_SOURCES := $(wildcard code/mldeploy/image/*.py) $(addprefix code/mldeploy/,export/formats.py models.py training.py data.py)

.PHONY: artifacts lint-docker image image-test image-reset

$(SERVE_DIR)/model.onnx.sha256: $(STAMP) $(SERVE_SOURCES)
	$(PY) -m mldeploy.image.artifacts --out $(SERVE_DIR)

artifacts: $(SERVE_DIR)/model.onnx.sha256  ## export the model files the Docker image copies (artifacts/serve/)

image: $(SERVE_DIR)/model.onnx.sha256  ## build the serving image ml-server:0.1.0 with Docker, or Podman (installed when missing, as root)
	$(PY) -m mldeploy.image.build

image-test: image  ## prove the image: answers like the library, uid 10001, read-only root, no torch, HEALTHCHECK, SIGTERM, kube play
	$(PY) -m pytest tests/test_image.py -m image -p no:cacheprovider

image-reset: $(STAMP)  ## remove every image and container of this repository's Podman storage (before deleting artifacts/cache)
	$(PY) -m mldeploy.image.build --reset

lint-docker: $(STAMP)  ## lint the Dockerfile (hadolint) and validate deploy/k8s/ against the Kubernetes schema
	$(VENV)/bin/hadolint Dockerfile
	$(VENV)/bin/kubernetes-validate --strict --quiet deploy/k8s/*.yaml

bench-serve: $(STAMP)  ## benchmark the inference service with wrk (apt-get install -y wrk) and print the table
	$(PY) -m mldeploy.loadtest.bench

bench-llm: $(STAMP)  ## benchmark 5.6: continuous vs static batching, our server vs llama.cpp's, formats; prints the table
	$(PY) -m mldeploy.llm.bench
