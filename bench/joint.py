"""Joint architecture x compression search against the sequential baseline (search, then
compress the top-k), at equal number of trained models and at equal wall-clock.

* joint: ``nas-run search --joint`` (XGBoost surrogate over (architecture, policy) pairs,
  objectives val_acc, ORT latency and file size after compression), ``--trials`` pairs;
* sequential: ``nas-run search`` (the same surrogate over architectures, objectives val_acc and
  float ORT latency) with as many trials as the joint run trained models, then
  ``nas-run compress --run DIR --top-k K`` with the policies the joint space can express most
  often used (no compression, pruning 0.3 / 0.5 with KD fine-tuning, each with and without int8).

Fronts are compared by 2-D hypervolume, (1 - val_acc) against ORT latency and against the file
size, each normalised by a reference point common to both methods of a (data set, seed):
1.1 x the largest latency / size either method measured, accuracy 0. The sequential point set
holds its compressed models and its float search trials (they are shippable models too); the
joint one its pairs. "Equal wall-clock" truncates the longer method at the shorter one's time
(trials that completed by then). "Not reached" counts joint front points (latency) that no
sequential point dominates.

Paired (the default): the sequential search's initial design is the joint run's first ``n_init``
trained architectures (random, common to both), so the comparison measures what each method
does with the same start; with 16 architectures, unpaired fronts were decided by which random
architectures each method happened to draw (``--unpaired`` restores that).

    python bench/joint.py                         # mnist1d and digits, 3 seeds: ~1-2 h on 2 cores
    python bench/joint.py --datasets mnist1d --seeds 0 --trials 8 --epochs 2   # a quick look
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
JOINT_OBJECTIVES = ("val_acc", "onnx_latency_ms", "file_bytes")
SEQUENTIAL_OBJECTIVES = ("val_acc", "onnx_latency_ms")


def sequential_policies(finetune: dict[str, Any]) -> list[str]:
    """What the sequential baseline tries on each of its top-k: the joint space's common points."""
    from compress.policy import Policy

    int8 = ("int8", {"format": "qoperator", "calibration": "minmax", "per_channel": True})
    out = [Policy.of(), Policy.of(int8)]
    for ratio in (0.3, 0.5):
        prune = ("structured", {"ratio": ratio, "importance": "l1", "round_to": 8})
        out += [Policy.of(prune, ("finetune", finetune)), Policy.of(prune, ("finetune", finetune), int8)]
    return [p.to_str() for p in out]


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_joint(args: argparse.Namespace, dataset: str, seed: int) -> Path:
    from compress.joint import JointPlan
    from nas.config import SearchConfig
    from nas.search import run_search

    out = args.work / f"joint-{dataset}-s{seed}"
    if (out / "pareto.csv").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    options = {"n_init": args.joint_n_init} if args.joint_n_init else {}
    cfg = SearchConfig(space="unireplk", dataset=dataset, strategy="surrogate", trials=args.trials, tiny=not args.full_size,
                       epochs=args.epochs, seed=seed, joint=True, out=str(out),
                       objectives=(JOINT_OBJECTIVES[0], args.joint_latency, *JOINT_OBJECTIVES[2:]),
                       strategy_options=options)
    wall = _timed(lambda: run_search(cfg, plan=JointPlan()))
    (out / "wall_s.txt").write_text(f"{wall:.1f}\n")
    return out


def first_architectures(recs: list[dict[str, Any]], n: int) -> list[str]:
    """The first ``n`` architectures a joint run trained (its random initial design), in order."""
    trained = sorted((r for r in recs if r["status"] == "complete" and r["metrics"].get("trained") == 1.0),
                     key=lambda r: r["number"])
    return [r["genotype"] for r in trained[:n]]


def run_sequential(args: argparse.Namespace, dataset: str, seed: int, trained: int, initial: list[str]) -> Path:
    from compress.joint import JointSpace
    from compress.run import CompressConfig, run_compress
    from nas.config import SearchConfig
    from nas.search import run_search

    out = args.work / f"sequential-{dataset}-s{seed}"
    done = out / "sequential_plan.json"  # reused only with the same searched architectures' count and start
    key = json.dumps({"trained": trained, "initial": initial})
    if (out / "compress.csv").is_file() and done.is_file() and done.read_text() == key:
        return out
    shutil.rmtree(out, ignore_errors=True)
    cfg = SearchConfig(space="unireplk", dataset=dataset, strategy="surrogate", trials=trained, tiny=not args.full_size,
                       epochs=args.epochs, seed=seed, objectives=SEQUENTIAL_OBJECTIVES, out=str(out),
                       strategy_options={"initial": initial} if initial else {})
    finetune = dict(JointSpace.default_options["finetune"])
    wall = _timed(lambda: run_search(cfg))
    wall += _timed(lambda: run_compress(CompressConfig(run=str(out), top_k=args.top_k,
                                                       policies=tuple(sequential_policies(finetune)))))
    (out / "wall_s.txt").write_text(f"{wall:.1f}\n")
    done.write_text(key)
    return out


def points(
    recs: list[dict[str, Any]], joint: bool, until_s: float | None = None, retimed: dict[str, float] | None = None
) -> tuple[np.ndarray, int]:
    """(val_acc, onnx_latency_ms, file_bytes) of the run's completed models (NaN where a model
    has no such measurement), optionally only those completed within ``until_s`` of the start;
    and how many models it trained by then. ``retimed``: latencies by `model_key`, replacing
    the ones each trial measured. ``recs``: the run's store records (`records`)."""
    start = min(r["datetime_start"] for r in recs if r["datetime_start"] is not None)
    rows, trained = [], 0
    for r in recs:
        if r["status"] != "complete":
            continue
        if until_s is not None and (r["datetime_complete"] - start).total_seconds() > until_s:
            continue
        m = r["metrics"]
        trained += int(m.get("trained", 0) == 1.0) if joint else int(r["stage"] == "search")
        lat = m.get("onnx_latency_ms", np.nan) if retimed is None else retimed.get(model_key(r), np.nan)
        rows.append([m.get("val_acc", np.nan), lat, m.get("file_bytes", np.nan)])
    return np.array(rows, dtype=float).reshape(-1, 3), trained


def records(out: Path) -> list[dict[str, Any]]:
    from nas.search import open_store

    return open_store(out, read_only=True).records()


def model_key(record: dict[str, Any]) -> str:
    """One shipped model per record: its architecture and policy (a float search trial: none)."""
    return f"{record['genotype']}+{record.get('policy') or ''}"


def run_models(out: Path) -> tuple[dict[str, bytes], tuple[int, ...]]:
    """The ONNX file of every completed model of a run, by `model_key`, as `nas-run export`
    rebuilds it (`export.reference`): an int8 trial's own quantized model, else the
    deploy form (re-parameterised) of the pruned / float model, exported as the compression
    stage exports — a float search trial's model is what the identity policy ships."""
    from compress.passes.int8 import export_float_onnx
    from export.formats import copy_module, deploy_form
    from export.reference import reference
    from export.run_folder import open_run

    run = open_run(out)
    data = run.data()
    shape = tuple(data.input_shape)
    models: dict[str, bytes] = {}
    for r in run.store.records():
        if r["status"] != "complete" or model_key(r) in models:
            continue
        ref = reference(run, r, data)
        models[model_key(r)] = ref.onnx if ref.onnx is not None else export_float_onnx(
            deploy_form(copy_module(ref.module)), shape)
    return models, shape


def retime(runs: list[Path], rounds: int, seed: int = 0) -> dict[Path, dict[str, float]]:
    """Every model of ``runs`` timed again in the same ``rounds`` (ORT, batch 1, one thread, each
    round in a new shuffled order across both methods): the trials timed each model once, each
    run at its own time and under its own load, and the sequential search trials with another
    routine (the training form, 15 repeats). Median over rounds, per run and model key. A model
    both runs hold byte for byte (the same architecture trained with the same seed, compressed
    alike: paired runs share their initial architectures) is timed once and shared, so timing
    noise does not decide between two copies of one model."""
    import hashlib
    import random

    from compress.passes.int8 import onnx_latency_ms

    blobs_by_hash: dict[str, bytes] = {}
    keys: dict[tuple[Path, str], str] = {}
    shape: tuple[int, ...] = ()
    for run in runs:
        blobs, shape = run_models(run)
        for key, blob in blobs.items():
            digest = hashlib.sha256(blob).hexdigest()
            blobs_by_hash[digest] = blob
            keys[(run, key)] = digest
    print(f"retiming {len(blobs_by_hash)} distinct models of {len(keys)} ({len(keys) - len(blobs_by_hash)} shared)",
          flush=True)
    rng = random.Random(seed)
    times: dict[str, list[float]] = {h: [] for h in blobs_by_hash}
    for _ in range(rounds):
        order = list(blobs_by_hash)
        rng.shuffle(order)
        for h in order:
            times[h].append(onnx_latency_ms(blobs_by_hash[h], shape, batch_size=1, threads=1, warmup=5, repeats=30))
    out: dict[Path, dict[str, float]] = {run: {} for run in runs}
    for (run, key), digest in keys.items():
        out[run][key] = float(np.median(times[digest]))
    return out


def hv(pts: np.ndarray, col: int, ref: float) -> float:
    from nas.pareto import hypervolume_2d

    ok = np.isfinite(pts[:, 0]) & np.isfinite(pts[:, col])
    losses = np.stack([1.0 - pts[ok, 0], pts[ok, col] / ref], axis=1)
    return hypervolume_2d(losses, np.array([1.0, 1.0]))


def not_reached(joint: np.ndarray, seq: np.ndarray, col: int) -> int:
    """Joint front points (accuracy vs column ``col``) that no sequential point dominates."""
    from nas.pareto import pareto_mask

    def clean(p: np.ndarray) -> np.ndarray:
        p = p[np.isfinite(p[:, 0]) & np.isfinite(p[:, col])]
        return np.stack([-p[:, 0], p[:, col]], axis=1)

    j, s = clean(joint), clean(seq)
    front = j[pareto_mask(j, np.ones(len(j), dtype=bool))] if len(j) else j
    return int(sum(not any((q <= f).all() and (q < f).any() for q in s) for f in front))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["mnist1d", "digits"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=20, help="joint pairs per run")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--joint-n-init", type=int, default=0, metavar="ARCHS",
                        help="the joint surrogate's random initial architectures (0: the strategy's default, 10)")
    parser.add_argument("--unpaired", dest="paired", action="store_false",
                        help="let the sequential search draw its own random initial architectures (default: the "
                             "joint run's, so both start from the same luck of the draw)")
    parser.add_argument("--full-size", action="store_true",
                        help="the space's full macro setting (models where compression changes latency), not the tiny one")
    parser.add_argument("--joint-latency", default="onnx_latency_ms", choices=["onnx_latency_ms", "onnx_latency_rel"],
                        help="the joint run's latency objective (onnx_latency_rel: over a reference model timed "
                             "beside each pair; the table's latencies are re-timed milliseconds either way)")
    parser.add_argument("--work", type=Path, default=ROOT / "results" / "joint_runs")
    parser.add_argument("--out", type=Path, default=RESULTS / "joint.md")
    parser.add_argument("--retime", type=int, default=5, metavar="ROUNDS",
                        help="time every model of both methods again in ROUNDS interleaved rounds (0: the trials' timings)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    header = ("| data set | seed | method | trained | pairs | wall s | HV acc-lat | HV acc-size "
              "| HV acc-lat, equal wall-clock | HV acc-size, equal wall-clock | joint front points not reached "
              "| HV acc-lat, trials' timings |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    wins = {"lat": 0, "size": 0, "lat_wall": 0, "size_wall": 0, "lat_trial": 0}
    runs = 0
    for dataset in args.datasets:
        for seed in args.seeds:
            j_out = run_joint(args, dataset, seed)
            j_recs = records(j_out)
            j_trial, j_trained = points(j_recs, joint=True)
            # paired: the sequential search starts from the joint run's random architectures
            initial = first_architectures(j_recs, args.joint_n_init or 10) if args.paired else []
            s_out = run_sequential(args, dataset, seed, max(1, j_trained), initial)
            s_recs = records(s_out)
            s_trial, s_trained = points(s_recs, joint=False)
            timing = retime([j_out, s_out], args.retime, seed) if args.retime > 0 else {j_out: None, s_out: None}
            j_pts, _ = points(j_recs, joint=True, retimed=timing[j_out])
            s_pts, _ = points(s_recs, joint=False, retimed=timing[s_out])
            j_wall = float((j_out / "wall_s.txt").read_text())
            s_wall = float((s_out / "wall_s.txt").read_text())
            both = np.concatenate([j_pts, s_pts])
            ref_lat = 1.1 * np.nanmax(both[:, 1])
            ref_size = 1.1 * np.nanmax(both[:, 2])
            t = min(j_wall, s_wall)
            j_cut, _ = points(j_recs, joint=True, until_s=t, retimed=timing[j_out])
            s_cut, _ = points(s_recs, joint=False, until_s=t, retimed=timing[s_out])
            ref_trial = 1.1 * np.nanmax(np.concatenate([j_trial, s_trial])[:, 1])
            row = {}
            for name, pts, cut, trial, trained, wall in (("joint", j_pts, j_cut, j_trial, j_trained, j_wall),
                                                         ("sequential", s_pts, s_cut, s_trial, s_trained, s_wall)):
                row[name] = (hv(pts, 1, ref_lat), hv(pts, 2, ref_size), hv(cut, 1, ref_lat), hv(cut, 2, ref_size),
                             hv(trial, 1, ref_trial))
                reach = str(not_reached(j_pts, s_pts, 1)) if name == "joint" else ""
                values = [f"{v:.4f}" for v in row[name]]
                lines.append(f"| {dataset} | {seed} | {name} | {trained} | {len(pts)} | {wall:.0f} | "
                             + " | ".join(values[:4]) + f" | {reach} | {values[4]} |")
            for key, i in (("lat", 0), ("size", 1), ("lat_wall", 2), ("size_wall", 3), ("lat_trial", 4)):
                wins[key] += row["joint"][i] >= row["sequential"][i]
            runs += 1
            print("\n".join(lines[-2:]), flush=True)

    summary = (f"joint >= sequential on {wins['lat']}/{runs} (acc-latency), {wins['size']}/{runs} (acc-size) "
               f"at equal trained models; {wins['lat_wall']}/{runs} and {wins['size_wall']}/{runs} at equal wall-clock; "
               f"acc-latency with the trials' own timings: {wins['lat_trial']}/{runs}")
    cmd = "python bench/joint.py " + " ".join(sys.argv[1:])
    text = "\n".join([
        "# Joint architecture x compression search vs sequential (search, then compress top-k)", "",
        f"Command: `{cmd.strip()}`; space unireplk ({'full size' if args.full_size else 'tiny'}), surrogate strategy, {args.epochs} training epochs, "
        f"joint {args.trials} pairs (latency objective {args.joint_latency}); sequential: as many architectures as the joint run trained, then top-{args.top_k} "
        f"x {len(sequential_policies({'epochs': 2}))} policies; "
        + ("paired: the sequential search starts from the joint run's random initial architectures. " if args.paired
           else "unpaired: each method draws its own initial architectures. ")
        + f"Machine: 2 CPU cores. Written {time.strftime('%Y-%m-%d')}.",
        "", (f"Latencies: every model of both methods of a (data set, seed) timed again in {args.retime} interleaved "
             "rounds (ORT, batch 1, one thread, shuffled order; median), float search trials in the deploy form "
             "the identity policy ships, a model both runs hold byte for byte timed once for both; the last column "
             "keeps each trial's own timing."
             if args.retime > 0 else "Latencies: each trial's own timing."),
        "", *lines, "", summary, "",
    ])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"\n{summary}\nwritten {args.out}")


if __name__ == "__main__":
    main()
