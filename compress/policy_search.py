"""Compression-policy search: a strategy searches a `PolicySpace` per architecture, each policy
evaluated as a trial (stage "compress") through the same runners and store as the fixed list.

The search's own loop is the architecture search's `SearchController`, unchanged: strategy state
saved before every store write, exact resume after kill -9, failed trials told as failures. Only
the mapping of proposals to rows differs (`PolicyRows`): a row holds the architecture, the
policy's canonical text and the proposal (the policy genotype), so resume rebuilds the history
from the store alone and `report` / `export` read the rows like any compression trial.

Several architectures (``--top-k``) are searched side by side by one `ControllerChain`, so the Ray
runner keeps its workers busy across them. Files in the run folder::

    policy_search/<genotype id>.space.json    the policy space (layer table, probes): rebuilt
                                              from it on resume, so the encoding never drifts
    policy_search/<genotype id>.state.json    the strategy's state (see SearchController)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from nas.controller import SearchController
from nas.objectives import Constraint, Objective
from nas.store import RunStore
from nas.strategies.base import make_strategy
from nas.trial import Candidate, TrialResult
from search_spaces import Genotype, GenotypeError

from .controller import COMPRESS_STAGE
from .policy_space import PolicySpace

__all__ = ["ControllerChain", "PolicyRows", "STRATEGY_ALIASES", "policy_controllers", "policy_space_for"]

FOLDER = "policy_search"
# Quantune's names for the baselines
STRATEGY_ALIASES = {"genetic": "evolution"}


class PolicyRows:
    """Proposals are policy genotypes of ``space``; rows are (architecture, policy text)."""

    stages = (COMPRESS_STAGE,)

    def __init__(self, architecture: Genotype, space: PolicySpace):
        self.architecture, self.space = architecture, space
        self._arch = architecture.to_str()

    def row(self, proposal: Genotype) -> tuple[str, str, str]:
        return self._arch, self.architecture.id, self.space.policy(proposal).to_str()

    def candidate(self, proposal: Genotype, budget: int, number: int) -> Candidate:
        return Candidate(self.architecture, budget, number, self.space.policy(proposal).to_str())

    def proposal(self, record: Mapping[str, Any]) -> Genotype | None:
        text = record.get("proposal")
        if record.get("stage") != COMPRESS_STAGE or record.get("genotype") != self._arch or not text:
            return None
        try:
            return self.space.from_str(str(text))
        except GenotypeError:  # a policy search of another space on the same model
            return None


class ControllerChain:
    """Several controllers behind the runners' one-controller seam: `next` takes from the first
    that has work (a round-robin would interleave strategies for no gain), `finish` routes a
    result back to the controller that opened it."""

    def __init__(self, controllers: Sequence[SearchController]):
        if not controllers:
            raise ValueError("no controllers")
        self.controllers = list(controllers)
        first = self.controllers[0]
        self.objectives: tuple[Objective, ...] = first.objectives
        self.constraints: tuple[Constraint, ...] = first.constraints
        self.budget = first.budget
        self.static_metrics = None  # nothing to reject before a policy evaluation
        self.strategy = first.strategy
        # architecture text -> genotype on Ray workers (the rows hold architectures, not proposals)
        self.parse: Callable[[str], Genotype] = Genotype.from_str
        self._owner: dict[int, SearchController] = {}

    @property
    def in_flight(self) -> dict[int, Candidate]:
        return {n: c for ctl in self.controllers for n, c in ctl.in_flight.items()}

    def remaining(self) -> int:
        return sum(max(0, c.remaining()) for c in self.controllers if not c.exhausted)

    def counted(self) -> int:
        return sum(c.counted() for c in self.controllers)

    @property
    def resumed_told(self) -> int:
        return sum(c.resumed_told for c in self.controllers)

    def next(self) -> Candidate | None:
        for ctl in self.controllers:
            cand = ctl.next()
            if cand is not None:
                self._owner[cand.number] = ctl
                return cand
        return None

    def finish(self, candidate: Candidate, result: TrialResult) -> None:
        self._owner.pop(candidate.number).finish(candidate, result)

    def retries_used(self, candidate: Candidate) -> int:
        return self._owner[candidate.number].retries_used(candidate)

    def retry(self, candidate: Candidate, reason: str, **options: Any) -> bool:
        """`SearchController.retry` on the controller that opened ``candidate``; its requeued
        proposal comes back from that controller's `next`."""
        return self._owner.pop(candidate.number).retry(candidate, reason, **options)


def policy_space_for(
    out: Path, architecture: Genotype, load: Callable[[], tuple[Any, Any]], data: Any, kind: str,
    finetune: Mapping[str, Any], options: Mapping[str, Any] | None = None,
) -> PolicySpace:
    """The architecture's policy space: read from the run folder when a search made it before
    (the same layer table and probe values, so a resume encodes exactly as the first run did),
    else measured on the trained model — ``load()`` gives (training form, deploy form), called
    only then — and written there."""
    path = out / FOLDER / f"{architecture.id}.space.json"
    if path.is_file():
        space = PolicySpace.from_json(json.loads(path.read_text()))
        wanted = {k: space.options[k] for k in (options or {})}
        same = all(_plain(v) == _plain(wanted[k]) for k, v in (options or {}).items())
        if space.options["kind"] == kind and dict(space.options["finetune"]) == dict(finetune) and same:
            return space
    module, deploy = load()
    space = PolicySpace.for_model(module, deploy, data, kind=kind, finetune=dict(finetune), **dict(options or {}))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(space.to_json()))
    tmp.replace(path)
    return space


def policy_controllers(
    out: Path,
    store: RunStore,
    spaces: Sequence[tuple[Genotype, PolicySpace]],
    strategy: str,
    budget: int,
    objectives: Sequence[Objective],
    constraints: Sequence[Constraint],
    seed: int,
    finetune_epochs: int,
    options: Mapping[str, Any] | None = None,
) -> ControllerChain:
    """One `SearchController` per architecture, ``budget`` policy evaluations each."""
    name = STRATEGY_ALIASES.get(strategy, strategy)
    controllers = []
    for architecture, space in spaces:
        opts = dict(options or {})
        if name == "surrogate":
            # the surrogate's 10 random starts suit a 100-trial search; a policy search of 20
            # evaluations would be half random: a quarter of the budget, at least 3
            opts.setdefault("n_init", max(3, min(10, budget // 4)))
            # initial = "uniform": the uniform policies first, where a user would start by hand.
            # Not the default: on bench/prune_search.py --targeted (20 evaluations) the surrogate
            # then stayed near them (ties on 4 of 9 pairs, ahead on 5; unseeded: ahead on 8)
            if opts.get("initial") == "uniform":
                opts["initial"] = [g.to_str() for g in space.uniform_points()][: max(0, budget - 1)]
        strat = make_strategy(name, space, n_objectives=len(objectives), seed=seed, **opts)
        controllers.append(
            SearchController(
                strat,
                store,
                budget=finetune_epochs,
                n_trials=budget,
                seed=seed,
                state_path=out / FOLDER / f"{architecture.id}.state.json",
                rows=PolicyRows(architecture, space),
                objectives=objectives,
                constraints=constraints,
            )
        )
    return ControllerChain(controllers)



def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))
