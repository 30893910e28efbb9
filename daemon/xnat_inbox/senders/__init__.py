"""Senders, one module per destination type, behind the interface in base.py."""

from __future__ import annotations

from collections.abc import MutableMapping

from ..config import Destination, DicomDestination, XnatDestination
from .base import Delivery, InstanceOutcome, Sender, SendError
from .dicom import DicomSender
from .xnat import XnatSender


def make_sender(name: str, destination: Destination,
                memo: MutableMapping[str, str] | None = None) -> Sender:
    """`memo`: durable notes a sender keeps across attempts and restarts (the state DB)."""
    if isinstance(destination, DicomDestination):
        return DicomSender(name, destination)
    if isinstance(destination, XnatDestination):
        return XnatSender(name, destination, memo)
    raise ValueError(f"destination {name!r}: no sender for type {destination.type!r}")


__all__ = ["Delivery", "DicomSender", "InstanceOutcome", "SendError", "Sender", "XnatSender",
           "make_sender"]
