"""The small interface every destination type implements (one module per type beside this)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..route import RoutedStudy
from ..scan import Instance


class SendError(Exception):
    """The destination could not be reached or refused the whole study."""


@dataclass(frozen=True)
class InstanceOutcome:
    stored: bool
    status: int | None = None  # the DICOM status, where the protocol has one
    note: str | None = None  # a warning status, or why it failed


@dataclass
class Delivery:
    """What one send of one study achieved, instance by instance."""

    destination: str
    outcomes: dict[str, InstanceOutcome] = field(default_factory=dict)  # by SOPInstanceUID
    error: str | None = None
    associations: int = 0
    bytes_sent: int = 0
    seconds: float = 0.0

    @property
    def stored(self) -> int:
        return sum(outcome.stored for outcome in self.outcomes.values())


OnInstance = Callable[[Instance, InstanceOutcome], None]


class Sender(Protocol):
    name: str

    def send(self, study: RoutedStudy, on_instance: OnInstance | None = None) -> Delivery:
        """Send every included instance of the study; never raises for a delivery problem."""
        ...

    def check(self) -> str:
        """Prove the destination answers (C-ECHO, login); raise SendError when it doesn't."""
        ...
