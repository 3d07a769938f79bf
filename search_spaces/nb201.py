"""NAS-Bench-201 cell space (Dong & Yang, ICLR 2020): 4 nodes, 6 edges, 5 ops, 5^6 = 15,625 cells.

A cell is a DAG on nodes 0..3: node 0 is the cell input, node 3 its output, and node j is the
sum over i < j of ``op_{i->j}(node i)``. The genotype holds one field ``edges``: the six ops in
the benchmark's edge order, that of its architecture string::

    |e0~0|+|e1~0|e2~1|+|e3~0|e4~1|e5~2|      i.e. e0=0->1, e1=0->2, e2=1->2, e3=0->3, e4=1->3, e5=2->3

    nb201@1|edges=(nor_conv_3x3,nor_conv_3x3,avg_pool_3x3,skip_connect,nor_conv_3x3,skip_connect)
    == |nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|

The tabular benchmark keys a cell by six digits, one per edge in the same order, digit = index
into `OPS` (`to_index_key`). Many cells compute the same function: an edge on no input->output
path (a path is cut by ``none``) is dead, ``skip_connect`` is the identity and sums commute, so
`canonical_key` maps the 15,625 cells to 4,930 functions.
"""

from __future__ import annotations

import difflib
import functools
import itertools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from .base import Dimension, SearchSpace, register_space
from .errors import DatasetError, GenotypeError
from .genotype import Genotype, Value

if TYPE_CHECKING:
    import torch

__all__ = [
    "EDGES",
    "NB201Space",
    "OPS",
    "PATHS",
    "canonical_key",
    "from_index_key",
    "from_nb201_str",
    "live_edges",
    "to_index_key",
    "to_nb201_str",
]

OPS: tuple[str, ...] = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
# (source, target) of e0..e5, the benchmark's order: grouped by target node, then by source.
EDGES: tuple[tuple[int, int], ...] = ((0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3))
# The four input->output paths as edge indices: 0->3, 0->1->3, 0->2->3, 0->1->2->3.
PATHS: tuple[tuple[int, ...], ...] = ((3,), (0, 4), (1, 5), (0, 2, 5))
_NONE, _SKIP, _C1, _C3, _POOL = range(5)
_CONVS = (_C1, _C3)


# -- genotype <-> text ------------------------------------------------------------------------
def _edges(g: Genotype) -> tuple[str, ...]:
    """The six op names of ``g``, checked (any space whose genotype is a NB201 cell works)."""
    try:
        edges = g["edges"]
    except KeyError as exc:
        raise GenotypeError(f"a NB201 genotype has one field 'edges', got {g}") from exc
    if not isinstance(edges, tuple) or len(edges) != 6:
        raise GenotypeError(f"a NB201 cell has 6 edge ops, got {edges!r}")
    for op in edges:
        _check_op(op)
    return edges  # type: ignore[return-value]  # checked above: six op names


def _check_op(op: object) -> None:
    if op not in OPS:
        close = difflib.get_close_matches(str(op), OPS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise GenotypeError(f"unknown NB201 op {op!r}{hint}; allowed: {', '.join(OPS)}")


def _genotype(edges: Sequence[str], space: str) -> Genotype:
    return Genotype(space, NB201Space.version, (("edges", tuple(edges)),))


def to_nb201_str(g: Genotype) -> str:
    """The benchmark's architecture string, e.g. ``|nor_conv_3x3~0|+|...|skip_connect~2|``."""
    e = _edges(g)
    nodes = ([e[0]], [e[1], e[2]], [e[3], e[4], e[5]])  # incoming ops of nodes 1, 2, 3
    return "+".join("|" + "|".join(f"{op}~{i}" for i, op in enumerate(ops)) + "|" for ops in nodes)


def from_nb201_str(text: str, space: str = "nb201") -> Genotype:
    """Inverse of `to_nb201_str`; raises `GenotypeError` saying what is wrong with ``text``."""
    form = "'|op~0|+|op~0|op~1|+|op~0|op~1|op~2|'"
    if not isinstance(text, str):
        raise GenotypeError(f"a NB201 string looks like {form}, got {text!r}")
    parts = text.strip().split("+")
    if len(parts) != 3:
        raise GenotypeError(f"a NB201 string has 3 nodes separated by '+' like {form}, got {text!r}")
    edges: list[str] = []
    for node, part in enumerate(parts, start=1):
        if len(part) < 2 or part[0] != "|" or part[-1] != "|":
            raise GenotypeError(f"node {node} must be written '|op~i|...|', got {part!r} in {text!r}")
        items = part[1:-1].split("|")
        if len(items) != node:
            raise GenotypeError(f"node {node} needs {node} inputs, got {len(items)} in {part!r} of {text!r}")
        for source, item in enumerate(items):
            op, sep, src = item.partition("~")
            if not sep or src != str(source):
                raise GenotypeError(f"expected 'op~{source}' in node {node}, got {item!r} in {text!r}")
            _check_op(op)
            edges.append(op)
    return _genotype(edges, space)


def to_index_key(g: Genotype) -> str:
    """The tabular benchmark's 6-digit key: one digit per edge, digit = index into `OPS`."""
    return "".join(str(OPS.index(op)) for op in _edges(g))


def from_index_key(key: str, space: str = "nb201") -> Genotype:
    if not isinstance(key, str) or len(key) != 6 or any(c not in "01234" for c in key):
        raise GenotypeError(f"a NB201 index key is 6 digits in 0-4 (one per edge), got {key!r}")
    return _genotype([OPS[int(c)] for c in key], space)


# -- what the cell computes ---------------------------------------------------------------------
def live_edges(ops: Sequence[int]) -> tuple[bool, ...]:
    """Which edges matter: those on an input->output path that no ``none`` cuts.

    An edge off every such path either receives zeros or feeds a node that never reaches the
    output, so replacing it by ``none`` leaves the cell's function unchanged.
    """
    live = [False] * 6
    for path in PATHS:
        if all(ops[e] != _NONE for e in path):
            for e in path:
                live[e] = True
    return tuple(live)


def _expression(ops: Sequence[int]) -> tuple[str, ...]:
    """What the cell computes, as a sorted tuple of summands over the input ``x`` (empty: zero).

    Algebra, not weights: ``skip_connect`` is the identity, sums are commutative and a
    ``none`` edge or an edge from a zero node adds nothing. So 100030 (skip 0->1, conv 1->3)
    and 000300 (conv 0->3) are both ``("nor_conv_3x3(x)",)``. Weights differ between such cells,
    the function family does not.
    """
    nodes: list[tuple[str, ...]] = [("x",)]
    for j in (1, 2, 3):
        terms: list[str] = []
        for e, (s, t) in enumerate(EDGES):
            if t != j or ops[e] == _NONE or not nodes[s]:
                continue
            terms += nodes[s] if ops[e] == _SKIP else [f"{OPS[ops[e]]}({'+'.join(nodes[s])})"]
        nodes.append(tuple(sorted(terms)))
    return nodes[3]


@functools.cache
def _representatives() -> dict[tuple[str, ...], tuple[int, ...]]:
    # expression -> smallest op tuple computing it; 15,625 cells, ~0.1 s once per process
    reps: dict[tuple[str, ...], tuple[int, ...]] = {}
    for ops in itertools.product(range(len(OPS)), repeat=6):  # lexicographic: first seen = smallest
        reps.setdefault(_expression(ops), ops)
    return reps


def _canonical_ops(ops: Sequence[int]) -> tuple[int, ...]:
    return _representatives()[_expression(ops)]


def canonical_key(g: Genotype) -> str:
    """The index key of one representative (the smallest key) of all cells computing the same
    function as ``g`` (see `_expression`): dead edges, skip-connection detours and the order of
    summands do not matter. 4,930 classes in all; NB201's own ``to_unique_str`` finds 6,466
    because it keeps zero summands. The benchmark still lists every cell separately, with
    slightly different trained accuracies, so keep `to_index_key` for table look-ups."""
    return "".join(map(str, _canonical_ops([OPS.index(op) for op in _edges(g)])))


def _features(ops: Sequence[int]) -> list[float]:
    """Cell-level features besides the one-hots (see `NB201Space.encode`)."""
    live = live_edges(ops)
    feats: list[float] = []
    depths, conv_depths = [0], [0]
    for path in PATHS:
        alive = all(ops[e] != _NONE for e in path)
        # per path: alive, then how many convs 3x3, 1x1, pools and skips it goes through
        feats.append(float(alive))
        feats.extend(float(alive) * sum(ops[e] == op for e in path) for op in (_C3, _C1, _POOL, _SKIP))
        if alive:
            depths.append(len(path))
            conv_depths.append(sum(ops[e] in _CONVS for e in path))
    n_live = sum(all(ops[e] != _NONE for e in path) for path in PATHS)
    counts = [sum(alive and op == k for op, alive in zip(ops, live, strict=True)) for k in range(1, 5)]
    # A param proxy: a 3x3 conv holds 9 times the weights of a 1x1 one (both C -> C).
    params = 9 * counts[_C3 - 1] + counts[_C1 - 1]
    feats += [
        float(n_live),
        float(n_live == 0),  # output disconnected: the cell outputs zeros, accuracy ~10%
        float(max(depths)),  # effective depth: longest live path, in edges
        float(max(conv_depths)),  # most convs stacked on one live path
        float(min(conv_depths[1:], default=0)),  # 0: some live path is conv-free (a shortcut)
        *map(float, counts),  # skip, conv1x1, conv3x3, pool on live edges
        float(params),
    ]
    # The same from the algebra (`_expression`): summands reaching the output, identity terms
    # among them (a clean residual path), and applications of each op in the unrolled graph.
    expr = _expression(ops)
    text = "+".join(expr)
    feats += [float(len(expr)), float(expr.count("x"))]
    feats += [float(text.count(OPS[k] + "(")) for k in (_C3, _C1, _POOL)]
    return feats


_N_EXTRA = len(_features([_C3] * 6))


class NB201Space(SearchSpace):
    """NAS-Bench-201's cell in its macro network (stem, 3 stages of N cells, residual reductions).

    Decisions ``e0``..``e5``, one op per edge; options ``channels`` (C of the first stage,
    doubled at each reduction) and ``cells_per_stage`` (N). Defaults match the benchmark:
    C=16, N=5.
    """

    version: ClassVar[int] = 1
    default_options: ClassVar[Mapping[str, Any]] = {"channels": 16, "cells_per_stage": 5}
    tiny_options: ClassVar[Mapping[str, Any]] = {"channels": 8, "cells_per_stage": 1}

    def dimensions(self) -> Sequence[Dimension]:
        return [Dimension(f"e{i}", OPS) for i in range(6)]

    def to_dims(self, g: Genotype) -> dict[str, Value]:
        return {f"e{i}": op for i, op in enumerate(_edges(g))}

    def from_dims(self, values: Mapping[str, Value]) -> Genotype:
        return Genotype(self.name, self.version, (("edges", tuple(values[f"e{i}"] for i in range(6))),))

    # -- features for surrogates ------------------------------------------------------------
    @property
    def encoding_size(self) -> int:
        return 30 + _N_EXTRA

    def encode(self, g: Genotype) -> np.ndarray:
        """Features of the cell's function, not of its spelling: everything is computed on the
        `canonical_key` representative, so cells computing the same function (dead edges,
        skip detours) share one vector (their recorded accuracies differ only by noise).

        One-hot of the 6 canonical edges (30); per input->output path (4 x 5): alive (no
        ``none`` on it), #conv3x3, #conv1x1, #pool, #skip; #live paths; output disconnected;
        longest live path; most and fewest convs on a live path; skip/conv1x1/conv3x3/pool
        counts on live edges; a param proxy; then from the algebra: #summands at the output,
        #identity summands, conv3x3/conv1x1/pool applications in the unrolled graph.

        Kendall tau of one XGBSurrogate model on held-out NB201 cells, trained on n=100 / 1000
        (results/surrogate_nb201.md): plain one-hot 0.52 / 0.74, this encoding 0.77 / 0.89.
        While developing it, the same path and count features computed on the cell as spelled
        (plus its raw one-hot) reached 0.74 / 0.87: the canonical form and the algebra
        features give the rest.
        """
        canon = _canonical_ops([OPS.index(op) for op in _edges(g)])
        out = np.zeros(self.encoding_size, dtype=np.float32)
        out[[5 * i + op for i, op in enumerate(canon)]] = 1.0
        out[30:] = _features(canon)
        return out

    # -- model ----------------------------------------------------------------------------
    def build(self, g: Genotype, input_shape: Sequence[int], num_classes: int) -> torch.nn.Module:
        """NB201's network: stem conv 3x3 (C), then stages of N cells at C, 2C, 4C channels
        joined by residual reduction blocks (stride 2), BN-ReLU, global pool, linear."""
        from torch import nn

        ops = _edges(self.validate(g))
        if len(input_shape) != 3:
            raise DatasetError(f"nb201 builds image models: input_shape is (C, H, W), got {input_shape}")
        c, n = int(self.options["channels"]), int(self.options["cells_per_stage"])

        def relu_conv_bn(c_in: int, c_out: int, k: int, stride: int = 1) -> nn.Module:
            return nn.Sequential(
                nn.ReLU(), nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False), nn.BatchNorm2d(c_out)
            )

        class Zero(nn.Module):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return x.mul(0.0)  # keeps shape, device and the graph (a `none` edge)

        def make_op(op: str, ch: int) -> nn.Module:
            if op == "nor_conv_3x3":
                return relu_conv_bn(ch, ch, 3)
            if op == "nor_conv_1x1":
                return relu_conv_bn(ch, ch, 1)
            if op == "avg_pool_3x3":
                return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
            return nn.Identity() if op == "skip_connect" else Zero()

        class Cell(nn.Module):
            def __init__(self, ch: int):
                super().__init__()
                self.edges = nn.ModuleList(make_op(op, ch) for op in ops)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                nodes = [x]
                for j in (1, 2, 3):  # node j = sum_{i<j} op_{i->j}(node i); all (B, ch, H, W)
                    nodes.append(sum(self.edges[e](nodes[s]) for e, (s, t) in enumerate(EDGES) if t == j))
                return nodes[3]

        class Reduction(nn.Module):  # NB201's ResNet basic block, stride 2, ch -> 2ch, H -> H/2
            def __init__(self, ch: int):
                super().__init__()
                self.body = nn.Sequential(relu_conv_bn(ch, 2 * ch, 3, 2), relu_conv_bn(2 * ch, 2 * ch, 3))
                self.shortcut = nn.Sequential(nn.AvgPool2d(2, 2), nn.Conv2d(ch, 2 * ch, 1, bias=False))

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.body(x) + self.shortcut(x)

        layers: list[nn.Module] = [
            nn.Conv2d(int(input_shape[0]), c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
        ]
        for stage in range(3):
            ch = c * 2**stage
            if stage:
                layers.append(Reduction(ch // 2))
            layers.extend(Cell(ch) for _ in range(n))
        layers += [
            nn.BatchNorm2d(4 * c),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * c, num_classes),
        ]
        return nn.Sequential(*layers)


register_space("nb201", NB201Space, "NAS-Bench-201 cell: 4 nodes, 6 edges, 5 ops")
