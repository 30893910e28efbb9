"""Issue 23, item 8: a hostile or misconfigured XNAT cannot move our requests, and the session
cookie with them, to another host or port. The fake XNAT answers the hostile URIs (its fault
switches replace an answer); a second listener on another loopback port records any request
that reaches it. Also: a plain http:// url is refused unless allowed, and then warned about."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.daemon_runner import REPO, wait_for_report
from tests.fake_xnat import FakeXnat
from tests.test_xnat_destination import LABELS, drop, site, xnat_destination
from xnat_inbox.commands.synthetic import write_session
from xnat_inbox.config import ConfigError, XnatDestination, load_config
from xnat_inbox.reading.scan import scan_drop
from xnat_inbox.routing.route import Labels, RoutedStudy
from xnat_inbox.senders.base import Delivery
from xnat_inbox.senders.xnat.sender import XnatSender

pytestmark = pytest.mark.security

ENTRY = f"/data/prearchive/projects/TEST/20260115_120000000/{LABELS[1]}"
SESSION = f"/data/archive/projects/TEST/subjects/{LABELS[0]}/experiments/{LABELS[1]}"

#: what a hostile answer may say, for the other listener's port; each names project TEST so
#: that it passes the sender's check of the project
HOSTILE: dict[str, Callable[[int, str], str]] = {
    "userinfo": lambda port, path: f"@127.0.0.1:{port}{path}",
    "network-path": lambda port, path: f"//127.0.0.1:{port}{path}",
    "absolute": lambda port, path: f"http://127.0.0.1:{port}{path}",
    "outside-data": lambda port, path: path.replace("/data/", "/xapi/", 1),
    "dot-segments": lambda port, path: path.replace("/data/", "/data/../xapi/", 1),
}


class Listener:
    """Another HTTP server on loopback that records every request it receives."""

    def __init__(self) -> None:
        received = self.received = []  # type: list[dict[str, Any]]

        class Record(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                received.append({"method": self.command, "path": self.path,
                                 "headers": dict(self.headers)})
                body = f"{ENTRY}\r\n".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Record)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def listener() -> Iterator[Listener]:
    other = Listener()
    yield other
    other.stop()


@pytest.fixture
def xnat(shared_xnat: FakeXnat) -> FakeXnat:
    shared_xnat.reset()
    return shared_xnat


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> RoutedStudy:
    folder = tmp_path_factory.mktemp("drop") / "MR"
    write_session(folder)
    [found] = scan_drop(folder).studies.values()
    return RoutedStudy(found, "xnat", Labels("TEST", *LABELS), "StudyDescription", "",
                       included=list(found.series.values()))


def send(xnat: FakeXnat, tmp_path: Path, study: RoutedStudy, **extra: Any) -> Delivery:
    destination = XnatDestination.model_validate(xnat_destination(xnat, tmp_path, **extra))
    sender = XnatSender("xnat", destination)
    try:
        return sender.send(study, study.instances)
    finally:
        sender.close()


def assert_refused(delivery: Delivery, uri: str, listener: Listener) -> None:
    assert listener.received == []  # no request, so no cookie or Authorization either
    assert delivery.error is not None and not delivery.transient
    assert "refused to send a request to" in delivery.error
    assert repr(uri) in delivery.error and "destination xnat" in delivery.error


@pytest.mark.parametrize("form", HOSTILE)
def test_a_hostile_import_answer_is_refused(tmp_path, xnat, listener, study, form):
    """The import's answer names the prearchive entry the commit then goes to."""
    uri = HOSTILE[form](listener.port, ENTRY)
    xnat.add_fault("/data/services/import", process=True, status=200, body=uri,
                   content_type="text/uri-list")
    delivery = send(xnat, tmp_path, study)
    assert_refused(delivery, uri, listener)
    assert not [r for r in xnat.requests() if r["query"] == "action=commit"]


@pytest.mark.parametrize("form", ["userinfo", "absolute"])
def test_a_hostile_commit_location_is_refused(tmp_path, xnat, listener, study, form):
    """A commit answered 301 (the project archives on its own): Location is followed up."""
    uri = HOSTILE[form](listener.port, SESSION)
    xnat.add_fault("/data/prearchive/projects/TEST/", method="POST", process=True, status=301,
                   body=uri, content_type="text/uri-list", headers={"Location": uri})
    assert_refused(send(xnat, tmp_path, study), uri, listener)


@pytest.mark.parametrize("form", ["userinfo", "network-path"])
def test_a_hostile_archive_answer_is_refused(tmp_path, xnat, listener, study, form):
    """The archive service's answer names the session the read-back then lists."""
    uri = HOSTILE[form](listener.port, SESSION)
    xnat.add_fault("/data/services/archive", process=True, status=200, body=uri,
                   content_type="text/uri-list")
    assert_refused(send(xnat, tmp_path, study, dest="archive"), uri, listener)


def test_a_redirect_to_another_port_is_not_followed(tmp_path, xnat, listener, study):
    location = f"http://127.0.0.1:{listener.port}/data/services/import"
    xnat.add_fault("/data/services/import", status=307, headers={"Location": location})
    delivery = send(xnat, tmp_path, study)
    assert listener.received == []
    assert delivery.error is not None and not delivery.transient
    assert f"XNAT answered 307 to POST /data/services/import: a redirect to {location!r}, " \
        "not followed" in delivery.error


def test_the_daemon_fails_the_drop_and_keeps_the_cookie_home(tmp_path, xnat, listener, daemon):
    """The reproduction: an import answer starting with @127.0.0.1:PORT sent the JSESSIONID
    there. Now the drop fails for good with the reason, and the other port hears nothing."""
    uri = HOSTILE["userinfo"](listener.port, ENTRY)
    xnat.add_fault("/data/services/import", process=True, status=200, body=uri,
                   content_type="text/uri-list")
    config, inbox = site(tmp_path, xnat_destination(xnat, tmp_path))
    proc = daemon(config)
    drop(tmp_path, inbox, "MR_HOSTILE")
    outcome, report, _ = wait_for_report(inbox, "MR_HOSTILE", daemon=proc)

    assert outcome == "failed"
    assert listener.received == []
    reasons = " ".join(report["reasons"])
    # the session label in the URI is the PatientID: the report masks it
    assert f"refused to send a request to '@127.0.0.1:{listener.port}/data/prearchive/" in reasons
    assert "Only paths under /data/ on" in reasons
    # and the plain http:// url it was allowed to use is in the journal as a warning
    warnings = [e for e in proc.events() if e.get("event") == "config warning"]
    assert warnings and "plain http" in warnings[0]["warning"]


# --- http:// urls ---------------------------------------------------------------------------

def config_with(tmp_path: Path, destination: dict[str, Any]) -> Path:
    config, _ = site(tmp_path, destination)
    return config


def test_a_plain_http_url_is_a_config_error_naming_file_key_and_remedy(tmp_path, xnat):
    destination = xnat_destination(xnat, tmp_path)
    del destination["allow_http"]
    config = config_with(tmp_path, destination)
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    line = next(n for n, text in enumerate(config.read_text().splitlines(), 1)
                if text.strip().startswith("url:"))
    assert f"{config}:{line}: destinations.xnat.url: a plain http:// url sends the password" \
        in str(caught.value)
    assert "use https://, or add allow_http: true to this destination" in str(caught.value)


def test_an_allowed_http_url_is_warned_about_by_check(tmp_path, xnat):
    config = config_with(tmp_path, xnat_destination(xnat, tmp_path))
    assert yaml.safe_load(config.read_text())["destinations"]["xnat"]["allow_http"] is True
    result = subprocess.run([sys.executable, "-m", "xnat_inbox", "--config", str(config),
                             "check"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (f"warn destination xnat: {xnat.url} is plain http (allow_http: true): the "
            "password and the session cookie cross the network unencrypted") in result.stdout
    assert "ok   destination xnat: logged in" in result.stdout


def test_https_needs_no_allowance_and_gives_no_warning(tmp_path):
    config = config_with(tmp_path, {"type": "xnat", "url": "https://xnat.example.org",
                                    "username": "alice", "password_file": "/dev/null"})
    assert load_config(config).warnings() == []
