"""XNAT's import service (DICOM-zip and gradual-DICOM) over the fake's state."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .state import (
    UNASSIGNED,
    ArchiveConflict,
    Destination,
    Instance,
    PrearcEntry,
    XnatError,
    XnatState,
    clean_label,
    overwrite_mode,
    parse_dest,
)
from .uploads import Entry, Unparsable, read_instance

KNOWN_HANDLERS = {"DICOM-zip", "gradual-DICOM", "SI", "XAR", "inbox"}
SUPPORTED_HANDLERS = {"DICOM-zip", "gradual-DICOM", "SI"}


def truthy(value: object) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes", "on")


def check_handler(name: str) -> None:
    if name not in KNOWN_HANDLERS:
        raise XnatError(404, f"Unknown importer implementation specified: {name}")
    if name not in SUPPORTED_HANDLERS:
        raise XnatError(501, f"Import handler {name} is not emulated by the fake XNAT")


@dataclass
class ImportOptions:
    project: str
    subject: str
    session: str
    dest: Destination
    overwrite: str | None
    overwrite_files: bool
    ignore_unparsable: bool
    prevent_auto_commit: bool
    prevent_anon: bool
    direct_archive: bool
    source: str

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> ImportOptions:
        dest = parse_dest(params.get("dest"))
        ignore = params.get("Ignore-Unparsable")
        return cls(
            project=params.get("PROJECT_ID") or params.get("project", ""),
            subject=params.get("SUBJECT_ID") or params.get("subject", ""),
            session=params.get("EXPT_LABEL") or params.get("session", ""),
            dest=dest,
            overwrite=overwrite_mode(params.get("overwrite")),
            overwrite_files=truthy(params.get("overwrite_files", "")),
            # Any dest means "commit now", and then XNAT skips unparsable files by default.
            ignore_unparsable=truthy(ignore) if ignore is not None else dest.given,
            prevent_auto_commit=truthy(params.get("prevent_auto_commit", "")) or
            params.get("SOURCE", "").lower() == "uploader",
            prevent_anon=truthy(params.get("prevent_anon", "")),
            direct_archive=truthy(params.get("Direct-Archive", "")),
            source=params.get("SOURCE", ""),
        )


class Importer:
    def __init__(self, state: XnatState):
        self.state = state

    def run(self, user: str, params: Mapping[str, str],
            entries: Iterable[Entry]) -> tuple[int, str]:
        """File every entry into the prearchive, then commit/archive as asked.

        Returns (status, URI). Files filed before an error stay in the prearchive, as in
        XNAT.
        """
        opts = ImportOptions.from_params(params)
        touched: dict[tuple[str, str, str], PrearcEntry] = {}
        self._file_all(user, opts, entries, touched)
        if not touched:
            raise XnatError(400, "Upload did not include parsable files")
        if len(touched) > 1:
            raise XnatError(400, "Upload included files for multiple imaging sessions")
        return self._finish(user, opts, next(iter(touched.values())))

    def salvage(self, user: str, params: Mapping[str, str],
                entries: Iterable[Entry]) -> list[PrearcEntry]:
        """A dropped upload: keep what was filed before the break, open (RECEIVING)."""
        touched: dict[tuple[str, str, str], PrearcEntry] = {}
        with contextlib.suppress(XnatError):
            self._file_all(user, ImportOptions.from_params(params), entries, touched)
        return list(touched.values())

    def _file_all(self, user: str, opts: ImportOptions, entries: Iterable[Entry],
                  touched: dict[tuple[str, str, str], PrearcEntry]) -> None:
        for entry in entries:
            try:
                inst = read_instance(entry)
            except Unparsable:
                entry.discard()
                if opts.ignore_unparsable:
                    continue
                raise XnatError(400, f"unable to read DICOM object {entry.name}") from None
            except XnatError:
                entry.discard()
                raise
            pe = self._file(user, opts, inst, entry)
            touched[pe.key] = pe

    def _file(self, user: str, opts: ImportOptions, inst: Instance, entry: Entry) -> PrearcEntry:
        project, subject, label = self._target(user, opts, inst)
        meta = {"prevent_auto_commit": opts.prevent_auto_commit,
                "prevent_anon": opts.prevent_anon, "SOURCE": opts.source}
        with self.state.lock:
            pe = self.state.open_entry(project, subject, label, inst, meta)
            self.state.add_file(pe, inst, entry.data, entry.path, entry.digest)
        return pe

    def _target(self, user: str, opts: ImportOptions, inst: Instance) -> tuple[str, str, str]:
        """PROJECT_ID the user can't write is not refused: header routing, else Unassigned."""
        head_project, head_subject, head_session = inst.routing
        wanted = (opts.dest.project or opts.project, head_project)
        project = next((p for p in wanted if p and self.state.can_write(user, p)), UNASSIGNED)
        subject = (opts.dest.subject or opts.subject or head_subject or inst.patient_name)
        label = (opts.dest.session or opts.session or head_session or inst.patient_id or
                 inst.study_uid)
        return project, clean_label(subject), clean_label(label)

    def _finish(self, user: str, opts: ImportOptions, pe: PrearcEntry) -> tuple[int, str]:
        wants_archive = opts.dest.archive or opts.direct_archive
        if not (opts.dest.given or opts.direct_archive):
            return 200, "/data" + pe.url
        with self.state.lock:
            self.state.build(pe)
            if not wants_archive or pe.project == UNASSIGNED:
                return 200, "/data" + pe.url
            dest = Destination(project=pe.project, subject=opts.dest.subject or opts.subject,
                               session=pe.name, archive=True, given=True)
            try:
                session = self.state.archive_entry(user, pe, dest, opts.overwrite,
                                                   opts.overwrite_files)
            except ArchiveConflict as exc:
                if opts.direct_archive:
                    self.state.drop_entry(pe)  # Direct-Archive never kept a prearchive copy
                status = int(self.state.config["import_archive_conflict_status"])
                raise XnatError(status, f"unable to archive {pe.url}: {exc.message}") from exc
        return 200, session.uri
