"""``dicom-node serve``: the DICOM node.

receive (DIMSE, STOW-RS) → spool → assemble (quiet timer) → jobs (SQLite) → worker
(the offline pipeline) → send (C-STORE, STOW-RS). Each module does one of these jobs;
``server`` wires them together.
"""
