"""Run the real daemon (`python -m xnat_inbox run`) as a subprocess, stopped by its PID."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import yaml

from tests.peers import pid_exists

REPO = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, destinations: dict[str, Any], inboxes: list[dict[str, Any]],
                 **settings: Any) -> Path:
    """A site config in tmp_path; inbox paths are created."""
    config = {"state_dir": str(tmp_path / "state"), "settle_seconds": 0.5, **settings,
              "destinations": destinations, "inboxes": inboxes}
    for inbox in inboxes:
        Path(inbox["path"]).mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def dicom_destination(peer: Any, **extra: Any) -> dict[str, Any]:
    """A dicom destination for `peer`; retries are quick so a failing test fails fast."""
    return {"type": "dicom", "host": peer.host, "port": peer.port, "called_ae": peer.aet,
            "dimse_timeout": 10, "acse_timeout": 10, "connect_timeout": 3,
            "retry": {"max_attempts": 2, "initial_backoff": 0.2, "max_backoff": 0.5}, **extra}


class DaemonProcess:
    """`env` is added to the environment; `wrapper` runs before python (it must exec it, so
    the PID stays the daemon's); `log_format` None lets the daemon choose."""

    def __init__(self, config: Path, log_path: Path, env: Mapping[str, str] | None = None,
                 wrapper: Sequence[str] = (), log_format: str | None = "json") -> None:
        self.config = config
        self.log_path = log_path
        self.env = dict(env or {})
        self.wrapper = list(wrapper)
        self.log_format = log_format
        self.proc: subprocess.Popen[bytes] | None = None

    def launch(self) -> Self:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        log_format = ["--log-format", self.log_format] if self.log_format else []
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.wrapper, sys.executable, "-m", "xnat_inbox", "--config", str(self.config),
                 *log_format, "run"],
                stdout=log, stderr=log, cwd=REPO, env=env)
        return self

    def start(self, inboxes: int = 1, timeout: float = 20) -> Self:
        self.launch()
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while sum(e.get("event") == "watching" for e in self.events()) < inboxes:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemon not watching after {timeout} s:\n{self.text()}")
            time.sleep(0.05)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then SIGKILL; returns the exit code. The PID is gone afterwards."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        code = self.proc.returncode
        assert not pid_exists(self.proc.pid), f"daemon PID {self.proc.pid} outlived stop()"
        return code

    def text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line a library printed directly
        return events


def wait_for_report(inbox: Path, name: str, timeout: float = 60,
                    daemon: DaemonProcess | None = None) -> tuple[str, dict[str, Any], Path]:
    """Wait until <name>.report.json appears under done/ or failed/; (outcome, report, path)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for outcome in ("done", "failed"):
            for path in report_files(inbox / outcome):
                if path.name == f"{name}.report.json":
                    return outcome, json.loads(path.read_text()), path
        time.sleep(0.1)
    log = daemon.text()[-4000:] if daemon else ""
    raise AssertionError(f"no report for {name} within {timeout} s\n{log}")


def work_area_left(inbox: Path, timeout: float = 30) -> list[Path]:
    """What is still in the inbox's work area once it has had time to empty: a drop's report
    is moved out just before its work folder is removed, so a test that saw the report waits
    for the rest."""
    deadline = time.monotonic() + timeout
    while (left := sorted(inbox.glob(".xnat-inbox/work/*"))) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def reports(inbox: Path) -> list[Path]:
    return report_files(inbox / "done") + report_files(inbox / "failed")


def report_files(folder: Path) -> list[Path]:
    """The reports in done/ or failed/: in each day folder and in the routing folders kept
    below it (done/<day>/StudyV/v1.report.json); a drop's own folder is not walked."""
    found: list[Path] = []
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return found
    names = {entry.name for entry in entries}
    for entry in entries:
        if entry.name.endswith(".report.json"):
            found.append(entry)
        elif entry.is_dir() and not entry.is_symlink() and \
                f"{entry.name}.report.json" not in names:
            found += report_files(entry)
    return found
