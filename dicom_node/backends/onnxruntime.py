"""ONNX Runtime on the CPU: the default backend, and the reference for all others."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, model: str | Path, threads: int = 0, max_batch: int = 8):
        import onnxruntime as ort

        ort.disable_telemetry_events()  # also at run time (dicom_node/__init__.py stops it at load)
        opts = ort.SessionOptions()
        # 0 = one thread per core; a worker pool sets this so concurrent jobs share the CPU.
        opts.intra_op_num_threads = threads or (os.cpu_count() or 1)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])
        self.max_batch = max_batch
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def run(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.session.run(["restored"], {"image": np.ascontiguousarray(image, np.float32),
                                               "mask": np.ascontiguousarray(mask, np.float32)})[0]
