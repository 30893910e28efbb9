"""Notices (issue 19, point 4): the real daemon tells a webhook (http.server on 127.0.0.1) and
real SMTP servers (aiosmtpd on 127.0.0.1) about failed, delivered and waiting drops, with no
PHI in what it sends, and keeps delivering drops while a receiver is down."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.daemon_runner import DaemonProcess, dicom_destination, wait_for_report, write_config
from tests.peers import free_port
from tests.receivers import self_signed
from tests.test_e2e_cstore import copy_in
from xnat_inbox.commands.synthetic import Patient, SeriesSpec, write_session
from xnat_inbox.config import ConfigError, load_config, load_route
from xnat_inbox.logs import phi_pattern
from xnat_inbox.outcome.notices.message import Notice, email_text, payload

pytestmark = pytest.mark.ops

#: the patient of the drop the receiver refuses, and the drop's folder, named after them
REFUSED = Patient(patient_id="MRN4711", patient_name="Roe^Richard", birth_date="19700304")
REFUSED_DROP = "Roe_Richard_MRN4711"
ACCEPTED = Patient(patient_id="MRN0815", patient_name="Poe^Paula", birth_date="19650505")
#: what must never reach a notice of these drops
FAKE_PHI = ("MRN4711", "Roe^Richard", "Roe", "Richard", "19700304",
            "MRN0815", "Poe^Paula", "Poe", "Paula", "19650505")
#: labels without PHI in them: a notice shows labels as they are
ROUTE = {"project": "Proj", "subject": "S01", "session": "S01_{StudyDate}"}
LABELS = {"project": "Proj", "subject": "S01", "session": "S01_20260115"}
QUICK = {"initial_backoff": 0.2, "max_backoff": 0.5}


def refusing_scp(inprocess_scp: Any) -> Any:
    """Refuses (0xC000, for good) every instance of the REFUSED patient, stores the rest."""
    return inprocess_scp(status_for=lambda ds, _: 0xC000 if ds.PatientID == "MRN4711" else 0)


def site(tmp_path: Path, peer: Any, notify: list[dict[str, Any]],
         **settings: Any) -> tuple[Path, Path]:
    inbox = tmp_path / "inbox"
    config = write_config(tmp_path, {"scp": dicom_destination(peer)},
                          [{"path": str(inbox), "route": {"destination": "scp", **ROUTE}}],
                          notify=notify, **settings)
    return config, inbox


def drop(tmp_path: Path, folder: Path, name: str, patient: Patient) -> None:
    write_session(tmp_path / "src" / name, series=(SeriesSpec("T1", 3),), patient=patient)
    copy_in(tmp_path / "src" / name, folder)


def secret_file(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def without_phi(text: str) -> None:
    found = [value for value in FAKE_PHI if value in text]
    assert not found, f"PHI in a notice: {found}\n{text}"


def events(process: DaemonProcess, name: str) -> list[dict[str, Any]]:
    return [e for e in process.events() if e.get("event") == name]


def no_notify_errors(process: DaemonProcess) -> None:
    errors = [e for e in process.events() if e.get("step") == "notify" and
              e.get("level") in ("error", "critical")]
    assert not errors, errors


def test_webhook_gets_one_json_per_failed_drop_without_phi(tmp_path, inprocess_scp, webhook,
                                                          daemon):
    headers = secret_file(tmp_path / "hook.headers",
                          "Authorization: Bearer hook-s3cret-value\nX-Lab: neuro\n")
    config, inbox = site(tmp_path, refusing_scp(inprocess_scp), [
        {"webhook": webhook.url, "allow_http": True, "headers_file": str(headers),
         "on": ["failed"]}])
    process = daemon(config)

    # one lane, one courier: had the delivered drop been told, its notice would come first
    drop(tmp_path, inbox, "MR_ok", ACCEPTED)
    assert wait_for_report(inbox, "MR_ok", daemon=process)[0] == "done"
    drop(tmp_path, inbox, REFUSED_DROP, REFUSED)
    outcome, report, report_path = wait_for_report(inbox, REFUSED_DROP, daemon=process)
    assert outcome == "failed"

    (post,) = webhook.wait_for(1)
    without_phi(post.body.decode())
    facts = post.json()
    assert facts["event"] == facts["outcome"] == "failed"
    assert facts["drop"] == "[PHI]_[PHI]" and facts["drop_id"] == report["drop"]["id"]
    assert facts["inbox"] == str(inbox) and facts["destination"] == "scp"
    assert facts["studies"] == [{"labels": LABELS, "destination": "scp", "delivered": False,
                                 "instances": 3, "stored": 0}]
    assert facts["counts"]["instances"] == 3 and facts["counts"]["stored"] == 0
    assert facts["reasons"] == report["reasons"] and "0xC000" in facts["reasons"][0]
    masked = str(report_path).replace("Roe_Richard", "[PHI]").replace("MRN4711", "[PHI]")
    assert facts["report"] == masked
    assert facts["finished_at"] == report["timings"]["finished_at"] and facts["host"]
    # the headers from the secret file went with it, and neither they nor the URL's path
    # (a token, for many webhooks) reached the daemon's log
    assert post.headers["Authorization"] == "Bearer hook-s3cret-value"
    assert post.headers["X-Lab"] == "neuro"
    assert post.path == "/hooks/T0KEN-in-the-path"
    assert "hook-s3cret-value" not in process.text() and "T0KEN" not in process.text()
    assert len(webhook.received()) == 1
    no_notify_errors(process)


def test_drops_flow_while_the_webhook_is_down_and_its_notices_follow(tmp_path, inprocess_scp,
                                                                     webhook, daemon):
    webhook.stop()  # its port is closed: connections are refused
    metrics = free_port()
    config, inbox = site(tmp_path, refusing_scp(inprocess_scp), [
        {"webhook": webhook.url, "allow_http": True, "on": ["failed", "done"],
         "retry": QUICK}], metrics={"listen": f"127.0.0.1:{metrics}"})
    process = daemon(config)

    drop(tmp_path, inbox, REFUSED_DROP, REFUSED)
    assert wait_for_report(inbox, REFUSED_DROP, daemon=process)[0] == "failed"
    drop(tmp_path, inbox, "MR_ok", ACCEPTED)
    outcome, report, _ = wait_for_report(inbox, "MR_ok", daemon=process)
    assert outcome == "done", report["reasons"]  # the notice's trouble is not the drop's

    # several tries failed by now, and the outage was logged once
    from tests.test_metrics import sample, scrape
    deadline = time.monotonic() + 60
    while sample(scrape(metrics), "xnat_inbox_notifications_failed_total",
                 kind="webhook") < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sample(scrape(metrics), "xnat_inbox_notifications_failed_total", kind="webhook") >= 4
    (failing,) = events(process, "notification target failing; its notices wait and are "
                                 "retried")
    assert failing["level"] == "warning" and failing["host"] == f"127.0.0.1:{webhook.port}"
    assert "Connection refused" in failing["error"] and "T0KEN" not in json.dumps(failing)

    webhook.start()  # back on the same port: both notices arrive, in order
    first, second = webhook.wait_for(2)
    assert (first.json()["event"], second.json()["event"]) == ("failed", "done")
    assert second.json()["drop"] == "MR_ok"
    deadline = time.monotonic() + 30
    while not events(process, "notification target reachable again") and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(events(process, "notification target reachable again")) == 1
    assert len(events(process, "notification target failing; its notices wait and are "
                               "retried")) == 1
    assert len(events(process, "notification sent")) == 2
    no_notify_errors(process)


def lab_site(tmp_path: Path, peer: Any, smtp_port: int,
             allow: dict[str, Any] | None = None) -> tuple[Path, Path]:
    server = {"from": "xnat-inbox@uni.example.org", "smtp_host": "127.0.0.1",
              "smtp_port": smtp_port, "starttls": False}
    inbox = tmp_path / "inbox"
    config = write_config(
        tmp_path, {"scp": dicom_destination(peer)},
        [{"path": str(inbox), "route": {"destination": "scp", **ROUTE}, **(
            {"allow": allow} if allow else {})}],
        notify=[{"name": "lab-mail", "email": server, "on": []},  # only for route.yaml files
                {"name": "admins", "email": {**server, "to": ["pacs-admin@uni.example.org"]},
                 "on": ["failed"]}])
    return config, inbox


def routing_folder(inbox: Path, name: str, route: dict[str, Any]) -> Path:
    folder = inbox / name
    folder.mkdir(parents=True)
    (folder / "route.yaml").write_text(yaml.safe_dump(route))
    return folder


def test_email_to_the_route_recipient_through_a_real_smtp_server(tmp_path, inprocess_scp,
                                                                 smtp, daemon):
    server = smtp()
    config, inbox = lab_site(tmp_path, refusing_scp(inprocess_scp), server.port)
    lab = routing_folder(inbox, "LabA", {"notify": [
        {"use": "lab-mail", "to": ["lab-contact@uni.example.org"], "on": ["failed", "done"]}]})
    process = daemon(config)

    drop(tmp_path, lab, "MR_ok", ACCEPTED)
    assert wait_for_report(inbox, "MR_ok", daemon=process)[0] == "done"
    drop(tmp_path, lab, REFUSED_DROP, REFUSED)
    assert wait_for_report(inbox, REFUSED_DROP, daemon=process)[0] == "failed"

    mails = server.wait_for(3)
    for mail in mails:
        without_phi(mail.message.as_string())
        assert mail.sender == "xnat-inbox@uni.example.org"
        assert mail.message["From"] == "xnat-inbox@uni.example.org"
    lab_mails = [m for m in mails if m.recipients == ["lab-contact@uni.example.org"]]
    admin_mails = [m for m in mails if m.recipients == ["pacs-admin@uni.example.org"]]
    # each target's notices come in order: a done notice to the admins would come first
    assert len(lab_mails) == 2 and len(admin_mails) == 1
    done, failed = lab_mails
    assert done.message["Subject"] == "xnat-inbox: LabA/MR_ok delivered"
    assert done.message["To"] == "lab-contact@uni.example.org"
    assert "The drop LabA/MR_ok in " + str(inbox) + " was delivered (scp)." in done.body
    assert "1. Proj / S01 / S01_20260115: 3 of 3 instance(s) stored" in done.body
    assert failed.message["Subject"] == "xnat-inbox: LabA/[PHI]_[PHI] failed"
    assert "0xC000" in failed.body and "xnat-inbox retry" in failed.body
    assert "1. Proj / S01 / S01_20260115: 0 of 3 instance(s) stored" in failed.body
    assert admin_mails[0].body == failed.body
    assert len(server.received()) == 3
    no_notify_errors(process)


def test_a_route_cannot_mail_outside_the_inbox_allow_nor_name_unknown_targets(
        tmp_path, inprocess_scp, smtp, daemon):
    server = smtp()
    config, inbox = lab_site(tmp_path, refusing_scp(inprocess_scp), server.port)
    outside = routing_folder(inbox, "LabB", {"notify": [
        {"use": "lab-mail", "to": ["eve@evil.example.com"], "on": ["failed", "done"]}]})
    unknown = routing_folder(inbox, "LabC", {"notify": [{"use": "lab-mial"}]})
    process = daemon(config)

    drop(tmp_path, outside, "MR_b", ACCEPTED)
    outcome, report, _ = wait_for_report(inbox, "MR_b", daemon=process)
    assert outcome == "failed"
    (reason,) = report["reasons"]
    assert reason == (
        f"{outside}/route.yaml: notify.to: eve@evil.example.com is not allowed in this inbox "
        "(allow.notify_to: *@uni.example.org); use addresses matching one of those, or ask the "
        f"site admin to allow it in {config} inboxes[0].allow.notify_to")
    drop(tmp_path, unknown, "MR_c", ACCEPTED)
    outcome, report, _ = wait_for_report(inbox, "MR_c", daemon=process)
    assert outcome == "failed"
    assert report["reasons"] == [
        f"{unknown}/route.yaml: notify.use: 'lab-mial' is not a target of the site config's "
        "notify: list (admins, lab-mail); fix the name"]
    # the site's own targets still hear of both; nobody outside does
    mails = server.wait_for(2)
    assert {tuple(m.recipients) for m in mails} == {("pacs-admin@uni.example.org",)}
    assert "eve@evil.example.com" in mails[0].body  # the reason says what was refused


def test_mail_over_verified_starttls_with_a_login_from_a_secret_file(tmp_path, inprocess_scp,
                                                                     smtp, daemon):
    cert, key = self_signed(tmp_path)
    server = smtp(tls=(cert, key), login=("notifier", "smtp-pa55word"))
    password = secret_file(tmp_path / "smtp.secret", "smtp-pa55word\n")
    mail = {"from": "xnat-inbox@uni.example.org", "to": ["pacs-admin@uni.example.org"],
            "smtp_host": "127.0.0.1", "smtp_port": server.port, "username": "notifier",
            "password_file": str(password)}
    config, inbox = site(tmp_path, refusing_scp(inprocess_scp), [
        {"name": "trusted", "email": mail, "verify_tls": str(cert), "on": ["done"]},
        # the same server, its certificate checked against the system's CAs: refused
        {"name": "default-tls", "email": mail, "on": ["done"], "retry": QUICK}])
    process = daemon(config)

    drop(tmp_path, inbox, "MR_ok", ACCEPTED)
    assert wait_for_report(inbox, "MR_ok", daemon=process)[0] == "done"
    (received,) = server.wait_for(1)
    assert received.recipients == ["pacs-admin@uni.example.org"]
    assert server.logins == ["notifier"]
    deadline = time.monotonic() + 30
    while not events(process, "notification target failing; its notices wait and are "
                              "retried") and time.monotonic() < deadline:
        time.sleep(0.05)
    (failing,) = events(process, "notification target failing; its notices wait and are "
                                 "retried")
    assert failing["target"] == "default-tls" and "TLS" in failing["error"]
    assert "smtp-pa55word" not in process.text()
    assert len(server.received()) == 1


def test_waiting_notice_once_a_drop_waited_for_its_destination(tmp_path, webhook, daemon):
    down = {"type": "dicom", "host": "127.0.0.1", "port": free_port(), "connect_timeout": 3,
            "retry": {"max_attempts": 1000, "initial_backoff": 0.3, "max_backoff": 1}}
    inbox = tmp_path / "inbox"
    config = write_config(tmp_path, {"scp": down},
                          [{"path": str(inbox), "route": {"destination": "scp", **ROUTE}}],
                          notify=[{"webhook": webhook.url, "allow_http": True,
                                   "on": ["waiting"], "after": 0.01}])  # 0.6 s
    daemon(config)

    drop(tmp_path, inbox, REFUSED_DROP, REFUSED)
    (first,) = webhook.wait_for(1)
    without_phi(first.body.decode())
    facts = first.json()
    assert facts["event"] == facts["outcome"] == "waiting"
    assert facts["drop"] == "[PHI]_[PHI]" and facts["destination"] == "scp"
    assert facts["waited_minutes"] >= 0.01 and facts["report"] is None
    assert facts["reasons"][0].startswith("scp is down since ")
    assert "refused" in facts["reasons"][0]
    # a second drop waits too: told once as well, and the first is not told again meanwhile
    drop(tmp_path, inbox, "MR_next", ACCEPTED)
    deadline = time.monotonic() + 60
    while not any(p.json()["drop_id"] != facts["drop_id"] for p in webhook.received()) and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    posts = [p.json() for p in webhook.received()]
    assert [p["drop_id"] == facts["drop_id"] for p in posts] == [True, False]
    assert posts[1]["reasons"] == [facts["reasons"][0], "queued behind other drops of scp"]
    assert posts[1]["drop"] is None  # never read: its name could be the patient's


@pytest.mark.parametrize(("notify", "message"), [
    ([{"webhook": "http://hooks.example.org/x"}],
     "notify[0]: a plain http:// webhook sends the notice (and any headers) unencrypted"),
    ([{"webhook": "https://hooks.example.org/x", "email": {
        "from": "a@example.org", "smtp_host": "smtp.example.org", "to": ["b@example.org"]}}],
     "notify[0]: give either webhook: URL or email: {...}, not both or neither"),
    ([{"email": {"from": "a@example.org", "smtp_host": "smtp.example.org"}}],
     "notify[0]: email.to is empty, so these notices would reach nobody"),
    ([{"email": {"from": "a@example.org", "smtp_host": "smtp.example.org", "password": "x",
                 "to": ["b@example.org"]}}],
     "notify[0].email: an inline password is not allowed"),
    ([{"email": {"from": "a@example.org", "smtp_host": "h", "to": ["b@x.org\nBcc: c@y"]}}],
     "notify[0].email.to[0]: expected one mail address such as lab@example.org"),
    ([{"name": "x", "webhook": "https://a.example.org/"},
      {"name": "x", "webhook": "https://b.example.org/"}],
     "notify: notify target name(s) x given twice"),
])
def test_notify_config_errors_name_the_key(tmp_path, notify, message):
    config = write_config(tmp_path, {"scp": {"type": "dicom", "host": "h", "port": 104}},
                          [{"path": str(tmp_path / "inbox")}], notify=notify)
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert message in str(caught.value)


def test_allow_notify_targets_must_name_site_targets(tmp_path):
    config = write_config(tmp_path, {"scp": {"type": "dicom", "host": "h", "port": 104}},
                          [{"path": str(tmp_path / "inbox"),
                            "allow": {"notify_targets": ["chat"]}}],
                          notify=[{"name": "admins", "webhook": "https://a.example.org/"}])
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert "inboxes[0].allow.notify_targets: unknown notify target(s) 'chat'; the site " \
        "config's notify: list names: admins" in str(caught.value)


def test_a_bare_on_key_means_on(tmp_path):
    """YAML 1.1 reads `on:` as the key true; written as the docs show it, it still means on."""
    inbox = tmp_path / "inbox"
    (inbox / "LabA").mkdir(parents=True)
    config = tmp_path / "config.yaml"
    config.write_text(f"""\
state_dir: {tmp_path / "state"}
destinations:
  scp: {{type: dicom, host: h, port: 104}}
notify:
  - name: lab-mail
    email: {{from: xnat-inbox@uni.example.org, smtp_host: smtp.uni.example.org}}
    on: []
  - webhook: https://hooks.example.org/x
    on: [failed, waiting]
inboxes:
  - path: {inbox}
""")
    loaded = load_config(config)
    assert [target.on for target in loaded.notify] == [[], ["failed", "waiting"]]
    route = inbox / "LabA" / "route.yaml"
    route.write_text("notify:\n  - use: lab-mail\n    to: [lab@uni.example.org]\n"
                     "    on: [done]\n")
    (entry,) = load_route(route, {"scp"}).notify or []
    assert entry.on == ["done"] and entry.to == ["lab@uni.example.org"]


def test_what_a_notice_shows_of_a_drop_with_and_without_include_phi(tmp_path):
    """The rule, without a daemon: PHI masked unless include_phi, labels as they are, a drop
    not read yet named by its id alone."""
    report = tmp_path / "Roe_Richard.report.json"
    report.write_text(json.dumps({
        "outcome": "failed", "reasons": ["study 1: Roe_Richard refused"],
        "route": {"destination": "scp"}, "timings": {"finished_at": "2026-12-08T07:00:00"},
        "studies": [{"labels": {"project": "P", "subject": "MRN4711", "session": "E"},
                     "destination": "scp", "delivered": False, "instances_to_send": 3,
                     "stored": 0}],
        "files": {"total": 3, "by_kind": {"dicom": 3}}}))
    read = Notice(event="failed", drop_id="d1", inbox="/in", shown="LabA/Roe_Richard",
                  name="Roe_Richard", read=True, phi=phi_pattern(["Roe^Richard", "MRN4711"]),
                  host="h", claimed_at="2026-12-08T06:59:00", report=report)
    masked = payload(read, include_phi=False)
    assert masked["drop"] == "LabA/[PHI]" and masked["reasons"] == ["study 1: [PHI] refused"]
    assert masked["report"] == str(tmp_path / "[PHI].report.json")
    assert masked["studies"][0]["labels"]["subject"] == "MRN4711"  # a label, as it is
    shown = payload(read, include_phi=True)
    assert shown["drop"] == "LabA/Roe_Richard" and shown["report"] == str(report)
    unread = dataclasses.replace(read, read=False, phi=None, report=None, facts={},
                                 event="waiting", reasons=("queued behind Roe_Richard",))
    hidden = payload(unread, include_phi=False)
    assert hidden["drop"] is None and hidden["drop_id"] == "d1"
    assert hidden["reasons"] == ["queued behind [PHI]"]
    subject, body = email_text(hidden)
    assert subject == "xnat-inbox: drop d1 waiting" and "Roe" not in body
