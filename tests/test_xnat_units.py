"""Units of the XNAT REST destination: credentials, config, the zip stream, error mapping
(its progress in `status`: tests/test_status.py)."""

from __future__ import annotations

import io
import pickle
import zipfile
from typing import Any

import pytest
import requests
from pydantic import ValidationError

from tests.test_xnat_destination import secret_file
from xnat_inbox.config import RouteTemplate, XnatDestination
from xnat_inbox.senders.xnat.auth import CredentialError, Secret, load_credentials
from xnat_inbox.senders.xnat.readback import remedy
from xnat_inbox.senders.xnat.session import is_transient, xnat_message
from xnat_inbox.senders.xnat.zipstream import Counter, Member, StopUpload, zip_chunks

pytestmark = pytest.mark.xnat


def _destination(**extra: Any) -> XnatDestination:
    return XnatDestination(**{"type": "xnat", "url": "https://xnat.example.org", **extra})


def test_secret_never_shows():
    secret = Secret("hunter2")
    assert "hunter2" not in f"{secret} {secret!r} {secret:>20} {[secret]} {secret!s}"
    assert secret.reveal() == "hunter2"
    with pytest.raises(TypeError):
        pickle.dumps(secret)


def plain(creds: Any) -> tuple[str, str]:
    return creds.username, creds.secret.reveal()


def test_credentials_from_file_token_systemd_and_netrc(tmp_path, monkeypatch):
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    pw = secret_file(tmp_path, "xnat.secret", "pw-from-file")
    creds = load_credentials("x", _destination(username="alice", password_file=pw))
    assert plain(creds) == ("alice", "pw-from-file") and creds.kind == "password"
    assert "pw-from-file" not in f"{creds!r} {vars(creds.basic())}"

    token = secret_file(tmp_path, "token", "alias1:secret1")
    creds = load_credentials("x", _destination(token_file=token))
    assert plain(creds) == ("alias1", "secret1") and creds.kind == "token"

    systemd = tmp_path / "creds"
    systemd.mkdir()
    secret_file(systemd, "xnat.secret", "pw-from-systemd")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(systemd))
    creds = load_credentials("x", _destination(username="alice", password_file=pw))
    assert plain(creds) == ("alice", "pw-from-systemd")  # systemd's LoadCredential= wins
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")

    (tmp_path / ".netrc").write_text("machine xnat.example.org login bob password pw-netrc\n")
    creds = load_credentials("x", _destination(), home=tmp_path)
    assert plain(creds) == ("bob", "pw-netrc") and creds.source == "netrc"
    with pytest.raises(CredentialError, match="no credentials") as info:
        load_credentials("x", _destination(url="https://other.example.org"), home=tmp_path)
    assert "pw-netrc" not in str(info.value)


def test_config_refuses_inline_passwords_and_takes_route_keys(tmp_path):
    with pytest.raises(ValidationError, match="inline passwords and tokens are not allowed"):
        XnatDestination.model_validate({"type": "xnat", "url": "https://x", "password": "p"})
    with pytest.raises(ValidationError):
        _destination(url="https://user:pw@xnat.example.org")
    route = RouteTemplate.model_validate({"dest": "archive", "overwrite": "append"})
    assert (route.dest, route.overwrite) == ("archive", "append")
    assert _destination().dest == "prearchive" and _destination().overwrite == "none"


@pytest.mark.parametrize("compression", ["stored", "deflate"])
def test_zip_stream_is_what_zipinputstream_accepts(tmp_path, compression):
    members = []
    for i in range(3):
        path = tmp_path / f"IM{i}.dcm"
        path.write_bytes(bytes(range(256)) * (10 + i))
        members.append(Member(f"series/IM{i}.dcm", path, path.stat().st_size))
    counter = Counter()
    seen: list[str] = []
    data = b"".join(zip_chunks(members, compression, counter, lambda m: seen.append(m.name)))
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = archive.infolist()
        assert archive.testzip() is None
        assert [archive.read(i) for i in infos] == [m.path.read_bytes() for m in members]
    for info in infos:
        # Java's ZipInputStream: a STORED entry must not use a data descriptor
        stored = info.compress_type == zipfile.ZIP_STORED
        assert stored == (compression == "stored")
        assert not (stored and info.flag_bits & 0x08)
    assert seen == [m.name for m in members] and counter.files == 3
    assert counter.bytes == sum(m.size for m in members) and counter.zip_bytes == len(data)


def test_zip_stream_stops_between_files(tmp_path):
    path = tmp_path / "IM.dcm"
    path.write_bytes(b"x" * 100)
    members = [Member(f"IM{i}.dcm", path, 100) for i in range(3)]
    calls = iter([False, True])
    with pytest.raises(StopUpload):
        b"".join(zip_chunks(members, "stored", Counter(), should_stop=lambda: next(calls)))


@pytest.mark.parametrize(("status", "message", "transient"), [
    (400, "Upload did not include parsable files", False),
    (400, "Concurrent file sends of the same data is not supported.", True),
    (403, "Invalid permissions for new project.", False),
    (404, "Unable to find project X", False),
    (409, "session document locked", False),
    (500, "FAILED: Session already exists, retry with overwrite enabled", False),
    (500, "Internal Server Error", True),
    (502, "Bad Gateway", True), (503, "", True), (504, "", True), (507, "", True),
])
def test_status_mapping(status, message, transient):
    assert is_transient(status, message) is transient


def test_messages_from_html_status_pages_and_remedies():
    response = requests.Response()
    response.status_code = 500
    response.headers["Content-Type"] = "text/html"
    response._content = (b"<html><head><title>Status page</title></head><body><h3>FAILED: "
                         b"Session already contains a scan (2) with the same UID and number."
                         b"</h3><p>500</p></body></html>")
    message = xnat_message(response)
    assert message == ("FAILED: Session already contains a scan (2) with the same UID and "
                       "number.")
    assert remedy(message).startswith("UID conflict: resolve it in XNAT's Prearchive")
    assert remedy("FAILED: Session already exists, retry with overwrite enabled").startswith(
        "label clash: ")

