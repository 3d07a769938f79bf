"""Search on small data: does the default search beat 1-nearest-neighbour, and today's defaults?

Four public time-series classification sets from the UCR/UEA archive, as shipped inside the
`sktime` wheel (``pip install --no-deps sktime``: the .ts files are read here, sktime itself is
never imported): ArrowHead (36 training series, 3 classes, length 251), BasicMotions (40, 4
classes, 6 channels x 100 steps), GunPoint (50, 2 classes, length 150), ItalyPowerDemand (67,
2 classes, length 24). The official TRAIN file is the search's train+validation pool; the
official TEST file is held out and only read for the table.

For each set and seed, one search (``nas-run search --dataset SET.npz`` with the README's
defaults: the 1-D `unireplk` space, tiny setting, random strategy, ``--trials`` candidates x
``--epochs`` epochs) runs under

- **now**: this checkout (batch size capped by the training split, cross-validation below
  1,000 samples, ties broken by validation loss), and
- **before**: the code at ``--before`` (a git commit; checked out into a temporary worktree),
  i.e. what a user got before small-data support,

and the test accuracy of the model each version's own ranking picks (``RunStore.ranked``, the
pick of ``compress --run``/``train``/``export``) is reported beside a 1-NN (Euclidean, z-normalised
series) baseline computed here. Run from the repository root::

    python bench/small_data.py                       # writes results/small_data.md
    python bench/small_data.py --sets GunPoint --seeds 1 --trials 4 --epochs 5   # a quick look
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SETS = ("ArrowHead", "BasicMotions", "GunPoint", "ItalyPowerDemand")

# run inside a code tree: prints the picked trial's record as JSON (that tree's own ranking)
PICK = """
import json, sys
from nas.final_training import best_architecture
from nas.search import open_store
store = open_store(sys.argv[1], read_only=True)
best = best_architecture(store)
done = [r for r in store.records() if r["status"] == "complete" and r.get("stage") in ("search", None)]
m = best["metrics"]
print(json.dumps({k: m.get(k) for k in ("val_acc", "test_acc", "val_loss", "folds")}
                 | {"n_done": len(done), "ties": sum(1 for r in done if r["metrics"].get("val_acc") == m.get("val_acc"))}))
"""

# the test accuracy of the run's final-trained model (stage "train")
FINAL = """
import json, sys
from nas.search import open_store
recs = [r for r in open_store(sys.argv[1], read_only=True).records()
        if r.get("stage") == "train" and r["status"] == "complete"]
print(json.dumps({"test_acc": recs[-1]["metrics"]["test_acc"]}))
"""


def read_ts(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A UCR/UEA .ts file: header lines start with '@'; after '@data' one case per line,
    dimensions separated by ':' (values by ','), the class label last."""
    xs, ys, in_data = [], [], False
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.lower().startswith("@data"):
            in_data = True
            continue
        if not in_data or line.startswith("@"):
            continue
        *dims, label = line.split(":")
        xs.append([[float(v) for v in d.split(",")] for d in dims])
        ys.append(label.strip())
    return np.asarray(xs, dtype=np.float32), np.asarray(ys)


def sktime_data_root() -> Path:
    spec = importlib.util.find_spec("sktime")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("needs the sktime wheel's data files: pip install --no-deps sktime")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def write_npz(name: str, folder: Path) -> tuple[Path, dict]:
    root = sktime_data_root() / name
    x, y = read_ts(root / f"{name}_TRAIN.ts")
    x_test, y_test = read_ts(root / f"{name}_TEST.ts")
    classes = sorted(set(y) | set(y_test))
    to_int = {c: i for i, c in enumerate(classes)}
    y_i = np.array([to_int[c] for c in y], dtype=np.int64)
    yt_i = np.array([to_int[c] for c in y_test], dtype=np.int64)
    univariate = x.shape[1] == 1
    arrays = {
        "x": x[:, 0] if univariate else x,  # (N, L) or (N, C, L)
        "y": y_i,
        "x_test": x_test[:, 0] if univariate else x_test,
        "y_test": yt_i,
        "class_names": np.array(classes),
    }
    if not univariate:
        arrays["layout"] = np.array("NCL")  # said, not guessed: 6 channels x 100 steps
    path = folder / f"{name}.npz"
    np.savez(path, **arrays)
    info = {"train": len(y_i), "test": len(yt_i), "classes": len(classes), "shape": tuple(x.shape[1:])}
    return path, info


def one_nn(name: str) -> float:
    """1-NN with Euclidean distance on z-normalised series (the UCR archive's baseline)."""
    root = sktime_data_root() / name
    x, y = read_ts(root / f"{name}_TRAIN.ts")
    xt, yt = read_ts(root / f"{name}_TEST.ts")

    def z(a: np.ndarray) -> np.ndarray:
        mu, sd = a.mean(axis=-1, keepdims=True), a.std(axis=-1, keepdims=True)
        return ((a - mu) / np.where(sd > 0, sd, 1)).reshape(len(a), -1)

    a, b = z(x), z(xt)
    d = (b**2).sum(1)[:, None] - 2 * b @ a.T + (a**2).sum(1)[None, :]
    return float((y[d.argmin(1)] == yt).mean())


def search(tree: Path, npz: Path, seed: int, trials: int, epochs: int, out: Path, final_epochs: int = 0,
           final_recipe: str = "standard") -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-m", "nas_run", "search", "--dataset", str(npz), "--seed", str(seed),
           "--trials", str(trials), "--epochs", str(epochs), "--out", str(out), "--quiet"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    minutes = (time.perf_counter() - start) / 60
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1], "minutes": minutes}
    pick = subprocess.run([sys.executable, "-c", PICK, str(out)], cwd=tree, env=env, capture_output=True, text=True)
    if pick.returncode != 0:
        return {"error": (pick.stderr.strip().splitlines() or ["?"])[-1], "minutes": minutes}
    notes = [ln for ln in proc.stdout.splitlines() + proc.stderr.splitlines()
             if "batch size" in ln or "cross-validation" in ln or "chance" in ln]
    out_row = json.loads(pick.stdout) | {"minutes": minutes, "notes": notes[:3]}
    if final_epochs:
        # the documented next step: train the pick again on train+val (the rows 1-NN sees)
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "nas_run", "train", "--run", str(out), "--epochs", str(final_epochs),
               "--train-on", "trainval", "--recipe", final_recipe]
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
        got = subprocess.run([sys.executable, "-c", FINAL, str(out)], cwd=tree, env=env, capture_output=True,
                             text=True)
        ok = proc.returncode == 0 and got.returncode == 0
        out_row["final_test_acc"] = json.loads(got.stdout)["test_acc"] if ok else None
        out_row["final_minutes"] = (time.perf_counter() - start) / 60
        if not ok:
            out_row["final_error"] = ((proc.stderr or got.stderr).strip().splitlines() or ["?"])[-1]
    return out_row


def worktree(commit: str, where: Path) -> Path:
    subprocess.run(["git", "worktree", "add", "--detach", str(where), commit], cwd=ROOT, check=True,
                   capture_output=True)
    return where


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--before", default="e85c3f6", help="commit of 'today's defaults' (before small-data support)")
    ap.add_argument("--versions", default="now,before", help="which code versions to run")
    ap.add_argument("--final-epochs", type=int, default=0,
                    help="also `nas-run train --train-on trainval` the 'now' pick for this many epochs")
    ap.add_argument("--final-recipe", default="standard")
    ap.add_argument("--out", default=str(ROOT / "results" / "small_data.md"))
    ap.add_argument("--from-log", help="rebuild the table from the JSON lines a run printed")
    args = ap.parse_args()
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    if args.from_log:
        rows = [json.loads(ln) for ln in Path(args.from_log).read_text().splitlines() if ln.startswith('{"set"')]
        write_table(rows, args, Path(args.out))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        versions = [v.strip() for v in args.versions.split(",")]
        before = worktree(args.before, tmp / "before") if "before" in versions else None
        try:
            for name in sets:
                npz, info = write_npz(name, tmp)
                base = one_nn(name)
                for seed in range(args.seeds):
                    for label, tree in (("now", ROOT), ("before", before)):
                        if label not in versions:
                            continue
                        final = args.final_epochs if label == "now" else 0
                        r = search(tree, npz, seed, args.trials, args.epochs, tmp / f"{name}-{label}-{seed}",
                                   final, args.final_recipe)
                        rows.append({"set": name, **info, "seed": seed, "version": label, "one_nn": base, **r})
                        print(json.dumps(rows[-1]), flush=True)
        finally:
            if before is not None:
                subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, capture_output=True)
    write_table(rows, args, Path(args.out))


def write_table(rows: list[dict], args: argparse.Namespace, out: Path) -> None:
    lines = [
        "# Search on small data (UCR/UEA sets from the sktime wheel)",
        "",
        f"Command: `python bench/small_data.py --sets {args.sets} --seeds {args.seeds} --trials {args.trials} "
        f"--epochs {args.epochs} --before {args.before} --versions {args.versions} --final-epochs {args.final_epochs}`",
        "",
        f"Each search: `nas-run search --dataset SET.npz --trials {args.trials} --epochs {args.epochs} --seed S` "
        "(defaults otherwise: unireplk 1-D tiny space, random strategy). Test accuracy (official TEST split) of "
        "the model each version's own ranking picks; 1-NN = Euclidean on z-normalised series. "
        f"'before' = commit {args.before} (batch 64 uncapped, one 20% hold-out, ties to the lowest trial number).",
        "",
        "| set | train | classes | 1-NN | before: mean ± sd | now: mean ± sd | now − before (pts) | now − 1-NN (pts) "
        "| now + train on train+val | ties at top before / now | minutes before / now |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["set"] for r in rows):
        sel = [r for r in rows if r["set"] == name]
        acc = {v: np.array([r["test_acc"] for r in sel if r["version"] == v and r.get("test_acc") is not None])
               for v in ("before", "now")}
        ties = {v: np.mean([r.get("ties", 0) for r in sel if r["version"] == v and "ties" in r] or [np.nan])
                for v in ("before", "now")}
        mins = {v: sum(r["minutes"] + r.get("final_minutes", 0) for r in sel if r["version"] == v)
                for v in ("before", "now")}
        final = np.array([r["final_test_acc"] for r in sel if r.get("final_test_acc") is not None])
        errors = [r["error"] for r in sel if "error" in r]
        first = sel[0]

        def ms(a: np.ndarray) -> str:
            return f"{a.mean():.3f} ± {a.std():.3f} (n={len(a)})" if len(a) else "—"

        diff = 100 * (acc["now"].mean() - acc["before"].mean()) if len(acc["now"]) and len(acc["before"]) else float("nan")
        vs_nn = 100 * (acc["now"].mean() - first["one_nn"]) if len(acc["now"]) else float("nan")
        lines.append(
            f"| {name} | {first['train']} | {first['classes']} | {first['one_nn']:.3f} | {ms(acc['before'])} | "
            f"{ms(acc['now'])} | {diff:+.1f} | {vs_nn:+.1f} | {ms(final)} | {ties['before']:.1f} / {ties['now']:.1f} | "
            f"{mins['before']:.1f} / {mins['now']:.1f} |"
        )
        for e in dict.fromkeys(errors):
            lines.append(f"|  | error: {e} ||||||||||")
    notes = sorted({n for r in rows if r["version"] == "now" for n in r.get("notes", [])})
    if notes:
        lines += ["", "Console notes of the 'now' runs (first seen):", ""] + [f"- `{n}`" for n in notes[:8]]
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
