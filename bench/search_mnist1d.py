"""Strategies on the embedded default with real training: does the surrogate help off the table?

`bench/search_nb201.py` compares strategies on NAS-Bench-201's look-up table. This runs the
README's main job itself (UniRepLKNet-style space, tiny setting, MNIST-1D, 24 candidates x 8
epochs, objectives val_acc and params) for each strategy and seed, with real training, and reports
the best validation accuracy, the test accuracy of that candidate, and the hypervolume of the
(val_acc, log10 params) front. The seed also sets the data split and weight init, so strategies
are compared seed by seed (paired).

Run from the repository root (two runs at a time on two cores)::

    python bench/search_mnist1d.py             # writes results/search_mnist1d.md
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from nas.config import SearchConfig  # noqa: E402
from nas.pareto import hypervolume_2d  # noqa: E402
from nas.search import run_search  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REF_PARAMS = 1e5  # hypervolume reference: no tiny model of this space comes near it


def one_run(strategy: str, seed: int, trials: int, epochs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        cfg = SearchConfig(strategy=strategy, seed=seed, trials=trials, epochs=epochs, out=f"{tmp}/run")
        df = run_search(cfg).store.dataframe()
        done = df[df.status == "complete"]
        best = done.loc[done.val_acc.idxmax()]
        return {
            "strategy": strategy,
            "seed": seed,
            "best_val": float(best.val_acc),
            "its_test": float(best.test_acc),
            # dominated area in (val_acc up, log10 params down) up to REF_PARAMS
            "hv": hypervolume_2d(
                np.stack([np.log10(done.params.to_numpy(dtype=float)), -done.val_acc.to_numpy()], 1),
                np.array([np.log10(REF_PARAMS), 0.0]),
            ),
            "minutes": (time.perf_counter() - start) / 60,
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--strategies", default="random,evolution,surrogate")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "results" / "search_mnist1d.md"))
    args = ap.parse_args()

    jobs = [(s, seed) for seed in range(args.seeds) for s in args.strategies.split(",")]
    with ProcessPoolExecutor(args.workers) as pool:
        futures = [pool.submit(one_run, s, seed, args.trials, args.epochs) for s, seed in jobs]
        rows = []
        for f in futures:
            rows.append(f.result())
            r = rows[-1]
            print(f"{r['strategy']:<10} seed {r['seed']}: best val {r['best_val']:.4f} (test {r['its_test']:.4f}) "
                  f"hv {r['hv']:.3f}  [{r['minutes']:.1f} min]", flush=True)  # fmt: skip

    lines = [
        "# Strategies on the embedded default, real training (MNIST-1D, unireplk tiny)",
        "",
        f"{args.trials} candidates x {args.epochs} epochs per run, objectives val_acc (max) and params (min), "
        f"seeds 0-{args.seeds - 1} (the seed also sets the data split and init: compare within a row). "
        "Hypervolume of the (val_acc, log10 params) front up to 1e5 parameters.",
        "",
        "| seed | " + " | ".join(f"{s}: best val (its test) / hv" for s in args.strategies.split(",")) + " |",
        "|---|" + "---|" * len(args.strategies.split(",")),
    ]
    for seed in range(args.seeds):
        cells = []
        for s in args.strategies.split(","):
            r = next(r for r in rows if r["strategy"] == s and r["seed"] == seed)
            cells.append(f"{r['best_val']:.4f} ({r['its_test']:.3f}) / {r['hv']:.3f}")
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    means = []
    for s in args.strategies.split(","):
        rs = [r for r in rows if r["strategy"] == s]
        means.append(
            f"{np.mean([r['best_val'] for r in rs]):.4f} ({np.mean([r['its_test'] for r in rs]):.3f}) / "
            f"{np.mean([r['hv'] for r in rs]):.3f}"
        )
    lines += ["| mean | " + " | ".join(means) + " |", ""]
    minutes = sum(r["minutes"] for r in rows)
    lines += [
        f"{len(rows)} runs, {minutes:.0f} min of search in all ({args.workers} at a time). "
        "Produced by `python bench/search_mnist1d.py`.",
        "",
    ]
    text = "\n".join(lines)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
