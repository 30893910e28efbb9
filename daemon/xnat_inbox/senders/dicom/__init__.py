"""The `dicom` destination type: C-STORE over pynetdicom-negotiated associations.

sender drives the associations and records every instance's status, wire writes the PDUs and
reads the responses on the association's socket, splice puts the routing string into the
outgoing header, pool keeps idle associations for the next drop.
"""
