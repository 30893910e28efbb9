"""Prometheus metrics, with the prometheus_client library: served at /metrics (and /healthz)
on `metrics.listen`, and/or written for node_exporter's textfile collector to
`metrics.textfile`, atomically (a temporary file beside it, renamed over it).

Counters count from the daemon's start (Prometheus' rate() and increase() expect that);
gauges are read when scraped: from the daemon's memory and the state database.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    disable_created_metrics,
    make_wsgi_app,
    write_to_textfile,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.process_collector import ProcessCollector

from .. import __version__
from ..config import SiteConfig
from ..intake.claim import ClaimedDrop
from ..logs import get_logger
from ..notifyconfig import MetricsConfig
from ..senders.base import Delivery
from .notify import watchdog_interval
from .state import State

#: seconds one study takes to send: from a few instances to a whole-body CT over a slow link
SEND_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
#: without systemd's watchdog, the main loop counts as stuck after this long without a tick
#: (the unit's WatchdogSec)
DEFAULT_WATCHDOG_SECONDS = 60.0

log = get_logger(step="metrics")


class Watched(Protocol):
    """What the metrics read of the running daemon."""

    @property
    def config(self) -> SiteConfig: ...
    @property
    def drops(self) -> Mapping[str, ClaimedDrop]: ...  # claimed and not finished
    @property
    def last_activity(self) -> Mapping[str, float]: ...  # drops being read or sent

    def settling(self) -> int: ...


class Health:
    """The systemd watchdog's condition: the main loop ticks, and no worker is stuck."""

    def __init__(self, hung: Callable[[], bool]) -> None:
        every = watchdog_interval(os.environ)
        self.within = 2 * every if every else DEFAULT_WATCHDOG_SECONDS
        self.hung = hung
        self.last_tick: float | None = None
        self.stopping = False

    def tick(self, now: float) -> None:
        self.last_tick = now

    def check(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "stopping"
        if self.last_tick is None:
            return False, "starting"
        age = time.monotonic() - self.last_tick
        if age > self.within:
            return False, f"main loop silent for {age:.0f} s"
        if self.hung():
            return False, "a worker is stuck (see the log)"
        return True, "ok"


class Metrics:
    def __init__(self, daemon: Watched, state: State, settings: MetricsConfig,
                 health: Health, queued: Callable[[], int]) -> None:
        self.daemon = daemon
        self.state = state
        self.settings = settings
        self.health = health
        self.queued = queued
        disable_created_metrics()  # no `_created` series beside every counter
        self.registry = registry = CollectorRegistry()
        self.finished = Counter("xnat_inbox_drops_finished", "Drops moved to done/ or "
                                "failed/, by inbox and outcome", ["inbox", "outcome"],
                                registry=registry)
        self.instances = Counter("xnat_inbox_sent_instances", "Instances the destination "
                                 "acknowledged", ["destination"], registry=registry)
        self.bytes = Counter("xnat_inbox_sent_bytes", "Bytes sent", ["destination"],
                             registry=registry)
        self.seconds = Histogram("xnat_inbox_send_duration_seconds", "Seconds one send of "
                                 "one study took", ["destination"], buckets=SEND_BUCKETS,
                                 registry=registry)
        self.retries = Counter("xnat_inbox_retries", "Drops' attempts retried after a "
                               "transient failure", ["destination"], registry=registry)
        self.notices = Counter("xnat_inbox_notifications", "Notifications delivered",
                               ["kind"], registry=registry)
        self.notices_failed = Counter("xnat_inbox_notifications_failed", "Tries to deliver a "
                                      "notification that failed", ["kind"], registry=registry)
        Info("xnat_inbox_build", "The daemon's version", registry=registry).info(
            {"version": __version__})
        registry.register(_Gauges(self))
        self._zeros()
        self.server: ThreadingWSGIServer | None = None
        self.stop_writing = threading.Event()
        self.writer: threading.Thread | None = None

    def _zeros(self) -> None:
        """Every series the config can have, at 0 from the start (rate() needs a first
        sample), and none for destinations or inboxes gone from it."""
        config = self.daemon.config
        for inbox in config.inboxes:
            for outcome in ("done", "failed"):
                self.finished.labels(str(inbox.path), outcome)
        for name in config.destinations:
            for counter in (self.instances, self.bytes, self.retries):
                counter.labels(name)
        for kind in ("webhook", "email"):
            self.notices.labels(kind)
            self.notices_failed.labels(kind)

    # --- what the daemon reports -------------------------------------------------------
    def sent(self, destination: str, delivery: Delivery) -> None:
        self.instances.labels(destination).inc(delivery.stored)
        self.bytes.labels(destination).inc(delivery.bytes_sent)
        self.seconds.labels(destination).observe(delivery.seconds)

    def finished_drop(self, inbox: str, outcome: str) -> None:
        self.finished.labels(inbox, outcome).inc()

    def retrying(self, destination: str) -> None:
        self.retries.labels(destination).inc()

    def notified(self, kind: str, delivered: bool) -> None:
        (self.notices if delivered else self.notices_failed).labels(kind).inc()

    # --- serving and writing --------------------------------------------------------------
    def start(self) -> None:
        if self.settings.listen:
            self._serve()
        if self.settings.textfile:
            self.writer = threading.Thread(target=self._write_every, name="metrics textfile",
                                           daemon=True)
            self.writer.start()

    def _serve(self) -> None:
        host, port = self.settings.address()
        served = CollectorRegistry()  # ours, and the process' own (memory, CPU, open files)
        served.register(_Forward(self.registry))
        ProcessCollector(registry=served)
        metrics = make_wsgi_app(served)
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        server_class = type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family})
        try:
            self.server = make_server(host, port, self._app(metrics), server_class,
                                      handler_class=_Quiet)
        except OSError as exc:  # the drops matter more than their metrics: go on without
            log.error("cannot serve metrics; /metrics and /healthz are not served",
                      listen=self.settings.listen, reason=exc.strerror or str(exc))
            return
        threading.Thread(target=self.server.serve_forever, name="metrics http",
                         daemon=True).start()
        log.info("serving metrics", url=f"http://{self.settings.listen}/metrics")

    def _app(self, metrics: Callable[..., Any]) -> Callable[..., Any]:
        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            path = environ.get("PATH_INFO", "")
            if path == "/metrics":
                return metrics(environ, start_response)
            if path == "/healthz":
                healthy, why = self.health.check()
                start_response("200 OK" if healthy else "503 Service Unavailable",
                               [("Content-Type", "text/plain; charset=utf-8")])
                return [f"{why}\n".encode()]
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"see /metrics and /healthz\n"]
        return app

    def _write_every(self) -> None:
        while True:
            self.write()
            if self.stop_writing.wait(self.settings.textfile_seconds):
                return

    def write(self) -> None:
        assert self.settings.textfile is not None
        try:
            write_to_textfile(str(self.settings.textfile), self.registry)
        except OSError as exc:
            log.warning("cannot write the metrics textfile", path=str(self.settings.textfile),
                        reason=exc.strerror or str(exc))

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        if self.writer is not None:
            self.stop_writing.set()
            self.writer.join(timeout=10)
            self.write()  # the last counts, with healthy 0: the daemon stopped


class _Gauges:
    """What is true now, read at each scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        metrics = self.metrics
        daemon = metrics.daemon
        drops = dict(daemon.drops)
        active = set(daemon.last_activity)
        waiting = [drop for drop_id, drop in drops.items() if drop_id not in active]
        oldest = min((drop.claimed_at.timestamp() for drop in waiting), default=None)
        yield _gauge("xnat_inbox_drops_settling", "Drops copied in and not yet taken",
                     daemon.settling())
        yield _gauge("xnat_inbox_drops_waiting", "Drops claimed and waiting: queued, waiting "
                     "to retry, or held by a pause", len(waiting))
        yield _gauge("xnat_inbox_drops_in_flight", "Drops being read or sent",
                     len(set(drops) & active))
        yield _gauge("xnat_inbox_oldest_waiting_drop_age_seconds", "Seconds since the oldest "
                     "waiting drop was claimed (0: none waits)",
                     time.time() - oldest if oldest is not None else 0.0)
        health = metrics.state.health()
        # a daemon that can pause destinations says which (service/pause.py)
        paused = getattr(daemon, "paused", None)
        held = set(paused()) if callable(paused) else set()
        up = GaugeMetricFamily("xnat_inbox_destination_up", "1 unless the destination's last "
                               "attempt failed", labels=["destination"])
        pause = GaugeMetricFamily("xnat_inbox_destination_paused", "1 while the destination "
                                  "is paused or outside its send window", labels=["destination"])
        for name in daemon.config.destinations:
            up.add_metric([name], 0.0 if (health.get(name) or {}).get("up") is False else 1.0)
            pause.add_metric([name], 1.0 if name in held else 0.0)
        yield up
        yield pause
        yield _gauge("xnat_inbox_notifications_queued", "Notifications waiting to be "
                     "delivered", metrics.queued())
        yield _gauge("xnat_inbox_healthy", "1 while the main loop ticks and no worker is "
                     "stuck (as /healthz, and systemd's watchdog)",
                     1.0 if metrics.health.check()[0] else 0.0)


class _Forward:
    """Our registry's metrics within another registry (the one served, beside the process'
    own, which the textfile leaves out: node_exporter has its own of those names)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        yield from self.registry.collect()


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class _Quiet(WSGIRequestHandler):
    """No line per request on stderr (the journal)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass
