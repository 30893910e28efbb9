"""The fake XNAT server against the REST behaviour documented in shared/xnat-rest.md.

Real HTTP (http.client) against the server running as a subprocess; zips built with
zipfile from tiny DICOM objects made by pydicom.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import os
import re
import socket
import struct
import tarfile
import time
import uuid
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import pydicom
import pytest
from pydicom.uid import generate_uid

try:  # `python -m pytest` from the repo root puts the root on sys.path
    from tests.fake_xnat import FakeXnat
    from tests.fake_xnat.dicomgen import Study, build_zip, make_instance
except ImportError:  # plain `pytest` with tests/ as a rootdir-less folder
    from fake_xnat import FakeXnat  # type: ignore[no-redef]
    from fake_xnat.dicomgen import Study, build_zip, make_instance  # type: ignore[no-redef]

pytestmark = [pytest.mark.xnat, pytest.mark.timeout(60)]

PASSWORDS = {"alice": "alice-pw", "bob": "bob-pw", "admin": "admin"}
PREARC_URI = re.compile(r"^/data/prearchive/projects/(\w+)/(\d{8}_\d{9})/([\w-]+)$")
ROW_KEYS = {"project", "timestamp", "lastmod", "uploaded", "scan_date", "scan_time", "subject",
            "folderName", "name", "tag", "status", "url", "autoarchive", "prevent_anon",
            "prevent_auto_commit", "SOURCE", "VISIT", "PROTOCOL", "TIMEZONE"}


# ---- HTTP helpers ----------------------------------------------------------------------

@dataclass
class Resp:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def rows(self) -> list[dict[str, str]]:
        return self.json()["ResultSet"]["Result"]

    @property
    def uri(self) -> str:
        assert self.headers.get_content_type() == "text/uri-list", self.text
        assert self.text.endswith("\r\n")
        return self.text.strip()


def basic(user: str, password: str | None = None) -> str:
    secret = password if password is not None else PASSWORDS[user]
    return "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()


def call(x: FakeXnat, method: str, path: str, *, user: str | None = "alice",
         password: str | None = None, body: bytes | Iterable[bytes] | None = None,
         headers: Mapping[str, str] | None = None,
         conn: http.client.HTTPConnection | None = None) -> Resp:
    """One request; user=None sends no Authorization header."""
    hdrs = dict(headers or {})
    if user is not None:
        hdrs["Authorization"] = basic(user, password)
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", x.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        return Resp(resp.status, resp.headers, resp.read())
    finally:
        if own:
            conn.close()


def import_path(**params: str) -> str:
    return "/data/services/import?" + urlencode({"import-handler": "DICOM-zip", **params})


def upload(x: FakeXnat, data: bytes, params: Mapping[str, str], *, user: str = "alice",
           chunked: bool = False, content_type: str = "application/zip") -> Resp:
    """POST a zip to the import service, with a length or chunked (unknown length)."""
    body: bytes | Iterator[bytes] = data
    if chunked:
        body = iter([data[i:i + 4096] for i in range(0, len(data), 4096)])
    return call(x, "POST", import_path(**params), user=user, body=body,
                headers={"Content-Type": content_type})


def labels(project: str = "TEST", subject: str = "S1", session: str = "E1",
           **extra: str) -> dict[str, str]:
    return {"PROJECT_ID": project, "SUBJECT_ID": subject, "EXPT_LABEL": session, **extra}


def archive_dest(project: str = "TEST", subject: str = "S1", session: str = "E1") -> str:
    return f"/archive/projects/{project}/subjects/{subject}/experiments/{session}"


def entry_row(x: FakeXnat, uri: str, user: str = "alice") -> dict[str, str]:
    resp = call(x, "GET", uri + "?format=json", user=user)
    assert resp.status == 200, resp.text
    return resp.rows[0]


def archived_files(x: FakeXnat, session: str = "E1", subject: str = "S1",
                   project: str = "TEST") -> list[dict[str, str]]:
    resp = call(x, "GET", f"/data/projects/{project}/subjects/{subject}/experiments/{session}"
                          "/scans/ALL/files?format=json")
    assert resp.status == 200, resp.text
    return resp.rows


def archive(x: FakeXnat, src: str, **params: str) -> Resp:
    form = urlencode({"src": src.removeprefix("/data"), **params}).encode()
    return call(x, "POST", "/data/services/archive", body=form,
                headers={"Content-Type": "application/x-www-form-urlencoded"})


def multipart(files: list[tuple[str, bytes]], fields: Mapping[str, str] | None = None
              ) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = bytearray()
    for name, value in (fields or {}).items():
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                f"{value}\r\n").encode()
    for filename, data in files:
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                f'filename="{filename}"\r\nContent-Type: application/zip\r\n\r\n').encode()
        out += data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def wait_for(predicate: Any, timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


# ---- fixtures --------------------------------------------------------------------------

@pytest.fixture
def xnat(shared_xnat: FakeXnat) -> FakeXnat:
    shared_xnat.reset()
    return shared_xnat


@pytest.fixture(scope="module")
def study() -> Study:
    return Study(series=2, per_series=3)


# ---- auth ------------------------------------------------------------------------------

def test_basic_auth_required_with_xnat_realm(xnat: FakeXnat) -> None:
    for user, password in ((None, None), ("alice", "wrong"), ("nobody", "x")):
        resp = call(xnat, "GET", "/data/projects?format=json", user=user, password=password)
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Basic realm="XNAT Protected Area"'
    resp = call(xnat, "GET", "/data/projects?format=json")
    assert resp.status == 200
    assert "JSESSIONID=" in resp.headers["Set-Cookie"]  # every Basic request opens a session


def test_jsession_cookie_reuse_and_logout(xnat: FakeXnat) -> None:
    login = call(xnat, "POST", "/data/JSESSION")
    assert login.status == 200 and login.headers.get_content_type() == "text/plain"
    sid = login.text
    assert f"JSESSIONID={sid}" in login.headers["Set-Cookie"]
    cookie = {"Cookie": f"JSESSIONID={sid}"}
    for _ in range(2):
        assert call(xnat, "GET", "/data/projects?format=json", user=None,
                    headers=cookie).status == 200
    assert call(xnat, "GET", "/data/JSESSION", user=None, headers=cookie).text == sid
    modes = [r["auth"] for r in xnat.requests()]
    assert modes == ["basic", "cookie", "cookie", "cookie"]
    assert call(xnat, "DELETE", "/data/JSESSION", user=None, headers=cookie).status == 200
    after = call(xnat, "GET", "/data/projects?format=json", user=None, headers=cookie)
    assert after.status == 401


def test_expire_all_sessions_now(xnat: FakeXnat) -> None:
    sid = call(xnat, "POST", "/data/JSESSION").text
    cookie = {"Cookie": f"JSESSIONID={sid}"}
    assert xnat.expire_sessions() >= 1
    resp = call(xnat, "GET", "/data/projects", user=None, headers=cookie)
    assert resp.status == 401 and "XNAT Protected Area" in resp.headers["WWW-Authenticate"]
    # Basic still works beside a dead cookie: the client re-logs in
    assert call(xnat, "GET", "/data/projects", headers=cookie).status == 200


def test_session_idle_timeout() -> None:
    with FakeXnat({"session_timeout_seconds": 0.6}) as x:
        sid = call(x, "POST", "/data/JSESSION").text
        cookie = {"Cookie": f"JSESSIONID={sid}"}
        time.sleep(0.3)
        assert call(x, "GET", "/data/projects", user=None, headers=cookie).status == 200
        time.sleep(0.3)  # idle time, not age: the request above renewed it
        assert call(x, "GET", "/data/projects", user=None, headers=cookie).status == 200
        time.sleep(0.8)
        resp = call(x, "GET", "/data/projects", user=None, headers=cookie)
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Basic realm="XNAT Protected Area"'


def test_alias_token_as_basic_credentials(xnat: FakeXnat) -> None:
    token = call(xnat, "GET", "/data/services/tokens/issue").json()
    assert {"alias", "secret", "estimatedExpirationTime"} <= set(token)
    lifetime = token["estimatedExpirationTime"] / 1000 - time.time()
    assert 47 * 3600 < lifetime <= 48 * 3600
    resp = call(xnat, "GET", "/data/projects?format=json", user=token["alias"],
                password=token["secret"])
    assert resp.status == 200 and [r["ID"] for r in resp.rows] == ["TEST", "OTHER"]
    assert xnat.requests()[-1]["auth"] == "token" and xnat.requests()[-1]["user"] == "alice"
    assert call(xnat, "GET", "/data/projects", user=token["alias"], password="nope").status == 401
    xnat.expire_tokens()
    assert call(xnat, "GET", "/data/projects", user=token["alias"],
                password=token["secret"]).status == 401


def test_configured_users_tokens_and_projects() -> None:
    config = {"users": {"u": {"password": "p", "projects": {"A": "read"}}},
              "projects": {"A": {"name": "Project A"}, "B": {}},
              "tokens": [{"alias": "al", "secret": "se", "user": "u"}]}
    with FakeXnat(config) as x:
        rows = call(x, "GET", "/data/projects?format=json", user="u", password="p").rows
        assert [(r["ID"], r["name"]) for r in rows] == [("A", "Project A")]
        assert call(x, "GET", "/data/projects/A", user="al", password="se").status == 200
        assert call(x, "GET", "/data/projects/B", user="u", password="p").status == 403


# ---- projects --------------------------------------------------------------------------

def test_project_listing_and_access(xnat: FakeXnat) -> None:
    ids = [r["ID"] for r in call(xnat, "GET", "/data/projects?format=json").rows]
    assert ids == ["TEST", "OTHER"]
    assert call(xnat, "GET", "/data/projects?format=json", user="bob").rows == []
    one = call(xnat, "GET", "/data/projects/TEST?format=json")
    assert one.status == 200
    assert one.json()["items"][0]["data_fields"]["ID"] == "TEST"
    assert call(xnat, "GET", "/data/projects/SECRET?format=json").status == 403
    assert call(xnat, "GET", "/data/projects/NOPE?format=json").status == 404
    assert call(xnat, "GET", "/data/projects/SECRET?format=json", user="admin").status == 200


# ---- import, commit, archive -----------------------------------------------------------

def test_import_to_prearchive_commit_archive_and_read_back(xnat: FakeXnat,
                                                           study: Study) -> None:
    resp = upload(xnat, build_zip(study.files), labels(prevent_auto_commit="true"))
    assert resp.status == 200, resp.text
    m = PREARC_URI.match(resp.uri)
    assert m and m.group(1) == "TEST" and m.group(3) == "E1"

    rows = call(xnat, "GET", "/data/prearchive/projects/TEST?format=json").rows
    assert len(rows) == 1 and set(rows[0]) >= ROW_KEYS
    row = rows[0]
    assert row["tag"] == study.study_uid and row["status"] == "RECEIVING"
    assert row["url"] == resp.uri.removeprefix("/data") and row["subject"] == "S1"
    assert row["prevent_auto_commit"] == "true" and row["scan_date"] == "2024-01-02"
    assert entry_row(xnat, resp.uri)["file_count"] == str(len(study))

    commit = call(xnat, "POST", resp.uri + "?action=commit")
    assert commit.status == 200 and commit.uri == resp.uri
    assert entry_row(xnat, resp.uri)["status"] == "READY"

    done = archive(xnat, resp.uri, dest=archive_dest())
    assert done.status == 200, done.text
    assert done.uri == "/data/archive/projects/TEST/subjects/S1/experiments/E1"
    assert call(xnat, "GET", resp.uri + "?format=json").status == 404  # moved out

    exp = call(xnat, "GET", "/data/projects/TEST/subjects/S1/experiments/E1?format=json")
    fields = exp.json()["items"][0]["data_fields"]
    assert (fields["label"], fields["project"], fields["UID"]) == ("E1", "TEST", study.study_uid)
    assert fields["ID"].startswith("XNAT_E")
    scans = call(xnat, "GET", done.uri + "/scans?format=json").rows
    assert [(s["ID"], s["series_description"]) for s in scans] == [("1", "series 1"),
                                                                    ("2", "series 2")]
    assert {"ID", "type", "series_description", "URI"} <= set(scans[0])
    files = archived_files(xnat)
    assert len(files) == len(study)
    assert {"Name", "Size", "URI", "collection", "digest"} <= set(files[0])
    sent = sorted(hashlib.md5(d).hexdigest() for d in study.files.values())
    assert sorted(f["digest"] for f in files) == sent
    assert sum(int(f["Size"]) for f in files) == sum(len(d) for d in study.files.values())
    by_id = call(xnat, "GET", f"/data/experiments/{fields['ID']}/scans/1/files?format=json")
    assert len(by_id.rows) == study.per_series


def test_archive_dest_in_import_chunked(xnat: FakeXnat, study: Study) -> None:
    data = build_zip(study.files)
    resp = upload(xnat, data, labels(dest=archive_dest()), chunked=True)
    assert resp.status == 200, resp.text
    assert resp.uri == "/data/archive/projects/TEST/subjects/S1/experiments/E1"
    assert xnat.requests()[0]["bytes_in"] == len(data)
    assert len(archived_files(xnat)) == len(study)
    assert xnat.prearchive() == []


def test_direct_archive_skips_the_prearchive(xnat: FakeXnat, study: Study) -> None:
    resp = upload(xnat, build_zip(study.files), labels(**{"Direct-Archive": "true"}))
    assert resp.status == 200, resp.text
    assert resp.uri == "/data/archive/projects/TEST/subjects/S1/experiments/E1"
    assert xnat.prearchive() == [] and len(archived_files(xnat)) == len(study)


def test_dest_prearchive_commits_and_auto_archive_project(xnat: FakeXnat, study: Study) -> None:
    resp = upload(xnat, build_zip(study.files), labels(dest="/prearchive/projects/TEST"))
    assert resp.status == 200 and entry_row(xnat, resp.uri)["status"] == "READY"
    xnat.reset({"projects": {"TEST": {"auto_archive": True}}})
    resp = upload(xnat, build_zip(study.files), labels(prevent_auto_commit="true"))
    commit = call(xnat, "POST", resp.uri + "?action=commit")
    assert commit.status == 301
    assert commit.headers["Location"] == "/data/archive/projects/TEST/subjects/S1/experiments/E1"


def test_unassigned_fallback_for_project_without_write_access(xnat: FakeXnat,
                                                              study: Study) -> None:
    for project in ("SECRET", "OTHER", "NOSUCH"):  # no access, read-only, unknown
        resp = upload(xnat, build_zip(study.files), labels(project=project, session=project))
        assert resp.status == 200, resp.text  # the pitfall: not refused
        assert resp.uri.startswith("/data/prearchive/projects/Unassigned/")
    assert call(xnat, "GET", "/data/prearchive/projects/Unassigned?format=json").status == 403
    rows = call(xnat, "GET", "/data/prearchive/projects/Unassigned?format=json",
                user="admin").rows
    assert sorted(r["name"] for r in rows) == ["NOSUCH", "OTHER", "SECRET"]
    refused = archive(xnat, "/prearchive" + rows[0]["url"].removeprefix("/prearchive"),
                      dest=archive_dest())
    assert refused.status == 400
    assert refused.text == "Cannot archive sessions from the Unassigned folder."


def test_header_routing_when_no_project_given(xnat: FakeXnat) -> None:
    study_uid = "1.2.3.4.5"
    files = {"a.dcm": make_instance(study_uid=study_uid, series_uid="1.2.3.4.5.1",
                                    study_description="xnat://TEST/Subj/Sess")}
    resp = upload(xnat, build_zip(files), {})
    assert resp.status == 200 and resp.uri.startswith("/data/prearchive/projects/TEST/")
    row = entry_row(xnat, resp.uri)
    assert (row["subject"], row["name"]) == ("Subj", "Sess")


# ---- upload formats --------------------------------------------------------------------

def test_java_zipinputstream_rule_for_stored_entries_with_descriptor(xnat: FakeXnat,
                                                                     study: Study) -> None:
    stored = build_zip(study.files, compression=zipfile.ZIP_STORED, streamed=True)
    flags, method = struct.unpack("<HH", stored[6:10])
    assert flags & 0x08 and method == 0  # what zipfile writes to a non-seekable stream
    resp = upload(xnat, stored, labels())
    assert resp.status == 400 and "only DEFLATED entries can have EXT descriptor" in resp.text

    deflated = build_zip(study.files, compression=zipfile.ZIP_DEFLATED, streamed=True)
    assert struct.unpack("<H", deflated[6:8])[0] & 0x08
    resp = upload(xnat, deflated, labels(session="E2"), chunked=True)
    assert resp.status == 200, resp.text
    assert entry_row(xnat, resp.uri)["file_count"] == str(len(study))

    seekable_stored = build_zip(study.files, compression=zipfile.ZIP_STORED)
    assert upload(xnat, seekable_stored, labels(session="E3")).status == 200


def test_handler_and_content_type_rules(xnat: FakeXnat, study: Study) -> None:
    data = build_zip(study.files)
    resp = call(xnat, "POST", "/data/services/import?import-handler=nope", body=data,
                headers={"Content-Type": "application/zip"})
    assert resp.status == 404 and resp.text == "Unknown importer implementation specified: nope"
    resp = upload(xnat, data, labels(), content_type="application/octet-stream")
    assert resp.status == 400 and resp.text == "Unsupported format UNKNOWN"

    body, ctype = multipart([("upload.zip", data)], {"EXPT_LABEL": "MP"})
    resp = call(xnat, "POST", import_path(PROJECT_ID="TEST", SUBJECT_ID="S1"), body=body,
                headers={"Content-Type": ctype})
    assert resp.status == 200, resp.text
    assert resp.uri.endswith("/MP") and entry_row(xnat, resp.uri)["file_count"] == str(
        len(study))
    body, ctype = multipart([("a.zip", data), ("b.zip", data)])
    resp = call(xnat, "POST", import_path(**labels()), body=body,
                headers={"Content-Type": ctype})
    assert resp.status == 400


def test_gradual_dicom_one_file_per_request(xnat: FakeXnat, study: Study) -> None:
    uris = set()
    for data in study.files.values():
        resp = call(xnat, "POST", "/data/services/import?" + urlencode(
            {"import-handler": "gradual-DICOM", **labels()}), body=data,
            headers={"Content-Type": "application/dicom"})
        assert resp.status == 200, resp.text
        uris.add(resp.uri)
    assert len(uris) == 1
    assert entry_row(xnat, uris.pop())["file_count"] == str(len(study))


def big_instance(study_uid: str, series_uid: str, number: int) -> bytes:
    """An instance over the fake's 4 MiB in-memory limit, so it is filed from a temp file."""
    ds = pydicom.dcmread(io.BytesIO(make_instance(study_uid=study_uid, series_uid=series_uid,
                                                  instance_number=number)))
    ds.Rows = ds.Columns = 1500
    ds.PixelData = bytes([number]) * (1500 * 1500 * 2)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_digests_are_taken_when_filed_whatever_the_path(xnat: FakeXnat) -> None:
    study_uid, series_uid = generate_uid(), generate_uid()
    files = {f"big{n}.dcm": big_instance(study_uid, series_uid, n) for n in (1, 2, 3)}
    files["small.dcm"] = make_instance(study_uid=study_uid, series_uid=series_uid,
                                       instance_number=4)
    zipped = {k: files[k] for k in ("big1.dcm", "small.dcm")}
    # a zip with a central directory (zipfile), then a gradual-DICOM body, then a tar
    assert upload(xnat, build_zip(zipped), labels()).status == 200
    resp = call(xnat, "POST", "/data/services/import?" + urlencode(
        {"import-handler": "gradual-DICOM", **labels()}), body=files["big2.dcm"],
        headers={"Content-Type": "application/dicom"})
    assert resp.status == 200, resp.text
    tarred = io.BytesIO()
    with tarfile.open(fileobj=tarred, mode="w") as tar:
        info = tarfile.TarInfo("big3.dcm")
        info.size = len(files["big3.dcm"])
        tar.addfile(info, io.BytesIO(files["big3.dcm"]))
    tar_resp = upload(xnat, tarred.getvalue(), labels(), content_type="application/x-tar")
    assert tar_resp.status == 200, tar_resp.text
    rows = call(xnat, "GET", resp.uri + "/scans/ALL/files?format=json").rows
    assert sorted(r["digest"] for r in rows) == sorted(
        hashlib.md5(d).hexdigest() for d in files.values())


def test_non_dicom_entries_and_ignore_unparsable(xnat: FakeXnat, study: Study) -> None:
    junk = {**study.files, "Thumbs.db": b"\xd0\xcf\x11\xe0 not dicom", ".DS_Store": b"\0\0\0\1"}
    data = build_zip(junk)
    resp = upload(xnat, data, labels())
    assert resp.status == 400 and "unable to read DICOM object" in resp.text
    resp = upload(xnat, data, labels(session="E2", **{"Ignore-Unparsable": "true"}))
    assert resp.status == 200 and entry_row(xnat, resp.uri)["file_count"] == str(len(study))
    resp = upload(xnat, data, labels(session="E3", dest="/prearchive"))  # default true
    assert resp.status == 200, resp.text
    only_junk = build_zip({"readme.txt": b"hello"})
    resp = upload(xnat, only_junk, labels(**{"Ignore-Unparsable": "true"}))
    assert resp.status == 400 and resp.text == "Upload did not include parsable files"


def test_multiple_studies_and_missing_uids_are_refused(xnat: FakeXnat, study: Study) -> None:
    other = Study(series=1, per_series=2)
    resp = upload(xnat, build_zip({**study.files, **{"x/" + k: v
                                                     for k, v in other.files.items()}}),
                  labels())
    assert resp.status == 400
    assert resp.text == "Upload included files for multiple imaging sessions"
    no_sop = make_instance(study_uid="1.2.3", series_uid="1.2.3.1", omit=["SOPInstanceUID"])
    resp = upload(xnat, build_zip({"bad.dcm": no_sop}), labels(session="E9"))
    assert resp.status == 400 and "no SOP Instance UID in bad.dcm" in resp.text


# ---- overwrite rules -------------------------------------------------------------------

def test_overwrite_absent_append_delete_and_uid_conflict(xnat: FakeXnat) -> None:
    first = Study(series=2, per_series=2)
    assert upload(xnat, build_zip(first.files), labels(dest=archive_dest())).status == 200

    again = upload(xnat, build_zip(first.files), labels(dest=archive_dest()))
    assert again.status == 409
    assert "Session already exists, retry with overwrite enabled" in again.text
    conflict = xnat.prearchive("TEST")
    assert [e["status"] for e in conflict] == ["CONFLICT"]

    # a new series of the same study, archived through the archive service
    extra = Study(series=1, per_series=2, study_uid=first.study_uid, first_series_number=3)
    pre = upload(xnat, build_zip(extra.files), labels(prevent_auto_commit="true"))
    assert pre.status == 200 and pre.uri.endswith("/E1_1")  # the CONFLICT entry is closed
    refused = archive(xnat, pre.uri)
    assert refused.status == 500
    assert refused.text == "FAILED: Session already exists, retry with overwrite enabled"
    assert entry_row(xnat, pre.uri)["status"] == "CONFLICT"
    assert archive(xnat, pre.uri, overwrite="append").status == 200
    assert len(archived_files(xnat)) == len(first) + len(extra)

    # the same series again: append refuses, delete merges without duplicates
    resent = upload(xnat, build_zip(first.files), labels(session="E1", prevent_auto_commit="1"))
    clash = archive(xnat, resent.uri, overwrite="append")
    assert clash.status == 500
    assert clash.text == "FAILED: Session already contains a scan (1) with the same UID and number."
    assert archive(xnat, resent.uri, overwrite="delete").status == 200
    assert len(archived_files(xnat)) == len(first) + len(extra)

    stranger = Study(series=1, per_series=1)  # same label, another StudyInstanceUID
    for mode in ("append", "delete"):
        resp = upload(xnat, build_zip(stranger.files), labels(dest=archive_dest(),
                                                              overwrite=mode))
        assert resp.status == 409
        assert "Invalid modification of session UID via archive process." in resp.text


def test_resend_joins_entry_without_duplicates(xnat: FakeXnat, study: Study) -> None:
    data = build_zip(study.files)
    uris = {upload(xnat, data, labels()).uri for _ in range(2)}
    assert len(uris) == 1
    uri = uris.pop()
    assert entry_row(xnat, uri)["file_count"] == str(len(study))
    prearc_files = call(xnat, "GET", uri + "/scans/ALL/files?format=json").rows
    assert len(prearc_files) == len(study)
    assert call(xnat, "POST", uri + "?action=commit").status == 200
    split = upload(xnat, data, labels()).uri  # a built (READY) entry takes no more files
    assert split != uri and split.endswith("/E1_1")
    assert archive(xnat, uri, dest=archive_dest()).status == 200
    resp = upload(xnat, data, labels(dest=archive_dest(), overwrite="delete"))  # joins E1_1
    assert resp.status == 200, resp.text
    files = archived_files(xnat)
    assert len(files) == len(study) and len({f["Name"] for f in files}) == len(study)
    assert xnat.prearchive() == []


# ---- faults ----------------------------------------------------------------------------

def test_fault_status_n_times_then_success(xnat: FakeXnat, study: Study) -> None:
    data = build_zip(study.files)
    xnat.add_fault("/data/services/import", status=503, times=2)
    assert [upload(xnat, data, labels()).status for _ in range(3)] == [503, 503, 200]
    assert [r["fault"] is not None for r in xnat.requests()] == [True, True, False]
    assert len(xnat.prearchive()) == 1  # the refused requests did nothing
    for status in (500, 502, 507):
        xnat.add_fault("/data/projects", status=status, body=f"boom {status}")
        resp = call(xnat, "GET", "/data/projects")
        assert (resp.status, resp.text) == (status, f"boom {status}")
    assert call(xnat, "GET", "/data/projects").status == 200


def test_fault_delay(xnat: FakeXnat) -> None:
    xnat.add_fault("/data/projects", delay_seconds=0.5, method="GET")
    started = time.monotonic()
    assert call(xnat, "GET", "/data/projects").status == 200
    assert time.monotonic() - started >= 0.5
    started = time.monotonic()
    call(xnat, "GET", "/data/projects")
    assert time.monotonic() - started < 0.5


def test_fault_drop_connection_leaves_receiving_entry_then_retry_merges(xnat: FakeXnat) -> None:
    study = Study(series=2, per_series=10)
    data = build_zip(study.files, compression=zipfile.ZIP_STORED)
    xnat.add_fault("/data/services/import", drop_connection_after_bytes=len(data) // 2)
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        upload(xnat, data, labels())
    log = wait_for(xnat.requests)[-1]  # logged as the connection is reset,
    partial = wait_for(lambda: xnat.prearchive("TEST"))  # then what was read is filed
    assert partial[0]["status"] == "RECEIVING"
    assert 0 < len(partial[0]["files"]) < len(study)
    assert log["dropped"] and log["status"] is None and log["bytes_in"] == len(data) // 2

    resp = upload(xnat, data, labels())
    assert resp.status == 200 and resp.uri == "/data" + partial[0]["url"]
    assert entry_row(xnat, resp.uri)["file_count"] == str(len(study))


def test_fault_drop_without_reading_and_lost_response(xnat: FakeXnat, study: Study) -> None:
    xnat.add_fault("/data/projects", drop_connection_after_bytes=0)
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        call(xnat, "GET", "/data/projects")
    # process=True: the work is done, then the answer is replaced (504) or lost (no status)
    xnat.add_fault("/data/services/import", process=True, status=504)
    assert upload(xnat, build_zip(study.files), labels(dest=archive_dest())).status == 504
    assert len(archived_files(xnat)) == len(study)
    xnat.add_fault("/data/services/import", process=True)
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        upload(xnat, build_zip(study.files), labels(session="E2"))
    assert wait_for(lambda: xnat.prearchive("TEST"))[0]["name"] == "E2"


# ---- transport and lifecycle -----------------------------------------------------------

def test_keep_alive_survives_error_answers_with_bodies(xnat: FakeXnat, study: Study) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", xnat.port, timeout=10)
    try:
        assert call(xnat, "GET", "/data/projects", conn=conn).status == 200
        sock = conn.sock
        bad = call(xnat, "POST", import_path(**labels()), conn=conn, body=build_zip(study.files),
                   headers={"Content-Type": "application/octet-stream"})
        assert bad.status == 400
        unauth = call(xnat, "POST", import_path(**labels()), conn=conn, user="alice",
                      password="bad", body=build_zip(study.files),
                      headers={"Content-Type": "application/zip"})
        assert unauth.status == 401
        assert call(xnat, "GET", "/data/projects", conn=conn).status == 200
        assert conn.sock is sock  # the same connection all along
    finally:
        conn.close()


def test_state_and_request_log(xnat: FakeXnat, study: Study) -> None:
    data = build_zip(study.files)
    upload(xnat, data, labels())
    call(xnat, "GET", "/data/projects/NOPE")
    state = xnat.state(digests=True)
    assert {"users", "projects", "sessions", "prearchive", "archive", "requests",
            "faults"} <= set(state)
    entry = state["prearchive"][0]
    assert len(entry["files"]) == len(study) and entry["files"][0]["digest"]
    first, second = state["requests"]
    assert (first["method"], first["path"], first["status"]) == (
        "POST", "/data/services/import", 200)
    assert first["bytes_in"] == len(data) and first["user"] == "alice"
    assert (second["status"], second["bytes_in"]) == (404, 0)


def test_stop_ends_the_process_and_frees_the_port() -> None:
    x = FakeXnat().start()
    pid, port, state_dir = x.pid, x.port, x.state_dir
    assert pid is not None
    assert call(x, "GET", "/data/projects").status == 200
    x.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert not state_dir.exists()
