"""The report tells the truth (#19, item 7): cells drawn by the space's concat rule (DARTS-V2 as
published), one runtime per latency axis, human units, markers and legends that hide no point,
banners for at-chance runs and for compressions that drop more than the constraint."""

from __future__ import annotations

import re

from nas.report.arch_draw import draw_architecture
from search_spaces import get_space
from search_spaces.darts_genotypes import named_genotype
from search_spaces.nasnet_cell import cell_blocks, loose_ends

# DARTS-V2 as drawn in Liu et al. 2019 (Fig. 4/5), written out by hand rather than read through
# our parser: (source, intermediate node, op); every node 0-3 feeds the output c_{k}
PUBLISHED_V2 = {
    "normal": {
        ("c_{k-2}", "0", "sep_conv_3x3"), ("c_{k-1}", "0", "sep_conv_3x3"),
        ("c_{k-2}", "1", "sep_conv_3x3"), ("c_{k-1}", "1", "sep_conv_3x3"),
        ("c_{k-1}", "2", "sep_conv_3x3"), ("c_{k-2}", "2", "skip_connect"),
        ("c_{k-2}", "3", "skip_connect"), ("0", "3", "dil_conv_3x3"),
    },
    "reduce": {
        ("c_{k-2}", "0", "max_pool_3x3"), ("c_{k-1}", "0", "max_pool_3x3"),
        ("0", "1", "skip_connect"), ("c_{k-1}", "1", "max_pool_3x3"),
        ("c_{k-2}", "2", "max_pool_3x3"), ("0", "2", "skip_connect"),
        ("0", "3", "skip_connect"), ("c_{k-1}", "3", "max_pool_3x3"),
    },
}  # fmt: skip


def cell_graph(svg: str) -> tuple[set[tuple[str, str, str]], list[str]]:
    """(op edges as (source, block, op), sources of the edges into concat) of one cell's SVG."""
    ops = set(re.findall(r'class="op-edge" data-src="([^"]+)" data-dst="(\d+)" data-op="([^"]+)"', svg))
    concat = re.findall(r'class="to-concat" data-src="(\d+)" data-dst="concat"', svg)
    return ops, concat


def cells(html: str) -> dict[str, str]:
    normal, reduce = re.findall(r"<svg.*?</svg>", html, re.S)
    return {"normal": normal, "reduce": reduce}


def test_darts_v2_is_drawn_as_published():
    g = named_genotype("DARTS_V2")
    drawn = cells(draw_architecture(g.to_str()))
    for cell, svg in drawn.items():
        ops, concat = cell_graph(svg)
        assert ops == PUBLISHED_V2[cell], cell
        # every intermediate node feeds the output, also the ones a later node consumes
        assert sorted(concat) == ["0", "1", "2", "3"], cell
    # node 0 is consumed by node 3 (normal) and by nodes 1-3 (reduce): NASNet's rule would drop it
    assert all(0 not in loose_ends(blocks) for blocks in cell_blocks(g).values())


def test_drawing_and_builder_concatenate_the_same_blocks():
    """NASNet-rule cells concatenate only their loose ends, in the drawing as in the network."""
    for name, space_name in (("DARTS_V2", "darts"), ("NASNet", "nasnet"), ("AmoebaNet", "nasnet")):
        space = get_space(space_name, cells_per_stage=1, init_filters=4)
        g = named_genotype(name, space)
        drawn = cells(draw_architecture(g.to_str()))
        net = space.build(g, (3, 16, 16), 10)
        built = {"normal": net.cells[0].concat, "reduce": next(c for c in net.cells if c.reduction).concat}
        for cell in ("normal", "reduce"):
            _, concat = cell_graph(drawn[cell])
            assert tuple(sorted(map(int, concat))) == tuple(sorted(built[cell])) == space.concatenated(g)[cell]
    # the run's space options decide: an old NASNet-rule darts cell under rules='nasnet'
    g = get_space("darts", rules="nasnet").from_str(named_genotype("DARTS_V2").to_str())
    _, concat = cell_graph(cells(draw_architecture(g.to_str(), {"rules": "nasnet"}))["normal"])
    assert sorted(concat) == ["1", "2", "3"]


def test_a_cell_of_an_unknown_space_is_shown_as_text():
    g = named_genotype("DARTS_V2").to_str().replace("darts@", "mine@", 1)
    assert draw_architecture(g).startswith("<code>")

