"""`xnat-inbox explain` and `check`: how a folder would be handled, and whether the set-up works,
without sending anything (check only C-ECHOes, or logs in to XNAT and lists its projects)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from ..allow import breaches
from ..config import ROUTE_FILE, ConfigError, InboxConfig, SiteConfig, XnatDestination, load_route
from ..intake.claim import ClaimedDrop
from ..intake.watch import ARCHIVE_SUFFIXES, is_archive_name, routing_folders
from ..logs import get_logger, phi_pattern, redact
from ..reading.scan import Instance, Kind, ScanResult, scan_drop
from ..reading.scan_workers import NoWorker, ReadJob, ScanWorkers, WorkerLost
from ..reading.unpack import UNPACKED, UnpackError
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


class ExplainError(Exception):
    """The path can't be explained (outside every inbox, not a drop); the message says why."""


def explain(config: SiteConfig, path: Path, show_phi: bool = False,
            as_if_in: Path | None = None) -> Iterator[str]:
    """Describe `path` (a folder or an archive) as a drop of the inbox holding it, or as if
    dropped into `as_if_in`. ExplainError, before the first line, when it can't."""
    path = path.resolve()
    if as_if_in is not None:
        inbox = inbox_for(config, as_if_in)
        origin = as_if_in.resolve()
    else:
        inbox, origin = inbox_for(config, path), path.parent
    if inbox is None:
        raise ExplainError(f"{as_if_in or path} is not in a configured inbox; name one with "
                           f"--inbox, e.g. --inbox {config.inboxes[0].path}")
    drop = ClaimedDrop("explain", inbox, origin, path.name, False, datetime.now().astimezone())
    if path.is_dir():
        yield from _describe(config, drop, path, scan_drop(path, inbox.ready_marker), show_phi)
        return
    if not (path.is_file() and is_archive_name(path.name)):
        raise ExplainError(f"{path} is not a folder or an archive "
                           f"({', '.join(ARCHIVE_SUFFIXES)}); explain takes a drop")
    # unpacked as the daemon unpacks it: in a worker under the same limits, into a folder of
    # our own (removed when the lines are done), never beside the archive
    with tempfile.TemporaryDirectory(prefix="xnat-inbox-explain-") as tmp:
        job = ReadJob(Path(tmp) / UNPACKED, path, inbox.archives, inbox.ready_marker)
        workers = ScanWorkers(min(config.scan_processes, 1), config.scan_memory_limit)
        try:
            scan: ScanResult | str = workers.read(job, config.scan_timeout)
        except UnpackError as exc:
            scan = f"refused: {exc}"
        except WorkerLost as exc:
            scan = (f"reading it cost a scan worker: {exc}; the daemon sets such a drop aside "
                    "after a few")
        except (NoWorker, OSError) as exc:  # not the archive's doing, e.g. a full /tmp
            raise ExplainError(f"cannot unpack {path} in {tmp}: {exc}") from None
        finally:
            workers.close()
        if isinstance(scan, str):
            yield f"Drop {path}  ({{folder}}={drop.name}, {{parent}}={drop.origin.name})"
            yield f"Archive: {scan}"
            yield "The drop would go to failed/ with this reason."
            return
        limits = inbox.archives
        yield from _describe(config, drop, path, scan, show_phi,
                             f"Archive: unpacked within {inbox.config_key}.archives (max_bytes "
                             f"{limits.max_bytes}, max_entries {limits.max_entries}, max_ratio "
                             f"{limits.max_ratio:g})")


def _describe(config: SiteConfig, drop: ClaimedDrop, path: Path, scan: ScanResult,
              show_phi: bool, archive: str | None = None) -> Iterator[str]:
    inbox = drop.inbox
    phi = None if show_phi else phi_pattern(scan.phi)
    yield f"Drop {path}  ({{folder}}={drop.name}, {{parent}}={drop.origin.name})"
    if archive:
        yield archive
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
            lines.append(f"note {inbox.config_key} has no allow: any route.yaml in this inbox "
                         "may send to any destination and project, and merge into existing XNAT "
                         "sessions (overwrite: append); where other people write route files, "
                         "limit them with allow: (docs/configuration.md, Inboxes)")
        broken = set()
        for route_file in route_files(inbox):
            problems = _route_file_problems(route_file, names, inbox)
            lines += [f"FAIL {problem}" for problem in problems] or [f"ok   {route_file}"]
            ok = ok and not problems
            if problems:
                broken.add(route_file.parent)
        lines += _route_gaps(inbox, names, broken)
    for name, destination in config.destinations.items():
        try:
            lines.append(f"ok   destination {name}: {make_sender(name, destination).check()}")
        except SendError as exc:
            lines.append(f"FAIL destination {name}: {exc}")
            ok = False
    return lines, ok


def _route_gaps(inbox: InboxConfig, names: set[str], broken: set[Path]) -> list[str]:
    """Where drops would fail for want of a route (no route.yaml, or one missing a destination
    or a label), each routing folder merged as the daemon merges it; folders below a route file
    that already failed are left out (its FAIL says why)."""
    usable, gaps = 0, []
    for folder in routing_folders(inbox):
        if any(folder == b or b in folder.parents for b in broken):
            continue
        drop = ClaimedDrop("check", inbox, folder, "drop", False, datetime.now().astimezone())
        try:
            resolve_route(drop, names)
            usable += 1
        except RouteError as exc:
            gaps.append((folder, str(exc)))
    if not usable and gaps:
        head = f"warn inbox {inbox.path}: no route applies, every drop copied into it would fail"
        if len(gaps) == 1 and gaps[0][0] == inbox.path:
            return [f"{head}: {gaps[0][1]}"]
        return [f"{head}:", *(f"warn   {folder}: {reason}" for folder, reason in gaps)]
    lines = []
    for folder, reason in gaps:
        if folder == inbox.path and inbox.route is None and \
                not (folder / ROUTE_FILE).exists():  # routes only in routing folders below
            lines.append(f"note drops copied into {folder} itself (not into a routing folder) "
                         "would fail: no route.yaml applies there")
        else:
            lines.append(f"warn drops copied into {folder} would fail: {reason}")
    return lines


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
