"""`nas-run report DIR [DIR2 ...]`: one HTML page (plus PNGs, CSV and Parquet) per run, or one
page comparing several runs. Reads only: safe beside a running driver."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_report_parser", "report_command"]


def add_report_parser(sub: Any) -> None:
    r = sub.add_parser(
        "report",
        help="an HTML report (and PNGs, CSV, Parquet) of a run, or of several runs compared",
        description=(
            "Write a self-contained HTML page (opens offline), the main plots as PNG and all trials as "
            "CSV and Parquet into DIR/report/ (several runs: DIR/report-compare/, compared on one page). "
            "Reads the run only, so it works while the run is still being written."
        ),
    )
    r.add_argument("dirs", nargs="+", metavar="DIR", help="run folder(s); several are compared")
    r.add_argument(
        "--out", metavar="FOLDER", help="where to write (default DIR/report or DIR/report-compare)"
    )
    r.add_argument(
        "--top-k", type=int, default=5, help="candidates drawn and learning curves shown per run (5)"
    )
    r.add_argument("--no-png", action="store_true", help="skip the PNG files (matplotlib)")


def report_command(args: argparse.Namespace) -> int:
    from report import make_report

    report = make_report(args.dirs, out=args.out, top_k=args.top_k, png=not args.no_png)
    for run in report.runs:
        counts = run.trials["status"].value_counts().to_dict() if len(run.trials) else {}
        shown = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no trials yet"
        print(f"{run.name}: {shown}")
    for note in report.notes:
        print(note)
    print(f"report: {report.html}")
    for path in report.pngs + report.tables:
        print(f"        {path}")
    return 0
