"""The README's main command in small: search, then compress, report and export in one call."""

from __future__ import annotations

import onnx

from nas.search import open_store
from nas_run.cli import main


def test_search_then_compress_report_and_export(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["search", "--space", "nb201", "--dataset", "digits", "--trials", "2", "--epochs", "1",
            "--out", str(out), "--quiet", "--compress", "--report", "--export", "onnx"]
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    df = open_store(out).dataframe()
    assert (df.stage == "search").sum() == 2 and (df.stage == "compress").sum() == 12  # 2 x 6 built-in
    assert (out / "report" / "report.html").is_file() and (out / "report" / "front.png").is_file()
    model = onnx.load(str(out / "export" / "model.onnx"))
    assert {p.key for p in model.metadata_props} >= {"genotype"}
    assert "check:    passed" in printed and str(out / "report" / "report.html") in printed


def test_a_bad_export_format_is_refused_before_the_search(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["search", "--space", "nb201", "--dataset", "digits", "--out", str(out), "--export", "onxx"]) == 2
    assert "onnx" in capsys.readouterr().err and not out.exists()
