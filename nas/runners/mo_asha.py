"""Multi-objective ASHA: asynchronous successive halving that ranks by Pareto dominance.

ASHA (Li et al., MLSys 2020) stops a trial at a rung (a milestone epoch) unless its result is in
the top ``1/rf`` of the results recorded at that rung so far. With several objectives "top" has
no single order; MO-ASHA (Schmucker et al. 2021, "Multi-objective Asynchronous Successive
Halving") replaces the sort by non-dominated sorting, breaking ties inside a front by NSGA-II
crowding distance (Deb et al. 2002), so the survivors spread along the front instead of piling
up at one end of it.

`promote` is the whole decision, a pure function on a (n, m) loss array; `Rungs` keeps the
records it is applied to; `MOASHAScheduler` adapts them to Ray Tune. Ray is imported lazily (the
adapter class is defined on first use), so importing this module stays cheap.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ..objectives import Objective
from ..pareto import crowding_distance, nondominated_rank

__all__ = ["Rungs", "make_mo_asha", "milestones", "promote"]


def promote(rung_losses: np.ndarray, candidate_index: int, reduction_factor: int) -> bool:
    """Whether the candidate row may continue past its rung.

    rung_losses: (n, m) losses (lower is better) of every result recorded at the rung, the
    candidate's own included at ``candidate_index``. With fewer than ``reduction_factor`` results
    there is nothing to compare against yet and the trial continues (as early ASHA rungs do).
    Otherwise it continues if fewer than ``n // rf`` rows are strictly better than it by
    (non-dominated rank, then larger crowding distance): ties go to the candidate, so two
    equally good points are never both stopped for being equal. Non-finite rows rank last.
    """
    losses = np.asarray(rung_losses, dtype=np.float64)
    if losses.ndim != 2:
        raise ValueError(f"rung_losses must be (n, m), got shape {losses.shape}")
    n = len(losses)
    if not 0 <= candidate_index < n:
        raise IndexError(f"candidate_index {candidate_index} out of range for {n} results")
    if reduction_factor < 2:
        raise ValueError(f"reduction_factor must be >= 2, got {reduction_factor}")
    if n < reduction_factor:
        return True
    keep = n // reduction_factor
    rank = nondominated_rank(losses)
    crowd = np.zeros(n)
    finite = np.isfinite(losses).all(1)
    for r in np.unique(rank[finite]):
        members = np.flatnonzero(rank == r)
        crowd[members] = crowding_distance(losses[members])
    r_c, d_c = rank[candidate_index], crowd[candidate_index]
    better = (rank < r_c) | ((rank == r_c) & (crowd > d_c))
    return int(better.sum()) < keep


def milestones(grace_period: int, reduction_factor: int, max_t: int) -> list[int]:
    """Rung epochs ``grace_period * rf**k`` below ``max_t`` (reaching max_t ends a trial anyway,
    so a rung there could only throw away finished training)."""
    if grace_period < 1 or reduction_factor < 2:
        raise ValueError(
            f"need grace_period >= 1 and reduction_factor >= 2, got {grace_period}, {reduction_factor}"
        )
    out, t = [], grace_period
    while t < max_t:
        out.append(t)
        t *= reduction_factor
    return out


class Rungs:
    """MO-ASHA's bookkeeping without Ray: rung records and the stop/continue decision.

    A trial is judged once per rung, at the highest milestone its time has reached, against
    every result recorded at that rung so far (asynchronous: no waiting for a full rung).
    Values are kept as measured; `Objective.loss` turns them into losses for `promote`.
    """

    def __init__(
        self, objectives: Sequence[Objective], max_t: int, grace_period: int = 1, reduction_factor: int = 3
    ):
        self.objectives = tuple(objectives)
        self.rf = int(reduction_factor)
        # milestone -> {trial_id: objective values, NaN where unknown}
        self.records: dict[int, dict[str, np.ndarray]] = {
            m: {} for m in milestones(grace_period, reduction_factor, max_t)
        }
        self._signs = np.array([o.loss(1.0) for o in self.objectives])  # max -> -1

    def decide(
        self,
        trial_id: str,
        t: float,
        values: Mapping[str, float],
        fill: Callable[[], Mapping[str, float]] | None = None,
    ) -> bool:
        """True to continue. ``values`` are the trial's latest objective values; ``fill()``
        supplies missing ones (called only when a rung decision needs them)."""
        reached = [m for m in self.records if m <= t]
        if not reached:
            return True
        rung = self.records[max(reached)]
        if trial_id in rung:
            return True  # decided at this rung already
        known = {k: float(v) for k, v in values.items() if _finite(v)}
        if fill is not None and any(o.metric not in known for o in self.objectives):
            known = {**{k: float(v) for k, v in fill().items() if _finite(v)}, **known}
        rung[trial_id] = np.array([known.get(o.metric, math.nan) for o in self.objectives])
        ids = list(rung)
        # compare on the objectives this trial has: an unknown value is no evidence either way
        cols = np.flatnonzero(np.isfinite(rung[trial_id]))
        if cols.size == 0:
            return True
        losses = np.stack([rung[i] for i in ids])[:, cols] * self._signs[cols]
        return promote(losses, ids.index(trial_id), self.rf)


def _finite(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def make_mo_asha(
    objectives: Sequence[Objective],
    max_t: int,
    grace_period: int = 1,
    reduction_factor: int = 3,
    time_attr: str = "epoch",
    fill: Callable[[str], Mapping[str, float]] | None = None,
) -> Any:
    """A Ray Tune `TrialScheduler` running MO-ASHA on ``objectives`` (see `promote`).

    Per-epoch results often lack some objectives (parameters and latency are measured once, at
    the end). ``fill(genotype_str)`` supplies such values before training (e.g. params and FLOPs
    from the architecture alone); it is called at most once per trial, and only when a rung needs
    an objective the trial has not reported. Objectives still unknown are left out of that rung
    decision rather than guessed.
    """
    cls = _scheduler_class()
    return cls(Rungs(objectives, max_t, grace_period, reduction_factor), time_attr, fill)


_CLASS: type | None = None


def __getattr__(name: str) -> Any:
    # `MOASHAScheduler` exists once Ray is imported; resolving it here keeps it picklable by
    # reference (Tune pickles its scheduler into the experiment state).
    if name == "MOASHAScheduler":
        return _scheduler_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _scheduler_class() -> type:
    """Define the Tune adapter on first use: subclassing FIFOScheduler needs Ray imported."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    from ray.tune.schedulers import FIFOScheduler, TrialScheduler

    class MOASHAScheduler(FIFOScheduler):
        def __init__(self, rungs: Rungs, time_attr: str, fill: Callable[[str], Mapping[str, float]] | None):
            super().__init__()
            self.rungs, self.time_attr, self.fill = rungs, time_attr, fill
            self.latest: dict[str, dict[str, float]] = {}  # latest finite objective values per trial
            self.static: dict[str, Mapping[str, float]] = {}  # fill() results, once per trial
            self.num_stopped = 0

        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
            tid = trial.trial_id
            latest = self.latest.setdefault(tid, {})
            latest.update(
                {
                    o.metric: float(result[o.metric])
                    for o in self.rungs.objectives
                    if _finite(result.get(o.metric))
                }
            )
            t = result.get(self.time_attr)
            if t is None:  # e.g. the final summary report: no epoch, nothing to decide
                return TrialScheduler.CONTINUE

            def fill() -> Mapping[str, float]:
                if tid not in self.static:
                    self.static[tid] = self.fill(str(trial.config["genotype"])) if self.fill else {}
                return self.static[tid]

            if self.rungs.decide(tid, float(t), latest, fill):
                return TrialScheduler.CONTINUE
            self.num_stopped += 1
            return TrialScheduler.STOP

        def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
            # rung records stay (later trials are compared with them); per-trial caches go
            self.latest.pop(trial.trial_id, None)
            self.static.pop(trial.trial_id, None)

        def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
            self.on_trial_complete(tune_controller, trial, {})

        def debug_string(self) -> str:
            sizes = ", ".join(f"epoch {m}: {len(r)}" for m, r in self.rungs.records.items())
            names = [str(o) for o in self.rungs.objectives]
            return f"MO-ASHA on {names}: {self.num_stopped} stopped; results per rung {sizes}"

    MOASHAScheduler.__module__ = __name__
    MOASHAScheduler.__qualname__ = "MOASHAScheduler"
    _CLASS = MOASHAScheduler
    return _CLASS
