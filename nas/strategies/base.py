"""The `Strategy` seam: ask/tell, seeded, with a JSON state that can be saved and restored.

A strategy proposes genotypes and learns from their results; it never trains a model and never
touches Ray (Optuna's sampler/study split and Ray Tune's `Searcher` are the models here).
Results arrive as *losses* (one per objective, lower is better) plus a constraint violation
(0 = feasible, > 0 = by how much, summed over constraints); ``losses=None`` means the trial
failed (crashed, NaN, out of memory) and tells the strategy only to avoid that genotype.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from search_spaces import ConfigError, Genotype, SearchSpace, UnknownNameError

__all__ = [
    "Observation",
    "SpaceExhausted",
    "Strategy",
    "constrained_order",
    "get_strategy",
    "list_strategies",
    "make_strategy",
    "register_strategy",
]

# (genotype, losses or None if failed, violation >= 0)
Observation = tuple[Genotype, tuple[float, ...] | None, float]


class SpaceExhausted(Exception):
    """Raised by `Strategy.ask` when every genotype of the space has been proposed (a grid that
    is done): the controller ends the run early instead of repeating candidates."""


class Strategy(ABC):
    """Base class: keeps the observation history, the seen set and the random generator."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # proposals are redrawn this many times to avoid re-proposing a genotype already asked
    max_redraws: ClassVar[int] = 50

    @classmethod
    def options(cls) -> dict[str, Any]:
        """The options a user may set (config `strategy_options`), with their defaults."""
        return _keyword_defaults(cls.__init__, skip=("self", "space", "n_objectives", "seed"))

    def __init__(self, space: SearchSpace, n_objectives: int = 1, seed: int = 0):
        self.space = space
        self.n_objectives = n_objectives
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.history: list[Observation] = []
        self.asked: list[str] = []  # genotype strings in ask order (pending ones included)

    # -- the seam --------------------------------------------------------------------------
    def ask(self) -> Genotype:
        seen = set(self.asked)
        g = self._propose()
        for _ in range(self.max_redraws):
            if g.to_str() not in seen:
                break
            g = self._propose()
        self.asked.append(g.to_str())
        return g

    def tell(self, genotype: Genotype, losses: Sequence[float] | None, violation: float = 0.0) -> None:
        if losses is not None and len(losses) != self.n_objectives:
            raise ValueError(f"expected {self.n_objectives} losses, got {len(losses)}")
        if genotype.to_str() not in self.asked:  # e.g. a trial re-run after resume
            self.asked.append(genotype.to_str())
        obs: Observation = (genotype, None if losses is None else tuple(map(float, losses)), float(violation))
        self.history.append(obs)
        self._observe(obs)

    @abstractmethod
    def _propose(self) -> Genotype:
        """One proposal (may repeat an earlier one; `ask` redraws)."""

    def _observe(self, obs: Observation) -> None:  # noqa: B027 - optional hook
        """Update internal state after `tell` appended ``obs`` to the history."""

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: restoring it continues the exact same sequence."""
        return {
            "strategy": self.name,
            "seed": self.seed,
            "rng": self.rng.bit_generator.state,
            "asked": list(self.asked),
            "history": [[g.to_str(), None if y is None else list(y), v] for g, y, v in self.history],
            **self._extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("strategy") != self.name:
            raise ValueError(f"state of strategy {state.get('strategy')!r} given to {self.name!r}")
        self.seed = state["seed"]
        self.rng.bit_generator.state = state["rng"]
        self.asked = list(state["asked"])
        self.history = [
            (self.space.from_str(g), None if y is None else tuple(y), float(v))
            for g, y, v in state["history"]
        ]
        self._load_extra_state(state)

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        pass

    # -- helpers for subclasses ------------------------------------------------------------------
    def finished(self) -> list[tuple[Genotype, tuple[float, ...], float]]:
        """Observations that produced losses (failed trials left out)."""
        return [(g, y, v) for g, y, v in self.history if y is not None]


_REGISTRY: dict[str, type[Strategy]] = {}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    _REGISTRY[cls.name] = cls
    return cls


def make_strategy(
    name: str, space: SearchSpace, n_objectives: int = 1, seed: int = 0, **params: Any
) -> Strategy:
    cls = get_strategy(name)
    _check_options(name, cls.options(), params)
    try:
        return cls(space, n_objectives=n_objectives, seed=seed, **params)
    except (TypeError, ValueError) as exc:  # a value the type check let through, e.g. pool=0
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"strategy {name!r}: {exc}") from None


def _keyword_defaults(func: Any, skip: Sequence[str] = ()) -> dict[str, Any]:
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {
        k: p.default
        for k, p in inspect.signature(func).parameters.items()
        if k not in skip and p.kind in kinds
    }


def _check_options(name: str, allowed: dict[str, Any], given: dict[str, Any]) -> None:
    """Unknown option names name the valid ones; a value must have its default's type (an int
    for an int, a number for a float, a bool for a bool) so a typo fails now, not at ask 11."""
    for key, value in given.items():
        if not allowed:
            raise ConfigError(f"strategy {name!r} takes no options, got {key!r}")
        if key not in allowed:
            raise UnknownNameError(f"option of strategy {name!r}", key, allowed)
        default = allowed[key]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        elif isinstance(default, str):
            ok = isinstance(value, str)
        else:  # None or no default: the strategy checks it
            ok = True
        if not ok:
            kind = type(default).__name__
            raise ConfigError(
                f"option {key!r} of strategy {name!r} must be {'an' if kind[0] in 'aeiou' else 'a'} {kind} "
                f"(default {default!r}), got {value!r}"
            )


def get_strategy(name: str) -> type[Strategy]:
    _load_builtin()
    if name not in _REGISTRY:
        raise UnknownNameError("strategy", name, _REGISTRY)
    return _REGISTRY[name]


def list_strategies() -> list[tuple[str, str]]:
    _load_builtin()
    return [(k, _REGISTRY[k].description) for k in sorted(_REGISTRY)]


def _load_builtin() -> None:
    from . import evolution, grid, optuna_samplers, random_search, surrogate_guided  # noqa: F401


def constrained_order(
    losses: np.ndarray, violation: np.ndarray, weights: np.ndarray | None = None
) -> np.ndarray:
    """Indices from best to worst by Deb's constrained domination: feasible first (then by
    non-dominated rank and crowding, or by ``losses @ weights`` if weights are given),
    infeasible after them by increasing violation."""
    from ..pareto import crowding_distance, nondominated_rank

    if weights is not None:
        return np.lexsort((losses @ weights, violation))  # last key sorts first
    rank = nondominated_rank(losses)
    crowd = np.zeros(len(losses))
    for r in np.unique(rank):
        members = np.flatnonzero(rank == r)
        crowd[members] = crowding_distance(losses[members])
    return np.lexsort((-crowd, rank, violation))
