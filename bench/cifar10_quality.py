"""CIFAR-10 quality at equal budget: search on a subset, `nas-run train` the winner, compare with
ResNet-20 (He et al. 2016, 0.27M parameters) trained with the same recipe and epochs, and with the
same architecture trained by the old recipe (``quick``: AdamW one-cycle, no augmentation); then
compress the trained winner (structured pruning + int8) and measure it on the real test set.

Everything but the ResNet-20 baseline goes through the `nas-run` CLI, as a user would run it:

    python bench/cifar10_quality.py --data /path/to/cifar10 --train-subset 10000 --epochs 10

``--data`` is the extracted CIFAR-10 folder (``train/<class>/*.jpg``, ``test/<class>/*.jpg``); the
bench links a class-balanced subset of the training images (``--train-subset``) next to the full
10,000-image test set into ``--work`` and runs there. The data are never committed or downloaded.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def resnet20(num_classes: int = 10):  # noqa: ANN201
    """ResNet-20 for 32x32 inputs (He et al. 2016, Sec. 4.2): 3 stages x 3 basic blocks, 16/32/64
    channels, option-A shortcuts (strided identity, zero-padded channels): 0.27M parameters."""
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
            self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
            self.stride, self.pad = stride, cout - cin

        def forward(self, x):  # noqa: ANN001, ANN202
            out = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
            short = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
            if self.pad:
                short = F.pad(short, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
            return F.relu(out + short)

    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(3):
            layers.append(Block(cin, cout, stride if i == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
    return nn.Sequential(*layers)


def subset_folder(data: Path, work: Path, n_train: int) -> Path:
    """Symlinks: the first n_train/10 training images of each class, and the whole test set."""
    out = work / f"cifar10-{n_train}"
    if out.exists():
        return out
    tmp = work / f".{out.name}.tmp"
    for split, per_class in (("train", n_train // 10), ("test", None)):
        for cls in sorted(p for p in (data / split).iterdir() if p.is_dir()):
            (tmp / split / cls.name).mkdir(parents=True, exist_ok=True)
            for img in sorted(cls.iterdir())[:per_class]:
                (tmp / split / cls.name / img.name).symlink_to(img.resolve())
    tmp.rename(out)
    return out


def cli(*args: str) -> tuple[str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "nas_run", *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"nas-run {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout, time.perf_counter() - t0


def train_records(run: Path) -> list[dict]:
    from nas.search import open_store

    return [r for r in open_store(run, read_only=True).records() if r["stage"] == "train" and r["status"] == "complete"]


def baseline(folder: Path, recipe: str, epochs: int, seed: int, cache: Path, threads: int) -> dict[str, float]:
    import torch

    from nas.cost import profile
    from nas.data import load_dataset
    from nas.recipes import get_recipe
    from nas.trainer import Trainer, accuracy

    torch.set_num_threads(threads)
    data = load_dataset(folder, seed=seed, cache_dir=cache)
    torch.manual_seed(seed)
    model = resnet20(data.num_classes)
    t0 = time.perf_counter()
    trainer = Trainer(model, data, get_recipe(recipe), epochs, seed, torch.device("cpu"))
    val = trainer.run()
    test = accuracy(trainer.eval_model(), data.x_test, data.y_test, 256, torch.device("cpu"))
    return {"val_acc": val, "test_acc": test, "params": float(profile(model.cpu(), data.input_shape).params),
            "seconds": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--work", type=Path, default=ROOT / "results" / "cifar10_runs")
    p.add_argument("--train-subset", type=int, default=10000)
    p.add_argument("--space", default="unireplk")
    p.add_argument("--space-options", default="{}", help='JSON, e.g. \'{"kernel_choices": [3, 5, 7, 9, 11]}\'')
    p.add_argument("--search-trials", type=int, default=10)
    p.add_argument("--search-epochs", type=int, default=2)
    p.add_argument("--max-params", type=float, default=270e3, help="the search's constraint (ResNet-20: 0.27M)")
    p.add_argument("--epochs", type=int, default=10, help="final training epochs (searched model and ResNet-20)")
    p.add_argument("--recipe", default="standard")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "cifar10_quality.md")
    args = p.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    folder = subset_folder(args.data, args.work, args.train_subset)
    cache = args.work / "cache"
    run = args.work / f"search-{args.space}-{args.train_subset}-s{args.seed}"
    common = ["--cache-dir", str(cache)]
    rows: list[tuple[str, str]] = []
    options = json.loads(args.space_options)
    if options:  # space options go through a config file, as a user would give them
        import yaml

        (args.work / "space.yaml").write_text(yaml.safe_dump({"space_options": options}))
        common_search = ["--config", str(args.work / "space.yaml")]
    else:
        common_search = []
    if not (run / "config.json").exists():
        _, t = cli("search", *common_search, "--space", args.space, "--full-size", "--dataset", str(folder), "--strategy", "surrogate",
                   "--trials", str(args.search_trials), "--epochs", str(args.search_epochs), "--constraint",
                   f"params<={args.max_params:g}", "--cpus-per-trial", str(args.threads), "--seed", str(args.seed),
                   "--out", str(run), "--quiet", *common)
        rows.append(("search", f"{args.search_trials} candidates x {args.search_epochs} epochs, recipe quick: {t / 60:.1f} min"))
    results: dict[str, dict] = {}
    for recipe in (args.recipe, "quick"):
        done = [r for r in train_records(run) if r["strategy"] == f"train:{recipe}" and r["budget"] == args.epochs]
        if not done:
            _, t = cli("train", "--run", str(run), "--epochs", str(args.epochs), "--recipe", recipe, "--threads",
                       str(args.threads), *common)
            done = [r for r in train_records(run) if r["strategy"] == f"train:{recipe}" and r["budget"] == args.epochs]
        results[recipe] = done[-1]
    kept = args.work / f"resnet20-{args.train_subset}-{args.recipe}-e{args.epochs}-s{args.seed}.json"
    if kept.is_file():  # a re-run (say, to re-write the table) reuses the baseline it trained
        resnet = json.loads(kept.read_text())
    else:
        resnet = baseline(folder, args.recipe, args.epochs, args.seed, cache, args.threads)
        kept.write_text(json.dumps(resnet))

    from compress.policy import Policy
    from nas.search import open_store

    def compressed() -> list[dict]:
        return [r for r in open_store(run, read_only=True).records() if r["stage"] == "compress" and r["status"] == "complete"]

    t = 0.0
    if not compressed():
        _, t = cli("compress", "--run", str(run), "--top-k", "1", "--prune", "0.5", "--int8", "--quiet")
        rows.append(("compress", f"{t / 60:.1f} min"))
    comp = compressed()
    best = results[args.recipe]
    lines = [
        f"# CIFAR-10 at equal budget ({args.train_subset} training images, real 10,000-image test set)",
        "",
        "| model | recipe | epochs | params | val acc | test acc | time |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for recipe, r in results.items():
        m = r["metrics"]
        lines.append(f"| searched {args.space} (trial {r['number']}) | {recipe} | {args.epochs} | {m['params']:.0f} | "
                     f"{m['val_acc']:.4f} | {m['test_acc']:.4f} | {r['duration_s'] / 60:.1f} min |")
    lines.append(f"| ResNet-20 | {args.recipe} | {args.epochs} | {resnet['params']:.0f} | {resnet['val_acc']:.4f} | "
                 f"{resnet['test_acc']:.4f} | {resnet['seconds'] / 60:.1f} min |")
    lines += ["", "Compression of the trained winner (`nas-run compress --run ... --prune 0.5 --int8`):", "",
              "| policy | test acc | drop vs float (test) | ORT speed-up | size ratio |", "|---|---|---:|---:|---:|"]
    base_test = best["metrics"]["test_acc"]
    for r in comp:
        m = r["metrics"]
        lines.append(f"| {Policy.from_json(r['policy']).label()} | {m.get('test_acc', float('nan')):.4f} | "
                     f"{100 * (base_test - m.get('test_acc', float('nan'))):+.2f} pts | {m.get('speedup', float('nan')):.2f}x | "
                     f"{m.get('size_ratio', float('nan')):.2f} |")
    gain = 100 * (best["metrics"]["test_acc"] - results["quick"]["metrics"]["test_acc"])
    beat = best["metrics"]["test_acc"] >= resnet["test_acc"] and best["metrics"]["params"] <= resnet["params"]
    lines += ["", f"- searched >= ResNet-20 at <= its parameters: **{'yes' if beat else 'no'}**",
              f"- recipe {args.recipe} over quick: **{gain:+.2f} points** (goal >= +3)", *[f"- {a}: {b}" for a, b in rows],
              "", "Command:", "", "```", "python " + " ".join(sys.argv), "```", "",
              f"Written {date.today()} on {args.threads} CPU threads (a re-run reuses the run folder's search, trains, "
              f"compression and the ResNet-20 result under --work, and only re-writes this table)."]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
