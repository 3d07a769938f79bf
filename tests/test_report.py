"""`nas-run report`: what the page, the PNGs and the tables hold, on a real run and on runs with
failed trials, a single trial, three objectives, compression results, and runs compared.
The page in a real browser: tests/test_report_browser.py (slow)."""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from report_runs import INT8, STRUCTURED_KD, add_compression, fake_run

from nas.config import SearchConfig
from nas.objectives import parse_objectives
from nas.pareto import hypervolume_2d
from nas.search import LOCK_FILE, open_store, run_search
from nas.store import RunStore
from nas.trial import Candidate, TrialResult
from nas_run.report_cmd import add_report_parser, report_command
from report import hypervolume, load_run, make_report, policy_label
from report.arch_draw import draw_architecture, draw_cell
from report.figures import axes_for, hv_series, scatter_groups
from search_spaces import Genotype, NasRunError, get_space
from search_spaces.nasnet_cell import loose_ends


def cli(argv: list[str]) -> int:
    """`nas-run report ...` as the CLI runs it (user errors: one line, exit 2)."""
    parser = argparse.ArgumentParser(prog="nas-run")
    add_report_parser(parser.add_subparsers(dest="command"))
    try:
        return report_command(parser.parse_args(["report", *argv]))
    except NasRunError as exc:
        print(f"nas-run: error: {exc}")
        return 2


def figs(html: Path) -> dict[str, dict]:
    """The Plotly figures embedded in the page, by div id."""
    text = html.read_text()
    found = re.findall(
        r"<script type='application/json' class='fig' data-target='([^']+)'>(.*?)</script>", text, re.S
    )
    return {div: json.loads(body) for div, body in found}


def drawn(fig: dict, role: str = "points") -> int:
    return sum(len(t["x"]) for t in fig["data"] if t.get("meta") == role)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "run"
    run_search(
        SearchConfig(space="nb201", dataset="digits", trials=3, epochs=1, batch_size=128, out=str(out))
    )
    return out


def test_report_of_a_real_run_writes_page_pngs_csv_and_parquet(real_run, capsys):
    assert cli([str(real_run)]) == 0
    out = real_run / "report"
    assert "report:" in capsys.readouterr().out
    html = out / "report.html"
    text = html.read_text()
    # self-contained: Plotly's JS is inside, nothing is fetched from anywhere
    assert "Plotly" in text and len(text) > 1_000_000
    assert not re.search(r"<script[^>]+src=", text) and not re.search(r"<link[^>]+href=", text)
    for name in ("front.png", "fronts.png", "hypervolume.png", "learning_curves.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    csv = pd.read_csv(out / "trials.csv")
    pq = pd.read_parquet(out / "trials.parquet")
    assert len(csv) == len(pq) == 3 and list(csv.number) == list(pq.number) == [0, 1, 2]
    assert np.allclose(csv.val_acc, pq.val_acc) and (csv.size_source == "params x 4").all()
    assert np.allclose(csv.size_bytes, csv.params * 4)  # labelled estimate: float32 weights
    assert json.loads(pq.history[0])[0]["epoch"] == 1.0  # per-epoch history kept
    f = figs(html)
    assert {
        "plot-torch_latency_ms",
        "plot-params",
        "plot-flops",
        "plot-size_bytes",
        "plot-hypervolume",
        "plot-curves",
    } <= set(f)
    assert drawn(f["plot-params"]) == 3  # each trial exactly once
    store_front = set(open_store(real_run, read_only=True).pareto().number)
    assert drawn(f["plot-params"], "front") == len(store_front)
    assert len(f["plot-hypervolume"]["data"][0]["y"]) == 3
    assert "NAS-Bench-201 cell" in text  # top candidates drawn


def test_failed_stopped_and_violating_trials_are_shown_apart(tmp_path):
    run = fake_run(tmp_path / "flaky", trials=12, fail_every=4, constraints=("params<=50000",))
    report = make_report([run], png=False)
    df = report.runs[0].trials
    assert {"failed", "stopped", "complete"} <= set(df.status)
    bad = df[(df.status == "complete") & (df.violation > 0)]
    assert len(bad) > 0
    f = figs(report.html)
    groups = {t["name"]: len(t["x"]) for t in f["plot-params"]["data"] if t["meta"] == "points"}
    assert groups["violates a constraint"] == len(bad)
    assert drawn(f["plot-params"]) == int(df.params.notna().sum())  # failed/stopped: no params
    assert not df[df.on_front].violation.gt(0).any() and df[df.on_front].status.eq("complete").all()
    text = report.html.read_text()
    apart = text.split('id="apart"')[1].split('id="table"')[0]
    assert apart.count("boom: simulated crash") == (df.status == "failed").sum()
    assert "stopped" in apart
    stopped = df[df.status == "stopped"]
    assert (stopped.epochs == 1).all()  # the epochs it ran, from its history


def test_a_run_whose_every_trial_failed_still_reports(tmp_path):
    run = fake_run(tmp_path / "allfail", trials=2, fail_every=1)
    report = make_report([run])
    assert set(report.runs[0].trials.status) == {"failed"}
    assert report.html.is_file() and all(p.is_file() for p in report.pngs)


def test_single_trial(tmp_path):
    report = make_report([fake_run(tmp_path / "one", trials=1)], png=False)
    f = figs(report.html)
    assert drawn(f["plot-params"]) == 1 and drawn(f["plot-params"], "front") == 1
    assert len(f["plot-hypervolume"]["data"][0]["y"]) == 1
    assert len(pd.read_parquet(report.out / "trials.parquet")) == 1


def test_three_objectives_front_and_hypervolume(tmp_path):
    run = fake_run(tmp_path / "three", trials=10, objectives="val_acc,params,latency_ms")
    report = make_report([run], png=False)
    data = report.runs[0]
    assert len(data.objectives) == 3
    assert set(data.trials[data.trials.on_front].number) == set(
        open_store(run, read_only=True).pareto().number
    )
    objectives, series = hv_series([data])
    hv = series[0]["hv"]
    assert len(hv) == 10 and all(b >= a for a, b in itertools.pairwise(hv)) and hv[-1] > 0
    assert "val_acc:max, params:min, latency_ms:min" in report.html.read_text()


def test_compressed_pairs_are_points_linked_to_their_architecture(tmp_path):
    run = fake_run(tmp_path / "comp", trials=6)
    n = add_compression(run, top=2)
    report = make_report([run], png=False)
    df = report.runs[0].trials
    comp = df[df.kind == "compressed"]
    assert len(comp) == n and set(comp.policy_label) == {"structured 0.5 + finetune 4 kd", "int8"}
    done = comp[comp.status == "complete"]
    assert (done.size_source == "onnx file").all() and np.allclose(done.size_bytes, done.file_bytes)
    # a compressed architecture's own size is its measured ONNX file, the others' params x 4
    arch = df[df.kind == "architecture"]
    measured = arch.genotype_id.isin(done.genotype_id)
    assert (arch[measured].size_source == "onnx file").all() and (
        arch[~measured].size_source == "params x 4"
    ).all()
    assert all(
        df.loc[df.number == b, "genotype_id"].item() == g
        for b, g in zip(comp.base_number, comp.genotype_id, strict=True)
    )
    f = figs(report.html)["plot-size_bytes"]
    assert drawn(f) == int(df.size_bytes.notna().sum())
    (link,) = [t for t in f["data"] if t["meta"] == "link"]
    assert len(link["x"]) == 3 * len(done)  # base, variant, gap
    assert any(t["name"].startswith("compressed: ") for t in f["data"])
    assert "compressed variants" in report.html.read_text()


def test_two_runs_compared_on_one_page(tmp_path):
    a = fake_run(tmp_path / "a" / "run", trials=8, strategy="random")
    b = fake_run(tmp_path / "b" / "run", trials=8, strategy="evolution", seed=1)  # same folder name
    assert cli([str(a), str(b), "--no-png"]) == 0
    out = a / "report-compare"
    f = figs(out / "report.html")
    labels = [t["name"] for t in f["plot-hypervolume"]["data"]]
    assert labels == ["a/run (random)", "b/run (evolution)"]
    assert drawn(f["plot-params"]) == 16
    runs = pd.read_csv(out / "trials.csv").run
    assert runs.value_counts().to_dict() == {"a/run": 8, "b/run": 8}


def test_a_compress_model_folder_reports_too(tmp_path):
    """`nas-run compress --model ... --out DIR` makes a folder with compress.json, no config.json."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "compress.json").write_text(
        json.dumps({"model": "m.pt", "objectives": ["val_acc", "onnx_latency_ms"]})
    )
    objectives = parse_objectives("val_acc,onnx_latency_ms")
    store = RunStore(f"sqlite:///{out / 'study.db'}", objectives, (), study_name=out.name)
    g = Genotype("user", 1, (("sha1", "habc"),))
    for k, policy in enumerate(("", INT8)):
        number = store.start(g.to_str(), g.id, 1, "policy-list", 0, policy=policy, stage="compress")
        metrics = {
            "val_acc": 0.9 - 0.01 * k,
            "onnx_latency_ms": 1.0 - 0.3 * k,
            "file_bytes": 4e4 / (1 + 3 * k),
        }
        store.finish(Candidate(g, 1, number, policy), TrialResult("complete", metrics, (), "", 0.1))
    report = make_report([out], png=False)
    assert drawn(figs(report.html)["plot-ort_latency_ms"]) == 2
    assert "<code>user@1|sha1=habc</code>" in report.html.read_text()


def test_report_beside_a_running_driver_reads_only_and_says_so(tmp_path, capsys):
    run = fake_run(tmp_path / "live", trials=3)
    db = (run / "study.db").read_bytes()
    with open(run / LOCK_FILE, "w") as lock:  # what a driver holds while it runs
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert cli([str(run), "--no-png"]) == 0
    assert "run in progress" in capsys.readouterr().out
    assert hashlib.sha1((run / "study.db").read_bytes()).digest() == hashlib.sha1(db).digest()
    assert "run in progress" in (run / "report" / "report.html").read_text()


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert cli([str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().out.strip().splitlines() == [
        f"nas-run: error: unknown run folder {str(tmp_path / 'nope')!r}: no such folder"
    ]
    (tmp_path / "empty").mkdir()
    assert cli([str(tmp_path / "empty")]) == 2
    assert "is not a run folder" in capsys.readouterr().out
    run = fake_run(tmp_path / "ok", trials=1)
    assert cli([str(run), "--top-k", "0"]) == 2


def test_architectures_are_drawn_by_their_shape():
    rng = np.random.default_rng(0)
    darts = get_space("darts").sample(rng)
    svg = draw_architecture(darts.to_str())
    assert svg.count("<svg") == 2 and "reduction cell" in svg and svg.count(">concat<") == 2
    assert all(f"block {j}" in svg for j in range(4))
    nasnet = draw_architecture(get_space("nasnet").sample(rng).to_str())
    assert "block 4" in nasnet
    nb = get_space("nb201").sample(rng)
    svg = draw_architecture(nb.to_str())
    assert all(op in svg for op in nb["edges"]) and "output" in svg
    lk = get_space("unireplk").tiny().sample(rng)
    table = draw_architecture(lk.to_str())
    assert table.count("<tr>") == 1 + len(lk.keys()) and "kernel" in table
    # the concatenation follows the space's rule: all blocks (DARTS) or the loose ends (NASNet)
    blocks = (
        (0, "skip_connect", 1, "sep_conv_3x3"),
        (0, "max_pool_3x3", 2, "sep_conv_5x5"),
        (1, "avg_pool_3x3", 2, "dil_conv_3x3"),
    )
    assert draw_cell(blocks, "c", concat="all").count('class="to-concat"') == 3
    assert (
        draw_cell(blocks, "c", concat="loose_ends").count('class="to-concat"') == len(loose_ends(blocks)) == 2
    )
    assert draw_architecture("user@1|sha1=habc").startswith("<code>")
    assert draw_architecture("not a genotype").startswith("<code>")


def test_policy_labels_from_the_policy_text():
    assert policy_label("") == "none"
    assert policy_label(STRUCTURED_KD) == "structured 0.5 + finetune 4 kd"
    assert policy_label(INT8) == "int8"


def test_hypervolume_matches_2d_and_a_brute_force_count():
    rng = np.random.default_rng(1)
    pts = rng.integers(0, 6, size=(12, 2)).astype(float)
    ref = np.array([6.0, 6.0])
    assert hypervolume(pts, ref) == pytest.approx(hypervolume_2d(pts, ref))
    # 3-D on an integer grid: count the unit cubes some point dominates
    pts = rng.integers(0, 5, size=(9, 3)).astype(float)
    ref = np.array([5.0, 5.0, 5.0])
    cells = np.array(list(itertools.product(range(5), repeat=3)), dtype=float)
    covered = ((pts[None, :, :] <= cells[:, None, :]).all(-1)).any(1).sum()
    assert hypervolume(pts, ref) == pytest.approx(covered)


def test_scatter_puts_every_plottable_trial_in_exactly_one_group(tmp_path):
    run = fake_run(tmp_path / "g", trials=8, fail_every=3)
    add_compression(run, top=2)
    data = load_run(run)
    for col, _ in axes_for([data]):
        groups = scatter_groups([data], col)
        pts = sorted(t for g in groups if g.role == "points" for t in g.text)
        rows = data.trials[data.trials[col].notna() & data.trials.val_acc.notna()]
        assert len(pts) == len(rows) == len(set(pts)), col

