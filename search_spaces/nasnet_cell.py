"""The NASNet cell search space (Zoph et al., 2018) and the DARTS cell space (Liu et al., 2019).

One searched *normal* cell (keeps the resolution) and one *reduction* cell (halves it) are
stacked into a network: stem, N normal cells, a reduction cell, N normal cells, ... with the
filters doubled at each reduction. The macro settings (N, filters, reductions, stem) are options
of the space, not part of the genotype, so one searched cell transfers to networks of any size.

Genotype form (version 2; external tools read it)::

    darts@2|normal=((0,sep_conv_3x3,1,sep_conv_3x3),(0,sep_conv_3x3,1,sep_conv_3x3),
                    (0,skip_connect,1,sep_conv_3x3),(0,skip_connect,2,dil_conv_3x3))
           |reduce=((0,max_pool_3x3,1,max_pool_3x3),(1,max_pool_3x3,2,skip_connect),...)

(one line in practice; this is DARTS-V2, see `search_spaces.darts_genotypes`). Two fields,
``normal`` then ``reduce``; each is a tuple of exactly B blocks (B = 5 for ``nasnet``, 4 for
``darts``), and each block is ``(in1, op1, in2, op2)``:

- ``in1``/``in2`` pick the block's inputs: 0 = output of the cell two back (c_{k-2}),
  1 = output of the previous cell (c_{k-1}), 2 + j = block j of this cell (j < this block);
- ``op1``/``op2`` are op names from the space's ``ops`` option, applied to ``in1``/``in2``;
- the block's output is op1(in1) + op2(in2);
- in a reduction cell the ops applied to inputs 0 and 1 use stride 2.

The ``rules`` option says which paper's cell this is (`RULES`):

- ``"darts"`` (preset ``darts``): a block's two inputs are distinct (DARTS keeps the two
  strongest edges from *different* predecessors of each node), and the cell concatenates
  *all* its blocks (``concat = range(2, 2 + B)``), so it has B * C channels; the classifier is
  global average pooling -> linear, as in DARTS's ``NetworkCIFAR``;
- ``"nasnet"`` (preset ``nasnet``): a block may read one input twice, and the cell
  concatenates the blocks that no block consumes (the "loose ends", `loose_ends`); a ReLU
  precedes the pooling of the classifier, as in NASNet.

Canonical form: the sum of a block is commutative, so the two ``(input, op)`` pairs of a block
are stored in one order, smaller input first and, where both inputs are equal (``nasnet``
only), the op name that sorts first first. One network, one string, one id; `make_genotype`
and `NASNetCellSpace.from_str` put blocks written in the other order into this form, and
`NASNetCellSpace.validate` rejects a `Genotype` built by hand in another order.

Version 1 (before canonical order and ``rules``) still loads: ``nasnet@1`` strings are read as
the same network in canonical form (``nasnet@2``); ``darts@1`` strings were NASNet-rule cells
with DARTS's ops (inputs could repeat, only loose ends were concatenated), so a space with
``rules="nasnet"`` (e.g. ``get_space("darts", rules="nasnet")``) reads them as the same network
in canonical form, and the default ``darts`` space refuses them with a `GenotypeError` saying
so rather than building a different network under the same architecture.

Decisions (`SearchSpace.dims`): for cell c in (normal, reduce) and block b, ``{c}_b{b}_inputs``
is the input pair ``"i+j"`` (i < j for ``darts``, i <= j for ``nasnet``), ``{c}_b{b}_op1`` the
op on input i and ``{c}_b{b}_op2`` the op on input j.
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
    "RULES",
    "STEMS",
    "canonical_block",
    "cell_blocks",
    "concat_nodes",
    "loose_ends",
    "make_genotype",
]

GENOTYPE_VERSION = 2  # 2: canonical pair order, ``rules``; 1 read as described above
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
# rules -> (a block's inputs must differ, the cell concatenates "all" blocks or "loose_ends",
# ReLU before the classifier's pooling); see the module docstring
RULES: dict[str, tuple[bool, str, bool]] = {
    "darts": (True, "all", False),
    "nasnet": (False, "loose_ends", True),
}


class Block(NamedTuple):
    """One block of a cell: ``op1(in1) + op2(in2)`` (inputs indexed as in the module docstring)."""

    in1: int
    op1: str
    in2: int
    op2: str


def canonical_block(block: Sequence[Any]) -> Block:
    """The block with its two ``(input, op)`` pairs in canonical order: smaller input first,
    then (equal inputs) the op name that sorts first. Same sum, so the same network."""
    in1, op1, in2, op2 = block
    if (in2, op2) < (in1, op1):
        in1, op1, in2, op2 = in2, op2, in1, op1
    return Block(in1, op1, in2, op2)


def loose_ends(blocks: Sequence[Sequence[Any]]) -> tuple[int, ...]:
    """Indices j of the blocks that no block consumes (as input 2 + j): the ones a NASNet cell
    concatenates. Never empty: nothing can consume the last block."""
    used = {i for block in blocks for i in (block[0], block[2])}
    return tuple(j for j in range(len(blocks)) if 2 + j not in used)


def concat_nodes(blocks: Sequence[Sequence[Any]], concat: str) -> tuple[int, ...]:
    """Indices j of the blocks a cell concatenates: all of them (``"all"``, DARTS) or the loose
    ends (``"loose_ends"``, NASNet)."""
    if concat == "all":
        return tuple(range(len(blocks)))
    if concat == "loose_ends":
        return loose_ends(blocks)
    raise ValueError(f"concat must be 'all' or 'loose_ends', got {concat!r}")


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
    """``{"normal": blocks, "reduce": blocks}`` of a NASNet-cell genotype, as stored (structure
    is checked; op names, input ranges and order are not: `NASNetCellSpace.validate` does that)."""
    if g.keys() != CELL_TYPES:
        raise GenotypeError(f"a cell genotype has fields {', '.join(CELL_TYPES)} in this order; got {g}")
    return {cell: _blocks_of(cell, g[cell]) for cell in CELL_TYPES}


def _canonical_fields(cells: Mapping[str, Sequence[Block]]) -> tuple[tuple[str, Value], ...]:
    return tuple((cell, tuple(tuple(canonical_block(b)) for b in cells[cell])) for cell in CELL_TYPES)


def make_genotype(
    space_name: str, normal: Iterable[Sequence[Value]], reduce: Iterable[Sequence[Value]]
) -> Genotype:
    """A genotype from two lists of ``(in1, op1, in2, op2)`` blocks (`Block`s or plain tuples),
    each block put in canonical order (`canonical_block`).

    Only the structure is checked; pass it to the space's `validate` to check names and ranges.
    """

    def plain(blocks: Iterable[Sequence[Value]]) -> tuple[Value, ...]:
        return tuple(tuple(block) for block in blocks)  # a `Block` becomes a plain tuple

    raw = Genotype(space_name, GENOTYPE_VERSION, (("normal", plain(normal)), ("reduce", plain(reduce))))
    return Genotype(space_name, GENOTYPE_VERSION, _canonical_fields(cell_blocks(raw)))


def _int_option(space: str, key: str, value: Any, minimum: int) -> int:
    if not isinstance(value, Integral) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"option {key!r} of space {space!r} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _pair(i: int, j: int) -> str:
    return f"{i}+{j}"


class NASNetCellSpace(SearchSpace):
    """NASNet-style normal + reduction cell; presets ``nasnet`` (B=5, 13 ops, NASNet's rules)
    and ``darts`` (B=4, 7 ops, DARTS's rules). Options:

    - ``ops``: op names a block may pick (any of `OP_NAMES`);
    - ``blocks``: B, blocks per cell;
    - ``rules``: ``"darts"`` or ``"nasnet"``, see the module docstring;
    - ``cells_per_stage``: N, normal cells between reductions (DARTS's ``layers`` = 3 N + 2);
    - ``init_filters``: C of the first stage (DARTS's ``init_channels``);
    - ``stem_multiplier``: the stem has ``stem_multiplier * C`` channels (3 in DARTS);
    - ``reductions``: reduction cells, each halving the resolution and doubling C;
    - ``stem``: ``conv3x3`` or ``conv3x3_s2`` (stride 2, for images larger than ~64 px);
    - ``drop_path_prob``: ScheduledDropPath's final probability (reached at the end of training);
    - ``auxiliary``: add DARTS's auxiliary classifier after the last reduction cell
      (`NASNetNetwork.forward_with_aux`; ``forward`` returns the main logits only).

    The defaults are proxy-sized, like DARTS' search network (8 cells, C=16); DARTS's CIFAR-10
    network is ``with_options(**darts_genotypes.DARTS_CIFAR10)`` (C=36, 20 cells, auxiliary
    head, drop path 0.2).
    """

    version: ClassVar[int] = GENOTYPE_VERSION
    default_options: ClassVar[Mapping[str, Any]] = {
        "ops": NASNET_OPS,
        "blocks": 5,
        "rules": "nasnet",
        "cells_per_stage": 2,
        "init_filters": 16,
        "stem_multiplier": 3,
        "reductions": 2,
        "stem": "conv3x3",
        "drop_path_prob": 0.0,
        "auxiliary": False,
    }
    tiny_options: ClassVar[Mapping[str, Any]] = {"cells_per_stage": 1, "init_filters": 8, "reductions": 2}
    # Options that differ per preset; a name that is no preset gets `default_options`.
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "nasnet": {"ops": NASNET_OPS, "blocks": 5, "rules": "nasnet"},
        "darts": {"ops": DARTS_OPS, "blocks": 4, "rules": "darts"},
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
        for key, minimum in (
            ("blocks", 1),
            ("cells_per_stage", 1),
            ("init_filters", 1),
            ("stem_multiplier", 1),
            ("reductions", 0),
        ):
            if key in out:
                out[key] = _int_option(name, key, out[key], minimum)
        if "rules" in out and not (isinstance(out["rules"], str) and out["rules"] in RULES):
            raise UnknownNameError(f"rules of space {name!r}", out["rules"], RULES)
        if "stem" in out and not (isinstance(out["stem"], str) and out["stem"] in STEMS):
            raise UnknownNameError("stem", out["stem"], STEMS)
        if "drop_path_prob" in out:
            p = out["drop_path_prob"]
            if not isinstance(p, Real) or isinstance(p, bool) or not 0.0 <= p < 1.0:
                raise ConfigError(f"option 'drop_path_prob' of space {name!r} must be in [0, 1), got {p!r}")
            out["drop_path_prob"] = float(p)
        if "auxiliary" in out and not isinstance(out["auxiliary"], bool):
            raise ConfigError(
                f"option 'auxiliary' of space {name!r} must be true or false, got {out['auxiliary']!r}"
            )
        return out

    @property
    def distinct_inputs(self) -> bool:
        return RULES[self.options["rules"]][0]

    @property
    def concat(self) -> str:
        return RULES[self.options["rules"]][1]

    def concatenated(self, g: Genotype) -> dict[str, tuple[int, ...]]:
        """Per cell type of ``g``, the block indices j its cell concatenates: what `build`'s
        cells compute (`concat_nodes` of the space's rule), so a drawing asks here, not a copy."""
        cells = cell_blocks(self.validate(g))
        return {cell: concat_nodes(blocks, self.concat) for cell, blocks in cells.items()}

    # -- decisions -----------------------------------------------------------------------------
    def _pairs(self, b: int) -> tuple[str, ...]:
        """Input pairs block b may read, as ``"i+j"`` with i < j (darts) or i <= j (nasnet)."""
        gap = 1 if self.distinct_inputs else 0
        return tuple(_pair(i, j) for j in range(2 + b) for i in range(j + 1 - gap))

    def dimensions(self) -> list[Dimension]:
        ops = self.options["ops"]
        dims = []
        for cell in CELL_TYPES:
            for b in range(self.options["blocks"]):
                dims.append(Dimension(f"{cell}_b{b}_inputs", self._pairs(b)))
                dims.append(Dimension(f"{cell}_b{b}_op1", ops))
                dims.append(Dimension(f"{cell}_b{b}_op2", ops))
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
                if self.distinct_inputs and block.in1 == block.in2:
                    raise GenotypeError(
                        f"block {b} of {cell!r} reads input {block.in1} twice in {tuple(block)}; space "
                        f"{self.name!r} follows DARTS's rules (two distinct inputs per block); "
                        "NASNet's rules (rules='nasnet') allow it"
                    )
                values[f"{cell}_b{b}_inputs"] = _pair(block.in1, block.in2)
                values[f"{cell}_b{b}_op1"] = block.op1
                values[f"{cell}_b{b}_op2"] = block.op2
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
                f"{{normal,reduce}}_b<0..{self.options['blocks'] - 1}>_{{inputs,op1,op2}}"
            )
        checked: dict[str, Value] = {}
        for dim in self.dims:
            if dim.name not in values:
                raise GenotypeError(f"decision {dim.name!r} is missing for space {self.name!r}")
            value = values[dim.name]
            if not isinstance(value, str):
                raise GenotypeError(
                    f"{value!r} is not allowed for {dim.name!r}; allowed: {', '.join(map(str, dim.choices))}"
                )
            dim.check(value)
            checked[dim.name] = value
        cells = {}
        for cell in CELL_TYPES:
            blocks = []
            for b in range(self.options["blocks"]):
                i, j = (int(k) for k in str(checked[f"{cell}_b{b}_inputs"]).split("+"))
                op1, op2 = checked[f"{cell}_b{b}_op1"], checked[f"{cell}_b{b}_op2"]
                blocks.append(canonical_block((i, op1, j, op2)))  # i == j: ops by name
            cells[cell] = blocks
        return Genotype(self.name, self.version, _canonical_fields(cells))

    # -- text and checks -------------------------------------------------------------------------
    def from_str(self, text: str) -> Genotype:
        """Parse, put each block in canonical order and validate; reads version 1 strings as the
        module docstring says."""
        g = Genotype.from_str(text)
        if g.space == self.name and g.version == 1:
            if self.name == "darts" and self.options["rules"] != "nasnet":
                raise GenotypeError(
                    f"{text[:40]}... is a 'darts@1' genotype: before version 2, 'darts' built NASNet-rule "
                    "cells (inputs could repeat, only unconsumed blocks were concatenated), which this "
                    "space (DARTS's rules) would build differently; read it with "
                    "get_space('darts', rules='nasnet') (space_options = {rules = 'nasnet'}), which "
                    "builds the network it built before"
                )
            g = Genotype(g.space, self.version, g.fields)
        if g.space == self.name and g.version == self.version:
            g = Genotype(g.space, g.version, _canonical_fields(cell_blocks(g)))
        return self.validate(g)

    def validate(self, g: Genotype) -> Genotype:
        if isinstance(g, Genotype) and g.space == self.name and g.version == self.version:
            for cell, blocks in cell_blocks(g).items():
                for b, block in enumerate(blocks):
                    if canonical_block(block) != block:
                        raise GenotypeError(
                            f"block {b} of {cell!r} is {tuple(block)}; the canonical order puts the smaller "
                            f"input first: {tuple(canonical_block(block))} (make_genotype and from_str do this)"
                        )
        return super().validate(g)

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
            concat=self.concat,
            head_relu=RULES[self.options["rules"]][2],
            stem_multiplier=self.options["stem_multiplier"],
            auxiliary=self.options["auxiliary"],
        )


register_space(
    "nasnet",
    NASNetCellSpace,
    "NASNet cell space (Zoph et al. 2018): normal + reduction cell, B=5 blocks, 13 ops, inputs may "
    "repeat, unused blocks concatenated",
    preset_of="nasnet_cell",
)
register_space(
    "darts",
    NASNetCellSpace,
    "DARTS cell space (Liu et al. 2019): B=4 blocks of two distinct inputs, 7 ops, all blocks "
    "concatenated; published cells in search_spaces.darts_genotypes",
    preset_of="nasnet_cell",
)
