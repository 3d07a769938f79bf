"""`SearchSpace`: a declarative set of architectures, and the registry that names them.

Every space in this toolkit is described by a list of categorical `Dimension`s (a decision and
its allowed values). From that list the base class derives sampling, validation, mutation, a
one-hot encoding for surrogates and the mapping to Optuna distributions, so a concrete space
only says how its decisions map to and from a structured `Genotype` and how to `build` a model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from .errors import GenotypeError, UnknownNameError
from .genotype import Genotype, Value

if TYPE_CHECKING:  # torch is imported only by `build`
    import torch

__all__ = ["Dimension", "SearchSpace", "SpaceInfo", "register_space", "get_space", "list_spaces"]


@dataclass(frozen=True)
class Dimension:
    """One categorical decision: its name and its allowed values (ints, floats or names)."""

    name: str
    choices: tuple[Value, ...]

    def check(self, value: Value) -> None:
        if value not in self.choices:
            raise GenotypeError(
                f"{value!r} is not allowed for {self.name!r}; allowed: {', '.join(map(str, self.choices))}"
            )


class SearchSpace(ABC):
    """Base class. Subclasses set ``version``, ``default_options`` and ``tiny_options`` and
    implement `dimensions`, `to_dims`, `from_dims` and `build`.

    ``options`` are the macro settings that are not searched (filters, cells per stage, ...);
    they are recorded with a run, but they are not part of the genotype, exactly like NASNet
    transfers one searched cell to networks of several sizes.
    """

    version: ClassVar[int] = 1
    default_options: ClassVar[Mapping[str, Any]] = {}
    tiny_options: ClassVar[Mapping[str, Any]] = {}

    def __init__(self, name: str, **options: Any):
        unknown = set(options) - set(self.default_options)
        if unknown:
            raise UnknownNameError(f"option of space {name!r}", sorted(unknown)[0], self.default_options)
        self.name = name
        self.options: dict[str, Any] = {**self.default_options, **options}
        self._dims = tuple(self.dimensions())

    # -- what a subclass provides ------------------------------------------------------------
    @abstractmethod
    def dimensions(self) -> Sequence[Dimension]:
        """The decisions, in a fixed order (also the order of `encode`)."""

    @abstractmethod
    def to_dims(self, g: Genotype) -> dict[str, Value]:
        """Flatten a genotype into one value per dimension (raise `GenotypeError` if malformed)."""

    @abstractmethod
    def from_dims(self, values: Mapping[str, Value]) -> Genotype:
        """Assemble a genotype from one value per dimension."""

    @abstractmethod
    def build(self, g: Genotype, input_shape: Sequence[int], num_classes: int) -> torch.nn.Module:
        """The model for ``g``; ``input_shape`` excludes the batch, e.g. (C, H, W) or (C, L)."""

    # -- derived behaviour ---------------------------------------------------------------------
    @property
    def dims(self) -> tuple[Dimension, ...]:
        return self._dims

    def tiny(self) -> SearchSpace:
        """The same space with the small macro settings used by tests and quick runs."""
        return type(self)(self.name, **{**self.options, **self.tiny_options})

    def with_options(self, **options: Any) -> SearchSpace:
        return type(self)(self.name, **{**self.options, **options})

    def validate(self, g: Genotype) -> Genotype:
        """Return ``g`` if it belongs to this space, else raise `GenotypeError` saying why."""
        if not isinstance(g, Genotype):
            raise GenotypeError(f"expected a Genotype, got {type(g).__name__}")
        if g.space != self.name:
            raise GenotypeError(f"genotype of space {g.space!r} given to space {self.name!r}")
        if g.version != self.version:
            raise GenotypeError(f"{self.name!r} genotypes are version {self.version}, got {g.version}")
        values = self.to_dims(g)
        for dim in self._dims:
            if dim.name not in values:
                raise GenotypeError(f"genotype {g} lacks decision {dim.name!r}")
            dim.check(values[dim.name])
        if self.from_dims(values) != g:  # catches extra fields and non-canonical forms
            raise GenotypeError(f"genotype {g} is not in canonical form for space {self.name!r}")
        return g

    def from_str(self, text: str) -> Genotype:
        return self.validate(Genotype.from_str(text))

    def to_str(self, g: Genotype) -> str:
        return self.validate(g).to_str()

    def sample(self, rng: np.random.Generator) -> Genotype:
        return self.from_dims({d.name: d.choices[int(rng.integers(len(d.choices)))] for d in self._dims})

    def mutate(self, g: Genotype, rng: np.random.Generator) -> Genotype:
        """Change one decision to another of its values: always a different, valid genotype."""
        values = self.to_dims(g)
        mutable = [d for d in self._dims if len(d.choices) > 1]
        if not mutable:
            raise GenotypeError(f"space {self.name!r} has a single genotype; nothing to mutate")
        for _ in range(100):  # a few spaces map distinct dims to one genotype; retry then
            dim = mutable[int(rng.integers(len(mutable)))]
            others = [c for c in dim.choices if c != values[dim.name]]
            child = self.from_dims({**values, dim.name: others[int(rng.integers(len(others)))]})
            if child != g:
                return child
        raise GenotypeError(f"could not mutate {g} into a different genotype")

    @property
    def encoding_size(self) -> int:
        return sum(len(d.choices) for d in self._dims)

    def encode(self, g: Genotype) -> np.ndarray:
        """Fixed-length features for surrogates: one-hot of every decision, float32."""
        values = self.to_dims(g)
        out = np.zeros(self.encoding_size, dtype=np.float32)
        offset = 0
        for d in self._dims:
            out[offset + d.choices.index(values[d.name])] = 1.0
            offset += len(d.choices)
        return out

    def describe(self) -> str:
        return f"{self.name}: {len(self._dims)} decisions, ~{self.size():.3g} genotypes"

    def size(self) -> float:
        return float(np.prod([len(d.choices) for d in self._dims], dtype=np.float64))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.options})"


# -- registry ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpaceInfo:
    name: str
    description: str
    factory: Callable[..., SearchSpace]
    preset_of: str | None = None


_REGISTRY: dict[str, SpaceInfo] = {}


def register_space(
    name: str, factory: Callable[..., SearchSpace], description: str, preset_of: str | None = None
) -> None:
    """Register ``factory(name=..., **options)`` under ``name`` (a preset names its family)."""
    if name in _REGISTRY:
        raise ValueError(f"search space {name!r} is already registered")
    _REGISTRY[name] = SpaceInfo(name, description, factory, preset_of)


def get_space(name: str, **options: Any) -> SearchSpace:
    """The registered space ``name`` with its default options, updated by ``options``."""
    _load_builtin_spaces()
    if name not in _REGISTRY:
        raise UnknownNameError("search space", name, _REGISTRY)
    return _REGISTRY[name].factory(name=name, **options)


def list_spaces() -> list[SpaceInfo]:
    _load_builtin_spaces()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def _load_builtin_spaces() -> None:
    # Importing the modules registers their spaces; done lazily so `base` has no cycles.
    from . import large_kernel, nasnet_cell, nb201  # noqa: F401
