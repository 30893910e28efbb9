"""The small interface every destination type implements (one module per type beside this)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..reading.scan import Instance
from ..routing.route import RoutedStudy


class SendError(Exception):
    """The destination could not be reached or refused the whole study."""

    def __init__(self, message: str, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient  # worth trying again later (down, busy, timed out)


@dataclass(frozen=True)
class InstanceOutcome:
    stored: bool
    status: int | None = None  # the DICOM status, where the protocol has one
    note: str | None = None  # a warning status, or why it failed
    transient: bool = False  # a failure worth another try (out of resources, no answer)
    syntax: str | None = None  # the transfer syntax it went out in, where it was sent


@dataclass
class Delivery:
    """What one send of one study achieved, instance by instance."""

    destination: str
    outcomes: dict[str, InstanceOutcome] = field(default_factory=dict)  # by SOPInstanceUID
    error: str | None = None
    transient: bool = False  # the error is worth another try
    interrupted: bool = False  # stopped on request (SIGTERM) before the end
    associations: int = 0
    bytes_sent: int = 0
    seconds: float = 0.0

    @property
    def stored(self) -> int:
        return sum(outcome.stored for outcome in self.outcomes.values())


OnInstance = Callable[[Instance, InstanceOutcome], None]
ShouldStop = Callable[[], bool]
OnProgress = Callable[[int, int], None]  # files and bytes sent so far for the study


class Sender(Protocol):
    name: str

    def send(self, study: RoutedStudy, instances: list[Instance],
             on_instance: OnInstance | None = None,
             should_stop: ShouldStop | None = None,
             on_progress: OnProgress | None = None) -> Delivery:
        """Send these instances of the study (those not yet acknowledged); never raises for a
        delivery problem; checks should_stop between instances; on_progress, where given,
        hears how much went out before the destination acknowledges it."""
        ...

    def check(self) -> str:
        """Prove the destination answers (C-ECHO, login); raise SendError when it doesn't."""
        ...
