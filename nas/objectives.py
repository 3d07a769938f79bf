"""Objectives (what to optimise) and constraints (what no returned candidate may violate).

Written on the command line as ``val_acc:max,params:min`` and ``params<=1e6``. Strategies see
objective values as *losses* (lower is better, maximised metrics negated) so every strategy
minimises; the store keeps the metrics as measured.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from search_spaces.errors import ConfigError, UnknownNameError

__all__ = [
    "BOUNDARY_TOLERANCE",
    "KNOWN_METRICS",
    "Constraint",
    "Objective",
    "losses",
    "parse_constraints",
    "parse_objectives",
    "violations",
]

# Metric -> its natural direction; `metric:max` / `metric:min` overrides it for custom metrics.
KNOWN_METRICS: dict[str, str] = {
    "val_acc": "max",
    "test_acc": "max",
    "params": "min",
    "flops": "min",
    "macs": "min",
    "activations": "min",
    "latency_ms": "min",
    "onnx_latency_ms": "min",
    "model_size_mb": "min",
    "train_time_s": "min",
    # compression trials' metrics (`compress.evaluate`)
    "acc_drop": "min",
    "speedup": "max",
    "file_bytes": "min",
    "zip_bytes": "min",
    "size_ratio": "max",
    "onnx_latency_rel": "min",  # latency / a reference model's, timed beside it
    "sparsity": "max",
}


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: str  # "max" or "min"

    def loss(self, value: float) -> float:
        return -value if self.direction == "max" else value

    def __str__(self) -> str:
        return f"{self.metric}:{self.direction}"


_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}
# Bounds are compared with this slack (relative to the bound, absolute below 1): a drop of
# 100 * (0.75 - 0.747) is 0.30000000000000027 points, which `acc_drop<=0.3` must accept. A value
# within it of the bound counts as equal: met by <= and >=, broken by < and >.
BOUNDARY_TOLERANCE = 1e-9


def _slack(bound: float) -> float:
    return BOUNDARY_TOLERANCE * max(1.0, abs(bound))


@dataclass(frozen=True)
class Constraint:
    metric: str
    op: str
    bound: float

    def satisfied(self, metrics: Mapping[str, float]) -> bool:
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value):
            return False  # unknown means "not shown to satisfy": never report it as feasible
        slack = _slack(self.bound)
        if abs(value - self.bound) <= slack:  # at the bound, up to float rounding
            return self.op in ("<=", ">=")
        return bool(_OPS[self.op](value, self.bound))

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.bound:g}"


def parse_objectives(spec: str | Sequence[str]) -> tuple[Objective, ...]:
    """``"val_acc,params:min"`` -> objectives; the first one is the primary (early stopping)."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not items:
        raise ConfigError("at least one objective is needed, e.g. 'val_acc' or 'val_acc,params'")
    out: list[Objective] = []
    for item in items:
        metric, _, direction = item.partition(":")
        if not direction:
            if metric not in KNOWN_METRICS:
                raise UnknownNameError(
                    "objective metric (or write metric:max / metric:min)", metric, KNOWN_METRICS
                )
            direction = KNOWN_METRICS[metric]
        if direction not in ("max", "min"):
            raise UnknownNameError("objective direction", direction, ["max", "min"])
        if any(o.metric == metric for o in out):
            raise ConfigError(f"objective {metric!r} is given twice in {spec!r}")
        out.append(Objective(metric, direction))
    return tuple(out)


_CONSTRAINT = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|<|>)\s*([-+0-9.eE]+)\s*")


def parse_constraints(specs: str | Sequence[str] | None) -> tuple[Constraint, ...]:
    """``"params<=1e6,latency_ms<=5"`` (or a list of such) -> constraints."""
    if not specs:
        return ()
    items = [
        s for part in ([specs] if isinstance(specs, str) else specs) for s in part.split(",") if s.strip()
    ]
    out = []
    for item in items:
        m = _CONSTRAINT.fullmatch(item)
        if not m:
            raise ConfigError(f"constraint {item!r} must look like 'params<=1e6' (operators: <=, >=, <, >)")
        try:
            bound = float(m.group(3))
        except ValueError:
            raise ConfigError(f"constraint bound {m.group(3)!r} in {item!r} is not a number") from None
        out.append(Constraint(m.group(1), m.group(2), bound))
    return tuple(out)


def acc_drop_bounds(constraints: Sequence[Constraint | str] | None) -> tuple[Constraint, ...]:
    """The upper bounds on ``acc_drop`` (``acc_drop<=b`` / ``acc_drop<b``) among ``constraints``
    (`Constraint`s or their text): what the large-drop flag, export's drop check and the report's
    banner each judge a compression against (each with its own default when there is none)."""
    parsed = [c if isinstance(c, Constraint) else parse_constraints(str(c))[0] for c in constraints or ()]
    return tuple(c for c in parsed if c.metric == "acc_drop" and c.op in ("<=", "<"))


def losses(objectives: Sequence[Objective], metrics: Mapping[str, float]) -> tuple[float, ...] | None:
    """Objective values as losses, or None if any is missing or not finite (a failed trial)."""
    out = []
    for o in objectives:
        v = metrics.get(o.metric)
        if v is None or not math.isfinite(float(v)):
            return None
        out.append(o.loss(float(v)))
    return tuple(out)


def violations(constraints: Sequence[Constraint], metrics: Mapping[str, float]) -> list[str]:
    return [str(c) for c in constraints if not c.satisfied(metrics)]


def excess(c: Constraint, metrics: Mapping[str, float]) -> float:
    """How far a metric is past its bound (<= 0 satisfied); unknown metrics count as violated."""
    v = metrics.get(c.metric)
    if v is None or not math.isfinite(v):
        return 1.0
    over = v - c.bound if c.op in ("<=", "<") else c.bound - v
    # met within the boundary tolerance: not past it (Optuna's slot reads > 0 as infeasible)
    return min(over, 0.0) if c.satisfied(metrics) else over


def violation_of(constraints: Sequence[Constraint], metrics: Mapping[str, float]) -> float:
    """Summed excess of the broken constraints (0 = feasible); a bound met with equality under a
    strict operator counts as a tiny violation, as `RunStore.finish` records it."""
    return sum(max(excess(c, metrics), 1e-12) for c in constraints if not c.satisfied(metrics))
