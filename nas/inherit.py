"""Weight inheritance in search (EAS, Cai et al. 2018; Net2Net, Chen et al. 2016): a proposal one
or two decisions away from a trained trial starts from that trial's weights, carried over by
function-preserving transformations (`search_spaces.morph`), and trains ``inherit_epochs``
instead of the run's full budget.

`Lineage` is the driver's bookkeeping: which finished trials can be parents (complete, weights
kept), which parent each proposal got (memoised and saved with the controller's state, so a
resumed run makes the same children from the same weights), and the surrogate's view of a
candidate (inherited or not, epochs behind it). `load_parent` is the worker's side: the
parent's weights into a freshly built child.

A parent is the trained trial nearest to the proposal in decisions changed (at most
``max_distance``), the best by the run's first objective among equally near ones, the earliest
among equals: a rule of the store alone, so any strategy's proposals (evolution's mutants, the
surrogate's, even TPE's) inherit when a trained neighbour exists.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from search_spaces import ConfigError, Genotype, SearchSpace

if TYPE_CHECKING:
    import torch

__all__ = ["MAX_DISTANCE", "Lineage", "Parent", "default_inherit_epochs", "inherit_surrogate_options", "load_parent"]

# decisions a child may differ from its parent in: beyond two, little of the parent carries over
MAX_DISTANCE = 2


def default_inherit_epochs(epochs: int) -> int:
    """A quarter of the run's budget, rounded up: EAS trains a child briefly, not from scratch."""
    return max(1, math.ceil(epochs / 4))


@dataclass(frozen=True)
class Parent:
    """The trained trial a proposal inherits from; travels to workers as JSON text."""

    number: int
    genotype: str
    weights: str  # the parent's kept weights (safetensors, digest-checked when read)
    lineage_epochs: int  # epochs of training behind the parent's weights, its ancestors' included
    distance: int  # decisions the child differs in

    def to_text(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_text(cls, text: str) -> Parent:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class _Trained:
    number: int
    genotype: Genotype
    loss: float  # the run's first objective as a loss (lower is better)
    lineage_epochs: int
    weights: str


class Lineage:
    """The run's trained trials and the parents chosen for its proposals (driver side)."""

    def __init__(
        self,
        space: SearchSpace,
        epochs: int,
        inherit_epochs: int,
        weights_path: Callable[[Genotype, int], Path | None],
        max_distance: int = MAX_DISTANCE,
    ):
        if inherit_epochs < 1:
            raise ConfigError(f"inherit_epochs must be a positive integer, got {inherit_epochs!r}")
        self.space, self.epochs, self.inherit_epochs = space, epochs, inherit_epochs
        self.weights_path, self.max_distance = weights_path, max_distance
        self.trained: dict[str, _Trained] = {}
        self.chosen: dict[str, Parent | None] = {}  # proposal text -> its parent, fixed once opened
        self._dims: dict[str, dict[str, Any]] = {}
        # nearest parent by proposal text, valid until the next trained trial: the surrogate asks
        # `features` for every pool candidate several times per ask
        self._near: dict[str, Parent | None] = {}

    # -- what the controller tells it ----------------------------------------------------------
    def add_trained(self, number: int, genotype: Genotype, budget: int, loss: float | None, lineage_epochs: int | None) -> None:
        """A finished, complete trial: a parent candidate if its weights were kept."""
        path = self.weights_path(genotype, budget)
        if loss is None or not math.isfinite(loss) or path is None or not path.is_file():
            return
        self._near.clear()
        self.trained[genotype.to_str()] = _Trained(number, genotype, float(loss), int(lineage_epochs or budget), str(path))

    def parent_for(self, proposal: Genotype) -> Parent | None:
        """The parent of a proposal about to be opened; the same one every time it is asked."""
        key = proposal.to_str()
        if key not in self.chosen:
            self.chosen[key] = self._nearest(proposal)
        return self.chosen[key]

    def _nearest(self, proposal: Genotype) -> Parent | None:
        key = proposal.to_str()
        if key not in self._near:
            self._near[key] = self._search_nearest(proposal, key)
        return self._near[key]

    def _search_nearest(self, proposal: Genotype, key: str) -> Parent | None:
        mine = self._values(proposal)
        best: tuple[int, float, int] | None = None
        pick: _Trained | None = None
        for text, t in self.trained.items():
            if text == key:
                continue
            theirs = self._values(t.genotype)
            distance = sum(mine[k] != theirs.get(k) for k in mine)
            rank = (distance, t.loss, t.number)
            if distance <= self.max_distance and (best is None or rank < best):
                best, pick = rank, t
        if pick is None or best is None:
            return None
        return Parent(pick.number, pick.genotype.to_str(), pick.weights, pick.lineage_epochs, best[0])

    def _values(self, g: Genotype) -> dict[str, Any]:
        key = g.to_str()
        if key not in self._dims:
            self._dims[key] = self.space.to_dims(g)
        return self._dims[key]

    def budget(self, parent: Parent | None) -> int:
        return self.epochs if parent is None else self.inherit_epochs

    def record(self, parent: Parent | None) -> dict[str, Any]:
        """Fields of the trial's record: its parent and the epochs behind its weights."""
        if parent is None:
            return {"lineage_epochs": self.epochs}
        return {
            "parent": parent.number,
            "parent_genotype": parent.genotype,
            "parent_distance": parent.distance,
            "inherit_epochs": self.inherit_epochs,
            "lineage_epochs": parent.lineage_epochs + self.inherit_epochs,
        }

    # -- the surrogate's feature ---------------------------------------------------------------
    def features(self, genotype: Genotype) -> np.ndarray:
        """(inherited 0/1, log2 of 1 + epochs behind its weights) of a trial, or of a candidate as
        it would be opened now: an inherited model's accuracy after k epochs means more than a
        scratch one's after k, and the surrogate learns by how much from this feature."""
        key = genotype.to_str()
        parent = self.chosen[key] if key in self.chosen else self._nearest(genotype)
        epochs = self.epochs if parent is None else parent.lineage_epochs + self.inherit_epochs
        return np.array([float(parent is not None), math.log2(1.0 + epochs)], dtype=np.float32)

    # -- state ---------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {k: None if p is None else asdict(p) for k, p in self.chosen.items()}

    def load_state(self, saved: Mapping[str, Any]) -> None:
        self.chosen = {k: None if p is None else Parent(**p) for k, p in saved.items()}


def inherit_surrogate_options(lineage: Lineage, n_init: int) -> dict[str, Any]:
    """The surrogate strategy's defaults under inheritance (a config's own options win): mutants of
    its best trials only (a uniform sample trains from scratch, at 4x a child's cost), half the
    usual random start (``n_init``: the surrogate's default; a scratch trial costs what several
    children do, and EAS starts from one network), and the lineage features."""
    return {"mutant_fraction": 1.0, "n_init": max(2, math.ceil(n_init / 2)), "trial_features": lineage.features}


def load_parent(
    model: torch.nn.Module, space: SearchSpace, child: Genotype, parent_text: str, seed: int
) -> dict[str, float]:
    """Fill a freshly built child with its parent's weights (worker side); the metrics that say
    what carried over. A damaged parent file is refused (`nas.integrity`), not trained from."""
    from safetensors.torch import load_file

    from search_spaces.morph import inherit

    from .integrity import verify_file

    parent = Parent.from_text(parent_text)
    path = Path(parent.weights)
    if not path.is_file():
        raise ConfigError(f"the parent's weights {str(path)!r} are missing: trial {parent.number} was deleted?")
    verify_file(path, "weights")
    report = inherit(space, space.from_str(parent.genotype), load_file(str(path)), child, model, seed=seed)
    total = len(report.copied) + len(report.transformed) + len(report.fresh)
    return {
        "inherited": 1.0,
        "function_preserving": float(report.preserving),
        "inherited_share": (len(report.copied) + len(report.transformed)) / max(1, total),
    }
