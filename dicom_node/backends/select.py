"""Pick the inference backend, and say why, so an operator can trust the choice."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path

from . import Backend

log = logging.getLogger(__name__)
BACKENDS = ("auto", "onnxruntime", "tensorrt")


class BackendError(RuntimeError):
    pass


def model_id(path: str | Path) -> str:
    """Short, stable identity of a model file: its name and the start of its sha256."""
    p = Path(path)
    digest = hashlib.sha256(p.read_bytes()).hexdigest()
    return f"{p.stem} sha256:{digest[:16]}"


def tensorrt_unavailable_reason() -> str | None:
    """Why the TensorRT path cannot run here, or None if it might."""
    if importlib.util.find_spec("tensorrt") is None:
        return "tensorrt is not installed (pip install '.[gpu]' on a GPU host)"
    return "the TensorRT backend is not part of this build yet"


def select(name: str, model: str | Path, threads: int = 0, batch: int = 8) -> tuple[Backend, str]:
    """The backend to use and a one-line reason for the choice."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    if not Path(model).is_file():
        raise BackendError(f"model not found: {model}")
    if name == "tensorrt":
        raise BackendError(f"tensorrt backend requested but {tensorrt_unavailable_reason()}")
    from .onnxruntime import OnnxRuntimeBackend

    reason = "requested" if name == "onnxruntime" else f"auto: {tensorrt_unavailable_reason()}"
    return OnnxRuntimeBackend(model, threads=threads, max_batch=batch), f"onnxruntime ({reason})"
