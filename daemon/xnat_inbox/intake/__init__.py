"""Intake: from files appearing in an inbox to a drop the daemon owns.

watch marks drops touched (inotify, or polling on network shares), settle decides when a touched
drop is completely written, and claim renames it atomically into the inbox's work area. Hands a
`ClaimedDrop` (its work folder, origin and id, durably recorded) to reading.
"""
