"""How well does `XGBSurrogate` rank NAS-Bench-201 cells it has not seen?

For n in (100, 1000) and several seeds: train on n random cells of the CIFAR-10 table (seed-mean
validation accuracy), then Kendall tau between predictions and truth on all 15,625 - n others.

* baseline: plain XGBoost (500 trees, depth 6) on the one-hot of the 6 edges, the predictor
  of the NAS literature (docs: tau 0.51-0.54 at n=100, 0.76-0.79 at n=1000);
* XGBSurrogate on the same one-hot (its tuned settings, one model): what tuning alone buys;
* XGBSurrogate with `NB201Space.encode` features: one model, the default 5-model ensemble,
  and one model with the pairwise-ranking objective.

Needs the bench extra: ``pip install 'nas-run[bench]'``. Run from the repository root::

    python bench/surrogate_nb201.py            # writes results/surrogate_nb201.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy.stats import kendalltau

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from nas.benchmarks import NB201Table  # noqa: E402
from nas.surrogate import XGBSurrogate  # noqa: E402
from search_spaces.nb201 import NB201Space, from_index_key  # noqa: E402


def baseline(X: np.ndarray, y: np.ndarray, seed: int, jobs: int) -> object:
    import xgboost as xgb

    # XGBoost's defaults otherwise (learning rate 0.3, no subsampling)
    return xgb.XGBRegressor(n_estimators=500, max_depth=6, random_state=seed, n_jobs=jobs).fit(X, y)


def one_hot(keys: list[str]) -> np.ndarray:
    """(n, 30): the plain one-hot of the 6 edges, from the index keys (digit = op index)."""
    digits = np.array([[int(c) for c in k] for k in keys])
    out = np.zeros((len(keys), 30), dtype=np.float32)
    for edge in range(6):
        out[np.arange(len(keys)), 5 * edge + digits[:, edge]] = 1.0
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=2, help="XGBoost threads")
    parser.add_argument("--out", default="results/surrogate_nb201.md")
    args = parser.parse_args(argv)

    table = NB201Table.load("cifar10")
    space = NB201Space("nb201")
    keys = table.all_keys()
    genotypes = [from_index_key(k) for k in keys]
    y = np.array([table.query(g)["val_acc"] for g in genotypes])
    X = np.stack([space.encode(g) for g in genotypes])
    onehot = one_hot(keys)

    def surrogate(feats: np.ndarray, **params: object) -> Callable[[np.ndarray, int], object]:
        return lambda tr, s: XGBSurrogate(seed=s, n_jobs=args.jobs, **params).fit(feats[tr], y[tr])

    # name -> (features, fit(train rows, seed) -> model with .predict)
    methods: dict[str, tuple[np.ndarray, Callable[[np.ndarray, int], object]]] = {
        "baseline: XGBoost 500 trees depth 6, one-hot": (
            onehot,
            lambda tr, s: baseline(onehot[tr], y[tr], s, args.jobs),
        ),
        "XGBSurrogate 1 model, one-hot": (onehot, surrogate(onehot, n_models=1)),
        "XGBSurrogate 1 model, encode": (X, surrogate(X, n_models=1)),
        "XGBSurrogate (defaults: 5 models, regression), encode": (X, surrogate(X)),
        # one model: the rank ensemble costs 3x the regression one and adds nothing here
        "XGBSurrogate 1 model, rank, encode": (X, surrogate(X, objective="rank", n_models=1)),
    }
    rows = []
    start, cpu = time.perf_counter(), time.process_time()
    for n in args.sizes:
        for name, (feats, fit) in methods.items():
            taus = []
            for seed in range(args.seeds):
                perm = np.random.default_rng(seed).permutation(len(keys))
                train, test = perm[:n], perm[n:]
                model = fit(train, seed)
                taus.append(kendalltau(model.predict(feats[test]), y[test]).statistic)
            rows.append((n, name, float(np.mean(taus)), float(np.std(taus))))
            print(f"n={n:5d}  {name:56s} tau {rows[-1][2]:.3f} +- {rows[-1][3]:.3f}", flush=True)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu

    command = "python bench/surrogate_nb201.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# XGBoost surrogate on NAS-Bench-201 (CIFAR-10-valid, seed-mean accuracy)",
        "",
        f"Train on n random cells, Kendall tau on all other {len(keys)} - n; {args.seeds} seeds "
        f"(mean, std over seeds). {elapsed:.0f} s wall, {cpu:.0f} s CPU, {args.jobs} XGBoost threads "
        f"({os.cpu_count()} CPUs).",
        "",
        "| n | method | mean tau | std |",
        "|---|---|---|---|",
        *[f"| {n} | {name} | {mean:.3f} | {std:.3f} |" for n, name, mean, std in rows],
        "",
        "The baseline is XGBoost's defaults apart from 500 trees of depth 6 (learning rate 0.3, no",
        "subsampling); it lands below the 0.51-0.54 / 0.76-0.79 quoted for it in the project's",
        "benchmark notes, which were presumably measured with other settings. XGBSurrogate's settings",
        "on the same one-hot come near that range; the rest of the gain is `NB201Space.encode`:",
        "features of the function the cell computes (canonical cell, path and op counts).",
        "",
        f"Command: `{command.strip()}`",
        "",
    ]
    text = "\n".join(lines)
    print("\n" + text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
