"""Tests of the lab (dicom_node_lab): phantom, training, experiments."""
