"""The search loop's bookkeeping, shared by every runner.

The controller sits between a `Strategy` (which proposes) and a `RunStore` (which records):
`next()` asks for a candidate and opens its trial, `finish()` records the result and tells the
strategy. After every change it writes the strategy's state next to the store, so a driver
killed at any instant resumes from the store alone: finished trials are neither lost nor
repeated (any the saved state missed are told again from the store), and trials that were
in flight are marked failed and run again first.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from search_spaces import ConfigError, Genotype, SearchSpace

from .inherit import Lineage, Parent
from .objectives import Constraint, Objective, losses, violation_of
from .store import RunStore
from .strategies.base import SpaceExhausted, Strategy
from .trial import Candidate, TrialResult

__all__ = ["SEARCH_STAGES", "ArchitectureRows", "ProposalRows", "SearchController", "read_state", "uses_evaluation"]

def read_state(path: str | Path) -> dict[str, Any]:
    """A controller's saved state; written atomically, so a damaged one was edited or overwritten:
    a `ConfigError` naming it (``prepare_run`` reads it before the store is written to)."""
    from .config import read_json_file

    saved = read_json_file(path, "search strategy's state")
    told = saved.get("told")
    if not isinstance(saved.get("strategy"), dict) or not isinstance(told, list) or not all(
        isinstance(n, int) for n in told
    ):
        raise ConfigError(f"{path} is damaged: it lacks the strategy's state or the trials it was told")
    return saved


# stage of an architecture trial (None: rows of stores older than the stage field)
SEARCH_STAGES = ("search", None)

# statuses of a trial that used up one of the run's evaluations
_COUNTED = ("complete", "failed", "stopped")


def uses_evaluation(status: str, error: str) -> bool:
    """Whether a finished trial counts toward the run's evaluations (`--trials`): interrupted
    and rejected ones do not."""
    return status in _COUNTED and not error.startswith("interrupted")


class ProposalRows(Protocol):
    """How a strategy's proposals map onto store rows. An architecture search stores the
    proposal itself; a compression-policy search (`compress.policy_search`) proposes policy
    genotypes and stores rows of (its fixed architecture, the policy's text), stage "compress"."""

    stages: tuple[str | None, ...]  # the stages of its rows; the first is written

    def row(self, proposal: Genotype) -> tuple[str, str, str]:
        """(genotype text, genotype id, policy text) of the trial that evaluates ``proposal``."""
        ...

    def candidate(self, proposal: Genotype, budget: int, number: int) -> Candidate: ...

    def proposal(self, record: Mapping[str, Any]) -> Genotype | None:
        """The proposal a store record evaluated, or None if the record is not this search's."""
        ...


class ArchitectureRows:
    """An architecture search: the row's genotype is the proposal (stage "search")."""

    stages = SEARCH_STAGES

    def __init__(self, space: SearchSpace):
        self.space = space

    def row(self, proposal: Genotype) -> tuple[str, str, str]:
        return proposal.to_str(), proposal.id, ""

    def candidate(self, proposal: Genotype, budget: int, number: int) -> Candidate:
        return Candidate(proposal, budget, number, "")

    def proposal(self, record: Mapping[str, Any]) -> Genotype | None:
        if record.get("stage") not in self.stages or not record.get("genotype"):
            return None  # compression trials of the same run are not this search's business
        return self.space.from_str(record["genotype"])


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
        rows: ProposalRows | None = None,
        objectives: Sequence[Objective] | None = None,
        constraints: Sequence[Constraint] | None = None,
        record: Mapping[str, Any] | None = None,
        lineage: Lineage | None = None,
    ):
        """``lineage``: weight inheritance (`nas.inherit`): a proposal near a trained trial starts
        from its weights and trains ``lineage.inherit_epochs``. ``rows``: how proposals become store rows (default: architectures). ``record``: fields
        written into every trial's record (the training recipe). ``objectives`` /
        ``constraints``: what the strategy is told, when they differ from the store's (a policy
        search in a search run's store has its own; its violations are computed here from the
        recorded metrics, so a resume tells exactly what the first pass told)."""
        self.strategy, self.store = strategy, store
        self.budget, self.n_trials, self.seed = budget, n_trials, seed
        self.state_path = Path(state_path)
        self.static_metrics = static_metrics
        self.max_rejections = max_rejections
        self.record = dict(record or {})
        self.lineage = lineage
        self.rows: ProposalRows = rows if rows is not None else ArchitectureRows(strategy.space)
        self.objectives: tuple[Objective, ...] = tuple(objectives) if objectives is not None else store.objectives
        self._own_constraints = constraints is not None
        self.constraints: tuple[Constraint, ...] = tuple(constraints) if constraints is not None else store.constraints
        self.in_flight: dict[int, Candidate] = {}
        self._proposals: dict[int, Genotype] = {}  # trial number -> what the strategy proposed
        self.told: set[int] = set()
        self.requeued: list[Genotype] = []
        # proposal text -> times its trial was lost to the infrastructure and run again (`retry`)
        self.retries: dict[str, int] = {}
        self.resumed_told = 0
        self.exhausted = False  # the strategy has nothing left to propose (a finished grid)
        self._resume()

    # -- resume --------------------------------------------------------------------------------
    def _resume(self) -> None:
        if self.state_path.exists():
            saved = read_state(self.state_path)
            self.strategy.load_state_dict(saved["strategy"])
            self.told = set(saved["told"])
            self.retries = {str(k): int(v) for k, v in saved.get("retries", {}).items()}
            if self.lineage is not None:
                self.lineage.load_state(saved.get("parents", {}))
        else:
            saved = {}
        interrupted = self.store.interrupted(stages=self.rows.stages)
        records = self.store.records()
        self._rows = len(records)
        proposals = [self.rows.proposal(r) for r in records]  # parsed once: None = not this search's
        for rec in interrupted:
            self.told.add(rec["number"])  # its FAIL row is bookkeeping, not a result to learn from
            if rec.get("genotype"):  # rows of older stores may lack it (see RunStore.start)
                proposal = self.rows.proposal(rec)
                if proposal is not None:
                    self._requeue(proposal)
        # Saved to run next when the driver died. One whose trial row appeared after the save
        # got as far as the store: it is requeued above if it was running, done if it finished
        # (a kill between recording a rejection and saving must not reject it twice).
        rows_at_save = saved.get("rows", len(records))
        opened = {p.to_str() for p in proposals[rows_at_save:] if p is not None}
        for text in saved.get("requeued", []):
            if isinstance(text, list):  # state files of earlier versions: [genotype, policy]
                text = text[0]
            if text not in opened:
                self._requeue(self.strategy.space.from_str(text))
        for rec, g in zip(records, proposals, strict=True):
            if g is None or rec["number"] in self.told or rec["status"] not in (*_COUNTED, "rejected"):
                continue
            self._tell(rec["number"], g, rec["status"], rec["metrics"],
                       self._violation(rec["status"], rec["metrics"], rec.get("violation")))
            self.resumed_told += 1
        for rec, g in zip(records, proposals, strict=True):  # every trained one, told before or not
            if g is not None and rec["status"] == "complete":
                self._trained(rec["number"], g, int(rec["budget"]), rec["metrics"], rec.get("lineage_epochs"))
        # counted once here, then kept up to date by `finish` (no store scan per ask)
        self._counted = sum(
            uses_evaluation(r["status"], str(r.get("error") or ""))
            for r, p in zip(records, proposals, strict=True)
            if p is not None
        )
        self._save()

    def _violation(self, status: str, metrics: Mapping[str, float], stored: float | None) -> float:
        """The violation the strategy is told: the store's, or this search's own constraints'
        on the metrics (failed trials have no metrics to judge)."""
        if not self._own_constraints:
            return float(stored or 0.0)
        return violation_of(self.constraints, metrics) if status in ("complete", "stopped") else 0.0

    def _requeue(self, proposal: Genotype) -> None:
        if proposal not in self.requeued:
            self.requeued.append(proposal)

    def _save(self, pending: Genotype | None = None) -> None:
        """Write the strategy's state and the candidates still to run. `pending` is one whose
        trial is about to be opened: saved first, so a kill before the store write loses nothing,
        and one just after it is deduplicated against the interrupted trial on resume."""
        tmp = self.state_path.with_suffix(".tmp")
        todo = [*self.requeued, *([pending] if pending else [])]
        state = {
            "strategy": self.strategy.state_dict(),
            "told": sorted(self.told),
            "requeued": [g.to_str() for g in todo],
            "rows": self._rows,  # store rows when saved: tells resume whether `pending` was opened
            "retries": self.retries,
            # the parent each proposal got: a resumed run makes the same children from the same weights
            **({"parents": self.lineage.state()} if self.lineage is not None else {}),
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
        run's evaluations are all started (or the strategy has nothing left to propose)."""
        if self.remaining() <= 0:
            return None
        # interrupted ones first, checked again: a kill mid-rejection requeues a too-big one
        while self.requeued:
            proposal = self.requeued.pop(0)
            if self._passes_cheap_checks(proposal):
                return self._open(proposal)
        if self.exhausted:
            return None
        for _ in range(self.max_rejections):
            try:
                proposal = self.strategy.ask()
            except SpaceExhausted:
                self.exhausted = True
                return None
            if self._passes_cheap_checks(proposal):
                return self._open(proposal)
        raise RuntimeError(
            f"{self.max_rejections} proposals in a row violated the constraints "
            f"{[str(c) for c in self.constraints]} before training; loosen them or change the space"
        )

    def _start_row(self, proposal: Genotype, budget: int | None = None, extra: Mapping[str, Any] | None = None) -> int:
        genotype_str, genotype_id, policy = self.rows.row(proposal)
        number = self.store.start(
            genotype_str, genotype_id, self.budget if budget is None else budget, self.strategy.name, self.seed,
            policy=policy, stage=str(self.rows.stages[0]),
            # the proposal is kept when it is not the genotype itself (a policy search's)
            extra={**self.record, **dict(extra or {}),
                   **({"proposal": proposal.to_str()} if proposal.to_str() != genotype_str else {})},
        )
        self._rows = number + 1
        return number

    def _open(self, proposal: Genotype) -> Candidate:
        parent = self.lineage.parent_for(proposal) if self.lineage is not None else None
        self._save(pending=proposal)  # the parent's choice with it
        budget = self.lineage.budget(parent) if self.lineage is not None else self.budget
        extra = self.lineage.record(parent) if self.lineage is not None else {}
        number = self._start_row(proposal, budget, extra)
        # no second save here: the saved `rows` already tells resume this candidate got a row
        cand = self.rows.candidate(proposal, budget, number)
        if parent is not None:
            cand = dataclasses.replace(cand, parent=parent.to_text())
        self.in_flight[number] = cand
        self._proposals[number] = proposal
        return cand

    def _passes_cheap_checks(self, genotype: Genotype) -> bool:
        """Evolving Normalization-Activation Layers-style rejection: constraints on metrics we
        can compute without training (params, FLOPs) are checked before a trial starts."""
        if self.static_metrics is None or not self.constraints:
            return True
        static = dict(self.static_metrics(genotype))
        checkable = [c for c in self.constraints if c.metric in static]
        broken = [c for c in checkable if not c.satisfied(static)]
        if not broken:
            return True
        self._save(pending=genotype)
        number = self._start_row(genotype)
        why = "rejected before training: " + ", ".join(
            f"{c} ({c.metric}={static[c.metric]:g})" for c in broken
        )
        result = TrialResult("rejected", static, (), why, 0.0)
        violation = self.store.finish(self.rows.candidate(genotype, self.budget, number), result)
        self._tell(number, genotype, "rejected", static, violation)
        self._save()
        return False

    def finish(self, candidate: Candidate, result: TrialResult) -> None:
        # a search with its own constraints has them judged and recorded with the row (compress.csv)
        own = self.constraints if self._own_constraints else ()
        violation = self._violation(result.status, result.metrics, self.store.finish(candidate, result, own))
        self.in_flight.pop(candidate.number, None)
        proposal = self._proposals.pop(candidate.number, candidate.genotype)
        self._counted += uses_evaluation(result.status, result.error)
        if result.status == "complete" and self.lineage is not None:
            parent = Parent.from_text(candidate.parent) if candidate.parent else None
            epochs = self.lineage.record(parent)["lineage_epochs"]
            self._trained(candidate.number, proposal, candidate.budget, result.metrics, epochs)
        self._tell(candidate.number, proposal, result.status, result.metrics, violation)
        self._save()

    def retries_used(self, candidate: Candidate) -> int:
        """How many times the proposal behind ``candidate`` was already run again by `retry`."""
        proposal = self._proposals.get(candidate.number, candidate.genotype)
        return self.retries.get(proposal.to_str(), 0)

    def retry(
        self,
        candidate: Candidate,
        reason: str,
        *,
        max_retries: int = 2,
        history: Sequence[Mapping[str, float]] = (),
        duration_s: float = 0.0,
    ) -> bool:
        """The trial of ``candidate`` was lost to the infrastructure (its worker or node died),
        not failed by the candidate: record its row as failed with an error "interrupted:
        <reason>", which does not count toward the run's trials (`uses_evaluation`) and is not
        told to the strategy, and run the same proposal again, before any new one. After
        ``max_retries`` such retries of one proposal it is recorded as a counted failure with
        ``reason`` (a candidate that kills every worker it runs on, e.g. a segfault, cannot be
        told from a lost worker; it must not loop forever). True if it will run again.

        Resume stays exact: the requeued proposal, the retry count and the row's "told" mark
        are saved before the row is written. A kill before the write leaves the row running
        (the store marks it interrupted on resume and the saved requeue is deduplicated against
        it); a kill after it finds the row finished, not counted, and the proposal requeued."""
        proposal = self._proposals.get(candidate.number, candidate.genotype)
        key = proposal.to_str()
        used = self.retries.get(key, 0)
        if used >= max_retries:
            self.finish(candidate, TrialResult("failed", {}, tuple(history), reason, duration_s))
            return False
        self.retries[key] = used + 1
        self.told.add(candidate.number)  # its row is bookkeeping, not a result to learn from
        if proposal in self.requeued:
            self.requeued.remove(proposal)
        self.requeued.insert(0, proposal)  # first in line: it was started before anything queued
        self._save()
        error = f"interrupted: {reason}"
        self.store.finish(candidate, TrialResult("failed", {}, tuple(history), error, duration_s))
        self.in_flight.pop(candidate.number, None)
        self._proposals.pop(candidate.number, None)
        return True

    def _trained(self, number: int, g: Genotype, budget: int, metrics: Mapping[str, float], lineage: Any) -> None:
        """A complete trial: a parent for later proposals, when inheritance is on."""
        if self.lineage is None:
            return
        ys = losses(self.objectives[:1], metrics)
        self.lineage.add_trained(number, g, budget, None if ys is None else ys[0], lineage)

    def _tell(
        self, number: int, g: Genotype, status: str, metrics: Mapping[str, float], violation: float
    ) -> None:
        # Early-stopped trials still teach the strategy (their partial metrics are a lower
        # bound of what training gives); failed and rejected ones only mark the genotype bad.
        ys = losses(self.objectives, metrics) if status in ("complete", "stopped") else None
        self.strategy.tell(g, ys, violation)
        self.told.add(number)
