"""Depth + width against width alone: does removing whole blocks before channel pruning (N2N's two
stages, `remove_blocks` then `structured`) buy accuracy or latency at the same parameter count?

Two models, as in results/compress.md: the ResNet-style CNN (`bench/resnet_cnn.py`, trained here
4 epochs on mnist5k as stored) and its full-size large-kernel model "searched #1"
(`LK_GENOTYPE`, trained here 8 epochs on standardised MNIST-1D, AdamW one-cycle, the search's
recipe). Both go through the product's compression path as a user's model
(`CompressionEvaluator`: fine-tuning with KD from the uncompressed model, BN re-estimation,
accuracy on the validation split in ONNX Runtime); the large-kernel model's policies end with
``merge``, the form it ships in, and its base is timed merged too.

For each width-only ratio r (``structured(r) -> finetune``) the depth policies remove k blocks
(the pass's own probe picks them: its default ranking, points lost per share of MACs saved beyond
the parameter share; ``rank="drop"``, accuracy alone, on the CNN, and ``cost="latency_beyond_params"``,
measured latency in place of MACs, on the large-kernel model, for comparison; what every ranking
removes is listed too) and then prune channels at the ratio whose merged parameter
count comes closest to the width-only one (bisection, no fine-tuning), so each comparison is at
(nearly) equal parameters. All fine-tune ``--ft-epochs`` epochs at lr 3e-3 with KD (T=4, 0.5).
Latency: ORT CPU, 1 thread, batch 1 (and 32), every artefact rebuilt from its records and timed
in interleaved rounds with the base (`bench.compress.time_group`); medians.

    nice -n 10 python bench/depth.py             # writes results/depth.md
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script from a checkout

# results/compress.md's "searched #1": 890.8k parameters merged, stages of 1, 3, 3, 1 blocks
LK_GENOTYPE = "unireplk@1|s0=(1,32,7,1,1,4)|s1=(3,128,5,0,0,4)|s2=(3,128,17,1,1,2)|s3=(1,128,3,1,1,4)"
LK_SPEC = str(ROOT / "bench" / "depth.py") + ":lk_searched"
CNN_SPEC = str(ROOT / "bench" / "resnet_cnn.py") + ":resnet_cnn"
FT_LR = 3e-3
RATIOS = [0.5, 0.7, 0.8]  # width-only: ~4x, ~10x, ~16x fewer parameters


def lk_searched(num_classes: int = 10, input_shape: tuple[int, ...] = (1, 40)) -> Any:
    """The large-kernel model in its training form (branches and BNs), built from `LK_GENOTYPE`."""
    from search_spaces import Genotype, get_space

    space = get_space("unireplk")
    return space.build(space.validate(Genotype.from_str(LK_GENOTYPE)), tuple(input_shape), num_classes)


def train(model: Any, data: Any, epochs: int, seed: int = 0) -> Any:
    """AdamW + one-cycle (peak 3e-3), batch 64, on the training split: bench/compress.py's recipe."""
    import numpy as np
    import torch

    torch.manual_seed(seed)
    x, y = torch.as_tensor(np.asarray(data.x_train)), torch.as_tensor(np.asarray(data.y_train))
    steps = epochs * ((len(x) + 63) // 64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = order[i : i + 64]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@dataclass
class Setup:
    """One base model and what compressing it needs."""

    name: str
    ev: Any  # CompressionEvaluator
    genotype: Any
    merge: bool  # large-kernel: policies end with "merge", the shipped form
    base: Any = None
    ctx: Any = None
    base_params: int = 0
    rows: list[dict[str, Any]] = field(default_factory=list)

    def load(self) -> None:
        from nas.cost import profile
        from search_spaces.large_kernel import reparameterize

        self.base = self.ev.load_base(self.genotype)
        self.ctx = self.ev.context(self.base)
        shipped = reparameterize(copy.deepcopy(self.base.module).eval()) if self.merge else self.base.module
        self.base_params = profile(shipped, self.shape).params

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.ev.data().input_shape)


def setups(work: Path, lk_epochs: int, cnn_epochs: int, reused: list[str]) -> list[Setup]:
    """Train (or reuse, named in ``reused``) both base models; evaluators as for a user's ``--model``."""
    import torch
    from safetensors.torch import save_file

    from bench.compress import train_cnn
    from compress.evaluate import CompressionEvaluator, user_genotype
    from compress.user_model import load_user_model
    from nas.data import load_dataset

    work.mkdir(parents=True, exist_ok=True)
    cnn_w = work / f"resnet_cnn_e{cnn_epochs}.safetensors"
    if not cnn_w.is_file():
        print(f"  CNN trained: val acc {train_cnn(cnn_w, cnn_epochs):.4f}", flush=True)
    else:
        reused.append(str(cnn_w))
    lk_w = work / f"lk_searched_e{lk_epochs}.safetensors"
    if not lk_w.is_file():
        data = load_dataset("mnist1d", seed=0, standardize=True)
        model = train(lk_searched(data.num_classes, data.input_shape), data, lk_epochs)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(lk_w))
        with torch.no_grad():
            acc = float((model(torch.as_tensor(data.x_val)).argmax(1).numpy() == data.y_val).mean())
        print(f"  large-kernel model trained: val acc {acc:.4f}", flush=True)
    else:
        reused.append(str(lk_w))
    out = []
    for name, spec, weights, dataset, standardize, merge in (
        ("ResNet CNN", CNN_SPEC, cnn_w, "mnist5k", False, False),
        ("searched #1 (large-kernel)", LK_SPEC, lk_w, "mnist1d", True, True),
    ):
        ev = CompressionEvaluator(dataset=dataset, artefacts_dir=str(work / "compressed"), standardize=standardize,
                                  model_spec=spec, model_weights=str(weights), threads=1)
        data = ev.data()
        g = user_genotype(load_user_model(spec, str(weights), data.input_shape, data.num_classes).sha1)
        out.append(Setup(name, ev, g, merge))
    return out


# -- policies at equal parameters ---------------------------------------------------------------------
def finetune(epochs: int) -> tuple[str, dict[str, Any]]:
    return ("finetune", {"epochs": epochs, "lr": FT_LR, "kd": True})


def shipped_policy(s: Setup, steps: list[Any]) -> Any:
    from compress.policy import Policy

    return Policy.of(*steps, *(["merge"] if s.merge else []))


def params_of(s: Setup, steps: list[Any]) -> int:
    """Merged parameter count of ``steps`` applied without fine-tuning."""
    from nas.cost import profile

    s.ctx.notes.clear()
    return profile(shipped_policy(s, steps).apply(s.base.module, s.ctx).model, s.shape).params


def width(ratio: float) -> list[Any]:
    return [("structured", {"ratio": ratio})] if ratio > 0 else []


def matched_ratio(s: Setup, depth: list[Any], target: int, iterations: int = 9) -> tuple[float, int]:
    """The channel ratio after ``depth`` whose parameter count is closest to ``target``."""
    tried = {0.0: params_of(s, depth)}
    if tried[0.0] <= target:
        return 0.0, tried[0.0]
    lo, hi = 0.0, 0.95
    for _ in range(iterations):
        mid = round((lo + hi) / 2, 4)
        tried[mid] = params_of(s, depth + width(mid))
        lo, hi = (mid, hi) if tried[mid] > target else (lo, mid)
    best = min(tried, key=lambda r: (abs(tried[r] - target), r))
    return best, tried[best]


def run_policy(s: Setup, label: str, steps: list[Any], ft_epochs: int) -> dict[str, Any]:
    pol = shipped_policy(s, [*steps, finetune(ft_epochs)])
    t0 = time.perf_counter()
    m = s.ev(s.genotype, 1, lambda *a, **k: None, policy=pol.to_str())
    kept = json.loads((Path(s.ev.artefacts_dir) / f"{s.genotype.id}+{pol.id}" / "policy.json").read_text())
    rb = next((r for r in kept["records"] if r["pass"] == "remove_blocks"), {})
    removed = rb.get("removed", [])
    row = {"model": s.name, "policy": label, "policy_id": pol.id, "val_acc": m["val_acc"],
           "acc_drop": m["acc_drop"], "params": m["params"], "removed": removed, "scores": rb.get("scores", {}),
           "seconds": time.perf_counter() - t0}
    print(f"  {s.name}: {label}: val {m['val_acc']:.4f} drop {m['acc_drop']:+.2f} params {m['params'] / 1e3:.1f}k "
          f"removed {removed} ({row['seconds']:.0f}s)", flush=True)
    return row


def compare(s: Setup, ratios: list[float], depths: list[dict[str, Any]], ft_epochs: int) -> None:
    """Width-only at each ratio, and each depth setting matched to its parameter count."""
    for r in ratios:
        target = params_of(s, width(r))
        s.rows.append({**run_policy(s, f"structured {r:g}", width(r), ft_epochs), "group": f"{r:g}"})
        for d in depths:
            depth = [("remove_blocks", d)]
            ratio, got = matched_ratio(s, depth, target)
            what = ", ".join(f"{k}={v}" for k, v in d.items() if v != 1 or k != "keep_per_stage")
            label = f"remove_blocks({what}) + structured {ratio:g}"
            row = run_policy(s, label, depth + width(ratio), ft_epochs)
            s.rows.append({**row, "group": f"{r:g}", "matched": got / target})


# -- timing and report ----------------------------------------------------------------------------------
def time_all(s: Setup, rounds: int) -> None:
    from bench.compress import rebuild_group, time_group
    from compress.passes.int8 import export_float_onnx
    from search_spaces.large_kernel import reparameterize

    g = rebuild_group(s.name, s.ev, s.genotype, Path(s.ev.artefacts_dir), {r["policy_id"] for r in s.rows})
    if s.merge:  # the base as it ships: merged, like every artefact
        g.base_bytes = export_float_onnx(reparameterize(copy.deepcopy(s.base.module).eval()), s.shape)
    timing = time_group(g, rounds)
    for r in s.rows:
        r.update(timing[r["policy_id"]], replay_val_acc=g.replay_acc[r["policy_id"]])


def table(setups_: list[Setup]) -> list[str]:
    head = ("| model | width-only ratio (group) | policy | blocks removed | params (x fewer) | val acc | drop (pts) "
            "| ORT b1 ms (base) | b1 speed-up | ORT b32 ms | b32 speed-up |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in setups_:
        for r in s.rows:
            lines.append(
                f"| {s.name} | {r['group']} | {r['policy']} | {', '.join(r['removed']) or '-'} | "
                f"{r['params'] / 1e3:.1f}k ({s.base_params / r['params']:.1f}x) | {r['val_acc']:.4f} | "
                f"{r['acc_drop']:+.2f} | {r['ms_b1']:.3f} ({r['base_ms_b1']:.3f}) | {r['speedup_b1']:.2f}x | "
                f"{r['ms_b32']:.2f} | {r['speedup_b32']:.2f}x |")
    return lines


def goals(setups_: list[Setup]) -> list[str]:
    out = []
    for s in setups_:
        ten = [r for r in s.rows if s.base_params / r["params"] >= 10 and r["acc_drop"] <= 1.0 + 1e-9]
        verdict = "met" if ten else "not met"
        best = max(s.rows, key=lambda r: s.base_params / r["params"] if r["acc_drop"] <= 1.0 + 1e-9 else 0)
        out.append(f"- {s.name}, >= 10x fewer parameters at <= 1 point drop: **{verdict}**"
                   + (f" ({', '.join(r['policy'] for r in ten)})" if ten else
                      f" (the most at <= 1 point: {s.base_params / best['params']:.1f}x, {best['policy']}, "
                      f"drop {best['acc_drop']:+.2f})" if best['acc_drop'] <= 1.0 + 1e-9 else ""))
        for group in dict.fromkeys(r["group"] for r in s.rows):
            rows = [r for r in s.rows if r["group"] == group]
            w, deep = rows[0], rows[1:]
            for d in deep:
                faster = w["ms_b1"] / d["ms_b1"]
                ok = faster >= 1.3 and d["acc_drop"] <= w["acc_drop"] + 1e-9
                how = f"{faster:.2f}x lower b1 latency" if faster >= 1 else f"{1 / faster:.2f}x *higher* b1 latency"
                out.append(f"  - width-only {group} (drop {w['acc_drop']:+.2f}, {w['ms_b1']:.3f} ms) vs {d['policy']} "
                           f"(params {d['matched']:.2f}x the width-only count, drop {d['acc_drop']:+.2f}, "
                           f"{d['ms_b1']:.3f} ms): {how}"
                           f"{' at no more drop' if d['acc_drop'] <= w['acc_drop'] + 1e-9 else ', more drop'} -> "
                           f"{'yes' if ok else 'no'} for '>= 1.3x lower latency at equal drop'")
    return out


def summary(setups_: list[Setup]) -> list[str]:
    """Per model and depth setting: the range of b1 latency ratios (width-only / depth) and of drop
    differences (depth - width-only) over the parameter targets."""
    out = []
    for s in setups_:
        groups = [[r for r in s.rows if r["group"] == g] for g in dict.fromkeys(r["group"] for r in s.rows)]
        for i in range(1, len(groups[0])):
            setting = groups[0][i]["policy"].split(" + ")[0]
            ratios = [g[0]["ms_b1"] / g[i]["ms_b1"] for g in groups]
            drops = [g[i]["acc_drop"] - g[0]["acc_drop"] for g in groups]
            removed = ", ".join(groups[0][i]["removed"])
            out.append(f"- {s.name}, {setting} (removes {removed}): width-only / depth b1 latency "
                       f"{min(ratios):.2f}-{max(ratios):.2f}x, drop difference {min(drops):+.2f} to {max(drops):+.2f} pts "
                       f"over width-only ratios {', '.join(g[0]['group'] for g in groups)}")
    return out


RANKINGS = [{}, {"cost": "macs"}, {"cost": "latency_beyond_params"}, {"cost": "latency"}, {"rank": "drop"}]


def choices(s: Setup, counts: list[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    """What ``remove_blocks`` removes from the base under every ranking (no fine-tuning), and the
    probe's scores with measured latency shares: the rows only run some rankings."""
    from compress.passes.base import get_pass

    p = get_pass("remove_blocks")
    lines, scores = [], {}
    for c in counts:
        got = []
        for r in RANKINGS:
            s.ctx.notes.clear()
            _, rec = p.apply(copy.deepcopy(s.base.module), {**p.defaults, **c, **r}, s.ctx)
            what = ", ".join(f"{k}={v}" for k, v in r.items()) or "default"
            got.append(f"{what}: {', '.join(rec['removed'])}")
            if r.get("cost") == "latency":
                scores = rec["scores"]
        what = ", ".join(f"{k}={v}" for k, v in c.items())
        lines.append(f"- {s.name}, {what}: " + "; ".join(got))
    return lines, scores


def probe_lines(probed: list[tuple[Setup, dict[str, Any]]]) -> list[str]:
    """Per model: the probe's scores for every candidate block, the numbers the rankings order."""
    return [f"- {s.name}: " + "; ".join(
        f"{b} drop {sc['drop']:.1f}, MACs {100 * sc['macs']:.1f}%, params {100 * sc['params']:.1f}%, "
        f"latency {100 * sc['latency']:.1f}%" for b, sc in scores.items()) for s, scores in probed]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/depth_bench"))
    ap.add_argument("--lk-epochs", type=int, default=8)
    ap.add_argument("--cnn-epochs", type=int, default=4)
    ap.add_argument("--ft-epochs", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "depth.md")
    args = ap.parse_args()
    import torch

    from bench.compress import machine

    torch.set_num_threads(1)
    start = time.perf_counter()
    stages: dict[str, float] = {}
    t = time.perf_counter()
    reused: list[str] = []
    cnn, lk = setups(args.work, args.lk_epochs, args.cnn_epochs, reused)
    for s in (cnn, lk):
        s.load()
    stages["train bases"] = time.perf_counter() - t
    t = time.perf_counter()
    # the CNN has one block per stage (3 in all): keep_per_stage=0 lets the probe pick any. The
    # default ranking against accuracy alone (rank="drop", the pass's order before it had `rank`)
    cnn_counts = [{"count": 1, "keep_per_stage": 0}]
    compare(cnn, RATIOS, [*cnn_counts, {**cnn_counts[0], "rank": "drop"}], args.ft_epochs)
    stages["compress CNN"] = time.perf_counter() - t
    t = time.perf_counter()
    # stages of 1, 3, 3, 1 blocks: with one kept per stage 4 may go (both rankings pick the same 4)
    # the default ranking by MACs, and by measured latency (which here picks what rank=drop picks)
    lk_counts = [{"count": 2}, {"count": 4}]
    compare(lk, RATIOS, [*lk_counts, {"count": 2, "cost": "latency_beyond_params"}], args.ft_epochs)
    stages["compress large-kernel"] = time.perf_counter() - t
    t = time.perf_counter()
    cnn_choice, cnn_scores = choices(cnn, cnn_counts)
    lk_choice, lk_scores = choices(lk, lk_counts)
    stages["rankings"] = time.perf_counter() - t
    t = time.perf_counter()
    load_before = os.getloadavg()[0]
    for s in (cnn, lk):
        time_all(s, args.rounds)
    stages["timing"] = time.perf_counter() - t
    total = time.perf_counter() - start
    cmd = "nice -n 10 python bench/depth.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k not in ("out",) and v != ap.get_default(k))
    lines = [
        "# Depth + width (remove_blocks then structured) against width alone, at equal parameters",
        "",
        f"Command: `{cmd}`",
        "",
        f"Date: {datetime.datetime.now():%Y-%m-%d %H:%M}. Machine: {machine()}. Load average (1 min) before the "
        f"timing pass: {load_before:.2f} (2 shared cores; other engineers were running tests). Runtime "
        f"{total / 60:.1f} min ({', '.join(f'{k} {v:.0f}s' for k, v in stages.items())})"
        + (f"; base weights reused from an earlier invocation of the same command: {', '.join(reused)} "
           "(training both took about 2 min)." if reused else "."),
        "",
        "What ran:",
        f"- ResNet CNN (`bench/resnet_cnn.py`, {cnn.base_params / 1e3:.1f}k params), trained {args.cnn_epochs} epochs on "
        "mnist5k as stored; base val acc "
        f"{cnn.rows[0]['val_acc'] + cnn.rows[0]['acc_drop'] / 100:.4f}.",
        f"- searched #1 of results/compress.md (`{LK_GENOTYPE}`, {lk.base_params / 1e3:.1f}k params merged), trained "
        f"{args.lk_epochs} epochs on standardised MNIST-1D (AdamW one-cycle, peak 3e-3); base val acc "
        f"{lk.rows[0]['val_acc'] + lk.rows[0]['acc_drop'] / 100:.4f}; its policies end with merge.",
        f"- Every policy: then `finetune` {args.ft_epochs} epochs, lr {FT_LR:g} one-cycle, KD (T=4, alpha=0.5) from the "
        "uncompressed model; BN re-estimated; structured l1 with round_to 8 (the default). The depth rows' "
        "structured ratio is the one whose merged parameter count comes closest to the width-only row's "
        "(bisection before fine-tuning; 'params' column: as measured after).",
        "- `remove_blocks` chose its blocks with its own probe (metric lost on the 256 held-out calibration rows when "
        "each block alone goes, and the shares of MACs, parameters and -- with a latency cost -- measured ORT "
        "latency it saves); no block is named by hand. Default (rank=drop_per_cost, cost=macs_beyond_params): the "
        "fewest points lost per share of MACs saved beyond the parameter share. rank=drop: points lost alone, the "
        "order before the ranking existed (CNN rows). cost=latency_beyond_params: the same with measured latency "
        "in place of MACs (large-kernel rows). What every ranking removes is listed below the table. The CNN has "
        "one block per stage, so it ran with keep_per_stage=0.",
        "- Accuracy: validation split in ONNX Runtime, as the trial measured it; drop against the uncompressed model. "
        f"Latency: ORT CPU, 1 thread, medians over {args.rounds} interleaved rounds with the base (batch 1: 30 runs, "
        "batch 32: 8 per measurement); speed-up = median of per-round base/compressed ratios.",
        "",
        *table([cnn, lk]),
        "",
        "Summary (at equal parameters; > 1x: the depth policy is faster; drop difference < 0: it loses less):",
        *summary([cnn, lk]),
        "",
        "What each ranking removes from the base (no fine-tuning; 'default' is rank=drop_per_cost, "
        "cost=macs_beyond_params):",
        *cnn_choice,
        *lk_choice,
        "",
        "The probe's scores (points lost on the calibration rows, before fine-tuning; shares of the model's MACs, "
        "parameters and ORT latency -- 1 thread, batch 1, timed interleaved with the whole model -- the removal saves):",
        *probe_lines([(cnn, cnn_scores), (lk, lk_scores)]),
        "",
        "Accuracy alone picks the blocks the untuned net misses least; at equal parameters what counts is compute "
        "per parameter: a block holding more of the parameters than of the MACs (the CNN's 4x4 block) leaves the "
        "channel ratio that matches the parameter count too mild to thin the expensive layers. MACs stand in for "
        "time only where a block's work is a few large ops: on the large-kernel model a stage-1 block holds 3.6x the "
        "MACs of a stage-2 block, yet removing either saves about the same time (scores above), so by MACs the "
        "depth rows remove stage-1 blocks that cost more parameters for the same time.",
        "",
        "Goals (issue #20): >= 10x fewer parameters at <= 1 point drop, and at equal drop >= 1.3x lower measured "
        "ORT latency (batch 1) than width-only pruning:",
        *goals([cnn, lk]),
        "",
        "Validation sets: " + ", ".join(f"{s.name} {len(s.ev.data().y_val)} samples (one sample = "
                                        f"{100 / len(s.ev.data().y_val):.3f} pts)" for s in (cnn, lk))
        + "; a difference of about a point between two rows is within sampling noise.",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    (args.work / "depth_rows.json").write_text(json.dumps([r for s in (cnn, lk) for r in s.rows], indent=1))
    print("\n".join(lines))
    print(f"wrote {args.out} ({shlex.quote(str(args.out))})")


if __name__ == "__main__":
    main()
