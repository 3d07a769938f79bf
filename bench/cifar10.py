"""CIFAR-10 as a JPEG folder: what the data cache costs and saves, and what the Trainer costs per batch.

data: the first decode of the folder into an empty cache, a later load in a fresh process, and the
old loader (the commit before nas/datasource.py: the whole folder decoded to float32 in every
process); peak RSS of one trial (load + tiny DARTS, recipe standard, --train-batches batches) and of
two at once, with their summed PSS (shared pages split among users) and the system's "used" rise.
Every measurement runs in a fresh process, so ru_maxrss is its own. throughput: images/s of
`Trainer` (recipe quick) vs a plain PyTorch loop (AdamW, pre-built float batches, the same model and
rows), one torch thread each, interleaved over --rounds rounds.

    python bench/cifar10.py --data /tmp/cifar/cifar10 --out results/cifar10.md
    python bench/cifar10.py --sections throughput --batches 20
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MiB = 1024  # ru_maxrss is in KiB on Linux


def peak_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / MiB  # the process's own peak (or its largest waited child's)


def proc_mb(path: str, field: str) -> float:
    """``field`` of a /proc file in kB (status: RssAnon, RssFile; smaps_rollup: Pss; meminfo), in MiB;
    0 once the process is gone."""
    try:
        return int(Path(path).read_text().split(f"\n{field}:")[1].split()[0]) / MiB
    except (OSError, IndexError):
        return 0.0


def cache_rss_mb(cache_dir: str) -> float:
    """Resident pages of this process's memory maps of files under ``cache_dir`` (the data), in MiB."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if not line[:1].isupper():  # a mapping's header line: address range, perms, ..., path
            inside = line.split()[-1].startswith(str(Path(cache_dir).resolve()))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total / MiB


def ok(value: float, goal: float) -> str:
    return "yes" if value <= goal else "**no**"


def evaluator(a: argparse.Namespace, space: str, recipe: str, batches: int) -> tuple[Any, Any]:
    """A TrainingEvaluator on the space's tiny preset (as `nas-run search --tiny` builds it) and the
    genotype it samples with seed 0."""
    import numpy as np

    from nas.training import TrainingEvaluator
    from search_spaces import get_space

    ev = TrainingEvaluator(space=space, space_options=dict(get_space(space).tiny().options), dataset=a.data,
                           recipe=recipe, cache_dir=a.cache_dir, measure_latency=False,
                           max_train_batches=batches, threads=1)
    return ev, ev.search_space().sample(np.random.default_rng(0))


def child(a: argparse.Namespace) -> dict[str, Any]:
    """One measurement in this fresh process (the parent prints its JSON line)."""
    t0 = time.perf_counter()
    if a.child in ("decode", "load", "old"):
        if a.child == "old":
            import importlib.util

            spec = importlib.util.spec_from_file_location("old_data", a.old_module)
            mod = sys.modules["old_data"] = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            spec.loader.exec_module(mod)  # type: ignore[union-attr]
            load_dataset = mod.load_dataset
        else:
            from nas.data import load_dataset
        import sklearn.model_selection  # noqa: F401  (imported by both loaders: kept out of the timing)

        t1 = time.perf_counter()
        data = load_dataset(a.data, seed=0, **({} if a.child == "old" else {"cache_dir": a.cache_dir}))
        out = {"s": time.perf_counter() - t1, "import_s": t1 - t0, "workers_peak_mb": peak_mb(resource.RUSAGE_CHILDREN),
               "n": len(data.y_train) + len(data.y_val) + len(data.y_test)}
    elif a.child == "train":
        ev, g = evaluator(a, "darts", "standard", a.train_batches)
        trainer = ev.trainer(g, 1)
        trainer.run()
        h = trainer.history[-1]
        out = {"s": time.perf_counter() - t0, "images_per_s": h["images_per_s"], "val_acc": h["val_acc"],
               "batch_size": trainer.recipe.batch_size}
    else:  # throughput of one space
        out = throughput(a, a.child.split(":")[1])
    status = "/proc/self/status"
    return {**out, "peak_mb": peak_mb(), "anon_mb": proc_mb(status, "RssAnon"), "file_mb": proc_mb(status, "RssFile"),
            "data_mb": cache_rss_mb(a.cache_dir)}


def throughput(a: argparse.Namespace, space: str) -> dict[str, Any]:
    import numpy as np
    import torch

    from nas.trainer import batches

    ev, g = evaluator(a, space, "quick", a.batches)
    data, recipe = ev.data(), ev.training_recipe()
    torch.set_num_threads(1)
    # the rows Trainer's first epoch takes (its shuffling generator is seeded with ev.seed)
    order = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(ev.seed)).numpy()
    order = order[: a.batches * recipe.batch_size]
    pre = list(batches(data.x_train, data.y_train, order, recipe.batch_size, torch.device("cpu")))

    def plain() -> float:
        torch.manual_seed(ev.seed)
        model = ev.build(g).train()
        opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        loss_fn = torch.nn.CrossEntropyLoss()
        t0 = time.perf_counter()
        for xb, yb in pre:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xb), yb).backward()
            opt.step()
        return len(order) / (time.perf_counter() - t0)

    def trainer() -> float:
        tr = ev.trainer(g, 1)
        assert tr.steps_per_epoch == a.batches and not recipe.augments
        tr.run()
        return float(tr.history[-1]["images_per_s"])

    plain()  # warm-up: first-use costs of kernels and the allocator, outside both timings
    runs: dict[str, list[float]] = {"trainer": [], "plain": []}
    for _ in range(a.rounds):
        runs["plain"].append(plain())
        runs["trainer"].append(trainer())
    params = sum(p.numel() for p in ev.build(g).parameters())
    return {"space": space, "genotype": ev.search_space().to_str(g), "params": params, "threads": torch.get_num_threads(),
            "batch_size": recipe.batch_size, **{k: float(np.median(v)) for k, v in runs.items()}, "runs": runs}


def spawn(a: argparse.Namespace, what: str, copies: int = 1, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run ``copies`` children at once; their JSON results and the rise of system "used" memory."""
    cmd = [sys.executable, __file__, "--child", what, "--data", a.data, "--cache-dir", a.cache_dir,
           "--batches", str(a.batches), "--train-batches", str(a.train_batches), "--rounds", str(a.rounds), *extra]
    time.sleep(1.0)
    before = proc_mb("/proc/meminfo", "MemAvailable")
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(copies)]
    low, pss = before, 0.0
    while any(p.poll() is None for p in procs):
        low = min(low, proc_mb("/proc/meminfo", "MemAvailable"))
        pss = max(pss, sum(proc_mb(f"/proc/{p.pid}/smaps_rollup", "Pss") for p in procs))
        time.sleep(0.05)
    results = []
    for p in procs:
        out = p.stdout.read() if p.stdout else ""
        if p.returncode:
            raise SystemExit(f"child {what} failed (exit {p.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    print(f"  {what} x{copies}: {results}", file=sys.stderr, flush=True)
    return {"runs": results, "used_rise_mb": before - low, "pss_mb": pss}


def old_rev() -> str:
    added = subprocess.run(["git", "log", "--diff-filter=A", "--format=%h", "--", "nas/datasource.py"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return f"{added[-1]}~1"


def data_section(a: argparse.Namespace) -> list[str]:
    gib = 1024.0
    decode, load = spawn(a, "decode")["runs"][0], spawn(a, "load")["runs"][0]
    rev = old_rev()
    old_py = Path(tempfile.mkdtemp(prefix="nas-run-old-")) / "old_data.py"
    old_py.write_text(subprocess.run(["git", "show", f"{rev}:nas/data.py"], cwd=ROOT, capture_output=True,
                                     text=True, check=True).stdout)
    old = spawn(a, "old", extra=("--old-module", str(old_py)))["runs"][0]
    shutil.rmtree(old_py.parent)
    load_avg = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    one, two = spawn(a, "train"), spawn(a, "train", copies=2)
    t1, (w1, w2) = one["runs"][0], two["runs"]
    added = two["pss_mb"] - one["pss_mb"]

    return [
        f"Data: `{a.data}`, {decode['n']} images. Before = the old loader (`{rev}:nas/data.py`: the whole "
        f"folder decoded to float32 in every process, no cache; the issue measured 51 s and "
        f"3.7 GB); now = `nas.data.load_dataset` with the cache. "
        f"Trial = load + tiny DARTS cell network (seeded sample), recipe standard, {a.train_batches} batches of "
        f"{t1['batch_size']}, 1 epoch (then precise-BN and validation), 1 torch thread. RSS = the process's own peak "
        f"(ru_maxrss); at-end RSS split into anonymous + file-backed (the shared memory map); \"used\" rise = "
        f"MemAvailable before minus its lowest value while the process(es) ran (whole system).", "",
        "| measurement | before | now | goal | met |", "|---|---|---|---|---|",
        f"| first load of the folder, s | {old['s']:.1f} | {decode['s']:.1f} (decode into the empty cache) | | |",
        f"| later load in a fresh process, s | {old['s']:.1f} (decodes again) | {load['s']:.2f} (imports before "
        f"it: {load['import_s']:.1f}) | <= 2 s | {ok(load['s'], 2.0)} |",
        f"| peak RSS of a process that loads the data, MiB | {old['peak_mb']:.0f} | {load['peak_mb']:.0f} (at end: "
        f"{load['anon_mb']:.0f} anon + {load['file_mb']:.0f} file, of it {load['data_mb']:.0f} the data map); decoding: {decode['peak_mb']:.0f}, its "
        f"workers <= {decode['workers_peak_mb']:.0f} | | |",
        f"| one trial: peak RSS, MiB | | {t1['peak_mb']:.0f} (at end: {t1['anon_mb']:.0f} anon + "
        f"{t1['file_mb']:.0f} file, of it {t1['data_mb']:.0f} the data map); {t1['s']:.1f} s, {t1['images_per_s']:.0f} img/s | <= 1.5 GiB "
        f"| {ok(t1['peak_mb'], 1.5 * gib)} |",
        f"| two trials at once: peak RSS each, MiB | | {w1['peak_mb']:.0f} / {w2['peak_mb']:.0f} "
        f"({w1['s']:.1f} / {w2['s']:.1f} s) | | |",
        f"| summed PSS, peak: one trial / two at once, MiB | | {one['pss_mb']:.0f} / {two['pss_mb']:.0f} | | |",
        f"| system \"used\" rise: one trial / two at once, MiB | | {one['used_rise_mb']:.0f} / "
        f"{two['used_rise_mb']:.0f} (load average at start: {load_avg}) | | |",
        f"| memory the second worker adds (PSS), MiB | | {added:.0f} (\"used\": "
        f"{two['used_rise_mb'] - one['used_rise_mb']:.0f}) | <= 0.5 GiB | {ok(added, 0.5 * gib)} |",
    ]


def throughput_section(a: argparse.Namespace) -> list[str]:
    rows = [spawn(a, f"throughput:{s}")["runs"][0] for s in ("darts", "unireplk")]
    lines = [
        f"Throughput: recipe quick (AdamW, batch {rows[0]['batch_size']}, no augmentation), {a.batches} batches, "
        f"{rows[0]['threads']} torch thread, CPU. Trainer = `Trainer.run()`'s images/s (batches read from the "
        f"uint8 memory map and standardised per batch; its loop only, not the evaluation after it); plain = "
        f"the same model (same seed) and rows as pre-built float tensors, zero_grad/forward/backward/step. "
        f"Median of {a.rounds} interleaved rounds, after one untimed plain warm-up run; "
        f"overhead = plain img/s / Trainer img/s - 1.", "",
        "| tiny model (seeded sample) | params | Trainer img/s | plain img/s | overhead | goal | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        over = 100 * (r["plain"] / r["trainer"] - 1)
        name = r["genotype"][:70].replace("|", "\\|")  # a pipe splits a table cell even inside backticks
        lines.append(f"| {r['space']} `{name}` | {r['params']} | {r['trainer']:.0f} | {r['plain']:.0f} "
                     f"| {over:+.1f}% | <= 10% | {ok(over, 10)} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="/tmp/cifar/cifar10", help="image folder: train/<class>/, test/<class>/")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "cifar10.md")
    ap.add_argument("--cache-dir", default=None, help="data cache (default: a fresh temporary folder, removed after)")
    ap.add_argument("--sections", default="data,throughput")
    ap.add_argument("--batches", type=int, default=60, help="throughput: training batches per run")
    ap.add_argument("--train-batches", type=int, default=50, help="data: batches of the trial processes")
    ap.add_argument("--rounds", type=int, default=2, help="throughput: interleaved Trainer/plain rounds")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--old-module", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a)), flush=True)
        return
    sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    if not set(sections) <= {"data", "throughput"}:
        ap.error(f"--sections: a comma-separated subset of data,throughput, got {a.sections!r}")
    fresh = a.cache_dir is None
    a.cache_dir = a.cache_dir or tempfile.mkdtemp(prefix="nas-run-bench-cache-")
    try:
        parts = [data_section(a) if s == "data" else throughput_section(a) for s in sections]
    finally:
        if fresh:
            shutil.rmtree(a.cache_dir, ignore_errors=True)
    cmd = "python bench/cifar10.py " + " ".join(sys.argv[1:])
    avail = proc_mb("/proc/meminfo", "MemAvailable") / 1024
    text = "\n".join([
        "# CIFAR-10 JPEG folder: data cache, trial memory, Trainer throughput", "",
        f"Command: `{cmd.strip()}`; cache: {'a fresh temporary folder' if fresh else a.cache_dir}. Machine: "
        f"{os.cpu_count()} CPU cores, {avail:.0f} GiB available at the end. "
        f"Written {time.strftime('%Y-%m-%d')}.", "",
        *[line for p in parts for line in (*p, "")],
    ])
    print(text)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    print(f"written {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
