"""DICOM in and out: reading series, writing derived objects."""
