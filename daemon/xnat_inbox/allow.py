"""Per-inbox limits (`allow:` in the site config): what a route.yaml in that inbox may ask for.

Inbox users write route.yaml files, but the site decides what they may reach: which
destinations, which XNAT projects, how much of an existing session a send may change, and how
little de-identification and PHI guarding it may have. A route asking more is refused.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator
from pydicom.datadict import keyword_dict

from .templates import Template, label_problem

#: each list runs from the least to the most: a limit allows its own level and those before it
OVERWRITE_LEVELS = ("none", "append", "delete")
DEIDENTIFY_LEVELS = ("off", "basic")
PHI_GUARD_LEVELS = ("off", "warn", "reject")
#: what a project pattern may hold: label characters and the glob's * ? [ ] !
PROJECT_PATTERN = re.compile(r"^[A-Za-z0-9_\-*?\[\]!]+$")


def exceeds(asked: str, limit: str, levels: tuple[str, ...]) -> bool:
    """True when `asked` lies past `limit` in `levels` (a ceiling)."""
    return levels.index(asked) > levels.index(limit)


def below(asked: str, floor: str, levels: tuple[str, ...]) -> bool:
    """True when `asked` lies before `floor` in `levels`."""
    return levels.index(asked) < levels.index(floor)


class InboxAllow(BaseModel):
    """`inboxes[N].allow`: the most a route.yaml (and the inbox's own inline route) may ask."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: destination names; None: every destination the site config defines
    destinations: list[str] | None = Field(None, min_length=1)
    #: glob patterns (* ? [..]) the whole project label must match, case-sensitive
    projects: list[str] = Field(["*"], min_length=1)
    #: the most an XNAT send may change of a session that exists: none < append < delete
    overwrite: Literal["none", "append", "delete"] = "append"
    #: the least de-identification: basic means a route can't turn it off
    deidentify_floor: Literal["off", "basic"] = "off"
    #: the least PHI guarding: off < warn < reject
    phi_guard_floor: Literal["off", "warn", "reject"] = "off"
    #: keywords (or "private", "PatientName") a route may let through the PHI guard;
    #: None: any while phi_guard_floor is off, none once a floor is set
    phi_allow: list[str] | None = None
    #: names of the site config's notify targets a route may use; None: every named one
    notify_targets: list[str] | None = None
    #: glob patterns (case-insensitive) every address a route adds with notify `to:` must
    #: match; None: the domain of the target's sender (`*@its-domain`)
    notify_to: list[str] | None = None

    _project_matchers: tuple[re.Pattern[str], ...] = PrivateAttr(())

    def model_post_init(self, context: Any, /) -> None:
        self._project_matchers = tuple(re.compile(fnmatch.translate(pattern))
                                       for pattern in self.projects)

    @field_validator("deidentify_floor", "phi_guard_floor", mode="before")
    @classmethod
    def _unquoted_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false

    @field_validator("destinations")
    @classmethod
    def _known_destinations(cls, value: list[str] | None,
                            info: ValidationInfo) -> list[str] | None:
        known = (info.context or {}).get("destinations")
        unknown = [name for name in value or [] if known is not None and name not in known]
        if unknown:
            names = ", ".join(sorted(known)) or "none are configured"
            raise ValueError(f"unknown destination(s) {', '.join(map(repr, unknown))}; the site "
                             f"config defines: {names}")
        return value

    @field_validator("notify_targets")
    @classmethod
    def _known_targets(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        known = (info.context or {}).get("notice_targets")
        unknown = [name for name in value or [] if known is not None and name not in known]
        if unknown:
            names = ", ".join(sorted(known)) or "none are named"
            raise ValueError(f"unknown notify target(s) {', '.join(map(repr, unknown))}; the "
                             f"site config's notify: list names: {names}")
        return value

    @field_validator("projects")
    @classmethod
    def _label_patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            if not PROJECT_PATTERN.match(pattern):
                raise ValueError(
                    f"project pattern {pattern!r} can never match a project label: use label "
                    "characters (A-Z a-z 0-9 - _) and the glob's * ? [...], e.g. LabA_*")
        return value

    @field_validator("phi_allow")
    @classmethod
    def _known_keywords(cls, value: list[str] | None) -> list[str] | None:
        return known_phi_allow(value)

    def allows_destination(self, name: str) -> bool:
        return self.destinations is None or name in self.destinations

    def allows_project(self, label: str) -> bool:
        return any(matcher.match(label) for matcher in self._project_matchers)

    def allowed_phi(self) -> frozenset[str] | None:
        """What a route may let through the guard; None: anything."""
        if self.phi_allow is not None:
            return frozenset(self.phi_allow)
        return None if self.phi_guard_floor == "off" else frozenset()

    def describe(self) -> str:
        """One line for `explain`."""
        destinations = ", ".join(self.destinations) if self.destinations else "any configured"
        allowed = self.allowed_phi()
        phi_allow = "any" if allowed is None else (", ".join(sorted(allowed)) or "none")
        return (f"destinations {destinations}; projects {' '.join(self.projects)}; "
                f"overwrite up to {self.overwrite}; deidentify at least "
                f"{self.deidentify_floor}; phi_guard at least {self.phi_guard_floor}; "
                f"phi_allow {phi_allow}")


@dataclass(frozen=True)
class Breach:
    """One key of a route asking past its inbox's limit."""

    key: str  # the route's key
    asked: str
    limit_key: str  # the key under allow:
    limit: str
    fix: str  # what the route's author can do instead

    def message(self, source: str, where: str) -> str:
        """`source`: the route.yaml (or the inline route) that asked; `where`: the inbox's
        place in the site config, e.g. "/etc/xnat-inbox/config.yaml inboxes[1]"."""
        return (f"{source}: {self.key}: {self.asked} is not allowed in this inbox "
                f"(allow.{self.limit_key}: {self.limit}); {self.fix}, or ask the site admin "
                f"to allow it in {where}.allow.{self.limit_key}")


def breaches(asked: Mapping[str, Any], allow: InboxAllow) -> list[Breach]:
    """What in `asked` (a route's keys that are set) goes past `allow`. A project template
    with fields is checked per study, once rendered (see project_breach)."""
    found: list[Breach] = []
    destination = asked.get("destination")
    if destination is not None and not allow.allows_destination(destination):
        found.append(Breach("destination", destination, "destinations",
                            ", ".join(allow.destinations or ()), "use one of those"))
    project = asked.get("project")
    if isinstance(project, Template) and not project.fields and not label_problem(project.text):
        found += [b for b in [project_breach(project.text, allow)] if b]
    overwrite = asked.get("overwrite")
    if overwrite is not None and exceeds(overwrite, allow.overwrite, OVERWRITE_LEVELS):
        found.append(Breach("overwrite", overwrite, "overwrite", allow.overwrite,
                            f"use overwrite: {allow.overwrite} or less (none < append < delete)"))
    deidentify = asked.get("deidentify")
    if deidentify is not None and below(deidentify, allow.deidentify_floor, DEIDENTIFY_LEVELS):
        found.append(Breach("deidentify", deidentify, "deidentify_floor",
                            allow.deidentify_floor, f"set deidentify: {allow.deidentify_floor} "
                            "or leave the key out"))
    phi_guard = asked.get("phi_guard")
    if phi_guard is not None and below(phi_guard, allow.phi_guard_floor, PHI_GUARD_LEVELS):
        found.append(Breach("phi_guard", phi_guard, "phi_guard_floor", allow.phi_guard_floor,
                            f"set phi_guard: {allow.phi_guard_floor} (off < warn < reject) or "
                            "leave the key out"))
    found += _phi_allow_breaches(asked, allow)
    return found


def project_breach(label: str, allow: InboxAllow) -> Breach | None:
    if allow.allows_project(label):
        return None
    return Breach("project", label, "projects", " ".join(allow.projects),
                  "send to a project matching one of those")


def _phi_allow_breaches(asked: Mapping[str, Any], allow: InboxAllow) -> list[Breach]:
    allowed = allow.allowed_phi()
    if allowed is None:
        return []
    shown = ", ".join(sorted(allowed)) or "none"
    found = []
    extra = [keyword for keyword in asked.get("phi_allow") or [] if keyword not in allowed]
    if extra:
        found.append(Breach("phi_allow", ", ".join(extra), "phi_allow", shown,
                            "let fewer attributes through"))
    pattern = asked.get("phi_allow_patient_name")
    if pattern is not None and "PatientName" not in allowed:
        found.append(Breach("phi_allow_patient_name", repr(pattern.pattern), "phi_allow", shown,
                            "remove the key"))
    return found


__all__ = ["DEIDENTIFY_LEVELS", "OVERWRITE_LEVELS", "PHI_GUARD_LEVELS", "Breach", "InboxAllow",
           "below", "breaches", "exceeds", "project_breach"]


def known_phi_allow(value: list[str] | None) -> list[str] | None:
    """A `phi_allow` list (in a route or an inbox's limits): DICOM keywords, or `private`."""
    unknown = [k for k in value or [] if k != "private" and k not in keyword_dict]
    if unknown:
        raise ValueError(f"not DICOM keywords: {', '.join(unknown)} (e.g. InstitutionName, "
                         "PatientName, or private for private tags)")
    return value
