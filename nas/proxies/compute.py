"""`compute_proxies`: every asked zero-cost proxy of one model on one mini-batch, none of them fatal.

Each proxy runs on its own deep copy of the model (the caller's weights, buffers, gradients and
train/eval flags are never touched), under its own seed (so a proxy's value does not depend on
which others were asked, nor in what order) and its own time budget. A proxy that raises, returns
NaN or inf, meets a model it cannot handle, or runs past its budget is recorded as missing with
the reason, and the others go on.

The budget is enforced cooperatively: a forward pre-hook on every module of the copy checks the
clock, so a proxy stops at the next module call once it is late (a backward pass already started
runs to its end: torch cannot be interrupted inside one). A proxy that finishes late is still
recorded as skipped, so the rule is one: past the budget means missing.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "ALL_PROXIES",
    "DEFAULT_PROXIES",
    "ProxyResult",
    "ProxyTimeout",
    "UnsupportedProxy",
    "compute_proxies",
]


class UnsupportedProxy(Exception):
    """The model lacks what a proxy measures (no activations to hook, no weights with gradients)."""


class ProxyTimeout(Exception):
    """The proxy ran past its time budget."""


@dataclass
class ProxyResult:
    """Per proxy: its value (None when missing), the seconds it took, and why it is missing."""

    values: dict[str, float | None] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def vector(self, names: Iterable[str]) -> np.ndarray:
        """The values of ``names`` in order, NaN where missing (XGBoost reads NaN as missing)."""
        return np.array([np.nan if self.values.get(n) is None else self.values[n] for n in names], dtype=np.float64)

    @property
    def total_seconds(self) -> float:
        return float(sum(self.seconds.values()))

    def to_json(self) -> dict[str, Any]:
        return {"values": dict(self.values), "seconds": dict(self.seconds), "errors": dict(self.errors)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProxyResult:
        return cls(dict(data["values"]), dict(data["seconds"]), dict(data.get("errors", {})))


@dataclass
class Batch:
    """The mini-batch and settings a proxy function sees."""

    x: torch.Tensor
    y: torch.Tensor
    deadline: Deadline


class Deadline:
    """Raises `ProxyTimeout` from `check` once ``budget_s`` seconds have passed since it was made."""

    def __init__(self, budget_s: float | None):
        self.budget_s = budget_s
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def late(self) -> bool:
        return self.budget_s is not None and self.elapsed() > self.budget_s

    def check(self, *_: Any) -> None:  # also a forward pre-hook: (module, inputs) ignored
        if self.late():
            raise ProxyTimeout(f"ran past the {self.budget_s:g} s budget")


ProxyFn = Callable[["nn.Module", Batch], float]


def _registry() -> dict[str, ProxyFn]:
    from . import activation_scores, weight_scores

    return {
        "synflow": weight_scores.synflow,
        "snip": weight_scores.snip,
        "grad_norm": weight_scores.grad_norm,
        "fisher": weight_scores.fisher,
        "naswot": activation_scores.naswot,
        "jacob_cov": activation_scores.jacob_cov,
        "zen": activation_scores.zen,
        "log_params": weight_scores.log_params,
        "log_flops": weight_scores.log_flops,
    }


ALL_PROXIES: tuple[str, ...] = (
    "synflow", "snip", "grad_norm", "fisher", "naswot", "jacob_cov", "zen", "log_params", "log_flops",
)  # fmt: skip
# What `ProxyFeatures` computes unless told otherwise: all of them (each is one forward and at
# most one backward pass on a small batch; the bench's per-proxy costs are in results/proxies_nb201.md).
DEFAULT_PROXIES: tuple[str, ...] = ALL_PROXIES


def compute_proxies(
    model: nn.Module,
    x: Any,
    y: Any,
    names: Iterable[str] = DEFAULT_PROXIES,
    seed: int = 0,
    time_budget_s: float | None = None,
    device: str | torch.device | None = None,
) -> ProxyResult:
    """Zero-cost proxies of ``model`` on the mini-batch ``(x, y)`` (arrays or tensors; ``y`` class
    indices, or float targets). Higher is better for every proxy (jacob_cov is a negative number).
    ``time_budget_s`` applies to each proxy; ``device`` defaults to the model's own."""
    import torch

    registry = _registry()
    names = tuple(names)
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ValueError(f"unknown proxies {unknown}; valid: {', '.join(ALL_PROXIES)}")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    xt = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=torch.float32).to(device)
    yt = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).to(device)
    result = ProxyResult()
    for name in names:
        value, seconds, error = _one(registry[name], model, xt, yt, seed, time_budget_s, device)
        result.values[name], result.seconds[name] = value, seconds
        if error is not None:
            result.errors[name] = error
    return result


def _one(
    fn: ProxyFn,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    seed: int,
    budget_s: float | None,
    device: torch.device,
) -> tuple[float | None, float, str | None]:
    import torch

    deadline = Deadline(budget_s)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the caller's random state is left as it was
        torch.manual_seed(seed)
        try:
            work = copy.deepcopy(model).to(device)
            for module in work.modules():
                module.register_forward_pre_hook(deadline.check)
            value: float | None = float(fn(work, Batch(x, y, deadline)))
            error = None
            if not math.isfinite(value):
                value, error = None, f"failed: not finite ({value})"
            elif deadline.late():
                value, error = None, f"skipped: ran past the {budget_s:g} s budget ({deadline.elapsed():.2f} s)"
        except ProxyTimeout as exc:
            value, error = None, f"skipped: {exc}"
        except UnsupportedProxy as exc:
            value, error = None, f"unsupported: {exc}"
        except Exception as exc:  # noqa: BLE001 - any failure of one proxy is recorded, never fatal
            value, error = None, f"failed: {type(exc).__name__}: {_one_line(str(exc))}"
    return value, deadline.elapsed(), error


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
