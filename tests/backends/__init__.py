"""Tests of dicom_node.backends."""
