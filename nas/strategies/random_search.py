"""Random search: the baseline every NAS paper must beat (NASNet; Li & Talwalkar 2019)."""

from __future__ import annotations

from search_spaces import Genotype

from .base import Strategy, register_strategy

__all__ = ["RandomSearch"]


@register_strategy
class RandomSearch(Strategy):
    name = "random"
    description = "uniform samples of the space, no repeats"

    def _propose(self) -> Genotype:
        return self.space.sample(self.rng)
