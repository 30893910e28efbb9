# The two set-up commands of the README: `make demo` and `make test`. Both work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# what is installed in the venv: the daemon alone (demo), its test tools, systemd-python
STAMP  := $(VENV)/.installed-daemon
TEST_STAMP := $(VENV)/.installed-test
SYSTEMD_STAMP := $(VENV)/.installed-systemd
DIST_STAMP := $(VENV)/.installed-dist
# what `make dist` needs installed first; tests/test_deb.py sets it empty (its venv has them)
DIST_TOOLS ?= $(DIST_STAMP)
# where `make dist` and `make deb` write; the version is pyproject.toml's, read from there
DIST   ?= dist
VERSION := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)

.PHONY: demo test bench lint system-deps dist deb clean

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
## systemd brings systemd-analyze and journald for the service tests; python3-venv and
## dpkg-dev build the .deb (Debian packages)
system-deps:
	@if ! command -v storescp >/dev/null || ! command -v Orthanc >/dev/null || \
	    ! command -v systemd-analyze >/dev/null || ! pkg-config --exists libsystemd 2>/dev/null || \
	    ! command -v dpkg-shlibdeps >/dev/null || ! /usr/bin/python3 -c 'import ensurepip' 2>/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends \
	    dcmtk orthanc systemd libsystemd-dev pkg-config gcc libc6-dev python3-dev \
	    python3-venv dpkg-dev; \
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

## python -m build and twine (the [dist] extra)
$(DIST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dist]'
	touch $(DIST_STAMP)

## the wheel and the sdist, checked: $(DIST)/xnat_inbox-$(VERSION)-py3-none-any.whl, .tar.gz
dist: $(DIST_TOOLS)
	rm -f $(DIST)/xnat_inbox-$(VERSION)-*.whl $(DIST)/xnat_inbox-$(VERSION).tar.gz
	$(BIN)/python -m build --outdir $(DIST) .
	$(BIN)/twine check --strict $(DIST)/xnat_inbox-$(VERSION)-*.whl $(DIST)/xnat_inbox-$(VERSION).tar.gz

## $(DIST)/xnat-inbox_$(VERSION)_<arch>.deb from that wheel, with Debian's python3 and dpkg-deb
## (DEB_MAINTAINER='Name <mail>' in the environment names the package's maintainer)
deb: dist | system-deps
	/usr/bin/python3 daemon/packaging/deb/build.py --out $(DIST) \
	  --wheel $(DIST)/xnat_inbox-$(VERSION)-py3-none-any.whl

lint: $(TEST_STAMP)
	$(BIN)/ruff check daemon tests bench

clean:
	rm -rf $(VENV) demo-run build dist *.egg-info
