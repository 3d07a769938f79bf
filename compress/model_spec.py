"""`ModelSpec`: what rebuilds a model's structure without a pickle, as plain data — the ``model``
part of an artefact's manifest (`nas.artefact`) and of an export's metadata (`export.formats`).

A search space's genotype (or a user's builder ``package.module:callable``), the input and classes
it was built for, and the policy as it was applied (``applied``: with the "merge" pass the
compression stage inserts for re-parameterisable models) with one record per pass.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from search_spaces import Genotype, get_space

from .errors import PolicyError
from .passes.base import PassContext
from .policy import Policy

if TYPE_CHECKING:
    from torch import nn

__all__ = ["ModelSpec"]


@dataclass(frozen=True)
class ModelSpec:
    """Everything that rebuilds a model's structure without a pickle: a search space's genotype
    (or a user's builder ``package.module:callable``), the input and classes it was built for,
    and the policy as it was applied (``applied``: with the "merge" pass the compression stage
    inserts for re-parameterisable models) with one record per pass."""

    genotype: str
    input_shape: tuple[int, ...]
    num_classes: int
    space: str | None = None
    space_options: Mapping[str, Any] = field(default_factory=dict)
    builder: str | None = None
    applied: str = ""
    records: tuple[Mapping[str, Any], ...] = ()
    builder_sha256: str | None = None  # the builder's source file when written (`user_model.portable_builder`)

    def build(self) -> nn.Module:
        """The structure of the compressed model (eval mode; weights are the builder's own): the
        genotype built (training form), the non-terminal passes of the applied policy replayed
        from the records."""
        if self.space is not None:
            space = get_space(self.space, **dict(self.space_options))
            model = space.build(space.from_str(self.genotype), self.input_shape, self.num_classes)
        elif self.builder is not None:
            from .user_model import check_builder, load_user_model

            check_builder(self.builder, self.builder_sha256)  # a changed builder file: refused
            user = load_user_model(self.builder, None, self.input_shape, self.num_classes)
            if user.kind != "builder":
                raise PolicyError(f"{self.builder!r} builds a TorchScript model: its structure cannot be rebuilt")
            model = user.module
        else:
            raise PolicyError("the model names neither a search space nor a builder")
        policy = Policy.from_json(self.applied)
        passes, records = policy.passes, list(self.records)
        if policy.terminal:  # int8 in ONNX Runtime: the torch model is the one before it
            passes, records = passes[:-1], records[:-1]
        if passes:
            ctx = PassContext(data=_ShapeOnly(self.input_shape, self.num_classes))
            model = Policy(passes).replay(model.eval(), records, ctx)
        return model.eval()

    def to_json(self) -> dict[str, Any]:
        return {
            "genotype": self.genotype,
            "genotype_id": Genotype.from_str(self.genotype).id,
            "space": self.space,
            "space_options": _plain(dict(self.space_options)),
            "builder": self.builder,
            "builder_sha256": self.builder_sha256,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "applied_policy": self.applied,
            "records": _plain(list(self.records)),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ModelSpec:
        return cls(
            genotype=str(d["genotype"]),
            input_shape=tuple(int(v) for v in d["input_shape"]),
            num_classes=int(d["num_classes"]),
            space=d.get("space"),
            space_options=dict(d.get("space_options") or {}),
            builder=d.get("builder"),
            applied=str(d.get("applied_policy") or ""),
            records=tuple(d.get("records") or ()),
            builder_sha256=d.get("builder_sha256"),
        )


@dataclass(frozen=True)
class _ShapeOnly:
    """The part of a `Dataset` that replaying float passes reads: no data is needed to replay."""

    input_shape: tuple[int, ...]
    num_classes: int




def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: list(v) if isinstance(v, tuple | set) else str(v)))
