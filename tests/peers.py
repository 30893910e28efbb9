"""Real DICOM peers for the tests: dcmtk storescp, Orthanc, and an in-process pynetdicom SCP.

Each is a context manager (`with StoreSCP(tmp_path) as scp:`) that listens on a free
port, is ready when `__enter__` returns, and is stopped by its own PID on exit.
External peers run with TCP_NODELAY=1 in their environment: Debian's dcmtk and Orthanc
leave Nagle's algorithm on otherwise, which turns a 0.5 s transfer into 77 s
(/work/shared/perf-notes.md). They also get a parent-death signal, so a test run that is
killed outright does not leave them listening.

Peers can be stopped and started again: ports and directories are chosen once in
`__init__`, so a restarted peer comes back at the same address with the same data
(outage tests).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from pydicom.dataset import Dataset
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    evt,
)
from pynetdicom.sop_class import Verification

HOST = "127.0.0.1"  # tests only ever connect here, whatever the peer listens on
ORTHANC_BINARY = "/usr/sbin/Orthanc"
_LOG_TAIL_CHARS = 4000


class PeerError(RuntimeError):
    """A peer could not be started (the message carries the end of its log)."""


def dcmtk_tool(name: str) -> str | None:
    """dcmtk's `name` (storescp, storescu, ...) on PATH, or None. pynetdicom 3 installs Python
    apps of the same names into the venv's bin/, which comes first in an activated venv and
    takes other options: only a compiled program counts."""
    for folder in os.environ.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(folder or ".", name)
        if not os.access(candidate, os.X_OK) or os.path.isdir(candidate):
            continue
        with contextlib.suppress(OSError), open(candidate, "rb") as head:
            if head.read(4) == b"\x7fELF":
                return candidate
    return None


def free_port() -> int:
    """A TCP port that was free a moment ago (the kernel's pick for 127.0.0.1:0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def port_accepts(port: int, host: str = HOST) -> bool:
    """True if something accepts TCP connections on host:port right now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def pid_exists(pid: int) -> bool:
    """True while a process with this PID exists (zombies included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def descendants(pid: int) -> set[int]:
    """Every process below `pid`, from /proc (children of children included)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier}
        found |= frontier
    return found


def _port_bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
        return True


def _wait_exit(pid: int, timeout: float) -> str:
    """Wait up to timeout for our child to exit, leaving it unreaped.

    Returns "zombie" (exited, PID still held), "reaped" (by someone else) or "running".
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT):
                return "zombie"
        except ChildProcessError:
            return "reaped"
        if time.monotonic() >= deadline:
            return "running"
        time.sleep(0.02)


def _peer_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"  # dcmtk and Orthanc read this; see the module docstring
    return env


def _with_parent_death_signal(argv: list[str]) -> list[str]:
    # setpriv execs the peer, so the PID stays the peer's own. The signal fires when
    # the thread that started the peer exits: start peers from the main thread.
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv else argv


def _tail(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return text[-_LOG_TAIL_CHARS:] or "(empty log)"


class _ExternalPeer:
    """A peer in a child process: start, wait until ready, stop by PID (and its group)."""

    name = "peer"

    def __init__(self, tmp_path: Path, *, start_timeout: float, stop_timeout: float) -> None:
        Path(tmp_path).mkdir(parents=True, exist_ok=True)
        # A directory of its own, so several peers can share one test's tmp_path.
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=tmp_path))
        self.log_path = self.workdir / f"{self.name}.log"
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._ports_fixed = False  # True once started, or when the caller chose the port

    # subclasses fill these in
    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def _ports(self) -> list[int]:
        raise NotImplementedError

    def _choose_new_ports(self) -> None:
        raise NotImplementedError

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise PeerError(f"{self.name} was never started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> Self:
        if self.running:
            return self
        # Another process may take a port between free_port() and the peer's bind;
        # then pick new ports, unless the caller or an earlier start fixed them.
        attempts = 1 if self._ports_fixed else 3
        for attempt in range(attempts):
            try:
                self._start_once()
                break
            except PeerError:
                clash = not all(_port_bindable(port) for port in self._ports())
                if attempt == attempts - 1 or not clash:
                    raise
                self._choose_new_ports()
        self._ports_fixed = True
        return self

    def _start_once(self) -> None:
        argv = self._argv()
        with self.log_path.open("ab") as log:  # the child keeps its own copy of the fd
            log.write(f"--- starting {self.name}: {' '.join(argv)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                _with_parent_death_signal(argv),
                cwd=self.workdir,
                env=_peer_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: stop() reaches forked children
            )
        try:
            self._wait_ready()
        except PeerError:
            self.kill()
            raise

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise PeerError(
                    f"{self.name} exited with code {self._proc.returncode} while starting; "
                    f"log {self.log_path}:\n{_tail(self.log_path)}"
                )
            if self._ready():
                return
            time.sleep(0.05)
        raise PeerError(
            f"{self.name} not ready after {self.start_timeout} s; "
            f"log {self.log_path}:\n{_tail(self.log_path)}"
        )

    def stop(self) -> None:
        """SIGTERM by PID (process group), SIGKILL after stop_timeout; reaps the child."""
        self._signal_and_reap(signal.SIGTERM, self.stop_timeout)

    def kill(self) -> None:
        """SIGKILL at once, like a crash (faults tests); reaps the child."""
        self._signal_and_reap(signal.SIGKILL, self.stop_timeout)

    def _signal_and_reap(self, sig: signal.Signals, timeout: float) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return  # never started, or already reaped
        self._signal_group(proc.pid, sig)
        state = _wait_exit(proc.pid, timeout)
        if state == "running":
            self._signal_group(proc.pid, signal.SIGKILL)
            state = _wait_exit(proc.pid, timeout)
        if state == "zombie":
            # Unreaped, the leader still holds its PID (the group id), so this reaches
            # only what it forked (storescp --fork children), never a reused group.
            self._signal_group(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)

    @staticmethod
    def _signal_group(pid: int, sig: signal.Signals) -> None:
        # The group we created with start_new_session: our peer and its children only.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class StoreSCP(_ExternalPeer):
    """dcmtk `storescp`, writing every received instance under `output_dir`.

    Debian's storescp handles one association at a time unless fork=True. `syntaxes` is
    storescp's transfer syntax option: "+xa" any it knows (the default here), "" its own
    default (uncompressed only), "+xi" Implicit VR Little Endian only.
    """

    name = "storescp"

    def __init__(
        self,
        tmp_path: Path,
        *,
        aet: str = "STORESCP",
        port: int | None = None,
        output_dir: Path | None = None,
        sort_by_study: bool = False,
        unique_filenames: bool = False,
        fork: bool = False,
        syntaxes: str = "+xa",
        extra_args: Sequence[str] = (),
        start_timeout: float = 10.0,
        stop_timeout: float = 5.0,
    ) -> None:
        super().__init__(tmp_path, start_timeout=start_timeout, stop_timeout=stop_timeout)
        self.aet = aet
        self.host = HOST
        self.port = port if port is not None else free_port()
        self._ports_fixed = port is not None
        self.output_dir = Path(output_dir) if output_dir else self.workdir / "received"
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._options = self._storescp_options(sort_by_study, unique_filenames, fork, syntaxes)
        self._options += list(extra_args)

    @staticmethod
    def _storescp_options(sort_by_study: bool, unique: bool, fork: bool,
                          syntaxes: str = "+xa") -> list[str]:
        options = ["-v"]  # one log line per stored file
        if syntaxes:
            options.append(syntaxes)
        if sort_by_study:
            options += ["-su", "study"]  # subfolders study_<StudyInstanceUID>
        if unique:
            options.append("+uf")  # keep re-sent instances instead of overwriting them
        if fork:
            options.append("--fork")
        return options

    def _argv(self) -> list[str]:
        storescp = dcmtk_tool("storescp")
        if storescp is None:
            raise PeerError("storescp not found: install dcmtk")
        return [
            storescp,
            *self._options,
            "-aet",
            self.aet,
            "-od",
            str(self.output_dir),
            str(self.port),
        ]

    def _ready(self) -> bool:
        return port_accepts(self.port)

    def _ports(self) -> list[int]:
        return [self.port]

    def _choose_new_ports(self) -> None:
        self.port = free_port()

    def files(self) -> list[Path]:
        """Received files, sorted by path."""
        return sorted(path for path in self.output_dir.rglob("*") if path.is_file())


class Orthanc(_ExternalPeer):
    """Orthanc (Debian's /usr/sbin/Orthanc) with a throw-away storage and index.

    Orthanc takes 3-5 s to stop on SIGTERM (its HTTP and DICOM servers poll); pass
    graceful_stop=False to have stop() SIGKILL it instead when a test does not care.
    Orthanc ignores a re-sent SOP Instance UID it already has (OverwriteInstances false).
    """

    name = "orthanc"

    def __init__(
        self,
        tmp_path: Path,
        *,
        aet: str = "ORTHANC",
        config: Mapping[str, Any] | None = None,
        graceful_stop: bool = True,
        binary: str = ORTHANC_BINARY,
        start_timeout: float = 30.0,
        stop_timeout: float = 15.0,
    ) -> None:
        super().__init__(tmp_path, start_timeout=start_timeout, stop_timeout=stop_timeout)
        self.aet = aet
        self.host = HOST
        self.port = free_port()  # DICOM
        self.http_port = free_port()
        self.graceful_stop = graceful_stop
        self.binary = binary
        self.config_path = self.workdir / "config.json"
        self._overrides = dict(config or {})
        # No proxy for loopback, whatever http_proxy says on a developer's machine.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    def config(self) -> dict[str, Any]:
        """The configuration Orthanc is started with (written afresh at each start)."""
        config: dict[str, Any] = {
            "Name": f"test-{self.aet}",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.port,
            "DicomAet": self.aet,
            "DicomServerEnabled": True,
            "HttpServerEnabled": True,
            "RemoteAccessAllowed": False,  # HTTP only; DICOM listens on all addresses
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "Plugins": [],  # Debian's default plugin folder is not for tests
            "StableAge": 1,
            "SaveJobs": False,
        }
        config.update(self._overrides)
        return config

    def _argv(self) -> list[str]:
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        return [self.binary, str(self.config_path)]

    def _ready(self) -> bool:
        try:
            self.get("/system")
        except OSError:  # URLError and connection errors
            return False
        return port_accepts(self.port)

    def _ports(self) -> list[int]:
        return [self.port, self.http_port]

    def _choose_new_ports(self) -> None:
        self.port, self.http_port = free_port(), free_port()

    def stop(self) -> None:
        if self.graceful_stop:
            super().stop()
        else:
            self.kill()

    # --- REST (urllib only) --------------------------------------------------------------

    def get(self, path: str) -> Any:
        """GET a REST path (e.g. "/system") and decode its JSON answer."""
        with self._opener.open(self.url + path, timeout=10) as response:
            return json.loads(response.read())

    def post(self, path: str, body: object) -> Any:
        """POST a JSON body to a REST path and decode its JSON answer."""
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with self._opener.open(request, timeout=10) as response:
            return json.loads(response.read())

    def studies(self) -> list[dict[str, Any]]:
        """All studies, expanded: ID, MainDicomTags, PatientMainDicomTags, Series, ..."""
        return list(self.get("/studies?expand"))

    def study_by_uid(self, study_uid: str) -> dict[str, Any] | None:
        """The expanded study with this StudyInstanceUID, or None."""
        query = {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}, "Expand": True}
        found = self.post("/tools/find", query)
        return found[0] if found else None

    def instance_count(self, study_uid: str) -> int:
        """Instances Orthanc holds for the study (0 if it does not know the study)."""
        study = self.study_by_uid(study_uid)
        if study is None:
            return 0
        return int(self.get(f"/studies/{study['ID']}/statistics")["CountInstances"])

    def series_descriptions(self, study_uid: str) -> list[str]:
        """SeriesDescription of each series of the study, by SeriesNumber."""
        study = self.study_by_uid(study_uid)
        if study is None:
            return []
        series = self.get(f"/studies/{study['ID']}/series")
        series.sort(key=lambda s: int(s["MainDicomTags"].get("SeriesNumber") or 0))
        return [s["MainDicomTags"].get("SeriesDescription", "") for s in series]


StatusHook = Callable[[Dataset, int], int]


class InProcessSCP:
    """A pynetdicom storage SCP in this process, for tests that choose the answers.

    Accepts every storage SOP class pynetdicom knows, in every transfer syntax it knows
    (compressed ones too: nothing is decoded but the dataset), plus Verification.
    `status_for(dataset, index)` picks the C-STORE status of the index-th request
    (0-based, in arrival order): e.g. 0xB000 warning, 0xA700 out of resources, 0xC000.
    With `require_called_aet`, associations addressed to another AE title are rejected.
    With `sop_classes`, only those storage SOP classes are accepted (a receiver that refuses
    the others); with `transfer_syntaxes`, only those transfer syntaxes (a fixed list).
    """

    def __init__(
        self,
        tmp_path: Path | None = None,  # unused; taken so every peer is built alike
        *,
        aet: str = "INPROC_SCP",
        require_called_aet: str | None = None,
        status_for: StatusHook | None = None,
        keep_pixel_data: bool = True,
        sop_classes: Sequence[str] | None = None,
        transfer_syntaxes: Sequence[str] | None = None,
    ) -> None:
        self.aet = require_called_aet or aet
        self.host = HOST
        self.port = 0
        self._status_for = status_for
        self._keep_pixel_data = keep_pixel_data
        self._lock = threading.Lock()
        self._received: list[Dataset] = []
        self._statuses: list[int] = []
        self._accepted = 0
        self._rejected = 0
        self._released = 0
        self._ae = self._make_ae(require_called_aet is not None, sop_classes,
                                 list(transfer_syntaxes or ALL_TRANSFER_SYNTAXES))
        self._server: Any = None

    def _make_ae(self, require_called_aet: bool, sop_classes: Sequence[str] | None,
                 syntaxes: list[str]) -> AE:
        ae = AE(ae_title=self.aet)
        ae.require_called_aet = require_called_aet
        for context in AllStoragePresentationContexts:
            if sop_classes is None or context.abstract_syntax in sop_classes:
                ae.add_supported_context(context.abstract_syntax, syntaxes)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        return ae

    def start(self) -> Self:
        if self._server is not None:
            return self
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_connection),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_released),
        ]
        # Port 0 the first time: the kernel picks a free port at bind time, so there is
        # no race; a restart binds the same port again (pynetdicom sets SO_REUSEADDR).
        self._server = self._ae.start_server((HOST, self.port), block=False, evt_handlers=handlers)
        self.port = int(self._server.server_address[1])
        return self

    def stop(self) -> None:
        """Abort open associations and close the listening socket (start() again works)."""
        if self._server is not None:
            self._ae.shutdown()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- what it saw (copies, safe to read while associations run) -----------------------

    @property
    def received(self) -> list[Dataset]:
        """Every dataset of a C-STORE request, in arrival order, with its file_meta."""
        with self._lock:
            return list(self._received)

    @property
    def statuses(self) -> list[int]:
        """The status answered to each request, parallel to `received`."""
        with self._lock:
            return list(self._statuses)

    @property
    def stored(self) -> list[Dataset]:
        """Datasets answered with success (0x0000) or a warning (0xB000-0xB0FF)."""
        with self._lock:
            pairs = zip(self._received, self._statuses, strict=True)
            return [ds for ds, status in pairs if status == 0 or status & 0xFF00 == 0xB000]

    @property
    def accepted_associations(self) -> int:
        return self._accepted

    @property
    def rejected_associations(self) -> int:
        return self._rejected

    @property
    def released_associations(self) -> int:
        """Associations the requestor released (A-RELEASE), not aborted."""
        return self._released

    # --- handlers (run in pynetdicom's association threads) ------------------------------

    @staticmethod
    def _on_connection(event: evt.Event) -> None:
        # pynetdicom never sets TCP_NODELAY; with Nagle on, every C-STORE-RSP waits for
        # a delayed ACK (perf-notes: ~10x slower).
        sock = event.assoc.dul.socket
        if sock is not None and sock.socket is not None:
            sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_accepted(self, event: evt.Event) -> None:
        with self._lock:
            self._accepted += 1

    def _on_rejected(self, event: evt.Event) -> None:
        with self._lock:
            self._rejected += 1

    def _on_released(self, event: evt.Event) -> None:
        with self._lock:
            self._released += 1

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        # One lock for index, hook and append: the index is the position in `received`.
        with self._lock:
            index = len(self._received)
            status = self._status_for(ds, index) if self._status_for else 0x0000
            if not self._keep_pixel_data and "PixelData" in ds:
                del ds.PixelData  # after the hook, which may want to look at it
            self._received.append(ds)
            self._statuses.append(status)
        return status
