"""The machinery `search_spaces.morph` shares between spaces: unit maps and the state writer.

A `UnitMap` says where each unit (channel, hidden unit) of one child layer comes from in the
parent layer; the same map fixes a layer's outgoing rows and its consumers' incoming columns,
which is all Net2Wider needs. A `StateWriter` fills the child's ``state_dict`` tensors in place
and records, per key, whether it was copied, transformed (how) or left fresh, and whether the
child still computes the parent's function.

Imported only when `inherit` runs (torch at import).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .morph import Inheritance

__all__ = ["BN_STATS", "NEW", "MissingWeights", "StateWriter", "UnitMap", "fit_kernel", "take_units"]

NEW = -1  # `UnitMap.source` of a unit with no parent: fresh incoming weights, zero outgoing ones
BN_STATS: tuple[str, ...] = ("weight", "bias", "running_mean", "running_var")


class MissingWeights(Exception):
    """The parent state lacks a key, or holds a shape that does not map onto the child's."""


@dataclass(frozen=True)
class UnitMap:
    """``source[j]``: the parent unit child unit j copies, or `NEW`; ``parent_size`` units in all."""

    source: tuple[int, ...]
    parent_size: int
    kept_by: str = "first"  # how a narrowed map chose its units (for the report)

    @classmethod
    def identity(cls, n: int) -> UnitMap:
        return cls(tuple(range(n)), n)

    @classmethod
    def net2wider(cls, n_parent: int, n_child: int, rng: np.random.Generator) -> UnitMap:
        """Net2Wider: the first ``n_parent`` units, then replicas of randomly chosen ones.
        Narrower: the first ``n_child`` units (a residual stream's channels have no one owner
        whose weights would rank them)."""
        if n_child <= n_parent:
            return cls(tuple(range(n_child)), n_parent)
        extra = rng.integers(n_parent, size=n_child - n_parent)
        return cls(tuple(range(n_parent)) + tuple(int(i) for i in extra), n_parent)

    @classmethod
    def extended(cls, n_parent: int, n_child: int, importance: torch.Tensor | None = None) -> UnitMap:
        """Hidden units: new ones fresh with zero outgoing weights (no replicas, so no symmetry
        to break); narrower keeps the ``n_child`` most important (largest L1 of outgoing
        weights), in their order."""
        if n_child >= n_parent:
            return cls(tuple(range(n_parent)) + (NEW,) * (n_child - n_parent), n_parent)
        if importance is None:
            return cls(tuple(range(n_child)), n_parent)
        keep = torch.argsort(importance, descending=True, stable=True)[:n_child]
        return cls(tuple(sorted(int(i) for i in keep)), n_parent, "L1")

    @property
    def counts(self) -> np.ndarray:
        """Child units per parent unit (0: the parent unit was dropped)."""
        return np.bincount([s for s in self.source if s != NEW], minlength=self.parent_size)

    @property
    def is_identity(self) -> bool:
        return self.source == tuple(range(self.parent_size))

    @property
    def drops_units(self) -> bool:
        return bool((self.counts == 0).any())

    def out_how(self) -> str:
        parts = []
        if (self.counts > 1).any():
            parts.append("net2wider")
        if self.drops_units:
            parts.append(f"narrowed {self.parent_size}->{len(self.source)} ({self.kept_by} kept)")
        if NEW in self.source:
            parts.append("new units fresh")
        return ", ".join(parts)

    def in_how(self) -> str:
        parts = []
        if (self.counts > 1).any():
            parts.append("net2wider: inputs divided by replica count")
        if self.drops_units:
            parts.append("inputs of dropped units removed")
        if NEW in self.source:
            parts.append("zero weights from new units")
        return ", ".join(parts)


def take_units(t: torch.Tensor, out: UnitMap | None = None, in_: UnitMap | None = None) -> torch.Tensor:
    """Rows of ``t`` by ``out`` (new rows 0) and columns by ``in_``, each column divided by its
    parent unit's replica count (new columns 0): Net2Wider on both sides of a weight."""
    if in_ is not None and not in_.is_identity:
        src = torch.tensor([max(s, 0) for s in in_.source])
        counts = in_.counts
        scale = torch.tensor([1.0 / counts[s] if s != NEW else 0.0 for s in in_.source], dtype=t.dtype)
        t = t.index_select(1, src) * scale.reshape(1, -1, *([1] * (t.dim() - 2)))
    if out is not None and not out.is_identity:
        t = t.index_select(0, torch.tensor([max(s, 0) for s in out.source])).clone()
        new = [j for j, s in enumerate(out.source) if s == NEW]
        t[new] = 0
    return t


def fit_kernel(t: torch.Tensor, size: Sequence[int]) -> tuple[torch.Tensor, str, bool]:
    """Centre ``t``'s spatial dims (2..) in ``size``: zero-pad a smaller kernel (the same
    function: the extra taps read 0 and "same" padding keeps the output grid), crop a larger
    one. Returns the tensor, how ("" if unchanged) and whether it is exact (nothing non-zero cropped)."""
    old = tuple(t.shape[2:])
    new = tuple(size)
    if old == new:
        return t, "", True
    if len(old) != len(new) or any((a - b) % 2 for a, b in zip(old, new, strict=True)):
        raise MissingWeights(f"kernel {old} does not centre in {new}")
    exact = True
    for axis, (a, b) in enumerate(zip(old, new, strict=True), start=2):
        if b > a:
            pad_shape = list(t.shape)
            pad_shape[axis] = (b - a) // 2
            zeros = t.new_zeros(pad_shape)
            t = torch.cat([zeros, t, zeros], dim=axis)
        elif b < a:
            kept = t.narrow(axis, (a - b) // 2, b)
            border = list(t.shape)
            border[axis] = (a - b) // 2
            exact = exact and torch.equal(
                t, torch.cat([t.new_zeros(border), kept, t.new_zeros(border)], axis)
            )
            t = kept
    grew = all(b >= a for a, b in zip(old, new, strict=True))
    text = "x".join(map(str, old)) + "->" + "x".join(map(str, new))
    return t, (f"zero-pad kernel {text}" if grew else f"crop kernel {text}"), exact


class StateWriter:
    """Writes the child's state-dict tensors in place and records what each one got.

    Writes inside `unit` are staged and land only if the whole unit succeeds: a unit whose
    parent weights are missing or malformed stays fresh (and makes the child non-preserving)
    instead of half-written.
    """

    def __init__(self, parent_state: Mapping[str, torch.Tensor], child_model: nn.Module):
        self.parent = parent_state
        self.model = child_model
        self.child = child_model.state_dict()  # detached tensors sharing the model's storage
        self.copied: dict[str, None] = {}  # ordered set
        self.transformed: dict[str, str] = {}
        self.reasons: list[str] = []  # why the child is not preserving ([]: it is)
        # fresh keys that do not change the function (a new block behind a zeroed BN, a head
        # `forward` never runs); any other key left fresh makes the child non-preserving
        self.harmless_fresh: set[str] = set()
        self._staged: dict[str, tuple[torch.Tensor, str]] | None = None

    # -- reading -----------------------------------------------------------------------------
    def child_keys(self, prefix: str) -> list[str]:
        return [k for k in self.child if k.startswith(prefix + ".")]

    def has_parent(self, key: str) -> bool:
        return key in self.parent

    def parent_tensor(self, key: str) -> torch.Tensor:
        """The parent's tensor, on the CPU; floats in float64 so folds and divisions add no error."""
        if key not in self.parent:
            raise MissingWeights(f"the parent state has no {key!r}")
        t = self.parent[key].detach().cpu()
        return t.to(torch.float64) if t.is_floating_point() else t

    def fresh(self, key: str) -> torch.Tensor:
        t = self.child[key].detach().cpu()
        return t.to(torch.float64) if t.is_floating_point() else t.clone()

    def module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def mapped(
        self,
        key: str,
        out: UnitMap | None = None,
        in_: UnitMap | None = None,
        *,
        source: str | None = None,
        kernel: bool = False,
        judge_crop: bool = True,
    ) -> tuple[torch.Tensor, str]:
        """The parent's ``source`` (default ``key``) mapped onto the child's ``key``: units by
        ``out``/``in_`` (new rows keep the child's fresh values), spatial dims centred if
        ``kernel``. Returns the tensor and how (``""``: an unchanged copy). A crop that drops
        non-zero taps makes the child non-preserving, unless the caller judges that itself
        (``judge_crop=False``: an op whose change it weighs as a whole)."""
        t = take_units(self.parent_tensor(source or key), out, in_)
        target = self.child[key]
        hows = [out.out_how() if out else "", in_.in_how() if in_ else ""]
        if kernel and t.dim() > 2:
            t, how, exact = fit_kernel(t, target.shape[2:])
            hows.append(how)
            if not exact and judge_crop:
                self.not_preserving(f"{key}: {how} drops non-zero taps")
        if tuple(t.shape) != tuple(target.shape):
            raise MissingWeights(
                f"{source or key} {tuple(t.shape)} does not map onto {key} {tuple(target.shape)}"
            )
        if out is not None and NEW in out.source:
            new = [j for j, s in enumerate(out.source) if s == NEW]
            t[new] = self.fresh(key)[new]
        return t, ", ".join(h for h in hows if h)

    def bn_params(
        self, prefix: str, out: UnitMap | None = None, source: str | None = None
    ) -> dict[str, tuple[torch.Tensor, str]]:
        """A BatchNorm's affine parameters and running statistics, mapped by ``out``."""
        return {
            name: self.mapped(f"{prefix}.{name}", out, source=f"{source or prefix}.{name}")
            for name in BN_STATS
            if f"{prefix}.{name}" in self.child
        }

    # -- writing -----------------------------------------------------------------------------
    def write(self, key: str, value: torch.Tensor, how: str = "") -> None:
        """Give child ``key`` this value; ``how`` empty means an unchanged copy of the parent's."""
        if key not in self.child:
            raise KeyError(f"the child model has no {key!r}")  # a bug in the caller, not bad input
        if tuple(value.shape) != tuple(self.child[key].shape):
            raise MissingWeights(f"{key}: {tuple(value.shape)} given for {tuple(self.child[key].shape)}")
        if self._staged is not None:
            self._staged[key] = (value, how)
        else:
            self._commit(key, value, how)

    def write_mapped(
        self, key: str, out: UnitMap | None = None, in_: UnitMap | None = None, **kw: object
    ) -> None:
        self.write(key, *self.mapped(key, out, in_, **kw))  # type: ignore[arg-type]

    def copy(self, key: str, source: str | None = None) -> None:
        self.write(key, self.parent_tensor(source or key))

    def copy_all(self, prefix: str, source: str | None = None) -> None:
        """Every child key under ``prefix`` from the same suffix under ``source`` (default: same)."""
        for key in self.child_keys(prefix):
            self.copy(key, None if source is None else source + key[len(prefix) :])

    def write_bn(
        self, prefix: str, params: Mapping[str, tuple[torch.Tensor, str]], source: str | None = None
    ) -> None:
        for name, (value, how) in params.items():
            self.write(f"{prefix}.{name}", value, how)
        if f"{prefix}.num_batches_tracked" in self.child:
            self.copy(f"{prefix}.num_batches_tracked", f"{source or prefix}.num_batches_tracked")

    def map_bn(self, prefix: str, out: UnitMap | None = None, source: str | None = None) -> None:
        self.write_bn(prefix, self.bn_params(prefix, out, source), source)

    def zero_bn(self, prefix: str, how: str) -> None:
        """BN scale and shift 0: the output is exactly 0 whatever the input and running stats."""
        for name in ("weight", "bias"):
            self.write(f"{prefix}.{name}", torch.zeros_like(self.fresh(f"{prefix}.{name}")), how)

    def not_preserving(self, reason: str) -> None:
        self.reasons.append(reason)

    def fresh_is_harmless(self, prefix: str) -> None:
        """Keys under ``prefix`` may stay fresh without changing the function."""
        self.harmless_fresh.update(self.child_keys(prefix))

    @contextmanager
    def unit(self, what: str, in_function: bool = True) -> Iterator[None]:
        """Stage the writes of one module; drop them all (the module stays fresh) if the
        parent's weights for it are missing or do not fit. ``in_function=False``: a module
        ``forward`` never runs (an auxiliary head), whose loss does not matter to preservation."""
        outer, self._staged = self._staged, {}
        try:
            yield
        except MissingWeights as exc:
            self._staged = outer
            if in_function:
                self.not_preserving(f"{what} left fresh: {exc}")
            return
        staged, self._staged = self._staged, outer
        for key, (value, how) in staged.items():
            self.write(key, value, how)

    def _commit(self, key: str, value: torch.Tensor, how: str) -> None:
        target = self.child[key]
        with torch.no_grad():
            target.copy_(value.to(device=target.device, dtype=target.dtype))
        self.copied.pop(key, None)
        self.transformed.pop(key, None)
        if how:
            self.transformed[key] = how
        else:
            self.copied[key] = None

    def finish(self, mutation: str) -> Inheritance:
        done = self.copied.keys() | self.transformed.keys()
        fresh = [k for k in self.child if k not in done]
        unexplained = [k for k in fresh if k not in self.harmless_fresh]
        if unexplained:  # a safety net: a key no rule covered cannot be vouched for
            self.not_preserving(f"{len(unexplained)} keys left fresh, e.g. {unexplained[0]!r}")
        return Inheritance(
            mutation=mutation,
            copied=[k for k in self.child if k in self.copied],  # in the state dict's order
            transformed={k: self.transformed[k] for k in self.child if k in self.transformed},
            fresh=fresh,
            preserving=not self.reasons,
        )
