"""Does structured pruning make a model faster in ONNX Runtime, and what channel grid does it need?

For sampled architectures of a space (untrained: latency does not depend on the weights), the
deploy form (re-parameterised, BatchNorms folded) of the model and of its `structured`-pruned
copies at each ratio x ``round_to`` is exported to ONNX and timed (batch 1, one thread), every
model once per round in a new shuffled order, median over rounds. Speed-up = unpruned / pruned.

Why it matters: ONNX Runtime's fast convolution kernels (MLAS NCHWc) block channels by 8 or 16;
a layer whose width is off that grid (odd counts from ``round_to`` 1) takes a generic path.

    python bench/round_to.py                              # unireplk full + tiny on digits
    python bench/round_to.py --space nasnet --models 3    # another space
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GRIDS = (1, 2, 4, 8, 16)
RATIOS = (0.3, 0.5)


def onnx_models(space_name: str, full: bool, dataset: str, n: int, seed: int) -> list[tuple[str, dict[str, bytes]]]:
    """(genotype text, {label: ONNX bytes}) of ``n`` sampled models: "float" and every ratio x grid."""
    from compress.passes.base import PassContext
    from compress.passes.int8 import export_float_onnx
    from compress.policy import Policy
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
        blobs = {"float": export_float_onnx(deploy_form(copy_module(model)).eval(), shape)}
        for ratio in RATIOS:
            for grid in GRIDS:
                step = ("structured", {"ratio": ratio, "importance": "l1", "round_to": grid})
                pruned = Policy.of(step).apply(model, PassContext(data=data, seed=0)).model
                blobs[f"{ratio}/{grid}"] = export_float_onnx(deploy_form(copy_module(pruned)).eval(), shape)
        out.append((space.to_str(g), blobs))
    return out


def timed(models: list[tuple[str, dict[str, bytes]]], shape: tuple[int, ...], rounds: int, seed: int) -> list[dict[str, float]]:
    from compress.passes.int8 import onnx_latency_ms

    keys = [(i, label) for i, (_, blobs) in enumerate(models) for label in blobs]
    times: dict[tuple[int, str], list[float]] = {k: [] for k in keys}
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(keys)
        for i, label in keys:
            times[(i, label)].append(onnx_latency_ms(models[i][1][label], shape, batch_size=1, threads=1,
                                                     warmup=5, repeats=30))
    return [{label: float(np.median(times[(i, label)])) for label in blobs} for i, (_, blobs) in enumerate(models)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--space", default="unireplk")
    ap.add_argument("--sizes", nargs="+", default=["full", "tiny"], choices=["full", "tiny"])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--models", type=int, default=6, help="sampled architectures per size")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "round_to.md")
    args = ap.parse_args()

    from nas.data import load_dataset

    shape = tuple(load_dataset(args.dataset, seed=0).input_shape)
    cols = [f"{r}/{g}" for r in RATIOS for g in GRIDS]
    header = "| size | architecture | float ms | " + " | ".join(f"ratio {c.replace('/', ', grid ')}" for c in cols) + " |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    speedups: dict[tuple[str, str], list[float]] = {}
    for size in args.sizes:
        models = onnx_models(args.space, size == "full", args.dataset, args.models, args.seed)
        for (text, _), lat in zip(models, timed(models, shape, args.rounds, args.seed), strict=True):
            cells = []
            for c in cols:
                s = lat["float"] / lat[c]
                speedups.setdefault((size, c), []).append(s)
                cells.append(f"{s:.2f}x")
            lines.append(f"| {size} | `{text.split('|', 1)[1]}` | {lat['float']:.3f} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    summary = ["", "Median speed-up over the architectures (slower than unpruned: < 1):", "",
               "| size | " + " | ".join(f"ratio {c.replace('/', ', grid ')}" for c in cols) + " |",
               "|---|" + "---|" * len(cols)]
    for size in args.sizes:
        summary.append(f"| {size} | " + " | ".join(f"{np.median(speedups[(size, c)]):.2f}x" for c in cols) + " |")
    cmd = "python bench/round_to.py " + " ".join(sys.argv[1:])
    text = "\n".join([
        "# Structured pruning in ONNX Runtime: speed-up by channel grid (`round_to`)", "",
        f"Command: `{cmd.strip()}`; space {args.space}, data set {args.dataset} (input {shape}), "
        f"{args.models} sampled architectures per size, untrained; deploy form; ORT batch 1, one thread, "
        f"{args.rounds} shuffled rounds, median. Speed-up = unpruned / pruned latency (cells: pruning ratio, "
        f"channel grid). Machine: 2 CPU cores (AVX-512). Written {time.strftime('%Y-%m-%d')}.", "",
        *lines, *summary, "",
    ])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print("\n".join(summary) + f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
