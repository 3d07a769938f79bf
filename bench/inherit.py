"""Weight inheritance (EAS / Net2Net, issue #20): does a search whose children start from their
parents' weights reach the scratch search's front for fewer training epochs?

For each (data set, space) and seed, the same search runs twice with real training: from scratch
(every candidate trains ``--epochs``) and with ``--inherit`` (a candidate one or two decisions from
a trained one starts from its weights and trains ``--inherit-epochs``). After every trial the
hypervolume of the (val_acc, log10 params) front is recorded against the **total training epochs
spent so far**. Reported per seed: the scratch run's final hypervolume and best accuracy; the
epochs the inherited run needed to reach that hypervolume (and their share of the scratch run's);
and both hypervolumes at equal epochs (the smaller of the two runs' totals).

Goals (issue #20): median share <= 0.5, and at equal epochs inherited >= scratch on every seed.

Run from the repository root (two runs at a time on two cores)::

    python bench/inherit.py                       # writes results/inherit.md (+ results/inherit.jsonl)
    python bench/inherit.py --from-log            # the table again from the kept log
"""

from __future__ import annotations

import argparse
import json
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
# hypervolume reference in params per space: no candidate of these settings comes near it
REF_PARAMS = {"unireplk": 1e5, "darts": 1e6, "nasnet": 1e6, "nb201": 1e6}


def one_run(dataset: str, space: str, seed: int, inherit: bool, trials: int, epochs: int,
            inherit_epochs: int | None, strategy: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        cfg = SearchConfig(space=space, dataset=dataset, strategy=strategy, seed=seed, trials=trials, epochs=epochs,
                           inherit=inherit, inherit_epochs=inherit_epochs if inherit else None, out=f"{tmp}/run")
        df = run_search(cfg).store.dataframe().sort_values("number")
    ref = np.array([np.log10(REF_PARAMS[space]), 0.0])
    curve, spent, points = [], 0.0, []
    for row in df.itertuples():
        if str(row.error).startswith("interrupted") or row.status == "rejected":
            continue
        spent += float(row.epochs) if row.status == "complete" else float(row.budget)
        if row.status == "complete":
            points.append((np.log10(float(row.params)), -float(row.val_acc)))
        hv = hypervolume_2d(np.array(points), ref) if points else 0.0
        curve.append((spent, hv, -min(p[1] for p in points) if points else 0.0))
    children = int((df["parent"].notna()).sum()) if "parent" in df else 0
    preserving = float(df["function_preserving"].mean()) if "function_preserving" in df else float("nan")
    return {"dataset": dataset, "space": space, "seed": seed, "inherit": inherit, "curve": curve,
            "trials": len(df), "children": children, "preserving": preserving,
            "minutes": (time.perf_counter() - start) / 60}


def hv_at(curve: list, epochs: float) -> float:
    """The front's hypervolume once ``epochs`` training epochs were spent (the last trial within them)."""
    within = [hv for spent, hv, _ in curve if spent <= epochs + 1e-9]
    return within[-1] if within else 0.0


def epochs_to(curve: list, target: float) -> float | None:
    return next((spent for spent, hv, _ in curve if hv >= target - 1e-12), None)


def table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "# Weight inheritance in search: hypervolume against training epochs spent (#20)",
        "",
        f"Strategy `{args.strategy}`; scratch runs: the candidates x epochs of each set ({args.sets}); inherited "
        f"runs (`--inherit`): {args.inherit_trials_factor}x the candidates, children train "
        f"{args.inherit_epochs or 'a quarter of the'} epochs (default: a quarter of --epochs, rounded up). "
        "Hypervolume of the (val_acc, log10 params) front; 'epochs to reach' = training epochs the inherited "
        "run spent until its front's hypervolume reached the scratch run's final one (share of the scratch "
        "run's epochs); 'at equal epochs' = both fronts after the smaller of the two runs' epoch totals.",
        "",
        "| data / space | seed | scratch: epochs, final hv, best val | inherited: epochs, trials (children, "
        "preserving) | epochs to reach scratch hv (share) | hv at equal epochs: scratch / inherited | best val "
        "at equal epochs: scratch / inherited |",
        "|---|---|---|---|---|---|---|",
    ]
    verdicts: dict[str, list] = {}
    for key in dict.fromkeys((r["dataset"], r["space"]) for r in rows):
        shares, wins = [], []
        for seed in sorted({r["seed"] for r in rows if (r["dataset"], r["space"]) == key}):
            pair = {r["inherit"]: r for r in rows if (r["dataset"], r["space"], r["seed"]) == (*key, seed)}
            if set(pair) != {False, True}:
                continue
            s, i = pair[False]["curve"], pair[True]["curve"]
            s_total, i_total = s[-1][0], i[-1][0]
            reach = epochs_to(i, s[-1][1])
            share = reach / s_total if reach is not None else float("inf")
            equal = min(s_total, i_total)
            hv_s, hv_i = hv_at(s, equal), hv_at(i, equal)
            best_s = max([b for e, _, b in s if e <= equal + 1e-9], default=0.0)
            best_i = max([b for e, _, b in i if e <= equal + 1e-9], default=0.0)
            shares.append(share)
            wins.append(hv_i >= hv_s - 1e-12)
            reach_text = f"{reach:.0f} ({share:.2f})" if reach is not None else f"not reached in {i_total:.0f}"
            lines.append(
                f"| {key[0]} / {key[1]} | {seed} | {s_total:.0f}, {s[-1][1]:.4f}, {s[-1][2]:.4f} | {i_total:.0f}, "
                f"{pair[True]['trials']} ({pair[True]['children']}, {pair[True]['preserving']:.2f}) | {reach_text} | "
                f"{hv_s:.4f} / {hv_i:.4f} | {best_s:.4f} / {best_i:.4f} |"
            )
        verdicts[f"{key[0]} / {key[1]}"] = [float(np.median(shares)) if shares else float("nan"), sum(wins), len(wins)]
    lines += ["", "| data / space | median share of epochs to reach scratch hv (goal <= 0.5) | inherited >= scratch "
              "at equal epochs (goal: every seed) |", "|---|---|---|"]
    for name, (median, won, n) in verdicts.items():
        lines.append(f"| {name} | {median:.2f} {'✓' if median <= 0.5 else '✗'} | {won}/{n} {'✓' if won == n else '✗'} |")
    minutes = sum(r["minutes"] for r in rows)
    lines += ["", f"{len(rows)} runs, {minutes:.0f} min of search in all. Produced by `{args.command}`.", ""]
    return "\n".join(lines)


def parse_set(text: str, args: argparse.Namespace) -> tuple[str, str, int, int]:
    """``data:space`` or ``data:space:trials:epochs`` (the scratch run's; --trials/--epochs otherwise)."""
    parts = text.split(":")
    trials, epochs = (int(parts[2]), int(parts[3])) if len(parts) == 4 else (args.trials, args.epochs)
    return parts[0], parts[1], trials, epochs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", default="mnist1d:unireplk,digits:darts:16:4",
                    help="data:space[:trials:epochs] of the scratch runs (default --trials/--epochs)")
    ap.add_argument("--strategy", default="surrogate")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--inherit-trials-factor", type=int, default=2, help="inherited runs: this many times the trials")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--inherit-epochs", type=int, default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--log", default=str(ROOT / "results" / "inherit.jsonl"))
    ap.add_argument("--from-log", action="store_true", help="rebuild the table from --log, run nothing")
    ap.add_argument("--out", default=str(ROOT / "results" / "inherit.md"))
    args = ap.parse_args()
    args.command = "python bench/inherit.py " + " ".join(sys.argv[1:])

    log = Path(args.log)
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    if not args.from_log:
        done = {(r["dataset"], r["space"], r["seed"], r["inherit"]) for r in rows}
        sets = [parse_set(text, args) for text in args.sets.split(",")]
        jobs = [
            (data, space, seed, inherit, trials, epochs)
            for seed in range(args.seeds)
            for data, space, trials, epochs in sets
            for inherit in (False, True)
            if (data, space, seed, inherit) not in done
        ]
        with ProcessPoolExecutor(args.workers) as pool:
            futures = [
                pool.submit(one_run, d, sp, seed, inh, trials * args.inherit_trials_factor if inh else trials, epochs,
                            args.inherit_epochs, args.strategy)
                for d, sp, seed, inh, trials, epochs in jobs
            ]
            for f in futures:
                r = f.result()
                rows.append(r)
                with log.open("a") as fh:  # kept as it goes: a long bench resumes where it stopped
                    fh.write(json.dumps(r) + "\n")
                print(f"{r['dataset']}/{r['space']} seed {r['seed']} inherit={r['inherit']}: epochs {r['curve'][-1][0]:.0f} "
                      f"hv {r['curve'][-1][1]:.4f} best {r['curve'][-1][2]:.4f} [{r['minutes']:.1f} min]", flush=True)
    text = table(rows, args)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
