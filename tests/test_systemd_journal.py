"""journald: the fields each event carries, with a real systemd-journald where the machine
allows it."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_runner import wait_for_report
from tests.peers import pid_exists
from tests.systemd_support import drop, site
from tests.test_e2e_cstore import PHI, copy_in
from xnat_inbox import journald, logs
from xnat_inbox.logs import configure, get_logger, hashed_uid, phi_pattern, phi_scope

pytestmark = pytest.mark.systemd


# --- journald -------------------------------------------------------------------------------

JOURNALD = Path("/lib/systemd/systemd-journald")


class Journald:
    """A real systemd-journald in a mount namespace of its own, with a tmpfs on /run: there
    its native socket is where libsystemd sends, and its files are where journalctl reads.
    The daemon joins that namespace with nsenter (which execs it: the PID stays the daemon's)."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                 f"mount -t tmpfs tmpfs /run && exec {JOURNALD}"], stdout=log, stderr=log)
        socket_path = self.root / "run/systemd/journal/socket"
        deadline = time.monotonic() + 20
        while not socket_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.skip(f"cannot run systemd-journald in a mount namespace here:\n"
                            f"{self.log_path.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)

    @property
    def root(self) -> Path:
        assert self.proc is not None
        return Path(f"/proc/{self.proc.pid}/root")

    @property
    def wrapper(self) -> tuple[str, ...]:
        assert self.proc is not None
        return ("nsenter", f"--mount=/proc/{self.proc.pid}/ns/mnt", "--")

    def entries(self, *matches: str) -> list[dict[str, Any]]:
        """journalctl's JSON for entries matching FIELD=value (as `journalctl -u … F=v`)."""
        result = subprocess.run(
            ["journalctl", "-D", str(self.root / "run/log/journal"), "-o", "json", "--no-pager",
             *matches], capture_output=True, text=True, timeout=60, check=False)
        return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], *matches: str,
                 timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            found = [entry for entry in self.entries(*matches) if predicate(entry)]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                messages = [entry.get("MESSAGE") for entry in self.entries()[-20:]]
                raise AssertionError(f"no journal entry for {matches}; the last: {messages}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        assert not pid_exists(self.proc.pid)


@pytest.fixture
def journal_daemon(tmp_path: Path) -> Iterator[Journald]:
    pytest.importorskip("systemd.journal")
    if os.geteuid() != 0 or not JOURNALD.exists() or not shutil.which("nsenter"):
        pytest.skip("needs root, systemd-journald and nsenter for a private journald")
    journal = Journald(tmp_path / "journald.log")
    journal.start()
    yield journal
    journal.stop()


def test_journal_entries_carry_fields_journalctl_can_match(tmp_path, service, storescp,
                                                            journal_daemon):
    config, (inbox,) = site(tmp_path, storescp)
    # what systemd does: stderr connected to the journal, and JOURNAL_STREAM naming it
    stderr = tmp_path / "stderr.log"
    stderr.touch()
    info = stderr.stat()
    process = service(config, env={"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"},
                      wrapper=journal_daemon.wrapper, log_format=None, log_path=stderr)
    session = drop(tmp_path, inbox, "MR_J")
    (tmp_path / "src" / "JUNK").mkdir()
    (tmp_path / "src" / "JUNK" / "notes.txt").write_text("not DICOM")
    copy_in(tmp_path / "src" / "JUNK", inbox)
    assert wait_for_report(inbox, "MR_J")[0] == "done"
    assert wait_for_report(inbox, "JUNK")[0] == "failed"

    # journalctl -u xnat-inbox DESTINATION=scp (no -u here: systemd made no unit)
    sent = journal_daemon.wait_for(lambda e: e["MESSAGE"].startswith("sent"), "DESTINATION=scp")
    assert {key: sent[key] for key in ("STAGE", "DROP", "DESTINATION", "STUDY_UID", "STORED",
                                       "PRIORITY", "SYSLOG_IDENTIFIER", "_TRANSPORT")} == {
        "STAGE": "send", "DROP": "MR_J", "DESTINATION": "scp",
        "STUDY_UID": hashed_uid(session.study_uid), "STORED": "4", "PRIORITY": "6",
        "SYSLOG_IDENTIFIER": "xnat-inbox", "_TRANSPORT": "journal"}
    assert sent["_PID"] == str(process.pid)
    assert sent["CODE_FILE"].endswith("pipeline.py")
    refused = journal_daemon.wait_for(lambda e: e.get("DROP") == "JUNK", "PRIORITY=3")
    assert refused["MESSAGE"].startswith("drop refused") and refused["STAGE"] == "route"
    process.stop()
    journal_daemon.wait_for(lambda e: e["MESSAGE"].startswith("stopped"), f"_PID={process.pid}")

    everything = json.dumps(journal_daemon.entries(f"_PID={process.pid}"))
    for value in (*PHI, session.study_uid):
        assert value not in everything, f"{value!r} reached the journal"
    assert "watching" not in stderr.read_text()  # the journal took the events, not stderr


def test_journal_handler_hands_fields_to_journal_send(monkeypatch, restore_logging):
    """In process, through structlog, the PHI processor, the handler and systemd-python's own
    journal.send; only its C call (sendv) is replaced, to read what it was given."""
    journal = pytest.importorskip("systemd.journal")
    sent: list[dict[str, str]] = []
    monkeypatch.setattr(journal, "sendv",
                        lambda *args: sent.append(dict(arg.split("=", 1) for arg in args)))
    configure("journal", log_phi=False, stream=io.StringIO())
    log = get_logger(step="send")
    with phi_scope(phi_pattern(["Doe^Jane", "SUBJ001"])):
        log.info("sent", stage="send", drop="MR_0042", destination="xnat-scp", study="1.2.3.4",
                 labels="xnat://P/SUBJ001/SUBJ001_1", error=None)
        try:
            raise RuntimeError("cannot read Doe^Jane")
        except RuntimeError:
            log.exception("internal error", stage="send", drop="MR_0042")
    logs.set_log_phi(True)
    log.warning("routed", study="1.2.3.4")

    info, error, warning = sent
    assert info["MESSAGE"] == ("sent  step=send stage=send drop=MR_0042 destination=xnat-scp "
                               f"study={hashed_uid('1.2.3.4')} labels=xnat://P/[PHI]/[PHI]_1")
    assert {key: info[key] for key in ("PRIORITY", "STAGE", "DROP", "DESTINATION", "STUDY_UID",
                                       "LABELS", "STEP", "SYSLOG_IDENTIFIER")} == {
        "PRIORITY": "6", "STAGE": "send", "DROP": "MR_0042", "DESTINATION": "xnat-scp",
        "STUDY_UID": hashed_uid("1.2.3.4"), "LABELS": "xnat://P/[PHI]/[PHI]_1", "STEP": "send",
        "SYSLOG_IDENTIFIER": "xnat-inbox"}
    assert "ERROR" not in info  # None values are left out
    assert info["CODE_FILE"] == __file__ and info["CODE_FUNC"] == sys._getframe().f_code.co_name
    assert error["PRIORITY"] == "3" and "RuntimeError" in error["MESSAGE"]
    assert "Doe" not in json.dumps(sent)
    assert warning["PRIORITY"] == "4" and warning["STUDY_UID"] == "1.2.3.4"  # log_phi: true


def test_journal_format_without_systemd_python_writes_priority_prefixes(monkeypatch,
                                                                        restore_logging):
    monkeypatch.setattr(journald, "systemd_python_send", lambda: None)
    stream = io.StringIO()
    configure("journal", stream=stream)
    get_logger().error("drop refused", drop="X", reasons=["no DICOM files in this drop"])
    assert stream.getvalue() == '<3>drop refused  drop=X reasons=["no DICOM files in this drop"]\n'


def test_journal_stream_is_detected_only_for_our_own_stderr(tmp_path):
    path = tmp_path / "stderr"
    with open(path, "w") as stream:
        info = os.fstat(stream.fileno())
        assert journald.stderr_is_journal({"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"},
                                          stream)
        # inherited from a parent whose stderr went elsewhere: not ours
        assert not journald.stderr_is_journal({"JOURNAL_STREAM": "1:2"}, stream)
        assert not journald.stderr_is_journal({}, stream)
