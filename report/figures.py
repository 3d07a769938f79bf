"""What the plots show, as plain data: both the HTML page (Plotly) and the PNGs (matplotlib) draw
from these, so the two never disagree about which trial is where.

A scatter plot is a list of `Group`s. Every trial with finite coordinates lies in exactly one
group of role ``points`` (the browser test counts them); ``front`` groups mark the run's Pareto
front over its objectives again, on top; ``step`` groups are the 2-D front in the plot's own
plane (a staircase); ``link`` groups join each architecture to its compressed variants.

No marker hides another: architectures are the only filled markers and are drawn first; compressed
variants (an int8 model has its float model's parameters, so it sits exactly on its architecture),
violators and the front's stars are hollow outlines on top. Each latency axis holds one runtime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nas.objectives import Objective

from .runs import LOG_METRICS, RunData, hypervolume_curve, reference_point
from .units import human

__all__ = [
    "AXES",
    "NAMES",
    "Group",
    "axes_for",
    "curve_series",
    "hv_series",
    "scatter_groups",
    "top_candidates",
]

# (column, axis title); a plot is drawn for each column some trial measured. One runtime per
# latency axis: PyTorch's (`torch_latency_ms`, int8 models have none) and ONNX Runtime's
AXES: tuple[tuple[str, str], ...] = (
    ("torch_latency_ms", "latency in PyTorch, ms (CPU, batch 1, 1 thread)"),
    ("ort_latency_ms", "latency in ONNX Runtime, ms (CPU, batch 1, 1 thread)"),
    ("params", "parameters (k = thousand, M = million)"),
    ("flops", "FLOPs (M = million, G = billion)"),
    ("size_bytes", "model size, bytes (ONNX file; not exported: params x 4 B, float32; kB = 1000 B)"),
)
# metric -> its name for people (hover lines, plot titles)
NAMES = {
    "test_acc": "test_acc", "params": "params", "flops": "FLOPs", "torch_latency_ms": "PyTorch latency",
    "ort_latency_ms": "ONNX Runtime latency", "size_bytes": "size", "acc_drop": "accuracy drop",
    "speedup": "speedup (ORT)",
}  # fmt: skip
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
POLICY_PALETTE = ("#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")
FRONT_COLOR, VIOLATOR_COLOR, PARTIAL_COLOR = "#ffbf00", "#d62728", "#9e9e9e"


@dataclass
class Group:
    name: str  # legend entry
    role: str  # points | front | step | link
    x: list[float | None] = field(default_factory=list)
    y: list[float | None] = field(default_factory=list)
    text: list[str] = field(default_factory=list)  # hover text, one per point
    color: str = PALETTE[0]
    symbol: str = "circle"  # Plotly's names; png.py maps them to matplotlib markers
    size: int = 8
    open: bool = False  # hollow marker


def y_metric(runs: list[RunData]) -> str:
    """Accuracy on the y axis; a run without it (a custom objective) plots its primary one."""
    for run in runs:
        if run.trials["val_acc"].notna().any():
            return "val_acc"
    return runs[0].objectives[0].metric


def axes_for(runs: list[RunData]) -> list[tuple[str, str]]:
    """The x axes some trial of the runs measured."""
    return [(c, t) for c, t in AXES if any(c in r.trials and r.trials[c].notna().any() for r in runs)]


def log_axis(runs: list[RunData], metric: str) -> bool:
    if metric in LOG_METRICS:
        return True
    vals = np.concatenate([r.trials[metric].to_numpy(dtype=float) for r in runs if metric in r.trials])
    vals = vals[np.isfinite(vals) & (vals > 0)]
    return len(vals) > 1 and vals.max() / vals.min() > 30


def hover(row: dict[str, Any], x: str, y: str) -> str:
    """The point's hover text: what it is, then its metrics in human units (``12.3k``, ``1.2 MB``)."""
    head = f"{row['run']} #{row['number']} {row['kind']} ({row['status']})"
    lines = [head, f"{row['genotype_id']}  policy: {row['policy_label']}"]
    keys = [y, x, "test_acc", "params", "flops", "torch_latency_ms", "ort_latency_ms", "size_bytes", "acc_drop",
            "speedup"]  # fmt: skip
    for k in dict.fromkeys(keys):
        if k in row and isinstance(row[k], float) and math.isfinite(row[k]):
            extra = f" ({row['size_source']})" if k == "size_bytes" and row.get("size_source") else ""
            lines.append(f"{NAMES.get(k, k)} = {human(row[k], k)}{extra}")
    if row.get("violation", 0) > 0:
        lines.append(f"violates a constraint by {human(row['violation'])}")
    return "<br>".join(lines)


def _finite(row: dict[str, Any], *cols: str) -> bool:
    return all(isinstance(row.get(c), float) and math.isfinite(row[c]) for c in cols)


def scatter_groups(runs: list[RunData], x: str, y: str | None = None) -> list[Group]:
    """The groups of the plot of ``y`` (accuracy) against ``x`` over all runs."""
    y = y or y_metric(runs)
    compare = len(runs) > 1
    policies = sorted(
        {p for r in runs for p in r.trials.loc[r.trials["kind"] == "compressed", "policy_label"]}
    )
    groups: list[Group] = []
    for i, run in enumerate(runs):
        color = PALETTE[i % len(PALETTE)]
        prefix = f"{run.name}: " if compare else ""
        rows = [r for r in run.trials.to_dict("records") if _finite(r, x, y)]
        arch = Group(f"{prefix}architectures", "points", color=color)
        # sizes not measured (params x 4) are drawn hollow, apart from measured ONNX files
        guessed = Group(
            f"{prefix}architectures, size = params x 4 B (not exported)", "points", color=color, open=True
        )
        comp: dict[str, Group] = {}
        bad = Group(
            f"{prefix}violates a constraint",
            "points",
            color=color if compare else VIOLATOR_COLOR,
            symbol="x",
            size=9,
            open=True,
        )
        part = Group(f"{prefix}failed / stopped (last metrics)", "points", color=PARTIAL_COLOR, open=True)
        front = Group(
            f"{prefix}Pareto front ({', '.join(map(str, run.objectives))})",
            "front",
            color=FRONT_COLOR if not compare else color,
            symbol="star",
            size=15,
            open=True,  # the trial's own marker shows through the star
        )
        by_number = {r["number"]: r for r in rows}
        for r in rows:
            if r["status"] != "complete":
                g = part
            elif r["violation"] > 0:
                g = bad
            elif r["kind"] == "compressed":
                label = r["policy_label"]
                if compare:
                    label = "compressed"
                if label not in comp:
                    c = color if compare else POLICY_PALETTE[policies.index(label) % len(POLICY_PALETTE)]
                    comp[label] = Group(
                        f"{prefix}{label}" if compare else f"compressed: {label}",
                        "points",
                        color=c,
                        symbol="diamond",
                        size=11,  # around the architecture dot it may sit on (int8: same params)
                        open=True,
                    )
                g = comp[label]
            elif x == "size_bytes" and r["size_source"] == "params x 4":
                g = guessed
            else:
                g = arch
            _add(g, r, x, y)
            if r["on_front"]:
                _add(front, r, x, y)
        link = Group(f"{prefix}architecture -> compressed", "link", color="#b0b0b0")
        for r in rows:
            base = by_number.get(r["base_number"]) if r["kind"] == "compressed" else None
            if base is not None and r["status"] == "complete":
                link.x += [base[x], r[x], None]
                link.y += [base[y], r[y], None]
        step = Group(f"{prefix}front in this plane", "step", color=color)
        pts = [(r[x], r[y]) for r in rows if r["feasible"]]
        best = -math.inf
        for px, py in sorted(pts, key=lambda p: (p[0], -p[1])):  # min x, max y
            if py > best:
                step.x.append(px)
                step.y.append(py)
                best = py
        groups += [g for g in (link, step, arch, guessed, *comp.values(), bad, part, front) if g.x]
    return groups


def _add(g: Group, r: dict[str, Any], x: str, y: str) -> None:
    g.x.append(float(r[x]))
    g.y.append(float(r[y]))
    g.text.append(hover(r, x, y))


def top_candidates(run: RunData, k: int) -> list[dict[str, Any]]:
    """The run's best ``k`` architectures: those on the front (or whose compressed variants are),
    best primary objective first, then the best other feasible ones. Each row gets
    ``variants``: its complete compressed trials."""
    df = run.trials
    primary = run.objectives[0]
    asc = primary.direction == "min"
    arch = df[(df["kind"] == "architecture") & (df["status"] == "complete")]
    comp = df[(df["kind"] == "compressed") & (df["status"] == "complete")]
    user = arch.empty  # a `compress --model` folder: the user's model has compression trials only
    if user:
        arch = comp
    if primary.metric in arch:
        arch = arch.sort_values(primary.metric, ascending=asc, na_position="last")
    if user:  # its card is the uncompressed model (identity policy) where that was measured
        arch = arch.sort_values("policy_label", key=lambda p: p != "none", kind="stable")
    arch = arch.drop_duplicates("genotype_id")
    front_ids = set(df.loc[df["on_front"], "genotype_id"])
    ranked = [r for r in arch.to_dict("records") if r["genotype_id"] in front_ids]
    ranked += [r for r in arch.to_dict("records") if r["genotype_id"] not in front_ids and r["feasible"]]
    out = []
    for r in ranked[:k]:
        mine = comp[(comp["genotype_id"] == r["genotype_id"]) & (comp["number"] != r["number"])]
        r["variants"] = mine.to_dict("records")
        out.append(r)
    return out


def curve_series(runs: list[RunData], k: int) -> list[dict[str, Any]]:
    """Per-epoch history of each run's top ``k`` architectures: ``{run, label, epoch, val_acc,
    train_loss}`` lists (metrics missing from an epoch are None)."""
    out = []
    for run in runs:
        for r in top_candidates(run, k):
            hist = run.histories.get(int(r["number"])) or []
            if not hist:
                continue
            out.append(
                {
                    "run": run.name,
                    "label": f"{run.name + ' ' if len(runs) > 1 else ''}#{r['number']} {r['genotype_id']}",
                    "epoch": [h.get("epoch") for h in hist],
                    "val_acc": [h.get("val_acc") for h in hist],
                    "train_loss": [h.get("train_loss") for h in hist],
                }
            )
    return out


def hv_series(runs: list[RunData]) -> tuple[tuple[Objective, ...], list[dict[str, Any]]]:
    """Hypervolume of the feasible points so far against finished trials, one series per run,
    on the first run's objectives (runs without those metrics get no series)."""
    objectives = runs[0].objectives
    ref = reference_point(runs, objectives)
    series = []
    if ref is None:
        return objectives, series
    for run in runs:
        curve = hypervolume_curve(run, objectives, ref)
        if not curve:
            continue
        df = run.trials
        comp = df.loc[df["kind"] == "compressed", "number"]
        first_comp = int(comp.min()) if len(comp) else None
        start = next((n for n, number, _ in curve if first_comp is not None and number >= first_comp), None)
        series.append(
            {
                "run": run.name,
                "label": run.title,
                "n": [c[0] for c in curve],
                "number": [c[1] for c in curve],
                "hv": [c[2] for c in curve],
                "compress_from": start,  # x where compression trials begin (None: none)
            }
        )
    return objectives, series
