"""Numbers as people read them: ``12.3k`` parameters, ``1.25 MB``, ``0.42 ms``, ``1.3 points``.

One formatter for hover texts, tables, cards and axis ticks, so a value reads alike everywhere
(``1.234e+06`` bytes told nobody anything). Sizes are decimal (1 kB = 1000 B), as file managers
and ONNX tools print them.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["UNITS", "human", "label", "tick", "unit_of"]

# metric -> unit kind; a metric not listed is a plain number
UNITS: dict[str, str] = {
    **dict.fromkeys(("params", "base_params", "flops", "macs", "activations"), "count"),
    **dict.fromkeys(("size_bytes", "file_bytes", "zip_bytes", "base_file_bytes"), "bytes"),
    **dict.fromkeys(
        ("latency_ms", "torch_latency_ms", "ort_latency_ms", "onnx_latency_ms", "base_onnx_latency_ms"), "ms"
    ),
    "acc_drop": "points",  # `compress.evaluate`: 100 x (base val_acc - val_acc)
    "speedup": "times",
    "size_ratio": "times",
    "duration_s": "s",
}
# what a table header adds to a column whose name does not say its unit
_HEADER = {"acc_drop": "acc_drop (points)", "speedup": "speedup (x)", "size_ratio": "size_ratio (x)"}
_PREFIX = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def unit_of(metric: str) -> str:
    return UNITS.get(metric, "")


def label(metric: str) -> str:
    """A column's header, with its unit where the name lacks one."""
    return _HEADER.get(metric, metric)


def _scaled(v: float, sep: str = "") -> str:
    """``12.3k``, ``1.25M``: three significant digits and an SI prefix (k, M, G, T)."""
    v = float(f"{v:.3g}")  # rounded first: 999_700 is "1M", never "1e+03k"
    for scale, prefix in _PREFIX:
        if abs(v) >= scale:
            return f"{v / scale:.3g}{sep}{prefix}"
    return f"{v:.3g}{sep}" if v != int(v) else f"{int(v)}{sep}"


def human(v: Any, metric: str = "") -> str:
    """``v`` of ``metric`` for people; ``-`` for a missing or non-finite number."""
    if v is None or isinstance(v, bool) or not isinstance(v, int | float):
        return "" if v is None else str(v)
    v = float(v)
    if not math.isfinite(v):
        return "-"
    kind = unit_of(metric)
    if kind == "count":
        return _scaled(v)
    if kind == "bytes":
        return f"{_scaled(v, ' ')}B"
    if kind == "ms":
        return f"{v:.3g} ms"
    if kind == "points":
        return f"{v:.2f} points"
    if kind == "times":
        return f"{v:.2f}x"
    if kind == "s":
        return f"{v:.1f} s"
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.4g}" if abs(v) < 1e4 else _scaled(v)


def tick(v: float, metric: str) -> str:
    """An axis tick label: like `human` without the unit the axis title already gives."""
    if not math.isfinite(v):
        return ""
    kind = unit_of(metric)
    if kind == "bytes":
        return f"{_scaled(v)}B"
    if kind in ("count", ""):
        return _scaled(v)
    return f"{v:.3g}"
