"""The search loop's bookkeeping, shared by every runner.

The controller sits between a `Strategy` (which proposes) and a `RunStore` (which records):
`next()` asks for a candidate and opens its trial, `finish()` records the result and tells the
strategy. After every change it writes the strategy's state next to the store, so a driver
killed at any instant resumes from the store alone: finished trials are neither lost nor
repeated (any the saved state missed are told again from the store), and trials that were
in flight are marked failed and run again first.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from search_spaces import Genotype

from .objectives import Constraint, Objective, losses
from .store import RunStore
from .strategies.base import Strategy
from .trial import Candidate, TrialResult

__all__ = ["SEARCH_STAGES", "SearchController", "uses_evaluation"]

# stage of an architecture trial (None: rows of stores older than the stage field)
SEARCH_STAGES = ("search", None)

# statuses of a trial that used up one of the run's evaluations
_COUNTED = ("complete", "failed", "stopped")


def uses_evaluation(status: str, error: str) -> bool:
    """Whether a finished trial counts toward the run's evaluations (`--trials`): interrupted
    and rejected ones do not."""
    return status in _COUNTED and not error.startswith("interrupted")


class SearchController:
    def __init__(
        self,
        strategy: Strategy,
        store: RunStore,
        budget: int,
        n_trials: int,
        seed: int,
        state_path: str | Path,
        static_metrics: Callable[[Genotype], Mapping[str, float]] | None = None,
        max_rejections: int = 500,
    ):
        self.strategy, self.store = strategy, store
        self.budget, self.n_trials, self.seed = budget, n_trials, seed
        self.state_path = Path(state_path)
        self.static_metrics = static_metrics
        self.max_rejections = max_rejections
        self.objectives: tuple[Objective, ...] = store.objectives
        self.constraints: tuple[Constraint, ...] = store.constraints
        self.in_flight: dict[int, Candidate] = {}
        self.told: set[int] = set()
        self.requeued: list[tuple[Genotype, str]] = []
        self.resumed_told = 0
        self._resume()

    # -- resume --------------------------------------------------------------------------------
    def _resume(self) -> None:
        if self.state_path.exists():
            saved = json.loads(self.state_path.read_text())
            self.strategy.load_state_dict(saved["strategy"])
            self.told = set(saved["told"])
        else:
            saved = {}
        # compression trials of the same run (stage "compress") are not this search's business
        interrupted = self.store.interrupted(stages=SEARCH_STAGES)
        records = self.store.records()
        self._rows = len(records)
        for rec in interrupted:
            self.told.add(rec["number"])  # its FAIL row is bookkeeping, not a result to learn from
            if rec.get("genotype"):  # rows of older stores may lack it (see RunStore.start)
                self._requeue(rec["genotype"], rec.get("policy", ""))
        # Saved to run next when the driver died. One whose trial row appeared after the save
        # got as far as the store: it is requeued above if it was running, done if it finished
        # (a kill between recording a rejection and saving must not reject it twice).
        rows_at_save = saved.get("rows", len(records))
        opened = {(r["genotype"], r["policy"]) for r in records[rows_at_save:]}
        for genotype_str, policy in saved.get("requeued", []):
            if (genotype_str, policy) not in opened:
                self._requeue(genotype_str, policy)
        for rec in records:
            if rec["number"] in self.told or rec["status"] not in (*_COUNTED, "rejected"):
                continue
            if rec.get("stage") not in SEARCH_STAGES:
                continue
            g = self.strategy.space.from_str(rec["genotype"])
            self._tell(rec["number"], g, rec["status"], rec["metrics"], rec.get("violation") or 0.0)
            self.resumed_told += 1
        # counted once here, then kept up to date by `finish` (no store scan per ask)
        self._counted = sum(
            uses_evaluation(r["status"], str(r.get("error") or ""))
            for r in records
            if r.get("stage") in SEARCH_STAGES
        )
        self._save()

    def _requeue(self, genotype_str: str, policy: str) -> None:
        genotype = self.strategy.space.from_str(genotype_str)
        if (genotype, policy) not in self.requeued:
            self.requeued.append((genotype, policy))

    def _save(self, pending: tuple[Genotype, str] | None = None) -> None:
        """Write the strategy's state and the candidates still to run. `pending` is one whose
        trial is about to be opened: saved first, so a kill before the store write loses nothing,
        and one just after it is deduplicated against the interrupted trial on resume."""
        tmp = self.state_path.with_suffix(".tmp")
        todo = [*self.requeued, *([pending] if pending else [])]
        state = {
            "strategy": self.strategy.state_dict(),
            "told": sorted(self.told),
            "requeued": [[g.to_str(), policy] for g, policy in todo],
            "rows": self._rows,  # store rows when saved: tells resume whether `pending` was opened
        }
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.state_path)  # atomic: a kill never leaves half a file

    # -- counts --------------------------------------------------------------------------------
    def counted(self) -> int:
        """Finished trials that used an evaluation (interrupted and rejected ones excluded)."""
        return self._counted

    def remaining(self) -> int:
        return self.n_trials - self.counted() - len(self.in_flight)

    # -- the loop --------------------------------------------------------------------------------
    def next(self) -> Candidate | None:
        """The next candidate to evaluate (its trial is open in the store), or None when the
        run's evaluations are all started."""
        if self.remaining() <= 0:
            return None
        # interrupted ones first, checked again: a kill mid-rejection requeues a too-big one
        while self.requeued:
            genotype, policy = self.requeued.pop(0)
            if self._passes_cheap_checks(genotype, policy):
                return self._open(genotype, policy)
        for _ in range(self.max_rejections):
            genotype = self.strategy.ask()
            if self._passes_cheap_checks(genotype):
                return self._open(genotype, "")
        raise RuntimeError(
            f"{self.max_rejections} proposals in a row violated the constraints "
            f"{[str(c) for c in self.constraints]} before training; loosen them or change the space"
        )

    def _open(self, genotype: Genotype, policy: str) -> Candidate:
        self._save(pending=(genotype, policy))
        number = self.store.start(
            genotype.to_str(), genotype.id, self.budget, self.strategy.name, self.seed, policy=policy
        )
        self._rows = number + 1
        # no second save here: the saved `rows` already tells resume this candidate got a row
        cand = Candidate(genotype, self.budget, number, policy)
        self.in_flight[number] = cand
        return cand

    def _passes_cheap_checks(self, genotype: Genotype, policy: str = "") -> bool:
        """Evolving Normalization-Activation Layers-style rejection: constraints on metrics we
        can compute without training (params, FLOPs) are checked before a trial starts."""
        if self.static_metrics is None or not self.constraints:
            return True
        static = dict(self.static_metrics(genotype))
        checkable = [c for c in self.constraints if c.metric in static]
        broken = [c for c in checkable if not c.satisfied(static)]
        if not broken:
            return True
        self._save(pending=(genotype, policy))
        number = self.store.start(
            genotype.to_str(), genotype.id, self.budget, self.strategy.name, self.seed, policy=policy
        )
        self._rows = number + 1
        why = "rejected before training: " + ", ".join(
            f"{c} ({c.metric}={static[c.metric]:g})" for c in broken
        )
        result = TrialResult("rejected", static, (), why, 0.0)
        violation = self.store.finish(Candidate(genotype, self.budget, number, policy), result)
        self._tell(number, genotype, "rejected", static, violation)
        self._save()
        return False

    def finish(self, candidate: Candidate, result: TrialResult) -> None:
        violation = self.store.finish(candidate, result)
        self.in_flight.pop(candidate.number, None)
        self._counted += uses_evaluation(result.status, result.error)
        self._tell(candidate.number, candidate.genotype, result.status, result.metrics, violation)
        self._save()

    def _tell(
        self, number: int, g: Genotype, status: str, metrics: Mapping[str, float], violation: float
    ) -> None:
        # Early-stopped trials still teach the strategy (their partial metrics are a lower
        # bound of what training gives); failed and rejected ones only mark the genotype bad.
        ys = losses(self.objectives, metrics) if status in ("complete", "stopped") else None
        self.strategy.tell(g, ys, violation)
        self.told.add(number)
