"""Issue 23, item 10: a drop's report and log, written beside the originals in a setgid lab
share, are 0640 whatever the umask: the people who copied drops into the share (its group)
read their outcomes there, nobody else can, and nobody but the daemon can change them."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from tests.daemon_runner import DaemonProcess, dicom_destination, wait_for_report, write_config
from tests.security_support import ATTACKER, DAEMON, GROUP, VICTIM
from xnat_inbox.commands.synthetic import SeriesSpec, write_session

pytestmark = pytest.mark.security

DAEMON_GROUP = 61009  # the daemon's own group (Group= in the unit), not the lab's


def test_reports_in_a_lab_share_are_readable_by_its_group_only(lab, inprocess_scp):
    scp = inprocess_scp()
    config = write_config(lab.root, {"pacs": dicom_destination(scp)},
                          [{"path": str(lab.share), "route": {
                              "destination": "pacs", "project": "P", "subject": "{PatientID}",
                              "session": "{PatientID}_{StudyDate}"}}])
    staging = lab.root / "staging" / "MR_VICTIM"
    write_session(staging, series=(SeriesSpec("T1", 2),))
    lab.give(staging, VICTIM, 0o2770)
    # the daemon as the unit runs it: its own group, with the lab's group as a supplementary one
    # (what the sysusers file asks for), and the lab's umask
    wrapper = ["setpriv", f"--reuid={DAEMON}", f"--regid={DAEMON_GROUP}",
               f"--groups={GROUP},{DAEMON_GROUP}", "--inh-caps=-all", "--bounding-set=-all",
               "--no-new-privs", "--", "sh", "-c", 'umask 002 && exec "$@"', "sh"]
    daemon = DaemonProcess(config, lab.root / "daemon.log", wrapper=wrapper)
    try:
        daemon.start()
        os.rename(staging, lab.share / "MR_VICTIM")
        outcome, report, report_path = wait_for_report(lab.share, "MR_VICTIM", daemon=daemon)
    finally:
        assert daemon.stop() == 0, daemon.text()[-3000:]

    assert outcome == "done", report["reasons"]
    for written in (report_path, report_path.with_name("MR_VICTIM.log")):
        info = written.stat()
        assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o640, GROUP), written
    assert lab.run_as(ATTACKER, ["cat", str(report_path)]).stdout.startswith("{")
    assert lab.run_as(ATTACKER, ["sh", "-c", f"echo x >> {report_path}"],
                      check=False).returncode != 0
    outsider = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
    refused = subprocess.run([*outsider, "cat", str(report_path)], capture_output=True,
                             text=True, timeout=60, check=False)
    assert refused.returncode != 0 and "Permission denied" in refused.stderr
