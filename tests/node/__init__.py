"""Tests of dicom_node.node."""
