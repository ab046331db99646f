"""Tests of dicom_node.pipeline."""
