"""`xnat-inbox demo` (what `make demo` runs) and the Makefile's installs: the demo runs as a
new site's first command, on what a careful site sends, and ends pointing at its files as
templates; `make demo` installs the daemon alone."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon_runner import REPO
from xnat_inbox.config import load_config, load_route


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str],
                                                            Path]:
    """One demo run, from a folder of its own as a new site runs it: (its output, demo-run)."""
    cwd = tmp_path_factory.mktemp("site")
    result = subprocess.run([sys.executable, "-m", "xnat_inbox", "demo", "--dir", "demo-run"],
                            capture_output=True, text=True, cwd=cwd, timeout=240)
    return result, cwd / "demo-run"


@pytest.mark.e2e
def test_demo_ends_pointing_at_its_config_and_route_as_templates(demo):
    """14: the last lines name demo-run/config.yaml and demo-run/inbox/route.yaml, which exist
    and are a valid site config and route."""
    result, base = demo
    assert result.returncode == 0, result.stdout + result.stderr
    last = result.stdout.splitlines()[-3:]
    assert last[0] == "demo: starting templates for a site of your own (README: Your first " \
                      "inbox):"
    assert last[1].startswith("demo:   demo-run/config.yaml  the site config")
    assert last[2].startswith("demo:   demo-run/inbox/route.yaml  the inbox's route")
    config = load_config(base / "config.yaml")
    assert [inbox.path for inbox in config.inboxes] == [base / "inbox"]
    route = load_route(base / "inbox" / "route.yaml", set(config.destinations))
    assert route.destination in config.destinations


@pytest.mark.e2e
def test_the_demo_data_is_what_a_careful_site_sends(demo):
    """13: the demo's successful run logs no PHI guard warning (nor any other warning)."""
    result, base = demo
    assert result.returncode == 0, result.stdout + result.stderr
    log = (base / "daemon.log").read_text()
    assert "finished" in log
    assert "phi guard" not in log
    assert "[warning" not in log and "[error" not in log
    [report] = (base / "inbox" / "done").glob("*/MR_DEMO_0001.report.json")
    [study] = json.loads(report.read_text())["studies"]
    assert study["phi_guard"]["attributes"] == []


@pytest.mark.ops
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_installs_the_daemon_alone_and_make_test_adds_the_test_tools(tmp_path):
    """14: on a fresh checkout `make demo` installs `-e .` (no test extras); `make test` after it
    installs the test extras; `make demo` after `make test` installs nothing more. Make's own
    plan (`make -n`) for the real Makefile, its stamps as each step leaves them."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy2(REPO / name, tmp_path / name)

    def plan(target: str) -> list[str]:
        result = subprocess.run(["make", "-n", target], capture_output=True, text=True,
                                cwd=tmp_path, timeout=60)
        assert result.returncode == 0, result.stderr
        return [line for line in result.stdout.splitlines() if "pip install" in line]

    venv = tmp_path / ".venv"
    assert plan("demo") == [".venv/bin/pip install --quiet --upgrade pip",
                            ".venv/bin/pip install --quiet -e ."]
    (venv / "bin").mkdir(parents=True)  # as `make demo` leaves it
    (venv / "bin" / "python").touch()
    (venv / ".installed-daemon").touch()
    assert plan("demo") == []
    assert plan("test") == [".venv/bin/pip install --quiet -e '.[test]'",
                            ".venv/bin/pip install --quiet -e '.[test,systemd]'"]
    (venv / ".installed-test").touch()  # as `make test` leaves it
    (venv / ".installed-systemd").touch()
    assert plan("test") == []
    assert plan("demo") == []
