"""Reading: what a claimed drop holds.

unpack expands an archive drop into the work area (within the inbox's limits); scan walks the
drop, reads every file's header (no pixel data), classifies each file and groups the DICOM ones
by study and series, in worker processes. Hands a `ScanResult` (studies, series, instances and
every file's outcome) to routing.
"""
