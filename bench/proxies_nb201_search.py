"""Search runs on NAS-Bench-201 with the proxies of bench/proxies_nb201.py as ``proxies_fn``:
the surrogate with and without each proxy option, against TPE and random search. The proxies
are looked up from the cache file (computed on built networks), the accuracies from the table."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from nas.proxies import ALL_PROXIES, DEFAULT_RANK_PROXIES

# name -> (strategy, its options); 200-genotype pools: 10 design points from the top 50
VARIANTS: dict[str, tuple[str, dict]] = {
    "random": ("random", {}),
    "tpe": ("tpe", {}),
    "surrogate": ("surrogate", {}),
    "surrogate + proxy_features": ("surrogate", {"proxy_features": True}),
    "surrogate + proxy_design=200": ("surrogate", {"proxy_design": 200}),
    "surrogate + all (features, design=200, prescreen=200)": (
        "surrogate", {"proxy_features": True, "proxy_design": 200, "proxy_prescreen": 200}),
}  # fmt: skip


class TableProxies:
    """genotype -> proxy vector of its function class, from a bench cache file."""

    def __init__(self, path: str, rank_names: tuple[str, ...] = DEFAULT_RANK_PROXIES):
        self.vectors = read_vectors(Path(path))
        self.rank_columns = tuple(ALL_PROXIES.index(n) for n in rank_names)

    def __call__(self, g: object) -> np.ndarray:
        from search_spaces.nb201 import canonical_key

        return self.vectors[canonical_key(g)]


def read_vectors(path: Path) -> dict[str, np.ndarray]:
    """Class key -> proxy vector (ALL_PROXIES order, NaN = missing), read without `ProxyCache`
    (which would set aside a file whose settings differ from the ones it is given)."""
    from nas.proxies import ProxyResult

    out = {}
    for line in path.read_text().splitlines()[1:]:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        out[entry["key"]] = ProxyResult.from_json(entry["result"]).vector(ALL_PROXIES)
    return out


_TABLE: dict[str, TableProxies] = {}  # one per worker process and file


def one_run(job: tuple[str, int, int, str, tuple[str, ...]]) -> tuple[str, int, list[float], float]:
    variant, seed, evals, path, rank_names = job
    from nas.benchmarks.nb201_table import NB201Table
    from nas.strategies.base import make_strategy
    from search_spaces import get_space

    table = NB201Table.load("cifar10")
    name, options = VARIANTS[variant]
    if name == "surrogate" and options:
        if path not in _TABLE:
            _TABLE[path] = TableProxies(path, rank_names)
        options = {**options, "proxies_fn": _TABLE[path]}
    strategy = make_strategy(name, get_space("nb201"), n_objectives=1, seed=seed, **options)
    start = time.perf_counter()
    best, trace = -np.inf, []
    for _ in range(evals):
        g = strategy.ask()
        acc = 100.0 * table.query(g)["val_acc"]
        strategy.tell(g, (-acc,))
        best = max(best, acc)
        trace.append(best)
    return variant, seed, trace, time.perf_counter() - start


def search_rows(path: str, seeds: int, evals: int, workers: int, rank_names: tuple[str, ...]) -> list[str]:
    """Markdown rows: mean and median best accuracy @30 and @evals over ``seeds`` runs. Each run
    is kept as one line of results/proxies_nb201_search.jsonl as it ends: a report run again
    (or after an interruption) runs only what is missing."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    done_path = Path(path).with_name("proxies_nb201_search.jsonl")
    tag = {"evals": evals, "rank": list(rank_names), "proxies": Path(path).name}
    results = {}
    if done_path.is_file():
        for line in done_path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if r.get("tag") == tag:
                results[(r["variant"], r["seed"])] = (r["variant"], r["seed"], r["trace"], r["seconds"])
    # seed by seed: an interrupted report still holds whole seeds of every variant (then --seeds fewer)
    jobs = [(v, s, evals, path, rank_names) for s in range(seeds) for v in VARIANTS if (v, s) not in results]
    # spawn, not fork: the report has fitted XGBoost models already, and a forked child inherits
    # the OpenMP runtime's state mid-flight; its first fit then waits forever (seen here)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool, open(done_path, "a") as log:
        for future in as_completed([pool.submit(one_run, job) for job in jobs]):
            variant, seed, trace, secs = future.result()
            results[(variant, seed)] = (variant, seed, trace, secs)
            log.write(json.dumps({"tag": tag, "variant": variant, "seed": seed, "trace": trace, "seconds": secs}) + "\n")
            log.flush()
    from scipy.stats import mannwhitneyu

    at30_of = {v: np.array([results[(v, s)][2][min(29, evals - 1)] for s in range(seeds)]) for v in VARIANTS}
    optimum = max(max(r[2]) for r in results.values())  # the best any run found: NB201's optimum here
    rows = []
    for variant in VARIANTS:
        runs = [results[(variant, s)] for s in range(seeds)]
        last = np.array([r[2][-1] for r in runs])
        at30, secs = at30_of[variant], np.mean([r[3] for r in runs])
        p = "-" if variant == "surrogate" else f"{mannwhitneyu(at30, at30_of['surrogate']).pvalue:.3f}"
        rows.append(f"| {variant} | {at30.mean():.2f} | {np.median(at30):.2f} | {int((at30 >= optimum - 1e-6).sum())} | "
                    f"{p} | {last.mean():.2f} | {np.median(last):.2f} | {int((last >= optimum - 1e-6).sum())} | "
                    f"{secs:.1f} |")  # fmt: skip
    return rows
