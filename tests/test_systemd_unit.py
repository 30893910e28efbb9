"""The unit file and the restrictions it imposes, as far as they can be had without systemd."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_runner import DaemonProcess, wait_for_report
from tests.systemd_support import QUIET, REPO, UNIT, NotifySocket, has, site
from tests.test_e2e_cstore import copy_in
from xnat_inbox.commands.synthetic import SeriesSpec, write_session

pytestmark = pytest.mark.systemd


# --- the unit's restrictions, as far as they can be had without systemd --------------------

#: in a private mount namespace: every mount read-only but $RW (ProtectSystem=strict with
#: ReadWritePaths=), then user $AS without capabilities (User=, CapabilityBoundingSet=,
#: NoNewPrivileges=)
RESTRICT = r"""
set -e
for path in $RW; do mount --bind "$path" "$path"; done
awk '{print $5}' /proc/self/mountinfo | while read -r point; do
  case "$point" in /proc*|/sys*|/dev*) continue ;; esac
  for path in $RW; do [ "$point" = "$path" ] && continue 2; done
  mount -o remount,bind,ro "$point" 2>/dev/null || true
done
exec setpriv --reuid="$AS" --regid="$AS" --clear-groups --inh-caps=-all --bounding-set=-all \
  --no-new-privs -- "$@"
"""
#: MemoryDenyWriteExecute=: the kernel's own W^X (PR_SET_MDWE, Linux 6.3+), then exec
MDWE = ("import ctypes, os, sys\n"
        "assert ctypes.CDLL(None).prctl(65, 1, 0, 0, 0) == 0, 'PR_SET_MDWE failed'\n"
        "os.execv(sys.argv[1], sys.argv[1:])")


def kernel_has_mdwe() -> bool:
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl(66, 0, 0, 0, 0) >= 0  # PR_GET_MDWE


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder user nobody can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="xnat-inbox-hardened-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("private_tmp", [True, False], ids=["PrivateTmp", "read-only-tmp"])
def test_daemon_delivers_under_the_units_restrictions(open_dir, inprocess_scp, private_tmp):
    """As the unit runs it (PrivateTmp=: a writable temporary folder of its own, here $TMPDIR);
    and with every temporary folder read-only (a unit edited without PrivateTmp=), where the
    fork server can't start: scan workers are spawned afresh each, with one warning."""
    if os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("unshare"):
        pytest.skip("needs root, unshare and setpriv")
    # user nobody, unless this Python lives where nobody can't run it (pyenv under /root):
    # then root without any capability, which can't pass permission checks either
    reexec = "import os, sys; os.execv(sys.executable, [sys.executable, '-c', ''])"
    user = 65534 if subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
         "--bounding-set=-all", "--no-new-privs", "--", sys.executable, "-c", reexec],
        capture_output=True, timeout=60, check=False).returncode == 0 else 0
    config, (inbox,) = site(open_dir, inprocess_scp())
    state = open_dir / "state"
    private = open_dir / "private-tmp"
    for folder in (inbox, state, private):
        folder.mkdir(exist_ok=True)
        os.chown(folder, user, user)
    listener = NotifySocket(open_dir / "notify.sock")
    (open_dir / "notify.sock").chmod(0o777)  # as systemd's own notify socket
    wrapper = ["unshare", "--mount", "--propagation", "private", "sh", "-c", RESTRICT, "restrict"]
    env = {**QUIET, "NOTIFY_SOCKET": str(listener.path), "AS": str(user),
           "RW": f"{inbox} {state}" + (f" {private}" if private_tmp else ""),
           **({"TMPDIR": str(private)} if private_tmp else {})}

    # the restrictions hold: the inbox is writable, nothing else is; no capability is left
    probe = subprocess.run(
        [*wrapper, "sh", "-c", f"touch {inbox}/probe && ! touch {open_dir}/probe 2>/dev/null && "
         f"! touch {REPO}/probe 2>/dev/null && grep CapEff /proc/self/status"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=60, check=False)
    assert (probe.returncode, probe.stdout.split()) == (0, ["CapEff:", "0" * 16]), probe.stderr
    (inbox / "probe").unlink()

    mdwe = [sys.executable, "-c", MDWE] if kernel_has_mdwe() else []
    process = DaemonProcess(config, open_dir / "daemon.log", env=env, wrapper=[*wrapper, *mdwe])
    try:
        process.start()
        listener.wait_for(has("READY=1"))
        write_session(open_dir / "src" / "LOCKED", series=(SeriesSpec("T1", 3),))
        subprocess.run(["chown", "-R", f"{user}:{user}", str(open_dir / "src")], check=True)
        copy_in(open_dir / "src" / "LOCKED", inbox)
        outcome, report, _ = wait_for_report(inbox, "LOCKED", daemon=process)
        assert outcome == "done", report["reasons"]
        assert report["studies"][0]["stored"] == 3
        warned = [e for e in process.events() if "cannot start scan worker" in e["event"]]
        assert len(warned) == (0 if private_tmp else 1), warned
    finally:
        assert process.stop() == 0, process.text()[-3000:]
        listener.drain()
        listener.close()
    assert "STOPPING=1" in listener.messages[-1]


# --- the unit file --------------------------------------------------------------------------

def test_unit_file_verifies_and_is_hardened(tmp_path, capsys):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify wants ExecStart= to exist: the same unit, run from this checkout's venv
    unit = tmp_path / "xnat-inbox.service"
    unit.write_text(UNIT.read_text().replace("/opt/xnat-inbox/bin/xnat-inbox",
                                             str(Path(sys.executable).with_name("xnat-inbox"))))
    verify = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                            timeout=120, check=False)
    assert (verify.returncode, verify.stderr, verify.stdout) == (0, "", "")
    security = subprocess.run([analyze, "security", "--offline=yes", str(unit)],
                              capture_output=True, text=True, timeout=120, check=False)
    found = re.search(r"Overall exposure level for xnat-inbox\.service: (\d+\.\d+)",
                      security.stdout)
    assert found, security.stdout + security.stderr
    with capsys.disabled():
        print(f"\nsystemd-analyze security xnat-inbox.service: exposure {found.group(1)}")
    assert float(found.group(1)) <= 2.0
    settings = dict(line.split("=", 1) for line in UNIT.read_text().splitlines()
                    if "=" in line and not line.startswith("#"))
    assert settings["Type"] == "notify" and settings["Restart"] == "on-failure"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID" and settings["WatchdogSec"]
    assert settings["CapabilityBoundingSet"] == ""


def unit_settings() -> dict[str, list[str]]:
    """Every key of the unit with all its values, in order."""
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def size_in_bytes(value: str) -> int:
    """A systemd size (1024-based suffixes), e.g. 1536M."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    return int(value[:-1]) * units[value[-1]] if value[-1] in units else int(value)


def test_unit_file_limits_memory_and_tasks_and_writes_only_the_inboxes():
    """Issue 23, item 10: a memory and task ceiling (one user's file must not take the machine
    down), no unused LogsDirectory=, and write access to the inboxes, not all of /srv/inbox."""
    settings = unit_settings()
    [high], [ceiling], [tasks] = settings["MemoryHigh"], settings["MemoryMax"], settings["TasksMax"]
    # measured: 221 MB while a drop of 20,000 files is scanned and sent; 270 tasks with 12
    # destinations busy at once (see the unit's comments)
    assert 221 * 2**20 < size_in_bytes(high) < size_in_bytes(ceiling)
    assert int(tasks) > 270
    assert "LogsDirectory" not in settings  # the daemon logs to the journal only
    writable = settings["ReadWritePaths"]
    assert writable and "-/srv/inbox" not in writable
    assert all(path.startswith("-/srv/inbox/") for path in writable)


def test_sysusers_file_creates_the_account(tmp_path):
    sysusers = shutil.which("systemd-sysusers")
    if sysusers is None:
        pytest.skip("systemd-sysusers is not installed")
    (tmp_path / "etc").mkdir()
    result = subprocess.run([sysusers, f"--root={tmp_path}", "--dry-run",
                             str(REPO / "systemd" / "xnat-inbox.sysusers")],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "Creating user 'xnat-inbox'" in result.stdout + result.stderr
