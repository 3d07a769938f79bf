"""Regularised (aging) evolution, Real et al. 2019, "Regularized Evolution for Image Classifier
Architecture Search", Algorithm 1: keep the last ``population`` results; each child is a
mutation of the best of ``sample`` members drawn at random; the oldest member dies.

With several objectives the tournament winner is chosen by Deb's constrained domination
(non-dominated rank, then crowding distance), as in NSGA-II; infeasible members lose to any
feasible one.
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
        self, space: SearchSpace, n_objectives: int = 1, seed: int = 0, population: int = 20, sample: int = 5
    ):
        super().__init__(space, n_objectives, seed)
        if population < 2 or not 1 <= sample <= population:
            raise ValueError(
                f"need population >= 2 and 1 <= sample <= population, got {population}, {sample}"
            )
        self.population_size, self.sample_size = population, sample
        self.population: deque[Observation] = deque()

    def _propose(self) -> Genotype:
        if len(self.population) < self.population_size:
            return self.space.sample(self.rng)
        picks = self.rng.choice(len(self.population), size=self.sample_size, replace=False)
        members = [self.population[int(i)] for i in picks]
        losses = np.array([m[1] for m in members], dtype=np.float64)
        violation = np.array([m[2] for m in members])
        parent = members[int(constrained_order(losses, violation)[0])][0]
        return self.space.mutate(parent, self.rng)

    def _observe(self, obs: Observation) -> None:
        if obs[1] is None:
            return  # a failed child is not a member: it cannot be a parent
        self.population.append(obs)
        if len(self.population) > self.population_size:
            self.population.popleft()  # aging: the oldest dies, whatever its fitness

    def _extra_state(self) -> dict[str, Any]:
        return {"population": [[g.to_str(), list(y), v] for g, y, v in self.population]}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.population = deque(
            (self.space.from_str(g), tuple(y), float(v)) for g, y, v in state["population"]
        )
