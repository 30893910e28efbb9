"""Notices: people told by webhook or email that a drop failed, was delivered, or waits.

message builds what a notice says from the drop's report (PHI masked unless the target has
include_phi); webhook and mail deliver it; dispatch runs one courier thread per target, which
retries with backoff and logs a target's outage once, so a notice never holds up or changes a
drop. The service decides who hears of which drop (service/notices.py).
"""
