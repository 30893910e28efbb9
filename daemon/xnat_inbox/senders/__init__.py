"""Senders, one module per destination type, behind the interface in base.py."""

from __future__ import annotations

from ..config import Destination, DicomDestination
from .base import Delivery, InstanceOutcome, Sender, SendError
from .dicom import DicomSender


def make_sender(name: str, destination: Destination) -> Sender:
    if isinstance(destination, DicomDestination):
        return DicomSender(name, destination)
    raise ValueError(f"destination {name!r}: no sender for type {destination.type!r}")


__all__ = ["Delivery", "DicomSender", "InstanceOutcome", "SendError", "Sender", "make_sender"]
