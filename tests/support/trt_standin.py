# ruff: noqa: N802, N815 - the stand-ins keep CUDA's and TensorRT's own names
"""A stand-in for ``tensorrt`` and ``cuda.bindings.runtime``, for CI hosts without a GPU.

It implements only the calls dicom-node makes, with the signatures and return
conventions of TensorRT 10/11 and cuda-python as documented, and "executes" a plan
by running the ONNX file it names through ONNX Runtime. It proves our own logic
(buffers, batching, padding, copies, the build tool's bookkeeping), not that the real
libraries behave as documented: test_gpu_tensorrt.py does that on a GPU host.
"""

from __future__ import annotations

import ctypes
import enum
import sys
import types
from pathlib import Path

import numpy as np

VERSION = "10.12.0.36"


class _Err(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1


class _Kind(enum.IntEnum):
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2


class _Stream:
    def __init__(self, handle: int):
        self.handle = handle

    def __int__(self) -> int:
        return self.handle


class FakeCudaRuntime(types.ModuleType):
    """``cuda.bindings.runtime``: every call returns ``(cudaError_t, *values)``; "device" memory is host memory."""

    cudaError_t = _Err
    cudaMemcpyKind = _Kind

    def __init__(self) -> None:
        super().__init__("cuda.bindings.runtime")
        self.buffers: dict[int, ctypes.Array] = {}
        self.device: set[int] = set()  # pointers from cudaMalloc; the rest is host memory
        self.calls: list[str] = []

    def _alloc(self, n: int) -> tuple:
        buf = (ctypes.c_char * n)()
        ptr = ctypes.addressof(buf)
        self.buffers[ptr] = buf
        return _Err.cudaSuccess, ptr

    def cudaMalloc(self, n):
        self.calls.append("cudaMalloc")
        err, ptr = self._alloc(n)
        self.device.add(ptr)
        return err, ptr

    def _on_device(self, ptr: int) -> bool:
        return any(base <= ptr < base + len(self.buffers[base]) for base in self.device)

    def cudaMallocHost(self, n):
        self.calls.append("cudaMallocHost")
        return self._alloc(n)

    def cudaFree(self, ptr):
        self.buffers.pop(ptr)
        self.device.discard(ptr)
        return (_Err.cudaSuccess,)

    cudaFreeHost = cudaFree

    def cudaSetDevice(self, d):
        return (_Err.cudaSuccess,) if d == 0 else (_Err.cudaErrorInvalidValue,)

    def cudaStreamCreate(self):
        return _Err.cudaSuccess, _Stream(0xC0FFEE)

    def cudaStreamDestroy(self, s):
        return (_Err.cudaSuccess,)

    def cudaStreamSynchronize(self, s):
        assert isinstance(s, _Stream)
        return (_Err.cudaSuccess,)

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        assert isinstance(stream, _Stream) and kind in _Kind
        # The real runtime copies as ``kind`` says, whatever the pointers: a swapped direction is a bug.
        if kind == _Kind.cudaMemcpyHostToDevice:
            assert self._on_device(dst) and not self._on_device(src), "HostToDevice with a device source"
        else:
            assert self._on_device(src) and not self._on_device(dst), "DeviceToHost with a device target"
        self.calls.append(f"memcpy{kind.name[10:]}")
        ctypes.memmove(dst, src, n)
        return (_Err.cudaSuccess,)

    def cudaGetErrorString(self, err):
        return _Err.cudaSuccess, err.name.encode()


class _Sev(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class _Mode(enum.IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class _ILogger:
    Severity = _Sev

    def __init__(self) -> None:
        pass


class _Tensor:
    def __init__(self, name: str):
        self.name, self.dtype, self.shape = name, "DataType.FLOAT", (-1, 1, 32, 32, 32)


class _Network:
    def __init__(self, flags: int):
        self.flags = flags
        self.inputs = [_Tensor("image"), _Tensor("mask")]
        self.num_inputs, self.num_outputs = 2, 1

    def get_input(self, i):
        return self.inputs[i]

    def get_output(self, i):
        return _Tensor("restored")


class _Parser:
    def __init__(self, network, logger):
        self.network, self.num_errors = network, 0

    def parse_from_file(self, path: str) -> bool:
        self.network.onnx = path
        return Path(path).is_file()


class _Profile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = (lo, opt, hi)


class _Cache:
    def __init__(self, blob: bytes):
        self.blob = blob or b"timing"

    def serialize(self) -> bytes:
        return self.blob


class _Config:
    def __init__(self) -> None:
        self.flags_cleared, self.pools, self.profiles, self.cache = [], {}, [], None

    def set_memory_pool_limit(self, pool, size):
        self.pools[pool] = size

    def clear_flag(self, flag):
        self.flags_cleared.append(flag)

    def add_optimization_profile(self, p):
        self.profiles.append(p)
        return len(self.profiles) - 1

    def create_timing_cache(self, blob):
        return _Cache(bytes(blob))

    def set_timing_cache(self, cache, ignore_mismatch):
        assert ignore_mismatch is False
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


class _Builder:
    def __init__(self, logger):
        self.logger = logger

    def create_network(self, flags):
        assert flags == 1 << 1, "expected exactly STRONGLY_TYPED (bit 1 in TensorRT 10)"
        return _Network(flags)

    def create_builder_config(self):
        return _Config()

    def create_optimization_profile(self):
        return _Profile()

    def build_serialized_network(self, network, config):
        lo, opt, hi = config.profiles[0].shapes["image"]
        return f"STANDIN-PLAN {lo[0]} {opt[0]} {hi[0]} {network.onnx}".encode()


class _Context:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses = engine, {}, {}

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profile
        if not lo <= shape[0] <= hi:
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = int(ptr)
        return True

    def execute_async_v3(self, stream_handle):
        assert isinstance(stream_handle, int)
        shape = self.shapes["image"]
        assert self.shapes["mask"] == shape
        n = int(np.prod(shape))
        feeds = {k: np.ctypeslib.as_array(ctypes.cast(self.addresses[k], ctypes.POINTER(ctypes.c_float)),
                                          shape=(n,)).reshape(shape).copy() for k in ("image", "mask")}
        out = self.engine.session.run(["restored"], feeds)[0].astype(np.float32)
        ctypes.memmove(self.addresses["restored"], out.ctypes.data, out.nbytes)
        self.engine.executions.append(shape[0])
        return True


class _Engine:
    num_io_tensors = 3

    def __init__(self, blob: bytes):
        import onnxruntime as ort

        _, lo, opt, hi, path = blob.decode().split(" ", 4)
        self.profile = (int(lo), int(opt), int(hi))
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.executions: list[int] = []

    def get_tensor_name(self, i):
        return ("image", "mask", "restored")[i]

    def get_tensor_mode(self, name):
        return _Mode.OUTPUT if name == "restored" else _Mode.INPUT

    def get_tensor_dtype(self, name):
        return "float32"

    def get_tensor_profile_shape(self, name, index):
        assert index == 0
        return [(b, 1, 32, 32, 32) for b in self.profile]

    def create_execution_context(self):
        return _Context(self)


class _Runtime:
    def __init__(self, logger):
        self.logger = logger

    def deserialize_cuda_engine(self, blob):
        return _Engine(blob) if blob.startswith(b"STANDIN-PLAN") else None


def fake_tensorrt() -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = VERSION
    trt.ILogger = _ILogger
    trt.Builder, trt.Runtime, trt.OnnxParser = _Builder, _Runtime, _Parser
    # TensorRT 10's values: EXPLICIT_BATCH (deprecated, ignored) is 0, STRONGLY_TYPED is 1.
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag",
                                                     {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1})
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", {"TF32": 6})
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0})
    trt.TensorIOMode = _Mode
    trt.nptype = lambda dtype: {"float32": np.float32}[dtype]
    return trt


def install(monkeypatch) -> tuple[types.ModuleType, FakeCudaRuntime]:
    """Put the stand-ins where ``import tensorrt`` and ``from cuda.bindings import runtime`` find them."""
    trt, rt = fake_tensorrt(), FakeCudaRuntime()
    cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    cuda.bindings, bindings.runtime = bindings, rt
    cuda.__path__, bindings.__path__ = [], []  # packages, so "cuda.bindings.utils" is simply not found
    for name, mod in (("tensorrt", trt), ("cuda", cuda), ("cuda.bindings", bindings), ("cuda.bindings.runtime", rt)):
        monkeypatch.setitem(sys.modules, name, mod)
    return trt, rt
