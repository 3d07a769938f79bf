"""`CompressionController`: a fixed list of (architecture, policy) candidates run as trials.

It offers runners the same seam as the search's controller (`next`, `finish`, `remaining`,
`objectives`, `budget`), so policy evaluations go through the same `run_trial`, the local and
Ray Tune runners and the same store as architecture trials, with ``stage="compress"``.

Resume is exact without any state file: the candidate list is a pure function of the saved
compression config and the store, so on restart a candidate is skipped when a finished
compression trial of the same (genotype, policy) pair exists, and trials a killed driver left
running are marked failed ("interrupted") by the store and run again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from nas.controller import uses_evaluation
from nas.store import RunStore
from nas.trial import Candidate, TrialResult
from search_spaces import Genotype

__all__ = ["COMPRESS_STAGE", "CompressionController"]

COMPRESS_STAGE = "compress"


class CompressionController:
    def __init__(
        self,
        store: RunStore,
        candidates: Sequence[tuple[Genotype, str]],
        budget: int,
        seed: int,
        parse: Callable[[str], Genotype] = Genotype.from_str,
        strategy_name: str = "policy-list",
    ):
        self.store, self.budget, self.seed = store, budget, seed
        self.objectives = store.objectives
        self.constraints = store.constraints
        self.static_metrics = None  # no pre-training rejection: the architecture is trained already
        self.parse = parse  # genotype text -> genotype, shipped to Ray workers
        self.strategy_name = strategy_name
        self.in_flight: dict[int, Candidate] = {}
        # (genotype text, policy) -> times run again after a lost worker; in memory only: a
        # resumed run reruns an interrupted candidate anyway (see the module docstring), and
        # at worst grants it max_retries more tries
        self.retries: dict[tuple[str, str], int] = {}
        self.store.interrupted(stages=(COMPRESS_STAGE,))  # marked failed; run again below
        done = {
            (r["genotype"], r["policy"])
            for r in store.records()
            if r.get("stage") == COMPRESS_STAGE and uses_evaluation(r["status"], str(r.get("error") or ""))
        }
        self.total = len(candidates)
        seen: set[tuple[str, str]] = set()
        self.todo: list[tuple[Genotype, str]] = []
        for g, policy in candidates:
            key = (g.to_str(), policy)
            if key in done or key in seen:
                continue
            seen.add(key)
            self.todo.append((g, policy))
        self.resumed_done = self.total - len(self.todo)

    def remaining(self) -> int:
        return len(self.todo)

    def next(self) -> Candidate | None:
        if not self.todo:
            return None
        genotype, policy = self.todo.pop(0)
        number = self.store.start(
            genotype.to_str(),
            genotype.id,
            self.budget,
            self.strategy_name,
            self.seed,
            policy=policy,
            stage=COMPRESS_STAGE,
        )
        cand = Candidate(genotype, self.budget, number, policy)
        self.in_flight[number] = cand
        return cand

    def finish(self, candidate: Candidate, result: TrialResult) -> None:
        self.store.finish(candidate, result)
        self.in_flight.pop(candidate.number, None)

    @staticmethod
    def _retry_key(candidate: Candidate) -> tuple[str, str]:
        return candidate.genotype.to_str(), candidate.policy

    def retries_used(self, candidate: Candidate) -> int:
        return self.retries.get(self._retry_key(candidate), 0)

    def retry(
        self,
        candidate: Candidate,
        reason: str,
        *,
        max_retries: int = 2,
        history: Sequence[Mapping[str, float]] = (),
        duration_s: float = 0.0,
    ) -> bool:
        """As `SearchController.retry`: the trial was lost to the infrastructure; its row is
        recorded "interrupted: <reason>" (not counted, so a resume would run it again too) and
        the candidate goes first in line, up to ``max_retries`` times, then it is a failure."""
        used = self.retries_used(candidate)
        if used >= max_retries:
            self.finish(candidate, TrialResult("failed", {}, tuple(history), reason, duration_s))
            return False
        self.retries[self._retry_key(candidate)] = used + 1
        self.todo.insert(0, (candidate.genotype, candidate.policy))
        lost = TrialResult("failed", {}, tuple(history), f"interrupted: {reason}", duration_s)
        self.finish(candidate, lost)
        return True
