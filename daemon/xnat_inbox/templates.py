"""Label templates such as "{PatientID}_{StudyDate}": parsed once, rendered by substitution only.

The renderer never calls str.format, so a template can't reach attributes or items of Python
objects ("{x.__class__}" is refused when the template loads, not when a study arrives).
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass

from pydicom.datadict import keyword_dict

#: names a template may use besides DICOM keywords
PATH_FIELDS = frozenset({"folder", "parent"})
LABEL_RULE = re.compile(r"^[A-Za-z0-9_-]+$")
NOT_LABEL_CHARS = re.compile(r"[^A-Za-z0-9_-]")
#: XNAT stores labels in VARCHAR(255); the routing string has to fit LO (64 characters)
MAX_LABEL_LENGTH = 64


class TemplateError(ValueError):
    """The template text is not a valid label template."""


@dataclass(frozen=True)
class Template:
    text: str
    parts: tuple[tuple[str, str | None], ...]  # (literal, field name or None)

    @classmethod
    def parse(cls, text: str) -> Template:
        parts: list[tuple[str, str | None]] = []
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise TemplateError(f"cannot parse template {text!r}: {exc}") from None
        for literal, field, spec, conversion in parsed:
            if field is not None:
                _check_field(text, field, spec, conversion)
            parts.append((literal, field or None))
        return cls(text, tuple(parts))

    @property
    def fields(self) -> frozenset[str]:
        return frozenset(field for _, field in self.parts if field)

    def render(self, values: Mapping[str, str]) -> str:
        return "".join(literal + (values.get(field, "") if field else "")
                       for literal, field in self.parts)


def _check_field(text: str, field: str, spec: str | None, conversion: str | None) -> None:
    if field == "":
        raise TemplateError(f"template {text!r} has an empty {{}}; name a DICOM keyword")
    if conversion or spec:
        raise TemplateError(
            f"template {text!r}: {{{field}}} may not carry a conversion or format; "
            "write the keyword alone, e.g. {PatientID}"
        )
    if field not in PATH_FIELDS and field not in keyword_dict:
        raise TemplateError(
            f"template {text!r}: {field!r} is not a DICOM keyword nor one of "
            f"{', '.join(sorted(PATH_FIELDS))} (keywords are case-sensitive, e.g. PatientID)"
        )


def clean_label(value: str) -> str:
    """XNAT's own replacement for DICOM-derived labels: other characters become '_'."""
    return NOT_LABEL_CHARS.sub("_", value)


def label_problem(value: str) -> str | None:
    """Why XNAT would reject `value` as a label, or None when it is fine."""
    if not value:
        return "renders empty"
    if len(value) > MAX_LABEL_LENGTH:
        return f"is {len(value)} characters long (at most {MAX_LABEL_LENGTH})"
    bad = sorted(set(NOT_LABEL_CHARS.findall(value)))
    if bad:
        shown = " ".join(repr(char) for char in bad)
        return f"contains characters XNAT rejects ({shown}); only A-Z a-z 0-9 - _ are allowed"
    return None
