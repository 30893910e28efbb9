"""The daemon as a systemd service: sd_notify (READY, STATUS, WATCHDOG, RELOADING, STOPPING) on a
NOTIFY_SOCKET the test binds, SIGHUP reloads, journald fields, secrets, and the unit file.

systemd is not PID 1 here, so the daemon runs as a subprocess with the environment systemd would
give it; the journal tests run a real systemd-journald in a private mount namespace.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from tests.daemon_runner import DaemonProcess, dicom_destination, wait_for_report, write_config
from tests.peers import pid_exists
from tests.test_e2e_cstore import PHI, ROUTE, copy_in
from xnat_inbox import journald, logs
from xnat_inbox.cli import build_parser
from xnat_inbox.journald import hashed_uid
from xnat_inbox.logs import configure, get_logger, phi_pattern, phi_scope, redact
from xnat_inbox.notify import Notifier, watchdog_interval
from xnat_inbox.secrets import SecretError, read_secret
from xnat_inbox.synthetic import SeriesSpec, write_session

pytestmark = pytest.mark.systemd

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "xnat-inbox.service"
#: the daemon's environment outside systemd: nothing of the test runner's own service leaks in
QUIET = {"WATCHDOG_USEC": "", "WATCHDOG_PID": "", "JOURNAL_STREAM": ""}
Message = list[str]  # one notify datagram: its KEY=value lines


# --- the notify socket systemd would own ----------------------------------------------------

class NotifySocket:
    """An AF_UNIX datagram socket bound where $NOTIFY_SOCKET points; keeps every message."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[Message] = []

    def _receive(self, timeout: float) -> bool:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return False
        self.messages.append(data.decode("utf-8").split("\n"))
        return True

    def wait_for(self, predicate: Callable[[Message], bool], after: int = 0,
                 timeout: float = 60) -> int:
        """The index of the first message from `after` on that matches, waiting for it."""
        deadline = time.monotonic() + timeout
        index = after
        while True:
            while index < len(self.messages):
                if predicate(self.messages[index]):
                    return index
                index += 1
            if not self._receive(deadline - time.monotonic()) and time.monotonic() > deadline:
                raise AssertionError(f"no such notify message; got {self.messages[after:]}")

    def drain(self) -> None:
        while self._receive(0.001):
            pass

    def close(self) -> None:
        self.sock.close()


def has(line: str) -> Callable[[Message], bool]:
    return lambda message: line in message


def status_with(text: str) -> Callable[[Message], bool]:
    return lambda message: any(line.startswith("STATUS=") and text in line for line in message)


def statuses(messages: list[Message]) -> list[str]:
    return [line[7:] for message in messages for line in message if line.startswith("STATUS=")]


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    listener = NotifySocket(tmp_path / "notify.sock")
    yield listener
    listener.close()


@pytest.fixture
def service(tmp_path: Path, notify: NotifySocket) -> Iterator[Callable[..., DaemonProcess]]:
    """Start the daemon as systemd would (NOTIFY_SOCKET set) and wait for READY=1."""
    started: list[DaemonProcess] = []

    def start(config: Path, env: dict[str, str] | None = None, wrapper: tuple[str, ...] = (),
              log_format: str | None = "json", log_path: Path | None = None) -> DaemonProcess:
        process = DaemonProcess(
            config, log_path or tmp_path / f"daemon-{len(started)}.log",
            env={**QUIET, "NOTIFY_SOCKET": str(notify.path), **(env or {})},
            wrapper=wrapper, log_format=log_format)
        started.append(process)
        process.launch()
        try:
            notify.wait_for(has("READY=1"), timeout=30)
        except AssertionError:
            raise AssertionError(f"no READY=1; daemon log:\n{process.text()}") from None
        return process

    yield start
    for process in started:
        process.stop()


class Gate:
    """A C-STORE status hook that holds the `at`-th instance until the test opens the gate."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.opened = threading.Event()

    def __call__(self, _: object, index: int) -> int:
        if index == self.at:
            self.opened.wait(120)
        return 0x0000


@pytest.fixture
def gate() -> Iterator[Callable[[int], Gate]]:
    made: list[Gate] = []

    def make(at: int) -> Gate:
        made.append(Gate(at))
        return made[-1]

    yield make
    for each in made:
        each.opened.set()  # never leave a peer thread waiting


def site(tmp_path: Path, peer: Any, project: str = "Proj", inboxes: int = 1,
         **settings: Any) -> tuple[Path, list[Path]]:
    paths = [tmp_path / f"inbox{i}" for i in range(inboxes)]
    route = {"destination": "scp", **ROUTE, "project": project, "series": None}
    config = write_config(tmp_path, {"scp": dicom_destination(peer, dimse_timeout=120)},
                          [{"path": str(path), "route": route} for path in paths], **settings)
    return config, paths


def drop(tmp_path: Path, inbox: Path, name: str, instances: int = 4) -> Any:
    session = write_session(tmp_path / "src" / name, series=(SeriesSpec("T1", instances),))
    copy_in(tmp_path / "src" / name, inbox)
    return session


def events(process: DaemonProcess, name: str) -> list[dict[str, Any]]:
    return [event for event in process.events() if event.get("event", "").startswith(name)]


# --- sd_notify ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["systemd-python", "fallback"])
def test_ready_after_every_inbox_is_watched_then_watchdog_then_stopping(
        tmp_path, notify, service, inprocess_scp, backend):
    env = {"WATCHDOG_USEC": "200000"}  # WatchdogSec=0.2s: a ping every 0.1 s, i.e. every tick
    if backend == "fallback":
        pytest.importorskip("systemd.daemon")  # else both runs use the fallback anyway
        hidden = tmp_path / "no-systemd-python" / "systemd"
        hidden.mkdir(parents=True)
        (hidden / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hidden.parent),
                                                          os.environ.get("PYTHONPATH")]))
    config, _ = site(tmp_path, inprocess_scp(), inboxes=3)

    process = service(config, env=env)

    # READY=1 is sent after the "watching" line of every inbox was written
    assert len(events(process, "watching")) == 3
    ready = notify.wait_for(has("READY=1"))
    assert notify.messages[ready][1].startswith("STATUS=3 inboxes")
    first = notify.wait_for(has("WATCHDOG=1"), after=ready)
    notify.wait_for(has("WATCHDOG=1"), after=first + 1)
    assert process.stop() == 0
    notify.drain()
    assert "STOPPING=1" in notify.messages[-1]
    assert sum("READY=1" in message for message in notify.messages) == 1
    assert not any("WATCHDOG=trigger" in message for message in notify.messages)


def test_status_follows_a_drop_from_waiting_to_sent(tmp_path, notify, service, inprocess_scp,
                                                     gate):
    held = gate(2)
    config, (inbox,) = site(tmp_path, inprocess_scp(status_for=held))
    service(config)
    start = len(notify.messages)

    drop(tmp_path, inbox, "SLOW")
    waiting = notify.wait_for(status_with("1 waiting"), after=start)
    sending = notify.wait_for(status_with("sending SLOW 2/4"), after=waiting)
    held.opened.set()
    finished = notify.wait_for(status_with("1 done, 0 failed today"), after=sending)

    outcome, report, _ = wait_for_report(inbox, "SLOW")
    assert outcome == "done", report["reasons"]
    line = statuses(notify.messages[finished:finished + 1])[0]
    assert line == "1 inbox · 1 done, 0 failed today"
    # every STATUS differs from the one before: sent on change only
    lines = statuses(notify.messages[start:])
    assert all(a != b for a, b in itertools.pairwise(lines))


def test_status_masks_a_drop_folder_named_after_the_patient(tmp_path, notify, service,
                                                           inprocess_scp, gate):
    held = gate(2)
    config, (inbox,) = site(tmp_path, inprocess_scp(status_for=held))
    service(config)
    start = len(notify.messages)
    drop(tmp_path, inbox, "Doe_Jane_MRI")  # the patient's name, as people name folders
    sending = notify.wait_for(status_with("sending [PHI]_MRI 2/4"), after=start)
    held.opened.set()
    assert wait_for_report(inbox, "Doe_Jane_MRI")[0] == "done"
    shown = statuses(notify.messages[start:])
    assert not any("Doe" in line or "Jane" in line for line in shown), shown
    assert sending > start


def test_a_stuck_worker_stops_the_watchdog_until_it_moves_again(tmp_path, notify, service,
                                                                 inprocess_scp, gate):
    held = gate(1)
    config, (inbox,) = site(tmp_path, inprocess_scp(status_for=held), hung_worker_seconds=1)
    process = service(config, env={"WATCHDOG_USEC": "200000"})
    start = len(notify.messages)

    drop(tmp_path, inbox, "STUCK")
    trigger = notify.wait_for(has("WATCHDOG=trigger"), after=start)
    notify.wait_for(status_with("STUCK STUCK"), after=start)
    stuck = events(process, "worker stuck")
    assert len(stuck) == 1 and stuck[0]["drop"] == "STUCK" and stuck[0]["watchdog"] is True
    held.opened.set()
    notify.wait_for(has("WATCHDOG=1"), after=trigger)  # the worker finished: pings resume
    assert wait_for_report(inbox, "STUCK")[0] == "done"


# --- SIGHUP ---------------------------------------------------------------------------------

def reload(process: DaemonProcess, notify: NotifySocket) -> tuple[int, int]:
    """SIGHUP and wait for RELOADING=1, then READY=1: the indexes of both."""
    start = len(notify.messages)
    assert process.proc is not None
    process.proc.send_signal(1)
    reloading = notify.wait_for(has("RELOADING=1"), after=start)
    assert any(line.startswith("MONOTONIC_USEC=") for line in notify.messages[reloading])
    return reloading, notify.wait_for(has("READY=1"), after=reloading)


def test_refused_reload_keeps_the_old_config(tmp_path, notify, service, inprocess_scp):
    config, (inbox,) = site(tmp_path, inprocess_scp())
    process = service(config)
    good = config.read_text()
    config.write_text(good.replace("settle_seconds: 0.5", "settle_seconds: soon"))

    _, ready = reload(process, notify)

    refused = events(process, "config reload refused")
    assert len(refused) == 1
    assert re.search(r"config\.yaml:\d+: settle_seconds", refused[0]["reason"]), refused[0]
    assert "reload refused" in statuses(notify.messages[ready:ready + 1])[0]
    drop(tmp_path, inbox, "AFTER_REFUSAL")
    outcome, report, _ = wait_for_report(inbox, "AFTER_REFUSAL", daemon=process)
    assert outcome == "done", report["reasons"]
    assert report["studies"][0]["labels"]["project"] == "Proj"
    # the next good reload clears the note
    config.write_text(good)
    _, ready = reload(process, notify)
    assert "refused" not in statuses(notify.messages[ready:ready + 1])[0]


def test_reload_lets_drops_in_flight_finish_and_applies_to_new_ones(
        tmp_path, notify, service, inprocess_scp, gate):
    held = gate(1)
    scp = inprocess_scp(status_for=held)
    config, (inbox,) = site(tmp_path, scp)
    process = service(config)
    drop(tmp_path, inbox, "IN_FLIGHT")
    notify.wait_for(status_with("sending IN_FLIGHT 1/4"))
    site(tmp_path, scp, project="Proj2", inboxes=2)  # a new project label and a second inbox

    reload(process, notify)
    held.opened.set()

    outcome, report, _ = wait_for_report(inbox, "IN_FLIGHT", daemon=process)
    assert outcome == "done", report["reasons"]
    assert report["studies"][0]["labels"]["project"] == "Proj"  # the config it started with
    assert report["studies"][0]["stored"] == 4
    assert len(events(process, "config reloaded")) == 1
    assert [e["inbox"] for e in events(process, "watching")] == [
        str(inbox), str(inbox), str(tmp_path / "inbox1")]  # the changed one is watched anew
    for path, name in ((inbox, "NEXT"), (tmp_path / "inbox1", "SECOND")):
        drop(tmp_path, path, name)
        outcome, report, _ = wait_for_report(path, name, daemon=process)
        assert outcome == "done", report["reasons"]
        assert report["studies"][0]["labels"]["project"] == "Proj2"


# --- notify protocol details (in process) ---------------------------------------------------

def test_fallback_speaks_the_protocol_to_path_and_abstract_sockets(tmp_path):
    abstract = f"xnat-inbox-test-{os.getpid()}"
    for address, bind_to in ((str(tmp_path / "n.sock"), str(tmp_path / "n.sock")),
                             (f"@{abstract}", f"\0{abstract}")):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
            listener.bind(bind_to)
            notifier = Notifier.from_environment({"NOTIFY_SOCKET": address})
            notifier.ready("1 inbox")
            notifier.status("1 inbox")  # unchanged: not sent again
            notifier.status("1 inbox · 1 waiting")
            listener.settimeout(5)
            assert listener.recv(4096) == b"READY=1\nSTATUS=1 inbox"
            assert listener.recv(4096) == b"STATUS=1 inbox \xc2\xb7 1 waiting"


def test_watchdog_interval_follows_sd_watchdog_enabled_rules():
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) \
        == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({}) is None
    assert Notifier.from_environment({}).active is False  # outside systemd: nothing is sent


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


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level, config = root.handlers[:], root.level, structlog.get_config()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.configure(**config)
    logs.set_log_phi(False)


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


# --- secrets --------------------------------------------------------------------------------

def shown(secret: object) -> list[str]:
    """Every ordinary way a value gets printed."""
    return [repr(secret), str(secret), f"{secret}", "{}".format(secret),  # noqa: UP032
            json.dumps({"password": secret}, default=str), repr([secret])]


def test_secret_from_systemd_credentials_is_never_shown(tmp_path):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "xnat-password").write_text("s3cret-from-systemd\n")
    secret = read_secret("xnat-password", environ={"CREDENTIALS_DIRECTORY": str(credentials)})
    assert secret.reveal() == "s3cret-from-systemd"
    for text in shown(secret):
        assert "s3cret" not in text
    with pytest.raises(TypeError):
        pickle.dumps(secret)


def test_secret_file_readable_by_others_is_used_with_a_warning(tmp_path):
    path = tmp_path / "xnat.secret"
    path.write_text("tok-readable-1234\n")
    path.chmod(0o644)
    with capture_logs() as events:
        assert read_secret(str(path), environ={}).reveal() == "tok-readable-1234"
    assert [(e["event"], e["path"], e["mode"]) for e in events] == [
        ("secret file is readable by other users; make it private", str(path), "0644")]
    assert events[0]["fix"] == f"chmod 600 {path}"
    path.chmod(0o600)
    with capture_logs() as events:
        read_secret(str(path), environ={})
    assert events == []


def test_secret_from_netrc_for_a_host(tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine other.example.org login x password y\n"
                     "machine xnat.example.org login uploader password n3trc-pass-word\n")
    netrc.chmod(0o600)
    secret = read_secret(None, host="xnat.example.org", netrc_file=netrc, environ={})
    assert (secret.reveal(), secret.login) == ("n3trc-pass-word", "uploader")
    # a credential that isn't there falls back to the netrc entry
    assert read_secret("xnat-password", host="xnat.example.org", netrc_file=netrc,
                       environ={}).reveal() == "n3trc-pass-word"
    with pytest.raises(SecretError, match=r"machine nowhere\.example\.org"):
        read_secret(None, host="nowhere.example.org", netrc_file=netrc, environ={})
    netrc.write_text("machine xnat.example.org login uploader p4ss-in-broken-file\n")
    with pytest.raises(SecretError) as broken:
        read_secret(None, host="xnat.example.org", netrc_file=netrc, environ={})
    assert "p4ss" not in str(broken.value) and broken.value.__cause__ is None


def test_missing_secret_says_where_it_looked(tmp_path):
    with pytest.raises(SecretError, match="LoadCredential=xnat-password:"):
        read_secret("xnat-password", environ={})
    with pytest.raises(SecretError, match=r"cannot read the secret file .*missing"):
        read_secret(str(tmp_path / "missing"), environ={})


def test_secret_values_are_masked_in_logs_exceptions_and_reports(tmp_path, restore_logging):
    path = tmp_path / "token"
    path.write_text("tok-should-never-show-9f2c")
    path.chmod(0o600)
    stream = io.StringIO()
    configure("json", stream=stream)
    secret = read_secret(str(path), environ={})
    try:
        raise ConnectionError(f"401 for https://uploader:{secret.reveal()}@xnat.example.org")
    except ConnectionError:
        get_logger().exception("upload failed", detail=f"token={secret.reveal()}")
    output = stream.getvalue()
    assert "tok-should-never-show" not in output
    assert "token=[secret]" in output and "uploader:[secret]@" in output
    assert redact({"reasons": [f"refused {secret.reveal()}"]}, None) == {
        "reasons": ["refused [secret]"]}


def test_no_command_line_option_takes_a_secret():
    parser = build_parser()
    parsers = [parser, *next(a for a in parser._actions if a.dest == "command").choices.values()]
    options = [o for p in parsers for a in p._actions for o in a.option_strings]
    assert not [o for o in options if re.search(r"pass|token|secret|cred", o)]


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


def test_daemon_delivers_under_the_units_restrictions(open_dir, inprocess_scp):
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
    for folder in (inbox, state):
        folder.mkdir(exist_ok=True)
        os.chown(folder, user, user)
    listener = NotifySocket(open_dir / "notify.sock")
    (open_dir / "notify.sock").chmod(0o777)  # as systemd's own notify socket
    wrapper = ["unshare", "--mount", "--propagation", "private", "sh", "-c", RESTRICT, "restrict"]
    env = {**QUIET, "NOTIFY_SOCKET": str(listener.path), "RW": f"{inbox} {state}",
           "AS": str(user)}

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
