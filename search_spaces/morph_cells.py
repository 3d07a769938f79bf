"""`inherit` for the NASNet / DARTS cell spaces (`nasnet`, `darts`): a block's op or input changes.

The macro network (stem, cell sequence, channels per cell) depends only on the space's options,
so parent and child have the same cells; inside cell k (``cells.{k}``) block b's two ops are
``ops.{2b}`` and ``ops.{2b+1}``. Each child op slot is paired with the parent slot it is
closest to (same input and op first; the canonical order may swap a block's two slots), then:

- same op: copied (exact when its input is the same too);
- same op family, another kernel (sep_conv 3x3/5x5/7x7, dil_conv 3x3/5x5, conv 1x1/3x3,
  conv 1x3_3x1/1x7_7x1): every conv kernel centred in the new size; zero-padding a smaller
  kernel is exact (same output grid), cropping a larger one is not;
- another op: fresh. None of these spaces has a ``none`` op that a zeroed BN could stand for,
  so every other change of a live op changes the function.

Under NASNet's rules a cell concatenates its unconsumed blocks, so an input change can change
which blocks the cell outputs and the width the next cells read: the consumers (the next two
cells' preprocessing, the head, the auxiliary head) keep their weights for the blocks still
concatenated and read a newly concatenated block with zero weights.
"""

from __future__ import annotations

from collections.abc import Sequence

from .genotype import Genotype
from .morph_state import NEW, StateWriter, UnitMap
from .nasnet_cell import Block, NASNetCellSpace, cell_blocks, concat_nodes
from .nasnet_ops import FactorizedReduce

__all__ = ["transfer_cells"]

# The same module under two names (`nasnet_ops.OPS`).
_ALIASES = {"skip_connect": "identity"}
# Ops built by one module class with only the kernel size differing: (family, kernel).
_KERNEL_FAMILIES: dict[str, tuple[str, int]] = {
    "sep_conv_3x3": ("sep_conv", 3),
    "sep_conv_5x5": ("sep_conv", 5),
    "sep_conv_7x7": ("sep_conv", 7),
    "dil_conv_3x3": ("dil_conv", 3),
    "dil_conv_5x5": ("dil_conv", 5),
    "conv_1x1": ("conv", 1),
    "conv_3x3": ("conv", 3),
    "conv_1x3_3x1": ("factorized", 3),
    "conv_1x7_7x1": ("factorized", 7),
}


def transfer_cells(space: NASNetCellSpace, parent: Genotype, child: Genotype, w: StateWriter) -> None:
    net = w.model
    parent_cells, child_cells = cell_blocks(parent), cell_blocks(child)
    with w.unit("stem"):
        w.copy_all("stem")
    s0 = s1 = UnitMap.identity(int(net.stem[0].out_channels))
    aux_input = s1
    for k, cell in enumerate(net.cells):
        kind = "reduce" if cell.reduction else "normal"
        prefix = f"cells.{k}"
        for name, reads in (("preprocess0", s0), ("preprocess1", s1)):
            reduces = isinstance(w.module(f"{prefix}.{name}"), FactorizedReduce)
            with w.unit(f"{prefix}.{name}"):
                _consumer(w, f"{prefix}.{name}", reads, ("conv_a", "conv_b") if reduces else ("1",))
        _cell_ops(w, prefix, parent_cells[kind], child_cells[kind])
        width = cell.out_channels // len(cell.concat)
        out = _concat_map(
            concat_nodes(parent_cells[kind], space.concat),
            concat_nodes(child_cells[kind], space.concat),
            width,
        )
        s0, s1 = s1, out
        if k == net.aux_at:
            aux_input = out
    linear = f"head.{len(net.head) - 1}"
    with w.unit("head"):
        w.write_mapped(f"{linear}.weight", in_=s1)
        w.copy(f"{linear}.bias")
    if net.auxiliary_head is not None:
        w.fresh_is_harmless("auxiliary_head")  # `forward` never runs it
        if w.has_parent("auxiliary_head.classifier.weight"):
            with w.unit("auxiliary_head", in_function=False):
                _consumer(w, "auxiliary_head", aux_input, ("reduce.0",))


def _consumer(w: StateWriter, prefix: str, reads: UnitMap, readers: tuple[str, ...]) -> None:
    """A module reading a cell's output: the convs ``readers`` (``ReLUConvBN``'s ``1``,
    ``FactorizedReduce``'s ``conv_a``/``conv_b``) map their input channels; the rest is copied."""
    for key in w.child_keys(prefix):
        if key[len(prefix) + 1 :] in {f"{r}.weight" for r in readers}:
            w.write_mapped(key, in_=reads)
        else:
            w.copy(key)


def _concat_map(parent_concat: Sequence[int], child_concat: Sequence[int], width: int) -> UnitMap:
    """A cell's output channels: block j's slice from the parent's slice of j, or new (zero
    weights in the consumers) where the parent did not concatenate j."""
    source: list[int] = []
    for j in child_concat:
        if j in parent_concat:
            start = parent_concat.index(j) * width
            source += range(start, start + width)
        else:
            source += [NEW] * width
    return UnitMap(tuple(source), len(parent_concat) * width)


def _affinity(parent_slot: tuple[int, str], child_slot: tuple[int, str]) -> int:
    (p_in, p_op), (c_in, c_op) = parent_slot, child_slot
    same_op = _ALIASES.get(p_op, p_op) == _ALIASES.get(c_op, c_op)
    family = p_op in _KERNEL_FAMILIES and _KERNEL_FAMILIES[p_op][0] == _KERNEL_FAMILIES.get(c_op, ("",))[0]
    return 4 * same_op + 2 * family + (p_in == c_in)


def _cell_ops(w: StateWriter, prefix: str, parent: Sequence[Block], child: Sequence[Block]) -> None:
    for b, (pb, cb) in enumerate(zip(parent, child, strict=True)):
        p_slots = [(pb.in1, pb.op1), (pb.in2, pb.op2)]
        c_slots = [(cb.in1, cb.op1), (cb.in2, cb.op2)]
        order = max(
            ((0, 1), (1, 0)), key=lambda perm: sum(_affinity(p_slots[perm[s]], c_slots[s]) for s in (0, 1))
        )
        for s, p in enumerate(order):
            (p_in, p_op), (c_in, c_op) = p_slots[p], c_slots[s]
            op = f"{prefix}.ops.{2 * b + s}"
            exact = _transfer_op(w, op, f"{prefix}.ops.{2 * b + p}", p_op, c_op)
            if not exact or p_in != c_in:
                w.not_preserving(f"{op}: ({p_in}, {p_op}) -> ({c_in}, {c_op})")


def _transfer_op(w: StateWriter, op: str, source: str, p_op: str, c_op: str) -> bool:
    """Weights of one op slot from the parent's; whether it computes the parent op's function."""
    keys = w.child_keys(op)
    if _ALIASES.get(p_op, p_op) == _ALIASES.get(c_op, c_op):
        with w.unit(op):  # a stride change (identity at a reduction) has other keys: stays fresh
            for key in keys:
                w.copy(key, source + key[len(op) :])
        return True
    p_family, p_kernel = _KERNEL_FAMILIES.get(p_op, ("", 0))
    c_family, c_kernel = _KERNEL_FAMILIES.get(c_op, ("", 0))
    if p_family and p_family == c_family:
        with w.unit(op):
            for key in keys:
                w.write_mapped(key, source=source + key[len(op) :], kernel=True, judge_crop=False)
        return c_kernel >= p_kernel
    return False  # another op: fresh
