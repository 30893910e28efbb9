"""Drop names are chosen by inbox users and may hold any character but `/` and NUL: a newline in
one must not add a line to the daemon's sd_notify messages (`WATCHDOG=trigger` there makes
systemd restart the service, again and again), to a journal entry, or to console output."""

from __future__ import annotations

import io
import logging
import re

import pytest

from tests.daemon_runner import wait_for_report
from tests.systemd_support import NotifySocket, drop, has, site, status_with, statuses
from xnat_inbox import journald
from xnat_inbox.logs import configure, get_logger
from xnat_inbox.service.notify import Notifier, socket_send

pytestmark = pytest.mark.security

#: a folder name an inbox user can create: each line after the first is a notify command
INJECTED = "MR_0001\nWATCHDOG=trigger\nREADY=1\nSTOPPING=1\n\x1b[2K\rEXTEND_TIMEOUT_USEC=1"
#: every line the daemon itself sends
OWN_LINE = re.compile(r"(READY=1|STOPPING=1|RELOADING=1|WATCHDOG=1|MONOTONIC_USEC=\d+|STATUS=.*)")
#: a console log line: timestamp with its zone, level, event
EVENT_LINE = re.compile(r"\d{4}-\d\d-\d\dT[\d:.]+(?:[+-]\d\d:\d\d|Z) \[\w+ *\] ")


def forged_lines(notify: NotifySocket) -> list[str]:
    return [line for message in notify.messages for line in message
            if not OWN_LINE.fullmatch(line)]


def test_a_drop_named_with_notify_commands_stays_inside_its_status_line(
        tmp_path, notify, service, inprocess_scp, gate):
    held = gate(2)
    config, (inbox,) = site(tmp_path, inprocess_scp(status_for=held))
    process = service(config, log_format="console")
    start = len(notify.messages)

    drop(tmp_path, inbox, INJECTED)
    notify.wait_for(status_with("sending MR_0001"), after=start)  # the name is in STATUS=
    held.opened.set()
    outcome, report, _ = wait_for_report(inbox, INJECTED, daemon=process)
    assert process.stop() == 0
    notify.drain()

    assert outcome == "done", report["reasons"]  # a legal name: delivered as any other
    assert report["drop"]["name"] == INJECTED  # the report names it as it is
    assert forged_lines(notify) == []
    assert sum("READY=1" in message for message in notify.messages) == 1
    assert all("STOPPING=1" not in message for message in notify.messages[:-1])
    assert any(r"sending MR_0001\nWATCHDOG=trigger\nREADY=1" in line
               for line in statuses(notify.messages))
    # console output: one line an event, and no terminal control sequence from the name
    console = process.text()
    assert "\x1b" not in console and "\r" not in console
    assert [line for line in console.splitlines() if not EVENT_LINE.match(line)] == []
    assert "WATCHDOG=trigger" in console


@pytest.mark.parametrize("backend", ["systemd-python", "fallback"])
def test_every_notify_line_is_escaped_whichever_library_sends_it(notify, monkeypatch, backend):
    if backend == "systemd-python":
        pytest.importorskip("systemd.daemon")
        monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
        notifier = Notifier.from_environment()
    else:
        notifier = Notifier(socket_send(str(notify.path)))

    notifier.ready("1 inbox\nWATCHDOG=trigger")
    notifier.status("sending MR\r\nSTOPPING=1\u2028x 2/4")
    notifier.stopping()
    notify.wait_for(has("STOPPING=1"))

    assert forged_lines(notify) == []
    assert statuses(notify.messages) == [r"1 inbox\nWATCHDOG=trigger",
                                         r"sending MR\r\nSTOPPING=1\u2028x 2/4",
                                         "stopping: letting drops in flight finish"]


# --- the journal ----------------------------------------------------------------------------

def log_a_drop_named(name: str) -> None:
    """What the daemon logs of a drop: its name as a field, in a reason, in a library's own
    message (stdlib logging) and in an exception's message."""
    log = get_logger(step="service")
    log.info("claimed", drop=name, reasons=[f"cannot read {name}/1.dcm"])
    logging.getLogger("a.library").warning("odd file %s/1.dcm", name)
    try:
        raise ValueError(f"cannot read {name}")
    except ValueError:
        log.exception("internal error", drop=name)


def test_a_name_with_newlines_forges_no_journal_field(monkeypatch, restore_logging):
    """libsystemd would send a value holding a newline in the protocol's binary form, so that
    alone forges no field; the value must still reach journald as one line of text, since the
    stderr fallback and `journalctl` output are line-based."""
    journal = pytest.importorskip("systemd.journal")
    sent: list[list[tuple[str, str]]] = []
    monkeypatch.setattr(journal, "sendv", lambda *args: sent.append(
        [tuple(arg.split("=", 1)) for arg in args]))
    configure("journal", stream=io.StringIO())

    log_a_drop_named("MR_0001\nPRIORITY=0\nMESSAGE=forged")

    assert len(sent) == 3
    for fields in sent:
        names = [name for name, _ in fields]
        assert names.count("PRIORITY") == 1 and names.count("MESSAGE") == 1
        for name, value in fields:
            lines = value.split("\n")
            assert name == "MESSAGE" or len(lines) == 1, (name, value)
            assert not [line for line in lines if line.startswith(("PRIORITY=", "MESSAGE="))]
    claimed = dict(sent[0])
    assert claimed["DROP"] == r"MR_0001\nPRIORITY=0\nMESSAGE=forged"
    assert "\n" not in claimed["MESSAGE"] and "\n" not in dict(sent[1])["MESSAGE"]
    assert r"ValueError: cannot read MR_0001\nPRIORITY=0" in dict(sent[2])["MESSAGE"]


def test_a_name_with_newlines_forges_no_line_on_journal_stderr(monkeypatch, restore_logging):
    """Without systemd-python the journal reads `<priority>message` lines from stderr: each
    line it reads is an entry of its own."""
    monkeypatch.setattr(journald, "systemd_python_send", lambda: None)
    stream = io.StringIO()
    configure("journal", stream=stream)

    log_a_drop_named("MR_0001\n<0>forged\x1b[2K")

    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("<6>claimed") and lines[1].startswith("<4>odd file")
    assert lines[2].startswith("<3>internal error")
    assert not [line for line in lines if "forged" in line and not line.startswith(
        ("<6>claimed", "<4>odd file", "<3>internal error", "<3>ValueError"))]
    assert "\x1b" not in stream.getvalue()
