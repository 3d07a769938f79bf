"""The tables of bench/proxies_nb201.py: proxy Kendall tau, the full-size check, surrogate tau with
and without proxy features, and (unless skipped) search runs. Writes results/proxies_nb201.md."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from proxies_nb201 import all_cells, cache_path
from proxies_nb201_search import VARIANTS, read_vectors, search_rows
from scipy.stats import kendalltau

from nas.proxies import ALL_PROXIES, DEFAULT_RANK_PROXIES, rank_mix, standardise


def _tau(values: np.ndarray, truth: np.ndarray) -> float:
    """Kendall tau with missing values ranked below every present one (as the rank mix does)."""
    v = np.where(np.isnan(values), np.nanmin(values) - 1.0, values) if np.isnan(values).any() else values
    return float(kendalltau(v, truth).statistic)


def proxy_costs(paths: dict[str, Path]) -> list[str]:
    """Mean seconds of each proxy per network, one column per cache file."""
    means = {}
    for label, path in paths.items():
        per: dict[str, list[float]] = {}
        for entry in _entries(path):
            for name, sec in entry["seconds"].items():
                per.setdefault(name, []).append(sec)
        means[label] = {k: float(np.mean(v)) for k, v in per.items()}
    rows = [f"| {name} | " + " | ".join(f"{means[c].get(name, float('nan')):.3f}" for c in paths) + " |"
            for name in ALL_PROXIES]  # fmt: skip
    totals = " | ".join(f"{sum(means[c].values()):.3f}" for c in paths)
    return [f"| proxy | {' | '.join(paths)} |", "|---|" + "---|" * len(paths), *rows, f"| all nine | {totals} |"]


def proxy_taus(P: np.ndarray, acc: np.ndarray) -> list[str]:
    rows = []
    for j, name in enumerate(ALL_PROXIES):
        missing = int(np.isnan(P[:, j]).sum())
        rows.append(f"| {name} | {_tau(P[:, j], acc):.3f} | {missing} |")
    mixes = {"rank mix of " + ", ".join(DEFAULT_RANK_PROXIES): [ALL_PROXIES.index(n) for n in DEFAULT_RANK_PROXIES],
             "rank mix of all nine": list(range(len(ALL_PROXIES)))}  # fmt: skip
    for label, cols in mixes.items():
        rows.append(f"| {label} | {_tau(rank_mix(P, cols), acc):.3f} | - |")
    return rows


def calibration(small: dict[str, np.ndarray], full_path: Path, acc_of: dict[str, float]) -> tuple[list[str], int]:
    """Per proxy on the full-size sample: tau(reduced, full), tau(reduced, acc), tau(full, acc)."""
    full = read_vectors(full_path)
    keys = sorted(full)
    A, B = np.stack([small[k] for k in keys]), np.stack([full[k] for k in keys])
    acc = np.array([acc_of[k] for k in keys])
    rows = [f"| {name} | {_tau(A[:, j], np.nan_to_num(B[:, j], nan=-1e9)):.3f} | {_tau(A[:, j], acc):.3f} | "
            f"{_tau(B[:, j], acc):.3f} |" for j, name in enumerate(ALL_PROXIES)]  # fmt: skip
    return rows, len(keys)


def surrogate_taus(X: np.ndarray, P: np.ndarray, acc: np.ndarray, sizes: list[int], seeds: int) -> list[str]:
    """XGBSurrogate (1 model) trained on n random cells, tau on all the others."""
    from nas.surrogate import XGBSurrogate

    rows = []
    for n in sizes:
        taus: dict[str, list[float]] = {"encoding": [], "encoding + proxies": [], "proxies only": []}
        for seed in range(seeds):
            perm = np.random.default_rng(seed).permutation(len(acc))
            tr, te = perm[:n], perm[n:]
            p_tr, p_te = standardise(P[tr], P[te])  # the run's own scale: its training rows
            feats = {"encoding": (X[tr], X[te]), "encoding + proxies": (np.hstack([X[tr], p_tr]), np.hstack([X[te], p_te])),
                     "proxies only": (p_tr, p_te)}  # fmt: skip
            for name, (a, b) in feats.items():
                model = XGBSurrogate(n_models=1, seed=seed, n_jobs=1).fit(a, acc[tr])
                taus[name].append(kendalltau(model.predict(b), acc[te]).statistic)
        rows += [f"| {n} | {name} | {np.mean(t):.3f} | {np.std(t):.3f} |" for name, t in taus.items()]
    return rows


def report(args: argparse.Namespace, argv: list[str]) -> None:
    from nas.benchmarks import NB201Table
    from search_spaces.nb201 import NB201Space, canonical_key, to_index_key

    start = time.perf_counter()
    path = cache_path(args.channels, args.cells, args.batch)
    vectors = read_vectors(path)
    table = NB201Table.load("cifar10")
    cells = all_cells()
    acc = np.array([100.0 * table.query(g)["val_acc"] for g in cells])
    P = np.stack([vectors[canonical_key(g)] for g in cells])
    space = NB201Space("nb201")
    X = np.stack([space.encode(g) for g in cells])
    secs = [sum(r) for r in _seconds(path)]
    lines = [
        "# Zero-cost proxies on NAS-Bench-201 (CIFAR-10-valid, seed-mean accuracy)",
        "",
        f"Proxies computed by `nas.proxies.compute_proxies` on networks built by `NB201Space.build` at C={args.channels}, "
        f"N={args.cells} cell(s) per stage, on one batch of {args.batch} real CIFAR-10 training images (seed 0), one "
        f"torch thread; one value per function class (4,930 `canonical_key` classes for the 15,625 cells). Mean "
        f"{np.mean(secs):.3f} s per network for all nine proxies (median {np.median(secs):.3f} s), "
        f"{sum(secs) / 60:.1f} min in all.",
        "",
        "Scope: at NB201's own size (C=16, N=5) the nine proxies cost ~1.4 s per network on one core, ~2 h for the "
        "4,930 classes and ~6 h for every cell, over the 30-minute budget of this bench; so the full table is computed "
        "on the reduced network, and 100 random classes at the full size show what the reduction changes (next "
        "tables). Real images, not random-normal inputs: naswot, snip, grad_norm, fisher and jacob_cov read the data.",
        "",
        "## Kendall tau of each proxy with accuracy (all 15,625 cells)",
        "",
        "Missing values (a degenerate network: e.g. output cut off by `none`, so no gradient reaches a weight) rank "
        "below every present value.",
        "",
        "| proxy | tau | cells missing |",
        "|---|---|---|",
        *proxy_taus(P, acc),
        "",
    ]
    if args.calibration:
        c, n = (int(v) for v in args.calibration.split(","))
        full_path = cache_path(c, n, args.batch)
        if full_path.is_file():
            lines += [
                f"## Cost: mean seconds per network, batch {args.batch}, one torch thread",
                "",
                "Measured on the shared 2-core machine while other jobs ran (the compute step ran under nice -n 10); "
                "each proxy on its own copy of the model, model build not included.",
                "",
                *proxy_costs({f"C={args.channels}, N={args.cells}": path, f"C={c}, N={n}": full_path}),
                "",
            ]
            acc_of = {k: 100.0 * table.query(g)["val_acc"] for g in cells if (k := to_index_key(g)) == canonical_key(g)}
            rows, k = calibration(vectors, full_path, acc_of)
            fsecs = [sum(r) for r in _seconds(full_path)]
            lines += [
                f"## Reduced (C={args.channels}, N={args.cells}) vs NB201's own size (C={c}, N={n})",
                "",
                f"{k} random classes computed at both sizes ({np.mean(fsecs):.2f} s per full-size network). tau with "
                "accuracy here is on these classes only (each class's smallest cell).",
                "",
                "| proxy | tau reduced vs full | tau reduced vs acc | tau full vs acc |",
                "|---|---|---|---|",
                *rows,
                "",
            ]
    lines += [
        f"## Surrogate Kendall tau with and without proxy features ({args.tau_seeds} splits)",
        "",
        "XGBSurrogate, one model, trained on n random cells, tau on all the others; proxies standardised by the "
        "training rows' mean and std (as the strategy does).",
        "",
        "| n | features | mean tau | std |",
        "|---|---|---|---|",
        *surrogate_taus(X, P, acc, [100, 1000], args.tau_seeds),
        "",
    ]
    if not args.skip_search:
        rows = search_rows(str(path), args.seeds, args.evals, args.workers, DEFAULT_RANK_PROXIES)
        lines += [
            f"## Search: best validation accuracy @30 and @{args.evals} evaluations, {args.seeds} seeds",
            "",
            f"Proxies as `proxies_fn` (looked up by class); rank mix of {', '.join(DEFAULT_RANK_PROXIES)}. "
            f"{len(VARIANTS)} variants, {args.workers} worker processes. p: two-sided Mann-Whitney U of the {args.seeds} "
            "best-@30 values against the plain surrogate's. The proxies cost nothing here (a table look-up); in a run "
            "each costs a model build and the passes above (see the cost table), checked against 0.1 of one training.",
            "",
            f"| strategy | mean @30 | median @30 | runs at optimum @30 | p vs surrogate @30 | mean @{args.evals} | "
            f"median @{args.evals} | runs at optimum @{args.evals} | s/run |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    lines += [f"{time.perf_counter() - start:.0f} s wall for this report ({os.cpu_count()} CPUs, shared); search runs "
              "already in results/proxies_nb201_search.jsonl are read, not run again (s/run is as measured then).", "",
              f"Command: `python bench/proxies_nb201.py {' '.join(argv)}`", ""]  # fmt: skip
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text)


def _entries(path: Path) -> list[dict]:
    """The cached `ProxyResult` records of a bench cache file (its settings line left out)."""
    import json

    out = []
    for line in path.read_text().splitlines()[1:]:
        try:
            out.append(json.loads(line)["result"])
        except (json.JSONDecodeError, KeyError):
            continue
    return out


def _seconds(path: Path) -> list[list[float]]:
    return [list(e["seconds"].values()) for e in _entries(path)]
