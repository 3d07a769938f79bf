"""Data that does not grow with its size: decode once into a memory-mapped cache, standardise per batch.

FFCV's two ideas, in plain numpy (FFCV's ``DatasetWriter`` -> ``.beton`` + ``os_cache``): a source
(an image folder, CIFAR-10's binary batches, a ``.npz`` file) is decoded **once** into uint8 (or the
source's dtype) ``.npy`` files, channel-first, in a cache folder keyed by the source's content; every
later run, trial and Ray worker on the node opens the same files with ``np.load(mmap_mode="r")``, so
the OS page cache holds the data once for all of them. Nothing here makes a float32 copy of a whole
set: a `StandardizedArray` is a raw array plus an index array (the split) plus the per-channel mean
and std, and converts only the rows it is asked for.

Cache entries are built in a temporary folder and renamed into place (a killed decode leaves no half
entry); each holds a ``manifest.json`` with every file's size and BLAKE2b digest, checked on every
load, so a truncated or altered cache is rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search_spaces.errors import DatasetError

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "CACHE_ENV",
    "StandardizedArray",
    "as_rows",
    "cache_root",
    "cached_entry",
    "channel_stats",
    "load_entry",
]

CACHE_ENV = "NAS_RUN_CACHE_DIR"
CACHE_VERSION = 1
# files larger than this are verified by size, npy header and sampled blocks instead of a full
# digest: hashing an ImageNet-size cache on every load would cost more than the load
FULL_DIGEST_BYTES = 4 << 30
_BLOCK = 1 << 20


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else ``$NAS_RUN_CACHE_DIR``, else ``$XDG_CACHE_HOME/nas-run`` (``~/.cache/nas-run``)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nas-run"


# ---------------------------------------------------------------------------------------------
# lazy standardised rows


class StandardizedArray:
    """``(raw[index] * scale - mean) / std`` as float32, computed only for the rows asked for.

    Indexing (an int, a slice, an integer or boolean array) returns a numpy array; ``np.asarray``
    materialises every row (only small sets should ask for that). ``raw`` may be a memory map.
    """

    def __init__(self, raw: np.ndarray, index: np.ndarray, mean: np.ndarray, std: np.ndarray, scale: float):
        import numpy as np

        self.raw, self.index = raw, np.asarray(index, dtype=np.int64)
        # per channel (axis 1); one mean and std for all values of an array without a channel
        # axis (a user's (N, L) fed as stored)
        shape = (1, raw.shape[1]) + (1,) * (raw.ndim - 2) if np.size(mean) != 1 else (1,) * raw.ndim
        # one multiply-add per element: x * a + b == (x * scale - mean) / std
        self._a = (scale / np.asarray(std, dtype=np.float64)).reshape(shape).astype(np.float32)
        self._b = (-np.asarray(mean, dtype=np.float64) / np.asarray(std, dtype=np.float64)).reshape(
            shape
        ).astype(np.float32)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.raw.shape[1:])

    @property
    def ndim(self) -> int:
        return self.raw.ndim

    @property
    def dtype(self) -> Any:
        import numpy as np

        return np.dtype(np.float32)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, key: Any) -> np.ndarray:
        import numpy as np

        if isinstance(key, tuple):  # rows first, then the rest on the small result
            return self[key[0]][(slice(None), *key[1:])]
        if isinstance(key, (int, np.integer)):
            return self.rows(self.index[[key]])[0]
        return self.rows(self.index[key])

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """Standardised float32 rows of ``raw`` at ``positions`` (raw row numbers, not split ones)."""
        import numpy as np

        # a memory map reads the pages of these rows only; sorted reads are sequential on disk
        out = np.asarray(self.raw[np.asarray(positions)], dtype=np.float32)
        out *= self._a
        out += self._b
        return out

    def raw_rows(self, key: Any) -> np.ndarray:
        """Rows of the split in the source's dtype (uint8 for images): what a loader ships."""
        return self.raw[self.index[key]]

    def standardize(self, x: Any) -> Any:
        """The same affine map on a batch of raw rows (numpy or torch)."""
        return x * self._a + self._b

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        import numpy as np

        out = np.empty(self.shape, dtype=np.float32)
        for i in range(0, len(self.index), 4096):
            out[i : i + 4096] = self.rows(self.index[i : i + 4096])
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        return f"StandardizedArray(shape={self.shape}, raw dtype={self.raw.dtype})"


def as_rows(x: Any) -> StandardizedArray:
    """``x`` itself, or a plain array (already standardised: a hand-made `Dataset`) wrapped as one."""
    import numpy as np

    if isinstance(x, StandardizedArray):
        return x
    x = np.asarray(x)
    return StandardizedArray(x, np.arange(len(x)), np.zeros(x.shape[1]), np.ones(x.shape[1]), 1.0)


def channel_stats(raw: np.ndarray, index: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of ``raw[index] * scale``, in chunks (float64 sums, no full copy).

    For an array of the data cache they are kept beside it, per split (a later run with the same
    seed reads them instead of passing over the whole training split again)."""
    import numpy as np

    memo = _stats_file(raw, index, scale)
    if memo is not None:
        try:
            doc = json.loads(memo.read_text())
            return np.asarray(doc["mean"], dtype=np.float64), np.asarray(doc["std"], dtype=np.float64)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # absent or damaged: computed again below
    mean, std = _channel_stats(raw, index, scale)
    if memo is not None:
        try:
            tmp = memo.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"mean": mean.tolist(), "std": std.tolist()}))
            os.replace(tmp, memo)
        except OSError:
            pass  # a read-only cache still serves its arrays
    return mean, std


def _stats_file(raw: Any, index: np.ndarray, scale: float) -> Path | None:
    import numpy as np

    name = getattr(raw, "filename", None)
    if name is None or not (Path(name).parent / "manifest.json").is_file():
        return None  # not an array of the data cache (a user's own .npy files are never written beside)
    h = hashlib.blake2b(np.ascontiguousarray(index, dtype=np.int64).tobytes(), digest_size=12)
    h.update(repr((scale, raw.shape, Path(name).name)).encode())
    return Path(name).parent / f"stats-{h.hexdigest()}.json"


def _channel_stats(raw: np.ndarray, index: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    import numpy as np

    n_ch = raw.shape[1]
    total, total_sq, count = np.zeros(n_ch), np.zeros(n_ch), 0
    axes = (0, *range(2, raw.ndim))
    index = np.sort(np.asarray(index))
    for i in range(0, len(index), 2048):
        chunk = np.asarray(raw[index[i : i + 2048]], dtype=np.float64)
        total += chunk.sum(axis=axes)
        total_sq += np.square(chunk).sum(axis=axes)
        count += chunk.size // n_ch
    mean = total / count
    var = np.maximum(total_sq / count - mean**2, 0.0)
    return mean * scale, np.sqrt(var) * scale


# ---------------------------------------------------------------------------------------------
# the on-disk cache


def fingerprint(parts: Iterable[Any]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()


def cached_entry(
    kind: str,
    key: str,
    build: Callable[[Path], dict[str, Any]],
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """The verified cache folder for (kind, key), built by ``build(tmp_folder) -> meta`` if missing
    or broken. ``build`` writes ``.npy`` files into the folder it is given and returns JSON-able
    metadata; the manifest (sizes, digests, meta) is written last and the folder renamed into place."""
    root = cache_root(cache_dir)
    entry = root / f"{kind}-{key[:20]}"
    manifest = _verified_manifest(entry)
    if manifest is not None:
        return entry, manifest["meta"]
    if entry.exists():
        print(f"nas-run: the data cache {entry} is incomplete or corrupted; decoding again", file=sys.stderr)
        shutil.rmtree(entry, ignore_errors=True)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-{key[:20]}-", dir=root))
    except OSError as exc:
        raise DatasetError(
            f"cannot write the data cache in {root} ({exc.strerror or exc}); pass --cache-dir DIR "
            f"(or set {CACHE_ENV}) to a writable folder"
        ) from None
    try:
        meta = build(tmp)
        files = {
            p.name: {"bytes": p.stat().st_size, "digest": _digest(p)}
            for p in sorted(tmp.iterdir())
            if p.suffix == ".npy"
        }
        doc = {"version": CACHE_VERSION, "kind": kind, "key": key, "files": files, "meta": meta}
        (tmp / "manifest.json").write_text(json.dumps(doc, indent=1))
        try:
            os.rename(tmp, entry)
        except OSError:  # another process built the same entry meanwhile: keep theirs if it is sound
            if _verified_manifest(entry) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return entry, meta


def load_entry(entry: Path, name: str) -> np.ndarray:
    """One cached array, memory-mapped read-only."""
    import numpy as np

    return np.load(entry / f"{name}.npy", mmap_mode="r", allow_pickle=False)


def _verified_manifest(entry: Path) -> dict[str, Any] | None:
    import numpy as np

    try:
        doc = json.loads((entry / "manifest.json").read_text())
        if doc.get("version") != CACHE_VERSION:
            return None
        on_disk = {p.name for p in entry.iterdir() if p.suffix == ".npy"}
        if on_disk != set(doc["files"]):
            return None
        for fname, info in doc["files"].items():
            path = entry / fname
            if path.stat().st_size != info["bytes"] or _digest(path) != info["digest"]:
                return None
            np.load(path, mmap_mode="r", allow_pickle=False)  # a readable npy header
        return doc
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _digest(path: Path) -> str:
    """BLAKE2b of the file; of its size and sampled 1 MiB blocks beyond FULL_DIGEST_BYTES."""
    size = path.stat().st_size
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        if size <= FULL_DIGEST_BYTES:
            while block := fh.read(8 * _BLOCK):
                h.update(block)
        else:
            h.update(str(size).encode())
            for i in range(257):  # the first, the last and 255 evenly spaced blocks
                fh.seek(min(size - _BLOCK, i * (size - _BLOCK) // 256))
                h.update(fh.read(_BLOCK))
    return h.hexdigest()


class ProgressLine:
    """``what: 45% (27000/60000) 12.3 s`` on stderr: redrawn in place on a terminal, one line in a log."""

    def __init__(self, what: str, total: int, stream: Any = None):
        self.what, self.total, self.done = what, total, 0
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.t0 = time.perf_counter()
        self._last = 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.tty and (now - self._last > 0.2 or self.done >= self.total):
            self._last = now
            print(f"\r{self._text()}", end="", file=self.stream, flush=True)

    def close(self) -> None:
        print(("\r" if self.tty else "") + self._text(), file=self.stream, flush=True)

    def _text(self) -> str:
        pct = 100 * self.done / max(self.total, 1)
        return f"{self.what}: {pct:3.0f}% ({self.done}/{self.total}) {time.perf_counter() - self.t0:.1f} s"
