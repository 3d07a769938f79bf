"""`inherit` for NAS-Bench-201 cells (`nb201`): edges change op.

The macro network (stem, reductions, classifier) depends only on the space's options, so it
is copied. Edge e of every cell is ``{cell}.edges.{e}``; a conv edge is ReLU (0), conv (1),
BN (2). Per changed edge:

- ``none`` -> conv: the new conv's BN gets scale and shift 0, so the edge still adds 0 (exact);
- ``nor_conv_1x1`` -> ``nor_conv_3x3``: the 1x1 kernel zero-padded to 3x3 (exact), BN copied;
  3x3 -> 1x1 keeps the centre tap (not exact);
- anything else: fresh (the new op's function differs).

A change that is not exact still preserves the function when, in both cells, the edge's
target node has no ``none``-free path to the output: its value never reaches the output.
(Only the downstream side counts: `nb201.live_edges` also calls an edge dead when its input is
cut, since the benchmark's algebra takes op(0) = 0, but a conv edge outputs its BN's shift for a
zero input, which does reach the output.)
"""

from __future__ import annotations

import re

from .genotype import Genotype
from .morph_state import StateWriter
from .nb201 import EDGES

__all__ = ["transfer_nb201"]

_EDGE_KEY = re.compile(r"^(\d+)\.edges\.(\d+)\.")
_CONVS = ("nor_conv_1x1", "nor_conv_3x3")


def transfer_nb201(parent: Genotype, child: Genotype, w: StateWriter) -> None:
    parent_ops, child_ops = tuple(parent["edges"]), tuple(child["edges"])  # validated by `inherit`
    reach_parent, reach_child = _reaches_output(parent_ops), _reaches_output(child_ops)
    edge_prefixes: dict[int, set[str]] = {e: set() for e in range(6)}
    with w.unit("macro"):
        for key in w.child:
            match = _EDGE_KEY.match(key)
            if match:
                edge_prefixes[int(match.group(2))].add(match.group(0).rstrip("."))
            else:
                w.copy(key)
    for e in range(6):
        before, after = parent_ops[e], child_ops[e]
        exact = True
        for prefix in sorted(edge_prefixes[e]):
            with w.unit(prefix):
                exact = _transfer_edge(w, prefix, before, after) and exact
        if before != after and not edge_prefixes[e]:  # no weights (e.g. skip -> pool): same rule
            exact = False
        target = EDGES[e][1]
        if not reach_child[target]:
            for prefix in edge_prefixes[e]:
                w.fresh_is_harmless(prefix)  # its value never reaches the output
        if not exact and (reach_parent[target] or reach_child[target]):
            w.not_preserving(f"edge e{e}: {before} -> {after} reaches the output")


def _reaches_output(ops: tuple[str, ...]) -> list[bool]:
    """Per node 0..3: whether a path of non-``none`` edges leads from it to the output (node 3)."""
    reaches = [False, False, False, True]
    for node in (2, 1, 0):  # edges go from lower to higher nodes: decide the later ones first
        reaches[node] = any(s == node and ops[e] != "none" and reaches[t] for e, (s, t) in enumerate(EDGES))
    return reaches


def _transfer_edge(w: StateWriter, prefix: str, before: str, after: str) -> bool:
    """One cell's edge; whether it computes what the parent's did."""
    if before == after:
        w.copy_all(prefix)
        return True
    if before == "none" and after in _CONVS:
        w.zero_bn(f"{prefix}.2", "zero-init new op: BN scale and shift 0")
        w.fresh_is_harmless(prefix)
        return True
    if before in _CONVS and after in _CONVS:
        w.write_mapped(f"{prefix}.1.weight", kernel=True, judge_crop=False)
        w.map_bn(f"{prefix}.2")
        return after == "nor_conv_3x3"  # 1x1 -> 3x3 pads (exact); 3x3 -> 1x1 crops
    return False
