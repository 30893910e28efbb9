"""Secrets: where they are read from, and that they are never shown."""

from __future__ import annotations

import io
import json
import pickle
import re

import pytest
from structlog.testing import capture_logs

from xnat_inbox.commands.cli import build_parser
from xnat_inbox.logs import configure, get_logger, redact
from xnat_inbox.secrets import SecretError, read_secret

pytestmark = pytest.mark.systemd


# --- secrets --------------------------------------------------------------------------------

def shown(secret: object) -> list[str]:
    """Every ordinary way a value gets printed."""
    return [repr(secret), str(secret), f"{secret}", "{}".format(secret),  # noqa: UP032
            json.dumps({"password": secret}, default=str), repr([secret])]


def test_secret_from_systemd_credentials_is_never_shown(tmp_path):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "xnat-password").write_text("s3cret-from-systemd\n")
    secret = read_secret("xnat-password", environ={"CREDENTIALS_DIRECTORY": str(credentials)})
    assert secret.reveal() == "s3cret-from-systemd"
    for text in shown(secret):
        assert "s3cret" not in text
    with pytest.raises(TypeError):
        pickle.dumps(secret)


def test_secret_file_readable_by_others_is_used_with_a_warning(tmp_path):
    path = tmp_path / "xnat.secret"
    path.write_text("tok-readable-1234\n")
    path.chmod(0o644)
    with capture_logs() as events:
        assert read_secret(str(path), environ={}).reveal() == "tok-readable-1234"
    assert [(e["event"], e["path"], e["mode"]) for e in events] == [
        ("secret file is readable by other users; make it private", str(path), "0644")]
    assert events[0]["fix"] == f"chmod 600 {path}"
    path.chmod(0o600)
    with capture_logs() as events:
        read_secret(str(path), environ={})
    assert events == []


def test_secret_from_netrc_for_a_host(tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine other.example.org login x password y\n"
                     "machine xnat.example.org login uploader password n3trc-pass-word\n")
    netrc.chmod(0o600)
    secret = read_secret(None, host="xnat.example.org", netrc_file=netrc, environ={})
    assert (secret.reveal(), secret.login) == ("n3trc-pass-word", "uploader")
    # a credential that isn't there falls back to the netrc entry
    assert read_secret("xnat-password", host="xnat.example.org", netrc_file=netrc,
                       environ={}).reveal() == "n3trc-pass-word"
    with pytest.raises(SecretError, match=r"machine nowhere\.example\.org"):
        read_secret(None, host="nowhere.example.org", netrc_file=netrc, environ={})
    netrc.write_text("machine xnat.example.org login uploader p4ss-in-broken-file\n")
    with pytest.raises(SecretError) as broken:
        read_secret(None, host="xnat.example.org", netrc_file=netrc, environ={})
    assert "p4ss" not in str(broken.value) and broken.value.__cause__ is None


def test_missing_secret_says_where_it_looked(tmp_path):
    with pytest.raises(SecretError, match="LoadCredential=xnat-password:"):
        read_secret("xnat-password", environ={})
    with pytest.raises(SecretError, match=r"cannot read the secret file .*missing"):
        read_secret(str(tmp_path / "missing"), environ={})


def test_secret_values_are_masked_in_logs_exceptions_and_reports(tmp_path, restore_logging):
    path = tmp_path / "token"
    path.write_text("tok-should-never-show-9f2c")
    path.chmod(0o600)
    stream = io.StringIO()
    configure("json", stream=stream)
    secret = read_secret(str(path), environ={})
    try:
        raise ConnectionError(f"401 for https://uploader:{secret.reveal()}@xnat.example.org")
    except ConnectionError:
        get_logger().exception("upload failed", detail=f"token={secret.reveal()}")
    output = stream.getvalue()
    assert "tok-should-never-show" not in output
    assert "token=[secret]" in output and "uploader:[secret]@" in output
    assert redact({"reasons": [f"refused {secret.reveal()}"]}, None) == {
        "reasons": ["refused [secret]"]}


def test_no_command_line_option_takes_a_secret():
    parser = build_parser()
    parsers = [parser, *next(a for a in parser._actions if a.dest == "command").choices.values()]
    options = [o for p in parsers for a in p._actions for o in a.option_strings]
    assert not [o for o in options if re.search(r"pass|token|secret|cred", o)]
