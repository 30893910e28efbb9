"""Senders, one module per destination type, behind the interface in base.py."""

from __future__ import annotations

from ..config import Destination, DicomDestination, XnatDestination
from .base import Delivery, InstanceOutcome, Sender, SendError
from .dicom import DicomSender
from .xnat import XnatSender


def make_sender(name: str, destination: Destination) -> Sender:
    if isinstance(destination, DicomDestination):
        return DicomSender(name, destination)
    if isinstance(destination, XnatDestination):
        return XnatSender(name, destination)
    raise ValueError(f"destination {name!r}: no sender for type {destination.type!r}")


__all__ = ["Delivery", "DicomSender", "InstanceOutcome", "SendError", "Sender", "XnatSender",
           "make_sender"]
