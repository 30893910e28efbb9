"""sd_notify: the messages systemd reads from a Type=notify service on $NOTIFY_SOCKET.

systemd-python (the `[systemd]` extra) sends them through libsystemd; without it a small
fallback speaks the protocol itself: one datagram of newline-separated `KEY=value` lines to
the AF_UNIX socket named in $NOTIFY_SOCKET (a path, or `@name` in the abstract namespace).
Outside systemd (no $NOTIFY_SOCKET) every call does nothing.

Every line is escaped (logs.printable) as the message is put together: a STATUS that names a
drop called `MR\\nWATCHDOG=trigger` must stay one line, not become a second command.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping

from ..logs import printable

#: sends one notify message (newline-separated KEY=value lines); False when it was not sent
Send = Callable[[str], bool]


def systemd_python_send() -> Send | None:
    """libsystemd's sd_notify through systemd-python, when the extra is installed."""
    try:
        from systemd import daemon
    except ImportError:
        return None
    return lambda message: bool(daemon.notify(message))


def socket_send(address: str) -> Send:
    """The fallback: write the datagram to the socket ourselves."""
    target = "\0" + address[1:] if address.startswith("@") else address
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def send(message: str) -> bool:
        try:
            sock.sendto(message.encode("utf-8"), target)
        except OSError:  # systemd went away, or the socket is full: nothing to do about it
            return False
        return True

    return send


def watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of WatchdogSec=, as systemd advises; None when
    the watchdog is off or meant for another process (the sd_watchdog_enabled rules)."""
    try:
        usec = int(environ.get("WATCHDOG_USEC") or 0)
        pid = int(environ.get("WATCHDOG_PID") or 0)
    except ValueError:
        return None
    if usec <= 0 or (pid and pid != os.getpid()):
        return None
    return usec / 2e6


class Notifier:
    """What the daemon tells systemd; every method is a no-op outside systemd."""

    def __init__(self, send: Send | None, watchdog_every: float | None = None) -> None:
        self._send = send
        self.watchdog_every = watchdog_every if send else None
        self._status: str | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET")
        if not address:
            return cls(None)
        # libsystemd reads os.environ itself: a mapping given here gets the fallback
        send = systemd_python_send() if environ is os.environ else None
        return cls(send or socket_send(address), watchdog_interval(environ))

    @property
    def active(self) -> bool:
        return self._send is not None

    def send(self, *lines: str) -> bool:
        if self._send is None or not lines:
            return False
        return self._send("\n".join(printable(line) for line in lines))

    def ready(self, status: str) -> None:
        """READY=1 (at start-up, and after a reload) with the current STATUS."""
        self._status = status
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd ≥ 253 match the READY=1 that ends this reload
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the config")

    def stopping(self, status: str = "stopping: letting drops in flight finish") -> None:
        self._status = status
        self.send("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        """STATUS=, sent only when it changed."""
        if status != self._status:
            self._status = status
            self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def watchdog_trigger(self) -> None:
        """Ask systemd to act as if the watchdog had expired (a worker is stuck)."""
        self.send("WATCHDOG=trigger")
