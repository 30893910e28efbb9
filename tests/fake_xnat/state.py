"""In-memory model of a fake XNAT: users, sessions, tokens, prearchive and archive.

Files live under the state directory; everything else lives in memory behind one lock.
All public methods of XnatState take the lock themselves, so the HTTP layer can call
them from any thread.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import re
import secrets
import shutil
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

UNASSIGNED = "Unassigned"
REALM = 'Basic realm="XNAT Protected Area"'
SITE_ID = "XNAT"
WRITE_LEVELS = frozenset({"write", "owner", "member", "edit", "delete"})
READ_LEVELS = WRITE_LEVELS | {"read", "collaborator"}
# XNAT files more data into a prearchive entry only while it is still receiving: once built
# (READY, by commit or the idle timer) or failed, new files split off into a `label_1` folder.
JOINABLE = frozenset({"RECEIVING", "RECEIVING_INTERRUPT"})
LOCKED = frozenset({"BUILDING", "ARCHIVING", "MOVING", "DELETING", "SEPARATING"})
OVERWRITE_MODES = {"": None, "none": None, "false": None, "append": "append",
                   "delete": "delete", "override": "delete"}
XSI_TYPES = {"MR": "xnat:mrSessionData", "CT": "xnat:ctSessionData", "PT": "xnat:petSessionData",
             "CR": "xnat:crSessionData", "US": "xnat:usSessionData"}

DEFAULT_CONFIG: dict[str, Any] = {
    "users": {
        "admin": {"password": "admin", "admin": True},
        "alice": {"password": "alice-pw", "projects": {"TEST": "write", "OTHER": "read"}},
        "bob": {"password": "bob-pw", "projects": {}},
    },
    "projects": {
        "TEST": {"name": "Test project"},
        "OTHER": {"name": "Other project"},
        "SECRET": {"name": "Nobody but admin"},
    },
    "tokens": [],
    "session_timeout_seconds": 900,
    "token_lifetime_seconds": 172800,
    "auto_build_seconds": 300,
    "error_format": "text",
    "import_archive_conflict_status": 409,
    "version": "1.8.10",
}


class XnatError(Exception):
    """An answer other than success: HTTP status, message and extra headers."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


class ArchiveConflict(XnatError):
    """An archive-stage failure; the prearchive entry goes to CONFLICT."""

    def __init__(self, reason: str):
        super().__init__(500, f"FAILED: {reason}")
        self.reason = reason


def unauthorized() -> XnatError:
    return XnatError(401, "Unauthorized", {"WWW-Authenticate": REALM})


def clean_label(value: str) -> str:
    """DICOM-derived labels: anything outside [A-Za-z0-9_-] becomes '_' (as XNAT does)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", value.strip())


def xnat_time(t: float) -> str:
    dt = datetime.fromtimestamp(t)
    return dt.strftime("%Y-%m-%d %H:%M:%S.") + f"{dt.microsecond // 1000:03d}"


def dicom_date(value: str) -> str:
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if len(value) >= 8 else ""


def dicom_time(value: str) -> str:
    return f"{value[:2]}:{value[2:4]}:{value[4:6]}" if len(value) >= 6 else ""


def scan_sort_key(scan_id: str) -> tuple[int, str]:
    head = re.match(r"\d+", scan_id)
    return (int(head.group()) if head else 1 << 62, scan_id)


@dataclass
class Instance:
    """The header fields of one DICOM object that the import service needs."""

    sop_class_uid: str
    sop_uid: str
    study_uid: str
    series_uid: str
    series_number: str
    instance_number: str
    patient_id: str = ""
    patient_name: str = ""
    modality: str = ""
    series_description: str = ""
    study_date: str = ""
    study_time: str = ""
    routing: tuple[str, str, str] = ("", "", "")  # project, subject, session from headers


@dataclass
class StoredFile:
    name: str
    path: Path
    size: int
    sop_uid: str
    sop_class_uid: str
    series_uid: str
    scan_id: str
    instance_number: str
    series_description: str
    modality: str
    digest: str  # MD5, computed when the file was filed (see XnatState.add_file)

    def to_json(self, root: Path, digests: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name, "path": str(self.path.relative_to(root)), "size": self.size,
            "sop_uid": self.sop_uid, "series_uid": self.series_uid, "scan": self.scan_id,
        }
        if digests:
            out["digest"] = self.digest
        return out


def file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def scans_of(files: Iterable[StoredFile]) -> dict[str, list[StoredFile]]:
    """Group files into scans by scan ID, in XNAT's numeric order."""
    groups: dict[str, list[StoredFile]] = {}
    for f in files:
        groups.setdefault(f.scan_id, []).append(f)
    return {k: groups[k] for k in sorted(groups, key=scan_sort_key)}


@dataclass
class PrearcEntry:
    project: str
    timestamp: str
    folder: str
    name: str
    subject: str
    tag: str
    directory: Path
    uploaded: float
    lastmod: float
    status: str = "RECEIVING"
    scan_date: str = ""
    scan_time: str = ""
    modality: str = ""
    prevent_auto_commit: bool = False
    prevent_anon: bool = False
    source: str = ""
    visit: str = ""
    protocol: str = ""
    timezone: str = ""
    autoarchive: str = "Manual"
    message: str = ""
    files: dict[str, StoredFile] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.project, self.timestamp, self.folder)

    @property
    def url(self) -> str:
        return f"/prearchive/projects/{self.project}/{self.timestamp}/{self.folder}"

    def row(self) -> dict[str, str]:
        """One ResultSet row as XNAT's prearchive listing renders it (all strings)."""
        return {
            "project": self.project, "timestamp": self.timestamp,
            "lastmod": xnat_time(self.lastmod), "uploaded": xnat_time(self.uploaded),
            "scan_date": self.scan_date, "scan_time": self.scan_time, "subject": self.subject,
            "folderName": self.folder, "name": self.name, "tag": self.tag, "status": self.status,
            "url": self.url, "autoarchive": self.autoarchive,
            "prevent_anon": str(self.prevent_anon).lower(),
            "prevent_auto_commit": str(self.prevent_auto_commit).lower(),
            "SOURCE": self.source, "VISIT": self.visit, "PROTOCOL": self.protocol,
            "TIMEZONE": self.timezone,
            # Fake-only extras, so a client test can compare counts without listing files.
            "file_count": str(len(self.files)),
            "total_size": str(sum(f.size for f in self.files.values())),
            "message": self.message,
        }


@dataclass
class ArchiveSession:
    id: str
    project: str
    subject_label: str
    subject_id: str
    label: str
    uid: str
    directory: Path
    modality: str = ""
    date: str = ""
    time: str = ""
    insert_date: float = 0.0
    files: dict[str, StoredFile] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return (f"/data/archive/projects/{self.project}/subjects/{self.subject_label}"
                f"/experiments/{self.label}")

    @property
    def xsi_type(self) -> str:
        return XSI_TYPES.get(self.modality, "xnat:otherDicomSessionData")


@dataclass
class Auth:
    user: str
    session_id: str
    mode: str  # "cookie", "basic" or "token"
    new_session: bool


@dataclass
class Destination:
    """Where an import or archive request asks the data to go."""

    project: str = ""
    subject: str = ""
    session: str = ""
    archive: bool = False
    given: bool = False


def parse_dest(dest: str | None) -> Destination:
    """Parse `dest`: /prearchive[/projects/P], /archive/projects/P[/subjects/S[/experiments/E]]."""
    if not dest:
        return Destination()
    parts = [p for p in dest.split("/") if p]
    if parts and parts[0] == "data":
        parts = parts[1:]
    if not parts or parts[0] not in ("prearchive", "archive"):
        raise XnatError(400, f"Invalid destination: {dest}")
    out = Destination(archive=parts[0] == "archive", given=True)
    keys = {"projects": "project", "subjects": "subject", "experiments": "session"}
    rest = parts[1:]
    if len(rest) % 2 or any(k not in keys for k in rest[::2]):
        raise XnatError(400, f"Invalid destination: {dest}")
    for k, v in zip(rest[::2], rest[1::2], strict=True):
        setattr(out, keys[k], v)
    if out.archive and not out.project:
        raise XnatError(400, f"Invalid destination: {dest} (no project)")
    return out


def overwrite_mode(value: str | None) -> str | None:
    key = (value or "").strip().lower()
    if key not in OVERWRITE_MODES:
        raise XnatError(400, f"Invalid overwrite value: {value}")
    return OVERWRITE_MODES[key]


class XnatState:
    """Everything the fake server knows; one instance per server process."""

    def __init__(self, config: Mapping[str, Any] | None, state_dir: Path):
        self.lock = threading.RLock()
        self.state_dir = state_dir
        self.startup_config = merge_config(config)
        self.reset()

    # ---- lifecycle -------------------------------------------------------------------

    def reset(self, config: Mapping[str, Any] | None = None) -> None:
        """Forget all data and sessions; optionally load a new config."""
        with self.lock:
            self.config = merge_config(config) if config is not None else copy.deepcopy(
                self.startup_config)
            self.users: dict[str, dict[str, Any]] = self.config["users"]
            self.projects: dict[str, dict[str, Any]] = self.config["projects"]
            self.sessions: dict[str, dict[str, Any]] = {}
            self.tokens: dict[str, dict[str, Any]] = {}
            now = time.time()
            for t in self.config.get("tokens", []):
                lifetime = float(t.get("lifetime_seconds", self.config["token_lifetime_seconds"]))
                self.tokens[t["alias"]] = {"alias": t["alias"], "secret": t["secret"],
                                           "user": t["user"], "expires": now + lifetime}
            self.prearchive: dict[tuple[str, str, str], PrearcEntry] = {}
            self.archive: dict[tuple[str, str], ArchiveSession] = {}
            self.subjects: dict[tuple[str, str], str] = {}  # (project, label) -> subject ID
            self.counters = {"subject": 0, "experiment": 0}
            self.last_ts_ms = 0
            self.sessions_created = 0
            for sub in ("prearchive", "archive", "tmp"):
                shutil.rmtree(self.state_dir / sub, ignore_errors=True)
                (self.state_dir / sub).mkdir(parents=True, exist_ok=True)

    def tmp_dir(self) -> Path:
        d = self.state_dir / "tmp" / uuid.uuid4().hex
        d.mkdir(parents=True)
        return d

    # ---- authentication --------------------------------------------------------------

    def authenticate(self, user: str | None, password: str | None,
                     cookie_sid: str | None) -> Auth:
        """A live JSESSIONID wins; else Basic (user or alias token) opens a new session."""
        with self.lock:
            now = time.time()
            sess = self.sessions.get(cookie_sid or "")
            if sess and now - sess["last"] <= self.config["session_timeout_seconds"]:
                sess["last"] = now
                return Auth(sess["user"], cookie_sid or "", "cookie", False)
            if sess:
                del self.sessions[cookie_sid or ""]
            if user is None or password is None:
                raise unauthorized()
            mode = self._check_password(user, password, now)
            real_user = user if mode == "basic" else self.tokens[user]["user"]
            return Auth(real_user, self._new_session(real_user, now), mode, True)

    def _check_password(self, user: str, password: str, now: float) -> str:
        account = self.users.get(user)
        if account and secrets.compare_digest(str(account.get("password", "")), password):
            return "basic"
        token = self.tokens.get(user)
        if token and secrets.compare_digest(token["secret"], password) and \
                now < token["expires"] and token["user"] in self.users:
            return "token"
        raise unauthorized()

    def _new_session(self, user: str, now: float) -> str:
        sid = secrets.token_hex(16).upper()
        self.sessions[sid] = {"user": user, "created": now, "last": now}
        self.sessions_created += 1
        return sid

    def logout(self, sid: str) -> None:
        with self.lock:
            self.sessions.pop(sid, None)

    def expire_sessions(self) -> int:
        with self.lock:
            n = len(self.sessions)
            self.sessions.clear()
            return n

    def expire_tokens(self) -> int:
        with self.lock:
            for t in self.tokens.values():
                t["expires"] = 0.0
            return len(self.tokens)

    def issue_token(self, user: str) -> dict[str, Any]:
        with self.lock:
            now = time.time()
            alias, secret = str(uuid.uuid4()), secrets.token_urlsafe(48)
            expires = now + float(self.config["token_lifetime_seconds"])
            self.tokens[alias] = {"alias": alias, "secret": secret, "user": user,
                                  "expires": expires}
            return {"alias": alias, "secret": secret, "xdatUserId": user,
                    "estimatedExpirationTime": int(expires * 1000), "enabled": True,
                    "singleUse": False, "created": int(now * 1000), "validIPAddresses": []}

    def invalidate_token(self, alias: str, secret: str) -> bool:
        with self.lock:
            token = self.tokens.get(alias)
            if token and token["secret"] == secret:
                del self.tokens[alias]
                return True
            return False

    # ---- permissions -----------------------------------------------------------------

    def level(self, user: str, project: str) -> str | None:
        account = self.users.get(user, {})
        if account.get("admin"):
            return "write"
        if project == UNASSIGNED or project not in self.projects:
            return None
        granted = str(account.get("projects", {}).get(project, "")).lower()
        if granted in WRITE_LEVELS:
            return "write"
        return "read" if granted in READ_LEVELS else None

    def can_write(self, user: str, project: str) -> bool:
        return self.level(user, project) == "write"

    def require_project(self, user: str, project: str, write: bool = False) -> None:
        """404 for a project that does not exist, 403 for one the user may not use."""
        if project == UNASSIGNED:
            if not self.users.get(user, {}).get("admin"):
                raise XnatError(403, f"User {user} does not have access to the Unassigned "
                                     "prearchive")
            return
        if project not in self.projects:
            raise XnatError(404, f"Unable to find project {project}")
        granted = self.level(user, project)
        if granted is None or (write and granted != "write"):
            raise XnatError(403, f"Specified user account has insufficient privileges for "
                                 f"project {project}")

    def visible_projects(self, user: str) -> list[str]:
        with self.lock:
            return [p for p in self.projects if self.level(user, p)]

    # ---- prearchive ------------------------------------------------------------------

    def new_timestamp(self) -> str:
        ms = max(int(time.time() * 1000), self.last_ts_ms + 1)
        self.last_ts_ms = ms
        dt = datetime.fromtimestamp(ms / 1000)
        return dt.strftime("%Y%m%d_%H%M%S") + f"{ms % 1000:03d}"

    def find_entry(self, project: str, tag: str, label: str) -> PrearcEntry | None:
        for e in self.prearchive.values():
            if e.project == project and e.tag == tag and e.name == label and \
                    e.status in JOINABLE:
                return e
        return None

    def open_entry(self, project: str, subject: str, label: str, inst: Instance,
                   opts: Mapping[str, Any]) -> PrearcEntry:
        """Join the open entry with the same project, StudyInstanceUID and label, or start one."""
        entry = self.find_entry(project, inst.study_uid, label)
        if entry is not None:
            return entry
        taken = {e.folder for e in self.prearchive.values()
                 if e.project == project and e.name == label}
        folder, n = label, 0
        while folder in taken:  # a closed entry with this label: XNAT splits into label_1
            n += 1
            folder = f"{label}_{n}"
        ts, now = self.new_timestamp(), time.time()
        auto = self.projects.get(project, {}).get("auto_archive")
        entry = PrearcEntry(
            project=project, timestamp=ts, folder=folder, name=label, subject=subject,
            tag=inst.study_uid, directory=self.state_dir / "prearchive" / project / ts / folder,
            uploaded=now, lastmod=now, scan_date=dicom_date(inst.study_date),
            scan_time=dicom_time(inst.study_time), modality=inst.modality,
            prevent_auto_commit=bool(opts.get("prevent_auto_commit")),
            prevent_anon=bool(opts.get("prevent_anon")), source=str(opts.get("SOURCE", "")),
            autoarchive="AutoArchive" if auto else "Manual")
        self.prearchive[entry.key] = entry
        return entry

    def add_file(self, entry: PrearcEntry, inst: Instance, data: bytes | None,
                 src: Path | None, md5: str | None = None) -> StoredFile:
        """Store one instance; the same SOPInstanceUID replaces the earlier file.

        The file's MD5 is computed here, when it is filed, and stored with it; listings
        serve the stored digest. That is what XNAT does: with checksums enabled (its site
        setting `checksums`), CatalogUtils.calculateResourceChecksums/setChecksum put an
        MD5 in each catalog entry's `digest` when the entry is cataloged (only if none is
        there yet), and the file listing (CatalogUtils.getEntryDetails) returns
        entry.getDigest() without reading the file (NrgXnat/xnat-web,
        src/main/java/org/nrg/xnat/utils/CatalogUtils.java). md5: the digest of `src`,
        taken while it was written to disk (uploads.HashingWriter); a file held in memory
        is hashed from `data`. Only a file at `src` with no digest (a gradual-DICOM file
        over 4 MiB sent as multipart, or salvaged from a dropped upload) is re-read.
        """
        scan_id = self._scan_id(entry, inst)
        digest = hashlib.sha1(f"{inst.sop_class_uid}{inst.sop_uid}".encode()).hexdigest()[:8]
        # XNAT's default naming: StudyUID-SeriesNumber-InstanceNumber-hash(SOP class+instance)
        name = (f"{inst.study_uid}-{inst.series_number or 0}-{inst.instance_number or 0}-"
                f"{digest}.dcm")
        path = entry.directory / "SCANS" / scan_id / "DICOM" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        old = entry.files.get(inst.sop_uid)
        if old is not None and old.path != path:
            old.path.unlink(missing_ok=True)
        if src is not None:
            md5 = md5 or file_md5(src)
            os.replace(src, path)
        else:
            md5 = hashlib.md5(data or b"").hexdigest()
            path.write_bytes(data or b"")
        stored = StoredFile(name=name, path=path, size=path.stat().st_size, sop_uid=inst.sop_uid,
                            sop_class_uid=inst.sop_class_uid, series_uid=inst.series_uid,
                            scan_id=scan_id, instance_number=inst.instance_number,
                            series_description=inst.series_description, modality=inst.modality,
                            digest=md5)
        entry.files[inst.sop_uid] = stored
        entry.lastmod = time.time()
        entry.status = "RECEIVING"
        return stored

    @staticmethod
    def _scan_id(entry: PrearcEntry, inst: Instance) -> str:
        """Scan ID = SeriesNumber; a second series with the same number gets a suffix."""
        owners: dict[str, str] = {}
        for f in entry.files.values():
            if f.series_uid == inst.series_uid and f.sop_uid != inst.sop_uid:
                return f.scan_id
            owners.setdefault(f.scan_id, f.series_uid)
        base = inst.series_number or inst.series_uid.rsplit(".", 1)[-1] or "0"
        candidate, n = base, 0
        while owners.get(candidate, inst.series_uid) != inst.series_uid:
            n += 1
            candidate = f"{base}-{n}"
        return candidate

    def get_entry(self, user: str, project: str, ts: str, folder: str,
                  write: bool = False) -> PrearcEntry:
        self.require_project(user, project, write=write)
        entry = self.prearchive.get((project, ts, folder))
        if entry is None:
            raise XnatError(404, f"Unable to find prearchive session {project}/{ts}/{folder}")
        return entry

    def entries_for(self, user: str, project: str | None) -> list[PrearcEntry]:
        with self.lock:
            if project is not None:
                self.require_project(user, project)
                return [e for e in self.prearchive.values() if e.project == project]
            # level() grants admins every project, Unassigned included.
            return [e for e in self.prearchive.values() if self.level(user, e.project)]

    def build(self, entry: PrearcEntry) -> None:
        if entry.status in LOCKED:
            raise XnatError(409, "session document locked")
        entry.status = "READY"
        entry.message = ""
        entry.lastmod = time.time()

    def commit(self, user: str, project: str, ts: str, folder: str) -> tuple[int, str]:
        """action=commit: build the entry; a project with auto_archive archives it (301)."""
        with self.lock:
            entry = self.get_entry(user, project, ts, folder, write=True)
            self.build(entry)
            if not self.projects.get(project, {}).get("auto_archive"):
                return 200, "/data" + entry.url
            try:
                session = self.archive_entry(user, entry, Destination(), None, False)
            except XnatError:
                return 200, "/data" + entry.url  # stays in the prearchive as CONFLICT
            return 301, session.uri

    def delete_entry(self, user: str, project: str, ts: str, folder: str) -> None:
        with self.lock:
            entry = self.get_entry(user, project, ts, folder, write=True)
            self.drop_entry(entry)

    def drop_entry(self, entry: PrearcEntry) -> None:
        self.prearchive.pop(entry.key, None)
        shutil.rmtree(entry.directory, ignore_errors=True)

    def tick(self) -> None:
        """XNAT builds a RECEIVING entry once it has been idle (unless prevent_auto_commit)."""
        with self.lock:
            idle = float(self.config["auto_build_seconds"])
            now = time.time()
            for e in list(self.prearchive.values()):
                if e.status == "RECEIVING" and not e.prevent_auto_commit and \
                        now - e.lastmod >= idle:
                    e.status = "READY"
                    if self.projects.get(e.project, {}).get("auto_archive"):
                        with contextlib.suppress(XnatError):
                            self.archive_entry(None, e, Destination(), None, False)

    # ---- archive ---------------------------------------------------------------------

    def archive_entry(self, user: str | None, entry: PrearcEntry, dest: Destination,
                      mode: str | None, overwrite_files: bool) -> ArchiveSession:
        """Move a prearchive entry into the archive following XNAT's merge rules.

        user=None is the server itself (auto-archive), which skips permission checks.
        """
        with self.lock:
            if entry.project == UNASSIGNED:
                raise XnatError(400, "Cannot archive sessions from the Unassigned folder.")
            project = dest.project or entry.project
            if user is not None:
                self.require_project(user, entry.project, write=True)
                if project != entry.project and not self.can_write(user, project):
                    raise XnatError(403, "Invalid permissions for new project.")
            if project not in self.projects:
                raise XnatError(404, f"Unable to find project {project}")
            label = dest.session or entry.name
            existing = self.archive.get((project, label))
            try:
                plan = self._merge_plan(entry, existing, dest, mode, overwrite_files)
            except ArchiveConflict as exc:
                entry.status, entry.message = "CONFLICT", exc.message
                raise
            subject = dest.subject or (existing.subject_label if existing else entry.subject)
            session = existing or self._new_session_record(project, subject, label, entry)
            self._move_files(entry, session, plan)
            self.drop_entry(entry)
            return session

    def _merge_plan(self, entry: PrearcEntry, existing: ArchiveSession | None,
                    dest: Destination, mode: str | None, overwrite_files: bool) -> set[str]:
        """Check conflicts before anything moves; return the archived scan IDs to replace."""
        if existing is None:
            return set()
        if mode is None:
            raise ArchiveConflict("Session already exists, retry with overwrite enabled")
        if existing.uid != entry.tag:
            raise ArchiveConflict("Invalid modification of session UID via archive process.")
        if dest.subject and dest.subject != existing.subject_label:
            raise ArchiveConflict("Invalid modification of session subject via archive "
                                  "process.")
        old_scans = scans_of(existing.files.values())
        replace: set[str] = set()
        for scan_id, files in scans_of(entry.files.values()).items():
            if scan_id not in old_scans:
                continue
            same_uid = old_scans[scan_id][0].series_uid == files[0].series_uid
            if mode == "delete":
                if not same_uid:
                    replace.add(scan_id)  # override: the new series replaces the old scan
            elif same_uid and not overwrite_files:
                raise ArchiveConflict(f"Session already contains a scan ({scan_id}) with the "
                                      "same UID and number.")
            elif not same_uid:
                raise ArchiveConflict(f"Session already contains a scan ({scan_id}) with a "
                                      "different UID.")
        return replace

    def _new_session_record(self, project: str, subject: str, label: str,
                            entry: PrearcEntry) -> ArchiveSession:
        if (project, subject) not in self.subjects:
            self.counters["subject"] += 1
            self.subjects[(project, subject)] = f"{SITE_ID}_S{self.counters['subject']:05d}"
        self.counters["experiment"] += 1
        session = ArchiveSession(
            id=f"{SITE_ID}_E{self.counters['experiment']:05d}", project=project,
            subject_label=subject, subject_id=self.subjects[(project, subject)], label=label,
            uid=entry.tag, directory=self.state_dir / "archive" / project / "arc001" / label,
            modality=entry.modality, date=entry.scan_date, time=entry.scan_time,
            insert_date=time.time())
        self.archive[(project, label)] = session
        return session

    @staticmethod
    def _move_files(entry: PrearcEntry, session: ArchiveSession, replace: set[str]) -> None:
        for sop, f in list(session.files.items()):
            if f.scan_id in replace:
                f.path.unlink(missing_ok=True)
                del session.files[sop]
        for sop, f in entry.files.items():
            target = session.directory / "SCANS" / f.scan_id / "DICOM" / f.name
            target.parent.mkdir(parents=True, exist_ok=True)
            old = session.files.get(sop)
            if old is not None and old.path != target:
                old.path.unlink(missing_ok=True)
            os.replace(f.path, target)
            f.path = target
            session.files[sop] = f

    def find_session(self, user: str, project: str | None, experiment: str,
                     subject: str | None = None) -> ArchiveSession:
        """Look an experiment up by label (within a project) or by accession ID."""
        with self.lock:
            if project is not None:
                self.require_project(user, project)
            for s in self.archive.values():
                if (project is None or s.project == project) and experiment in (s.id, s.label):
                    if subject is not None and subject not in (s.subject_label, s.subject_id):
                        continue
                    if project is None:
                        self.require_project(user, s.project)
                    return s
            raise XnatError(404, f"Unable to find experiment {experiment}")

    # ---- snapshot --------------------------------------------------------------------

    def snapshot(self, digests: bool = False) -> dict[str, Any]:
        with self.lock:
            root = self.state_dir
            return {
                "config": {k: v for k, v in self.config.items() if k not in ("users", "projects")},
                "users": copy.deepcopy(self.users),
                "projects": copy.deepcopy(self.projects),
                "sessions": [{"id": k, "user": v["user"], "idle_seconds": time.time() - v["last"]}
                             for k, v in self.sessions.items()],
                "sessions_created": self.sessions_created,
                "tokens": [{"alias": t["alias"], "user": t["user"], "expires": t["expires"]}
                           for t in self.tokens.values()],
                "prearchive": [dict(e.row(), files=[f.to_json(root, digests)
                                                    for f in e.files.values()])
                               for e in self.prearchive.values()],
                "archive": [{"ID": s.id, "project": s.project, "subject": s.subject_label,
                             "subject_ID": s.subject_id, "label": s.label, "UID": s.uid,
                             "uri": s.uri, "scans": sorted(scans_of(s.files.values()),
                                                           key=scan_sort_key),
                             "files": [f.to_json(root, digests) for f in s.files.values()]}
                            for s in self.archive.values()],
            }


def merge_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Defaults for every key the caller leaves out (users/projects replace, not merge)."""
    merged = copy.deepcopy(DEFAULT_CONFIG)
    for key, value in (config or {}).items():
        merged[key] = copy.deepcopy(value)
    for name, account in merged["users"].items():
        account.setdefault("projects", {})
        account.setdefault("password", name)
    for pid, project in merged["projects"].items():
        project.setdefault("name", pid)
    return merged
