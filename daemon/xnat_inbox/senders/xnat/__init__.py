"""The `xnat` destination type: XNAT's REST import service.

sender uploads a study (or its series) as zips streamed by zipstream, commits and archives;
session holds the HTTP session and maps XNAT's answers to errors, auth the credentials,
readback checks what XNAT holds against what was sent.
"""
