#!/usr/bin/env python3
"""Entry point for Experiments 1 and 2 (the lab): `python -m dicom_node_lab.evaluate --help` says what it does."""

import sys

from dicom_node_lab import evaluate as tool

if __name__ == "__main__":
    sys.exit(tool.main())
