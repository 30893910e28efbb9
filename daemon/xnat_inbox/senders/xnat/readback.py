"""Reading back what XNAT holds: prearchive rows, scans and files of a session, compared with
what was sent; and the site's remedy for each kind of conflict."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .session import XnatClient, XnatHttpError

FAILED_STATES = ("CONFLICT", "ERROR")


@dataclass
class Expected:
    """What was sent for one study: files and bytes per series (by SeriesInstanceUID)."""

    files: Counter[str] = field(default_factory=Counter)
    bytes: Counter[str] = field(default_factory=Counter)
    numbers: dict[str, str] = field(default_factory=dict)  # series UID -> SeriesNumber

    def add(self, series_uid: str, number: str, size: int) -> None:
        self.files[series_uid] += 1
        self.bytes[series_uid] += size
        self.numbers[series_uid] = number


@dataclass
class Held:
    """What XNAT holds of a session: files and bytes per series UID (None: not listed)."""

    files: Counter[str | None] = field(default_factory=Counter)
    bytes: Counter[str | None] = field(default_factory=Counter)
    sizes_known: bool = True


def rows(payload: Any) -> list[dict[str, Any]]:
    """The rows of a ResultSet answer (tolerant of a missing or odd shape)."""
    try:
        result = payload["ResultSet"]["Result"]
    except (KeyError, TypeError):
        return []
    return [row for row in result if isinstance(row, dict)] if isinstance(result, list) else []


def project_of(uri: str) -> str | None:
    match = re.search(r"/projects/([^/]+)", uri)
    return match.group(1) if match else None


def prearchive_row(client: XnatClient, entry: str) -> dict[str, Any] | None:
    """The listing row of a prearchive entry (/data/prearchive/projects/P/TS/F), or None."""
    project = project_of(entry) or ""
    wanted = entry.removeprefix("/data")
    for row in rows(client.get_json(f"/data/prearchive/projects/{project}")):
        if str(row.get("url", "")).removeprefix("/data") == wanted:
            return row
    return None


def held(client: XnatClient, session: str) -> Held:
    """Files per series of a prearchive entry or an archived session (URIs as XNAT gave them)."""
    scans = rows(client.get_json(f"{session}/scans"))
    uid_of = {str(row.get("ID")): str(row["UID"]) for row in scans if row.get("UID")}
    result = Held()
    for row in rows(client.get_json(f"{session}/scans/ALL/files")):
        scan = str(row.get("cat_ID") or _scan_in_uri(str(row.get("URI", ""))) or "")
        uid = uid_of.get(scan)
        result.files[uid] += 1
        size = str(row.get("Size", "")).strip()
        if size.isdigit():
            result.bytes[uid] += int(size)
        else:
            result.sizes_known = False
    return result


def _scan_in_uri(uri: str) -> str | None:
    match = re.search(r"/scans/([^/]+)/", uri)
    return match.group(1) if match else None


def shortfall(expected: Expected, found: Held) -> str | None:
    """None when XNAT holds at least what was sent, series by series; else the numbers."""
    want = sum(expected.files.values())
    if None in found.files or not found.files:
        # scans without a series UID: compare the session's total only
        have = sum(found.files.values())
        return None if have >= want else f"XNAT holds {have} of the {want} file(s) sent"
    missing = [f"series {expected.numbers[uid] or uid}: {found.files[uid]} of {count}"
               for uid, count in expected.files.items() if found.files[uid] < count]
    if not missing:
        return None
    have = sum(min(found.files[uid], count) for uid, count in expected.files.items())
    return (f"XNAT holds {have} of the {want} file(s) sent ({want - have} missing; "
            f"{'; '.join(missing)})")


def size_note(expected: Expected, found: Held) -> str | None:
    """Bytes differ where the file count matches: XNAT's anonymisation may rewrite headers."""
    if not found.sizes_known:
        return None
    differ = [uid for uid, count in expected.files.items()
              if found.files[uid] == count and found.bytes[uid] != expected.bytes[uid]]
    if not differ:
        return None
    sent = sum(expected.bytes[uid] for uid in differ)
    stored = sum(found.bytes[uid] for uid in differ)
    return f"{len(differ)} series hold {stored} bytes for {sent} sent (anonymised by XNAT?)"


def remedy(message: str) -> str:
    """The site's advice for an archive conflict, from XNAT's message."""
    if re.search(r"scan \(.*\) with (the same|a different) UID|session UID", message, re.I):
        return ("UID conflict: resolve it in XNAT's Prearchive (review, then archive or "
                "delete the entry), or send with overwrite: delete")
    if re.search(r"already exists|session subject|label", message, re.I):
        return ("label clash: a session with this label already exists; choose another "
                "session label, or set overwrite: append (merge) or delete in the route")
    return "resolve it in XNAT's Prearchive"


def conflict_error(client: XnatClient, exc: XnatHttpError, entry: str) -> XnatHttpError:
    """An archive failure: quote XNAT, name the remedy, and where the data waits."""
    state = ""
    try:
        row = prearchive_row(client, entry)
    except XnatHttpError:
        row = None
    if row is not None:
        state = f"; the session waits in the prearchive at {entry} ({row.get('status')})"
    message = exc.xnat_message or str(exc)
    return XnatHttpError(f"XNAT refused to archive: {message} -> {remedy(message)}{state}",
                         transient=False, status=exc.status, xnat_message=message)


def failed_state_error(row: dict[str, Any], entry: str) -> XnatHttpError:
    message = str(row.get("message") or "no message")
    return XnatHttpError(f"the session is in {row.get('status')} in the prearchive ({entry}): "
                         f"{message} -> {remedy(message)}", transient=False,
                         xnat_message=message)
