"""Senders: one sub-package per destination type behind the interface in base.py.

registry picks the sender for a destination; each sender takes `RoutedStudy`s and returns a
`Delivery` (one `InstanceOutcome` per instance), reporting every outcome as it is known, to
outcome.
"""
