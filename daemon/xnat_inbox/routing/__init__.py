"""Routing: where each study goes and under which labels.

route merges the inbox's route and every route.yaml down to the drop, filters series, renders
and checks the project/subject/session labels; deidentify attaches the outgoing copy's
de-identification and runs the PHI guard. Hands each study as a `RoutedStudy` (destination,
labels, instances to send, header transform) to a sender.
"""
