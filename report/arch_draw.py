"""Architectures drawn for people: a cell as a graph of blocks and ops, a large-kernel net as a
stage table. Plain SVG/HTML text (no Graphviz, no JavaScript), embedded in the report.

- NASNet / DARTS (`search_spaces.nasnet_cell`): per cell type, the inputs c_{k-2} and c_{k-1}
  on the left, each block as a box holding its two ops and their sum, columns by depth (a block
  sits right of every block it reads), on the right the concatenation of all blocks (DARTS's
  rule) or of those no block reads (NASNet's): the blocks the space's own builder concatenates
  (`NASNetCellSpace.concatenated`), so the drawing cannot differ from the network built.
  Every edge carries ``data-src``/``data-dst`` (and ``data-op``) so tests read the graph back.
- NAS-Bench-201 (`search_spaces.nb201`): nodes 0..3 on a line, each edge an arc labelled with
  its op; edges on no input->output path (cut by ``none``) are dashed.
- Large-kernel (`search_spaces.large_kernel`): one table row per stage.
- Anything else (a user's model): the genotype string.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from search_spaces import Genotype, GenotypeError, NasRunError, get_space

__all__ = ["draw_architecture", "draw_cell", "draw_nb201", "stage_table"]

# op family -> fill colour, so the eye finds convolutions, pools and skips at once
_FILL = (
    ("sep_conv", "#cfe2f3"),
    ("dil_conv", "#d9d2e9"),
    ("conv", "#c9daf8"),
    ("pool", "#fce5cd"),
    ("skip", "#e6e6e6"),
    ("identity", "#e6e6e6"),
    ("none", "#ffffff"),
)
_EDGE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def _fill(op: str) -> str:
    return next((c for key, c in _FILL if key in op), "#ffffff")


def _text(x: float, y: float, s: str, size: int = 11, anchor: str = "middle", weight: str = "normal") -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
        f'font-weight="{weight}" dominant-baseline="middle">{escape(s)}</text>'
    )


def _curve(x1: float, y1: float, x2: float, y2: float, color: str, attrs: str = "") -> str:
    dx = max(30.0, (x2 - x1) / 2)
    return (
        f'<path{attrs} d="M{x1:.1f},{y1:.1f} C{x1 + dx:.1f},{y1:.1f} {x2 - dx:.1f},{y2:.1f} {x2:.1f},{y2:.1f}" '
        f'fill="none" stroke="{color}" stroke-width="1.6" marker-end="url(#arrow)"/>'
    )


_INPUTS = ("c_{k-2}", "c_{k-1}")


def _node(i: int) -> str:
    """A cell input's name (``c_{k-2}``, ``c_{k-1}``) or block j's index, as the paper numbers nodes."""
    return _INPUTS[i] if i < 2 else str(i - 2)


_DEFS = (
    '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="6" markerHeight="6" '
    'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>'
)


def draw_cell(blocks: tuple, title: str, reduction: bool = False, *, concat: str | Sequence[int]) -> str:
    """One NASNet/DARTS cell: ``blocks`` are ``(in1, op1, in2, op2)`` (see `nasnet_cell`);
    ``concat``: the block indices the cell's output concatenates (from the space), or its rule
    (``"all"``, ``"loose_ends"``). No default: a guessed rule is how cells were drawn wrong."""
    from search_spaces.nasnet_cell import concat_nodes

    joined = concat_nodes(blocks, concat) if isinstance(concat, str) else tuple(concat)

    level = [0, 0]  # of the inputs c_{k-2}, c_{k-1}; then one per block
    for in1, _, in2, _ in blocks:
        level.append(1 + max(level[in1] if in1 < len(level) else 0, level[in2] if in2 < len(level) else 0))
    depth = max(level)
    col_w, row_h, box_w, box_h = 230, 86, 176, 66
    rows_at: dict[int, int] = {}
    place: dict[int, tuple[float, float]] = {}
    for j in range(len(blocks)):
        lv = level[2 + j]
        place[2 + j] = (30 + lv * col_w - 70, 30 + rows_at.get(lv, 0) * row_h)
        rows_at[lv] = rows_at.get(lv, 0) + 1
    n_rows = max([2, *rows_at.values()])
    height = 40 + n_rows * row_h
    width = 30 + (depth + 1) * col_w + 60
    out_port: dict[int, tuple[float, float]] = {}
    parts = [_DEFS]
    for i, name in enumerate(_INPUTS):
        y = 40 + i * row_h
        parts.append(f'<rect x="8" y="{y - 15}" width="76" height="30" rx="6" fill="#f3f3f3" stroke="#666"/>')
        parts.append(_text(46, y, name, 12, weight="bold"))
        out_port[i] = (84, y)
    for j in range(len(blocks)):
        bx, by = place[2 + j]
        out_port[2 + j] = (bx + box_w, by + box_h / 2)
    edges, boxes = [], []
    for j, (in1, op1, in2, op2) in enumerate(blocks):
        bx, by = place[2 + j]
        boxes.append(
            f'<rect x="{bx}" y="{by}" width="{box_w}" height="{box_h}" rx="8" fill="#fff" stroke="#444"/>'
        )
        boxes.append(_text(bx + 4, by - 7, f"block {j}", 10, anchor="start"))
        for k, (src, op) in enumerate(((in1, op1), (in2, op2))):
            oy = by + 6 + k * 30
            shown = f"{op} /2" if reduction and src < 2 else op
            boxes.append(
                f'<rect x="{bx + 8}" y="{oy}" width="124" height="24" rx="4" fill="{_fill(op)}" stroke="#777"/>'
            )
            boxes.append(_text(bx + 70, oy + 12, shown, 10.5))
            boxes.append(
                f'<line x1="{bx + 132}" y1="{oy + 12}" x2="{bx + 148}" y2="{by + box_h / 2}" stroke="#777"/>'
            )
            sx, sy = out_port.get(src, (84, 40))
            tag = f' class="op-edge" data-src="{_node(src)}" data-dst="{j}" data-op="{escape(op)}"'
            edges.append(_curve(sx, sy, bx + 8, oy + 12, _EDGE[src % len(_EDGE)], tag))
        boxes.append(f'<circle cx="{bx + 158}" cy="{by + box_h / 2}" r="10" fill="#fff" stroke="#444"/>')
        boxes.append(_text(bx + 158, by + box_h / 2 + 1, "+", 14, weight="bold"))
    cx, cy = width - 62, height / 2 - 10
    for j in joined:
        sx, sy = out_port[2 + j]
        edges.append(_curve(sx, sy, cx, cy, "#555", f' class="to-concat" data-src="{j}" data-dst="concat"'))
    boxes.append(f'<rect x="{cx}" y="{cy - 16}" width="56" height="32" rx="6" fill="#f3f3f3" stroke="#666"/>')
    boxes.append(_text(cx + 28, cy, "concat", 11, weight="bold"))
    head = _text(8, 12, title, 12, anchor="start", weight="bold")
    return _svg(width, height, [*parts, head, *edges, *boxes], f"{title}: {len(blocks)} blocks")


def draw_nb201(edges: tuple, title: str = "NAS-Bench-201 cell") -> str:
    """Nodes 0..3, edges (i -> j) labelled with their ops; dead edges dashed and grey."""
    from search_spaces.nb201 import EDGES, OPS, live_edges

    live = live_edges([OPS.index(op) for op in edges])
    gap, y0 = 190, 120
    xs = [50 + i * gap for i in range(4)]
    parts = [_DEFS, _text(8, 12, title, 12, anchor="start", weight="bold")]
    for e, ((i, j), op) in enumerate(zip(EDGES, edges, strict=True)):
        span = j - i
        h = 0 if span == 1 else (-70 * (span - 1) if (i, j) != (0, 3) else 95)  # 0->3 below the line
        x1, x2 = xs[i] + 18, xs[j] - 18
        color = "#999" if not live[e] or op == "none" else _EDGE[e % len(_EDGE)]
        dash = ' stroke-dasharray="5 4"' if not live[e] or op == "none" else ""
        mx = (x1 + x2) / 2
        parts.append(
            f'<path d="M{x1},{y0} Q{mx},{y0 + 2 * h} {x2},{y0}" fill="none" stroke="{color}" '
            f'stroke-width="1.8"{dash} marker-end="url(#arrow)"/>'
        )
        ly = y0 + h - (10 if h <= 0 else -10)
        parts.append(
            f'<rect x="{mx - 55}" y="{ly - 10}" width="110" height="20" rx="4" fill="{_fill(op)}" stroke="{color}"/>'
        )
        parts.append(_text(mx, ly, op, 10.5))
    for i, x in enumerate(xs):
        parts.append(f'<circle cx="{x}" cy="{y0}" r="18" fill="#f3f3f3" stroke="#444"/>')
        parts.append(_text(x, y0 + 1, str(i), 13, weight="bold"))
    parts.append(_text(xs[0], y0 + 32, "input", 10))
    parts.append(_text(xs[3], y0 + 32, "output", 10))
    return _svg(xs[3] + 60, 250, parts, f"{title}: 4 nodes, 6 edges")


def stage_table(g: Genotype) -> str:
    """A large-kernel genotype as a table: one row per stage."""
    from search_spaces.large_kernel import STAGE_FIELDS

    head = "".join(f"<th>{escape(f)}</th>" for f in ("stage", *STAGE_FIELDS))
    rows = []
    for key, stage in g.fields:
        vals = dict(zip(STAGE_FIELDS, stage, strict=True))
        yes = {0: "no", 1: "yes"}
        cells = [
            key,
            vals["depth"],
            vals["width"],
            vals["kernel"],
            yes.get(vals["rep"]),
            yes.get(vals["se"]),
            vals["ffn"],
        ]
        rows.append("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in cells) + "</tr>")
    note = (
        "<p class='note'>depth: blocks; width: channels; kernel: depthwise large-kernel size; rep: parallel "
        "small/dilated training branches (merged for deployment); se: squeeze-and-excitation; ffn: expansion ratio</p>"
    )
    return f"<table class='stages'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>{note}"


def _svg(width: float, height: float, parts: list[str], label: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="arch" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="{escape(label)}" '
        f'font-family="sans-serif">{"".join(parts)}</svg>'
    )


def draw_architecture(genotype: str, space_options: Mapping[str, Any] | None = None) -> str:
    """HTML for one genotype string, by the shape of its fields; falls back to the string.
    ``space_options``: those of the run's space (a cell's concatenation rule may be one); a cell
    genotype its space does not read (unknown space, refused version) is shown as written."""
    try:
        g = Genotype.from_str(genotype)
    except (GenotypeError, ValueError):
        return f"<code>{escape(genotype)}</code>"
    keys = g.keys()
    try:
        if keys == ("normal", "reduce"):
            from search_spaces.nasnet_cell import cell_blocks

            space = get_space(g.space, **dict(space_options or {}))
            g = space.from_str(genotype)  # the space's reading (old versions, canonical order)
            joined = space.concatenated(g)
            cells = cell_blocks(g)
            return draw_cell(cells["normal"], "normal cell", concat=joined["normal"]) + draw_cell(
                cells["reduce"], "reduction cell", True, concat=joined["reduce"]
            )
        if keys == ("edges",):
            return draw_nb201(g["edges"])
        if (
            keys
            and all(k[0] == "s" and k[1:].isdigit() for k in keys)
            and all(isinstance(v, tuple) and len(v) == 6 for v in g.as_dict().values())
        ):
            return stage_table(g)
    except (NasRunError, ValueError, IndexError, KeyError, TypeError, AttributeError):
        pass  # a genotype of a shape we do not know: show it as written
    return f"<code>{escape(g.to_str())}</code>"
