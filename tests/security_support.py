"""Three accounts on one lab share, as the security tests need them: the daemon, an attacker and
a victim, all in the share's setgid group.

The attacker and the victim are real uids without capabilities. The daemon is root without any
capability (as in test_systemd_unit): it passes no permission check a plain account would not,
owns what it creates, and can still run this Python (which may live under /root, mode 0700).
The attacker's scripts run with Debian's /usr/bin/python3, which every uid can run."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_runner import DaemonProcess

GROUP = 61000  # the lab's group: owns the share
ATTACKER = 61001
VICTIM = 61002
DAEMON = 0  # without capabilities
SYSTEM_PYTHON = "/usr/bin/python3"


def without_capabilities(uid: int, groups: Sequence[int] = (GROUP,)) -> list[str]:
    """A setpriv prefix: that uid, the lab's group, no capability, no new privileges."""
    return ["setpriv", f"--reuid={uid}", f"--regid={GROUP}",
            f"--groups={','.join(map(str, groups))}", "--inh-caps=-all", "--bounding-set=-all",
            "--no-new-privs", "--"]


def _lab_umask() -> None:
    os.umask(0o002)  # a lab share: what members create is group-writable


@dataclass
class Lab:
    root: Path  # reachable by every account (mode 0755)
    share: Path  # the inbox: root:GROUP 2770, as a lab share is set up

    def run_as(self, uid: int, argv: Sequence[str], check: bool = True,
               **kwargs: Any) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([*without_capabilities(uid), *argv], capture_output=True,
                              text=True, timeout=60, preexec_fn=_lab_umask, check=False, **kwargs)
        if check and done.returncode != 0:
            raise AssertionError(f"{argv} as uid {uid} failed ({done.returncode}): "
                                 f"{done.stderr or done.stdout}")
        return done

    def attacker(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run_as(ATTACKER, argv, check=check)

    def victim(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run_as(VICTIM, argv, check=check)

    def attacker_python(self, code: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run_as(ATTACKER, [SYSTEM_PYTHON, "-c", code], check=check)

    def give(self, path: Path, uid: int, mode: int | None = None) -> None:
        """Make `path` (and everything below it) belong to `uid` and the lab's group."""
        for item in [path, *(path.rglob("*") if path.is_dir() else [])]:
            os.lchown(item, uid, GROUP)
            if mode is not None and not item.is_symlink():
                item.chmod(mode if item.is_dir() else mode & 0o666)

    def daemon(self, config: Path, log: Path, env: dict[str, str] | None = None) -> DaemonProcess:
        return DaemonProcess(config, log, env=env, wrapper=without_capabilities(DAEMON))


@pytest.fixture
def lab() -> Iterator[Lab]:
    if os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists(SYSTEM_PYTHON):
        pytest.skip("needs root, setpriv and /usr/bin/python3 to play three accounts")
    # pytest's tmp_path is private to root: the other accounts could not reach it
    root = Path(tempfile.mkdtemp(prefix="xnat-inbox-lab-"))
    root.chmod(0o755)
    share = root / "inbox"
    share.mkdir()
    os.chown(share, 0, GROUP)
    share.chmod(0o2770)
    try:
        yield Lab(root, share)
    finally:
        shutil.rmtree(root, ignore_errors=True)
