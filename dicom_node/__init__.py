"""dicom-node: calcium-free coronary CTA, delivered through the PACS."""

import os

__version__ = "0.1.0"

# ONNX Runtime's Linux builds collect telemetry (a device id, process information and a database under
# ~/.cache/Microsoft) as soon as the library loads, before any API could turn it off; this variable,
# read at load time, stops all of it. A hospital node collects nothing of the kind, so it is set here,
# before anything imports onnxruntime, and the processing children inherit it.
os.environ["ORT_DISABLE_TELEMETRY"] = "1"
