"""Step 5, route: the nearest route.yaml files above a drop give each study its destination,
labels and series filter; labels are checked against XNAT's rule before anything is sent."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from pydicom.dataset import Dataset

from ..allow import DEIDENTIFY_LEVELS, PHI_GUARD_LEVELS, InboxAllow, below, breaches, project_breach
from ..config import (
    LABEL_KEYS,
    ROUTE_FILE,
    ROUTE_MAX_BYTES,
    ConfigError,
    RouteTemplate,
    SeriesFilter,
    load_route,
)
from ..fsops import TrustedPath, UnsafePath, held
from ..intake.claim import ClaimedDrop
from ..notifyconfig import route_notice_problems
from ..reading.dataset import read_dataset, text_value
from ..reading.scan import Instance, Series, Study
from ..templates import MAX_LABEL_LENGTH, PATH_FIELDS, Template, clean_label, label_problem
from ..yamlfile import read_limited

#: the routing string has to fit Study Description, a LO element
MAX_ROUTING_STRING = 64
#: what a route that leaves these keys out means
ROUTE_DEFAULTS = {"clean_labels": False, "routing_field": "study_description",
                  "ignore_unparsable": True, "deidentify": "off", "label_source": "original",
                  "phi_guard": "warn"}
INLINE_ROUTE = "inline route in the site config"


class RouteError(Exception):
    """No usable route for the drop: the whole drop fails with this reason (one line: logs and
    the drop's .log are line-based)."""


def one_line(message: str) -> str:
    """A config error's lines (one per problem) joined by `; `."""
    return "; ".join(line.strip().rstrip(".") for line in message.splitlines() if line.strip())


@dataclass(frozen=True)
class Route:
    template: RouteTemplate
    sources: tuple[str, ...]  # the route.yaml files (or "inline") it was merged from
    origins: Mapping[str, str] = field(default_factory=dict)  # key -> the source that set it

    @property
    def destination(self) -> str:
        return self.template.destination or ""


@dataclass(frozen=True)
class Labels:
    project: str
    subject: str
    session: str


@dataclass
class RoutedStudy:
    study: Study
    destination: str
    labels: Labels | None
    routing_keyword: str
    routing_value: str
    included: list[Series] = field(default_factory=list)
    excluded: list[tuple[Series, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    template: RouteTemplate = field(default_factory=RouteTemplate)  # the merged route's keys
    # set by deidentify.py: applied to each outgoing copy before the routing string is written
    transform: Callable[[Dataset], None] | None = None
    uid_map: Callable[[str], str] | None = None  # original UID -> the UID sent
    phi_findings: list[str] = field(default_factory=list)  # attribute names, never values
    origins: Mapping[str, str] = field(default_factory=dict)  # the route's, for messages

    @property
    def instances(self) -> list[Instance]:
        return [instance for series in self.included for instance in series.instances]


def resolve_route(drop: ClaimedDrop, destinations: set[str]) -> Route:
    """Merge the inbox's inline route and every route.yaml from the inbox down to the drop."""
    merged = drop.inbox.route or RouteTemplate()
    sources = [INLINE_ROUTE] if drop.inbox.route else []
    origins = dict.fromkeys(merged.keys_set(), INLINE_ROUTE)
    notices = _notice_problems(drop, merged, INLINE_ROUTE)
    for folder in _folders_down_to(drop.inbox.path, drop.origin):
        path = folder / ROUTE_FILE
        try:
            template = _read_route(drop.inbox.path, path, destinations)
        except ConfigError as exc:
            raise RouteError(f"{one_line(str(exc))}; fix the route file, then run "
                             "`xnat-inbox retry`") from None
        if template is None:
            continue
        merged = template.merged_over(merged)
        sources.append(str(path))
        notices += _notice_problems(drop, template, str(path))
        origins.update(dict.fromkeys(template.keys_set(), str(path)))
    if not sources:
        raise RouteError("no route.yaml applies to this drop: put one in the inbox or the folder "
                         "the drop was copied into")
    missing = [key for key in ("destination", *LABEL_KEYS) if getattr(merged, key) is None]
    if missing:
        raise RouteError(f"the route for this drop (from {', '.join(sources)}) has no "
                         f"{', '.join(missing)}; add the key(s) to a route.yaml")
    check_limits(merged, origins, drop.inbox.allow, drop.inbox.config_key)
    if notices:
        raise RouteError("; ".join(notices))
    unset = {key: value for key, value in route_defaults(drop.inbox.allow).items()
             if getattr(merged, key) is None}
    return Route(merged.model_copy(update=unset), tuple(sources), origins)


def check_limits(merged: RouteTemplate, origins: Mapping[str, str], allow: InboxAllow,
                 inbox_key: str) -> None:
    """Refuse a route that asks past the inbox's `allow:`, naming the file that asked."""
    found = breaches(merged.keys_set(), allow)
    if found:
        raise RouteError("; ".join(breach.message(origins.get(breach.key, INLINE_ROUTE),
                                                  inbox_key) for breach in found))


def _notice_problems(drop: ClaimedDrop, template: RouteTemplate, source: str) -> list[str]:
    """A route's notify entries may name only the site's targets, and add recipients only
    within the inbox's allow.notify_to: each file is checked on its own, to name it."""
    inbox = drop.inbox
    return route_notice_problems(template.notify or [], source, inbox.allow, inbox.config_key,
                                 inbox.notice_targets)


def route_defaults(allow: InboxAllow) -> dict[str, object]:
    """ROUTE_DEFAULTS, raised to the inbox's floors: a route that leaves deidentify or
    phi_guard out gets at least the floor."""
    defaults = dict(ROUTE_DEFAULTS)
    if below(str(defaults["deidentify"]), allow.deidentify_floor, DEIDENTIFY_LEVELS):
        defaults["deidentify"] = allow.deidentify_floor
    if below(str(defaults["phi_guard"]), allow.phi_guard_floor, PHI_GUARD_LEVELS):
        defaults["phi_guard"] = allow.phi_guard_floor
    return defaults


#: route.yaml files parsed before, by path, with the bytes and destinations they were parsed
#: with: a backlog of drops in one folder parses its route once (≈0.7 ms), not once a drop
_parsed_routes: dict[Path, tuple[bytes, frozenset[str], RouteTemplate]] = {}


def _read_route(inbox: Path, path: Path, destinations: set[str]) -> RouteTemplate | None:
    """The route file at `path`, None when there is none. Reached from the inbox without
    following a link (a route.yaml that is a link is refused, not read). Read every time,
    parsed again whenever its bytes changed (a date could miss two edits within one tick)."""
    try:
        with held(TrustedPath(inbox, path.relative_to(inbox).parts).open()) as fd:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            with open(fd, "rb", closefd=False) as stream:
                content = read_limited(stream, path, ROUTE_MAX_BYTES)
    except FileNotFoundError:
        return None
    except UnsafePath as exc:
        raise ConfigError(f"{path}: {exc.strerror}; put the route in a regular file there"
                          ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the file ({exc.strerror}).") from None
    names = frozenset(destinations)
    known = _parsed_routes.get(path)
    if known is not None and known[0] == content and known[1] == names:
        return known[2]
    template = load_route(path, destinations, content)
    _parsed_routes[path] = (content, names, template)
    return template


def _folders_down_to(top: Path, bottom: Path) -> list[Path]:
    folders = [bottom]
    while folders[-1] != top and top in folders[-1].parents:
        folders.append(folders[-1].parent)
    return folders[::-1]


def route_study(study: Study, route: Route, drop: ClaimedDrop) -> RoutedStudy:
    """Apply the series filter and render the labels of one study."""
    template = route.template
    routing_keyword = ("PatientComments" if template.routing_field == "patient_comments"
                       else "StudyDescription")
    routed = RoutedStudy(study, route.destination, None, routing_keyword, "",
                         problems=list(study.problems), template=template, origins=route.origins)
    for series in study.series.values():
        reason = filter_reason(series, template.series)
        if reason:
            routed.excluded.append((series, reason))
        else:
            routed.included.append(series)
    label_study(routed, _header(study.instances[0]), drop)
    return routed


def label_study(routed: RoutedStudy, header: Dataset, drop: ClaimedDrop) -> None:
    """Render the labels and the routing string from `header` (original or de-identified)."""
    values = template_values(header, drop, _template_fields(routed.template))
    labels, problems = render_labels(routed.template, values)
    routed.problems.extend(problems)
    routing_keyword = routed.routing_keyword
    if labels is not None:
        if problem := _project_problem(routed, labels.project, drop):
            routed.problems.append(problem)
        routed.labels = labels
        routed.routing_value = routing_string(labels, routing_keyword)
        if routing_keyword == "StudyDescription" and len(routed.routing_value) > MAX_ROUTING_STRING:
            routed.problems.append(
                f"routing string is {len(routed.routing_value)} characters; Study Description "
                f"holds {MAX_ROUTING_STRING}: shorten the labels or use routing_field: "
                "patient_comments")


def _project_problem(routed: RoutedStudy, project: str, drop: ClaimedDrop) -> str | None:
    """Why the inbox's allow.projects refuses this study's project label, if it does."""
    breach = project_breach(project, drop.inbox.allow)
    if breach is None:
        return None
    template = routed.template.project
    if template is not None and template.fields:
        breach = replace(breach, asked=f"{project!r} (rendered from {template.text!r})")
    return breach.message(routed.origins.get("project", INLINE_ROUTE), drop.inbox.config_key)


def filter_reason(series: Series, rules: SeriesFilter | None) -> str | None:
    """Why the series filter leaves this series out, or None to send it."""
    if rules is None:
        return None
    header: Dataset | None = None
    for keyword, pattern in rules.include.items():
        header = header or _header(series.instances[0])
        value = _value(header, keyword)
        if not pattern.search(value):
            return f"{keyword} {value!r} does not match include pattern {pattern.pattern!r}"
    for keyword, pattern in rules.exclude.items():
        header = header or _header(series.instances[0])
        value = _value(header, keyword)
        if pattern.search(value):
            return f"{keyword} {value!r} matches exclude pattern {pattern.pattern!r}"
    return None


def template_values(header: Dataset, drop: ClaimedDrop, fields: set[str]) -> dict[str, str]:
    folder = drop.origin.name if drop.loose else drop.name
    parent = drop.origin.parent.name if drop.loose else drop.origin.name
    values = {"folder": folder, "parent": parent}
    values.update({name: _value(header, name) for name in fields - PATH_FIELDS})
    return values


def render_labels(template: RouteTemplate,
                  values: Mapping[str, str]) -> tuple[Labels | None, list[str]]:
    rendered: dict[str, str] = {}
    problems = []
    for key in LABEL_KEYS:
        label_template: Template = getattr(template, key)
        value = label_template.render(values)
        if template.clean_labels:
            value = clean_label(value)
        problem = label_problem(value)
        if problem:
            problems.append(f"{key} label {value!r} {problem}"
                            + _label_remedy(value, label_template, values))
        rendered[key] = value
    if problems:
        return None, problems
    return Labels(**rendered), []


def _label_remedy(value: str, label_template: Template, values: Mapping[str, str]) -> str:
    """Where the bad label came from, and what mends it: clean_labels only mends characters."""
    fields = sorted(label_template.fields)
    template = repr(label_template.text)
    if not value:
        if not fields:
            return f" (template {template}); give the label some text"
        empty = " and ".join(fields)
        verb = "is" if len(fields) == 1 else "are"
        return (f": {empty} {verb} empty or missing in this study's files (template {template}); "
                "fill it in the files, or build the label from an attribute they carry or from "
                "literal text")
    sources = ", ".join(fields) or "the literal text"
    if len(value) > MAX_LABEL_LENGTH:
        return (f" (template {template}, from {sources}); shorten the template or take the "
                "label from a shorter attribute")
    return f" (template {template}, from {sources}); set clean_labels: true or change the template"


def routing_string(labels: Labels, keyword: str) -> str:
    if keyword == "PatientComments":
        return f"Project: {labels.project} Subject: {labels.subject} Session: {labels.session}"
    return f"xnat://{labels.project}/{labels.subject}/{labels.session}"


def _template_fields(template: RouteTemplate) -> set[str]:
    return {name for key in LABEL_KEYS for name in getattr(template, key).fields}


def _header(instance: Instance) -> Dataset:
    """The header as the scan saw the file; values too long for a label are not read."""
    with instance.open() as stream:
        return read_dataset(stream)


def _value(header: Dataset, keyword: str) -> str:
    return text_value(header, keyword)
