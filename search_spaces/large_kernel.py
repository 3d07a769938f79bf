"""`unireplk`: a UniRepLKNet / RepLKNet-style large-kernel ConvNet space, 1-D and 2-D.

UniRepLKNet (Ding et al., CVPR 2024) and RepLKNet (Ding et al., CVPR 2022): a few large
depthwise kernels (3 .. 31) instead of many small ones, trained with parallel small/dilated
branches that are merged into the large kernel for inference (see `lk_blocks`).

Genotype form, one field per stage ``s0 .. s{num_stages-1}``, each a 6-tuple of ints::

    unireplk@1|s0=(depth,width,kernel,rep,se,ffn)|s1=(...)|...
    e.g. unireplk@1|s0=(2,32,13,1,0,4)|s1=(1,64,31,1,1,3)|s2=(...)|s3=(...)

- depth: blocks in the stage (``depth_choices``)
- width: channels of the stage (``width_choices``; chosen per stage independently)
- kernel: depthwise kernel size (``kernel_choices``, odd)
- rep: 1 = parallel small/dilated training branches beside the large kernel, 0 = none
- se: 1 = squeeze-and-excitation after the large-kernel conv, 0 = none
- ffn: FFN expansion ratio (``ffn_ratio_choices``)

The matching dimensions are ``s{i}_depth``, ``s{i}_width``, ``s{i}_kernel``, ``s{i}_rep``,
``s{i}_se``, ``s{i}_ffn``. The same genotype builds a 1-D model for a (C, L) input and a 2-D
model for a (C, H, W) input. torch is imported only inside `build` and `reparameterize`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from .base import Dimension, SearchSpace, register_space
from .errors import ConfigError, DatasetError, GenotypeError
from .genotype import Genotype, Value

if TYPE_CHECKING:
    import torch

__all__ = ["LargeKernelSpace", "reparameterize", "STAGE_FIELDS"]

# Order of the values inside one stage's tuple (and suffixes of the dimension names).
STAGE_FIELDS: tuple[str, ...] = ("depth", "width", "kernel", "rep", "se", "ffn")


def _int_tuple(space: str, key: str, value: Any, *, odd: bool = False) -> tuple[int, ...]:
    """Options may come from TOML/YAML as lists; keep them as a non-empty tuple of positive ints."""
    items = tuple(value) if isinstance(value, list | tuple) else ()
    if not items or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in items):
        raise ConfigError(f"option {key!r} of space {space!r} must be a non-empty list of positive ints")
    if odd and any(v < 3 or v % 2 == 0 for v in items):
        raise ConfigError(
            f"option {key!r} of space {space!r} must hold odd sizes >= 3 (centred padding), got {items}"
        )
    return items


class LargeKernelSpace(SearchSpace):
    """Per-stage depth, width, large-kernel size, re-param branches, SE and FFN ratio."""

    version: ClassVar[int] = 1
    default_options: ClassVar[Mapping[str, Any]] = {
        "num_stages": 4,
        "depth_choices": (1, 2, 3),
        "width_choices": (16, 24, 32, 48, 64, 96, 128),
        "kernel_choices": (3, 5, 7, 9, 11, 13, 17, 21, 25, 31),
        "ffn_ratio_choices": (2, 3, 4),
        "stem_width": 16,
        "stem_stride": None,  # None: 2 for inputs >= 16 pixels/steps, else 1 (CPU cost)
    }
    tiny_options: ClassVar[Mapping[str, Any]] = {
        "num_stages": 2,
        "depth_choices": (1, 2),
        "width_choices": (8, 16),
        "kernel_choices": (3, 5, 7, 9, 13, 31),
        "ffn_ratio_choices": (2, 4),
        "stem_width": 8,
    }

    def dimensions(self) -> Sequence[Dimension]:
        opts, name = self.options, self.name
        stages = opts["num_stages"]
        if not isinstance(stages, int) or isinstance(stages, bool) or stages < 1:
            raise ConfigError(f"option 'num_stages' of space {name!r} must be an int >= 1, got {stages!r}")
        for key in ("stem_width",):
            if not isinstance(opts[key], int) or isinstance(opts[key], bool) or opts[key] < 1:
                raise ConfigError(f"option {key!r} of space {name!r} must be an int >= 1, got {opts[key]!r}")
        if opts["stem_stride"] not in (None, 1, 2):
            raise ConfigError(f"option 'stem_stride' of space {name!r} must be 1, 2 or none")
        per_stage: dict[str, tuple[Value, ...]] = {
            "depth": _int_tuple(name, "depth_choices", opts["depth_choices"]),
            "width": _int_tuple(name, "width_choices", opts["width_choices"]),
            "kernel": _int_tuple(name, "kernel_choices", opts["kernel_choices"], odd=True),
            "rep": (0, 1),
            "se": (0, 1),
            "ffn": _int_tuple(name, "ffn_ratio_choices", opts["ffn_ratio_choices"]),
        }
        return [Dimension(f"s{i}_{f}", per_stage[f]) for i in range(stages) for f in STAGE_FIELDS]

    @property
    def num_stages(self) -> int:
        return int(self.options["num_stages"])

    def to_dims(self, g: Genotype) -> dict[str, Value]:
        expected = [f"s{i}" for i in range(self.num_stages)]
        if list(g.keys()) != expected:
            got = ", ".join(g.keys())
            raise GenotypeError(
                f"{self.name!r} genotypes have fields {', '.join(expected)} in order; got {got}"
            )
        values: dict[str, Value] = {}
        for key, stage in g.fields:
            if not (
                isinstance(stage, tuple)
                and len(stage) == len(STAGE_FIELDS)
                and all(isinstance(v, int) for v in stage)
            ):
                raise GenotypeError(
                    f"field {key!r} must be ({','.join(STAGE_FIELDS)}) with {len(STAGE_FIELDS)} ints, "
                    f"got {stage!r}"
                )
            for f, v in zip(STAGE_FIELDS, stage, strict=True):
                values[f"{key}_{f}"] = v
        self._check(values)
        return values

    def from_dims(self, values: Mapping[str, Value]) -> Genotype:
        self._check(values)
        fields = tuple(
            (f"s{i}", tuple(values[f"s{i}_{f}"] for f in STAGE_FIELDS)) for i in range(self.num_stages)
        )
        return Genotype(self.name, self.version, fields)

    def _check(self, values: Mapping[str, Value]) -> None:
        for dim in self.dims:  # Dimension.check names the bad value and the allowed ones
            if dim.name not in values:
                raise GenotypeError(f"missing decision {dim.name!r} for space {self.name!r}")
            dim.check(values[dim.name])

    def stage_specs(self, g: Genotype) -> list[tuple[int, ...]]:
        """Per stage ``(depth, width, kernel, rep, se, ffn)`` of a valid genotype."""
        self.validate(g)
        return [tuple(int(v) for v in g[f"s{i}"]) for i in range(self.num_stages)]  # type: ignore[union-attr]

    def build(self, g: Genotype, input_shape: Sequence[int], num_classes: int) -> torch.nn.Module:
        """``LargeKernelNet`` for ``g``: (C, L) input -> 1-D model, (C, H, W) -> 2-D model."""
        specs = self.stage_specs(g)
        shape = tuple(input_shape)
        if len(shape) not in (2, 3) or not all(isinstance(s, int) and s > 0 for s in shape):
            raise DatasetError(
                f"space {self.name!r} takes inputs (C, L) or (C, H, W) of positive ints, got {shape!r}"
            )
        if not isinstance(num_classes, int) or num_classes < 1:
            raise DatasetError(f"num_classes must be a positive int, got {num_classes!r}")

        from .lk_blocks import LargeKernelNet, StageSpec  # torch only here

        return LargeKernelNet(
            ndim=len(shape) - 1,
            in_channels=shape[0],
            spatial_size=min(shape[1:]),
            num_classes=num_classes,
            stem_width=int(self.options["stem_width"]),
            stages=[StageSpec(d, w, k, bool(r), bool(s), f) for d, w, k, r, s, f in specs],
            stem_stride=self.options["stem_stride"],
        )


def reparameterize(model: torch.nn.Module) -> torch.nn.Module:
    """Merge every training branch and BN of ``model`` into its convs, in place; returns it."""
    from .lk_blocks import reparameterize as _reparameterize

    return _reparameterize(model)


register_space(
    "unireplk", LargeKernelSpace, "UniRepLKNet-style large-kernel ConvNet (re-parameterised), 1-D and 2-D"
)
