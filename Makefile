# The two set-up commands of the README: `make demo` and `make test`. Both work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# what is installed in the venv: the daemon alone (demo), its test tools, systemd-python
STAMP  := $(VENV)/.installed-daemon
TEST_STAMP := $(VENV)/.installed-test
SYSTEMD_STAMP := $(VENV)/.installed-systemd

.PHONY: demo test bench lint system-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

## the daemon and its own dependencies only
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $(STAMP)

## pytest, hypothesis, ruff & co (the [test] extra)
$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(TEST_STAMP)

## a local DICOM receiver, an inbox, a real drop delivered (needs only Python)
demo: $(STAMP)
	$(BIN)/xnat-inbox demo --dir demo-run

## dcmtk and Orthanc are the tests' real peers; libsystemd-dev & co build systemd-python;
## systemd brings systemd-analyze and journald for the service tests (Debian packages)
system-deps:
	@if ! command -v storescp >/dev/null || ! command -v Orthanc >/dev/null || \
	    ! command -v systemd-analyze >/dev/null || ! pkg-config --exists libsystemd 2>/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends \
	    dcmtk orthanc systemd libsystemd-dev pkg-config gcc libc6-dev python3-dev; \
	fi

## the [systemd] extra (systemd-python) is built against libsystemd-dev, so after system-deps
$(SYSTEMD_STAMP): $(TEST_STAMP) | system-deps
	$(BIN)/pip install --quiet -e '.[test,systemd]'
	touch $(SYSTEMD_STAMP)

test: $(SYSTEMD_STAMP)
	$(BIN)/ruff check daemon tests bench
	$(BIN)/python -m pytest -q

bench: $(TEST_STAMP) system-deps
	$(BIN)/python bench/cstore.py
	$(BIN)/python bench/memory.py
	$(BIN)/python bench/rest.py
	$(BIN)/python bench/watch.py
	$(BIN)/python bench/backlog.py
	$(BIN)/python bench/transcode.py

lint: $(TEST_STAMP)
	$(BIN)/ruff check daemon tests bench

clean:
	rm -rf $(VENV) demo-run build *.egg-info
