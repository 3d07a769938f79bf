"""The report tells the truth (#19, item 7): cells drawn by the space's concat rule (DARTS-V2 as
published), one runtime per latency axis, human units, markers and legends that hide no point,
banners for at-chance runs and for compressions that drop more than the constraint."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from report_runs import add_compression, fake_run

from report import load_run, make_report
from report.arch_draw import draw_architecture
from report.banners import banners
from report.figures import AXES
from report.png import front_figure, fronts_figure
from report.runs import ORT_ONLY_PASSES
from report.units import human
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


def close(fig) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)


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
            assert (
                tuple(sorted(map(int, concat))) == tuple(sorted(built[cell])) == space.concatenated(g)[cell]
            )
    # the run's space options decide: an old NASNet-rule darts cell under rules='nasnet'
    g = get_space("darts", rules="nasnet").from_str(named_genotype("DARTS_V2").to_str())
    _, concat = cell_graph(cells(draw_architecture(g.to_str(), {"rules": "nasnet"}))["normal"])
    assert sorted(concat) == ["1", "2", "3"]


def test_a_cell_of_an_unknown_space_is_shown_as_text():
    g = named_genotype("DARTS_V2").to_str().replace("darts@", "mine@", 1)
    assert draw_architecture(g).startswith("<code>")


# -- one runtime per latency axis ----------------------------------------------------------------
def figs(html: Path) -> dict[str, dict]:
    found = re.findall(
        r"<script type='application/json' class='fig' data-target='([^']+)'>(.*?)</script>",
        html.read_text(),
        re.S,
    )
    return {div: json.loads(body) for div, body in found}


def points(fig: dict) -> list[tuple[int, float, str]]:
    """(trial number, x, hover text) of every marker of a scatter figure."""
    out = []
    for t in fig["data"]:
        if t.get("meta") in ("points",):
            for x, text in zip(t["x"], t["hovertext"], strict=True):
                out.append((int(re.search(r" #(\d+) ", text).group(1)), x, text))
    return out


@pytest.fixture(scope="module")
def compressed(tmp_path_factory) -> Path:
    run = fake_run(tmp_path_factory.mktemp("truth") / "run", trials=8)
    add_compression(run, top=2, fail_one=False)
    return run


def test_each_latency_plot_holds_one_runtime(compressed, tmp_path):
    report = make_report([compressed], out=tmp_path / "rep", png=False)
    df = report.runs[0].trials.set_index("number")
    int8 = set(df.index[df.policy_label == "int8"])
    assert int8 and (df.loc[list(int8), "latency_ms"] == df.loc[list(int8), "onnx_latency_ms"]).all()
    f = figs(report.html)
    torch_fig, ort_fig = f["plot-torch_latency_ms"], f["plot-ort_latency_ms"]
    assert (
        "PyTorch" in torch_fig["layout"]["xaxis"]["title"]["text"]
        and "ms" in torch_fig["layout"]["xaxis"]["title"]["text"]
    )
    assert "ONNX Runtime" in ort_fig["layout"]["xaxis"]["title"]["text"]
    on_torch = points(torch_fig)
    # no int8 model (timed in ORT only) on the PyTorch axis; every other timed trial is, at its PyTorch time
    assert not int8 & {n for n, _, _ in on_torch}
    assert sorted(n for n, _, _ in on_torch) == sorted(df.index[df.latency_ms.notna() & ~df.index.isin(int8)])
    assert all(
        x == df.loc[n, "latency_ms"] and df.loc[n, "latency_runtime"] == "pytorch" for n, x, _ in on_torch
    )
    assert all(x == df.loc[n, "ort_latency_ms"] for n, x, _ in points(ort_fig))
    # the PNG grid shows one latency panel: ORT's, once compression timed every model there
    fig = fronts_figure(report.runs)
    try:
        labels = [ax.get_xlabel() for ax in fig.axes if ax.get_xlabel()]
        assert [lab for lab in labels if "latency" in lab] == [dict(AXES)["ort_latency_ms"]]
    finally:
        close(fig)


def test_ort_only_passes_are_the_terminal_ones():
    from compress.passes import get_pass, list_passes

    assert {name for name, _ in list_passes() if get_pass(name).terminal} == set(ORT_ONLY_PASSES)


# -- human units ---------------------------------------------------------------------------------
def test_bytes_params_and_drops_read_in_human_units(compressed, tmp_path):
    report = make_report([compressed], out=tmp_path / "rep", png=False)
    text = report.html.read_text()
    data = json.loads(
        re.search(r'<script type="application/json" id="trial-data">(.*?)</script>', text, re.S)[1]
    )
    cols = data["columns"]
    for col in ("params", "flops", "size_bytes", "acc_drop"):
        raw = [r[cols.index(col)] for r in data["rows"]]
        shown = [s[cols.index(col)] for s in data["shown"]]
        assert any(v is not None and v >= 1e4 for v in raw) or col == "acc_drop"
        for v, s in zip(raw, shown, strict=True):
            if v is None:
                continue
            assert "e+" not in s and "e-" not in s, (col, v, s)
            if col == "size_bytes":
                assert re.fullmatch(r"[\d.]+ (k|M|G)?B", s), s
            if col == "acc_drop":
                assert s.endswith(" points"), s
    assert "acc_drop (points)" in text  # the header says the unit
    hovers = [t for fig in figs(report.html).values() for _, _, t in points(fig)]
    assert hovers and not any(re.search(r"\de[+-]\d", h) for h in hovers)
    assert any(re.search(r"size = [\d.]+ kB", h) for h in hovers) and any("points" in h for h in hovers)
    cards = text.split('id="candidates"')[1].split('id="apart"')[0]
    assert "compressed variants" in cards and not re.search(r"\de[+-]\d", cards)


def test_units_formatter():
    assert human(999_700, "params") == "1M" and human(12_345.0, "params") == "12.3k"
    assert human(1_234_567.0, "size_bytes") == "1.23 MB" and human(850.0, "file_bytes") == "850 B"
    assert human(0.3, "acc_drop") == "0.30 points" and human(float("nan"), "params") == "-"


# -- markers and legends -------------------------------------------------------------------------
def test_no_marker_hides_an_architecture_dot(compressed, tmp_path):
    report = make_report([compressed], out=tmp_path / "rep", png=False)
    for div, fig in figs(report.html).items():
        traces = [t for t in fig["data"] if t.get("mode") == "markers"]
        if not traces:
            continue
        filled = [i for i, t in enumerate(traces) if not t["marker"]["symbol"].endswith("-open")]
        # the architectures are the one filled trace, drawn before every marker that may cover them
        assert [traces[i]["name"] for i in filled] == ["architectures"] and filled == [0], div
        assert fig["layout"]["legend"]["x"] > 1 and fig["layout"]["legend"]["xanchor"] == "left", div
    # int8 keeps its architecture's params: its diamond sits on the dot, which must show through
    f = figs(report.html)["plot-params"]
    (int8,) = [t for t in f["data"] if t["name"] == "compressed: int8"]
    (arch,) = [t for t in f["data"] if t["name"] == "architectures"]
    assert set(int8["x"]) <= set(arch["x"]) and int8["marker"]["symbol"] == "diamond-open"


def test_png_legends_lie_outside_every_plot(compressed):
    runs = [load_run(compressed)]
    for make in (front_figure, fronts_figure):
        fig = make(runs)
        try:
            fig.canvas.draw()
            r = fig.canvas.get_renderer()
            legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
            assert legends, make.__name__
            for leg in legends:
                box = leg.get_window_extent(r)
                for ax in fig.axes:
                    if ax.axison:
                        assert not box.overlaps(ax.get_window_extent(r)), make.__name__
        finally:
            close(fig)


# -- banners -------------------------------------------------------------------------------------
def banner_texts(html: Path) -> list[str]:
    return re.findall(r"<div class='banner warn'>(.*?)</div>", html.read_text(), re.S)


def test_a_run_at_chance_gets_a_banner_and_a_good_run_none(tmp_path):
    bad = fake_run(tmp_path / "chance", trials=4, at_chance=True)
    report = make_report([bad], png=False)
    (text,) = banner_texts(report.html)
    assert "every trained model (4) scores at chance" in text and "0.100" in text
    good = fake_run(tmp_path / "good", trials=4)
    assert banner_texts(make_report([good], png=False).html) == []


def test_a_compression_over_the_drop_constraint_gets_a_banner(tmp_path):
    run = fake_run(tmp_path / "drop", trials=6)
    add_compression(run, top=2, fail_one=False, drops=(0.1 + 0.2, 14.0))
    (run / "compress.json").write_text(json.dumps({"run": str(run), "constraints": ["acc_drop<=0.3"]}))
    data = load_run(run)
    ((head, lines),) = banners(data)
    # 0.3 meets acc_drop<=0.3 (stored as 0.30000000000000004 it still does); 14 points does not
    assert head.startswith(
        "2 of 4 compressed models lose more accuracy than the run's constraint acc_drop<=0.3"
    )
    assert len(lines) == 2 and all("int8" in line and "14.00 points" in line for line in lines)
    assert "acc_drop&lt;=0.3 points" in make_report([run], png=False).html.read_text()
    (run / "compress.json").write_text(json.dumps({"run": str(run), "constraints": ["acc_drop<=20"]}))
    assert banners(load_run(run)) == []
