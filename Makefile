# One entry point for newcomers and CI: `make test` builds .venv and runs the whole suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test lint fmt clean serve ohif viewer

# OHIF v3, ready-built in the npm package @ohif/app (its dist/), for the viewer tests and `make viewer`.
# Keep in step with dicom_node_lab/viewer.py's OHIF_VERSION.
OHIF_VERSION := 3.13.2
OHIF_DIR := .cache/ohif-$(OHIF_VERSION)

venv: $(STAMP)

# The node with its test tools, and the lab (lab/: phantom, training, experiments) beside it.
$(STAMP): setup.cfg pyproject.toml lab/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]' -e lab
	touch $(STAMP)

test: venv ohif
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

# The DICOM node on the embedded defaults: CPU backend, SQLite, ./spool, DICOM 11112, HTTP 8080.
# Then, in another shell: .venv/bin/dicom-node demo   (or storescu -aet STORESCU -aec DICOMNODE localhost 11112 FILES)
serve: venv
	$(PY) -m dicom_node.cli serve --backend onnxruntime

# Unpacks OHIF from the npm registry once (about 50 MB); nothing is fetched at run time.
ohif: $(OHIF_DIR)/dist/index.html

$(OHIF_DIR)/dist/index.html:
	mkdir -p .cache
	cd .cache && rm -rf package ohif-$(OHIF_VERSION) && npm pack --silent @ohif/app@$(OHIF_VERSION) >/dev/null \
		&& tar xzf ohif-app-$(OHIF_VERSION).tgz && mv package ohif-$(OHIF_VERSION) && rm ohif-app-$(OHIF_VERSION).tgz

# Orthanc, the node and OHIF on loopback with a demo study routed through the node; prints the viewer's URL.
viewer: venv ohif
	$(PY) -m dicom_node_lab.viewer

lint: venv
	$(VENV)/bin/ruff check .

fmt: venv
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
