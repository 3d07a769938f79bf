"""Does early stopping keep the accuracy-vs-size front of a multi-objective search?

ASHA on the primary metric (what Ray ships) stops a trial whose validation accuracy is in the
bottom of its rung, however small the model: exactly the cheap end of an accuracy-vs-parameters
front. MO-ASHA (`nas.runners.mo_asha`) promotes by non-dominated rank instead. This benchmark
measures both against training every candidate to the end:

1. Train N random candidates of the embedded default (UniRepLKNet-style space, tiny setting, on
   MNIST-1D, the README's main job) for the full budget, recording validation accuracy after
   every epoch (real training; the curves are saved to results/early_stopping_curves.json and
   reused unless --retrain). The learning-rate schedule spans the full budget, so a trial cut at
   epoch k has exactly the first k points of its curve.
2. Replay the candidates in many random arrival orders through `Rungs` (the decision the Ray
   schedulers make; with one objective it is ASHA's quantile rule) with the run defaults
   (grace period 1, reduction factor 2), counting epochs trained.
3. Score the front of the trials that finished (stopped trials never enter the reported front):
   hypervolume relative to the no-stopping front (val_acc max, params min), and recall, the
   share of the no-stopping front's members that finished.

Run from the repository root::

    python bench/early_stopping_mo.py          # writes results/early_stopping_mo.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from nas.objectives import parse_objectives  # noqa: E402
from nas.pareto import hypervolume_2d, pareto_mask  # noqa: E402
from nas.runners.mo_asha import Rungs, milestones  # noqa: E402
from nas.training import TrainingEvaluator  # noqa: E402
from search_spaces import get_space  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCHEDULERS = {"none": None, "ASHA (val_acc)": "val_acc", "MO-ASHA (val_acc, params)": "val_acc,params"}


def train_curves(n: int, epochs: int, seed: int) -> list[dict]:
    space = get_space("unireplk").tiny()
    evaluator = TrainingEvaluator(
        space="unireplk", space_options=dict(space.options), dataset="mnist1d", seed=seed, data_seed=seed
    )
    rng, seen, out = np.random.default_rng(seed), set(), []
    while len(out) < n:
        g = space.sample(rng)
        if g.to_str() in seen:
            continue
        seen.add(g.to_str())
        curve: list[float] = []
        start = time.perf_counter()
        metrics = evaluator(g, epochs, lambda epoch, m, curve=curve: curve.append(float(m["val_acc"])))
        out.append({"genotype": g.to_str(), "params": metrics["params"], "curve": curve})
        print(f"  [{len(out):3d}/{n}] val_acc={curve[-1]:.4f} params={metrics['params']:.0f} "
              f"({time.perf_counter() - start:.1f}s)", flush=True)  # fmt: skip
    return out


def hypervolume(acc: np.ndarray, params: np.ndarray, ref_params: float) -> float:
    """Dominated area in (val_acc up, log10 params down) above val_acc 0, left of the reference;
    log because model sizes span orders of magnitude (linear would let the smallest models
    decide everything)."""
    return hypervolume_2d(np.stack([np.log10(params), -acc], 1), np.array([np.log10(ref_params), 0.0]))


def replay(
    cands: list[dict], objectives: str | None, order: np.ndarray, epochs: int
) -> tuple[int, list[int]]:
    """Epochs trained and the indices of trials that reached the full budget."""
    rungs = (
        Rungs(parse_objectives(objectives), max_t=epochs, grace_period=1, reduction_factor=2)
        if objectives
        else None
    )
    used, finished = 0, []
    for i in order:
        c = cands[i]
        for epoch in range(1, epochs + 1):
            used += 1
            if epoch == epochs:
                finished.append(int(i))
            elif rungs is not None and not rungs.decide(
                str(i), epoch, {"val_acc": c["curve"][epoch - 1]}, lambda c=c: {"params": c["params"]}
            ):
                break
    return used, finished


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--candidates", type=int, default=48)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--orders", type=int, default=200, help="random arrival orders to replay")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--retrain", action="store_true", help="train again even if curves are saved")
    ap.add_argument("--out", default=str(ROOT / "results" / "early_stopping_mo.md"))
    args = ap.parse_args()

    cache = ROOT / "results" / "early_stopping_curves.json"
    key = {"space": "unireplk(tiny)", "dataset": "mnist1d", "candidates": args.candidates,
           "epochs": args.epochs, "seed": args.seed}  # fmt: skip
    saved = json.loads(cache.read_text()) if cache.exists() and not args.retrain else {}
    if saved.get("key") == key:
        cands, train_s = saved["candidates"], saved["train_s"]
        print(f"curves: {cache} ({len(cands)} candidates, trained in {train_s:.0f}s)")
    else:
        print(f"training {args.candidates} candidates x {args.epochs} epochs on MNIST-1D ...")
        start = time.perf_counter()
        cands = train_curves(args.candidates, args.epochs, args.seed)
        train_s = time.perf_counter() - start
        cache.write_text(json.dumps({"key": key, "train_s": train_s, "candidates": cands}, indent=1))

    acc = np.array([c["curve"][-1] for c in cands])
    params = np.array([c["params"] for c in cands], dtype=float)
    ref = params.max() * 1.1
    full_front = set(np.flatnonzero(pareto_mask(np.stack([-acc, params], 1))).tolist())
    hv_full = hypervolume(acc[list(full_front)], params[list(full_front)], ref)

    rng = np.random.default_rng(args.seed)
    orders = [rng.permutation(len(cands)) for _ in range(args.orders)]
    rows = []
    for name, objectives in SCHEDULERS.items():
        used, hv, recall, smallest = [], [], [], []
        for order in orders:
            n_epochs, finished = replay(cands, objectives, order, args.epochs)
            f = np.array(finished)
            used.append(n_epochs / (len(cands) * args.epochs))
            hv.append(hypervolume(acc[f], params[f], ref) / hv_full)
            recall.append(len(full_front & set(finished)) / len(full_front))
            smallest.append(params[f].min() if len(f) else np.nan)
        rows.append((name, np.mean(used), np.median(hv), np.mean(hv), np.min(hv), np.mean(recall),
                     np.median(smallest)))  # fmt: skip

    header = (
        "| scheduler | epochs trained (share of full) | hypervolume vs full: median | mean | worst "
        "| front recall (mean) | smallest finished model (median params) |\n|---|---|---|---|---|---|---|"
    )
    lines = [
        f"| {n} | {u:.0%} | {hm:.3f} | {ha:.3f} | {hw:.3f} | {r:.0%} | {s:,.0f} |"
        for n, u, hm, ha, hw, r, s in rows
    ]
    text = "\n".join(
        [
            "# Early stopping in a multi-objective search (val_acc max, params min)",
            "",
            f"{len(cands)} random candidates of the default space (unireplk, tiny) trained on MNIST-1D for "
            f"{args.epochs} epochs each ({train_s / 60:.1f} min of real training on this machine), replayed "
            f"in {args.orders} random arrival orders through the rung decision of the Ray schedulers "
            f"(grace period 1, reduction factor 2: rungs at epochs {milestones(1, 2, args.epochs)}). "
            "Hypervolume in (val_acc, log10 params), reference (0, 1.1 x the largest model). "
            "The no-stopping front has "
            f"{len(full_front)} members; its smallest model has {params[list(full_front)].min():,.0f} "
            "parameters.",
            "",
            header,
            *lines,
            "",
            "Produced by `python bench/early_stopping_mo.py` (curves cached in "
            "`results/early_stopping_curves.json`; `--retrain` trains again).",
            "",
        ]
    )
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
