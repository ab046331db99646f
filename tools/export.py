#!/usr/bin/env python3
"""Entry point for ONNX export (the lab): `python -m dicom_node_lab.export --help` says what it does."""

import sys

from dicom_node_lab import export as tool

if __name__ == "__main__":
    sys.exit(tool.main())
