"""Events to the systemd journal as fields, so `journalctl -u xnat-inbox DESTINATION=xnat-scp`
finds them: each event key becomes an upper-case field (`drop` → DROP=, `stage` → STAGE=), the
level becomes PRIORITY=, and a StudyInstanceUID becomes STUDY_UID=.

The handler sits behind logs.py's processors: PHI is masked, the UID hashed and control
characters escaped before anything gets here. A value that still held a newline could not forge
a field: libsystemd's sd_journal_sendv sends such a value in the protocol's binary form
(name, newline, 64-bit length, data); only the stderr fallback splits lines.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, TextIO

IDENTIFIER = "xnat-inbox"
PRIORITIES = {"critical": 2, "error": 3, "exception": 3, "warning": 4, "info": 6, "debug": 7}
#: event keys that are not fields of their own (MESSAGE, PRIORITY and journald say these)
NOT_FIELDS = frozenset({"event", "level", "timestamp", "logger", "exception", "exc_info"})
#: event keys whose field is named differently
RENAMED = {"study": "STUDY_UID"}
#: field names journald or the protocol give a meaning of their own
RESERVED = frozenset({"MESSAGE", "MESSAGE_ID", "PRIORITY", "CODE_FILE", "CODE_LINE", "CODE_FUNC",
                      "ERRNO", "INVOCATION_ID", "USER_INVOCATION_ID", "SYSLOG_FACILITY",
                      "SYSLOG_IDENTIFIER", "SYSLOG_PID", "SYSLOG_TIMESTAMP", "SYSLOG_RAW",
                      "DOCUMENTATION", "TID", "UNIT", "USER_UNIT"})

#: systemd.journal.send(MESSAGE, **fields)
JournalSend = Callable[..., Any]


def systemd_python_send() -> JournalSend | None:
    try:
        from systemd import journal
    except ImportError:
        return None
    return journal.send


def stderr_is_journal(environ: Mapping[str, str] | None = None,
                      stream: TextIO | None = None) -> bool:
    """True when systemd connected our stderr to the journal: $JOURNAL_STREAM names its
    device and inode (a child whose stderr was redirected inherits the variable, not the fd)."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in value.split(":"))
        info = os.fstat((stream or sys.stderr).fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (info.st_dev, info.st_ino) == (device, inode)


def field_name(key: str) -> str:
    name = RENAMED.get(key) or re.sub(r"[^A-Z0-9_]", "_", key.upper()).lstrip("_0123456789")
    name = name[:64] or "FIELD"
    return f"XNAT_{name}"[:64] if name in RESERVED else name


def field_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _says_nothing(value: Any) -> bool:
    """None and empty strings, lists and dicts are left out (0 and False are kept)."""
    return value is None or (isinstance(value, str | list | tuple | dict | set) and not value)


class JournalRenderer:
    """The last step of the journal handler's formatter: returns the MESSAGE (the event and its
    key=value pairs, as `journalctl` shows them) and keeps the fields for the handler, which
    formats and sends in one thread (the formatter only sees a copy of the record)."""

    def __init__(self) -> None:
        self._last = threading.local()

    def take_fields(self) -> dict[str, str]:
        fields, self._last.fields = getattr(self._last, "fields", {}), {}
        return fields

    def __call__(self, _: Any, __: str, event: MutableMapping[str, Any]) -> str:
        record = event.get("_record")
        items = {key: value for key, value in event.items()
                 if not key.startswith("_") and not _says_nothing(value)}
        fields = {"PRIORITY": str(PRIORITIES.get(str(items.get("level")), 6)),
                  "SYSLOG_IDENTIFIER": IDENTIFIER}
        if "logger" in items:
            fields["LOGGER"] = str(items["logger"])
        pairs = []
        for key, value in items.items():
            if key not in NOT_FIELDS:
                fields[field_name(key)] = field_value(value)
                pairs.append(f"{key}={field_value(value)}")
        message = "  ".join([str(items.get("event", "")), " ".join(pairs)]).rstrip()
        if items.get("exception"):
            message += "\n" + str(items["exception"])
        if isinstance(record, logging.LogRecord):
            fields.update(CODE_FILE=record.pathname, CODE_LINE=str(record.lineno),
                          CODE_FUNC=record.funcName)
        self._last.fields = fields
        return message


class JournalHandler(logging.Handler):
    """Sends each record to journald with its fields. Without systemd-python, or when journald
    refuses, it writes `<priority>message` lines to stderr, which journald also reads."""

    def __init__(self, send: JournalSend | None, fallback: TextIO | None = None) -> None:
        super().__init__()
        self.send = send
        self.fallback = fallback or sys.stderr
        #: the last processor of this handler's formatter
        self.renderer = JournalRenderer()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            fields = self.renderer.take_fields()
            code = {key: fields.pop(key) for key in ("CODE_FILE", "CODE_LINE", "CODE_FUNC")
                    if key in fields}
            if self.send is not None:
                try:
                    line = int(code.pop("CODE_LINE", "0"))
                    self.send(message, CODE_LINE=line, **code, **fields)
                    return
                except OSError:
                    pass  # journald is gone (e.g. restarting): don't lose the line
            priority = fields.get("PRIORITY", "6")
            self.fallback.write("".join(f"<{priority}>{line}\n" for line in message.splitlines()))
            self.fallback.flush()
        except Exception:
            self.handleError(record)
