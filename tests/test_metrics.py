"""Metrics (issue 19, point 5): the real daemon's /metrics, scraped and parsed with
prometheus_client's own parser, count the drops and instances it sent; the textfile variant
for node_exporter; /healthz answers 200 while the main loop is alive and no worker is stuck."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon_runner import dicom_destination, wait_for_report, write_config
from tests.peers import free_port
from tests.test_notices import ACCEPTED, REFUSED, REFUSED_DROP, ROUTE, drop, refusing_scp
from xnat_inbox import __version__

pytestmark = pytest.mark.ops

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def healthy(port: int, timeout: float = 30) -> tuple[int, str]:
    """/healthz once the daemon serves it (it starts serving as its main loop begins)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return get(port, "/healthz")
        except urllib.error.URLError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(port: int) -> Samples:
    status, text = get(port, "/metrics")
    assert status == 200
    return parse(text)


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_until(port: int, name: str, value: float, timeout: float = 60,
               **labels: str) -> Samples:
    deadline = time.monotonic() + timeout
    while sample(samples := scrape(port), name, **labels) != value and \
            time.monotonic() < deadline:
        time.sleep(0.1)
    assert sample(samples, name, **labels) == value, (name, labels, samples)
    return samples


def site(tmp_path: Path, peer: Any, metrics: dict[str, Any], **settings: Any) -> tuple[Path, Path]:
    inbox = tmp_path / "inbox"
    config = write_config(tmp_path, {"scp": dicom_destination(peer)},
                          [{"path": str(inbox), "route": {"destination": "scp", **ROUTE}}],
                          metrics=metrics, **settings)
    return config, inbox


def test_metrics_scraped_and_parsed_match_the_drops_sent(tmp_path, inprocess_scp, daemon):
    scp = refusing_scp(inprocess_scp)
    port = free_port()
    config, inbox = site(tmp_path, scp, {"listen": f"127.0.0.1:{port}"})
    daemon(config)
    assert healthy(port) == (200, "ok\n")
    before = scrape(port)  # every series is there from the start, at 0
    assert sample(before, "xnat_inbox_drops_finished_total", inbox=str(inbox),
                  outcome="done") == 0
    assert ("xnat_inbox_sent_instances_total", frozenset({("destination", "scp")})) in before

    reports = []
    for name, patient in (("MR_1", ACCEPTED), ("MR_2", ACCEPTED), (REFUSED_DROP, REFUSED)):
        drop(tmp_path, inbox, name, patient)
        reports.append(wait_for_report(inbox, name)[1])
    samples = wait_until(port, "xnat_inbox_drops_finished_total", 1, inbox=str(inbox),
                         outcome="failed")

    studies = [study for report in reports for study in report["studies"]]
    assert sample(samples, "xnat_inbox_drops_finished_total", inbox=str(inbox),
                  outcome="done") == 2
    assert sample(samples, "xnat_inbox_sent_instances_total", destination="scp") == \
        len(scp.stored) == sum(study["stored"] for study in studies) == 6
    assert sample(samples, "xnat_inbox_sent_bytes_total", destination="scp") == \
        sum(study["bytes_sent"] for study in studies) > 0
    assert sample(samples, "xnat_inbox_send_duration_seconds_count", destination="scp") == 3
    assert sample(samples, "xnat_inbox_send_duration_seconds_sum", destination="scp") == \
        pytest.approx(sum(study["send_seconds"] for study in studies), abs=0.01)
    assert sample(samples, "xnat_inbox_retries_total", destination="scp") == 0
    for name, value in (("xnat_inbox_drops_waiting", 0), ("xnat_inbox_drops_in_flight", 0),
                        ("xnat_inbox_drops_settling", 0), ("xnat_inbox_healthy", 1),
                        ("xnat_inbox_oldest_waiting_drop_age_seconds", 0),
                        ("xnat_inbox_notifications_queued", 0)):
        assert sample(samples, name) == value, name
    assert sample(samples, "xnat_inbox_destination_up", destination="scp") == 1
    assert sample(samples, "xnat_inbox_destination_paused", destination="scp") == 0
    assert sample(samples, "xnat_inbox_build_info", version=__version__) == 1
    assert sample(samples, "process_resident_memory_bytes") > 0  # served: the process' own
    assert not any(name.endswith("_created") for name, _ in samples)
    assert get(port, "/") == (404, "see /metrics and /healthz\n")


def test_metrics_textfile_for_node_exporter(tmp_path, inprocess_scp, daemon):
    folder = tmp_path / "textfile"
    folder.mkdir()
    path = folder / "xnat-inbox.prom"
    config, inbox = site(tmp_path, refusing_scp(inprocess_scp),
                         {"textfile": str(path), "textfile_seconds": 0.2})
    process = daemon(config)

    drop(tmp_path, inbox, "MR_1", ACCEPTED)
    drop(tmp_path, inbox, REFUSED_DROP, REFUSED)
    wait_for_report(inbox, "MR_1", daemon=process)
    wait_for_report(inbox, REFUSED_DROP, daemon=process)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        # renamed into place whole: every read parses, whenever it happens
        samples = parse(path.read_text())
        if sample(samples, "xnat_inbox_drops_finished_total", inbox=str(inbox),
                  outcome="failed") == 1 and sample(
                samples, "xnat_inbox_drops_finished_total", inbox=str(inbox), outcome="done"):
            break
        time.sleep(0.05)
    assert sample(samples, "xnat_inbox_drops_finished_total", inbox=str(inbox),
                  outcome="done") == 1
    assert sample(samples, "xnat_inbox_sent_instances_total", destination="scp") == 3
    assert sample(samples, "xnat_inbox_healthy") == 1
    # node_exporter has process_* of its own: the textfile leaves the daemon's out
    assert not any(name.startswith("process_") for name, _ in samples)

    assert process.stop() == 0
    samples = parse(path.read_text())  # the last write, as the daemon stopped
    assert sample(samples, "xnat_inbox_healthy") == 0
    assert sample(samples, "xnat_inbox_drops_finished_total", inbox=str(inbox),
                  outcome="done") == 1
    assert sorted(p.name for p in folder.iterdir()) == ["xnat-inbox.prom"]  # no temporary left


def test_healthz_follows_the_watchdog_and_gauges_show_a_held_drop(tmp_path, inprocess_scp,
                                                                  gate, daemon):
    held = gate(1)  # the second instance is answered only once the test opens the gate
    port = free_port()
    config, inbox = site(tmp_path, inprocess_scp(status_for=held),
                         {"listen": f"127.0.0.1:{port}"}, hung_worker_seconds=1)
    process = daemon(config)
    assert healthy(port) == (200, "ok\n")

    drop(tmp_path, inbox, "MR_1", ACCEPTED)
    drop(tmp_path, inbox, "MR_2", ACCEPTED)
    deadline = time.monotonic() + 60
    while get(port, "/healthz")[0] == 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert get(port, "/healthz") == (503, "a worker is stuck (see the log)\n")
    samples = scrape(port)  # the HTTP thread answers while the worker is stuck
    assert sample(samples, "xnat_inbox_healthy") == 0
    assert sample(samples, "xnat_inbox_drops_in_flight") == 1
    assert sample(samples, "xnat_inbox_drops_waiting") == 1  # MR_2, queued behind it
    assert sample(samples, "xnat_inbox_oldest_waiting_drop_age_seconds") > 0

    held.opened.set()
    wait_for_report(inbox, "MR_2", daemon=process)
    deadline = time.monotonic() + 30
    while get(port, "/healthz")[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert get(port, "/healthz") == (200, "ok\n")


def test_a_destination_down_shows_in_up_retries_and_waiting(tmp_path, daemon):
    port = free_port()
    down = {"type": "dicom", "host": "127.0.0.1", "port": free_port(), "connect_timeout": 3,
            "retry": {"max_attempts": 1000, "initial_backoff": 0.2, "max_backoff": 0.5}}
    inbox = tmp_path / "inbox"
    config = write_config(tmp_path, {"scp": down},
                          [{"path": str(inbox), "route": {"destination": "scp", **ROUTE}}],
                          metrics={"listen": str(port)})  # a port alone: on loopback
    daemon(config)
    assert healthy(port) == (200, "ok\n")

    drop(tmp_path, inbox, "MR_1", ACCEPTED)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        samples = scrape(port)
        if sample(samples, "xnat_inbox_retries_total", destination="scp") >= 2:
            break
        time.sleep(0.1)
    assert sample(samples, "xnat_inbox_retries_total", destination="scp") >= 2
    assert sample(samples, "xnat_inbox_destination_up", destination="scp") == 0
    assert sample(samples, "xnat_inbox_drops_waiting") + \
        sample(samples, "xnat_inbox_drops_in_flight") == 1
    assert sample(samples, "xnat_inbox_sent_instances_total", destination="scp") == 0

