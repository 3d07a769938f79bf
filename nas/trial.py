"""Trial records and the one function that runs an evaluation safely.

`run_trial` turns whatever happens inside an evaluator — a result, an exception, NaN, out of
memory, an early stop — into a `TrialResult`, so runners never crash because a candidate did.
"""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from search_spaces import Genotype

__all__ = ["Candidate", "Evaluator", "Reporter", "StopTrial", "TrialResult", "run_trial"]

# rejected: a cheap check (e.g. params over a constraint) ruled it out before training
Status = Literal["complete", "failed", "stopped", "rejected"]
# report(epoch, metrics) is called by evaluators after each epoch (epochs count from 1)
Reporter = Callable[[int, Mapping[str, float]], None]


class StopTrial(Exception):
    """Raised by a reporter to stop a trial early (an early-stopping scheduler decided so)."""


class Evaluator(Protocol):
    """Genotype + budget (epochs) -> metrics. Must be picklable: Ray ships it to workers once."""

    def __call__(self, genotype: Genotype, budget: int, report: Reporter) -> dict[str, float]: ...


@dataclass(frozen=True)
class Candidate:
    """What one trial evaluates: an architecture and (later) a compression policy.

    ``policy`` is the canonical text of a compression policy, empty for a plain architecture;
    the pair is one candidate, so a joint architecture x compression search reuses this record.
    """

    genotype: Genotype
    budget: int
    number: int  # the trial number in the run's store
    policy: str = ""
    # `nas.inherit.Parent` as JSON text: the trained trial whose weights this one starts from
    parent: str = ""

    @property
    def id(self) -> str:
        return self.genotype.id if not self.policy else f"{self.genotype.id}+{_short_hash(self.policy)}"


def _short_hash(text: str) -> str:
    import hashlib

    return hashlib.sha1(text.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class TrialResult:
    status: Status
    metrics: dict[str, float] = field(default_factory=dict)
    history: tuple[dict[str, float], ...] = ()  # one dict per reported epoch
    error: str = ""
    duration_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "metrics": self.metrics,
            "history": list(self.history),
            "error": self.error,
            "duration_s": self.duration_s,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TrialResult:
        return cls(d["status"], dict(d["metrics"]), tuple(d["history"]), d["error"], d["duration_s"])


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()


def run_trial(
    evaluator: Evaluator,
    genotype: Genotype,
    budget: int,
    on_report: Reporter | None = None,
    required: tuple[str, ...] = (),
    policy: str = "",
    parent: str = "",
) -> TrialResult:
    """Run one evaluation; never raises for the candidate's own faults.

    ``on_report`` sees every per-epoch report and may raise `StopTrial`; the result is then
    "stopped" with the metrics of the last report. ``required`` metrics must be present and
    finite or the trial fails (a NaN loss must not become a "best" candidate). A non-empty
    ``policy`` (a compression policy's canonical text) is passed to the evaluator as
    ``policy=``; architecture evaluators, which take none, are called without it. A non-empty
    ``parent`` (`nas.inherit.Parent` text) is passed as ``parent=`` the same way.
    """
    history: list[dict[str, float]] = []

    def report(epoch: int, metrics: Mapping[str, float]) -> None:
        row = {"epoch": float(epoch), **{k: float(v) for k, v in metrics.items()}}
        history.append(row)
        if on_report is not None:
            on_report(epoch, metrics)

    start = time.perf_counter()
    try:
        extra = {**({"policy": policy} if policy else {}), **({"parent": parent} if parent else {})}
        metrics = {k: float(v) for k, v in evaluator(genotype, budget, report, **extra).items()}
    except StopTrial:
        last = {k: v for k, v in (history[-1] if history else {}).items() if k != "epoch"}
        return TrialResult("stopped", last, tuple(history), "", time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 - any fault of the candidate is recorded, not raised
        tail = traceback.format_exc(limit=3).strip().splitlines()[-1]  # "TypeName: message"
        error = f"out of memory: {tail}" if _is_oom(exc) else tail
        return TrialResult("failed", {}, tuple(history), error, time.perf_counter() - start)
    bad = [k for k in required if k not in metrics or not math.isfinite(metrics[k])]
    if bad:
        shown = {k: metrics.get(k) for k in bad}
        return TrialResult(
            "failed",
            metrics,
            tuple(history),
            f"non-finite or missing metrics {shown}",
            time.perf_counter() - start,
        )
    return TrialResult("complete", metrics, tuple(history), "", time.perf_counter() - start)
