"""Zero-cost proxies on NAS-Bench-201: how well they rank, and what they add to the surrogate.

Proxies are computed here on NB201 networks built by the project (`NB201Space.build`), on one
seeded batch of real CIFAR-10 training images (the JPEG archive in shared/data, standardised with
the usual CIFAR-10 channel statistics); only the accuracies come from the NB201 table. One value
per function class (`canonical_key`: 4,930 classes stand for the 15,625 cells, whose isomorphic
spellings differ only in their trained noise), computed on its smallest cell and used for every
cell of the class. They are cached (one JSON line per class, `nas.proxies.ProxyCache`) under
results/, so an interrupted ``compute`` continues where it stopped.

    # 1. proxies of all 4,930 classes at a reduced size (C=8, one cell per stage; ~28 min, one core)
    nice -n 10 python bench/proxies_nb201.py compute --channels 8 --cells 1 --batch 16
    # 2. the same on 100 random classes at NB201's own size (C=16, N=5): how faithful is step 1?
    nice -n 10 python bench/proxies_nb201.py compute --channels 16 --cells 5 --batch 16 --sample 100
    # 3. the tables: results/proxies_nb201.md
    python bench/proxies_nb201.py report --seeds 20 --evals 100 --workers 2

Needs the bench extra (pip install 'nas-run[bench]') for the NB201 accuracies.
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nas.proxies import ALL_PROXIES, ProxyCache, compute_proxies  # noqa: E402

CIFAR_TAR = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def cache_path(channels: int, cells: int, batch: int) -> Path:
    return ROOT / "results" / f"proxies_nb201_c{channels}n{cells}_b{batch}.jsonl"


def settings(channels: int, cells: int, batch: int, seed: int) -> dict:
    return {"names": list(ALL_PROXIES), "channels": channels, "cells_per_stage": cells, "batch": batch,
            "seed": seed, "data": "cifar10 train jpg"}  # fmt: skip


def cifar_batch(n: int, seed: int = 0, tar: Path = CIFAR_TAR) -> tuple[np.ndarray, np.ndarray]:
    """``n`` CIFAR-10 training images drawn with ``seed``: (n, 3, 32, 32) standardised, labels."""
    from PIL import Image

    with tarfile.open(tar) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith("cifar10/train/") and m.name.endswith(".jpg")]
        classes = sorted({m.name.split("/")[2] for m in members})
        rows = np.sort(np.random.default_rng(seed).choice(len(members), n, replace=False))
        images, labels = [], []
        for i in rows:
            data = archive.extractfile(members[i]).read()
            images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255.0)
            labels.append(classes.index(members[i].name.split("/")[2]))
    x = (np.stack(images) - np.array(CIFAR_MEAN)) / np.array(CIFAR_STD)
    return x.transpose(0, 3, 1, 2).astype(np.float32), np.array(labels)


def class_keys() -> list[str]:
    """The smallest index key of each of the 4,930 function classes, sorted."""
    from search_spaces.nb201 import canonical_key

    return sorted({canonical_key(g) for g in all_cells()})


def all_cells() -> list:
    """The 15,625 cells in index-key order."""
    import itertools

    from search_spaces.nb201 import from_index_key

    return [from_index_key("".join(map(str, ops))) for ops in itertools.product(range(5), repeat=6)]


def compute(args: argparse.Namespace) -> None:
    import torch

    from search_spaces import get_space
    from search_spaces.nb201 import from_index_key

    torch.set_num_threads(1)
    space = get_space("nb201", channels=args.channels, cells_per_stage=args.cells)
    keys = class_keys()
    if args.sample:
        keys = sorted(np.random.default_rng(args.seed).choice(keys, args.sample, replace=False).tolist())
    path = cache_path(args.channels, args.cells, args.batch)
    cache = ProxyCache(path, settings(args.channels, args.cells, args.batch, args.seed))
    todo = [k for k in keys if k not in cache]
    print(f"{len(keys)} classes, {len(keys) - len(todo)} cached in {path.name}; computing {len(todo)}", flush=True)
    x, y = cifar_batch(args.batch, args.seed)
    start = time.perf_counter()
    for i, key in enumerate(todo, 1):
        torch.manual_seed(args.seed)
        model = space.build(from_index_key(key), (3, 32, 32), 10)
        cache.put(key, compute_proxies(model, x, y, ALL_PROXIES, seed=args.seed))
        if i % 250 == 0 or i == len(todo):
            rate = (time.perf_counter() - start) / i
            print(f"{i}/{len(todo)}: {rate:.3f} s per network, {rate * (len(todo) - i) / 60:.1f} min left", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compute", help="proxies of the NB201 function classes, cached under results/")
    c.add_argument("--channels", type=int, default=8)
    c.add_argument("--cells", type=int, default=1, help="cells per stage")
    c.add_argument("--batch", type=int, default=16)
    c.add_argument("--sample", type=int, default=0, help="only this many random classes (0: all)")
    c.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("report", help="the tables: results/proxies_nb201.md")
    r.add_argument("--channels", type=int, default=8)
    r.add_argument("--cells", type=int, default=1)
    r.add_argument("--batch", type=int, default=16)
    r.add_argument("--calibration", default="16,5", help="C,N of the full-size sample ('' to leave out)")
    r.add_argument("--seeds", type=int, default=20, help="search runs per strategy")
    r.add_argument("--evals", type=int, default=100)
    r.add_argument("--tau-seeds", type=int, default=5, help="train/test splits per surrogate size")
    r.add_argument("--workers", type=int, default=2)
    r.add_argument("--skip-search", action="store_true")
    r.add_argument("--out", default=str(ROOT / "results" / "proxies_nb201.md"))
    args = parser.parse_args(argv)
    if args.command == "compute":
        compute(args)
    else:
        from proxies_nb201_report import report  # bench/ is on sys.path as the script's folder

        report(args, argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
