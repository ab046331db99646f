"""An fp16 copy of the exported graph, for TensorRT's strongly typed networks.

TensorRT 10.12 deprecated ``BuilderFlag.FP16`` and TensorRT 11 removed it: precision
now has to be written into the ONNX graph itself. This module does that with onnx
alone (no torch, no extra converter), and only where it is safe:

* the network body, every node on a path from one convolution to another, runs in
  float16 (weights, batch norms, pooling, upsampling, the dense concatenations);
* everything around it stays float32: the HU clamp and normalisation in front, the
  residual add, the de-normalisation to HU and the ``where(mask, restored, image)``
  behind. HU values up to 3071 would lose 1-2 HU in fp16, and the contract says
  ``restored == image`` outside the mask bit for bit, so those never leave fp32;
* ``image``, ``mask`` and ``restored`` keep float32, so every backend feeds the fp16
  graph exactly as it feeds the fp32 one.

Cast nodes are inserted where tensors cross the body's border. ONNX Runtime runs the
result on the CPU (it casts around fp16 ops it has no CPU kernel for), which is how CI
checks it; the GPU numerics are checked by ``tools/build_engine.py --validate``.
"""

from __future__ import annotations

import logging
from collections import defaultdict, deque
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

ANCHORS = frozenset({"Conv", "ConvTranspose"})
# Ops known to be fine in fp16 for this family of networks; anything else inside the body is refused,
# so a future network cannot silently pick up an op whose fp16 behaviour nobody looked at.
FP16_OPS = frozenset({
    "Conv", "ConvTranspose", "BatchNormalization", "InstanceNormalization", "Relu", "LeakyRelu", "PRelu",
    "Sigmoid", "Tanh", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool", "Resize", "Upsample",
    "Add", "Sub", "Mul", "Identity", "Slice", "Pad", "Dropout",
})
# Inputs that must stay float32 whatever the data type (ONNX: Resize roi/scales, Upsample scales).
KEEP_FP32_INPUTS: dict[str, frozenset[int]] = {"Resize": frozenset({1, 2}), "Upsample": frozenset({1})}
FP16_MAX = float(np.finfo(np.float16).max)
FP16_NOTE = ("network body (every node between two convolutions) in float16; HU clamp, normalisation, "
             "residual add, de-normalisation and the mask select in float32; image/mask/restored float32")


def _float_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor in the graph, from shape inference and the initializers."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types: dict[str, int] = {}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        types[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        types[init.name] = init.data_type
    for node in g.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    return types


def body_nodes(graph: onnx.GraphProto) -> set[int]:
    """Indices of the nodes on a path from a convolution to a convolution (both included)."""
    producer: dict[str, int] = {}
    consumers: dict[str, list[int]] = defaultdict(list)
    for i, node in enumerate(graph.node):
        for out in node.output:
            producer[out] = i
        for inp in node.input:
            if inp:
                consumers[inp].append(i)
    anchors = [i for i, n in enumerate(graph.node) if n.op_type in ANCHORS]
    if not anchors:
        raise ValueError("the graph has no convolution, so no network body to convert to fp16")

    def reach(step) -> set[int]:
        seen = set(anchors)
        todo = deque(anchors)
        while todo:
            for j in step(todo.popleft()):
                if j not in seen:
                    seen.add(j)
                    todo.append(j)
        return seen

    down = reach(lambda i: [c for out in graph.node[i].output for c in consumers.get(out, [])])
    up = reach(lambda i: [producer[x] for x in graph.node[i].input if x in producer])
    return {i for i in down & up if graph.node[i].op_type != "Constant"}


def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _toposort(nodes: list) -> list:
    """Order nodes so every tensor is produced before it is used (stable for the original order)."""
    produced_by = {out: i for i, n in enumerate(nodes) for out in n.output}
    deps = [{produced_by[x] for x in n.input if x in produced_by} for n in nodes]
    users: dict[int, list[int]] = defaultdict(list)
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    waiting = [len(d) for d in deps]
    ready = deque(i for i, w in enumerate(waiting) if w == 0)
    order: list[int] = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                ready.append(u)
    if len(order) != len(nodes):
        raise ValueError("graph has a cycle after fp16 conversion")
    return [nodes[i] for i in order]


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose network body runs in float16; inputs and outputs stay float32."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    types = _float_types(out)
    body = body_nodes(g)
    unknown = sorted({g.node[i].op_type for i in body} - FP16_OPS)
    if unknown:
        raise ValueError(f"fp16: ops {unknown} inside the network body are not known to be safe in fp16; "
                         "add them to FP16_OPS after checking their numerics")
    constants = _constant_values(g)
    body_outputs = {o for i in body for o in g.node[i].output}
    is_float = {name for name, t in types.items() if t == TensorProto.FLOAT}

    new_inits: dict[str, onnx.TensorProto] = {}
    casts_in: dict[str, str] = {}
    new_nodes: list = []
    for i in sorted(body):
        node = g.node[i]
        keep = KEEP_FP32_INPUTS.get(node.op_type, frozenset())
        for slot, name in enumerate(node.input):
            if not name or name not in is_float or name in body_outputs:
                if slot in keep and name in body_outputs and name in is_float:
                    raise ValueError(f"fp16: {node.op_type} input {slot} must stay float32 but comes from the body")
                continue
            if slot in keep:
                continue
            if name in constants:
                fp16_name = f"{name}__fp16"
                if fp16_name not in new_inits:
                    value = constants[name]
                    if np.abs(value).max(initial=0.0) > FP16_MAX:
                        raise ValueError(f"fp16: constant {name} exceeds the float16 range")
                    lost = int(np.count_nonzero(value) - np.count_nonzero(value.astype(np.float16)))
                    if lost:
                        log.info("fp16: %d tiny values of %s underflow to zero", lost, name)
                    new_inits[fp16_name] = numpy_helper.from_array(value.astype(np.float16), fp16_name)
                node.input[slot] = fp16_name
            else:
                if name not in casts_in:
                    casts_in[name] = f"{name}__to_fp16"
                    new_nodes.append(helper.make_node("Cast", [name], [casts_in[name]], to=TensorProto.FLOAT16,
                                                      name=f"{name}__cast_fp16"))
                node.input[slot] = casts_in[name]

    # Float tensors leaving the body: the body writes NAME__fp16, a Cast gives NAME back in float32,
    # so consumers outside the body and graph outputs keep their names.
    outside_users = {x for j, n in enumerate(g.node) if j not in body for x in n.input}
    outside_users |= {o.name for o in g.output}
    for i in sorted(body):
        node = g.node[i]
        for k, name in enumerate(node.output):
            if name in is_float and name in outside_users:
                inner = f"{name}__fp16"
                node.output[k] = inner
                for j in body:
                    other = g.node[j]
                    for s, x in enumerate(other.input):
                        if x == name:
                            other.input[s] = inner
                new_nodes.append(helper.make_node("Cast", [inner], [name], to=TensorProto.FLOAT,
                                                  name=f"{name}__cast_fp32"))

    nodes = _toposort(list(g.node) + new_nodes)
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(new_inits.values())
    # Drop constants nothing uses any more (the fp32 originals of converted weights).
    used = {x for n in g.node for x in n.input} | {o.name for o in g.output}
    keep_inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep_inits)
    keep_nodes = [n for n in g.node if n.op_type != "Constant" or n.output[0] in used]
    del g.node[:]
    g.node.extend(keep_nodes)
    del g.value_info[:]
    out = onnx.shape_inference.infer_shapes(out, strict_mode=True)
    onnx.checker.check_model(out)
    log.info("fp16: %d of %d nodes in float16, %d casts, %d weights converted", len(body), len(model.graph.node),
             len(new_nodes), len(new_inits))
    return out


def convert(src: str | Path, dst: str | Path) -> Path:
    """Write the fp16 graph of ``src`` to ``dst``, with src's metadata and ``dicom_node.precision=fp16``."""
    import onnx

    from dicom_node.backends.plan import sha256_file

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))
    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get("dicom_node.precision") == "fp16":
        raise ValueError(f"{src} is already an fp16 graph")
    converted = to_fp16(model)
    meta["dicom_node.precision"] = "fp16"
    meta["dicom_node.fp16"] = FP16_NOTE
    meta["dicom_node.fp16_source"] = f"{src.name} sha256:{sha256_file(src)}"
    del converted.metadata_props[:]
    for k, v in meta.items():
        entry = converted.metadata_props.add()
        entry.key, entry.value = k, v
    converted.producer_name = "dicom-node fp16"
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    onnx.save(converted, str(tmp))
    tmp.replace(dst)
    return dst


def fp16_path(src: str | Path) -> Path:
    """Where the fp16 copy of a model goes: ``dense_unet.onnx`` -> ``dense_unet.fp16.onnx``."""
    p = Path(src)
    return p.with_name(f"{p.stem}.fp16.onnx")
