"""Quantune's comparison on our int8 policy space: how many evaluations each strategy needs to
find the grid's best int8 configuration.

Two phases, so the benchmark is cheap to re-run:

1. ``--grid``: evaluate every point of the `PolicySpace` of kind ``int8`` (calibration x scheme x
   format x granularity x layers kept in float: 192 configurations) as real compression trials
   (`nas-run compress --search grid`: ORT quantization, accuracy and latency measured in ONNX
   Runtime) on two models — a searched large-kernel model at full size (top of a search run's
   front) and the plain ResNet-style CNN of bench/compress.py given as builder + state dict — and
   keep each grid as a table (results/quant_grid_<model>.csv) with its space
   (results/quant_grid_<model>.space.json).
2. default: replay the strategies on the stored grids, ``--seeds`` runs each, as
   bench/search_nb201.py replays NAS-Bench-201: ask a policy, look its measured metrics up, tell
   them. Objective (one, the same for all): the highest ORT batch-1 speed-up over the float model
   (re-timed after the grid in interleaved rounds, `retime`; by default over one float latency,
   ``speedup_b1_shared``, see `load_grid`) among configurations within
   ``--max-drop`` accuracy points of the float model (a constraint, as ``--constraint
   'acc_drop<=0.5'``). A run "reaches the best" at the first evaluation within ``--tolerance``
   of the grid's best feasible value (5% by default: the spread of a latency ratio on this
   machine) — and, reported apart, at the exact best row.

    python bench/quant_search.py --grid --search-run DIR   # ~20 min on 2 cores, once
    python bench/quant_search.py                           # replay: ~1 min
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "results"
MODELS = ("searched", "cnn")
STRATEGIES = ("grid", "random", "genetic", "tpe", "surrogate", "surrogate+transfer")
CNN_SPEC = str(ROOT / "bench" / "resnet_cnn.py") + ":resnet_cnn"


# -- phase 1: the grid -------------------------------------------------------------------------
def evaluate_grid(model: str, work: Path, search_run: Path | None, cnn_epochs: int, rounds: int) -> None:
    from compress.policy_space import PolicySpace
    from compress.run import CompressConfig, run_compress

    common = dict(search="grid", budget=10_000, policy_space="int8", seed=0,
                  objectives=("onnx_latency_ms", "val_acc"), constraints=())
    if model == "searched":
        if search_run is None:
            raise SystemExit("--grid needs --search-run DIR (a finished search run, e.g. bench/compress.py's)")
        run_dir = work / "searched"
        if not run_dir.exists():  # a copy: the grid's trials must not land in the original run
            shutil.copytree(search_run, run_dir, ignore=shutil.ignore_patterns("compressed", "policy_search"))
        cfg = CompressConfig(run=str(run_dir), top_k=1, **common)
        out = run_dir
    else:
        from bench.compress import train_cnn

        weights = work / "resnet_cnn.safetensors"
        if not weights.is_file():
            work.mkdir(parents=True, exist_ok=True)
            print(f"training the CNN: val acc {train_cnn(weights, cnn_epochs):.4f}", flush=True)
        out = work / "cnn"
        cfg = CompressConfig(model=CNN_SPEC, weights=str(weights), dataset="mnist5k", out=str(out), **common)
    resume = out if (out / "compress.json").is_file() and model == "cnn" else None

    def show(cand: Any, result: Any) -> None:
        m = result.metrics
        text = (f"drop {m['acc_drop']:+.2f} ort {m['onnx_latency_ms']:.3f} ms speedup {m['speedup']:.2f}x"
                if result.status == "complete" else result.error)
        print(f"  [{model}] trial {cand.number}: {text} ({result.duration_s:.1f}s)", flush=True)

    run = run_compress(None if resume else cfg, resume=resume, on_result=show)
    chain = run.controller
    ctl = chain.controllers[0]  # type: ignore[union-attr]
    space: PolicySpace = ctl.strategy.space
    timing = retime(run, ctl.rows.architecture, rounds)
    rows = []
    for rec in run.store.records():
        g = ctl.rows.proposal(rec)
        if g is None or rec["status"] != "complete":
            continue
        pid = space.policy(g).id
        rows.append({"proposal": g.to_str(), **space.to_dims(g), **{k: rec["metrics"][k] for k in (
            "val_acc", "acc_drop", "onnx_latency_ms", "base_onnx_latency_ms", "speedup", "file_bytes", "size_ratio")},
            **timing.get(pid, {})})
    import pandas as pd

    RESULTS.mkdir(exist_ok=True)
    pd.DataFrame(rows).to_csv(RESULTS / f"quant_grid_{model}.csv", index=False)
    (RESULTS / f"quant_grid_{model}.space.json").write_text(json.dumps({
        "space": space.to_json(), "architecture": ctl.rows.architecture.to_str(), "size": int(space.size()),
        "evaluated": len(rows), "command": " ".join(sys.argv),
    }))
    print(f"{model}: {len(rows)} of {int(space.size())} grid points -> results/quant_grid_{model}.csv", flush=True)


def retime(run: Any, architecture: Any, rounds: int) -> dict[str, dict[str, float]]:
    """Every kept int8 model timed again against the float model in interleaved rounds (the
    trials timed each once, under whatever load there was): per policy id, median latencies and
    median paired speed-ups at batch 1 and 32 (bench/compress.py's timing pass)."""
    from bench.compress import rebuild_group, time_group

    group = rebuild_group(architecture.id[:8], run.evaluator, architecture, run.out / "compressed")
    print(f"re-timing {len(group.arts)} models in {rounds} interleaved rounds", flush=True)
    return time_group(group, rounds)


# -- phase 2: replay -----------------------------------------------------------------------------
def load_grid(model: str) -> tuple[Any, dict[str, dict[str, float]]]:
    import pandas as pd

    from compress.policy_space import PolicySpace

    meta = json.loads((RESULTS / f"quant_grid_{model}.space.json").read_text())
    space = PolicySpace.from_json(meta["space"])
    table = pd.read_csv(RESULTS / f"quant_grid_{model}.csv")
    # Speed-up over ONE float latency per batch size: the median of the float model's timings
    # in all rounds of all configurations. The float model is the same for every configuration,
    # yet the paired `speedup_b*` divide by its own few timings, whose spread across the grid
    # (CV 6.5% on the CNN, 11% on the searched model at batch 1) exceeds the gaps between the
    # best configurations and ranks them by the noise of the denominator.
    for b in ("b1", "b32"):
        if f"ms_{b}" in table:
            table[f"speedup_{b}_shared"] = float(table[f"base_ms_{b}"].median()) / table[f"ms_{b}"]
    return space, {r["proposal"]: r for r in table.to_dict("records")}


def prior_from(model: str, metric: str, max_drop: float) -> list:
    """Another model's grid as surrogate prior data, encoded by *its* policy space (its own
    model features): [encoding, (-metric,), violation] per configuration."""
    space, table = load_grid(model)
    return [[space.encode(space.from_str(k)).tolist(), [-float(r[metric])], max(0.0, float(r["acc_drop"]) - max_drop)]
            for k, r in table.items()]


def replay(model: str, strategy: str, seed: int, max_drop: float, tolerance: float, metric: str) -> dict[str, float]:
    """One strategy run on a stored grid: evaluations until it first proposes a configuration
    within ``tolerance`` of the best feasible ``metric`` (higher is better), and the exact best."""
    from compress.policy_search import STRATEGY_ALIASES
    from nas.strategies.base import SpaceExhausted, make_strategy

    space, table = load_grid(model)
    best = max(r[metric] for r in table.values() if r["acc_drop"] <= max_drop)
    name = STRATEGY_ALIASES.get(strategy, strategy)
    # the same start as `nas-run compress --search surrogate --budget 20` (a quarter, >= 3)
    opts: dict[str, Any] = {"n_init": 5} if name == "surrogate" else {}
    if strategy == "surrogate+transfer":  # the other model's whole grid as prior data, 2 random starts
        name, opts = "surrogate", {"n_init": 2, "prior": prior_from(next(m for m in MODELS if m != model), metric, max_drop)}
    strat = make_strategy(name, space, n_objectives=1, seed=seed, **opts)
    first_tol = first_exact = None
    start = time.perf_counter()
    for n in range(1, len(table) + 1):
        try:
            g = strat.ask()
        except SpaceExhausted:
            break
        r = table.get(g.to_str())
        if r is None:  # a grid point that failed to evaluate: a failed trial
            strat.tell(g, None)
            continue
        violation = max(0.0, float(r["acc_drop"]) - max_drop)
        strat.tell(g, (-float(r[metric]),), violation)
        if violation == 0:
            if first_tol is None and r[metric] >= best * (1 - tolerance):
                first_tol = n
            if first_exact is None and r[metric] == best:
                first_exact = n
        if first_exact is not None and first_tol is not None:
            break
    size = float(len(table))
    return {"tol": float(first_tol or size), "exact": float(first_exact or size),
            "s": time.perf_counter() - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", action="store_true", help="evaluate the grids (phase 1) instead of replaying")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--search-run", type=Path, help="--grid: the search run whose best model is 'searched'")
    ap.add_argument("--work", type=Path, default=Path("/tmp/quant_search"))
    ap.add_argument("--cnn-epochs", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5, help="--grid: interleaved timing rounds of every model")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--max-drop", type=float, default=0.5, help="accuracy points the int8 model may lose")
    ap.add_argument("--tolerance", type=float, default=0.05)
    ap.add_argument("--metric", default="speedup_b1_shared", help="maximised: speedup_b1 (paired, re-timed), speedup_b1_shared (over one float latency), "
                    "speedup_b32[_shared], size_ratio")
    ap.add_argument("--out", type=Path, default=RESULTS / "quant_search.md")
    args = ap.parse_args()
    models = [m for m in args.models.split(",") if m]
    if args.grid:
        for m in models:
            evaluate_grid(m, args.work, args.search_run, args.cnn_epochs, args.rounds)
        return
    lines = [
        "# int8 policy search: evaluations to reach the grid's best configuration",
        "",
        "Command: `" + " ".join(["python", "bench/quant_search.py", *sys.argv[1:]]) + "`",
        "",
        f"Objective: highest `{args.metric}` (ORT speed-up over the float model, re-timed in interleaved rounds; "
        "`_shared`: over one float latency, the median of all its timings, not each configuration's own) "
        f"with accuracy drop <= {args.max_drop} points. 'reached' = first evaluation within {args.tolerance:.0%} "
        f"of the grid's best feasible value (exact best in brackets); "
        f"{args.seeds} seeds; a run that never reaches it counts the grid size. Grid: every configuration once, "
        "in a seeded random order.",
        "",
    ]
    for m in models:
        space, table = load_grid(m)
        meta = json.loads((RESULTS / f"quant_grid_{m}.space.json").read_text())
        feasible = [r for r in table.values() if r["acc_drop"] <= args.max_drop]
        best = max(feasible, key=lambda r: r[args.metric])
        near = sum(r[args.metric] >= best[args.metric] * (1 - args.tolerance) for r in feasible)
        lines += [
            f"## {m}: `{meta['architecture'][:90]}`",
            "",
            f"Grid: {len(table)} configurations evaluated ({meta['size']} in the space), {len(feasible)} feasible, "
            f"{near} within {args.tolerance:.0%} of the best; best feasible {args.metric} {best[args.metric]:.2f}x "
            f"({best.get('ms_b1', best['onnx_latency_ms']):.4f} ms at batch 1, drop {best['acc_drop']:+.2f} pts, file {best['size_ratio']:.2f}x "
            f"smaller): `{best['proposal']}`. "
            f"Grid command: `{meta['command']}`.",
            "",
            "| strategy | median evals to reach (exact) | mean | q75 | max | fewer than the full grid | s/run |",
            "|---|---|---|---|---|---|---|",
        ]
        for strategy in [s for s in args.strategies.split(",") if s]:
            runs = [replay(m, strategy, seed, args.max_drop, args.tolerance, args.metric) for seed in range(args.seeds)]
            tol = np.array([r["tol"] for r in runs])
            exact = np.array([r["exact"] for r in runs])
            lines.append(
                f"| {strategy} | {np.median(tol):.0f} ({np.median(exact):.0f}) | {tol.mean():.1f} | "
                f"{np.quantile(tol, 0.75):.0f} | {tol.max():.0f} | {len(table) / np.median(tol):.1f}x | "
                f"{np.mean([r['s'] for r in runs]):.1f} |"
            )
            print(lines[-1], flush=True)
        lines.append("")
    if args.metric.endswith("_shared"):
        lines += [
            "Why one float latency: the float model is the same for all 192 configurations, but its timings "
            "beside each of them spread with a CV of 6.5% (CNN) and 11% (searched model) at batch 1 — more than "
            "the gaps between the best configurations — so the paired ratios (`--metric speedup_b1`, "
            "`results/quant_search_paired.md`) rank the top by the noise of their denominators. The int8 "
            "latencies themselves are the same measurements in both tables.",
            "",
        ]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
