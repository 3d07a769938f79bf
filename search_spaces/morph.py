"""Function-preserving transformations between genotypes (Net2Net, EAS): a child starts from its
parent's trained weights.

Net2Net (Chen, Goodfellow & Shlens, ICLR 2016) and EAS (Cai et al., AAAI 2018) grow a trained
network into a wider or deeper one that computes the *same function*, so training the child
continues from where the parent stopped instead of from scratch:

- Net2Wider: new units replicate randomly chosen old ones (with their BN parameters and running
  statistics); every consumer divides its incoming weights of a replicated unit by the replica
  count, so the sum it computes is unchanged;
- Net2Deeper: an inserted residual block whose last BN has scale and shift 0 adds exactly 0;
- a larger kernel is the smaller one zero-padded; a new parallel branch or op whose final BN is
  zeroed adds 0; new hidden units with zero outgoing weights add 0.

What cannot carry over (a narrowed layer, a removed block, a different op) keeps what it can
(the first units, the remaining blocks, the ops that did not change) and leaves the rest at the
child's fresh initialisation; the child is then reported as not preserving.

`inherit` fills a freshly built child model in place and says, per state-dict key, what
happened (`Inheritance`). This module imports no torch; the per-space code does, when called.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .base import SearchSpace
from .errors import GenotypeError
from .genotype import Genotype

if TYPE_CHECKING:
    import torch

__all__ = ["Inheritance", "SUPPORTED_SPACES", "describe_mutation", "inherit"]

# Space families `inherit` knows how to map (by the space class, so presets and renamed copies
# of a family work too); the names are those the error message lists.
SUPPORTED_SPACES: tuple[str, ...] = ("unireplk", "nasnet", "darts", "nb201")


@dataclass
class Inheritance:
    """What `inherit` carried from parent to child, per key of the child's ``state_dict``."""

    mutation: str  # what differs, e.g. "s1_width 16->24"; several joined by "; "; "" if identical
    copied: list[str] = field(default_factory=list)  # copied unchanged from the parent
    transformed: dict[str, str] = field(default_factory=dict)  # key -> how ("net2wider", ...)
    fresh: list[str] = field(default_factory=list)  # left at the child's fresh initialisation
    preserving: bool = True  # the child computes the parent's function (eval mode, before training)

    def to_json(self) -> dict[str, Any]:
        return {
            "mutation": self.mutation,
            "preserving": self.preserving,
            "copied": list(self.copied),
            "transformed": dict(self.transformed),
            "fresh": list(self.fresh),
        }


def describe_mutation(space: SearchSpace, parent: Genotype, child: Genotype) -> str:
    """The decisions that differ, as ``"name old->new"`` joined by ``"; "`` (``""``: identical)."""
    before, after = space.to_dims(parent), space.to_dims(child)
    return "; ".join(
        f"{d.name} {before[d.name]}->{after[d.name]}" for d in space.dims if before[d.name] != after[d.name]
    )


def _family(space: SearchSpace) -> str:
    from .large_kernel import LargeKernelSpace
    from .nasnet_cell import NASNetCellSpace
    from .nb201 import NB201Space

    if isinstance(space, LargeKernelSpace):
        return "unireplk"
    if isinstance(space, NASNetCellSpace):
        return "cells"
    if isinstance(space, NB201Space):
        return "nb201"
    raise GenotypeError(
        f"weight inheritance supports the spaces {', '.join(SUPPORTED_SPACES)}; "
        f"space {space.name!r} ({type(space).__name__}) is not one of them"
    )


def inherit(
    space: SearchSpace,
    parent: Genotype,
    parent_state: Mapping[str, torch.Tensor],
    child: Genotype,
    child_model: torch.nn.Module,
    seed: int = 0,
) -> Inheritance:
    """Fill ``child_model`` (freshly built by ``space.build(child, ...)``, possibly with an extra
    auxiliary head the parent state lacks) in place with the parent's weights wherever they
    carry over.

    ``parent_state``: the parent's trained ``state_dict()`` in training form (unireplk models not
    re-parameterised). ``seed`` drives every random choice (Net2Wider's replicas), so one pair
    and one seed always give the same child. Never raises for two valid genotypes of ``space``:
    what cannot carry over (or is missing from ``parent_state``) stays fresh and makes the
    result non-preserving. Raises `GenotypeError` for a genotype that is not of ``space`` and
    for a space it has no mapping for.
    """
    family = _family(space)
    space.validate(parent)
    space.validate(child)
    from .morph_state import StateWriter  # torch from here on

    writer = StateWriter(parent_state, child_model)
    if family == "unireplk":
        from .morph_lk import transfer_large_kernel

        transfer_large_kernel(space, parent, child, writer, seed)  # type: ignore[arg-type]
    elif family == "cells":
        from .morph_cells import transfer_cells

        transfer_cells(space, parent, child, writer)  # type: ignore[arg-type]
    else:
        from .morph_nb201 import transfer_nb201

        transfer_nb201(parent, child, writer)
    return writer.finish(describe_mutation(space, parent, child))
