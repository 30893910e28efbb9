"""The daemon as a systemd service: sd_notify (READY, STATUS, WATCHDOG, RELOADING, STOPPING) on a
NOTIFY_SOCKET the test binds, SIGHUP reloads, journald fields, secrets, and the unit file.

systemd is not PID 1 here, so the daemon runs as a subprocess with the environment systemd would
give it; the journal tests run a real systemd-journald in a private mount namespace.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import time

import pytest
import yaml

from tests.daemon_runner import DaemonProcess, wait_for_report
from tests.systemd_support import NotifySocket, drop, events, has, site, status_with, statuses
from tests.test_e2e_cstore import copy_in
from xnat_inbox.commands.synthetic import SeriesSpec, write_session
from xnat_inbox.service.notify import Notifier, watchdog_interval

pytestmark = pytest.mark.systemd

# --- sd_notify ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["systemd-python", "fallback"])
def test_ready_after_every_inbox_is_watched_then_watchdog_then_stopping(
        tmp_path, notify, service, inprocess_scp, backend):
    env = {"WATCHDOG_USEC": "200000"}  # WatchdogSec=0.2s: a ping every 0.1 s, i.e. every tick
    if backend == "fallback":
        pytest.importorskip("systemd.daemon")  # else both runs use the fallback anyway
        hidden = tmp_path / "no-systemd-python" / "systemd"
        hidden.mkdir(parents=True)
        (hidden / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hidden.parent),
                                                          os.environ.get("PYTHONPATH")]))
    config, _ = site(tmp_path, inprocess_scp(), inboxes=3)

    process = service(config, env=env)

    # READY=1 is sent after the "watching" line of every inbox was written
    assert len(events(process, "watching")) == 3
    ready = notify.wait_for(has("READY=1"))
    assert notify.messages[ready][1].startswith("STATUS=3 inboxes")
    first = notify.wait_for(has("WATCHDOG=1"), after=ready)
    notify.wait_for(has("WATCHDOG=1"), after=first + 1)
    assert process.stop() == 0
    notify.drain()
    assert "STOPPING=1" in notify.messages[-1]
    assert sum("READY=1" in message for message in notify.messages) == 1
    assert not any("WATCHDOG=trigger" in message for message in notify.messages)


def test_status_follows_a_drop_from_waiting_to_sent(tmp_path, notify, service, inprocess_scp,
                                                     gate):
    held = gate(2)
    config, (inbox,) = site(tmp_path, inprocess_scp(status_for=held))
    service(config)
    start = len(notify.messages)

    drop(tmp_path, inbox, "SLOW")
    waiting = notify.wait_for(status_with("1 waiting"), after=start)
    sending = notify.wait_for(status_with("sending SLOW 2/4"), after=waiting)
    held.opened.set()
    finished = notify.wait_for(status_with("1 done, 0 failed today"), after=sending)

    outcome, report, _ = wait_for_report(inbox, "SLOW")
    assert outcome == "done", report["reasons"]
    line = statuses(notify.messages[finished:finished + 1])[0]
    assert line == "1 inbox · 1 done, 0 failed today"
    # every STATUS differs from the one before: sent on change only
    lines = statuses(notify.messages[start:])
    assert all(a != b for a, b in itertools.pairwise(lines))


def test_status_counts_the_files_of_the_whole_drop_across_its_studies(
        tmp_path, notify, service, inprocess_scp, gate):
    """Two studies of two files each, held at the third file: the drop is 3/4 along, which
    STATUS says (it showed the second study's own 1/2)."""
    held = gate(3)
    config, (inbox,) = site(tmp_path, inprocess_scp(status_for=held))
    service(config)
    start = len(notify.messages)
    source = tmp_path / "src" / "TWO"
    for study in ("1", "2"):
        write_session(source, series=(SeriesSpec("T1", 2),), layout="flat",
                      study_description=f"Study {study}")
    copy_in(source, inbox)
    sending = notify.wait_for(status_with("sending TWO 3/4"), after=start)
    held.opened.set()
    assert wait_for_report(inbox, "TWO")[0] == "done"
    assert not any(re.search(r"sending TWO \d/2", line)
                   for line in statuses(notify.messages[start:])), sending


def test_status_masks_a_drop_folder_named_after_the_patient(tmp_path, notify, service,
                                                           inprocess_scp, gate):
    held = gate(2)
    config, (inbox,) = site(tmp_path, inprocess_scp(status_for=held))
    service(config)
    start = len(notify.messages)
    drop(tmp_path, inbox, "Doe_Jane_MRI")  # the patient's name, as people name folders
    sending = notify.wait_for(status_with("sending [PHI]_MRI 2/4"), after=start)
    held.opened.set()
    assert wait_for_report(inbox, "Doe_Jane_MRI")[0] == "done"
    shown = statuses(notify.messages[start:])
    assert not any("Doe" in line or "Jane" in line for line in shown), shown
    assert sending > start


def test_a_stuck_worker_stops_the_watchdog_until_it_moves_again(tmp_path, notify, service,
                                                                 inprocess_scp, gate):
    held = gate(1)
    # 3 s, not 1: on a loaded machine reading the drop can take a second, and a drop still
    # being read is named by its id only
    config, (inbox,) = site(tmp_path, inprocess_scp(status_for=held), hung_worker_seconds=3)
    process = service(config, env={"WATCHDOG_USEC": "200000"})
    start = len(notify.messages)

    drop(tmp_path, inbox, "STUCK")
    trigger = notify.wait_for(has("WATCHDOG=trigger"), after=start)
    notify.wait_for(status_with("STUCK STUCK"), after=start)
    stuck = events(process, "worker stuck")
    assert len(stuck) == 1 and stuck[0]["drop"] == "STUCK" and stuck[0]["watchdog"] is True
    held.opened.set()
    notify.wait_for(has("WATCHDOG=1"), after=trigger)  # the worker finished: pings resume
    assert wait_for_report(inbox, "STUCK")[0] == "done"


# --- SIGHUP ---------------------------------------------------------------------------------

def reload(process: DaemonProcess, notify: NotifySocket) -> tuple[int, int]:
    """SIGHUP and wait for RELOADING=1, then READY=1: the indexes of both."""
    start = len(notify.messages)
    assert process.proc is not None
    process.proc.send_signal(1)
    reloading = notify.wait_for(has("RELOADING=1"), after=start)
    assert any(line.startswith("MONOTONIC_USEC=") for line in notify.messages[reloading])
    return reloading, notify.wait_for(has("READY=1"), after=reloading)


def test_refused_reload_keeps_the_old_config(tmp_path, notify, service, inprocess_scp):
    config, (inbox,) = site(tmp_path, inprocess_scp())
    process = service(config)
    good = config.read_text()
    config.write_text(good.replace("settle_seconds: 0.5", "settle_seconds: soon"))

    _, ready = reload(process, notify)

    refused = events(process, "config reload refused")
    assert len(refused) == 1
    assert re.search(r"config\.yaml:\d+: settle_seconds", refused[0]["reason"]), refused[0]
    assert "reload refused" in statuses(notify.messages[ready:ready + 1])[0]
    drop(tmp_path, inbox, "AFTER_REFUSAL")
    outcome, report, _ = wait_for_report(inbox, "AFTER_REFUSAL", daemon=process)
    assert outcome == "done", report["reasons"]
    assert report["studies"][0]["labels"]["project"] == "Proj"
    # the next good reload clears the note
    config.write_text(good)
    _, ready = reload(process, notify)
    assert "refused" not in statuses(notify.messages[ready:ready + 1])[0]


def test_reload_lets_drops_in_flight_finish_and_applies_to_new_ones(
        tmp_path, notify, service, inprocess_scp, gate):
    held = gate(1)
    scp = inprocess_scp(status_for=held)
    config, (inbox,) = site(tmp_path, scp)
    process = service(config)
    drop(tmp_path, inbox, "IN_FLIGHT")
    notify.wait_for(status_with("sending IN_FLIGHT 1/4"))
    site(tmp_path, scp, project="Proj2", inboxes=2)  # a new project label and a second inbox

    reload(process, notify)
    held.opened.set()

    outcome, report, _ = wait_for_report(inbox, "IN_FLIGHT", daemon=process)
    assert outcome == "done", report["reasons"]
    assert report["studies"][0]["labels"]["project"] == "Proj"  # the config it started with
    assert report["studies"][0]["stored"] == 4
    assert len(events(process, "config reloaded")) == 1
    assert [e["inbox"] for e in events(process, "watching")] == [
        str(inbox), str(inbox), str(tmp_path / "inbox1")]  # the changed one is watched anew
    for path, name in ((inbox, "NEXT"), (tmp_path / "inbox1", "SECOND")):
        drop(tmp_path, path, name)
        outcome, report, _ = wait_for_report(path, name, daemon=process)
        assert outcome == "done", report["reasons"]
        assert report["studies"][0]["labels"]["project"] == "Proj2"


def test_reload_releases_the_old_configs_idle_association(tmp_path, notify, service,
                                                          inprocess_scp):
    """The association a drop left open for the next one belongs to the config a reload
    replaced: it is released at the reload, not kept until association_close_delay."""
    scp = inprocess_scp()
    config, (inbox,) = site(tmp_path, scp)
    settings = yaml.safe_load(config.read_text())
    settings["destinations"]["scp"]["association_close_delay"] = 600
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    process = service(config)
    drop(tmp_path, inbox, "BEFORE")
    assert wait_for_report(inbox, "BEFORE", daemon=process)[0] == "done"
    assert (scp.accepted_associations, scp.released_associations) == (1, 0)  # kept open

    reload(process, notify)

    deadline = time.monotonic() + 10
    while scp.released_associations == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert scp.released_associations == 1
    drop(tmp_path, inbox, "AFTER")
    assert wait_for_report(inbox, "AFTER", daemon=process)[0] == "done"
    assert scp.accepted_associations == 2  # the new config's own


# --- notify protocol details (in process) ---------------------------------------------------

def test_fallback_speaks_the_protocol_to_path_and_abstract_sockets(tmp_path):
    abstract = f"xnat-inbox-test-{os.getpid()}"
    for address, bind_to in ((str(tmp_path / "n.sock"), str(tmp_path / "n.sock")),
                             (f"@{abstract}", f"\0{abstract}")):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
            listener.bind(bind_to)
            notifier = Notifier.from_environment({"NOTIFY_SOCKET": address})
            notifier.ready("1 inbox")
            notifier.status("1 inbox")  # unchanged: not sent again
            notifier.status("1 inbox · 1 waiting")
            listener.settimeout(5)
            assert listener.recv(4096) == b"READY=1\nSTATUS=1 inbox"
            assert listener.recv(4096) == b"STATUS=1 inbox \xc2\xb7 1 waiting"


def test_watchdog_interval_follows_sd_watchdog_enabled_rules():
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) \
        == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({}) is None
    assert Notifier.from_environment({}).active is False  # outside systemd: nothing is sent
