"""Regularised (aging) evolution, Real et al. 2019, "Regularized Evolution for Image Classifier
Architecture Search", Algorithm 1: keep the last ``population`` results; each child is a
mutation of the best of ``sample`` members drawn at random; the oldest member dies.

With several objectives the tournament winner is chosen by Deb's constrained domination
(non-dominated rank, then crowding distance), as in NSGA-II; infeasible members lose to any
feasible one.

Failed and rejected children (no losses: out of memory, a crash, a constraint checked before
training) are members too: they count as evaluated, so the population fills after
``population`` asks however many fail, and they age out like any member; but they lose every
tournament, so they are never parents. A tournament of failures only is won by the best finished
member of the whole population (a random sample if none has finished yet): mutants of a
candidate that ran tend to run, while a uniform sample fails as often as the space does.

``avoid_failures`` (default on) also makes the mutation learn from them, once something has
failed: the changed decision is drawn uniformly as in Real et al., but its new value with
probability proportional to the Laplace-smoothed share of the trials holding that value that ran,
(ran + 1) / (told + 2). A value every failure shares (an op the device lacks) stops being
proposed; values that ran are proposed as before. Until a failure is told, mutation is
`SearchSpace.mutate`, draw for draw.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from search_spaces import Genotype, SearchSpace

from .base import Observation, Strategy, constrained_order, register_strategy

__all__ = ["RegularizedEvolution"]


@register_strategy
class RegularizedEvolution(Strategy):
    name = "evolution"
    description = "regularised (aging) evolution with tournament selection (Real et al. 2019)"

    def __init__(
        self,
        space: SearchSpace,
        n_objectives: int = 1,
        seed: int = 0,
        population: int = 20,
        sample: int = 5,
        avoid_failures: bool = True,
    ):
        super().__init__(space, n_objectives, seed)
        if population < 2 or not 1 <= sample <= population:
            raise ValueError(
                f"need population >= 2 and 1 <= sample <= population, got {population}, {sample}"
            )
        self.population_size, self.sample_size = population, sample
        self.avoid_failures = avoid_failures
        self.population: deque[Observation] = deque()
        # (decision, value) -> [trials holding it that ran, trials holding it]; from the history
        self._runs: dict[tuple[str, Any], list[int]] = {}

    def _propose(self) -> Genotype:
        if len(self.population) < self.population_size:
            return self.space.sample(self.rng)
        picks = self.rng.choice(len(self.population), size=self.sample_size, replace=False)
        members = [self.population[int(i)] for i in picks]
        ran = [m for m in members if m[1] is not None]  # failures lose every tournament
        if not ran:
            ran = [m for m in self.population if m[1] is not None]
            if not ran:
                return self.space.sample(self.rng)
        losses = np.array([m[1] for m in ran], dtype=np.float64)
        violation = np.array([m[2] for m in ran])
        parent = ran[int(constrained_order(losses, violation)[0])][0]
        if not (self.avoid_failures and any(y is None for _, y, _ in self.history)):
            return self.space.mutate(parent, self.rng)
        return self._mutate_away_from_failures(parent)

    def _mutate_away_from_failures(self, parent: Genotype) -> Genotype:
        values = self.space.to_dims(parent)
        mutable = [d for d in self.space.dims if len(d.choices) > 1]
        for _ in range(100):  # as `SearchSpace.mutate`: distinct dims may give one genotype
            dim = mutable[int(self.rng.integers(len(mutable)))]
            others = [c for c in dim.choices if c != values[dim.name]]
            ran = np.array([self._runs.get((dim.name, c), [0, 0]) for c in others], dtype=np.float64)
            weight = (ran[:, 0] + 1.0) / (ran[:, 1] + 2.0)
            pick = others[int(self.rng.choice(len(others), p=weight / weight.sum()))]
            child = self.space.from_dims({**values, dim.name: pick})
            if child != parent:
                return child
        return self.space.mutate(parent, self.rng)

    def _count(self, obs: Observation) -> None:
        for key in self.space.to_dims(obs[0]).items():
            counts = self._runs.setdefault(key, [0, 0])
            counts[0] += obs[1] is not None
            counts[1] += 1

    def _observe(self, obs: Observation) -> None:
        self._count(obs)
        self.population.append(obs)  # failed ones too: they count as evaluated
        if len(self.population) > self.population_size:
            self.population.popleft()  # aging: the oldest dies, whatever its fitness

    def _extra_state(self) -> dict[str, Any]:
        return {
            "population": [[g.to_str(), None if y is None else list(y), v] for g, y, v in self.population]
        }

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._runs = {}
        for obs in self.history:  # restored by the base class already
            self._count(obs)
        self.population = deque(
            (self.space.from_str(g), None if y is None else tuple(y), float(v))
            for g, y, v in state["population"]
        )
