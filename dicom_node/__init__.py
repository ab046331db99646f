"""dicom-node: calcium-free coronary CTA, delivered through the PACS."""

__version__ = "0.1.0"
