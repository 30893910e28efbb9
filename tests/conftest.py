from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.daemon_runner import DaemonProcess
from tests.fake_xnat import FakeXnat
from tests.peers import InProcessSCP, Orthanc, StoreSCP
from tests.receivers import SmtpServer, WebhookReceiver

# their fixtures
pytest_plugins = ["tests.systemd_support", "tests.security_support", "tests.transcode_corpus"]


@pytest.fixture(autouse=True)
def _pynetdicom_warnings_visible(caplog: pytest.LogCaptureFixture) -> None:
    # pynetdicom hides its own warnings by default (perf-notes.md): show them in failures
    caplog.set_level(logging.WARNING, logger="pynetdicom")


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    with StoreSCP(tmp_path) as peer:
        yield peer


@pytest.fixture
def uncompressed_scp(tmp_path: Path) -> Iterator[StoreSCP]:
    """storescp as Debian starts it: without +xa, uncompressed syntaxes only (big endian too)."""
    with StoreSCP(tmp_path, syntaxes="") as peer:
        yield peer


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    with Orthanc(tmp_path) as peer:
        yield peer


@pytest.fixture
def inprocess_scp() -> Callable[..., InProcessSCP]:
    started: list[InProcessSCP] = []

    def start(**options: object) -> InProcessSCP:
        peer = InProcessSCP(**options).start()  # type: ignore[arg-type]
        started.append(peer)
        return peer

    yield start  # type: ignore[misc]
    for peer in started:
        peer.stop()


@pytest.fixture(scope="module")
def shared_xnat() -> Iterator[FakeXnat]:
    """One fake XNAT for a test module; tests take it reset (see their `xnat` fixtures)."""
    with FakeXnat() as server:
        yield server


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[[Path], DaemonProcess]]:
    """Start the daemon on a config; every daemon started is stopped by PID at teardown."""
    started: list[DaemonProcess] = []

    def start(config: Path, inboxes: int = 1) -> DaemonProcess:
        process = DaemonProcess(config, tmp_path / f"daemon-{len(started)}.log")
        started.append(process)
        return process.start(inboxes)

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    """An HTTP receiver of webhook notices on 127.0.0.1 (stop() and start() it again to play
    a receiver that is down)."""
    receiver = WebhookReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture
def smtp() -> Iterator[Callable[..., SmtpServer]]:
    """Start real SMTP servers (aiosmtpd) on 127.0.0.1; each is stopped at teardown."""
    started: list[SmtpServer] = []

    def start(**options: object) -> SmtpServer:
        server = SmtpServer(**options).start()  # type: ignore[arg-type]
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def checksums(root: Path) -> dict[str, str]:
    """sha256 of every regular file below root, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}
