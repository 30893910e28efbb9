"""What the systemd tests share: the notify socket systemd would own, the daemon started as
systemd would start it, a gate that holds a C-STORE until the test lets it go, and logging
restored after a test reconfigured it. Registered as a plugin in conftest.py."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from tests.daemon_runner import REPO, DaemonProcess, dicom_destination, write_config
from tests.test_e2e_cstore import ROUTE, copy_in
from xnat_inbox import logs
from xnat_inbox.commands.synthetic import SeriesSpec, write_session

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




@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level, config = root.handlers[:], root.level, structlog.get_config()
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.configure(**config)
    logs.set_log_phi(False)


