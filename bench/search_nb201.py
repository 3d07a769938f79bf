"""Search strategies on NAS-Bench-201 (CIFAR-10 validation accuracy, seed-mean, 200 epochs).

Each strategy gets ``--evals`` evaluations per run, ``--seeds`` runs; the table reports the
median (and quartiles) over runs of the best validation accuracy found. Reference
(shared/BENCHMARKS.md): expected best of 100 random architectures = 91.03, optimum 91.61.

    python bench/search_nb201.py                      # 100 evals x 20 seeds, all strategies
    python bench/search_nb201.py --seeds 3 --evals 50 # quick look

Needs the optional extra: pip install 'nas-run[bench]'.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

STRATEGIES = ("random", "evolution", "tpe", "surrogate")


def one_run(args: tuple[str, int, int, str]) -> tuple[str, int, float, float, list[float]]:
    strategy_name, seed, evals, dataset = args
    from nas.benchmarks.nb201_table import NB201Table
    from nas.strategies.base import make_strategy
    from search_spaces import get_space

    table = NB201Table.load(dataset)
    space = get_space("nb201")
    strategy = make_strategy(strategy_name, space, n_objectives=1, seed=seed)
    start = time.perf_counter()
    best, trace = -np.inf, []
    for _ in range(evals):
        g = strategy.ask()
        acc = 100.0 * table.query(g)["val_acc"]  # the table holds fractions; papers quote %
        strategy.tell(g, (-acc,))
        best = max(best, acc)
        trace.append(best)
    return strategy_name, seed, best, time.perf_counter() - start, trace


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--evals", type=int, default=100)
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="results/search_nb201.md")
    args = p.parse_args(argv)

    jobs = [
        (s, seed, args.evals, args.dataset) for s in args.strategies.split(",") for seed in range(args.seeds)
    ]
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(pool.map(one_run, jobs))

    lines = [
        f"# NAS-Bench-201 {args.dataset}: best validation accuracy after {args.evals} evaluations, "
        f"{args.seeds} seeds",
        "",
        f"Command: `python bench/search_nb201.py {' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip(),
        "",
        "Reference: expected best of 100 random archs 91.03 (CIFAR-10-valid), optimum 91.61.",
        "",
        "| strategy | median best | q25 | q75 | mean | median best @50 | s/run |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in args.strategies.split(","):
        rows = [r for r in results if r[0] == name]
        best = np.array([r[2] for r in rows])
        half = np.array([r[4][min(49, args.evals - 1)] for r in rows])
        secs = np.mean([r[3] for r in rows])
        q25, q50, q75 = np.percentile(best, [25, 50, 75])
        lines.append(
            f"| {name} | {q50:.2f} | {q25:.2f} | {q75:.2f} | {best.mean():.2f} | {np.median(half):.2f} | {secs:.1f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
