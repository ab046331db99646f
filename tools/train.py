#!/usr/bin/env python3
"""Entry point for training (the lab): `python -m dicom_node_lab.train --help` says what it does."""

import sys

from dicom_node_lab import train as tool

if __name__ == "__main__":
    sys.exit(tool.main())
