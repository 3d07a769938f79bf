"""Sources decoded once into the data cache (`nas.datasource`): image folders, CIFAR-10 binary batches.

Each function takes the listed source, builds (or finds) its cache entry and returns memory-mapped
channel-first arrays. Image folders decode in parallel worker processes, each writing its slice of
one pre-allocated ``.npy`` memory map (no pixels travel between processes), with a progress line.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search_spaces.errors import DatasetError

from .datasource import ProgressLine, cached_entry, fingerprint, load_entry

if TYPE_CHECKING:
    import numpy as np

__all__ = ["CIFAR10_CLASSES", "decode_cifar_binary", "decode_image_folder"]

GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
CIFAR_RECORD = 1 + 3 * 32 * 32  # label byte, then 1024 red, 1024 green, 1024 blue bytes
SERIAL_BELOW = 2000  # fewer files than this decode in-process: a process pool costs ~1 s to start
CHUNK = 500


# ---------------------------------------------------------------------------------------------
# image folders


def decode_image_folder(
    root: Path,
    train_files: list[tuple[Path, int]],
    test_files: list[tuple[Path, int]],
    classes: list[str],
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """{x, y, x_test, y_test (None without a test folder), class_names, scale} of an image folder.

    The cache key is every file's relative path, size and modification time: a changed, added or
    removed image decodes the folder again."""
    all_files = [p for p, _ in train_files + test_files]
    key = fingerprint(
        [str(root.resolve()), len(train_files), classes] + [_stamp(p, y) for p, y in train_files + test_files]
    )

    def build(tmp: Path) -> dict[str, Any]:
        import numpy as np

        modes, sizes = _map_chunks(_headers, all_files, f"reading {len(all_files)} image headers")
        mode = "L" if set(modes) <= GREY_MODES else "RGB"
        size = Counter(sizes).most_common(1)[0][0]  # ties go to the size seen first (files are sorted)
        channels = 1 if mode == "L" else 3
        for name, files in (("x", train_files), ("x_test", test_files)):
            if not files:
                continue
            out = np.lib.format.open_memmap(
                tmp / f"{name}.npy", mode="w+", dtype=np.uint8, shape=(len(files), channels, size[1], size[0])
            )
            del out  # the workers open it themselves
            jobs = [(str(tmp / f"{name}.npy"), i, [str(p) for p, _ in files[i : i + CHUNK]], mode, size)
                    for i in range(0, len(files), CHUNK)]
            _run(_decode_chunk, jobs, len(files), f"decoding {len(files)} {name[2:] or 'train'} images")
            np.save(tmp / f"y{name[1:]}.npy", np.array([label for _, label in files], dtype=np.int64))
        return {"class_names": classes, "scale": 1 / 255, "mode": mode, "size": list(size)}

    entry, meta = cached_entry("images", key, build, cache_dir)
    return _arrays(entry, meta, bool(test_files))


def _stamp(p: Path, label: int) -> tuple[int, str, int, int]:
    s = os.stat(p)
    return (label, p.name, s.st_size, s.st_mtime_ns)


def _headers(paths: list[str]) -> tuple[list[str], list[tuple[int, int]]]:
    from PIL import Image, UnidentifiedImageError

    modes, sizes = [], []
    for p in paths:  # headers only: cheap
        try:
            with Image.open(p) as im:
                modes.append(im.mode)
                sizes.append(im.size)
        except (UnidentifiedImageError, OSError) as exc:
            raise DatasetError(f"{p}: not a readable image ({exc})") from None
    return modes, sizes


def _decode_chunk(job: tuple[str, int, list[str], str, tuple[int, int]]) -> int:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    out_path, start, paths, mode, size = job
    out = np.load(out_path, mmap_mode="r+")
    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                im = im.convert(mode)
                if im.size != tuple(size):
                    im = im.resize(tuple(size), Image.Resampling.BILINEAR)
                a = np.asarray(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as exc:
            raise DatasetError(f"{p}: not a readable image ({exc})") from None
        out[start + i] = a[np.newaxis] if mode == "L" else a.transpose(2, 0, 1)  # -> (C, H, W)
    out.flush()
    return len(paths)


def _map_chunks(fn: Any, files: list[Path], what: str) -> tuple[list[Any], list[Any]]:
    """``fn`` over chunks of ``files``; its two returned lists concatenated in file order."""
    jobs = [[str(p) for p in files[i : i + CHUNK]] for i in range(0, len(files), CHUNK)]
    results = _run(fn, jobs, len(files), what, sizes=[len(j) for j in jobs])
    firsts, seconds = [], []
    for a, b in results:
        firsts.extend(a)
        seconds.extend(b)
    return firsts, seconds


def _run(fn: Any, jobs: list[Any], total: int, what: str, sizes: list[int] | None = None) -> list[Any]:
    """Run jobs in order-preserving parallel worker processes (in-process when small)."""
    sizes = sizes or [len(j[2]) for j in jobs]
    progress = ProgressLine(what, total)
    results: list[Any] = []
    if total < SERIAL_BELOW:
        for job, n in zip(jobs, sizes, strict=True):
            results.append(fn(job))
            progress.update(n)
        progress.close()
        return results
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # fork on Linux: spawn would re-run a user's unguarded script (no `if __name__ == "__main__"`) in
    # every worker and fail. The workers only run PIL and numpy, never torch's thread pools, which
    # are what a forked child can deadlock on.
    method = "fork" if sys.platform == "linux" else "spawn"
    workers = max(1, min(os.cpu_count() or 1, 8))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
        futures = [pool.submit(fn, job) for job in jobs]
        for fut, n in zip(futures, sizes, strict=True):
            results.append(fut.result())
            progress.update(n)
    progress.close()
    return results


# ---------------------------------------------------------------------------------------------
# CIFAR-10 binary batches (the "binary version": plain bytes, no pickle)


def is_cifar_binary(folder: Path) -> bool:
    return (folder / "data_batch_1.bin").is_file()


def decode_cifar_binary(folder: Path, cache_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """``data_batch_*.bin`` (train) and ``test_batch.bin`` of CIFAR-10's binary version."""
    train = sorted(folder.glob("data_batch_*.bin"))
    test = folder / "test_batch.bin"
    files = [*train, test] if test.is_file() else train
    for f in files:
        if f.stat().st_size % CIFAR_RECORD:
            raise DatasetError(
                f"{f}: {f.stat().st_size} bytes is not a whole number of CIFAR-10 records "
                f"({CIFAR_RECORD} bytes each): truncated, or not the binary version?"
            )
    key = fingerprint([str(folder.resolve())] + [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files])
    meta_txt = folder / "batches.meta.txt"
    classes = (
        [c.strip() for c in meta_txt.read_text().splitlines() if c.strip()] if meta_txt.is_file() else list(CIFAR10_CLASSES)
    )

    def build(tmp: Path) -> dict[str, Any]:
        import numpy as np

        for name, group in (("x", train), ("x_test", [test] if test.is_file() else [])):
            if not group:
                continue
            n = sum(f.stat().st_size // CIFAR_RECORD for f in group)
            out = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=np.uint8, shape=(n, 3, 32, 32))
            labels, at = [], 0
            for f in group:
                rec = np.fromfile(f, dtype=np.uint8).reshape(-1, CIFAR_RECORD)
                out[at : at + len(rec)] = rec[:, 1:].reshape(-1, 3, 32, 32)
                labels.append(rec[:, 0].astype(np.int64))
                at += len(rec)
            out.flush()
            y = np.concatenate(labels)
            if y.max() >= len(classes):
                raise DatasetError(f"{folder}: label {int(y.max())} but {len(classes)} class names")
            np.save(tmp / f"y{name[1:]}.npy", y)
        return {"class_names": classes, "scale": 1 / 255}

    entry, meta = cached_entry("cifar-bin", key, build, cache_dir)
    return _arrays(entry, meta, test.is_file())


def _arrays(entry: Path, meta: dict[str, Any], has_test: bool) -> dict[str, Any]:
    out: dict[str, np.ndarray | None] = {"x": load_entry(entry, "x"), "y": load_entry(entry, "y")}
    out["x_test"] = load_entry(entry, "x_test") if has_test else None
    out["y_test"] = load_entry(entry, "y_test") if has_test else None
    return {**out, "class_names": tuple(meta["class_names"]), "scale": float(meta["scale"])}
