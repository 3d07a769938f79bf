"""DARTS's genotype notation, and published cells of the DARTS (and NASNet) cell spaces by name.

DARTS (Liu et al. 2019, github.com/quark0/darts, ``cnn/genotypes.py``) and the methods built on
its code write a cell pair as a Python expression::

    Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ...], normal_concat=[2, 3, 4, 5],
             reduce=[('max_pool_3x3', 0), ...], reduce_concat=range(2, 6))

``normal`` lists two ``(op, input)`` pairs per intermediate node, node i's pairs at 2i and 2i+1;
inputs are numbered as in `search_spaces.nasnet_cell` (0 = c_{k-2}, 1 = c_{k-1}, 2 + j = node j),
so node i is our block i. `from_darts_str` reads that text without evaluating it (Python's
``ast`` parses it and only literals, lists, tuples and ``range(a, b)`` are accepted) into a
canonical genotype of a cell space, checking that the ``concat`` lists are the space's rule (all
nodes for ``rules="darts"``, the unconsumed ones for ``rules="nasnet"``); `to_darts_str` writes
one back (pairs in canonical order, so the text may list a node's pairs in another order than
the paper's file: the same cell).

`GENOTYPES` holds published cells in that notation, copied from the authors' repositories;
`named_genotype` returns one as a genotype, `build_named` builds it, and ``darts_v1``,
``darts_v2``, ``pc_darts``, ``pdarts`` are builders for ``nas-run compress --model
search_spaces.darts_genotypes:darts_v2`` (DARTS's CIFAR-10 network, `DARTS_CIFAR10`, without
the auxiliary head unless asked: it only serves training, and `forward` never runs it).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .base import SearchSpace, get_space
from .errors import GenotypeError, UnknownNameError
from .genotype import Genotype
from .nasnet_cell import CELL_TYPES, Block, NASNetCellSpace, canonical_block, cell_blocks, concat_nodes

if TYPE_CHECKING:
    from .nasnet_model import NASNetNetwork

__all__ = [
    "DARTS_CIFAR10",
    "GENOTYPES",
    "NamedGenotype",
    "build_named",
    "darts_v1",
    "darts_v2",
    "from_darts_str",
    "named_genotype",
    "pc_darts",
    "pdarts",
    "to_darts_str",
]

# DARTS's CIFAR-10 evaluation network (train.py: init_channels 36, layers 20, auxiliary head,
# drop_path_prob 0.2): 20 cells = 3 stages of 6 normal cells + 2 reduction cells.
DARTS_CIFAR10: Mapping[str, Any] = {
    "init_filters": 36,
    "cells_per_stage": 6,
    "stem_multiplier": 3,
    "reductions": 2,
    "auxiliary": True,
    "drop_path_prob": 0.2,
}

# DARTS's names for ops that nas-run spells differently (same module: see nasnet_ops)
_FROM_DARTS = {"conv_7x1_1x7": "conv_1x7_7x1"}
_TO_DARTS = {v: k for k, v in _FROM_DARTS.items()} | {"identity": "skip_connect"}
_MAX_TEXT = 20_000  # a cell pair is ~600 characters; longer text is not a genotype


@dataclass(frozen=True)
class NamedGenotype:
    """A published cell pair: DARTS notation as its authors wrote it, the space it belongs to,
    where it comes from and, if the paper reports one for DARTS's CIFAR-10 network, its
    parameter count without the auxiliary head."""

    name: str
    space: str
    text: str
    source: str
    params_m: float | None = None


GENOTYPES: dict[str, NamedGenotype] = {
    g.name: g
    for g in (
        NamedGenotype(
            "DARTS_V1",
            "darts",
            "Genotype(normal=[('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 0), "
            "('sep_conv_3x3', 1), ('skip_connect', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), "
            "('skip_connect', 2)], normal_concat=[2, 3, 4, 5], reduce=[('max_pool_3x3', 0), "
            "('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 0), ('max_pool_3x3', 0), "
            "('skip_connect', 2), ('skip_connect', 2), ('avg_pool_3x3', 0)], reduce_concat=[2, 3, 4, 5])",
            # Table 1 gives one 3.3M for both orders; built at DARTS's setting this cell has 3.17M
            "DARTS first order (Liu et al. 2019); quark0/darts cnn/genotypes.py",
        ),
        NamedGenotype(
            "DARTS_V2",
            "darts",
            "Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), "
            "('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), "
            "('dil_conv_3x3', 2)], normal_concat=[2, 3, 4, 5], reduce=[('max_pool_3x3', 0), "
            "('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1), ('max_pool_3x3', 0), "
            "('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)], reduce_concat=[2, 3, 4, 5])",
            "DARTS second order (Liu et al. 2019, Table 1: 3.3M); quark0/darts cnn/genotypes.py",
            3.3,
        ),
        NamedGenotype(
            "PC_DARTS_cifar",
            "darts",
            "Genotype(normal=[('sep_conv_3x3', 1), ('skip_connect', 0), ('sep_conv_3x3', 0), "
            "('dil_conv_3x3', 1), ('sep_conv_5x5', 0), ('sep_conv_3x3', 1), ('avg_pool_3x3', 0), "
            "('dil_conv_3x3', 1)], normal_concat=range(2, 6), reduce=[('sep_conv_5x5', 1), "
            "('max_pool_3x3', 0), ('sep_conv_5x5', 1), ('sep_conv_5x5', 2), ('sep_conv_3x3', 0), "
            "('sep_conv_3x3', 3), ('sep_conv_3x3', 1), ('sep_conv_3x3', 2)], reduce_concat=range(2, 6))",
            "PC-DARTS searched on CIFAR-10 (Xu et al. 2020, Table 1: 3.6M); yuhuixu1993/PC-DARTS genotypes.py",
            3.6,
        ),
        NamedGenotype(
            "PC_DARTS_image",
            "darts",
            "Genotype(normal=[('skip_connect', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 0), "
            "('skip_connect', 1), ('sep_conv_3x3', 1), ('sep_conv_3x3', 3), ('sep_conv_3x3', 1), "
            "('dil_conv_5x5', 4)], normal_concat=range(2, 6), reduce=[('sep_conv_3x3', 0), "
            "('skip_connect', 1), ('dil_conv_5x5', 2), ('max_pool_3x3', 1), ('sep_conv_3x3', 2), "
            "('sep_conv_3x3', 1), ('sep_conv_5x5', 0), ('sep_conv_3x3', 3)], reduce_concat=range(2, 6))",
            "PC-DARTS searched on ImageNet (Xu et al. 2020; 5.3M in DARTS's ImageNet network, which "
            "nas-run does not build); yuhuixu1993/PC-DARTS genotypes.py",
        ),
        NamedGenotype(
            "PDARTS",
            "darts",
            "Genotype(normal=[('skip_connect', 0), ('dil_conv_3x3', 1), ('skip_connect', 0), "
            "('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('sep_conv_3x3', 3), ('sep_conv_3x3', 0), "
            "('dil_conv_5x5', 4)], normal_concat=range(2, 6), reduce=[('avg_pool_3x3', 0), "
            "('sep_conv_5x5', 1), ('sep_conv_3x3', 0), ('dil_conv_5x5', 2), ('max_pool_3x3', 0), "
            "('dil_conv_3x3', 1), ('dil_conv_3x3', 1), ('dil_conv_5x5', 3)], reduce_concat=range(2, 6))",
            "P-DARTS (Chen et al. 2019, Table 1: 3.4M); chenxin061/pdarts genotypes.py",
            3.4,
        ),
        # NASNet-rule cells, as DARTS's genotypes.py transcribes them (the papers' own networks
        # differ in their macro settings, so no parameter count is claimed for these)
        NamedGenotype(
            "NASNet",
            "nasnet",
            "Genotype(normal=[('sep_conv_5x5', 1), ('sep_conv_3x3', 0), ('sep_conv_5x5', 0), "
            "('sep_conv_3x3', 0), ('avg_pool_3x3', 1), ('skip_connect', 0), ('avg_pool_3x3', 0), "
            "('avg_pool_3x3', 0), ('sep_conv_3x3', 1), ('skip_connect', 1)], normal_concat=[2, 3, 4, 5, 6], "
            "reduce=[('sep_conv_5x5', 1), ('sep_conv_7x7', 0), ('max_pool_3x3', 1), ('sep_conv_7x7', 0), "
            "('avg_pool_3x3', 1), ('sep_conv_5x5', 0), ('skip_connect', 3), ('avg_pool_3x3', 2), "
            "('sep_conv_3x3', 2), ('max_pool_3x3', 1)], reduce_concat=[4, 5, 6])",
            "NASNet-A (Zoph et al. 2018) as transcribed in quark0/darts cnn/genotypes.py",
        ),
        NamedGenotype(
            "AmoebaNet",
            "nasnet",
            "Genotype(normal=[('avg_pool_3x3', 0), ('max_pool_3x3', 1), ('sep_conv_3x3', 0), "
            "('sep_conv_5x5', 2), ('sep_conv_3x3', 0), ('avg_pool_3x3', 3), ('sep_conv_3x3', 1), "
            "('skip_connect', 1), ('skip_connect', 0), ('avg_pool_3x3', 1)], normal_concat=[4, 5, 6], "
            "reduce=[('avg_pool_3x3', 0), ('sep_conv_3x3', 1), ('max_pool_3x3', 0), ('sep_conv_7x7', 2), "
            "('sep_conv_7x7', 0), ('avg_pool_3x3', 1), ('max_pool_3x3', 0), ('max_pool_3x3', 1), "
            "('conv_7x1_1x7', 0), ('sep_conv_3x3', 5)], reduce_concat=[3, 4, 6])",
            "AmoebaNet-A (Real et al. 2019) as transcribed in quark0/darts cnn/genotypes.py",
        ),
    )
}


# -- reading ---------------------------------------------------------------------------------
def _literal(node: ast.AST, what: str) -> Any:
    """The value of a literal node: str, int, list/tuple of them, or ``range(a[, b])``."""
    if (
        isinstance(node, ast.Constant)
        and isinstance(node.value, str | int)
        and not isinstance(node.value, bool)
    ):
        return node.value
    if isinstance(node, ast.List | ast.Tuple):
        return [_literal(e, what) for e in node.elts]
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "range"
        and not node.keywords
        and 1 <= len(node.args) <= 2
    ):
        bounds = [_literal(a, what) for a in node.args]
        if all(isinstance(b, int) for b in bounds):
            return list(range(*bounds))
    raise GenotypeError(
        f"{what}: only string and int literals, lists, tuples and range(a, b) are read, got "
        f"{ast.unparse(node)[:60]!r}"
    )


def _called_name(func: ast.expr) -> str | None:
    """``Genotype`` for ``Genotype(...)`` and ``genotypes.Genotype(...)``."""
    if isinstance(func, ast.Name):
        return func.id
    return func.attr if isinstance(func, ast.Attribute) else None


def _parse_call(text: str) -> dict[str, Any]:
    """``Genotype(...)``'s four fields as plain lists, or `GenotypeError`."""
    form = "Genotype(normal=[(op, input), ...], normal_concat=[...], reduce=[...], reduce_concat=[...])"
    if not isinstance(text, str) or len(text) > _MAX_TEXT:
        raise GenotypeError(f"DARTS notation is a string like {form}, got {str(text)[:60]!r}")
    if re.match(r"[A-Za-z_][A-Za-z0-9_\-]*@\d+", text.strip()):
        raise GenotypeError(
            f"{text[:40]!r} is a nas-run genotype string, not DARTS notation: read it with the space's from_str"
        )
    try:
        tree = ast.parse(text.strip(), mode="eval")  # parsing only: nothing is evaluated
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise GenotypeError(f"cannot read DARTS notation {text[:60]!r}: {exc}") from None
    call = tree.body
    if not (isinstance(call, ast.Call) and _called_name(call.func) == "Genotype"):
        raise GenotypeError(f"DARTS notation looks like {form}, got {text[:60]!r}")
    keys = ("normal", "normal_concat", "reduce", "reduce_concat")
    if len(call.args) > len(keys):
        raise GenotypeError(
            f"Genotype(...) has 4 fields ({', '.join(keys)}), got {len(call.args)} in {text[:60]!r}"
        )
    fields = dict(zip(keys, call.args, strict=False))
    for kw in call.keywords:
        if kw.arg not in keys:
            raise GenotypeError(str(UnknownNameError("Genotype field", kw.arg, keys)))
        if kw.arg in fields:
            raise GenotypeError(f"Genotype field {kw.arg!r} is given twice in {text[:60]!r}")
        fields[kw.arg] = kw.value
    missing = [k for k in keys if k not in fields]
    if missing:
        raise GenotypeError(f"Genotype(...) lacks {', '.join(missing)} in {text[:60]!r}")
    return {k: _literal(fields[k], k) for k in keys}


def _pairs(field: str, value: Any) -> list[tuple[str, int]]:
    """``[(op, input), ...]``; also accepts one list of two pairs per node (some forks write so)."""
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, list) and len(v) == 2 and isinstance(v[0], list) for v in value)
    ):
        value = [pair for node in value for pair in node]
    if not isinstance(value, list) or len(value) % 2:
        raise GenotypeError(f"{field!r} must list two (op, input) pairs per node, got {value!r}")
    out = []
    for pair in value:
        if not (
            isinstance(pair, list)
            and len(pair) == 2
            and isinstance(pair[0], str)
            and isinstance(pair[1], int)
        ):
            raise GenotypeError(
                f"{field!r}: each entry is an (op, input) pair like ('sep_conv_3x3', 0), got {pair!r}"
            )
        out.append((pair[0], pair[1]))
    return out


def _space_for(space: SearchSpace | str | None, default: str = "darts") -> NASNetCellSpace:
    """``space`` itself, the space of that name, or the space ``default`` (for None)."""
    got = space if isinstance(space, SearchSpace) else get_space(default if space is None else space)
    if not isinstance(got, NASNetCellSpace):
        raise GenotypeError(f"DARTS notation describes cell spaces (darts, nasnet), not {got.name!r}")
    return got


def _op_from_darts(op: str, space: NASNetCellSpace) -> str:
    ops = space.options["ops"]
    op = _FROM_DARTS.get(op, op)
    if op == "skip_connect" and "skip_connect" not in ops and "identity" in ops:
        return "identity"  # NASNet's name for the same op
    if op == "none":
        raise GenotypeError(
            "op 'none' only exists in DARTS's continuous relaxation; a derived cell never uses it"
        )
    return op


def from_darts_str(text: str, space: SearchSpace | str | None = None) -> Genotype:
    """The canonical genotype of ``space`` (default ``darts``) written in DARTS's notation.

    Checks what DARTS's code would not: the op names and input ranges against the space, and
    that ``normal_concat``/``reduce_concat`` are the nodes the space's rules concatenate.
    """
    sp = _space_for(space)
    fields = _parse_call(text)
    cells: dict[str, list[Block]] = {}
    for cell in CELL_TYPES:
        pairs = _pairs(cell, fields[cell])
        blocks = [
            canonical_block((i1, _op_from_darts(o1, sp), i2, _op_from_darts(o2, sp)))
            for (o1, i1), (o2, i2) in zip(pairs[0::2], pairs[1::2], strict=True)
        ]
        for b, block in enumerate(blocks):
            for i in (block.in1, block.in2):
                if not 0 <= i < 2 + b:
                    raise GenotypeError(f"node {b} of {cell!r} reads input {i}; node {b} may read 0..{1 + b}")
        concat = fields[f"{cell}_concat"]
        want = [2 + j for j in concat_nodes(blocks, sp.concat)]
        if not (isinstance(concat, list) and sorted(concat) == want):
            raise GenotypeError(
                f"{cell}_concat={concat} is not what space {sp.name!r} concatenates ({sp.options['rules']} "
                f"rules: {want}); "
                + (
                    "a NASNet-rule cell (unconsumed nodes) needs rules='nasnet'"
                    if sp.concat == "all"
                    else "a DARTS-rule cell (all nodes) needs rules='darts'"
                )
            )
        cells[cell] = blocks
    g = Genotype(sp.name, sp.version, tuple((c, tuple(tuple(b) for b in cells[c])) for c in CELL_TYPES))
    return sp.validate(g)


def to_darts_str(g: Genotype, space: SearchSpace | str | None = None) -> str:
    """``g`` in DARTS's notation (op names as DARTS's code spells them), readable by DARTS's
    ``eval`` and by `from_darts_str`."""
    sp = _space_for(space, g.space)
    cells = cell_blocks(sp.validate(g))
    parts = []
    for cell in CELL_TYPES:
        pairs = ", ".join(
            f"({_TO_DARTS.get(op, op)!r}, {i})"
            for b in cells[cell]
            for i, op in ((b.in1, b.op1), (b.in2, b.op2))
        )
        concat = [2 + j for j in concat_nodes(cells[cell], sp.concat)]
        parts.append(f"{cell}=[{pairs}], {cell}_concat={concat}")
    return f"Genotype({', '.join(parts)})"


# -- published cells -------------------------------------------------------------------------
def _lookup(name: str) -> NamedGenotype:
    key = {k.lower().replace("-", "_"): k for k in GENOTYPES}.get(str(name).lower().replace("-", "_"))
    if key is None:
        raise UnknownNameError("published genotype", name, GENOTYPES)
    return GENOTYPES[key]


def named_genotype(name: str, space: SearchSpace | None = None) -> Genotype:
    """A published cell pair as a genotype (names as in `GENOTYPES`; case and ``-``/``_`` are
    ignored, so ``darts-v2`` works). ``space`` defaults to the preset the cell belongs to."""
    entry = _lookup(name)
    return from_darts_str(entry.text, space if space is not None else get_space(entry.space))


def build_named(
    name: str, num_classes: int = 10, input_shape: Sequence[int] = (3, 32, 32), **options: Any
) -> NASNetNetwork:
    """The network of a published cell pair, by default at DARTS's CIFAR-10 setting
    (`DARTS_CIFAR10`); ``options`` override space options (e.g. ``auxiliary=False``)."""
    entry = _lookup(name)
    space = get_space(entry.space, **{**DARTS_CIFAR10, **options})
    return space.build(named_genotype(entry.name, space), input_shape, num_classes)


def darts_v1(
    num_classes: int = 10, input_shape: Sequence[int] = (3, 32, 32), auxiliary: bool = False
) -> NASNetNetwork:
    """DARTS-V1 (first order) at DARTS's CIFAR-10 setting."""
    return build_named("DARTS_V1", num_classes, input_shape, auxiliary=auxiliary)


def darts_v2(
    num_classes: int = 10, input_shape: Sequence[int] = (3, 32, 32), auxiliary: bool = False
) -> NASNetNetwork:
    """DARTS-V2 (second order, "DARTS" in most tables) at DARTS's CIFAR-10 setting: 3.35M params."""
    return build_named("DARTS_V2", num_classes, input_shape, auxiliary=auxiliary)


def pc_darts(
    num_classes: int = 10, input_shape: Sequence[int] = (3, 32, 32), auxiliary: bool = False
) -> NASNetNetwork:
    """PC-DARTS (CIFAR-10 cell) at DARTS's CIFAR-10 setting."""
    return build_named("PC_DARTS_cifar", num_classes, input_shape, auxiliary=auxiliary)


def pdarts(
    num_classes: int = 10, input_shape: Sequence[int] = (3, 32, 32), auxiliary: bool = False
) -> NASNetNetwork:
    """P-DARTS at DARTS's CIFAR-10 setting."""
    return build_named("PDARTS", num_classes, input_shape, auxiliary=auxiliary)
