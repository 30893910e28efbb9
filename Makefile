# The two set-up commands of the README: `make demo` and `make test`. Both work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench lint system-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

## a local DICOM receiver, an inbox, a real drop delivered (needs only Python)
demo: $(STAMP)
	$(BIN)/xnat-inbox demo --dir demo-run

## dcmtk and Orthanc are the tests' real peers (Debian packages)
system-deps:
	@if ! command -v storescp >/dev/null || ! command -v Orthanc >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends dcmtk orthanc; \
	fi

test: $(STAMP) system-deps
	$(BIN)/ruff check daemon tests bench
	$(BIN)/python -m pytest -q

bench: $(STAMP) system-deps
	$(BIN)/python bench/cstore.py
	$(BIN)/python bench/rest.py

lint: $(STAMP)
	$(BIN)/ruff check daemon tests bench

clean:
	rm -rf $(VENV) demo-run build *.egg-info
