"""Run folders read for a report: every trial as one row with the columns the plots need.

Read-only throughout: a report may be made beside a running driver (`driver_running`), so the
store is opened with ``read_only=True`` and nothing in the folder is written here.

Columns added to `RunStore.dataframe()` (one row per trial, compression trials included):

- ``run``: the run's name (its folder); ``kind``: ``architecture`` or ``compressed``;
- ``policy_label``: a short name of the compression policy (``none`` for architectures),
  `compress.policy.policy_label` of its canonical JSON;
- ``size_bytes`` / ``size_source``: the model's size. Compressed trials measured their ONNX
  file (``onnx file``). An architecture whose compression trials measured its uncompressed
  ONNX file (``base_file_bytes``) gets that (``onnx file``); any other architecture gets its
  float32 weights, params x 4 bytes (``params x 4``): an estimate, labelled as one;
- ``ort_latency_ms``: ONNX Runtime latency where known (compressed trials, architectures with
  ``onnx_latency_ms`` or with a compression trial that timed the uncompressed model);
- ``torch_latency_ms``: PyTorch latency, NaN for a model timed only in ONNX Runtime (int8, or a
  TorchScript user model), whose ``latency_ms`` is its ORT time (`compress.evaluate` copies it):
  one runtime per axis, or int8 looks 20-100x faster than the float models beside it;
  ``latency_runtime`` says which runtime ``latency_ms`` holds (``pytorch``/``onnxruntime``);
- ``feasible`` (complete, objectives finite, no constraint violated), ``on_front`` (the run's
  Pareto front over its objectives, as `RunStore.pareto`), ``base_number`` (for a compressed
  trial, the architecture trial it started from).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compress.policy import policy_label  # one short name per policy, here and in --policy NAME
from nas.objectives import Constraint, Objective, losses, parse_constraints, parse_objectives
from nas.pareto import hypervolume_2d, pareto_mask
from search_spaces import ConfigError

__all__ = [
    "LOG_METRICS", "ORT_ONLY_PASSES", "RunData", "hypervolume", "hypervolume_curve", "last_pass", "load_run",
    "policy_label",
]  # fmt: skip

# metrics that span orders of magnitude: log axes, log10 before a hypervolume
LOG_METRICS = frozenset(
    {"params", "flops", "macs", "activations", "file_bytes", "zip_bytes", "size_bytes", "base_params"}
)
# always present as columns (NaN where a trial did not measure it), so plots need no checks
METRIC_COLUMNS = (
    "val_acc", "test_acc", "params", "flops", "macs", "latency_ms", "onnx_latency_ms", "file_bytes",
    "zip_bytes", "acc_drop", "speedup", "size_ratio", "base_file_bytes", "base_onnx_latency_ms",
    "epochs", "train_loss",
)  # fmt: skip
# passes whose model exists only in ONNX Runtime (`compress`'s passes with ``terminal = True``;
# tests/test_report_truth.py checks that the two agree)
ORT_ONLY_PASSES = frozenset({"int8"})


@dataclass
class RunData:
    path: Path
    name: str
    objectives: tuple[Objective, ...]
    constraints: tuple[Constraint, ...]
    config: dict[str, Any]
    in_progress: bool  # a driver holds the folder now: this is a snapshot
    trials: Any  # pandas DataFrame, one row per trial
    histories: dict[int, list[dict[str, float]]] = field(default_factory=dict)
    # constraints of `nas-run compress --search` on this run (its compress.json), if any
    compress_constraints: tuple[Constraint, ...] = ()

    @property
    def strategy(self) -> str:
        return str(self.config.get("strategy") or "compress")

    @property
    def title(self) -> str:
        return f"{self.name} ({self.strategy})"


def last_pass(text: str | None) -> str:
    """The name of a policy's last pass (``""`` for none or unreadable policy text)."""
    try:
        passes = json.loads(text or "{}").get("passes") or []
        return str(passes[-1].get("pass", "")) if passes else ""
    except (ValueError, AttributeError):
        return ""


def _compress_constraints(path: Path, config: dict[str, Any]) -> tuple[Constraint, ...]:
    """The compression constraints of a search run compressed in place (``compress.json``
    beside ``config.json``); a ``compress --model`` folder's are its config's own."""
    file = path / "compress.json"
    if not (path / "config.json").is_file():  # config is compress.json itself
        return parse_constraints(config.get("constraints"))
    if not file.is_file():
        return ()
    try:
        return parse_constraints(json.loads(file.read_text(encoding="utf-8")).get("constraints"))
    except (ValueError, AttributeError) as exc:  # UnicodeDecodeError is a ValueError
        raise ConfigError(f"{str(file)!r} is not a readable compression config: {exc}") from None


def _open(path: Path) -> tuple[Any, dict[str, Any], tuple[Objective, ...], tuple[Constraint, ...]]:
    """The read-only store of a search run (config.json) or of a ``compress --model`` folder."""
    from nas.config import read_json_file
    from nas.search import open_store
    from nas.store import RunStore

    if (path / "config.json").is_file():
        store = open_store(path, read_only=True)
        config = read_json_file(path / "config.json", "configuration")
        return store, config, store.objectives, store.constraints
    if (path / "compress.json").is_file():
        config = read_json_file(path / "compress.json", "compression settings")
        if config.get("run") is not None:  # the compression of a search run, whose own config.json is gone
            raise ConfigError(f"{str(path)!r} is a search run folder without its config.json: the run's configuration is lost")
        if not (path / "study.db").is_file():
            raise ConfigError(f"{str(path)!r} holds no study.db yet")
        objectives = parse_objectives(config.get("objectives") or ("val_acc", "onnx_latency_ms"))
        url = f"sqlite:///{(path / 'study.db').resolve()}"
        store = RunStore(url, objectives, (), study_name=path.resolve().name, read_only=True)
        return store, config, objectives, ()
    raise ConfigError(f"{str(path)!r} is not a run folder (no config.json or compress.json)")


def load_run(run_dir: str | Path) -> RunData:
    """Everything a report shows about one run folder; raises `ConfigError` for anything else."""
    import pandas as pd

    from nas.search import driver_running

    path = Path(run_dir)
    if not path.is_dir():
        raise ConfigError(f"unknown run folder {str(run_dir)!r}: no such folder")
    store, config, objectives, constraints = _open(path)
    in_progress = driver_running(path)
    df = store.dataframe()
    # the per-epoch history is a user attribute the store's records leave out
    histories = {
        t.number: list(t.user_attrs.get("history") or []) for t in store.study.get_trials(deepcopy=False)
    }
    if config.get("constraints") and not constraints:
        constraints = parse_constraints(config["constraints"])
    df = _derived(df if not df.empty else pd.DataFrame(columns=["number", "status", "stage"]), path.name)
    # a stopped or failed trial reports no "epochs": the epochs it ran are its history's length
    ran = df["number"].map(lambda n: float(len(histories.get(int(n), []))) or np.nan)
    df["epochs"] = df["epochs"].fillna(ran[df["kind"] == "architecture"])
    _mark_front(df, objectives)
    return RunData(path, path.name, tuple(objectives), tuple(constraints), config, in_progress, df, histories,
                   _compress_constraints(path, config))  # fmt: skip


def _derived(df: Any, name: str) -> Any:
    import pandas as pd

    df = df.copy()
    for col in METRIC_COLUMNS:
        if col not in df.columns:
            df[col] = np.nan
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    for col, default in (
        ("policy", ""),
        ("genotype", ""),
        ("genotype_id", ""),
        ("error", ""),
        ("stage", "search"),
    ):
        if col not in df.columns:
            df[col] = default
        df[col] = df[col].fillna(default).astype(str)
    if "violation" not in df.columns:
        df["violation"] = 0.0
    df["violation"] = pd.to_numeric(df["violation"], errors="coerce").astype(float).fillna(0.0)
    df.insert(0, "run", name)
    # "final": `nas-run train`'s longer training of a chosen architecture, not a search candidate
    df["kind"] = np.select([df["stage"] == "compress", df["stage"] == "train"], ["compressed", "final"], "architecture")
    df["policy_label"] = [policy_label(p) for p in df["policy"]]
    comp = df[(df["kind"] == "compressed") & (df["status"] == "complete")]
    base_bytes = comp.groupby("genotype_id")["base_file_bytes"].median().dropna().to_dict()
    base_ms = comp.groupby("genotype_id")["base_onnx_latency_ms"].median().dropna().to_dict()
    arch = df["kind"] == "architecture"
    measured = df["genotype_id"].map(base_bytes)
    df["size_bytes"] = np.where(arch, measured.fillna(df["params"] * 4.0), df["file_bytes"])
    df["size_source"] = np.where(~arch, "onnx file", np.where(measured.notna(), "onnx file", "params x 4"))
    df.loc[df["size_bytes"].isna(), "size_source"] = ""
    df["ort_latency_ms"] = df["onnx_latency_ms"].where(
        df["onnx_latency_ms"].notna(), np.where(arch, df["genotype_id"].map(base_ms), np.nan)
    )
    # a model with no PyTorch form had its ORT time recorded as latency_ms (the same number)
    ort_only = (df["kind"] == "compressed") & (
        df["policy"].map(last_pass).isin(ORT_ONLY_PASSES) | (df["latency_ms"] == df["onnx_latency_ms"])
    )
    df["torch_latency_ms"] = df["latency_ms"].where(~ort_only)
    df["latency_runtime"] = np.where(
        df["latency_ms"].isna(), "", np.where(ort_only, "onnxruntime", "pytorch")
    )
    # the architecture trial a compressed one started from: the complete search trial of its
    # genotype (the best on accuracy if the genotype was trained more than once)
    done = df[arch & (df["status"] == "complete")].sort_values("val_acc", ascending=False)
    first = done.drop_duplicates("genotype_id").set_index("genotype_id")["number"].to_dict()
    df["base_number"] = [
        first.get(g) if k == "compressed" else None
        for g, k in zip(df["genotype_id"], df["kind"], strict=True)
    ]
    return df


def _losses(df: Any, objectives: tuple[Objective, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(n, m) losses (inf where missing) and the feasibility mask of the rows of ``df``."""
    m = len(objectives)
    arr = np.full((len(df), m), np.inf)
    ok = np.zeros(len(df), dtype=bool)
    for i, row in enumerate(df.to_dict("records")):
        ls = losses(objectives, row)
        if ls is not None and row.get("status") == "complete" and not row.get("violation", 0) > 0:
            arr[i], ok[i] = ls, True
    return arr, ok


def _mark_front(df: Any, objectives: tuple[Objective, ...]) -> None:
    arr, ok = _losses(df, objectives)
    ok &= (df["kind"] != "final").to_numpy()  # the front is the search's (and its compressions')
    df["feasible"] = ok
    df["on_front"] = pareto_mask(arr, ok) if len(df) else np.zeros(0, dtype=bool)


# -- hypervolume ---------------------------------------------------------------------------------
def hypervolume(points: np.ndarray, ref: np.ndarray) -> float:
    """Volume dominated by rows of a (n, m) loss array, bounded by ``ref`` (all minimised).

    Exact, by slicing along the last objective (While et al. 2006, "HSO"): between consecutive
    values z_i < z_{i+1} the dominated region is the (m-1)-D volume of the points with z <= z_i.
    O(n^(m-1) log n): fine for the few hundred trials of a run and m <= 4.
    """
    pts = np.asarray(points, dtype=float).reshape(len(points), -1)
    ref = np.asarray(ref, dtype=float)
    pts = pts[np.isfinite(pts).all(1) & (pts < ref).all(1)]
    if len(pts) == 0:
        return 0.0
    pts = pts[pareto_mask(pts)]
    m = pts.shape[1]
    if m == 1:
        return float(ref[0] - pts[:, 0].min())
    if m == 2:
        return hypervolume_2d(pts, ref)
    pts = pts[np.argsort(pts[:, -1], kind="stable")]
    total = 0.0
    for i in range(len(pts)):
        upper = pts[i + 1, -1] if i + 1 < len(pts) else ref[-1]
        if upper > pts[i, -1]:
            total += (upper - pts[i, -1]) * hypervolume(pts[: i + 1, :-1], ref[:-1])
    return total


def scaled_losses(df: Any, objectives: tuple[Objective, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Losses with minimised size-like metrics as log10(1 + value) (a 2x smaller model counts
    the same at any size), and the feasibility mask."""
    arr, ok = _losses(df, objectives)
    for j, o in enumerate(objectives):
        if o.metric in LOG_METRICS and o.direction == "min":
            with np.errstate(invalid="ignore"):
                arr[:, j] = np.where(
                    np.isfinite(arr[:, j]), np.log10(1.0 + np.maximum(arr[:, j], 0.0)), np.inf
                )
    return arr, ok


def reference_point(runs: list[RunData], objectives: tuple[Objective, ...]) -> np.ndarray | None:
    """Worst feasible value of each objective over all runs shown, plus 5% of its range: one
    reference for every curve, so compared runs are measured alike."""
    rows = [scaled_losses(r.trials, objectives) for r in runs if _has(r, objectives)]
    pts = np.concatenate([a[ok] for a, ok in rows]) if rows else np.zeros((0, len(objectives)))
    if len(pts) == 0:
        return None
    lo, hi = pts.min(0), pts.max(0)
    span = np.where(hi > lo, hi - lo, np.maximum(np.abs(hi), 1.0))
    return hi + 0.05 * span


def _has(run: RunData, objectives: tuple[Objective, ...]) -> bool:
    return all(o.metric in run.trials.columns for o in objectives)


def hypervolume_curve(
    run: RunData, objectives: tuple[Objective, ...], ref: np.ndarray
) -> list[tuple[int, int, float]]:
    """(finished trials so far, trial number, hypervolume of the feasible points so far), one
    entry per finished trial in trial order; compression trials count as they add points."""
    df = run.trials.sort_values("number")
    if not _has(run, objectives):
        return []
    arr, ok = scaled_losses(df, objectives)
    finished = df["status"].isin(["complete", "failed", "stopped"]).to_numpy()
    out, seen = [], 0
    for i, number in enumerate(df["number"].to_numpy()):
        if not finished[i]:
            continue
        seen += 1
        sel = ok[: i + 1]
        hv = hypervolume(arr[: i + 1][sel], ref) if sel.any() else 0.0
        out.append((seen, int(number), hv if math.isfinite(hv) else 0.0))
    return out
