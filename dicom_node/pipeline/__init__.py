"""The processing pipeline, one module per stage, in the order a series goes through them:
series (CT series to an HU volume) → detect (calcium) → windows (where the model looks) → restore (the
model, step by step, through a backend) → derived and seg (the DICOM written back); ``process`` runs
them all, for ``dicom-node process`` and the node's workers alike."""
