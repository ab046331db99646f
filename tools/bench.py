#!/usr/bin/env python3
"""Entry point for benchmarks (the lab): `python -m dicom_node_lab.bench --help` says what it does."""

import sys

from dicom_node_lab import bench as tool

if __name__ == "__main__":
    sys.exit(tool.main())
