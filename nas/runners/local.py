"""In-process runner: one trial after another in the driver process (the default for small runs)."""

from __future__ import annotations

from collections.abc import Callable

from ..controller import SearchController
from ..trial import Candidate, Evaluator, TrialResult, run_trial

__all__ = ["run_local"]


def run_local(
    controller: SearchController,
    evaluator: Evaluator,
    on_result: Callable[[Candidate, TrialResult], None] | None = None,
) -> None:
    """Evaluate candidates until the controller has none left. A candidate's crash, NaN or
    out-of-memory is recorded as a failed trial by `run_trial`; the loop goes on."""
    required = tuple(o.metric for o in controller.objectives)
    while (cand := controller.next()) is not None:
        result = run_trial(evaluator, cand.genotype, cand.budget, required=required, policy=cand.policy,
                           parent=cand.parent)
        controller.finish(cand, result)
        if on_result is not None:
            on_result(cand, result)
