"""The lab: everything that makes, trains and measures the model, and nothing a hospital runs.

The synthetic phantom and its DICOM writer, the stenosis reader, masks and patches, the networks and
their training and export, classical baselines, self-supervised sampling, Experiments 1 and 2 and the
benchmarks. It is a distribution of its own (``pip install -e lab``; ``make venv`` installs it), and
``dicom_node`` never imports it (a test checks).
"""
