"""Search strategies on NAS-Bench-201 (validation accuracy, seed-mean, 200 epochs).

Each strategy gets ``--evals`` evaluations per run, ``--seeds`` runs; the table reports the
median (and quartiles) over runs of the best validation accuracy found. The reference line is
computed from the table itself: its optimum, and the exact expected best of ``--evals`` distinct
uniform samples (random search's expectation).

``--fail [RULES]`` adds a deterministic, structured failure region: candidates in it fail
(``tell(g, None)``, as a crashed or out-of-memory trial) and still use up an evaluation. RULES
is a comma list of ``params>N`` (cells of more than N parameters "run out of memory") and op
names (cells using that op anywhere "crash", e.g. an op the target runtime lacks); the default,
``params>600000,avg_pool_3x3``, fails 81% of the space. The table then reports the best
*feasible* accuracy and the share of asks that failed.

    python bench/search_nb201.py                      # 100 evals x 20 seeds, all strategies
    python bench/search_nb201.py --fail               # the same in the failure region
    python bench/search_nb201.py --seeds 3 --evals 50 # quick look

Needs the optional extra: pip install 'nas-run[bench]'.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

STRATEGIES = ("random", "evolution", "tpe", "nsga2", "surrogate")
DEFAULT_FAIL = "params>600000,avg_pool_3x3"


def parse_fail(spec: str) -> tuple[float | None, tuple[str, ...]]:
    """(parameter limit or None, op names that fail) from ``params>N,op,...``."""
    from search_spaces.nb201 import OPS

    limit, ops = None, []
    for token in filter(None, (t.strip() for t in spec.split(","))):
        if token.startswith("params>"):
            limit = float(token.removeprefix("params>"))
        elif token in OPS:
            ops.append(token)
        else:
            raise SystemExit(f"--fail: {token!r} is neither params>N nor one of the ops {', '.join(OPS)}")
    return limit, tuple(ops)


def fails(
    metrics: dict[str, float], edges: tuple[str, ...], rule: tuple[float | None, tuple[str, ...]]
) -> bool:
    limit, ops = rule
    return (limit is not None and metrics["params"] > limit) or any(op in edges for op in ops)


def one_run(args: tuple[str, int, int, str, str]) -> tuple[str, int, float, float, list[float], int]:
    strategy_name, seed, evals, dataset, fail_spec = args
    from nas.benchmarks.nb201_table import NB201Table
    from nas.strategies.base import make_strategy
    from search_spaces import get_space

    table = NB201Table.load(dataset)
    rule = parse_fail(fail_spec) if fail_spec else (None, ())
    space = get_space("nb201")
    strategy = make_strategy(strategy_name, space, n_objectives=1, seed=seed)
    start = time.perf_counter()
    best, trace, failed = -np.inf, [], 0
    for _ in range(evals):
        g = strategy.ask()
        metrics = table.query(g)
        if fails(metrics, g["edges"], rule):
            strategy.tell(g, None)  # as a crashed / out-of-memory trial
            failed += 1
        else:
            acc = 100.0 * metrics["val_acc"]  # the table holds fractions; papers quote %
            strategy.tell(g, (-acc,))
            best = max(best, acc)
        trace.append(best)
    return strategy_name, seed, best, time.perf_counter() - start, trace, failed


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) if 0 <= k <= n else -math.inf


def expected_best(values: np.ndarray, n_other: int, draws: int) -> float:
    """Exact expectation of the best of ``values`` among ``draws`` distinct uniform samples of
    ``values`` plus ``n_other`` candidates that never count (failures): P(best <= v_k) is the
    chance that all draws avoid the values above v_k."""
    v = np.sort(values)
    total = len(v) + n_other
    log_all = _log_comb(total, draws)
    cdf = np.array([math.exp(_log_comb(n_other + k, draws) - log_all) for k in range(len(v) + 1)])
    return float(np.dot(v, np.diff(cdf)) / (1.0 - cdf[0]))  # given at least one feasible draw


def reference(dataset: str, evals: int, fail_spec: str) -> tuple[str, float]:
    """The reference line for the table, and the failing share of the space."""
    from nas.benchmarks.nb201_table import NB201Table
    from search_spaces.nb201 import from_index_key

    table = NB201Table.load(dataset)
    rule = parse_fail(fail_spec) if fail_spec else (None, ())
    acc, bad = [], 0
    for key in table.all_keys():
        g = from_index_key(key)
        metrics = table.query(g)
        if fails(metrics, g["edges"], rule):
            bad += 1
        else:
            acc.append(100.0 * metrics["val_acc"])
    values = np.array(acc)
    share = bad / (bad + len(values))
    if not fail_spec:
        text = (
            f"Reference ({dataset}, computed from the table): expected best of {evals} random archs "
            f"{expected_best(values, 0, evals):.2f}, optimum {values.max():.2f}."
        )
    else:
        text = (
            f"Reference ({dataset}): the failure region `{fail_spec}` holds {100 * share:.1f}% of the "
            f"{bad + len(values)} cells; best feasible {values.max():.2f} (optimum of the whole table "
            f"{table.optimum()[1]['val_acc'] * 100:.2f}); expected best feasible of {evals} random asks "
            f"{expected_best(values, bad, evals):.2f}."
        )
    return text, share


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--evals", type=int, default=100)
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--fail", nargs="?", const=DEFAULT_FAIL, default="", metavar="RULES")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", help="default results/search_nb201[_<dataset>][_fail].md")
    args = p.parse_args(argv)
    if args.fail:
        parse_fail(args.fail)  # a typo fails now, not in a worker
    names = args.strategies.split(",")
    out = args.out or (
        "results/search_nb201"
        + ("" if args.dataset == "cifar10" else f"_{args.dataset}")
        + ("_fail" if args.fail else "")
        + ".md"
    )

    jobs = [(s, seed, args.evals, args.dataset, args.fail) for s in names for seed in range(args.seeds)]
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(pool.map(one_run, jobs))

    ref, share = reference(args.dataset, args.evals, args.fail)
    what = "best feasible validation accuracy" if args.fail else "best validation accuracy"
    lines = [
        f"# NAS-Bench-201 {args.dataset}: {what} after {args.evals} evaluations, {args.seeds} seeds"
        + (" — failure region" if args.fail else ""),
        "",
        f"Command: `python bench/search_nb201.py {' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip(),
        "",
        ref,
        "",
    ]
    half_at = min(49, args.evals - 1)
    if args.fail:
        lines += [
            "Failed asks use up an evaluation, as failed trials do in a run. Goal: each learning "
            "strategy beats random on median best feasible accuracy and asks at most half as many "
            "failing candidates.",
            "",
            "| strategy | median best | q25 | q75 | mean | median best @50 | failed asks | goal | s/run |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
    else:
        lines += [
            "| strategy | median best | q25 | q75 | mean | median best @50 | s/run |",
            "|---|---|---|---|---|---|---|",
        ]
    summary = {}
    for name in names:
        rows = [r for r in results if r[0] == name]
        best = np.array([r[2] for r in rows])
        half = np.array([r[4][half_at] for r in rows])
        secs = np.mean([r[3] for r in rows])
        failed = np.mean([r[5] for r in rows]) / args.evals
        q25, q50, q75 = np.percentile(best, [25, 50, 75])
        summary[name] = (q50, failed)
        row = f"| {name} | {q50:.2f} | {q25:.2f} | {q75:.2f} | {best.mean():.2f} | {np.median(half):.2f} |"
        if args.fail:
            goal = ""
            if name != "random" and "random" in summary:
                r50, rfail = summary["random"]
                goal = "met" if q50 > r50 and failed <= rfail / 2 else "**not met**"
            row += f" {100 * failed:.1f}% | {goal} |"
        lines.append(row + f" {secs:.1f} |")
    if args.fail:
        lines += ["", f"Random's failed share is the region's ({100 * share:.1f}%): it does not learn."]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
