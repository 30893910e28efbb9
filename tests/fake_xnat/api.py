"""The XNAT REST endpoints of the fake, independent of the HTTP transport.

Each handler takes a Request (see server.py) and the authenticated user and returns a
Response, or raises XnatError. Routes are plain path patterns with {placeholders}.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl

from .importer import Importer, check_handler
from .state import (
    UNASSIGNED,
    ArchiveSession,
    Auth,
    Destination,
    PrearcEntry,
    StoredFile,
    XnatError,
    XnatState,
    overwrite_mode,
    parse_dest,
    scan_sort_key,
    scans_of,
    xnat_time,
)
from .uploads import (
    BodyReader,
    HashingWriter,
    boundary_of,
    copy_range,
    format_of,
    iter_entries,
    read_range,
    save_body,
    split_multipart,
)

SMALL_BODY_CAP = 16 << 20


class Dropped(Exception):
    """The connection was closed on purpose; there is no answer to send."""


class Request(Protocol):
    """What a handler may use of the request (server.Handler provides it)."""

    query: dict[str, str]
    headers: Any
    body: BodyReader
    drop_limit: int | None

    def read_small(self) -> bytes: ...

    def drop(self) -> None: ...


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain"
    headers: dict[str, str] = field(default_factory=dict)


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(obj).encode(), "application/json")


def uri_list(uri: str, status: int = 200) -> Response:
    return Response(status, f"{uri}\r\n".encode(), "text/uri-list")


def result_set(rows: list[dict[str, Any]]) -> Response:
    return json_response({"ResultSet": {"Result": rows, "totalRecords": str(len(rows))}})


Handler = Callable[..., Response]


def compile_route(pattern: str) -> re.Pattern[str]:
    return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$")


class Api:
    def __init__(self, state: XnatState):
        self.state = state
        self.importer = Importer(state)
        self.routes: list[tuple[frozenset[str], re.Pattern[str], Handler]] = []
        self._register()

    def route(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        allowed = False
        for methods, pattern, handler in self.routes:
            m = pattern.match(path)
            if m:
                if method in methods:
                    return handler, m.groupdict()
                allowed = True
        raise XnatError(405 if allowed else 404, "Method not allowed" if allowed else
                        f"No resource at {path}")

    def _add(self, methods: str, patterns: Iterable[str], handler: Handler) -> None:
        for p in patterns:
            self.routes.append((frozenset(methods.split()), compile_route(p), handler))

    def _register(self) -> None:
        add = self._add
        add("GET POST", ["/data/JSESSION"], self.jsession)
        add("DELETE", ["/data/JSESSION"], self.logout)
        add("GET", ["/data/services/tokens/issue"], self.issue_token)
        add("GET", ["/data/services/tokens/invalidate/{alias}/{secret}"], self.invalidate_token)
        add("GET", ["/data/version"], self.version)
        add("GET", ["/xapi/siteConfig/buildInfo"], self.build_info)
        add("POST", ["/data/services/import"], self.import_)
        add("POST", ["/data/services/archive"], self.archive)
        add("GET", ["/data/projects"], self.projects)
        add("GET", ["/data/projects/{p}"], self.project)
        add("GET", ["/data/projects/{p}/subjects"], self.subjects)
        add("GET", ["/data/projects/{p}/experiments",
                    "/data/projects/{p}/subjects/{s}/experiments"], self.experiments)
        exp = ["/data/projects/{p}/subjects/{s}/experiments/{e}",
               "/data/projects/{p}/experiments/{e}", "/data/experiments/{e}"]
        add("GET", exp, self.experiment)
        add("GET", [e + "/scans" for e in exp], self.scans)
        add("GET", [e + tail for e in exp for tail in
                    ("/scans/{scans}/files", "/scans/{scans}/resources/{res}/files")],
            self.files)
        add("GET", [e + tail for e in exp for tail in
                    ("/scans/{scans}/files/{name}",
                     "/scans/{scans}/resources/{res}/files/{name}")], self.download)
        add("GET", ["/data/prearchive", "/data/prearchive/projects"], self.prearchive_all)
        add("GET", ["/data/prearchive/projects/{p}"], self.prearchive_project)
        pre = "/data/prearchive/projects/{p}/{ts}/{f}"
        add("GET", [pre], self.prearchive_entry)
        add("POST", [pre], self.prearchive_action)
        add("DELETE", [pre], self.prearchive_delete)
        add("GET", [pre + "/scans"], self.prearchive_scans)
        add("GET", [pre + "/scans/{scans}/files", pre + "/scans/{scans}/resources/{res}/files"],
            self.prearchive_files)

    # ---- auth ------------------------------------------------------------------------

    def jsession(self, req: Request, auth: Auth) -> Response:
        return Response(200, auth.session_id.encode(), "text/plain")

    def logout(self, req: Request, auth: Auth) -> Response:
        self.state.logout(auth.session_id)
        return Response(200, b"", "text/plain",
                        {"Set-Cookie": "JSESSIONID=; Path=/; Max-Age=0; HttpOnly"})

    def issue_token(self, req: Request, auth: Auth) -> Response:
        return json_response(self.state.issue_token(auth.user))

    def invalidate_token(self, req: Request, auth: Auth, alias: str, secret: str) -> Response:
        if not self.state.invalidate_token(alias, secret):
            raise XnatError(404, "Unknown token")
        return Response(200, b"", "text/plain")

    def version(self, req: Request, auth: Auth) -> Response:
        return Response(200, str(self.state.config["version"]).encode(), "text/plain")

    def build_info(self, req: Request, auth: Auth) -> Response:
        return json_response({"version": self.state.config["version"], "buildNumber": "fake"})

    # ---- projects and archive read-back ----------------------------------------------

    def projects(self, req: Request, auth: Auth) -> Response:
        rows = []
        visible = self.state.visible_projects(auth.user)
        if req.query.get("permissions") in ("edit", "delete", "create"):
            # XNAT's uploader query (permissions=edit&dataType=xnat:subjectData)
            visible = [pid for pid in visible if self.state.can_write(auth.user, pid)]
        for pid in visible:
            p = self.state.projects[pid]
            rows.append({"ID": pid, "secondary_ID": p.get("secondary_ID", pid),
                         "name": p["name"], "description": p.get("description", ""),
                         "pi_firstname": "", "pi_lastname": "", "URI": f"/data/projects/{pid}"})
        return result_set(rows)

    def project(self, req: Request, auth: Auth, p: str) -> Response:
        with self.state.lock:
            self.state.require_project(auth.user, p)
            info = self.state.projects[p]
        fields = {"ID": p, "secondary_ID": info.get("secondary_ID", p), "name": info["name"],
                  "description": info.get("description", "")}
        return json_response({"items": [{"meta": {"xsi:type": "xnat:projectData"},
                                         "data_fields": fields, "children": []}]})

    def subjects(self, req: Request, auth: Auth, p: str) -> Response:
        with self.state.lock:
            self.state.require_project(auth.user, p)
            rows = [{"ID": sid, "label": label, "project": proj,
                     "URI": f"/data/subjects/{sid}"}
                    for (proj, label), sid in self.state.subjects.items() if proj == p]
        return result_set(rows)

    def experiments(self, req: Request, auth: Auth, p: str, s: str | None = None) -> Response:
        with self.state.lock:
            self.state.require_project(auth.user, p)
            rows = [self._experiment_row(x) for x in self.state.archive.values()
                    if x.project == p and (s is None or s in (x.subject_label, x.subject_id))]
        return result_set(rows)

    @staticmethod
    def _experiment_row(x: ArchiveSession) -> dict[str, str]:
        return {"ID": x.id, "label": x.label, "project": x.project, "subject_ID": x.subject_id,
                "subject_label": x.subject_label, "xsiType": x.xsi_type, "date": x.date,
                "insert_date": xnat_time(x.insert_date), "UID": x.uid,
                "URI": f"/data/experiments/{x.id}"}

    def _session(self, auth: Auth, p: str | None, e: str, s: str | None) -> ArchiveSession:
        return self.state.find_session(auth.user, p, e, s)

    def experiment(self, req: Request, auth: Auth, e: str, p: str | None = None,
                   s: str | None = None) -> Response:
        with self.state.lock:
            x = self._session(auth, p, e, s)
            scans = [{"meta": {"xsi:type": x.xsi_type.replace("Session", "Scan")},
                      "data_fields": {"ID": sid, "UID": files[0].series_uid,
                                      "type": files[0].series_description,
                                      "series_description": files[0].series_description}}
                     for sid, files in scans_of(x.files.values()).items()]
            fields = {"ID": x.id, "label": x.label, "project": x.project,
                      "subject_ID": x.subject_id, "UID": x.uid, "date": x.date,
                      "time": x.time, "modality": x.modality,
                      "insert_date": xnat_time(x.insert_date)}
        item = {"meta": {"xsi:type": x.xsi_type, "isHistory": False},
                "data_fields": fields,
                "children": [{"field": "scans/scan", "items": scans}]}
        return json_response({"items": [item]})

    def scans(self, req: Request, auth: Auth, e: str, p: str | None = None,
              s: str | None = None) -> Response:
        with self.state.lock:
            x = self._session(auth, p, e, s)
            rows = scan_rows(scans_of(x.files.values()), f"/data/experiments/{x.id}",
                             x.xsi_type.replace("Session", "Scan"))
        return result_set(rows)

    def files(self, req: Request, auth: Auth, e: str, scans: str, res: str = "DICOM",
              p: str | None = None, s: str | None = None) -> Response:
        with self.state.lock:
            x = self._session(auth, p, e, s)
            chosen = pick_files(x.files.values(), scans, res)
            rows = file_rows(chosen, f"/data/experiments/{x.id}")
        return result_set(rows)

    def download(self, req: Request, auth: Auth, e: str, scans: str, name: str,
                 res: str = "DICOM", p: str | None = None, s: str | None = None) -> Response:
        with self.state.lock:
            x = self._session(auth, p, e, s)
            match = [f for f in pick_files(x.files.values(), scans, res) if f.name == name]
            if not match:
                raise XnatError(404, f"No file {name}")
            data = match[0].path.read_bytes()
        return Response(200, data, "application/dicom")

    # ---- prearchive ------------------------------------------------------------------

    def prearchive_all(self, req: Request, auth: Auth) -> Response:
        return result_set([e.row() for e in self.state.entries_for(auth.user, None)])

    def prearchive_project(self, req: Request, auth: Auth, p: str) -> Response:
        return result_set([e.row() for e in self.state.entries_for(auth.user, p)])

    def _entry(self, auth: Auth, p: str, ts: str, f: str, write: bool = False) -> PrearcEntry:
        return self.state.get_entry(auth.user, p, ts, f, write=write)

    def prearchive_entry(self, req: Request, auth: Auth, p: str, ts: str, f: str) -> Response:
        with self.state.lock:
            return result_set([self._entry(auth, p, ts, f).row()])

    def prearchive_scans(self, req: Request, auth: Auth, p: str, ts: str, f: str) -> Response:
        with self.state.lock:
            e = self._entry(auth, p, ts, f)
            rows = scan_rows(scans_of(e.files.values()), "/data" + e.url, "")
        return result_set(rows)

    def prearchive_files(self, req: Request, auth: Auth, p: str, ts: str, f: str, scans: str,
                         res: str = "DICOM") -> Response:
        with self.state.lock:
            e = self._entry(auth, p, ts, f)
            rows = file_rows(pick_files(e.files.values(), scans, res), "/data" + e.url)
        return result_set(rows)

    def prearchive_action(self, req: Request, auth: Auth, p: str, ts: str, f: str) -> Response:
        action = req.query.get("action") or self._form(req).get("action", "")
        if action not in ("commit", "build", "rebuild"):
            raise XnatError(400, f"Unsupported action: {action or '(none)'}")
        status, uri = self.state.commit(auth.user, p, ts, f)
        resp = uri_list(uri, status)
        if status == 301:
            resp.headers["Location"] = uri
        return resp

    def prearchive_delete(self, req: Request, auth: Auth, p: str, ts: str, f: str) -> Response:
        self.state.delete_entry(auth.user, p, ts, f)
        return Response(200, b"", "text/plain")

    # ---- archive service -------------------------------------------------------------

    @staticmethod
    def _form(req: Request) -> dict[str, str]:
        ctype = str(req.headers.get("Content-Type", "")).lower()
        raw = req.read_small()
        if ctype.startswith("application/x-www-form-urlencoded") and raw:
            return dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))
        return {}

    def archive(self, req: Request, auth: Auth) -> Response:
        params = {**self._form(req), **req.query}
        src = params.get("src", "")
        m = re.match(r"^(?:/data)?/prearchive/projects/([^/]+)/([^/]+)/([^/]+)/?$", src)
        if not m:
            raise XnatError(400, f"Invalid src: {src or '(missing)'}")
        if m.group(1) == UNASSIGNED:
            raise XnatError(400, "Cannot archive sessions from the Unassigned folder.")
        dest = parse_dest(params.get("dest"))
        if dest.given and not dest.archive:
            raise XnatError(400, f"Invalid dest for archiving: {params.get('dest')}")
        dest = Destination(project=dest.project or params.get("project", ""),
                           subject=dest.subject or params.get("subject", ""),
                           session=dest.session or params.get("session", ""), archive=True)
        mode = overwrite_mode(params.get("overwrite"))
        files_ok = str(params.get("overwrite_files", "")).lower() == "true"
        with self.state.lock:
            entry = self._entry(auth, *m.groups(), write=True)
            self.state.build(entry)
            session = self.state.archive_entry(auth.user, entry, dest, mode, files_ok)
        return uri_list(session.uri)

    # ---- import service --------------------------------------------------------------

    def import_(self, req: Request, auth: Auth) -> Response:
        params = dict(req.query)
        if "import-handler" in params:
            check_handler(params["import-handler"])  # XNAT refuses before reading the body
        ctype = str(req.headers.get("Content-Type", ""))
        multipart = ctype.lower().startswith("multipart/form-data")
        gradual = params.get("import-handler") == "gradual-DICOM"
        fmt = "DICOM" if gradual and not multipart else format_of(ctype)
        if not multipart and fmt == "UNKNOWN":
            raise XnatError(400, "Unsupported format UNKNOWN")
        work = self.state.tmp_dir()
        try:
            upload = work / "upload.zip"
            with open(upload, "wb") as raw_out:
                # a gradual-DICOM body is the file itself: catalog its MD5 as it arrives
                out = HashingWriter(raw_out) if fmt == "DICOM" else raw_out
                complete = save_body(req.body, out, req.drop_limit)
            digest = out.hexdigest() if isinstance(out, HashingWriter) else None
            if multipart:
                upload, fmt = self._file_part(upload, ctype, params, complete)
            check_handler(params.get("import-handler", "DICOM-zip"))
            if params.get("import-handler") == "gradual-DICOM":
                fmt = "DICOM"
            if complete and fmt == "UNKNOWN":
                raise XnatError(400, "Unsupported format UNKNOWN")
            if not complete:
                self._salvage(auth.user, params, fmt, upload, work, req)
            entries = iter_entries(fmt, upload, work, complete=True, digest=digest)
            status, uri = self.importer.run(auth.user, params, entries)
            return uri_list(uri, status)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _file_part(self, body: Path, ctype: str, params: dict[str, str],
                   complete: bool) -> tuple[Path, str]:
        """The one file part of a multipart upload; the other fields join the params."""
        parts = split_multipart(body, boundary_of(ctype))
        for part in parts:
            if part.filename is None:
                value = read_range(body, part.start, min(part.end, part.start + 65536))
                params.setdefault(part.name, value.decode("utf-8", "replace"))
        files = [p for p in parts if p.filename is not None]
        if complete and len(files) != 1:
            raise XnatError(400, f"The import service takes exactly one file per request; "
                                 f"received {len(files)}")
        if not files:
            return body, "UNKNOWN"
        fmt = format_of(files[0].content_type, files[0].filename)
        target = body.with_name("upload-part")
        copy_range(body, files[0].start, files[0].end, target)
        return target, fmt

    def _salvage(self, user: str, params: dict[str, str], fmt: str, upload: Path, work: Path,
                 req: Request) -> None:
        """A cut upload: close the socket first, then keep what XNAT had already filed."""
        req.drop()
        if fmt != "UNKNOWN":
            entries = iter_entries(fmt, upload, work, complete=False)
            for entry in self.importer.salvage(user, params, entries):
                entry.message = "upload interrupted"
        raise Dropped("upload dropped")


def scan_rows(scans: dict[str, list[StoredFile]], base: str, xsi: str) -> list[dict[str, str]]:
    return [{"ID": sid, "type": files[0].series_description,
             "series_description": files[0].series_description, "quality": "usable",
             "xsiType": xsi, "note": "", "UID": files[0].series_uid,
             "URI": f"{base}/scans/{sid}", "file_count": str(len(files))}
            for sid, files in scans.items()]


def pick_files(files: Iterable[StoredFile], scans: str, res: str) -> list[StoredFile]:
    """`ALL` or a comma list of scan IDs; only the DICOM resource exists here."""
    if res not in ("DICOM", "ALL"):
        return []
    wanted = None if scans == "ALL" else set(scans.split(","))
    chosen = [f for f in files if wanted is None or f.scan_id in wanted]
    return sorted(chosen, key=lambda f: (scan_sort_key(f.scan_id), f.name))


def file_rows(files: list[StoredFile], base: str) -> list[dict[str, str]]:
    return [{"Name": f.name, "Size": str(f.size),
             "URI": f"{base}/scans/{f.scan_id}/resources/DICOM/files/{f.name}",
             "collection": "DICOM", "file_tags": "", "file_format": "DICOM",
             "file_content": "RAW", "cat_ID": f.scan_id, "digest": f.digest}
            for f in files]
