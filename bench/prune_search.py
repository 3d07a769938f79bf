"""Per-layer pruning ratios chosen by the XGBoost surrogate, against uniform ratios and against
random search at equal budget: accuracy at equal measured speed-up.

All three go through `nas-run compress` on the same trained model (the ResNet-style CNN of
bench/compress.py on mnist5k, given as builder + state dict):

* uniform: ``--policy`` files with one structured ratio for every layer (0.25, 0.5, 0.7);
* random / surrogate: ``--search random|surrogate --budget N --policy-space prune`` (a ratio per
  layer group from 0, 0.25, 0.5, 0.7; objectives val_acc and ORT latency).

Every policy ends with the same fine-tuning (KD from the uncompressed model, ``--ft-epochs``).
Afterwards every kept model is timed again against the base model in interleaved rounds
(bench/compress.py's timing pass), so speed-ups compare under the same load. For each uniform
point the table shows the most accurate searched policy at least as fast (batch-1 speed-up) and
the difference in accuracy.

    python bench/prune_search.py              # ~15-25 min on 2 cores
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "results"
CNN_SPEC = str(ROOT / "bench" / "resnet_cnn.py") + ":resnet_cnn"
UNIFORM = (0.25, 0.5, 0.7)


def run(args: argparse.Namespace, kind: str, seed: int, target: float | None = None) -> Path:
    """One compression run. ``target``: a targeted search — the most accurate policy whose
    speed-up (the trial's, batch 1) is at least ``target``: objective val_acc, constraint
    ``speedup>=target`` (what a user asks for: "the best model at least this fast")."""
    from compress.policy import Policy
    from compress.run import CompressConfig, run_compress

    out = args.work / (f"{kind}-s{seed}" + (f"-t{target:.3f}" if target is not None else ""))
    common = dict(model=CNN_SPEC, weights=str(args.work / "resnet_cnn.safetensors"), dataset="mnist5k",
                  out=str(out), seed=0, finetune_epochs=args.ft_epochs, finetune_lr=args.ft_lr)
    # the data split (and fine-tuning) stays seed 0 for every run, so accuracies compare on the
    # same validation samples; only the strategy's seed varies
    if (out / "compress.json").is_file():
        return out  # done earlier (re-running the bench re-tabulates)
    if kind == "uniform":
        ft = ("finetune", {"epochs": args.ft_epochs, "lr": args.ft_lr, "kd": True})
        pols = [Policy.of(("structured", {"ratio": r, "importance": "l1", "round_to": args.round_to}), ft).to_str()
                for r in UNIFORM]
        cfg = CompressConfig(policies=tuple(pols), **common)
    else:
        aim = dict(objectives=("val_acc",), constraints=(f"speedup>={target:.3f}",)) if target is not None else {}
        seeded = {"search_options": {"initial": args.initial}} if kind == "surrogate" and args.initial else {}
        cfg = CompressConfig(search=kind, budget=args.budget, policy_space="prune", search_seed=seed,
                             policy_space_options={"round_to": args.round_to}, **aim, **seeded, **common)

    def show(cand: Any, result: Any) -> None:
        m = result.metrics
        text = (f"acc {m['val_acc']:.4f} speedup {m['speedup']:.2f}x params {m.get('params', 0):.0f}"
                if result.status == "complete" else result.error)
        print(f"  [{kind} s{seed}] trial {cand.number}: {text} ({result.duration_s:.0f}s)", flush=True)

    run_compress(cfg, on_result=show)
    return out


def collect(folder: Path, kind: str, seed: int, target: float | None = None) -> list[dict[str, Any]]:
    import pandas as pd

    df = pd.read_csv(folder / "compress.csv")
    df = df[df.status == "complete"]
    return [{"kind": kind, "seed": seed, "policy": p, "val_acc": a, "params": n, "trial_speedup": s, "target": target}
            for p, a, n, s in zip(df.policy, df.val_acc, df.params, df.speedup, strict=True)]


def retime(folders: list[Path], rounds: int) -> dict[str, dict[str, float]]:
    """All kept models of every folder (one base model) timed in the same interleaved rounds."""
    from bench.compress import rebuild_group, time_group
    from compress.evaluate import CompressionEvaluator, user_genotype
    from compress.user_model import load_user_model

    merged = folders[0].parent / "all-compressed"
    shutil.rmtree(merged, ignore_errors=True)
    merged.mkdir()
    for f in folders:
        for art in (f / "compressed").iterdir():
            if not art.name.endswith(".tmp") and not (merged / art.name).exists():
                shutil.copytree(art, merged / art.name)
    ev = CompressionEvaluator(dataset="mnist5k", artefacts_dir=str(merged), standardize=False,
                              model_spec=CNN_SPEC, model_weights=str(folders[0].parent / "resnet_cnn.safetensors"))
    data = ev.data()
    user = load_user_model(CNN_SPEC, ev.model_weights, data.input_shape, data.num_classes)
    group = rebuild_group("cnn", ev, user_genotype(user.sha1), merged)
    print(f"re-timing {len(group.arts)} models in {rounds} rounds", flush=True)
    return time_group(group, rounds)


def _ratios(policy_text: str) -> str:
    """'0.5' for a uniform policy, else the per-layer ratios in layer order ('0.25/0/0.7/...')."""
    from compress.policy import Policy

    passes = [p for p in Policy.from_json(policy_text).passes if p.name == "structured"]
    if not passes:
        return "unpruned"
    s = passes[0].settings
    return str(s["ratio"]) if not s["per_layer"] else "/".join(f"{v:g}" for v in s["per_layer"].values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/prune_search"))
    ap.add_argument("--budget", type=int, default=20, help="policy evaluations per search")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--ft-epochs", type=int, default=2)
    ap.add_argument("--ft-lr", type=float, default=1e-3)
    ap.add_argument("--cnn-epochs", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--round-to", type=int, default=8, help="channel multiple kept by every pruning (uniform and searched)")
    ap.add_argument("--tolerance", type=float, default=0.05,
                    help="'as fast' = at least (1 - tolerance) x the uniform point's speed-up (timing spread)")
    ap.add_argument("--targeted", action="store_true",
                    help="one search per uniform point: max val_acc subject to speedup >= (1 - tolerance) x its speed-up")
    ap.add_argument("--initial", choices=("uniform",), default=None,
                    help="the surrogate's initial design: the uniform policies first (search option initial)")
    ap.add_argument("--out", type=Path, default=None, help="default results/prune_search[_targeted].md")
    args = ap.parse_args()
    args.out = args.out or RESULTS / ("prune_search_targeted.md" if args.targeted else "prune_search.md")
    from bench.compress import train_cnn
    from compress.policy import Policy

    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if not (args.work / "resnet_cnn.safetensors").is_file():
        print(f"training the CNN: val acc {train_cnn(args.work / 'resnet_cnn.safetensors', args.cnn_epochs):.4f}")
    folders = [(run(args, "uniform", 0), "uniform", 0, None)]
    targets: dict[float, float | None] = {r: None for r in UNIFORM}  # uniform ratio -> searched speed-up target
    if args.targeted:
        for u in collect(folders[0][0], "uniform", 0):
            ratio = Policy.from_json(u["policy"]).passes[0].settings["ratio"]
            targets[ratio] = round((1 - args.tolerance) * u["trial_speedup"], 3)
    for seed in range(args.seeds):
        for kind in ("random", "surrogate"):
            for target in sorted({t for t in targets.values()}, key=lambda t: t or 0):
                folders.append((run(args, kind, seed, target), kind, seed, target))
    rows = [r for f, k, s, t in folders for r in collect(f, k, s, t)]
    timing = retime([f for f, _, _, _ in folders], args.rounds)
    for r in rows:
        r.update(timing.get(Policy.from_json(r["policy"]).id, {}))
    lines = [
        "# Per-layer pruning ratios: surrogate vs uniform vs random, at equal measured speed-up",
        "",
        "Command: `" + " ".join(["python", "bench/prune_search.py", *sys.argv[1:]]) + "`",
        "",
        "Model: the ResNet-style CNN of bench/compress.py on mnist5k (builder + state dict). Searches: "
        + ("one per uniform point (objective val_acc, constraint speedup >= "
           f"{1 - args.tolerance:.2f} x that point's trial speed-up), " if args.targeted else
           "objectives val_acc and ORT latency, ")
        + f"{args.budget} evaluations each, {args.seeds} seed(s); every policy fine-tunes {args.ft_epochs} epochs with "
        f"KD (lr {args.ft_lr}); channel counts kept multiples of {args.round_to}. Speed-ups: ORT batch 1 and 32, re-timed in {args.rounds} interleaved rounds against "
        f"the base model; accuracy: validation split in ORT. 'As fast' = batch-1 speed-up at least "
        f"{1 - args.tolerance:.2f}x the uniform point's (two identical pruned structures timed "
        f"{args.tolerance:.0%} apart is the spread of this timing). Runtime {time.perf_counter() - start:.0f} s "
        "(the searches are skipped when their folders exist: a re-run re-times and re-tabulates).",
        "",
        "| uniform ratio | acc | speed-up b1 | b32 | seed | best random as fast (acc, speed-up) | Δ acc | "
        "best surrogate as fast | Δ acc |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for u in [r for r in rows if r["kind"] == "uniform"]:
        ratio = Policy.from_json(u["policy"]).passes[0].settings["ratio"]
        for seed in range(args.seeds):
            cells = []
            for kind in ("random", "surrogate"):
                faster = [r for r in rows if r["kind"] == kind and r["seed"] == seed
                          and r["target"] == targets[ratio]  # a targeted run: that point's own search
                          and r["speedup_b1"] >= (1 - args.tolerance) * u["speedup_b1"]]
                if faster:
                    b = max(faster, key=lambda r: r["val_acc"])
                    delta = 100 * (b["val_acc"] - u["val_acc"])
                    cells += [f"{b['val_acc']:.4f} ({b['speedup_b1']:.2f}x)", f"{delta:+.2f} pts"]
                    if kind == "surrogate":
                        verdicts.append(delta > 0)
                else:
                    cells += ["none as fast", "-"]
                    if kind == "surrogate":
                        verdicts.append(False)
            lines.append(f"| {ratio} | {u['val_acc']:.4f} | {u['speedup_b1']:.2f}x | {u['speedup_b32']:.2f}x | {seed} | "
                         + " | ".join(cells) + " |")
    lines += [
        "",
        f"Goal (surrogate-chosen per-layer ratios beat uniform at equal latency; a tie is not a win): "
        f"{'met' if all(verdicts) else 'NOT met'} — the surrogate is more accurate on {sum(verdicts)} of "
        f"{len(verdicts)} (uniform point, seed) pairs.",
        "",
        "## Every evaluation",
        "",
        "| kind | seed | val acc | params | speed-up b1 | b32 | trial's b1 | policy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["kind"], -r["speedup_b1"])):
        lines.append(f"| {r['kind']} | {r['seed']} | {r['val_acc']:.4f} | {r['params']:.0f} | {r['speedup_b1']:.2f}x | "
                     f"{r['speedup_b32']:.2f}x | {r['trial_speedup']:.2f}x | {_ratios(r['policy'])} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:14]))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
