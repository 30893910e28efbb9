"""Regular expressions written by inbox users (a route's series filters, phi_allow_patient_name),
compiled with RE2 through google-re2, Google's own binding. RE2 matches in time linear in the
text whatever the pattern: `^(a+)+$` over "aaaa…a!" costs microseconds, where Python's
backtracking `re` runs for minutes holding the interpreter lock, which stops every thread of
the daemon, its watchdog pings included.

What RE2 leaves out of Python's syntax: backreferences (\\1, (?P=name)), lookahead and
lookbehind ((?=…), (?!…), (?<=…), (?<!…)), atomic groups, possessive quantifiers, verbose
mode (?x), and \\Z (write \\z or $). A pattern RE2 can't compile is a config error. \\d, \\w
and \\b are ASCII only; (?i) folds case for all of Unicode, as in Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import re2

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # RE2 would print every refused pattern on stderr


class PatternError(ValueError):
    """RE2 can't compile the pattern; the message says why, in a config error's words."""


@dataclass(frozen=True)
class UserPattern:
    """A compiled pattern; equal to another of the same text (so a reload sees no change)."""

    pattern: str
    compiled: Any = field(repr=False, compare=False)

    @classmethod
    def compile(cls, pattern: str) -> UserPattern:
        try:
            return cls(pattern, re2.compile(pattern, _OPTIONS))
        except re2.error as exc:
            raise PatternError(f"{pattern!r} is not a pattern this service accepts "
                               f"({_reason(exc)}): it runs them with RE2, which has no "
                               "backreferences (\\1), lookaround ((?=, (?!, (?<=, (?<!) or "
                               "\\Z (use \\z or $)") from None

    def search(self, text: str) -> bool:
        return self.compiled.search(text) is not None

    def fullmatch(self, text: str) -> bool:
        return self.compiled.fullmatch(text) is not None

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return UserPattern.compile, (self.pattern,)


def _reason(exc: Exception) -> str:
    detail = exc.args[0] if exc.args else ""
    return detail.decode(errors="replace") if isinstance(detail, bytes) else str(detail)
