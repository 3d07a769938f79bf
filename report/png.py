"""The report's main plots as PNG files (matplotlib, Agg: no display needed), for papers and CI
logs. Drawn from the same `figures` data as the HTML page.

    front.png            accuracy against the run's second objective (else parameters)
    fronts.png           accuracy against latency (ONNX Runtime's once compression measured it,
                         else PyTorch's: one runtime per axis), parameters, FLOPs and size, 2 x 2
                         (or fewer)

Legends sit outside the plot area (right of it), so no point is hidden under one; ticks read
12k, 1.2M, 1.5MB rather than 10^4.
    hypervolume.png      hypervolume against finished trials, one line per run
    learning_curves.png  validation accuracy and training loss per epoch of the top candidates
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .figures import AXES, Group, axes_for, curve_series, hv_series, log_axis, scatter_groups, y_metric
from .runs import RunData
from .units import tick, unit_of

__all__ = ["front_axis", "front_figure", "fronts_figure", "write_pngs"]

# legend anchored right of the axes (upper left corner of the legend at x = 1.02)
_OUTSIDE = {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0), "borderaxespad": 0.0}

_MARKER = {"circle": "o", "diamond": "D", "star": "*", "x": "x"}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def front_axis(runs: list[RunData]) -> str:
    """The x of the headline plot: the run's second objective if it is one we plot, else params."""
    cols = [c for c, _ in axes_for(runs)]
    objs = [o.metric for o in runs[0].objectives[1:]]
    same = {"onnx_latency_ms": "ort_latency_ms", "latency_ms": "torch_latency_ms"}
    for m in objs:
        if m in cols:
            return m
        if same.get(m) in cols:
            return same[m]
    return "params" if "params" in cols else (cols[0] if cols else "params")


def _scatter(ax: Any, runs: list[RunData], x: str, title: str, legend: bool = True) -> None:
    y = y_metric(runs)
    groups = scatter_groups(runs, x, y)
    for g in groups:
        _draw(ax, g)
    if log_axis(runs, x):
        ax.set_xscale("log")
    _human_ticks(ax, x)
    ax.set_xlabel(title, fontsize=8)
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
    if not groups:
        ax.text(0.5, 0.5, "no trial measured this yet", ha="center", va="center", transform=ax.transAxes)
    elif legend:
        ax.legend(fontsize=7, markerscale=0.6, **_OUTSIDE)


def _human_ticks(ax: Any, metric: str) -> None:
    """x tick labels in SI prefixes; on a log axis the minor ticks at 2 and 5 are labelled too
    (an axis spanning less than a decade has no major tick to read)."""
    if unit_of(metric) not in ("count", "bytes"):
        return
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: tick(v, metric)))
    if ax.get_xscale() == "log":
        import math

        def minor(v: float, _: Any) -> str:
            lead = round(v / 10 ** math.floor(math.log10(v))) if v > 0 else 0
            return tick(v, metric) if lead in (2, 5) else ""

        ax.xaxis.set_minor_formatter(FuncFormatter(minor))


def _draw(ax: Any, g: Group) -> None:
    if g.role == "link":
        xs, ys = [], []
        for x, y in zip(g.x, g.y, strict=True):
            if x is None:
                ax.plot(xs, ys, color=g.color, lw=0.8, zorder=1)
                xs, ys = [], []
            else:
                xs.append(x)
                ys.append(y)
        ax.plot([], [], color=g.color, lw=0.8, label=g.name)
        return
    if g.role == "step":
        ax.plot(g.x, g.y, drawstyle="steps-post", ls="--", lw=1, color=g.color, label=g.name, zorder=2)
        return
    marker = _MARKER.get(g.symbol, "o")
    size = (g.size * 1.4) ** 2 if g.role == "front" else g.size**2 * 0.8
    # filled dots below, hollow outlines above: a dot under a diamond or a star still shows
    z = 3 if not g.open else (5 if g.role == "front" else 4)
    if marker == "x":  # an unfilled marker: its colour is the line's
        ax.scatter(g.x, g.y, s=size, marker=marker, color=g.color, linewidths=1.5, label=g.name, zorder=z)
        return
    ax.scatter(
        g.x,
        g.y,
        s=size,
        marker=marker,
        facecolors="none" if g.open else g.color,
        edgecolors=g.color,
        linewidths=1.4 if g.open else 0.8,
        alpha=None if g.open else 0.85,
        label=g.name,
        zorder=z,
    )


def front_figure(runs: list[RunData]) -> Any:
    """The headline plot: one plane, big enough to read in a README."""
    plt = _plt()
    x = front_axis(runs)
    fig, ax = plt.subplots(figsize=(10, 5))
    _scatter(ax, runs, x, dict(AXES).get(x, x))
    ax.set_title(f"{_title(runs)}\n{y_metric(runs)} against {x}", fontsize=9)
    return fig


def fronts_figure(runs: list[RunData]) -> Any | None:
    """Accuracy against each cost axis, 2 x 2 (or fewer); the legend right of the grid."""
    plt = _plt()
    # one latency plot: ONNX Runtime's once compression trials measured it (every compressed
    # model and its uncompressed base timed alike), else PyTorch's from the search
    axes = axes_for(runs)
    ort = any((r.trials["kind"] == "compressed").any() for r in runs) and "ort_latency_ms" in dict(axes)
    axes = [a for a in axes if a[0] != ("torch_latency_ms" if ort else "ort_latency_ms")]
    if not axes:
        return None
    n = len(axes)
    cols = 2 if n > 1 else 1
    rows = (n + 1) // 2
    fig, grid = plt.subplots(rows, cols, figsize=(6.5 * cols + 3, 4.5 * rows), squeeze=False)
    for i, (col, title) in enumerate(axes):
        _scatter(grid[i // cols][i % cols], runs, col, title, legend=False)
    for j in range(n, rows * cols):
        grid[j // cols][j % cols].axis("off")
    fig.suptitle(_title(runs), fontsize=10)
    fig.tight_layout()
    seen: dict[str, Any] = {}  # every panel's entries once (the size panel has its hollow estimates)
    for ax in fig.axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(lab, h)
    handles, labels = list(seen.values()), list(seen)
    if handles:  # one legend for all panels, in the figure's right margin
        fig.subplots_adjust(right=1 - 3 / fig.get_figwidth())
        fig.legend(
            handles,
            labels,
            fontsize=7,
            markerscale=0.6,
            loc="upper left",
            bbox_to_anchor=(1 - 2.9 / fig.get_figwidth(), 0.95),
        )
    return fig


def write_pngs(runs: list[RunData], out: Path, top_k: int = 5) -> list[Path]:
    plt = _plt()
    paths = [_save(front_figure(runs), out / "front.png")]
    fig = fronts_figure(runs)
    if fig is not None:
        paths.append(_save(fig, out / "fronts.png"))
    objectives, series = hv_series(runs)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in series:
        ax.plot(s["n"], s["hv"], marker=".", label=s["label"])
        if s["compress_from"] is not None:
            ax.axvline(s["compress_from"], ls=":", color="#888")
    ax.set_xlabel("finished trials")
    ax.set_ylabel("hypervolume")
    ax.set_title(f"hypervolume ({', '.join(map(str, objectives))})", fontsize=10)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=8, **_OUTSIDE)
    paths.append(_save(fig, out / "hypervolume.png"))
    curves = curve_series(runs, top_k)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for c in curves:
        (line,) = a1.plot(
            c["epoch"],
            [v if v is not None else float("nan") for v in c["val_acc"]],
            marker=".",
            label=c["label"],
        )
        loss = [v if v is not None else float("nan") for v in c["train_loss"]]
        a2.plot(c["epoch"], loss, ls=":", marker=".", color=line.get_color())
    a1.set(xlabel="epoch", ylabel="validation accuracy", title="top candidates")
    a2.set(xlabel="epoch", ylabel="training loss")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    if curves:
        a2.legend(*a1.get_legend_handles_labels(), fontsize=7, **_OUTSIDE)
    paths.append(_save(fig, out / "learning_curves.png"))
    return paths


def _title(runs: list[RunData]) -> str:
    """``unireplk on mnist1d, surrogate, 24 trials (+ 18 compressed)``; several runs: their names."""
    if len(runs) > 1:
        return " vs ".join(r.title for r in runs)
    run = runs[0]
    kinds = run.trials[run.trials["status"] == "complete"]["kind"].value_counts().to_dict()
    what = f"{kinds.get('architecture', 0)} architectures"
    if kinds.get("compressed"):
        what += f" + {kinds['compressed']} compressed"
    c = run.config
    where = f"{c['space']} on {c['dataset']}, " if "space" in c else ""
    return f"{run.name}: {where}{run.strategy}, {what}"


def _save(fig: Any, path: Path) -> Path:
    if not fig.legends:  # a figure legend placed in its margin stays where it was put
        fig.tight_layout()
    fig.savefig(path, dpi=130, bbox_inches="tight")  # legends outside the axes stay in the file
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
