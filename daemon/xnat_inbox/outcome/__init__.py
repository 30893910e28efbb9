"""Outcome: what became of a drop, and where its originals go.

verify decides whether each study was delivered; report builds report.json; finish moves the
originals to done/ or failed/ with the report and log beside them, crash-safe (safecopy when
they cross file systems). The end of the flow: nothing is handed on.
"""
