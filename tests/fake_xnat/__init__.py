"""A fake XNAT REST server for tests, run as a subprocess (see README.md beside this file).

    with FakeXnat({"users": {...}, "projects": {...}}) as xnat:
        xnat.url                      # http://127.0.0.1:PORT
        xnat.add_fault(path_prefix="/data/services/import", status=503, times=2)
        xnat.state()                  # users, projects, prearchive, archive, request log
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .state import DEFAULT_CONFIG, UNASSIGNED

__all__ = ["DEFAULT_CONFIG", "UNASSIGNED", "FakeXnat"]

REPO_ROOT = Path(__file__).resolve().parents[2]


class FakeXnat:
    """Starts `python -m tests.fake_xnat.server` on 127.0.0.1 and stops it by PID.

    config: users, projects, tokens and timeouts (see DEFAULT_CONFIG); keys left out
        take the defaults. state_dir: where files and the server log go (a temp dir,
        removed on stop, when not given). port: 0 picks a free one.
    """

    def __init__(self, config: Mapping[str, Any] | None = None, *,
                 state_dir: str | os.PathLike[str] | None = None, port: int = 0,
                 startup_timeout: float = 20.0):
        self.config = dict(config or {})
        self._own_dir = state_dir is None
        self.state_dir = Path(state_dir) if state_dir else Path(
            tempfile.mkdtemp(prefix="fake-xnat-"))
        self.requested_port = port
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log_path = self.state_dir / "server.log"

    # ---- lifecycle -------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> FakeXnat:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.state_dir / "config.json"
        config_path.write_text(json.dumps(self.config))
        port_file = self.state_dir / "port"
        port_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "tests.fake_xnat.server", "--host", "127.0.0.1",
               "--port", str(self.requested_port), "--state-dir", str(self.state_dir),
               "--config", str(config_path), "--port-file", str(port_file)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            self._wait_ready(port_file)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, port_file: Path) -> None:
        deadline = time.monotonic() + self.startup_timeout
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"fake XNAT exited with {self.process.returncode}:\n"
                                   f"{self.log_tail()}")
            if not self.port and port_file.exists():
                self.port = int(port_file.read_text())
            if self.port:
                health = f"{self.url}/_fake/health"
                with contextlib.suppress(OSError), urllib.request.urlopen(health, timeout=2) as r:
                    if r.status == 200:
                        return
            time.sleep(0.05)
        raise RuntimeError(f"fake XNAT did not answer within {self.startup_timeout}s:\n"
                           f"{self.log_tail()}")

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate, then kill, the server process; remove the temp state dir we made."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if self._own_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> FakeXnat:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    # ---- admin helpers (no XNAT auth) ------------------------------------------------

    def admin(self, method: str, path: str, payload: Any = None) -> Any:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"null")

    def state(self, digests: bool = False, log: bool = True) -> dict[str, Any]:
        query = f"?digests={int(digests)}&log={int(log)}"
        return self.admin("GET", f"/_fake/state{query}")

    def reset(self, config: Mapping[str, Any] | None = None) -> None:
        """Drop all data, sessions, faults and the request log; optionally a new config."""
        self.admin("POST", "/_fake/reset", {"config": dict(config)} if config else {})

    def add_fault(self, path_prefix: str = "/data/", **spec: Any) -> dict[str, Any]:
        """status=, times=, delay_seconds=, drop_connection_after_bytes=, process=, body=,
        content_type=, headers=."""
        return self.admin("POST", "/_fake/faults", dict(spec, path_prefix=path_prefix))[0]

    def clear_faults(self) -> None:
        self.admin("DELETE", "/_fake/faults")

    def expire_sessions(self) -> int:
        return int(self.admin("POST", "/_fake/expire_sessions")["expired"])

    def expire_tokens(self) -> int:
        return int(self.admin("POST", "/_fake/expire_tokens")["expired"])

    def requests(self) -> list[dict[str, Any]]:
        return self.admin("GET", "/_fake/requests")

    def prearchive(self, project: str | None = None) -> list[dict[str, Any]]:
        entries = self.state(log=False)["prearchive"]
        return [e for e in entries if project is None or e["project"] == project]

    def archive(self) -> list[dict[str, Any]]:
        return self.state(log=False)["archive"]
