"""`xnat-inbox explain` and `check`: how a folder would be handled, and whether the set-up works,
without sending anything (check only C-ECHOes, or logs in to XNAT and lists its projects)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from ..allow import breaches
from ..config import ROUTE_FILE, ConfigError, InboxConfig, SiteConfig, XnatDestination, load_route
from ..intake.claim import ClaimedDrop
from ..intake.watch import routing_folders
from ..logs import get_logger, phi_pattern, redact
from ..reading.scan import Instance, Kind, scan_drop
from ..routing import deidentify
from ..routing.route import RoutedStudy, RouteError, filter_reason, resolve_route, route_study
from ..senders.base import SendError
from ..senders.registry import make_sender

_NO_LOG = get_logger(step="explain")


def inbox_for(config: SiteConfig, path: Path) -> InboxConfig | None:
    resolved = path.resolve()
    for inbox in config.inboxes:
        if inbox.path.resolve() in resolved.parents or inbox.path.resolve() == resolved:
            return inbox
    return None


def explain(config: SiteConfig, path: Path, show_phi: bool = False,
            as_if_in: Path | None = None) -> Iterator[str]:
    """Describe `path` as a drop of the inbox holding it, or as if dropped into `as_if_in`."""
    path = path.resolve()
    if as_if_in is not None:
        inbox = inbox_for(config, as_if_in)
        origin = as_if_in.resolve()
    else:
        inbox, origin = inbox_for(config, path), path.parent
    if inbox is None:
        yield (f"{as_if_in or path} is not in a configured inbox; name one with --inbox, "
               f"e.g. --inbox {config.inboxes[0].path}")
        return
    drop = ClaimedDrop("explain", inbox, origin, path.name, False, datetime.now().astimezone())
    scan = scan_drop(path, inbox.ready_marker)
    phi = None if show_phi else phi_pattern(scan.phi)
    yield f"Drop {path}  ({{folder}}={drop.name}, {{parent}}={drop.origin.name})"
    kinds = ", ".join(f"{kind} {count}" for kind, count in scan.counts().items())
    yield f"Files: {len(scan.files)} ({kinds or 'none'})"
    for entry in scan.files:
        if entry.kind is not Kind.DICOM:
            yield f"  {entry.kind.value:<10} {entry.rel}: {entry.reason}"
    yield f"Limits ({inbox.config_key}.allow): {inbox.allow.describe()}"
    try:
        route = resolve_route(drop, set(config.destinations))
    except RouteError as exc:
        yield f"Route: none usable: {exc}"
        return
    yield f"Route: destination {route.destination} (from {', '.join(route.sources)})"
    for number, study in enumerate(scan.studies.values(), 1):
        routed = route_study(study, route, drop)
        deidentify.prepare(routed, drop, config.deid_secret_file, None, _NO_LOG)
        yield (f"Study {number}: {study.uid}: {len(study.instances)} instance(s) in "
               f"{len(study.series)} series")
        if routed.labels:
            labels = routed.labels
            yield redact(f"  labels: project={labels.project} subject={labels.subject} "
                         f"session={labels.session}", phi)
            yield redact(f"  routing: {routed.routing_keyword} = {routed.routing_value}", phi)
        for series in study.series.values():
            reason = filter_reason(series, route.template.series)
            verdict = f"excluded: {reason}" if reason else "send"
            yield (f"  series {series.number or '?':>4} {series.description!r} {series.modality} "
                   f"{len(series.instances)} instance(s): {verdict}")
            if routed.transform is not None and not reason:
                yield from _deid_lines(series.instances[0], routed.transform, show_phi)
        if routed.phi_findings:
            yield f"  PHI guard ({routed.template.phi_guard}): {', '.join(routed.phi_findings)}"
        for problem in routed.problems:
            yield redact(f"  NOT SENT: {problem}", phi)
        if not routed.problems:
            yield redact(f"  would send {len(routed.instances)} instance(s) to "
                         f"{routed.destination}{_xnat_how(config, routed)}", phi)
    if not scan.studies:
        yield "No DICOM studies: the drop would go to failed/."
    if phi is not None and scan.phi:
        yield "(values derived from patient data are shown as [PHI]; --show-phi shows them)"


def _deid_lines(instance: Instance, transform: deidentify.Transform,
                show_phi: bool) -> Iterator[str]:
    """What de-identification would change in this series' sample file (values only with
    --show-phi: they are PHI)."""
    before = deidentify.outgoing_header(instance, None)
    after = deidentify.outgoing_header(instance, transform)
    yield f"    de-identified ({instance.rel}):"
    for line in deidentify.describe(deidentify.changes(before, after), show_phi):
        yield f"      {line}"


def _xnat_how(config: SiteConfig, routed: RoutedStudy) -> str:
    destination = config.destinations.get(routed.destination)
    if not isinstance(destination, XnatDestination) or routed.labels is None:
        return ""
    dest = routed.template.dest or destination.dest
    overwrite = routed.template.overwrite or destination.overwrite
    labels = routed.labels
    return (f" (XNAT REST: {labels.project}/{labels.subject}/{labels.session} into the "
            f"{dest}, overwrite: {overwrite})")


def check(config: SiteConfig) -> tuple[list[str], bool]:
    """Validate every route.yaml and reach every destination; returns lines and success."""
    lines, ok = [f"config {config.source}: valid"], True
    lines += [f"warn {warning}" for warning in config.warnings()]
    names = set(config.destinations)
    for inbox in config.inboxes:
        if not inbox.path.is_dir():
            lines.append(f"FAIL inbox {inbox.path}: not a folder")
            ok = False
            continue
        if "allow" not in inbox.model_fields_set:
            lines.append(f"note {inbox.config_key} has no allow: a route.yaml there may send to "
                         "any destination and project (overwrite up to append)")
        for route_file in route_files(inbox):
            problems = _route_file_problems(route_file, names, inbox)
            lines += [f"FAIL {problem}" for problem in problems] or [f"ok   {route_file}"]
            ok = ok and not problems
    for name, destination in config.destinations.items():
        try:
            lines.append(f"ok   destination {name}: {make_sender(name, destination).check()}")
        except SendError as exc:
            lines.append(f"FAIL destination {name}: {exc}")
            ok = False
    return lines, ok


def _route_file_problems(route_file: Path, names: set[str], inbox: InboxConfig) -> list[str]:
    """What is wrong with one route.yaml on its own: its form, then what it asks past the
    inbox's limits (a project template is checked per study, by explain)."""
    try:
        template = load_route(route_file, names)
    except ConfigError as exc:
        return [str(exc)]
    return [breach.message(str(route_file), inbox.config_key)
            for breach in breaches(template.keys_set(), inbox.allow)]


def route_files(inbox: InboxConfig) -> Iterator[Path]:
    """The route.yaml of the inbox and of every routing folder below it."""
    for folder in routing_folders(inbox):
        if (folder / ROUTE_FILE).is_file():
            yield folder / ROUTE_FILE
