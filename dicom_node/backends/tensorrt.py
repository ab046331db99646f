"""TensorRT on an NVIDIA GPU, from a plan built by ``tools/build_engine.py``.

Same contract as :class:`~dicom_node.backends.onnxruntime.OnnxRuntimeBackend`: float32
``image`` and ``mask`` [N,1,32,32,32] in, float32 ``restored`` out. The plan's network
may run in fp16 inside, but its I/O is float32 (see ``dicom_node.backends.fp16``).

TensorRT 10/11 API only (name-based tensors, ``execute_async_v3``); memory and streams
through cuda-python's ``cuda.bindings.runtime``, which NVIDIA's own samples use instead
of pycuda from TensorRT 10.14 on. Buffers are allocated once for the largest batch and
reused: pinned host memory, so the copies really are asynchronous, and device memory.

``tensorrt`` and ``cuda`` are imported inside functions only: importing this module
needs neither, so the node's import path never requires CUDA.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from dicom_node.backends import PATCH, BackendError

log = logging.getLogger(__name__)
trt_log = logging.getLogger("tensorrt")

INPUTS = ("image", "mask")
OUTPUT = "restored"
PATCH_SHAPE = (1, PATCH, PATCH, PATCH)
PATCH_FLOATS = int(np.prod(PATCH_SHAPE))


def trt_logger(trt: Any, info_level: int = logging.INFO) -> Any:
    """A ``trt.ILogger`` that writes to Python logging (logger "tensorrt"), so TensorRT's messages
    land in the node's log with everything else. Keep a reference for as long as TensorRT uses it."""
    sev = trt.ILogger.Severity
    levels = {sev.INTERNAL_ERROR: logging.CRITICAL, sev.ERROR: logging.ERROR, sev.WARNING: logging.WARNING,
              sev.INFO: info_level, sev.VERBOSE: logging.DEBUG}

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            level = levels.get(severity, logging.DEBUG)
            if trt_log.isEnabledFor(level):
                trt_log.log(level, "%s", msg)

    return _Logger()


class CudaError(RuntimeError):
    pass


class _Cuda:
    """cuda-python's runtime calls return ``(cudaError_t, *values)``; this turns errors into exceptions."""

    def __init__(self) -> None:
        from cuda.bindings import runtime as cudart

        self.rt = cudart

    def __call__(self, what: str, result: tuple) -> Any:
        err, *values = result
        if err != self.rt.cudaError_t.cudaSuccess:
            _, text = self.rt.cudaGetErrorString(err)
            text = text.decode(errors="replace") if isinstance(text, bytes) else str(text)
            raise CudaError(f"{what}: {getattr(err, 'name', err)} ({text})")
        if not values:
            return None
        return values[0] if len(values) == 1 else tuple(values)

    def native(self, obj: Any) -> int:
        """The raw handle of a cuda-python object (a stream), as TensorRT's ``stream_handle`` wants it.

        ``int(obj)`` is deprecated in newer cuda-bindings in favour of ``cuda.bindings.utils.get_cuda_native_handle``.
        """
        try:
            from cuda.bindings.utils import get_cuda_native_handle
        except ImportError:
            return int(obj)
        return int(get_cuda_native_handle(obj))


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, plan: str | Path, max_batch: int = 8, device: int = 0, warmup: bool = True):
        import tensorrt as trt

        self.plan = Path(plan)
        self.max_batch = int(max_batch)
        self.device = int(device)
        self._lock = threading.Lock()  # buffers and the execution context are shared; one batch at a time
        self._closed = True
        self._cuda = cuda = _Cuda()
        rt = cuda.rt
        cuda("cudaSetDevice", rt.cudaSetDevice(device))

        self._logger = trt_logger(trt, info_level=logging.DEBUG)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.plan.read_bytes())
        if self.engine is None:
            raise BackendError(f"TensorRT could not deserialize {self.plan.name} (built for another GPU or TensorRT "
                               "version?); rebuild it with tools/build_engine.py")
        self._check_io(trt)
        lo, opt, hi = (int(s[0]) for s in self.engine.get_tensor_profile_shape(INPUTS[0], 0))
        self.profile = (lo, opt, hi)
        self.chunk = max(min(self.max_batch, hi), lo)  # windows per execute; larger batches are split
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise BackendError(f"TensorRT could not create an execution context for {self.plan.name}")

        self._stream = cuda("cudaStreamCreate", rt.cudaStreamCreate())
        self._stream_handle = cuda.native(self._stream)
        self._closed = False
        nbytes = self.chunk * PATCH_FLOATS * 4
        self._device: dict[str, int] = {}
        self._host_ptr: dict[str, int] = {}
        self._host: dict[str, np.ndarray] = {}
        for name in (*INPUTS, OUTPUT):
            self._device[name] = int(cuda("cudaMalloc", rt.cudaMalloc(nbytes)))
            ptr = int(cuda("cudaMallocHost", rt.cudaMallocHost(nbytes)))
            self._host_ptr[name] = ptr
            flat = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(nbytes // 4,))
            self._host[name] = flat.reshape((self.chunk, *PATCH_SHAPE))
        log.info("TensorRT %s: plan %s, profile min/opt/max %s, %d windows per execute",
                 trt.__version__, self.plan.name, "/".join(map(str, self.profile)), self.chunk)
        if warmup:
            self._warmup()

    def _check_io(self, trt: Any) -> None:
        """The plan must have the model contract's tensors, in the right direction, all float32."""
        engine = self.engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        if sorted(names) != sorted((*INPUTS, OUTPUT)):
            raise BackendError(f"{self.plan.name} has I/O tensors {names}, expected image, mask -> restored")
        for name in names:
            want = trt.TensorIOMode.OUTPUT if name == OUTPUT else trt.TensorIOMode.INPUT
            if engine.get_tensor_mode(name) != want:
                raise BackendError(f"{self.plan.name}: {name} is not an {want.name.lower()}")
            if np.dtype(trt.nptype(engine.get_tensor_dtype(name))) != np.float32:
                raise BackendError(f"{self.plan.name}: {name} is {engine.get_tensor_dtype(name)}, expected float32")

    def _warmup(self) -> None:
        """First executions pay for lazy CUDA module loading and allocations; pay it before the first series."""
        t0 = time.perf_counter()
        zeros = np.zeros((self.chunk, *PATCH_SHAPE), np.float32)
        self.run(zeros, zeros)
        self.run(zeros[:1], zeros[:1])
        log.info("TensorRT warm-up: %.0f ms", 1000 * (time.perf_counter() - t0))

    def run(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        image = np.ascontiguousarray(image, np.float32)
        mask = np.ascontiguousarray(mask, np.float32)
        if image.shape != mask.shape or image.shape[1:] != PATCH_SHAPE:
            raise ValueError(f"image and mask must both be [N,1,32,32,32], got {image.shape} and {mask.shape}")
        out = np.empty_like(image)
        with self._lock:
            if self._closed:
                raise BackendError("TensorRT backend is closed")
            # The current device is per host thread, and the node's workers call from their own threads.
            self._cuda("cudaSetDevice", self._cuda.rt.cudaSetDevice(self.device))
            for i in range(0, len(image), self.chunk):
                k = min(self.chunk, len(image) - i)
                out[i:i + k] = self._execute(image[i:i + k], mask[i:i + k])
        return out

    def _execute(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        cuda, rt = self._cuda, self._cuda.rt
        k = len(image)
        n = max(k, self.profile[0])  # below the profile's minimum: pad with empty windows
        nbytes = n * PATCH_FLOATS * 4
        for name, data in zip(INPUTS, (image, mask)):
            host = self._host[name]
            host[:k] = data
            host[k:n] = 0.0
            cuda("cudaMemcpyAsync", rt.cudaMemcpyAsync(self._device[name], self._host_ptr[name], nbytes,
                                                       rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self._stream))
            if self.context.set_input_shape(name, (n, *PATCH_SHAPE)) is False:
                raise BackendError(f"TensorRT rejected input shape {(n, *PATCH_SHAPE)} for {name} "
                                   f"(profile {self.profile})")
        for name in (*INPUTS, OUTPUT):
            if self.context.set_tensor_address(name, self._device[name]) is False:
                raise BackendError(f"TensorRT rejected the device address for {name}")
        if not self.context.execute_async_v3(self._stream_handle):
            raise BackendError("TensorRT execute_async_v3 failed (see the tensorrt log)")
        cuda("cudaMemcpyAsync", rt.cudaMemcpyAsync(self._host_ptr[OUTPUT], self._device[OUTPUT], nbytes,
                                                   rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream))
        cuda("cudaStreamSynchronize", rt.cudaStreamSynchronize(self._stream))
        return self._host[OUTPUT][:k].copy()

    def close(self) -> None:
        """Free the buffers and the stream (the engine and context go with the object)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            cuda, rt = self._cuda, self._cuda.rt
            cuda("cudaStreamSynchronize", rt.cudaStreamSynchronize(self._stream))
            for ptr in self._device.values():
                cuda("cudaFree", rt.cudaFree(ptr))
            self._host.clear()
            for ptr in self._host_ptr.values():
                cuda("cudaFreeHost", rt.cudaFreeHost(ptr))
            cuda("cudaStreamDestroy", rt.cudaStreamDestroy(self._stream))

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown there is nothing left to report to
            self.close()
