"""Libraries' warnings in our own log: pydicom and pynetdicom warn through `warnings.warn` and
through their loggers, pydicom often both for one odd value, and once per file. Each message is
shown once per drop (outside a drop, e.g. from pynetdicom's association threads, once an hour),
named by the library's module rather than by a file path inside the virtual environment.

Scan workers are separate processes: there the warnings are collected while a drop is read and
handed back with the scan (`collected`); the daemon logs them (`replay`) in the drop's scope
once its PHI values are known, so they are masked and copied to the drop's log like its other
lines."""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from pathlib import PurePath

#: the libraries whose warnings are shown each time (not once per process, as Python's default
#: does), so that every drop's log names the odd values of its own files
LIBRARIES = ("pydicom", "pynetdicom")
_LIBRARY_MODULES = r"(pydicom|pynetdicom)(\..*)?$"
#: outside a drop, a message is shown again after this long: a daemon runs for months
REPEAT_SECONDS = 3600.0
#: messages remembered outside a drop before the memory starts afresh
REMEMBERED = 1000
#: distinct warnings a scan worker hands back for one drop
COLLECTED = 100

#: (library module, message)
LibraryWarning = tuple[str, str]

_seen: ContextVar[set[str] | None] = ContextVar("library_warnings_seen", default=None)
_seen_outside: dict[str, float] = {}  # message: when it was last shown


def install() -> None:
    """Route `warnings.warn` into logging, without file paths, each library warning shown."""
    warnings.showwarning = show_warning
    warnings.filterwarnings("always", module=_LIBRARY_MODULES)


def show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: object = None, line: str | None = None) -> None:
    """warnings.showwarning: one record of the module's logger, the message without the path
    and the source line Python's own format adds."""
    logging.getLogger(module_of(filename)).warning(_text(message, category))


def _text(message: Warning | str, category: type[Warning]) -> str:
    text = str(message)
    return text if category is UserWarning else f"{category.__name__}: {text}"


def module_of(filename: str) -> str:
    """`…/site-packages/pydicom/valuerep.py` → `pydicom.valuerep`; else the file's stem."""
    path = PurePath(filename).with_suffix("")
    for marker in ("site-packages", "dist-packages"):
        if marker in path.parts:
            return ".".join(path.parts[len(path.parts) - path.parts[::-1].index(marker):])
    return path.name


class OncePerMessage(logging.Filter):
    """On the daemon's log handler: another library's warning passes the first time its message
    is seen in this drop (outside drops: once an hour); our own events and other levels always
    pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING or record.name.split(".")[0] == "xnat_inbox":
            return True
        return first_time(record.getMessage())


def first_time(text: str) -> bool:
    seen = _seen.get()
    if seen is None:
        now = time.monotonic()
        shown = _seen_outside.get(text)
        if shown is not None and now - shown < REPEAT_SECONDS:
            return False
        if len(_seen_outside) >= REMEMBERED:
            _seen_outside.clear()
        _seen_outside[text] = now
        return True
    if text in seen:
        return False
    seen.add(text)
    return True


@contextlib.contextmanager
def once_per_drop() -> Iterator[None]:
    """While active (one drop's attempt, in this thread), each message is shown once."""
    token = _seen.set(set())
    try:
        yield
    finally:
        _seen.reset(token)


class _Collector(logging.Handler):
    def __init__(self, found: dict[str, str]) -> None:
        super().__init__(logging.WARNING)
        self.found = found

    def emit(self, record: logging.LogRecord) -> None:
        _collect(self.found, record.name, record.getMessage())


def _collect(found: dict[str, str], module: str, text: str) -> None:
    if len(found) < COLLECTED:
        found.setdefault(text, module)


@contextlib.contextmanager
def collected() -> Iterator[list[LibraryWarning]]:
    """In a scan worker (one thread reads): the libraries' warnings meanwhile, each message once,
    in the list yielded (filled when the block ends), instead of raw lines on stderr."""
    found: dict[str, str] = {}
    result: list[LibraryWarning] = []
    handler = _Collector(found)
    loggers = [logging.getLogger(name) for name in LIBRARIES]
    propagate = [logger.propagate for logger in loggers]

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: object = None, line: str | None = None) -> None:
        _collect(found, module_of(filename), _text(message, category))

    with warnings.catch_warnings():
        warnings.showwarning = show
        warnings.filterwarnings("always", module=_LIBRARY_MODULES)
        for logger in loggers:
            logger.addHandler(handler)
            logger.propagate = False
        try:
            yield result
        finally:
            for logger, before in zip(loggers, propagate, strict=True):
                logger.removeHandler(handler)
                logger.propagate = before
            result.extend((module, text) for text, module in found.items())


def replay(found: Iterable[LibraryWarning]) -> None:
    """Log the warnings a scan worker handed back, here, in the drop's scope."""
    for module, text in found:
        logging.getLogger(module).warning(text)
