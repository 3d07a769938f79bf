"""Reports: `make_report(dirs)` reads one or more run folders (read-only, also beside a running
driver) and writes, into ``<run>/report/`` (several runs: ``<first run>/report-compare/``):

    report.html          one self-contained page: fronts, hypervolume, learning curves, top
                         candidates drawn, failed/stopped trials, a sortable and filterable table
    front.png, fronts.png, hypervolume.png, learning_curves.png   the main plots (matplotlib)
    trials.csv, trials.parquet   every trial of every run, with the report's derived columns

The report sits above what it reads (``search_spaces <- nas <- compress <- report``): run
folders through `nas.store`, policy names through `compress.policy`; nothing below imports it.
Plotly and matplotlib are imported only while a report is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from search_spaces import ConfigError

from .runs import RunData, hypervolume, load_run, policy_label

__all__ = ["Report", "RunData", "hypervolume", "load_run", "make_report", "policy_label", "trials_table"]

HTML_NAME = "report.html"


@dataclass
class Report:
    out: Path
    html: Path
    pngs: list[Path]
    tables: list[Path]
    runs: list[RunData]
    notes: list[str] = field(default_factory=list)

    @property
    def in_progress(self) -> list[str]:
        return [r.name for r in self.runs if r.in_progress]


def default_out(dirs: list[Path]) -> Path:
    return dirs[0] / ("report" if len(dirs) == 1 else "report-compare")


def trials_table(runs: list[RunData]) -> Any:
    """Every trial of every run as one DataFrame, Parquet-safe column types, per-epoch history
    as JSON text."""
    import pandas as pd

    frames = []
    for run in runs:
        df = run.trials.copy()
        df["history"] = [json.dumps(run.histories.get(int(n), [])) for n in df["number"]]
        frames.append(df)
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    for col in df.columns:
        if df[col].dtype != object:
            continue
        if col.startswith("datetime"):
            df[col] = pd.to_datetime(df[col], errors="coerce")
        elif col in ("base_number", "budget", "seed", "duration_s"):
            df[col] = pd.to_numeric(df[col], errors="coerce")
        else:
            df[col] = df[col].map(lambda v: "" if v is None else str(v))
    return df


def _unique_names(runs: list[RunData]) -> None:
    """Two runs called alike (same folder name elsewhere) get their parent folder prefixed."""
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            r.name = f"{r.path.resolve().parent.name}/{r.name}"
            r.trials["run"] = r.name


def make_report(
    dirs: list[str | Path], out: str | Path | None = None, top_k: int = 5, png: bool = True
) -> Report:
    """Write the report of ``dirs`` (compared on one page when several); returns what was written."""
    if not dirs:
        raise ConfigError("give at least one run folder")
    if top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {top_k}")
    paths = [Path(d) for d in dirs]
    runs = [load_run(p) for p in paths]  # every folder is checked before anything is written
    _unique_names(runs)
    dest = Path(out) if out is not None else default_out(paths)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot write the report into {str(dest)!r}: {exc.strerror or exc}; give --out"
        ) from None
    notes = [
        f"run in progress: {r.name} (a nas-run process is writing it; this is a snapshot)"
        for r in runs
        if r.in_progress
    ]
    df = trials_table(runs)
    tables = [dest / "trials.csv"]
    df.to_csv(tables[0], index=False)
    try:
        df.to_parquet(dest / "trials.parquet", index=False)
        tables.append(dest / "trials.parquet")
    except ImportError as exc:  # no Parquet engine: the CSV still holds everything
        notes.append(f"no trials.parquet: {exc}")
    pngs: list[Path] = []
    if png:
        from .png import write_pngs

        pngs = write_pngs(runs, dest, top_k)
    from .html import write_html

    html = write_html(runs, dest / HTML_NAME, top_k, files=[p.name for p in pngs + tables])
    return Report(dest, html, pngs, tables, runs, notes)
