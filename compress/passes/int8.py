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
| mixed precision | ``float_layers`` ([]): torch layer names kept in float | ``nodes_to_exclude`` |

ORT's Distribution calibration is for float8 and gives ~0.8 relative error on int8 (BENCHMARKS.md),
so it is not offered. Entropy uses a 512-bin histogram (see `_calibrate` for why not ORT's default).

Replay is exact and needs no data (no re-calibration): the record holds the calibrated tensor
ranges (ONNX tensor name -> [min, max], float32 values that JSON carries exactly) and the ONNX
nodes kept in float. `apply` and `replay` both hand those ranges to `quantize_static` as an ORT
calibration cache (``calibration_cache_path``, loaded instead of running calibration) through the
same function, so replay on a fresh copy of the model yields the same bytes (the record's
``sha1`` checks it; a mismatch, e.g. under another ORT version, becomes a note).

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
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import PolicyError
from .base import PassContext, QuantizedOnnx, check_settings, register_pass, resolve_layers

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = ["INT8", "export_float_onnx", "onnx_accuracy", "onnx_latency_ms", "onnx_logits", "onnx_node_layers"]

OPSET = 17  # as nas.cost.export_onnx; ORT's quantizer keeps opsets >= 13 as they are
CALIBRATIONS = ("minmax", "entropy", "percentile")
TYPES = ("u8", "s8")
FORMATS = ("qoperator", "qdq")
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
    }

    def validate(self, settings: Mapping[str, Any]) -> None:
        s = check_settings(self.name, settings, self.defaults)
        _choice(s, "calibration", CALIBRATIONS)
        _choice(s, "activation_type", TYPES)
        _choice(s, "weight_type", TYPES)
        _choice(s, "format", FORMATS)
        for key in ("calib_moving_average", "symmetric_activations", "symmetric_weights", "reduce_range", "per_channel"):
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
        float_bytes = _prepared_onnx(model, ctx.input_shape)
        excluded = _excluded_nodes(float_bytes, float_layers, ctx)
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
        s = check_settings(self.name, record["settings"], self.defaults)
        float_layers = resolve_layers(model, s["float_layers"], "int8 float_layers")
        float_bytes = _prepared_onnx(model, ctx.input_shape)
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


def _prepared_onnx(model: torch.nn.Module, input_shape: Sequence[int]) -> bytes:
    """Export, then ORT's quantization pre-processing (symbolic shape inference, basic graph
    optimisation, fusions), which ORT recommends before `quantize_static` and which marks the
    model as pre-processed."""
    import onnx
    from onnxruntime.quantization import quant_pre_process

    raw = export_float_onnx(model, input_shape)
    with tempfile.TemporaryDirectory(prefix="nas-int8-") as tmp, _quiet():
        out = Path(tmp) / "pre.onnx"
        quant_pre_process(onnx.load_from_string(raw), out)
        return out.read_bytes()


def onnx_node_layers(node_name: str) -> list[str]:
    """The torch module names an exported node lies in, outermost first:
    ``/features/features.3/Conv`` -> ``["features", "features.3"]``. An eager module's scopes are
    full names; a TorchScript module's are attribute names (``/features/3/Conv``), joined here."""
    out: list[str] = []
    for part in [p for p in node_name.split("/") if p][:-1]:
        prev = out[-1] if out else ""
        out.append(part if not prev or part.startswith(prev + ".") else f"{prev}.{part}")
    return out


def _excluded_nodes(float_bytes: bytes, float_layers: Sequence[str], ctx: PassContext) -> list[str]:
    """ONNX nodes that lie in (or under) the named torch layers, for ``nodes_to_exclude``."""
    import onnx

    nodes = [n.name for n in onnx.load_from_string(float_bytes).graph.node]
    out: list[str] = []
    for layer in float_layers:
        mine = [n for n in nodes if layer in onnx_node_layers(n)]
        if not mine:
            # e.g. a BatchNorm the exporter folded into its conv: it has no node of its own
            ctx.notes.append(f"int8: layer {layer!r} has no node of its own in the ONNX graph; nothing kept in float for it")
        out.extend(n for n in mine if n not in out)
    return out


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
        return out.read_bytes()


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


def onnx_accuracy(model: QuantizedOnnx | bytes, x: np.ndarray, y: np.ndarray, batch: int = 256) -> float:
    """Top-1 accuracy of an ONNX model (first input, first output = logits) on ``(x, y)``."""
    import numpy as np

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
