# One entry point for newcomers and CI: `make test` builds .venv and runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test lint fmt clean serve

venv: $(STAMP)

# The node with its test tools, and the lab (lab/: phantom, training, experiments) beside it.
$(STAMP): setup.cfg pyproject.toml lab/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]' -e lab
	touch $(STAMP)

test: venv
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

# The DICOM node on the embedded defaults: CPU backend, SQLite, ./spool, DICOM 11112, HTTP 8080.
# Then, in another shell: .venv/bin/dicom-node demo   (or storescu -aet STORESCU -aec DICOMNODE localhost 11112 FILES)
serve: venv
	$(PY) -m dicom_node.cli serve --backend onnxruntime

lint: venv
	$(VENV)/bin/ruff check .

fmt: venv
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
