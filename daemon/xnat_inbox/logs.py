"""structlog set-up: small processors that keep PHI out and copy each drop's events to its log."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Literal

import structlog

from . import journald, libwarnings

LogFormat = Literal["console", "json", "journal"]
LOG_LEVEL_ENV = "XNAT_INBOX_LOG_LEVEL"
REDACTED = "[PHI]"
SECRET_MASK = "[secret]"
#: keys whose values are PHI whatever they hold; dropped from events unless log_phi
PHI_KEYS = frozenset({"patient_name", "patient_id", "birth_date", "PatientName", "PatientID",
                      "PatientBirthDate"})

_phi_pattern: ContextVar[re.Pattern[str] | None] = ContextVar("phi_pattern", default=None)
_drop_lines: ContextVar[list[str] | None] = ContextVar("drop_lines", default=None)
_log_phi = False
_secret_values: set[str] = set()
_secrets: re.Pattern[str] | None = None


def get_logger(**bound: Any) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger("xnat_inbox", **bound)


def configure(log_format: LogFormat = "console", log_phi: bool = False,
              stream: Any = None) -> None:
    """Set up structlog (and route pynetdicom's warnings through it) for the whole process.

    `journal`: fields to journald (see journald.py); the default under systemd."""
    global _log_phi
    _log_phi = log_phi
    stream = stream or sys.stderr
    # JSON keeps every key and full UIDs for machines; console lines are for people
    readable: list[Any] = (
        [] if log_format == "json" else [omit_empty, unnamed_own_logger, shorten_uids])
    renderer: Any = (
        structlog.processors.JSONRenderer(sort_keys=False)
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=stream.isatty(), sort_keys=False)
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        add_timestamp,
        # first, so the masks reach exception text
        structlog.processors.ExceptionRenderer(exception_text),
        mask_secrets,
        # before the PHI mask: the drop's own log lies beside the originals, which hold the PHI
        # anyway, and shows labels, paths and UIDs as its report does
        copy_to_drop_log,
        redact_phi,
        escape_controls,
        hash_study_uid,
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler: logging.Handler
    if log_format == "journal":
        journal = journald.JournalHandler(journald.systemd_python_send(), stream)
        handler, final = journal, [journal.renderer]
    else:
        handler = logging.StreamHandler(stream)
        final = [structlog.stdlib.ProcessorFormatter.remove_processors_meta, *readable, renderer]
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=final, foreign_pre_chain=shared))
    handler.addFilter(libwarnings.OncePerMessage())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_level())
    # pynetdicom's own warnings (e.g. an unexpected DIMSE message) must not stay hidden
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("pynetdicom.acse").addFilter(_said_by_the_sender)
    # its connection errors repeat what our own events say, once per retry
    logging.getLogger("pynetdicom.transport").setLevel(logging.CRITICAL)
    logging.getLogger("watchdog.observers.inotify").addFilter(_quiet_watchdog_shutdown)
    libwarnings.install()  # pydicom's warnings about odd files, into the same log


def add_timestamp(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Local time with its offset (2026-12-08T07:00:01.250+01:00): a line read on another
    machine, or after a change of daylight saving time, still says when it happened."""
    event["timestamp"] = datetime.now().astimezone().isoformat(timespec="milliseconds")
    return event


def _level() -> int:
    """INFO, or XNAT_INBOX_LOG_LEVEL (e.g. debug: each poll cycle's duration)."""
    name = os.environ.get(LOG_LEVEL_ENV, "info").upper()
    level = logging.getLevelName(name)
    return level if isinstance(level, int) else logging.INFO


def default_format() -> LogFormat:
    """journal when systemd connected stderr to the journal, else console lines."""
    return "journal" if journald.stderr_is_journal() else "console"


def set_log_phi(log_phi: bool) -> None:
    """A reloaded config's log_phi takes effect for the next event."""
    global _log_phi
    _log_phi = log_phi


def register_secret(value: str) -> None:
    """Mask this value wherever it would appear in an event, a drop log or exception text."""
    global _secrets
    if len(value) < 4:  # masking every "ab" would garble the logs, and hides nothing
        return
    _secret_values.add(value)
    ordered = sorted(_secret_values, key=len, reverse=True)
    _secrets = re.compile("|".join(re.escape(secret) for secret in ordered))


def mask_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    if _secrets is not None:
        for key, value in event.items():
            event[key] = _mask(value, _secrets, SECRET_MASK)
    return event


def _quiet_watchdog_shutdown(record: logging.LogRecord) -> bool:
    # watchdog logs this as an error whenever an observer stops; it means nothing
    return "called when the thread is inactive" not in record.getMessage()


def _said_by_the_sender(record: logging.LogRecord) -> bool:
    # the DICOM sender's own event names what the receiver refused, per file
    return record.getMessage() != "No accepted presentation contexts"


def redact_phi(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Drop PHI keys and mask the current drop's PHI values wherever they appear."""
    if _log_phi:
        return event
    for key in PHI_KEYS & event.keys():
        event[key] = REDACTED
    pattern = _phi_pattern.get()
    if pattern is not None:
        for key, value in event.items():
            event[key] = _mask(value, pattern)
    return event


def _mask(value: Any, pattern: re.Pattern[str], mask: str = REDACTED) -> Any:
    return _each_string(value, lambda text: pattern.sub(mask, text))


def _each_string(value: Any, change: Callable[[str], str]) -> Any:
    """`value` with `change` applied to every string in it, also in lists and dicts."""
    if isinstance(value, str):
        return change(value)
    if isinstance(value, list | tuple):
        return type(value)(_each_string(item, change) for item in value)
    if isinstance(value, dict):
        return {key: _each_string(item, change) for key, item in value.items()}
    return value


# --- names people chose, in line-based output -------------------------------------------------

def printable(text: str) -> str:
    """`text` with every character str.isprintable() rejects written as its Python escape
    (a newline as `\\n`, ESC as `\\x1b`, an undecodable byte of a file name as `\\udcff`): a
    drop named `MR\\nWATCHDOG=trigger` must not add a line to an sd_notify message or a log."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in text)


def escape_controls(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """One event, one line: control characters in values (names of drops and files, reasons
    quoting them) are escaped; a traceback keeps its lines (exception_text escapes its
    messages)."""
    for key, value in event.items():
        if key not in ("exception", "stack"):
            event[key] = _each_string(value, printable)
    return event


ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


def exception_text(exc_info: ExcInfo) -> str:
    """The traceback as Python prints it, but each exception's message escaped: a message that
    quotes a drop's name must not add lines of its own."""
    text = "".join(traceback.format_exception(*exc_info))
    seen: set[int] = set()
    exc: BaseException | None = exc_info[1]
    while exc is not None and id(exc) not in seen:  # the chain Python prints (cause, context)
        seen.add(id(exc))
        message = str(exc)
        if message != printable(message):
            text = text.replace(message, printable(message))
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return text


def hashed_uid(uid: str) -> str:
    """A stable stand-in for a UID: the same study has the same value in every entry."""
    return "sha256:" + hashlib.sha256(uid.encode("utf-8")).hexdigest()[:16]


def hash_study_uid(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A StudyInstanceUID (`study=`) is hashed in every output unless log_phi: it finds a
    study's lines in the service log, not the study itself."""
    if not _log_phi and isinstance(event.get("study"), str):
        event["study"] = hashed_uid(event["study"])
    return event


def phi_variants(values: Iterable[str]) -> set[str]:
    """The forms a PHI value takes in labels and paths: raw, cleaned, name components."""
    variants: set[str] = set()
    for value in values:
        value = value.strip()
        if not value:
            continue
        variants.update({value, re.sub(r"[^A-Za-z0-9_-]", "_", value)})
        variants.update(part for part in re.split(r"[\^ =]+", value) if len(part) >= 3)
    return {variant for variant in variants if len(variant.strip("_")) >= 2}


def phi_pattern(values: Iterable[str]) -> re.Pattern[str] | None:
    variants = sorted(phi_variants(values), key=len, reverse=True)
    if not variants:
        return None
    alternatives = "|".join(re.escape(variant) for variant in variants)
    return re.compile(rf"(?<![A-Za-z0-9])(?:{alternatives})(?![A-Za-z0-9])")


def secrets_masked(value: Any) -> Any:
    """`value` with every registered secret masked in its strings (also in lists and dicts)."""
    return value if _secrets is None else _mask(value, _secrets, SECRET_MASK)


def redact(value: Any, pattern: re.Pattern[str] | None) -> Any:
    """Mask PHI in strings (also nested in lists and dicts) bound for a terminal or the
    service's status, unless the site allows PHI; secrets are masked always."""
    value = secrets_masked(value)
    if _log_phi or pattern is None:
        return value
    return _mask(value, pattern)


@contextlib.contextmanager
def phi_scope(pattern: re.Pattern[str] | None) -> Iterator[None]:
    """While active, events logged from this thread have these PHI values masked."""
    token = _phi_pattern.set(pattern)
    try:
        yield
    finally:
        _phi_pattern.reset(token)


@dataclass(frozen=True)
class DropName:
    """How the service's log names one drop. Its name may be the patient's (`Doe_Jane_MRN4711`)
    and can't be checked before its headers are read: until then a line names the drop by its
    id and inbox, and the name counts as PHI wherever else it appears (a reason, a path, a
    traceback). After, the name is shown with the drop's PHI values masked."""

    id: str
    inbox: str
    shown: str  # where it came from, relative to the inbox (routing folder/name)
    name: str  # its own name, as it arrived
    read: bool = False  # its headers were read: its PHI values are known
    phi: re.Pattern[str] | None = None

    @property
    def masked(self) -> str:
        return redact(self.shown, self.phi)

    def fields(self) -> dict[str, str]:
        if self.read or _log_phi:
            return {"drop": self.masked, "drop_id": self.id, "inbox": self.inbox}
        return {"drop_id": self.id, "inbox": self.inbox}

    def scope(self) -> contextlib.AbstractContextManager[None]:
        """Mask this drop's PHI in what is logged meanwhile, or its name while it is unread."""
        return phi_scope(self.phi) if self.read else unchecked(self.name)


def unchecked(*names: str | None) -> contextlib.AbstractContextManager[None]:
    """Mask names from an inbox that no drop's headers have been checked against yet."""
    return phi_scope(phi_pattern(name for name in names if name))


def copy_to_drop_log(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    lines = _drop_lines.get()
    if lines is not None:
        lines.append(plain_line(event))
    return event


def plain_line(event: MutableMapping[str, Any]) -> str:
    """One line of a drop's own log: time, level, event, then the fields that say something.
    Control characters are escaped here (the daemon's log escapes after masking)."""
    skip = {"timestamp", "level", "event", "logger", "exc_info", "exception", "drop", "inbox"}
    if event.get("logger") not in (None, "xnat_inbox"):  # a library's warning: whose
        event = {**event, "source": event["logger"]}
    fields = " ".join(f"{key}={_each_string(value, printable)}"
                      for key, value in event.items()
                      if key not in skip and not key.startswith("_") and not is_empty(value))
    line = (f"{event.get('timestamp', '')} {event.get('level', 'info'):<7} "
            f"{_each_string(event.get('event', ''), printable)}")
    line = f"{line}  {fields}" if fields else line
    if event.get("exception"):
        line += "\n" + str(event["exception"])
    return line


@contextlib.contextmanager
def drop_log() -> Iterator[list[str]]:
    """Collect the readable lines of every event logged for one drop (its <drop>.log); a
    library's warning is shown once meanwhile."""
    lines: list[str] = []
    token = _drop_lines.set(lines)
    try:
        with libwarnings.once_per_drop():
            yield lines
    finally:
        _drop_lines.reset(token)


# --- console lines: what a person reads ------------------------------------------------------

def is_empty(value: Any) -> bool:
    """None and empty strings, lists and dicts say nothing; 0 and False do."""
    return value is None or (isinstance(value, str | list | tuple | dict | set) and not value)


def omit_empty(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """`error=None problems=[]` says nothing: such fields are left out of the line."""
    keep = {"event", "timestamp", "level"}
    return {key: value for key, value in event.items() if key in keep or not is_empty(value)}


def unnamed_own_logger(_: Any, __: str,
                       event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """`[xnat_inbox]` on every line says nothing; a library's name (`[pydicom]`) stays."""
    if event.get("logger") == "xnat_inbox":
        del event["logger"]
    return event


#: a DICOM UID long enough to be worth shortening: digits in five or more dotted components
_UID = re.compile(r"(?<![\w.])[0-2](?:\.\d+){4,}(?![\w])")
SHORT_UID = 24
DICOM_ROOT = "1.2.840.10008."


def short_uid(uid: str) -> str:
    """`1.2.840.113619.2.55.3.604688119.4711` → `1.2.840…4711`: its root and its last digits,
    enough to tell the studies and instances of one drop apart on a console line. The
    standard's own UIDs (SOP classes, transfer syntaxes) stay whole: a reader looks them up."""
    if len(uid) <= SHORT_UID or uid.startswith(DICOM_ROOT):
        return uid
    parts = uid.split(".")
    return f"{'.'.join(parts[:3])[:12]}…{parts[-1][-6:]}"


def shorten_uids(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Console only: UIDs as `head…tail` (the JSON and journal output keep them whole)."""
    def shorten(text: str) -> str:
        return _UID.sub(lambda match: short_uid(match.group()), text)

    for key, value in event.items():
        if key not in ("timestamp", "exception"):
            event[key] = _each_string(value, shorten)
    return event
