#!/usr/bin/env python3
"""Entry point for the TensorRT engine build on a GPU host, the same as `dicom-node build-engine`:
`python -m dicom_node.backends.build --help` says what it does."""

import sys

from dicom_node.backends import build as tool

if __name__ == "__main__":
    sys.exit(tool.main())
