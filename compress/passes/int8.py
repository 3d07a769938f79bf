"""Post-training int8 in ONNX Runtime: the torch model is exported to ONNX (dynamic batch axis),
pre-processed (`quant_pre_process`), calibrated (`create_calibrator`) and quantized
(`quantize_static`); the result is a `QuantizedOnnx` (terminal pass).

Quantune (Lee et al., "Quantune: Post-training quantization of convolutional neural networks
using extreme gradient boosting for fast deployment") tunes five dimensions of a PTQ
configuration. They map onto ORT's arguments as follows:

| Quantune dimension | setting (default) | ORT argument |
|---|---|---|
| calibration | ``calibration`` (minmax): minmax, entropy, percentile; ``calib_size`` (256) | ``calibrate_method`` |
| scheme | ``activation_type`` (u8), ``weight_type`` (s8), ``symmetric_activations`` (false), ``symmetric_weights`` (true), ``format`` (qoperator), ``reduce_range`` (false) | ``activation_type``, ``weight_type``, ``extra_options`` ActivationSymmetric / WeightSymmetric, ``quant_format``, ``reduce_range`` |
| clipping | the calibration method; ``percentile`` (99.999) for percentile; ``calib_moving_average`` (false) for minmax | calibrator options percentile / moving_average (quantize_static's CalibPercentile / CalibMovingAverage) |
| granularity | ``per_channel`` (true) | ``per_channel`` |
| mixed precision | ``float_layers`` ([]): torch layer names kept in float; ``float_ops`` (["gelu", "shared_relu"]): kinds of op kept in float | ``nodes_to_exclude`` |

``float_ops`` is mixed precision by kind of op, measured per op type in ONNX Runtime on the
large-kernel space's models (results/compress.md): ``gelu`` rewrites each exact (erf) GELU, which
the exporter spells as five nodes (Div, Erf, Add, Mul, Mul), into one ``com.microsoft.Gelu`` node
before calibration. ORT has no integer GELU: quantized, the five nodes became two float ones
(Div, Erf) plus QLinearAdd / QLinearMul with a Quantize/Dequantize pair in between, which cost
more at batch 1 than the float model's one fused Gelu kernel; kept whole and float it is one
Dequantize, one Gelu, one Quantize. ``depthwise`` keeps grouped convolutions in float; on these
models it made the int8 model slower (ORT's int8 depthwise kernel is the faster one), so it is
offered, not the default.

``shared_relu`` keeps in float, in the QOperator format, each ReLU (or Clip) whose input another
node also reads. ORT's QOperator quantizer deletes every ReLU/Clip that follows a quantized tensor
(`QLinearActivation.QuantizeClipRelu`), counting on `adjust_tensor_ranges` to have given the
producer the ReLU's output range [0, max], whose u8 encoding clips the negatives. It gives that
range only to a ReLU that is its input's sole reader, but deletes the others too: their negatives
then flow on un-rectified (ORT 1.32; its QDQ quantizer checks for a sole reader and is right).
DARTS/NASNet cells are full of them: each ReLU-Conv-BN op starts with a ReLU on a cell state,
and a state that a skip connection, a pool, a node sum or the concat also reads leaves that ReLU
shared (6-15 per model here; ORT's pre-processing merges ReLUs of one input). Without ``shared_relu``,
int8 lost 10-51 points on DARTS-V2 and sampled darts genotypes (digits, mnist5k); with those
ReLUs in float (DequantizeLinear, Relu, QuantizeLinear, which ORT fuses at load into one
requantization whose range starts at 0) it loses none (0.00 points on five models, 0.10 better on one),
for 0-7% more latency at batch 1 (results/int8_cells.md). A network whose ReLUs each follow
their own conv (ResNets, the large-kernel space) has none of them: its file is byte-identical.

``compact`` (true) rewrites the quantized file without what ORT does not read: the value_info
that shape inference left (ORT infers shapes again at load), identical initializers (the
quantizer writes one scale / zero-point tensor per use: equal ones become one), and the long
tensor names the quantizer derives from the exporter's (``/stages/stages.0/.../Conv_output_0_zero_point``,
each written once per use): tensors are renamed ``t0``, ``t1``, ... in graph order. Node names,
which carry the torch module path (`onnx_node_layers`), and the graph's input/output names stay.
On the searched 320k- and 890k-parameter models this is 6-14% of the int8 file; on the float export the same renaming
would save ~1%. ``compact = false`` keeps ORT's file as it comes.

ORT's Distribution calibration is for float8 and gives ~0.8 relative error on int8 (BENCHMARKS.md),
so it is not offered. Entropy uses a 512-bin histogram (see `_calibrate` for why not ORT's default).

Replay is exact and needs no data (no re-calibration): the record holds the calibrated tensor
ranges (ONNX tensor name -> [min, max], float32 values that JSON carries exactly) and the ONNX
nodes kept in float. `apply` and `replay` both hand those ranges to `quantize_static` as an ORT
calibration cache (``calibration_cache_path``, loaded instead of running calibration) through the
same function, so replay on a fresh copy of the model yields the same bytes (the record's
``sha1`` checks it; a mismatch, e.g. under another ORT version, becomes a note). A record made
before ``float_ops`` and ``compact`` existed lacks them and is replayed as it was made (no GELU
rewrite, no compaction: `LEGACY_SETTINGS`).

Record: ``{"settings": {...all settings...}, "ranges": {tensor: [min, max]}, "excluded_nodes":
[onnx node names], "calib_samples": n, "sha1": hex of the quantized model}``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import PolicyError
from .base import PassContext, QuantizedOnnx, check_settings, register_pass, resolve_layers

if TYPE_CHECKING:
    import numpy as np
    import onnx
    import torch

__all__ = [
    "INT8", "compact_onnx", "export_float_onnx", "fuse_gelu", "onnx_accuracy", "onnx_latency_ms", "onnx_logits",
    "onnx_node_layers", "shared_clipping_nodes",
]

OPSET = 17  # as nas.cost.export_onnx; ORT's quantizer keeps opsets >= 13 as they are
CALIBRATIONS = ("minmax", "entropy", "percentile")
TYPES = ("u8", "s8")
FORMATS = ("qoperator", "qdq")
FLOAT_OPS = ("gelu", "depthwise", "shared_relu")  # kinds of op `float_ops` can keep in float
# the ops ORT's QOperator quantizer deletes after a quantized tensor (see ``shared_relu``)
CLIPPING_OPS = ("Relu", "Clip")
# what a record made before a setting existed meant: replayed with these, it gives its own bytes
LEGACY_SETTINGS: Mapping[str, Any] = {"float_ops": [], "compact": False}
MS_DOMAIN = "com.microsoft"  # ORT's contrib ops (QLinearAdd, QGemm, ... and Gelu)
ENTROPY_BINS = 512
CALIB_BATCH = 64  # samples per calibration batch: ORT's histogram calibrators update per batch


class Int8Pass:
    """Static int8 post-training quantization through ONNX Runtime (terminal: yields ONNX)."""

    name = "int8"
    terminal = True
    # Defaults: QOperator with U8 activations / S8 per-channel weights is the configuration that
    # ran ~2x faster than fp32 on this CPU (BENCHMARKS.md, a ResNet-like net; QDQ gave no speed-up)
    # at a relative output error of a few percent. Tiny nets are overhead-bound: an 8/16-channel
    # digits CNN runs at 0.77x, a 16/32/32-channel one at 1.4-1.6x (batch 8-64). U8 x S8 is the
    # x86 integer dot-product pairing (VPMADDUBSW / VNNI); this CPU has VNNI, so reduce_range
    # (7-bit weights, a guard against int16 saturation on pre-VNNI cores) stays off. MinMax needs
    # no histogram and keeps every calibration value in range; entropy / percentile clip outliers.
    defaults: Mapping[str, Any] = {
        "calibration": "minmax",
        "percentile": 99.999,
        "calib_moving_average": False,
        "calib_size": 256,
        "activation_type": "u8",
        "weight_type": "s8",
        "symmetric_activations": False,
        "symmetric_weights": True,
        "format": "qoperator",
        "reduce_range": False,
        "per_channel": True,
        "float_layers": [],
        "float_ops": ["gelu", "shared_relu"],
        "compact": True,
    }

    def validate(self, settings: Mapping[str, Any]) -> None:
        s = check_settings(self.name, settings, self.defaults)
        _choice(s, "calibration", CALIBRATIONS)
        _choice(s, "activation_type", TYPES)
        _choice(s, "weight_type", TYPES)
        _choice(s, "format", FORMATS)
        for key in ("calib_moving_average", "symmetric_activations", "symmetric_weights", "reduce_range", "per_channel", "compact"):
            if not isinstance(s[key], bool):
                raise PolicyError(f"int8: {key} must be true or false, got {s[key]!r}")
        p = s["percentile"]
        if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p <= 100:
            raise PolicyError(f"int8: percentile must be a number in (0, 100], got {p!r}")
        n = s["calib_size"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise PolicyError(f"int8: calib_size must be a positive integer, got {n!r}")
        layers = s["float_layers"]
        if not isinstance(layers, list | tuple) or not all(isinstance(x, str) for x in layers):
            raise PolicyError(f"int8: float_layers must be a list of layer names, got {layers!r}")
        ops = s["float_ops"]
        if not isinstance(ops, list | tuple) or not all(isinstance(x, str) and x in FLOAT_OPS for x in ops):
            raise PolicyError(f"int8: float_ops must be a list of {list(FLOAT_OPS)}, got {ops!r}")
        # what ORT itself refuses (quantize.check_static_quant_arguments), caught before any work
        if s["activation_type"] == "s8" and s["weight_type"] == "u8":
            raise PolicyError(
                "int8: ONNX Runtime does not support activation_type='s8' with weight_type='u8'; "
                "use weight_type='s8' or activation_type='u8'"
            )
        if s["calib_moving_average"] and s["calibration"] != "minmax":
            raise PolicyError(
                f"int8: calib_moving_average applies to calibration='minmax' only, not {s['calibration']!r}"
            )

    def apply(self, model: torch.nn.Module, settings: Mapping[str, Any], ctx: PassContext) -> tuple[QuantizedOnnx, dict]:
        s = check_settings(self.name, settings, self.defaults)
        self.validate(s)
        float_layers = resolve_layers(model, s["float_layers"], "int8 float_layers")
        float_bytes = _prepared_onnx(model, ctx.input_shape, s["float_ops"])
        excluded = _excluded_nodes(float_bytes, float_layers, ctx, s["float_ops"], s["format"])
        x, _ = ctx.calibration()
        x = x[: s["calib_size"]]
        ranges = _calibrate(float_bytes, s, x)
        q = _quantize(float_bytes, s, ranges, excluded)
        record = {
            "settings": _plain_settings(s),
            "ranges": ranges,
            "excluded_nodes": excluded,
            "calib_samples": len(x),
            "sha1": hashlib.sha1(q).hexdigest(),
        }
        return QuantizedOnnx(model_bytes=q, input_name="input", float_layers=tuple(float_layers)), record

    def replay(self, model: torch.nn.Module, record: Mapping[str, Any], ctx: PassContext) -> QuantizedOnnx:
        s = check_settings(self.name, {**LEGACY_SETTINGS, **record["settings"]}, self.defaults)
        float_layers = resolve_layers(model, s["float_layers"], "int8 float_layers")
        float_bytes = _prepared_onnx(model, ctx.input_shape, s["float_ops"])
        import onnx

        graph = onnx.load_from_string(float_bytes).graph
        known = {t for n in graph.node for t in n.output} | {i.name for i in graph.input}
        missing = sorted(set(record["ranges"]) - known)
        if missing:
            raise PolicyError(f"int8 replay: the record's ranges name tensors this model's graph lacks: {missing[:3]}")
        q = _quantize(float_bytes, s, record["ranges"], list(record["excluded_nodes"]))
        if record.get("sha1") and hashlib.sha1(q).hexdigest() != record["sha1"]:
            ctx.notes.append("int8 replay: the quantized ONNX differs byte-wise from the recorded one (another ORT version?)")
        return QuantizedOnnx(model_bytes=q, input_name="input", float_layers=tuple(float_layers))


# ---------------------------------------------------------------------------------------------
# export and graph inspection


def export_float_onnx(model: torch.nn.Module, input_shape: Sequence[int]) -> bytes:
    """The eval-mode model as ONNX bytes with a dynamic batch axis: input "input" of shape
    ``(batch, *input_shape)``, output "output". TorchScript exporter (``dynamo=False``, as
    `nas.cost.export_onnx`); its node names carry the module path (``/features/features.3/Conv``),
    which is how torch layer names find their ONNX nodes. BatchNorm is folded into the conv.

    A TorchScript module is exported from a fresh ``torch.jit.save``/``load`` copy: exporting a
    ScriptModule rewrites its (shared) graph in place, after which every later export of it or of
    its deep copies loses the module names and so the tensor names a replay record refers to."""
    import torch

    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    if isinstance(model, torch.jit.ScriptModule):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates torch.jit
            buf = io.BytesIO()
            torch.jit.save(model, buf)
            buf.seek(0)
            model = torch.jit.load(buf, map_location=device)
    x = torch.zeros((1, *input_shape), device=device)
    out = io.BytesIO()
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                model,
                (x,),
                out,
                input_names=["input"],
                output_names=["output"],
                opset_version=OPSET,
                dynamo=False,
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            )
    finally:
        model.train(was_training)
    return out.getvalue()


def _prepared_onnx(model: torch.nn.Module, input_shape: Sequence[int], float_ops: Sequence[str] = ()) -> bytes:
    """Export, then ORT's quantization pre-processing (symbolic shape inference, basic graph
    optimisation, fusions), which ORT recommends before `quantize_static` and which marks the
    model as pre-processed; then, with ``"gelu"`` in ``float_ops``, every erf GELU as one
    ``com.microsoft.Gelu`` node (`fuse_gelu`), before calibration sees the graph."""
    import onnx
    from onnxruntime.quantization import quant_pre_process

    raw = export_float_onnx(model, input_shape)
    with tempfile.TemporaryDirectory(prefix="nas-int8-") as tmp, _quiet():
        out = Path(tmp) / "pre.onnx"
        quant_pre_process(onnx.load_from_string(raw), out)
        prepared = out.read_bytes()
    if "gelu" not in float_ops:
        return prepared
    m = onnx.load_from_string(prepared)
    return m.SerializeToString() if fuse_gelu(m) else prepared


def fuse_gelu(model: onnx.ModelProto) -> int:
    """Rewrite, in place, each exact GELU as the exporter writes it, ``x * (erf(x / sqrt 2) + 1)
    * 0.5`` (five nodes; also ``x * 0.5 * (...)`` and the ``x * (1 / sqrt 2)`` form), into one
    ``com.microsoft.Gelu`` node (the same function: ORT's own float fusion target). Returns how
    many were fused; constants left unused are removed. The new node is named after the Erf's
    scope (``/stages/.../act/Gelu``), so `onnx_node_layers` still finds its layer."""
    import math

    from onnx import helper, numpy_helper

    g = model.graph
    if _has_subgraphs(g):
        return 0  # If/Loop bodies see outer names; not worth rewriting around (CNNs have none)
    consts: dict[str, Any] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in g.output}

    def scalar(name: str, value: float) -> bool:
        v = consts.get(name)
        return v is not None and v.size == 1 and abs(float(v.reshape(-1)[0]) - value) <= 1e-5 * max(1.0, abs(value))

    def other(node: onnx.NodeProto, name: str) -> str | None:
        ins = list(node.input)
        return ins[1 - ins.index(name)] if len(ins) == 2 and name in ins else None

    def sole(name: str, op: str) -> onnx.NodeProto | None:
        # an intermediate value of the pattern: one consumer, of the given type, not an output
        c = consumers.get(name, [])
        return c[0] if len(c) == 1 and c[0].op_type == op and name not in graph_outputs else None

    fused: dict[int, onnx.NodeProto] = {}  # id of the pattern's last node -> its Gelu
    dropped: set[int] = set()
    for erf in g.node:
        if erf.op_type != "Erf" or erf.input[0] not in producer:
            continue
        scale = producer[erf.input[0]]
        if scale.op_type == "Div" and scalar(scale.input[1], math.sqrt(2.0)):
            x = scale.input[0]
        elif scale.op_type == "Mul" and any(scalar(i, 1 / math.sqrt(2.0)) for i in scale.input):
            x = next(i for i in scale.input if not scalar(i, 1 / math.sqrt(2.0)))
        else:
            continue
        if len(consumers.get(scale.output[0], [])) != 1 or scale.output[0] in graph_outputs:
            continue
        add = sole(erf.output[0], "Add")
        if add is None or not scalar(other(add, erf.output[0]) or "", 1.0):
            continue
        m1 = sole(add.output[0], "Mul")
        if m1 is None:
            continue
        m2 = sole(m1.output[0], "Mul")
        if m2 is None:
            continue
        rest1, rest2 = other(m1, add.output[0]), other(m2, m1.output[0])
        # (x * (erf + 1)) * 0.5, or (erf + 1) * (x * 0.5) read the other way round
        if not (rest1 == x and rest2 is not None and scalar(rest2, 0.5)):
            continue
        if any(id(n) in dropped for n in (scale, erf, add, m1, m2)):
            continue
        scope = erf.name.rsplit("/", 1)[0] if "/" in erf.name else ""
        fused[id(m2)] = helper.make_node("Gelu", [x], [m2.output[0]], name=f"{scope}/Gelu", domain=MS_DOMAIN)
        dropped.update(id(n) for n in (scale, erf, add, m1, m2))
    if not fused:
        return 0
    nodes = [fused.get(id(n), n) for n in g.node if id(n) not in dropped or id(n) in fused]
    del g.node[:]
    g.node.extend(nodes)
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    _drop_unused_constants(g)
    return len(fused)


def _has_subgraphs(g: onnx.GraphProto) -> bool:
    import onnx

    kinds = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
    return any(a.type in kinds for n in g.node for a in n.attribute)


def _drop_unused_constants(g: onnx.GraphProto) -> None:
    """Initializers and Constant nodes no node reads and the graph does not output."""
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep_nodes = [n for n in g.node if n.op_type != "Constant" or any(o in used for o in n.output)]
    if len(keep_nodes) != len(g.node):
        del g.node[:]
        g.node.extend(keep_nodes)
    keep = [t for t in g.initializer if t.name in used]
    if len(keep) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(keep)


def compact_onnx(model_bytes: bytes) -> bytes:
    """The same model without what ORT does not read (see the module notes, ``compact``): no
    value_info or doc strings, one initializer per distinct constant, unused ones dropped, and
    tensors renamed ``t0``, ``t1``, ... in graph order (graph inputs/outputs and node names kept).
    Deterministic: the same bytes in give the same bytes out."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load_from_string(model_bytes)
    g = m.graph
    del g.value_info[:]
    m.doc_string = g.doc_string = ""
    for n in g.node:
        n.doc_string = ""
    if _has_subgraphs(g):
        return m.SerializeToString()  # names cross into subgraphs: leave them alone
    fixed = {i.name for i in g.input} | {o.name for o in g.output}
    first: dict[tuple[int, tuple[int, ...], bytes], str] = {}
    alias: dict[str, str] = {}
    kept = []
    for t in g.initializer:
        key = (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes())
        if t.name not in fixed and key in first:
            alias[t.name] = first[key]
        else:
            first.setdefault(key, t.name)
            kept.append(t)
    del g.initializer[:]
    g.initializer.extend(kept)
    for n in g.node:
        for i, name in enumerate(n.input):
            if name in alias:
                n.input[i] = alias[name]
    _drop_unused_constants(g)
    new: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in fixed:  # "" is an omitted optional input
            return name
        return new.setdefault(name, f"t{len(new)}")

    for t in g.initializer:
        t.name = short(t.name)
    for n in g.node:
        n.input[:] = [short(x) for x in n.input]
        n.output[:] = [short(x) for x in n.output]
    return m.SerializeToString()


def onnx_node_layers(node_name: str) -> list[str]:
    """The torch module names an exported node lies in, outermost first:
    ``/features/features.3/Conv`` -> ``["features", "features.3"]``.

    An eager module's scope is its name relative to the nearest enclosing module that is no
    ``Sequential`` / ``ModuleList`` container: the root's children's children are full names
    (``features.3``), but inside a cell module they are relative to the cell
    (``/cells.0/ops.0/ops.0.0/Relu``: ``cells.0``, ``cells.0.ops.0``, ``cells.0.ops.0.0``). A
    scope that extends an earlier one (``ops.0.0`` after ``ops.0``) therefore shares that one's
    base; any other is relative to the scope just above it, as a TorchScript module's attribute
    names always are (``/features/3/Conv``)."""
    out: list[str] = []
    raw: list[str] = []
    for part in [p for p in node_name.split("/") if p][:-1]:
        extended = next((i for i in range(len(raw) - 1, -1, -1) if part.startswith(raw[i] + ".")), None)
        if extended is not None:  # the same base as the scope it extends
            out.append(out[extended][: len(out[extended]) - len(raw[extended])] + part)
        else:
            out.append(f"{out[-1]}.{part}" if out else part)
        raw.append(part)
    return out


def _excluded_nodes(
    float_bytes: bytes,
    float_layers: Sequence[str],
    ctx: PassContext,
    float_ops: Sequence[str] = (),
    fmt: str = "qoperator",
) -> list[str]:
    """ONNX nodes that lie in (or under) the named torch layers, then (``"depthwise"`` in
    ``float_ops``) every grouped Conv, then (``"shared_relu"``, QOperator format) every
    `shared_clipping_nodes` node, for ``nodes_to_exclude``."""
    import onnx

    graph = onnx.load_from_string(float_bytes).graph
    nodes = [n.name for n in graph.node]
    out: list[str] = []
    for layer in float_layers:
        mine = [n for n in nodes if layer in onnx_node_layers(n)]
        if not mine:
            # e.g. a BatchNorm the exporter folded into its conv: it has no node of its own
            ctx.notes.append(f"int8: layer {layer!r} has no node of its own in the ONNX graph; nothing kept in float for it")
        out.extend(n for n in mine if n not in out)
    if "depthwise" in float_ops:
        grouped = [n.name for n in graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)]
        out.extend(n for n in grouped if n not in out)
    if "shared_relu" in float_ops and fmt == "qoperator":
        out.extend(n for n in shared_clipping_nodes(graph) if n not in out)
    return out


def shared_clipping_nodes(graph: onnx.GraphProto) -> list[str]:
    """Names of the ReLU / Clip nodes whose input is not theirs alone: another node reads it too,
    or the graph outputs it. ORT's QOperator quantizer cannot fold such a node's clipping into its
    producer's range, yet deletes it (module notes, ``shared_relu``)."""
    readers: dict[str, int] = {}
    for n in graph.node:
        for name in set(n.input):
            readers[name] = readers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    return [
        n.name for n in graph.node
        if n.name and n.op_type in CLIPPING_OPS and n.input and (readers[n.input[0]] > 1 or n.input[0] in outputs)
    ]


# ---------------------------------------------------------------------------------------------
# calibration and quantization


def _calibrate(float_bytes: bytes, s: Mapping[str, Any], x: np.ndarray) -> dict[str, list[float]]:
    """Run ORT's calibrator on ``x``; return the tensor ranges it computed, ``name -> [min, max]``.

    `create_calibrator` is called directly, with the options `quantize_static` would pass, because
    `quantize_static` forwards no histogram size: its Entropy calibrator keeps ORT's default of
    128 bins for 128 quantized bins, which leaves a single candidate threshold, the full range,
    i.e. MinMax. Entropy here follows TensorRT's recipe (Migacz 2017, "8-bit inference with
    TensorRT": thresholds chosen by KL divergence over 128 quantized bins) on a 512-bin histogram,
    not TensorRT's 2048: ORT's threshold search is pure Python, ~0.4 s at 512 bins and ~3 s at
    2048 for a small CNN, and the calibration runs once per policy trial."""
    import numpy as np
    from onnxruntime.quantization import create_calibrator

    options: dict[str, Any] = {}
    if s["calibration"] == "minmax" and s["calib_moving_average"]:
        options["moving_average"] = True
    if s["calibration"] == "entropy":
        options.update(num_bins=ENTROPY_BINS, num_quantized_bins=128)
    if s["calibration"] == "percentile":
        options["percentile"] = float(s["percentile"])
    with tempfile.TemporaryDirectory(prefix="nas-int8-") as tmp, _quiet():
        path = Path(tmp) / "float.onnx"
        path.write_bytes(float_bytes)
        calibrator = create_calibrator(
            path,
            None,  # every float tensor: the quantizer picks the ones it needs
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=_method(s["calibration"]),
            extra_options=options,
        )
        calibrator.collect_data(_Reader(x))
        data = calibrator.compute_data()
        del calibrator  # holds an inference session on the temporary files
    out = {}
    for name, td in sorted(data.items()):
        lo, hi = (np.asarray(v, dtype=np.float32).reshape(-1) for v in td.range_value)  # shape (1,)
        out[name] = [float(lo[0]), float(hi[0])]  # float32 -> float is exact, and back again
    return out


def _quantize(float_bytes: bytes, s: Mapping[str, Any], ranges: Mapping[str, Sequence[float]], excluded: list[str]) -> bytes:
    """Quantize with the given ranges (written as an ORT calibration cache: no calibration run)."""
    import numpy as np
    from onnxruntime.quantization import TensorData, TensorsData, save_tensors_data

    # shape-(1,) float32 arrays, as ORT's own calibrators produce them
    data = {
        k: TensorData(lowest=np.array([v[0]], np.float32), highest=np.array([v[1]], np.float32))
        for k, v in sorted(ranges.items())
    }
    with tempfile.TemporaryDirectory(prefix="nas-int8-") as tmp:
        cache = Path(tmp) / "calib.json"
        save_tensors_data(TensorsData(_method(s["calibration"]), data), cache)
        out = Path(tmp) / "q.onnx"
        _run_quantize_static(float_bytes, s, out, excluded, cache)
        q = out.read_bytes()
    return compact_onnx(q) if s["compact"] else q


def _run_quantize_static(float_bytes: bytes, s: Mapping[str, Any], out: Path, excluded: list[str], cache: Path) -> None:
    """quantize_static with the ranges in the calibration cache ``cache`` (no calibration run)."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    qtype = {"u8": QuantType.QUInt8, "s8": QuantType.QInt8}
    extra: dict[str, Any] = {
        "ActivationSymmetric": s["symmetric_activations"],
        "WeightSymmetric": s["symmetric_weights"],
    }
    try:
        with _quiet():
            quantize_static(
                onnx.load_from_string(float_bytes),
                out,
                calibration_data_reader=None,
                quant_format=QuantFormat.QOperator if s["format"] == "qoperator" else QuantFormat.QDQ,
                per_channel=s["per_channel"],
                reduce_range=s["reduce_range"],
                activation_type=qtype[s["activation_type"]],
                weight_type=qtype[s["weight_type"]],
                nodes_to_exclude=excluded,
                calibrate_method=_method(s["calibration"]),
                extra_options=extra,
                calibration_cache_path=cache,
            )
    except (ValueError, TypeError, NotImplementedError) as exc:
        # ORT reports refused combinations as ValueError; name the settings that led to it
        shown = {k: s[k] for k in ("calibration", "format", "activation_type", "weight_type", "per_channel")}
        raise PolicyError(f"int8: ONNX Runtime refused the settings {shown}: {exc}") from None


def _method(name: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


class _Reader:
    """A `CalibrationDataReader` (duck-typed: ORT checks for ``get_next``) over fixed batches."""

    def __init__(self, x: np.ndarray) -> None:
        import numpy as np

        self._batches = [np.ascontiguousarray(x[i : i + CALIB_BATCH], dtype=np.float32) for i in range(0, len(x), CALIB_BATCH)]
        self._it = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        return None if batch is None else {"input": batch}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter({"input": b} for b in self._batches)

    def __len__(self) -> int:
        return len(self._batches)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ORT's quantizer logs advice through the root logger on every call and its histogram
    calibrators print progress to stdout; keep run logs clean."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def _choice(s: Mapping[str, Any], key: str, valid: Sequence[str]) -> None:
    if s[key] not in valid:
        raise PolicyError(f"int8: {key}={s[key]!r} is not one of {list(valid)}")


def _plain_settings(s: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in s.items()}))


# ---------------------------------------------------------------------------------------------
# evaluation helpers


def _session(model: QuantizedOnnx | bytes, threads: int | None = 1) -> Any:
    q = model if isinstance(model, QuantizedOnnx) else QuantizedOnnx(model_bytes=model)
    return q.session(threads)


def onnx_accuracy(
    model: QuantizedOnnx | bytes,
    x: np.ndarray,
    y: np.ndarray,
    batch: int = 256,
    metric: Callable[[np.ndarray, np.ndarray], float] | None = None,
) -> float:
    """Top-1 accuracy of an ONNX model (first input, first output = logits) on ``(x, y)``; with a
    ``metric`` (a `compress.tasks.Metric` or any ``fn(outputs, targets) -> float``), that metric
    over all the outputs at once (a user's metric need not be a mean over batches)."""
    import numpy as np

    if metric is not None:
        return float(metric(onnx_logits(model, x, batch), np.asarray(y))) if len(x) else 0.0
    sess = _session(model)
    name = sess.get_inputs()[0].name
    correct = 0
    for i in range(0, len(x), batch):
        logits = sess.run(None, {name: np.ascontiguousarray(x[i : i + batch], dtype=np.float32)})[0]
        correct += int((logits.argmax(1) == y[i : i + batch]).sum())
    return correct / max(1, len(x))


def onnx_logits(model: QuantizedOnnx | bytes, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """The first output of an ONNX model on ``x``, batched."""
    import numpy as np

    sess = _session(model)
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: np.ascontiguousarray(x[i : i + batch], dtype=np.float32)})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs)


def onnx_latency_ms(
    model_bytes: QuantizedOnnx | bytes,
    input_shape: Sequence[int],
    batch_size: int = 1,
    threads: int | None = 1,
    warmup: int = 5,
    repeats: int = 20,
) -> float:
    """Median wall time (ms) of one ``session.run`` on a random ``(batch_size, *input_shape)``
    input, after ``warmup`` runs, in ORT's CPU provider with ``threads`` intra-op threads."""
    import time

    import numpy as np

    sess = _session(model_bytes, threads)
    name = sess.get_inputs()[0].name
    feed = {name: np.random.default_rng(0).standard_normal((batch_size, *input_shape)).astype(np.float32)}
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


INT8 = register_pass(Int8Pass(), "post-training int8 in ONNX Runtime (Quantune's calibration, scheme, clipping, granularity, mixed precision)")
