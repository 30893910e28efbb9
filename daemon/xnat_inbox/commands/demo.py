"""`xnat-inbox demo`: a local DICOM receiver, an inbox, a real drop delivered, all on 127.0.0.1.

It runs the daemon exactly as systemd would (a separate `xnat-inbox run` process) and stops
everything it started before it returns.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from .synthetic import Patient, write_session

RECEIVER_AE = "DEMO_SCP"
WAIT_SECONDS = 120
#: what a careful site sends: the subject's code as PatientID, and no patient name, birth
#: date, institution or physician names (so the PHI guard has nothing to warn about)
DEMO_PATIENT = Patient("DEMO001", "", birth_date="")
DEMO_HEADERS: dict[str, object] = {"InstitutionName": None, "ReferringPhysicianName": ""}

CONFIG = """\
# written by `xnat-inbox demo`: a site config for one inbox and one local receiver, and a
# starting template for a real site: put your receiver's host, port and AE title under
# destinations, your folders under state_dir and inboxes (absolute paths); every key is
# explained in etc/xnat-inbox/config.yaml
state_dir: {state}
settle_seconds: 2                 # default 30: how long a drop must be quiet before it is taken
destinations:
  demo-scp:                       # a name of your choice; route.yaml files refer to it
    type: dicom
    host: 127.0.0.1
    port: {port}
    called_ae: {ae}
inboxes:
  - path: {inbox}
"""

ROUTE = """\
# the inbox's route template: labels from DICOM keywords, localizers left out; a starting
# template for yours (docs/configuration.md lists every key)
destination: demo-scp
project: DemoProject
subject: "{PatientID}"
session: "{PatientID}_{StudyDate}"
series:
  exclude:
    SeriesDescription: "(?i)localizer|scout"
"""


class Receiver:
    """A pynetdicom storage SCP that writes what it receives to a folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0
        self.ae = AE(ae_title=RECEIVER_AE)
        for context in AllStoragePresentationContexts:
            self.ae.add_supported_context(context.abstract_syntax, ExplicitVRLittleEndian)
            self.ae.add_supported_context(context.abstract_syntax)
        self.ae.add_supported_context(Verification)
        self.port = _free_port()
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: Any) -> int:
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        study = self.folder / str(dataset.StudyInstanceUID)
        study.mkdir(parents=True, exist_ok=True)
        dataset.save_as(study / f"{dataset.SOPInstanceUID}.dcm", enforce_file_format=True)
        self.count += 1
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_demo(base: Path) -> int:
    base = base.resolve()
    if base.exists():
        shutil.rmtree(base)
    inbox, received, source = base / "inbox", base / "received", base / "source"
    inbox.mkdir(parents=True)
    session = write_session(source / "MR_DEMO_0001", patient=DEMO_PATIENT, extra=DEMO_HEADERS)
    (source / "MR_DEMO_0001" / "Thumbs.db").write_bytes(b"not DICOM: travels with the drop")
    receiver = Receiver(received)
    config = base / "config.yaml"
    config.write_text(CONFIG.format(state=base / "state", port=receiver.port, ae=RECEIVER_AE,
                                    inbox=inbox))
    (inbox / "route.yaml").write_text(ROUTE)
    print(f"demo: receiver {RECEIVER_AE} listening on 127.0.0.1:{receiver.port}")
    daemon = subprocess.Popen([sys.executable, "-m", "xnat_inbox", "--config", str(config), "run"],
                              stderr=open(base / "daemon.log", "w"))  # noqa: SIM115
    try:
        time.sleep(1.0)
        print(f"demo: dropping a synthetic MR session ({len(session.files)} files in "
              f"{len(session.series_uids)} series, plus a Thumbs.db) into {inbox}")
        shutil.copytree(source / "MR_DEMO_0001", inbox / "MR_DEMO_0001")
        report = _wait_for_report(inbox, "MR_DEMO_0001")
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
        receiver.stop()
    if report is None:
        print(f"demo: no report after {WAIT_SECONDS} s; see {base / 'daemon.log'}")
        return 1
    _print_summary(report, received, base)
    return 0 if report["outcome"] == "done" else 1


def _wait_for_report(inbox: Path, name: str) -> dict[str, Any] | None:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        for folder in ("done", "failed"):
            for path in (inbox / folder).glob(f"*/{name}.report.json"):
                report = json.loads(path.read_text())
                report["_path"] = str(path)
                return report
        time.sleep(0.2)
    return None


def _print_summary(report: dict[str, Any], received: Path, base: Path) -> None:
    print(f"demo: outcome {report['outcome']}; report {report['_path']}")
    for study in report["studies"]:
        print(f"demo: study -> {study['destination']}: {study['stored']} of "
              f"{study['instances']} instances stored, routing string {study['routing_string']}")
        for series in study["series"]:
            state = "sent" if series["sent"] else f"left out ({series['excluded_because']})"
            print(f"demo:   series {series['number']} {series['description']}: "
                  f"{series['instances']} instance(s) {state}")
    for reason in report["reasons"]:
        print(f"demo: reason: {reason}")
    files = sorted(received.rglob("*.dcm"))
    print(f"demo: the receiver wrote {len(files)} file(s) under {received}")
    print(f"demo: the originals are in {Path(report['_path']).with_suffix('').with_suffix('')}")
    print(f"demo: daemon log {base / 'daemon.log'}")
    print("demo: starting templates for a site of your own (README: Your first inbox):")
    print(f"demo:   {_shown(base / 'config.yaml')}  the site config: state, destination, inbox")
    print(f"demo:   {_shown(base / 'inbox' / 'route.yaml')}  the inbox's route: destination, "
          "labels, series filter")


def _shown(path: Path) -> str:
    """Relative to the current folder when below it (demo-run/...), else absolute."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
