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
PORT ?= 8888
ADMIN_PORT ?= 8081
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))

.PHONY: help venv demo serve book lab refresh test test-lib test-notebooks test-book test-browser page-weight bench-serve constraints clean

help:  ## list the commands
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-15s %s\n", $$1, $$2}'

$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	@$(PYTHON_BOOT) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required, found " + sys.version.split()[0])'
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PIP_INSTALL) -r requirements-dev.txt -c constraints.txt $(QUIET_INDEX)
	$(PIP_INSTALL) --no-deps -e . $(QUIET_INDEX)
	@touch $@

venv: $(STAMP)  ## create or update the virtual environment

demo: $(STAMP)  ## run the full pipeline demo (train, export, quantize, serve, check)
	$(PY) code/serve_model.py

serve: $(STAMP)  ## serve the demo's ONNX model on 127.0.0.1:$(PORT), probes on $(ADMIN_PORT) (run `make demo` first)
	$(PY) -m mldeploy.serving --host 127.0.0.1 --port $(PORT) --admin-port $(ADMIN_PORT)

book: $(STAMP)  ## build the static HTML book into _build/html (no re-execution)
	$(VENV)/bin/jupyter-book build . --builder html --warningiserror --keep-going --quiet

lab: $(STAMP)  ## open the notebooks in JupyterLab
	$(VENV)/bin/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) notebooks/

refresh: $(STAMP)  ## re-execute every notebook in place (updates stored outputs)
	$(PY) -m mldeploy.book.notebooks refresh $(NOTEBOOKS)

test-lib: $(STAMP)
	$(PY) -m pytest tests -m "not book"

test-notebooks: $(STAMP)
	$(PY) -m pytest --nbval --nbval-sanitize-with tests/sanitize.cfg -p no:cacheprovider $(NOTEBOOKS)

test-book: $(STAMP)
	$(PY) -m pytest tests -m book

test-browser: $(STAMP)  ## the built book in headless chromium; screenshots go to _build/screenshots/
	$(PY) -m pytest tests/test_browser.py

page-weight: $(STAMP)  ## bytes a first visit to each page of the book transfers
	$(PY) -m pytest tests/test_browser.py -q -k page_weight && cat _build/page-weight.txt

test: $(STAMP)  ## unit + service tests, nbval over every notebook, book build
	$(PY) -m pytest tests --nbval --nbval-sanitize-with tests/sanitize.cfg $(NOTEBOOKS)

constraints:  ## after changing a pin in requirements*.txt: install without the old lock, then re-pin everything
	@test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PIP_INSTALL) -r requirements-dev.txt $(QUIET_INDEX)
	{ sed -n '1,3p' constraints.txt; $(PY) -m pip freeze --exclude-editable | sed 's/^torch==2.13.0+cpu$$/torch==2.13.0/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:  ## remove built and generated files (keeps .venv)
	rm -rf _build artifacts .pytest_cache

# --- section 5.4: the serving image -------------------------------------------------------------
SERVE_DIR := artifacts/serve
SERVE_SOURCES := $(wildcard code/mldeploy/image/*.py) $(addprefix code/mldeploy/,export/formats.py models.py training.py data.py)

.PHONY: artifacts lint-docker

$(SERVE_DIR)/model.onnx.sha256: $(STAMP) $(SERVE_SOURCES)
	$(PY) -m mldeploy.image.artifacts --out $(SERVE_DIR)

artifacts: $(SERVE_DIR)/model.onnx.sha256  ## export the model files the Docker image copies (artifacts/serve/)

lint-docker: $(STAMP)  ## lint the Dockerfile (hadolint) and validate deploy/k8s/ against the Kubernetes schema
	$(VENV)/bin/hadolint Dockerfile
	$(VENV)/bin/kubernetes-validate --strict --quiet deploy/k8s/*.yaml

bench-serve: $(STAMP)  ## benchmark the inference service with wrk (apt-get install -y wrk) and print the table
	$(PY) -m mldeploy.loadtest.bench
