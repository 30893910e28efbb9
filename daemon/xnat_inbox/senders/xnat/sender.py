"""Destination type `xnat`: what a careful person does with the Compressed Uploader or the
Desktop Client, unattended. Per study: check the project, stream a zip per series (or one per
small study) to the import service without auto-commit, commit once, archive if asked, and
read back what XNAT holds. Instances count as stored only after that read-back agrees."""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

from ...config import XnatDestination
from ...logs import get_logger
from ...reading.scan import Instance
from ...routing.route import RoutedStudy
from ..base import Delivery, InstanceOutcome, OnInstance, SendError, ShouldStop
from ..transcode import UNCOMPRESSED, refusal_before_decoding
from .readback import (
    FAILED_STATES,
    Expected,
    conflict_error,
    failed_state_error,
    held,
    prearchive_row,
    project_of,
    rows,
    shortfall,
    size_note,
)
from .session import XnatClient, XnatHttpError
from .zipstream import Counter, LocalFileError, Member, StopUpload, Transform, zip_chunks

log = get_logger(step="send")
PROJECT_CHECK_SECONDS = 600.0  # how long a project check is trusted
PROGRESS_EVERY = 0.5  # seconds between progress reports

OnProgress = Callable[[int, int], None]


@dataclass(frozen=True)
class Plan:
    """Where one study goes and how, from the route (falling back to the destination)."""

    project: str
    subject: str
    session: str
    dest: str
    overwrite: str
    ignore_unparsable: bool
    transform: Transform | None = None  # de-identification of each file's copy (the route's)
    decode_max: int | None = None  # transcode: uncompressed, within transcode_max_bytes
    left_out: frozenset[str] = frozenset()  # SOPInstanceUIDs not sent (can't be decoded)

    @property
    def archive_uri(self) -> str:
        return (f"/data/archive/projects/{self.project}/subjects/{self.subject}"
                f"/experiments/{self.session}")


class Progress:
    """Files and bytes sent for one study, reported as they go (thread-safe, deduplicated:
    a file sent again after a 401 counts once)."""

    def __init__(self, report: OnProgress | None) -> None:
        self.report = report
        self.sent: dict[str, int] = {}
        self.lock = threading.Lock()
        self.last = 0.0

    def add(self, member: Member) -> None:
        with self.lock:
            self.sent[member.name] = member.size
            self._maybe_report(force=False)

    def flush(self) -> None:
        with self.lock:
            self._maybe_report(force=True)

    def _maybe_report(self, force: bool) -> None:
        now = time.monotonic()
        if self.report and (force or now - self.last >= PROGRESS_EVERY):
            self.last = now
            self.report(self.files, self.bytes)

    @property
    def files(self) -> int:
        return len(self.sent)

    @property
    def bytes(self) -> int:
        return sum(self.sent.values())


class XnatSender:
    def __init__(self, name: str, destination: XnatDestination,
                 memo: MutableMapping[str, str] | None = None) -> None:
        self.name = name
        self.destination = destination
        self.client = XnatClient(name, destination)
        self._projects_checked: dict[str, float] = {}
        self._writable: tuple[float, set[str] | None] | None = None
        # prearchive entries whose upload completed, by study: a retry after a failed commit or
        # archive (even after a restart: the memo is in the state DB) continues from there
        # instead of uploading into a second entry
        self._uploaded: MutableMapping[str, str] = {} if memo is None else memo

    # --- check and shutdown ----------------------------------------------------------
    def check(self) -> str:
        try:
            self.client.login()
            writable = self.writable_projects(fresh=True)
        except XnatHttpError as exc:
            raise SendError(str(exc), exc.transient) from None
        finally:
            self.client.logout()
        listed = ", ".join(sorted(writable)) if writable else "none"
        if writable is None:
            listed = "(this XNAT does not list them)"
        return f"logged in to {self.client.base} as {self.client.username}; can write: {listed}"

    def close(self) -> None:
        self.client.close()

    # --- one study ----------------------------------------------------------------------
    def send(self, study: RoutedStudy, instances: list[Instance],
             on_instance: OnInstance | None = None, should_stop: ShouldStop | None = None,
             on_progress: OnProgress | None = None) -> Delivery:
        delivery = Delivery(self.name)
        started = time.monotonic()
        plan = self.plan(study)
        progress = Progress(on_progress)
        if plan.decode_max is not None:  # those this host can't decode fail alone, for good
            refused = {i.sop_instance_uid: why for i in instances
                       if (why := refusal_before_decoding(i, plan.decode_max))}
            for instance in [i for i in instances if i.sop_instance_uid in refused]:
                outcome = InstanceOutcome(False, None, f"cannot send {instance.rel} "
                                          f"uncompressed: {refused[instance.sop_instance_uid]}")
                delivery.outcomes[instance.sop_instance_uid] = outcome
                if on_instance:
                    on_instance(instance, outcome)
            instances = [i for i in instances if i.sop_instance_uid not in refused]
            plan = replace(plan, left_out=frozenset(refused))
            if not instances:
                return delivery
        try:
            where = self._deliver(plan, study, instances, progress, should_stop)
        except StopUpload:
            delivery.interrupted = True
        except LocalFileError as exc:
            delivery.error = str(exc)
        except XnatHttpError as exc:
            delivery.error, delivery.transient = str(exc), exc.transient
            if not exc.transient:
                self._uploaded.pop(self._key(plan, study), None)
            elif exc.status is None:
                self.client.forget_session()
        else:
            log.info("xnat delivered", destination=self.name, uri=where, files=progress.files)
            for instance in instances:
                syntax = instance.transfer_syntax
                if plan.decode_max is not None and syntax not in UNCOMPRESSED:
                    syntax = UNCOMPRESSED[0]  # Explicit VR Little Endian
                outcome = InstanceOutcome(True, syntax=syntax)
                delivery.outcomes[instance.sop_instance_uid] = outcome
                if on_instance:
                    on_instance(instance, outcome)
        progress.flush()
        delivery.bytes_sent = progress.bytes
        delivery.seconds = time.monotonic() - started
        return delivery

    def plan(self, study: RoutedStudy) -> Plan:
        assert study.labels is not None  # the pipeline sends only studies with labels
        route, d = study.template, self.destination
        return Plan(study.labels.project, study.labels.subject, study.labels.session,
                    route.dest or d.dest, route.overwrite or d.overwrite,
                    bool(route.ignore_unparsable), study.transform,
                    d.transcode_max_bytes if d.transcode == "uncompressed" else None)

    @staticmethod
    def _key(plan: Plan, study: RoutedStudy) -> str:
        return "/".join((plan.project, plan.subject, plan.session, study.study.uid))

    def _deliver(self, plan: Plan, study: RoutedStudy, instances: list[Instance],
                 progress: Progress, should_stop: ShouldStop | None) -> str:
        self.check_project(plan.project)
        key = self._key(plan, study)
        entry = self._uploaded.get(key)
        if entry is not None:
            resumed = self._resume(plan, study, entry)
            if resumed is not None:
                self._uploaded.pop(key, None)
                return resumed
            entry = self._uploaded.get(key)  # None when the entry is gone
        if entry is None:
            entry = self._upload(plan, instances, progress, should_stop)
            self._uploaded[key] = entry
        where = self._commit(plan, entry)
        self._verify(plan, study, where, progress)
        self._uploaded.pop(key, None)
        return where

    def _resume(self, plan: Plan, study: RoutedStudy, entry: str) -> str | None:
        """After a failed commit or archive: continue with the entry if it is still there, or
        verify the archive if our archive request did its work but its answer was lost."""
        row = prearchive_row(self.client, entry)
        if row is not None:
            if row.get("status") in FAILED_STATES:
                raise failed_state_error(row, entry)
            log.info("continuing with the uploaded prearchive entry", destination=self.name,
                     entry=entry, status=row.get("status"))
            return None
        if plan.dest == "archive" and self._archived_here(plan, study):
            self._verify(plan, study, plan.archive_uri, Progress(None))
            return plan.archive_uri
        self._uploaded.pop(self._key(plan, study), None)  # gone: upload afresh
        return None

    def _archived_here(self, plan: Plan, study: RoutedStudy) -> bool:
        try:
            payload = self.client.get_json(plan.archive_uri)
        except XnatHttpError as exc:
            if exc.status == 404:
                return False
            raise
        items = payload.get("items") if isinstance(payload, dict) else None
        fields = items[0].get("data_fields", {}) if items else {}
        return bool(fields.get("UID") == study.study.uid)

    # --- project access -----------------------------------------------------------------
    def check_project(self, project: str) -> None:
        """Refuse before uploading when the project can't take the data: XNAT itself would
        answer 200 and file it under Unassigned."""
        checked = self._projects_checked.get(project)
        if checked is not None and time.monotonic() - checked < PROJECT_CHECK_SECONDS:
            return
        try:
            self.client.get_json(f"/data/projects/{project}")
        except XnatHttpError as exc:
            if exc.status in (403, 404):
                raise XnatHttpError(
                    f"no access to project {project}: XNAT answered {exc.status} "
                    f"({exc.xnat_message}) for user {self.client.username}; check the route's "
                    "project and the account's rights", transient=False,
                    status=exc.status) from None
            raise
        writable = self.writable_projects()
        if writable is not None and project not in writable:
            raise XnatHttpError(
                f"no access to project {project}: user {self.client.username} may read it but "
                "not upload to it (XNAT would file the data under Unassigned); ask for "
                "member or owner rights", transient=False, status=403)
        self._projects_checked[project] = time.monotonic()

    def writable_projects(self, fresh: bool = False) -> set[str] | None:
        """Projects this user may upload to (XNAT's uploader query); None if not listed."""
        cached = self._writable
        if cached and not fresh and time.monotonic() - cached[0] < PROJECT_CHECK_SECONDS:
            return cached[1]
        try:
            payload = self.client.get_json("/data/projects", {
                "permissions": "edit", "dataType": "xnat:subjectData"})
            found: set[str] | None = {str(row.get("ID")) for row in rows(payload)}
        except XnatHttpError as exc:
            if exc.transient or exc.status == 401:
                raise
            found = None
        self._writable = (time.monotonic(), found)
        return found

    # --- upload -------------------------------------------------------------------------
    def _groups(self, instances: list[Instance]) -> list[list[Instance]]:
        """One zip per series, or one for a small study (fewer, shorter requests either way)."""
        if len(instances) <= self.destination.study_zip_max_files:
            return [instances]
        by_series: dict[str, list[Instance]] = {}
        for instance in instances:
            by_series.setdefault(instance.series_uid, []).append(instance)
        return list(by_series.values())

    def _upload(self, plan: Plan, instances: list[Instance], progress: Progress,
                should_stop: ShouldStop | None) -> str:
        groups = self._groups(instances)
        # the first zip alone creates the prearchive entry; the others then join it
        entries = {self._upload_one(plan, groups[0], progress, should_stop)}
        if len(groups) > 1:
            entries |= self._upload_parallel(plan, groups[1:], progress, should_stop)
        if len(entries) > 1:
            raise XnatHttpError(f"XNAT filed the study's series into {len(entries)} prearchive "
                                f"entries ({', '.join(sorted(entries))}); merge or delete them "
                                "in the Prearchive", transient=False)
        return entries.pop()

    def _upload_parallel(self, plan: Plan, groups: list[list[Instance]], progress: Progress,
                         should_stop: ShouldStop | None) -> set[str]:
        workers = min(self.destination.max_parallel, len(groups))
        if workers == 1:
            return {self._upload_one(plan, group, progress, should_stop) for group in groups}
        with ThreadPoolExecutor(workers, thread_name_prefix=f"xnat {self.name}") as pool:
            # each task runs in a copy of this thread's context: the drop's PHI masking
            futures = [pool.submit(contextvars.copy_context().run, self._upload_one, plan,
                                   group, progress, should_stop) for group in groups]
            return {_result(futures, future) for future in futures}

    def _upload_one(self, plan: Plan, group: list[Instance], progress: Progress,
                    should_stop: ShouldStop | None) -> str:
        members = [Member(instance.rel, instance.path, instance.size, plan.transform, instance.open,
                          instance.transfer_syntax, plan.decode_max) for instance in group]
        params = {"import-handler": "DICOM-zip", "PROJECT_ID": plan.project,
                  "SUBJECT_ID": plan.subject, "EXPT_LABEL": plan.session,
                  "prevent_auto_commit": "true",
                  "Ignore-Unparsable": str(plan.ignore_unparsable).lower()}
        if plan.overwrite != "none":
            params["overwrite"] = plan.overwrite

        def body() -> object:
            return zip_chunks(members, self.destination.compression, Counter(), progress.add,
                              should_stop)

        response = self.client.request("POST", "/data/services/import", params=params,
                                       body=body, headers={"Content-Type": "application/zip"})
        progress.flush()
        return self._filed_in(plan, first_uri(response.text), "import")

    def _filed_in(self, plan: Plan, uri: str, step: str) -> str:
        """Where XNAT says the `step` put the data: checked, as the next requests go there."""
        if uri:
            uri = self.client.data_path(uri)
        project = project_of(uri)
        if project != plan.project:
            raise XnatHttpError(
                f"XNAT filed the {step} under project {project or '?'} ({uri or 'no URI'}), "
                f"not {plan.project}: it does not let user {self.client.username} upload to "
                f"{plan.project}; nothing was committed", transient=False)
        return uri

    # --- commit, archive, verify ----------------------------------------------------------
    def _commit(self, plan: Plan, entry: str) -> str:
        """Build the entry once (it was uploaded with prevent_auto_commit), then archive if
        asked; returns where the session now is."""
        response = self.client.request("POST", entry, params={"action": "commit"}, ok=(200, 301))
        where = response.headers.get("Location") or first_uri(response.text) or entry
        if response.status_code == 301:  # the project archives on its own
            return self._filed_in(plan, where, "commit")
        if plan.dest != "archive":
            return entry
        form = {"src": entry.removeprefix("/data"), "dest": plan.archive_uri.removeprefix(
            "/data")}
        if plan.overwrite != "none":
            form["overwrite"] = plan.overwrite
        try:
            response = self.client.request("POST", "/data/services/archive", body=form)
        except XnatHttpError as exc:
            if exc.transient:
                raise
            raise conflict_error(self.client, exc, entry) from None
        return self._filed_in(plan, first_uri(response.text) or plan.archive_uri, "archive")

    def _verify(self, plan: Plan, study: RoutedStudy, where: str, progress: Progress) -> None:
        if "/prearchive/" in where:
            row = prearchive_row(self.client, where)
            if row is None:
                raise XnatHttpError(f"the prearchive entry {where} vanished after the commit",
                                    transient=False)
            if row.get("status") in FAILED_STATES:
                raise failed_state_error(row, where)
        expected = Expected()
        remap = study.uid_map or (lambda uid: uid)  # XNAT holds the de-identified series UIDs
        for instance in study.instances:
            if instance.sop_instance_uid in plan.left_out:
                continue
            expected.add(remap(instance.series_uid), instance.series_number, instance.size)
        found = held(self.client, where)
        missing = shortfall(expected, found)
        if missing:
            raise XnatHttpError(
                f"read-back of {where} after the {plan.dest} step: {missing}; this attempt "
                f"sent {progress.files} file(s), {progress.bytes} bytes", transient=False)
        note = size_note(expected, found)
        log.info("xnat read-back", destination=self.name, uri=where,
                 files=sum(found.files.values()), expected=sum(expected.files.values()),
                 sizes=note or "match")


def first_uri(text: str) -> str:
    """The first URI of a text/uri-list answer."""
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            return line
    return ""


def _result(futures: list[Future[str]], future: Future[str]) -> str:
    """A future's result; on the first failure, prefer reporting a permanent one."""
    try:
        return future.result()
    except XnatHttpError as exc:
        errors = [f.exception() for f in futures]
        permanent = [e for e in errors if isinstance(e, XnatHttpError) and not e.transient]
        raise (permanent[0] if permanent else exc) from None
