"""Which sender serves a destination: one entry per destination type."""

from __future__ import annotations

from collections.abc import MutableMapping

from ..config import Destination, DicomDestination, XnatDestination
from .base import Sender
from .dicom.sender import DicomSender
from .xnat.sender import XnatSender


def make_sender(name: str, destination: Destination,
                memo: MutableMapping[str, str] | None = None) -> Sender:
    """`memo`: durable notes a sender keeps across attempts and restarts (the state DB)."""
    if isinstance(destination, DicomDestination):
        return DicomSender(name, destination)
    if isinstance(destination, XnatDestination):
        return XnatSender(name, destination, memo)
    raise ValueError(f"destination {name!r}: no sender for type {destination.type!r}")
