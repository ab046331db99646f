"""Pick the inference backend, and say why, so an operator can trust the choice.

``auto`` takes TensorRT only when a GPU, TensorRT (with cuda-python) and a plan built
for this GPU, this TensorRT version and this very model are all present; the plan is
found beside the model by its sidecar (see ``plan.py``). Anything less is ONNX Runtime
on the CPU, with the reason in the log. The decision itself is ``plan.decide``, a pure
function of an :class:`~dicom_node.backends.plan.Environment`; ``env`` lets tests
simulate any host.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_node.backends import Backend, BackendError

if TYPE_CHECKING:
    from dicom_node.backends.plan import Environment

log = logging.getLogger(__name__)
BACKENDS = ("auto", "onnxruntime", "tensorrt")


def model_id(path: str | Path) -> str:
    """Short, stable identity of a model file: its name and the start of its sha256."""
    p = Path(path)
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    return f"{p.stem} sha256:{digest[:16]}"


def _onnxruntime(model: str | Path, threads: int, batch: int) -> Backend:
    from dicom_node.backends.onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(model, threads=threads, max_batch=batch)


def select(name: str, model: str | Path, threads: int = 0, batch: int = 8,
           env: Environment | None = None) -> tuple[Backend, str]:
    """The backend to use and a one-line reason for the choice.

    ``env`` describes the host; None probes it (only when TensorRT is in question).
    """
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    if not Path(model).is_file():
        raise BackendError(f"model not found: {model}")
    if name == "onnxruntime":
        return _onnxruntime(model, threads, batch), "onnxruntime (requested)"
    from dicom_node.backends.plan import decide, probe

    choice = decide(name, model, env or probe())
    if choice.error:
        raise BackendError(choice.error)
    if choice.backend == "tensorrt":
        assert choice.plan is not None
        from dicom_node.backends.tensorrt import TensorRTBackend

        try:
            backend: Backend = TensorRTBackend(choice.plan, max_batch=batch)
        except Exception as exc:  # noqa: BLE001 - auto falls back on any load failure, and says so
            if name == "tensorrt":
                raise BackendError(f"tensorrt backend requested but {choice.plan.name} failed to load: {exc}") from exc
            reason = f"auto: TensorRT failed to load {choice.plan.name} ({exc}); using the CPU"
            log.warning("backend: onnxruntime (%s)", reason)
            return _onnxruntime(model, threads, batch), f"onnxruntime ({reason})"
        log.info("backend: tensorrt (%s)", choice.reason)
        return backend, f"tensorrt ({choice.reason})"
    log.info("backend: onnxruntime (%s)", choice.reason)
    return _onnxruntime(model, threads, batch), f"onnxruntime ({choice.reason})"
