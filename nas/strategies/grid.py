"""Grid search: every genotype of the space once, in a seeded random order, then done.

The exhaustive baseline of Quantune's comparison (and of any small space, e.g. a compression
policy space): `ask` walks the product of the space's decisions, as `itertools.product` orders
it, through a seeded permutation (as Optuna's `GridSampler` shuffles its grid), so a grid run
cut short is a uniform sample without repeats rather than one corner of the space. After the
last genotype it raises `SpaceExhausted`; the controller ends the run there.

Only the position is state: the permutation is a function of the seed and the space's size.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from search_spaces import ConfigError, Genotype, SearchSpace

from .base import SpaceExhausted, Strategy, register_strategy

__all__ = ["GridSearch", "MAX_GRID"]

MAX_GRID = 1_000_000  # a permutation of more points than this is not a grid anyone runs


@register_strategy
class GridSearch(Strategy):
    name = "grid"
    description = "every genotype of the space once, in a seeded random order (exhaustive baseline)"

    def __init__(self, space: SearchSpace, n_objectives: int = 1, seed: int = 0, shuffle: bool = True):
        super().__init__(space, n_objectives, seed)
        size = space.size()
        if size > MAX_GRID:
            raise ConfigError(
                f"grid search needs a small space; {space.name!r} holds ~{size:.3g} genotypes "
                f"(at most {MAX_GRID:,}); use random, evolution, tpe, nsga2 or surrogate"
            )
        self.shuffle = shuffle
        self.size = int(size)
        self.position = 0
        self._order = self._permutation(seed)

    def _permutation(self, seed: int) -> np.ndarray:
        return np.random.default_rng(seed).permutation(self.size) if self.shuffle else np.arange(self.size)

    def genotype_at(self, index: int) -> Genotype:
        """The ``index``-th point of the product of the decisions (the last one varies fastest)."""
        values = {}
        for dim in reversed(self.space.dims):
            index, k = divmod(index, len(dim.choices))
            values[dim.name] = dim.choices[k]
        return self.space.from_dims(values)

    def ask(self) -> Genotype:
        # no redraws: the walk never repeats a point; points mapping to an asked genotype (a
        # space whose decisions alias) are skipped
        seen = set(self.asked)
        while self.position < self.size:
            g = self.genotype_at(int(self._order[self.position]))
            self.position += 1
            if g.to_str() not in seen:
                self.asked.append(g.to_str())
                return g
        raise SpaceExhausted(f"the grid's {self.size} genotypes have all been proposed")

    def _propose(self) -> Genotype:  # pragma: no cover - `ask` is overridden
        return self.genotype_at(int(self._order[min(self.position, self.size - 1)]))

    def _extra_state(self) -> dict[str, Any]:
        return {"position": self.position}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])
        self._order = self._permutation(self.seed)  # the state's seed, not the constructor's
