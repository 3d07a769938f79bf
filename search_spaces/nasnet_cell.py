"""The NASNet cell search space (Zoph et al., 2018) and its DARTS preset (Liu et al., 2019).

One searched *normal* cell (keeps the resolution) and one *reduction* cell (halves it) are
stacked into a network: stem, N normal cells, a reduction cell, N normal cells, ... with the
filters doubled at each reduction. The macro settings (N, filters, reductions, stem) are options
of the space, not part of the genotype, so one searched cell transfers to networks of any size.

Genotype form (version 1; external tools read it)::

    darts@1|normal=((0,sep_conv_3x3,1,sep_conv_3x3),(0,sep_conv_3x3,1,sep_conv_3x3),
                    (1,sep_conv_3x3,0,skip_connect),(0,skip_connect,2,dil_conv_3x3))
           |reduce=((0,max_pool_3x3,1,max_pool_3x3),(2,skip_connect,1,max_pool_3x3),...)

(one line in practice). Two fields, ``normal`` then ``reduce``; each is a tuple of exactly B
blocks (B = 5 for ``nasnet``, 4 for ``darts``), and each block is ``(in1, op1, in2, op2)``:

- ``in1``/``in2`` pick the block's inputs: 0 = output of the cell two back (c_{k-2}),
  1 = output of the previous cell (c_{k-1}), 2 + j = block j of this cell (j < this block);
- ``op1``/``op2`` are op names from the space's ``ops`` option, applied to ``in1``/``in2``;
- the block's output is op1(in1) + op2(in2);
- the cell's output concatenates, on channels, the blocks that no block of the cell consumes
  (the "loose ends", `loose_ends`), so it has ``len(loose_ends(blocks)) * C`` channels. Unlike
  DARTS, which always concatenates all blocks, this is NASNet's rule;
- in a reduction cell the ops applied to inputs 0 and 1 use stride 2.

Blocks are kept exactly as written (inputs are not sorted), so the canonical string is the
genotype as given. Decisions (`SearchSpace.dims`): for cell c in (normal, reduce) and block b,
``{c}_b{b}_in1`` in range(2 + b), ``{c}_b{b}_op1`` in ops, and likewise ``in2``/``op2``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from .base import Dimension, SearchSpace, register_space
from .errors import ConfigError, DatasetError, GenotypeError, UnknownNameError
from .genotype import Genotype, Value

if TYPE_CHECKING:  # torch is imported only by `build`
    from .nasnet_model import NASNetNetwork

__all__ = [
    "Block",
    "CELL_TYPES",
    "DARTS_OPS",
    "GENOTYPE_VERSION",
    "NASNET_OPS",
    "NASNetCellSpace",
    "OP_NAMES",
    "STEMS",
    "cell_blocks",
    "loose_ends",
    "make_genotype",
]

GENOTYPE_VERSION = 1
CELL_TYPES: tuple[str, ...] = ("normal", "reduce")
# Zoph et al. 2018, Sec. 3: the 13 ops the controller picks from.
NASNET_OPS: tuple[str, ...] = (
    "identity",
    "conv_1x3_3x1",
    "conv_1x7_7x1",
    "dil_conv_3x3",
    "avg_pool_3x3",
    "max_pool_3x3",
    "max_pool_5x5",
    "max_pool_7x7",
    "conv_1x1",
    "conv_3x3",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "sep_conv_7x7",
)
# Liu et al. 2019 (without DARTS' "none", which only the continuous relaxation needs).
DARTS_OPS: tuple[str, ...] = (
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)
# Every name `nasnet_ops.OPS` builds; the names live here so the space imports no torch.
OP_NAMES: tuple[str, ...] = NASNET_OPS + tuple(op for op in DARTS_OPS if op not in NASNET_OPS)
# stem name -> stride of its 3x3 conv; the stride-2 stem suits images larger than CIFAR's.
STEMS: dict[str, int] = {"conv3x3": 1, "conv3x3_s2": 2}


class Block(NamedTuple):
    """One block of a cell: ``op1(in1) + op2(in2)`` (inputs indexed as in the module docstring)."""

    in1: int
    op1: str
    in2: int
    op2: str


def loose_ends(blocks: Sequence[Sequence[Any]]) -> tuple[int, ...]:
    """Indices j of the blocks that no block consumes (as input 2 + j): the ones the cell
    concatenates. Never empty: nothing can consume the last block."""
    used = {i for block in blocks for i in (block[0], block[2])}
    return tuple(j for j in range(len(blocks)) if 2 + j not in used)


def _blocks_of(field: str, value: Value) -> tuple[Block, ...]:
    """``value`` as a tuple of `Block`s, or `GenotypeError` saying what is malformed."""
    if not isinstance(value, tuple):
        raise GenotypeError(f"genotype field {field!r} must be a tuple of blocks, got {value!r}")
    blocks = []
    for b, block in enumerate(value):
        if not (isinstance(block, tuple) and len(block) == 4):
            raise GenotypeError(f"block {b} of {field!r} must be (in1,op1,in2,op2), got {block!r}")
        in1, op1, in2, op2 = block
        for i in (in1, in2):
            if not isinstance(i, int) or isinstance(i, bool):
                raise GenotypeError(f"block {b} of {field!r}: inputs must be ints, got {i!r} in {block!r}")
        for op in (op1, op2):
            if not isinstance(op, str):
                raise GenotypeError(f"block {b} of {field!r}: ops must be names, got {op!r} in {block!r}")
        blocks.append(Block(in1, op1, in2, op2))
    return tuple(blocks)


def cell_blocks(g: Genotype) -> dict[str, tuple[Block, ...]]:
    """``{"normal": blocks, "reduce": blocks}`` of a NASNet-cell genotype (structure is checked,
    op names and input ranges are not: `NASNetCellSpace.validate` does that)."""
    if g.keys() != CELL_TYPES:
        raise GenotypeError(f"a cell genotype has fields {', '.join(CELL_TYPES)} in this order; got {g}")
    return {cell: _blocks_of(cell, g[cell]) for cell in CELL_TYPES}


def make_genotype(
    space_name: str, normal: Iterable[Sequence[Value]], reduce: Iterable[Sequence[Value]]
) -> Genotype:
    """A genotype from two lists of ``(in1, op1, in2, op2)`` blocks (`Block`s or plain tuples).

    Only the structure is checked; pass it to the space's `validate` to check names and ranges.
    """

    def plain(blocks: Iterable[Sequence[Value]]) -> tuple[Value, ...]:
        return tuple(tuple(block) for block in blocks)  # a `Block` becomes a plain tuple

    fields = (("normal", plain(normal)), ("reduce", plain(reduce)))
    g = Genotype(space_name, GENOTYPE_VERSION, fields)
    cell_blocks(g)
    return g


def _int_option(space: str, key: str, value: Any, minimum: int) -> int:
    if not isinstance(value, Integral) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"option {key!r} of space {space!r} must be an int >= {minimum}, got {value!r}")
    return int(value)


class NASNetCellSpace(SearchSpace):
    """NASNet-style normal + reduction cell; presets ``nasnet`` (B=5, 13 ops) and ``darts``
    (B=4, 7 ops). Options:

    - ``ops``: op names a block may pick (any of `OP_NAMES`);
    - ``blocks``: B, blocks per cell;
    - ``cells_per_stage``: N, normal cells between reductions;
    - ``init_filters``: C of the first stage (the stem has 3 C, as in DARTS);
    - ``reductions``: reduction cells, each halving the resolution and doubling C;
    - ``stem``: ``conv3x3`` or ``conv3x3_s2`` (stride 2, for images larger than ~64 px);
    - ``drop_path_prob``: ScheduledDropPath's final probability (reached at the end of training).

    The defaults are proxy-sized, like DARTS' search network (8 cells, C=16); for the paper-sized
    CIFAR networks use e.g. ``with_options(cells_per_stage=6, init_filters=36, drop_path_prob=0.2)``.
    """

    version: ClassVar[int] = GENOTYPE_VERSION
    default_options: ClassVar[Mapping[str, Any]] = {
        "ops": NASNET_OPS,
        "blocks": 5,
        "cells_per_stage": 2,
        "init_filters": 16,
        "reductions": 2,
        "stem": "conv3x3",
        "drop_path_prob": 0.0,
    }
    tiny_options: ClassVar[Mapping[str, Any]] = {"cells_per_stage": 1, "init_filters": 8, "reductions": 2}
    # Options that differ per preset; a name that is no preset gets `default_options`.
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "nasnet": {"ops": NASNET_OPS, "blocks": 5},
        "darts": {"ops": DARTS_OPS, "blocks": 4},
    }

    def __init__(self, name: str = "nasnet", **options: Any):
        merged = {**self.presets.get(name, {}), **options}
        super().__init__(name, **self._checked_options(name, merged))

    @classmethod
    def _checked_options(cls, name: str, options: dict[str, Any]) -> dict[str, Any]:
        """Normalised copies of the known options; unknown keys are left for the base class."""
        out = dict(options)
        if "ops" in out:
            ops = out["ops"]
            if isinstance(ops, str) or not isinstance(ops, Iterable):
                raise ConfigError(f"option 'ops' of space {name!r} must be a list of op names, got {ops!r}")
            ops = tuple(ops)
            if not ops:
                raise ConfigError(f"option 'ops' of space {name!r} needs at least one op")
            for op in ops:
                if op not in OP_NAMES:
                    raise UnknownNameError("op", op, OP_NAMES)
            if len(set(ops)) != len(ops):
                raise ConfigError(f"option 'ops' of space {name!r} names an op twice: {ops}")
            out["ops"] = ops
        for key, minimum in (("blocks", 1), ("cells_per_stage", 1), ("init_filters", 1), ("reductions", 0)):
            if key in out:
                out[key] = _int_option(name, key, out[key], minimum)
        if "stem" in out and not (isinstance(out["stem"], str) and out["stem"] in STEMS):
            raise UnknownNameError("stem", out["stem"], STEMS)
        if "drop_path_prob" in out:
            p = out["drop_path_prob"]
            if not isinstance(p, Real) or isinstance(p, bool) or not 0.0 <= p < 1.0:
                raise ConfigError(f"option 'drop_path_prob' of space {name!r} must be in [0, 1), got {p!r}")
            out["drop_path_prob"] = float(p)
        return out

    # -- decisions -----------------------------------------------------------------------------
    def dimensions(self) -> list[Dimension]:
        ops = self.options["ops"]
        dims = []
        for cell in CELL_TYPES:
            for b in range(self.options["blocks"]):
                inputs = tuple(range(2 + b))
                for k in ("1", "2"):
                    dims.append(Dimension(f"{cell}_b{b}_in{k}", inputs))
                    dims.append(Dimension(f"{cell}_b{b}_op{k}", ops))
        return dims

    def to_dims(self, g: Genotype) -> dict[str, Value]:
        values: dict[str, Value] = {}
        want = self.options["blocks"]
        for cell, blocks in cell_blocks(g).items():
            if len(blocks) != want:
                raise GenotypeError(
                    f"{cell!r} has {len(blocks)} blocks; space {self.name!r} has blocks={want}"
                )
            for b, block in enumerate(blocks):
                values.update({f"{cell}_b{b}_{key}": v for key, v in zip(Block._fields, block, strict=True)})
        return values

    def from_dims(self, values: Mapping[str, Value]) -> Genotype:
        names = [d.name for d in self.dims]
        extra = set(values) - set(names)
        if extra:
            bad = sorted(extra)[0]
            close = difflib.get_close_matches(bad, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise GenotypeError(
                f"unknown decision {bad!r}{hint} for space {self.name!r}; decisions are "
                f"{{normal,reduce}}_b<0..{self.options['blocks'] - 1}>_{{in1,op1,in2,op2}}"
            )
        checked: dict[str, Value] = {}
        for dim in self.dims:
            if dim.name not in values:
                raise GenotypeError(f"decision {dim.name!r} is missing for space {self.name!r}")
            value = values[dim.name]
            if isinstance(value, Integral) and not isinstance(value, bool):
                value = int(value)  # numpy ints from samplers -> the int a genotype holds
            elif not isinstance(value, str):
                raise GenotypeError(
                    f"{value!r} is not allowed for {dim.name!r}; allowed: {', '.join(map(str, dim.choices))}"
                )
            dim.check(value)
            checked[dim.name] = value
        cells = {
            cell: tuple(
                tuple(checked[f"{cell}_b{b}_{key}"] for key in Block._fields)  # (in1, op1, in2, op2)
                for b in range(self.options["blocks"])
            )
            for cell in CELL_TYPES
        }
        return Genotype(self.name, self.version, tuple(cells.items()))

    # -- model ---------------------------------------------------------------------------------
    def build(self, g: Genotype, input_shape: Sequence[int], num_classes: int) -> NASNetNetwork:
        """A `NASNetNetwork` for images of ``input_shape`` = (C, H, W)."""
        shape = tuple(input_shape)
        if len(shape) != 3 or not all(isinstance(n, Integral) and n >= 1 for n in shape):
            raise DatasetError(
                f"space {self.name!r} builds image models: input_shape must be (C, H, W) of positive "
                f"ints, got {input_shape!r}"
            )
        if not isinstance(num_classes, Integral) or num_classes < 1:
            raise DatasetError(f"num_classes must be a positive int, got {num_classes!r}")
        cells = cell_blocks(self.validate(g))
        from .nasnet_model import NASNetNetwork  # torch only here

        return NASNetNetwork(
            cells["normal"],
            cells["reduce"],
            in_channels=int(shape[0]),
            num_classes=int(num_classes),
            init_filters=self.options["init_filters"],
            cells_per_stage=self.options["cells_per_stage"],
            reductions=self.options["reductions"],
            stem=self.options["stem"],
            drop_path_prob=self.options["drop_path_prob"],
        )


register_space(
    "nasnet",
    NASNetCellSpace,
    "NASNet cell space (Zoph et al. 2018): normal + reduction cell, B=5 blocks, 13 ops",
    preset_of="nasnet_cell",
)
register_space(
    "darts",
    NASNetCellSpace,
    "DARTS cell space (Liu et al. 2019): NASNet cells with B=4 blocks, 7 ops",
    preset_of="nasnet_cell",
)
