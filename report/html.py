"""The report page: one self-contained HTML file (Plotly's JavaScript embedded, no CDN, no
server), so it opens from ``file://`` on a machine without network and can be mailed or
archived with the run.

Every figure's JSON sits in a ``<script type="application/json">`` and is drawn by one small
script that also records, per plot, how many markers the browser really drew (``data-points``
on the plot's div) and any script error (``data-errors`` on ``<body>``): the browser test
(`tests/test_report_browser.py`) reads those from the rendered DOM.
"""

from __future__ import annotations

import json
import math
import time
from html import escape
from pathlib import Path
from typing import Any

from .arch_draw import draw_architecture
from .banners import banners
from .figures import (
    NAMES,
    Group,
    axes_for,
    curve_series,
    hv_series,
    log_axis,
    scatter_groups,
    top_candidates,
    y_metric,
)
from .runs import RunData
from .units import human, label, unit_of

__all__ = ["write_html", "TABLE_COLUMNS"]

TABLE_COLUMNS = (
    "run", "number", "status", "kind", "strategy", "genotype_id", "policy_label", "val_acc", "test_acc",
    "params", "flops", "torch_latency_ms", "ort_latency_ms", "size_bytes", "size_source", "acc_drop", "speedup",
    "violation", "on_front", "epochs", "duration_s", "error", "genotype",
)  # fmt: skip
PLOT_CONFIG = {"displaylogo": False, "responsive": True, "toImageButtonOptions": {"format": "png"}}

_CSS = """
body{font-family:system-ui,sans-serif;margin:0 auto;max-width:1250px;padding:0 18px 40px;color:#222}
h1{font-size:1.5em;margin-bottom:.2em} h2{margin-top:1.6em;border-bottom:1px solid #ddd}
.banner{background:#fff4ce;border:1px solid #e0b300;padding:8px 12px;border-radius:6px;margin:10px 0}
#report-errors{color:#b00020;white-space:pre-wrap} .note{color:#555;font-size:.9em}
table{border-collapse:collapse;font-size:.85em} th,td{border:1px solid #ddd;padding:3px 6px;text-align:left}
th{background:#f4f4f4;position:sticky;top:0} #trials th{cursor:pointer;user-select:none}
#trials td{max-width:260px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
#trials td.num{text-align:right;font-variant-numeric:tabular-nums}
.tablewrap{max-height:640px;overflow:auto;border:1px solid #ddd}
.card{border:1px solid #ddd;border-radius:8px;padding:10px 14px;margin:14px 0}
.card svg{display:block;margin:6px 0;max-width:100%;height:auto} nav a{margin-right:12px}
.controls{margin:8px 0} .controls input{width:320px} tr.front td{background:#fff8dc}
"""

_JS = r"""
(function(){
  const errors = [];
  const body = document.body;
  function fail(msg){ errors.push(String(msg)); body.dataset.errors = errors.length;
    document.getElementById('report-errors').textContent = 'errors while drawing:\n' + errors.join('\n'); }
  window.addEventListener('error', e => fail(e.message));
  body.dataset.errors = 0;
  function count(gd){  // markers the browser drew, per role of the trace (points, front, ...)
    const counts = {};
    gd.querySelectorAll('.scatterlayer .trace').forEach(tr => {
      const cd = tr.__data__, meta = (cd && cd[0] && cd[0].trace && cd[0].trace.meta) || 'other';
      counts[meta] = (counts[meta] || 0) + tr.querySelectorAll('path.point').length;
    });
    gd.dataset.points = JSON.stringify(counts);
    gd.dataset.svg = gd.querySelectorAll('svg.main-svg').length;
  }
  const figs = Array.from(document.querySelectorAll('script.fig'));
  const config = JSON.parse(document.getElementById('plot-config').textContent);
  try {
    Promise.all(figs.map(s => {
      const fig = JSON.parse(s.textContent), div = document.getElementById(s.dataset.target);
      return Plotly.newPlot(div, fig.data, fig.layout, config).then(count);
    })).then(() => { body.dataset.report = errors.length ? 'error' : 'rendered'; },
             e => { fail(e); body.dataset.report = 'error'; });
  } catch (e) { fail(e); body.dataset.report = 'error'; }
  // the trial table: click a header to sort, type to filter (all words must match a row)
  const data = JSON.parse(document.getElementById('trial-data').textContent);
  const table = document.getElementById('trials'), tbody = table.querySelector('tbody');
  const filter = document.getElementById('trial-filter'), status = document.getElementById('trial-status');
  const shown = document.getElementById('trial-count');
  let key = data.columns.indexOf('number'), asc = true;
  // cells show the page's human text (12.3k, 1.2 MB, 0.8 points); sorting uses the numbers
  const items = data.rows.map((r, i) => ({r: r, s: data.shown[i]}));
  function draw(){
    const words = filter.value.toLowerCase().split(/\s+/).filter(Boolean), st = status.value;
    const rows = items.filter(it => (!st || it.r[data.columns.indexOf('status')] === st) &&
      words.every(w => it.s.some(v => v.toLowerCase().includes(w))));
    rows.sort((p, q) => { const a = p.r, b = q.r, x = a[key], y = b[key];
      if (x === y) return 0; if (x === null) return 1; if (y === null) return -1;
      const c = (typeof x === 'number' && typeof y === 'number') ? x - y : String(x).localeCompare(String(y));
      return asc ? c : -c; });
    tbody.innerHTML = '';
    const front = data.columns.indexOf('on_front');
    for (const it of rows) { const r = it.r, tr = document.createElement('tr'); if (r[front]) tr.className = 'front';
      r.forEach((v, i) => { const td = document.createElement('td'); td.textContent = it.s[i];
        if (typeof v === 'string' && v.length > 30) td.title = v;
        if (typeof v === 'number') td.className = 'num'; tr.appendChild(td); });
      tbody.appendChild(tr); }
    shown.textContent = rows.length + ' of ' + data.rows.length + ' trials shown';
  }
  table.querySelectorAll('th').forEach((th, i) => th.addEventListener('click', () => {
    asc = key === i ? !asc : true; key = i; draw(); }));
  filter.addEventListener('input', draw); status.addEventListener('change', draw);
  draw();
})();
"""


def _json(obj: Any) -> str:
    """JSON safe inside <script>: no NaN (invalid JSON), no '</' (would close the element)."""
    return json.dumps(_plain(obj), allow_nan=False).replace("</", "<\\/")


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, str):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if v is None or isinstance(v, bool | int | float | str):
        return v
    return str(v)


def _trace(g: Group) -> dict[str, Any]:
    if g.role in ("step", "link"):
        line = {"color": g.color, "width": 1.4 if g.role == "step" else 1}
        if g.role == "step":
            line.update(shape="hv", dash="dash")
        return {"type": "scatter", "mode": "lines", "x": g.x, "y": g.y, "name": g.name, "meta": g.role,
                "line": line, "hoverinfo": "skip", "connectgaps": False}  # fmt: skip
    symbol = g.symbol + ("-open" if g.open else "")
    # an open marker's outline is its colour (Plotly), 2 px so it reads over a dot; filled dots
    # get a white rim and some transparency, so dots on one spot stay countable
    line = {"width": 2 if g.role == "front" else 1.5} if g.open else {"width": 0.5, "color": "#fff"}
    marker = {"color": g.color, "symbol": symbol, "size": g.size, "line": line}
    if not g.open:
        marker["opacity"] = 0.85
    return {"type": "scatter", "mode": "markers", "x": g.x, "y": g.y, "name": g.name, "meta": g.role,
            "marker": marker, "hovertext": g.text, "hoverinfo": "text"}  # fmt: skip


# right of the plot area, never over a point
LEGEND = {"font": {"size": 11}, "x": 1.02, "xanchor": "left", "y": 1, "yanchor": "top"}


def _axis_units(metric: str) -> dict[str, Any]:
    """Tick labels in SI prefixes (12k, 1.2M; bytes as kB, MB), never 1e+06."""
    kind = unit_of(metric)
    if kind in ("count", "bytes"):
        return {"exponentformat": "SI", "ticksuffix": "B" if kind == "bytes" else ""}
    return {"exponentformat": "none"}


def _layout(
    title: str, xtitle: str, ytitle: str, xlog: bool = False, xmetric: str = "", **extra: Any
) -> dict[str, Any]:
    return {
        "title": {"text": title},
        "xaxis": {"title": {"text": xtitle}, "type": "log" if xlog else "linear", "gridcolor": "#eee",
                  **_axis_units(xmetric)},
        "yaxis": {"title": {"text": ytitle}, "gridcolor": "#eee"},
        "height": 470, "template": "plotly_white", "hovermode": "closest",
        "legend": LEGEND, "margin": {"t": 50, "r": 20},
        **extra,
    }  # fmt: skip


def figures(runs: list[RunData], top_k: int) -> list[tuple[str, str, dict[str, Any]]]:
    """(section, div id, Plotly figure as a dict) for every plot of the page."""
    y = y_metric(runs)
    out = []
    for col, title in axes_for(runs):
        groups = scatter_groups(runs, col, y)
        out.append(("fronts", f"plot-{col}", {
            "data": [_trace(g) for g in groups],
            "layout": _layout(f"{y} against {NAMES.get(col, col)}", title, y, log_axis(runs, col), col),
        }))  # fmt: skip
    objectives, series = hv_series(runs)
    data, shapes = [], []
    for s in series:
        data.append({"type": "scatter", "mode": "lines+markers", "x": s["n"], "y": s["hv"], "name": s["label"],
                     "hovertext": [f"after trial #{n}" for n in s["number"]], "hoverinfo": "text+y"})  # fmt: skip
        if s["compress_from"] is not None:
            shapes.append({"type": "line", "x0": s["compress_from"], "x1": s["compress_from"], "yref": "paper",
                           "y0": 0, "y1": 1, "line": {"dash": "dot", "color": "#888"}})  # fmt: skip
    names = ", ".join(str(o) for o in objectives)
    out.append(
        (
            "hv",
            "plot-hypervolume",
            {
                "data": data,
                "layout": _layout(
                    f"hypervolume of the feasible front ({names})",
                    "finished trials",
                    "hypervolume",
                    shapes=shapes,
                ),
            },
        )
    )
    curves = curve_series(runs, top_k)
    data = []
    for i, c in enumerate(curves):
        color = f"hsl({(i * 67) % 360},65%,45%)"
        data.append({"type": "scatter", "mode": "lines+markers", "x": c["epoch"], "y": c["val_acc"], "name": c["label"],
                     "legendgroup": c["label"], "line": {"color": color}, "xaxis": "x", "yaxis": "y"})  # fmt: skip
        if any(v is not None for v in c["train_loss"]):
            data.append({"type": "scatter", "mode": "lines+markers", "x": c["epoch"], "y": c["train_loss"], "name": c["label"],
                         "legendgroup": c["label"], "showlegend": False, "line": {"color": color, "dash": "dot"},
                         "xaxis": "x2", "yaxis": "y2"})  # fmt: skip
    layout = _layout("learning curves of the top candidates", "epoch", "validation accuracy")
    layout.update(xaxis={"domain": [0, 0.46], "title": {"text": "epoch"}},
                  xaxis2={"domain": [0.54, 1], "title": {"text": "epoch"}, "anchor": "y2"},
                  yaxis2={"title": {"text": "training loss"}, "anchor": "x2"})  # fmt: skip
    out.append(("curves", "plot-curves", {"data": data, "layout": layout}))
    return out


def _summary(run: RunData) -> str:
    c = run.config
    counts = run.trials["status"].value_counts().to_dict() if len(run.trials) else {}
    kinds = run.trials["kind"].value_counts().to_dict() if len(run.trials) else {}
    cells = {
        "run folder": str(run.path), "space": c.get("space", "your model"), "dataset": c.get("dataset", ""),
        "strategy": run.strategy, "objectives": ", ".join(map(str, run.objectives)),
        "constraints": ", ".join(map(str, run.constraints)) or "none",
        "compression constraints": ", ".join(map(str, run.compress_constraints)) or "none",
        "trials": ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "none yet",
        "kinds": ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())) or "-",
        "budget": f"{c.get('trials', '?')} trials x {c.get('epochs', '?')} epochs" if "epochs" in c else "-",
    }  # fmt: skip
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in cells.items())
    banner = ""
    if run.in_progress:
        banner = (f"<div class='banner'>run in progress: a nas-run process is writing {escape(run.name)} now; "
                  f"this page is a snapshot of its {len(run.trials)} trials so far. Make the report again later.</div>")  # fmt: skip
    # models at chance, collapsed or over the drop limit must not pass as points on a plot
    for head, lines in banners(run):
        items = "".join(f"<li>{escape(line)}</li>" for line in lines)
        banner += f"<div class='banner warn'>{escape(head)}<ul>{items}</ul></div>"
    return f"<h3>{escape(run.title)}</h3>{banner}<table>{rows}</table>"


def _fmt(v: Any, metric: str = "") -> str:
    return escape(human(v, metric))


def _candidates(runs: list[RunData], top_k: int) -> str:
    out = []
    for run in runs:
        cands = top_candidates(run, top_k)
        if len(runs) > 1:
            out.append(f"<h3>{escape(run.title)}</h3>")
        if not cands:
            out.append("<p class='note'>no completed architecture trials yet</p>")
        for r in cands:
            metrics = ", ".join(f"{k} {_fmt(r.get(k), k)}" for k in ("val_acc", "test_acc", "params", "flops",
                                                                      "torch_latency_ms", "ort_latency_ms")
                                if isinstance(r.get(k), float) and math.isfinite(r[k]))  # fmt: skip
            variants = ""
            if r["variants"]:
                cols = (
                    "policy_label",
                    "val_acc",
                    "acc_drop",
                    "size_bytes",
                    "onnx_latency_ms",
                    "speedup",
                    "size_ratio",
                )
                head = "".join(f"<th>{escape(label(c))}</th>" for c in cols)
                body = "".join(
                    "<tr>" + "".join(f"<td>{_fmt(v.get(c), c)}</td>" for c in cols) + "</tr>"
                    for v in r["variants"]
                )
                variants = f"<p>compressed variants:</p><table><tr>{head}</tr>{body}</table>"
            star = " (on the front)" if r["on_front"] else ""
            out.append(
                f"<div class='card'><b>#{r['number']} {escape(r['genotype_id'])}</b>{star} - {metrics}"
                f"{draw_architecture(r['genotype'], run.config.get('space_options'))}<details><summary>genotype</summary><code>"
                f"{escape(r['genotype'])}</code></details>{variants}</div>"
            )
    return "".join(out)


def _apart(runs: list[RunData]) -> str:
    """Trials that are not on the plots for lack of metrics: failed, stopped, rejected, running."""
    cols = ("run", "number", "status", "kind", "genotype_id", "policy_label", "val_acc", "epochs", "error")
    rows = [r for run in runs for r in run.trials.to_dict("records") if r["status"] != "complete"]
    if not rows:
        return "<p class='note'>none: every trial completed</p>"
    head = "".join(f"<th>{c}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c), c)}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<div class='tablewrap'><table><tr>{head}</tr>{body}</table></div>"


def write_html(runs: list[RunData], path: Path, top_k: int = 5, files: list[str] | None = None) -> Path:
    from plotly.offline import get_plotlyjs

    figs = figures(runs, top_k)
    sections: dict[str, list[str]] = {"fronts": [], "hv": [], "curves": []}
    scripts = []
    for section, div, fig in figs:
        sections[section].append(f"<div id='{div}' class='plot'></div>")
        scripts.append(
            f"<script type='application/json' class='fig' data-target='{div}'>{_json(fig)}</script>"
        )
    cols = [c for c in TABLE_COLUMNS if c != "run" or len(runs) > 1]
    trial_rows = [[r.get(c) for c in cols] for run in runs for r in run.trials.to_dict("records")]
    shown = [[human(v, c) for v, c in zip(row, cols, strict=True)] for row in trial_rows]
    statuses = sorted({r["status"] for run in runs for r in run.trials.to_dict("records")})
    options = "".join(f"<option>{escape(s)}</option>" for s in statuses)
    title = "nas-run report: " + " vs ".join(r.name for r in runs)
    size_note = ("Model size: compressed trials and architectures that were compressed have their ONNX file "
                 "measured; other architectures show params x 4 bytes (float32 weights), marked in the hover.")  # fmt: skip
    page = f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>
<meta name="viewport" content="width=device-width,initial-scale=1"><style>{_CSS}</style></head>
<body data-report="loading"><h1>{escape(title)}</h1>
<p class="note">made {time.strftime("%Y-%m-%d %H:%M:%S")}; files beside it: {escape(", ".join(files or []))}</p>
<div id="report-errors"></div>
<nav><a href="#fronts">fronts</a><a href="#hv">hypervolume</a><a href="#curves">learning curves</a>
<a href="#candidates">top candidates</a><a href="#apart">failed and stopped</a><a href="#table">all trials</a></nav>
{"".join(_summary(r) for r in runs)}
<h2 id="fronts">Accuracy against cost</h2><p class="note">Filled dots: architectures. Hollow stars: the Pareto
front over the run's objectives (feasible trials only), around the trial's own marker; dashed: the front in each
plot's own plane. Hollow diamonds: (architecture, policy) pairs, a grey line from each architecture to its
compressed variants (an int8 model keeps its architecture's parameters, so its diamond rings that dot). Crosses
violate a constraint; hollow grey circles are failed or stopped trials with metrics. Each latency plot holds one
runtime: PyTorch (int8 models have no PyTorch form) or ONNX Runtime. Click a legend entry to hide it. {size_note}</p>
{"".join(sections["fronts"])}
<h2 id="hv">Hypervolume</h2><p class="note">Of the feasible points so far, on the first run's objectives
(losses: maximised metrics negated, sizes as log10(1 + value)); one reference point for all runs: the worst
value of each objective plus 5% of its range. A dotted line marks where compression trials begin.</p>
{"".join(sections["hv"])}
<h2 id="curves">Learning curves</h2>{"".join(sections["curves"])}
<h2 id="candidates">Top candidates</h2>{_candidates(runs, top_k)}
<h2 id="apart">Failed, stopped, rejected and running trials</h2>{_apart(runs)}
<h2 id="table">All trials</h2><div class="controls"><input id="trial-filter"
placeholder="filter: words that must all appear in a row"> <select id="trial-status"><option value="">any status</option>{options}</select>
<span id="trial-count"></span></div>
<div class="tablewrap"><table id="trials"><thead><tr>{"".join(f"<th>{escape(label(c))}</th>" for c in cols)}</tr></thead>
<tbody></tbody></table></div>
<script type="application/json" id="trial-data">{_json({"columns": cols, "rows": trial_rows, "shown": shown})}</script>
<script type="application/json" id="plot-config">{_json(PLOT_CONFIG)}</script>
{"".join(scripts)}
<script>{get_plotlyjs()}</script>
<script>{_JS}</script>
</body></html>
"""
    path.write_text(page, encoding="utf-8")
    return path
