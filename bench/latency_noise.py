"""How stable is a trial's ONNX Runtime latency, and does timing a reference model beside it help?

A search times each candidate once, at one moment, between trainings. This bench times every
model the same way (``onnx_latency_ms``'s protocol: batch 1, one thread, 5 warm-up runs, median
of 30) in several rounds, each after a burst of torch work (what a trial does before it times),
and reports how far one model's timings spread across rounds. Beside each timing it times a fixed
reference model, run for run interleaved, and reports the spread of the ratio model / reference:
load on the host slows both alike, so the ratio keeps what the model costs.

    python bench/latency_noise.py                      # unireplk full + tiny on digits
    python bench/latency_noise.py --rounds 20 --burst-s 1
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sampled_models(space_name: str, full: bool, dataset: str, n: int, seed: int) -> list[tuple[str, bytes]]:
    """(genotype text, deploy-form ONNX bytes) of ``n`` sampled, untrained architectures."""
    from compress.passes.int8 import export_float_onnx
    from export.formats import copy_module, deploy_form
    from nas.data import load_dataset
    from search_spaces import get_space

    data = load_dataset(dataset, seed=0)
    shape = tuple(data.input_shape)
    space = get_space(space_name)
    space = space if full else space.tiny()
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        g = space.sample(rng)
        model = space.build(g, shape, data.num_classes).eval()
        out.append((space.to_str(g), export_float_onnx(deploy_form(copy_module(model)).eval(), shape)))
    return out


def torch_burst(seconds: float) -> None:
    """Torch work on every thread, as a trial's training is just before it times its model."""
    import torch

    x = torch.randn(256, 256)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        x = (x @ x).tanh()


def order_agreement(values: np.ndarray) -> float:
    """Share of model pairs whose order in one round matches their order by median over rounds,
    averaged over rounds (``values``: rounds x models): how often a search that timed each model
    once would rank two of them as they really rank."""
    med = np.median(values, axis=0)
    pairs = [(i, j) for i, j in itertools.combinations(range(values.shape[1]), 2) if med[i] != med[j]]
    if not pairs:
        return float("nan")
    return float(np.mean([np.mean([(r[i] < r[j]) == (med[i] < med[j]) for i, j in pairs]) for r in values]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--space", default="unireplk")
    ap.add_argument("--sizes", nargs="+", default=["full", "tiny"], choices=["full", "tiny"])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--models", type=int, default=6, help="sampled architectures per size")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--burst-s", type=float, default=0.5, help="torch work before each timing (s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "latency_noise.md")
    args = ap.parse_args()

    from compress.latency_reference import paired_latency_ms
    from nas.data import load_dataset

    shape = tuple(load_dataset(args.dataset, seed=0).input_shape)
    header = ("| size | architecture | median ms | CV, ms | max/min, ms | CV, ratio to reference "
              "| max/min, ratio |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    summary = ["", "| size | models | mean CV, ms | mean CV, ratio | pairs ordered right by one timing, ms "
               "| same, ratio |", "|---|---|---|---|---|---|"]
    for size in args.sizes:
        models = sampled_models(args.space, size == "full", args.dataset, args.models + 1, args.seed)
        (_, reference), models = models[0], models[1:]  # the first sampled model is the reference
        ms = np.zeros((args.rounds, len(models)))
        ratio = np.zeros_like(ms)
        for r in range(args.rounds):
            for i, (_, blob) in enumerate(models):
                torch_burst(args.burst_s)
                ms[r, i], ref_ms = paired_latency_ms(blob, reference, shape)
                ratio[r, i] = ms[r, i] / ref_ms
        cv_ms, cv_ratio = ms.std(0) / ms.mean(0), ratio.std(0) / ratio.mean(0)
        for i, (text, _) in enumerate(models):
            lines.append(f"| {size} | `{text.split('|', 1)[1][:60]}` | {np.median(ms[:, i]):.3f} | {cv_ms[i]:.3f} "
                         f"| {ms[:, i].max() / ms[:, i].min():.2f} | {cv_ratio[i]:.3f} "
                         f"| {ratio[:, i].max() / ratio[:, i].min():.2f} |")
            print(lines[-1], flush=True)
        summary.append(f"| {size} | {len(models)} | {cv_ms.mean():.3f} | {cv_ratio.mean():.3f} "
                       f"| {order_agreement(ms):.2f} | {order_agreement(ratio):.2f} |")
    cmd = "python bench/latency_noise.py " + " ".join(sys.argv[1:])
    text = "\n".join([
        "# Trial latency noise: one timing vs the ratio to an interleaved reference model", "",
        f"Command: `{cmd.strip()}`; space {args.space}, data set {args.dataset} (input {shape}), "
        f"{args.models} sampled untrained architectures per size plus one more as the reference; deploy "
        f"form; ORT batch 1, one thread, 5 warm-up runs, median of 30, model and reference run for run "
        f"interleaved; {args.rounds} rounds, each timing after {args.burst_s} s of torch work. CV = std / "
        f"mean over rounds. Machine: 2 CPU cores. Written {time.strftime('%Y-%m-%d')}.", "",
        *lines, *summary, "",
    ])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print("\n".join(summary) + f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
