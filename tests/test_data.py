"""Data sets: shapes, label ranges, seeded splits, standardisation and every user-data error."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from nas.data import Dataset, RawData, list_datasets, load_dataset, register_dataset
from search_spaces.errors import ConfigError, DatasetError, UnknownNameError


def check_dataset(d: Dataset, num_classes: int, input_shape: tuple[int, ...]) -> None:
    """Invariants every loaded data set must satisfy."""
    assert d.num_classes == num_classes and d.input_shape == input_shape
    for x, y in ((d.x_train, d.y_train), (d.x_val, d.y_val), (d.x_test, d.y_test)):
        assert x.dtype == np.float32 and y.dtype == np.int64
        assert x.shape == (len(y), *input_shape)
        assert y.min() >= 0 and y.max() < num_classes
        assert np.isfinite(np.asarray(x)).all()
    # stratified: every class reaches every split
    for y in (d.y_train, d.y_val, d.y_test):
        assert set(np.unique(y).tolist()) == set(range(num_classes))
    # standardised with the training statistics, per channel
    axes = (0, *range(2, d.x_train.ndim))
    np.testing.assert_allclose(np.asarray(d.x_train).mean(axis=axes), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(d.x_train).std(axis=axes), 1.0, atol=1e-3)
    assert len(d.mean) == len(d.std) == input_shape[0]
    assert len(d.class_names) == num_classes
    assert str(len(d.y_train)) in d.summary()


def fingerprint(d: Dataset) -> tuple[bytes, ...]:
    return tuple(np.asarray(a).tobytes() for a in (d.x_train, d.y_train, d.x_val, d.y_val, d.x_test, d.y_test))


def test_list_datasets_names_builtins() -> None:
    names = [name for name, _ in list_datasets()]
    assert {"digits", "mnist1d", "mnist5k"} <= set(names)
    assert names == sorted(names)


def test_digits_shapes_split_sizes_and_scaling() -> None:
    d = load_dataset("digits", seed=0)
    check_dataset(d, 10, (1, 8, 8))
    assert len(d.y_train) + len(d.y_val) + len(d.y_test) == 1797
    assert len(d.y_val) == len(d.y_test) == round(0.2 * 1797)
    # raw pixels were scaled to [0, 1] before standardising
    raw_train = d.x_train * np.float32(d.std[0]) + np.float32(d.mean[0])
    assert raw_train.min() >= -1e-5 and raw_train.max() <= 1 + 1e-5


def test_same_seed_same_split_other_seed_other_split() -> None:
    a, b, c = load_dataset("digits", seed=3), load_dataset("digits", seed=3), load_dataset("digits", seed=4)
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint(c)
    assert not np.array_equal(a.y_test, c.y_test)


def test_splits_are_disjoint_and_cover_the_pool() -> None:
    from sklearn.datasets import load_digits

    d = load_dataset("digits", seed=0, standardize=False)
    rows = Counter(r.tobytes() for x in (d.x_train, d.x_val, d.x_test) for r in np.asarray(x).reshape(len(x), -1))
    pool = Counter(r.tobytes() for r in (load_digits().data / 16.0).astype(np.float32))
    assert rows == pool  # every sample exactly once (as a multiset: digits has duplicates)
    assert d.mean == (0.0,) and d.std == (1.0,)


def test_fractions_control_split_sizes() -> None:
    d = load_dataset("digits", seed=0, val_fraction=0.1, test_fraction=0.3)
    assert len(d.y_val) == round(0.1 * 1797) and len(d.y_test) == round(0.3 * 1797)


def test_mnist1d_keeps_its_test_split() -> None:
    d = load_dataset("mnist1d", seed=0)
    check_dataset(d, 10, (1, 40))
    assert len(d.y_test) == 1000
    assert len(d.y_train) + len(d.y_val) == 4000
    other = load_dataset("mnist1d", seed=1)
    assert np.array_equal(d.y_test, other.y_test)  # the test split does not depend on the seed
    assert not np.array_equal(d.y_val, other.y_val)


@pytest.mark.slow
def test_mnist5k() -> None:
    d = load_dataset("mnist5k", seed=0)
    check_dataset(d, 10, (1, 28, 28))
    assert len(d.y_train) + len(d.y_val) + len(d.y_test) == 5000


def test_cached_builtin_cannot_be_corrupted_by_a_caller() -> None:
    d = load_dataset("digits", seed=0)
    batch = d.x_train[:]
    batch[:] = 0  # the caller owns the rows it is given ...
    assert np.asarray(d.x_train).std() > 0.5  # ... and the data set is untouched
    with pytest.raises(ValueError):
        d.x_train.raw[0] = 0  # its source rows are read-only


# ---------------------------------------------------------------------------------------------
# .npz files


def make_xy(n_per_class: int = 10, classes: int = 3, shape: tuple[int, ...] = (12,), seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n_per_class)
    x = rng.standard_normal((len(y), *shape)).astype(np.float32) + y.reshape(-1, *([1] * len(shape)))
    return x, y


def save(tmp_path: Path, **arrays) -> str:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize(
    "shape,layout,expected",
    [
        ((12,), None, (1, 12)),  # (N, L)
        ((2, 12), None, (2, 12)),  # (N, C, L): second axis <= 4
        ((9, 9), None, (1, 9, 9)),  # (N, H, W): square (others are ambiguous: tests/test_data_layout.py)
        ((9, 7), "NHW", (1, 9, 7)),
        ((3, 6, 5), None, (3, 6, 5)),  # (N, C, H, W)
        ((9, 7), "NCL", (9, 7)),  # layout overrides the guess
        ((6, 5, 3), "NHWC", (3, 6, 5)),  # channel-last images
        ((12, 2), "NLC", (2, 12)),
    ],
)
def test_npz_shapes(tmp_path: Path, shape, layout, expected) -> None:
    x, y = make_xy(shape=shape)
    extra = {"layout": np.array(layout)} if layout else {}
    d = load_dataset(save(tmp_path, x=x, y=y, **extra), seed=0)
    check_dataset(d, 3, expected)


def test_npz_channel_last_values_move_with_the_axes(tmp_path: Path) -> None:
    x, y = make_xy(shape=(4, 4, 3))
    x[..., 2] += 100.0  # channel 2 is far from the others
    d = load_dataset(save(tmp_path, x=x, y=y, layout=np.array("NHWC")), seed=0)
    assert d.mean[2] > 50 and d.mean[0] < 10


def test_npz_with_test_split_and_class_names(tmp_path: Path) -> None:
    x, y = make_xy(n_per_class=10)
    x_test, y_test = make_xy(n_per_class=4, seed=1)
    path = save(tmp_path, x=x, y=y, x_test=x_test, y_test=y_test, class_names=np.array(["a", "b", "c"]))
    d = load_dataset(path, seed=0, val_fraction=0.3)
    check_dataset(d, 3, (1, 12))
    assert len(d.y_test) == 12 and len(d.y_val) == 9
    assert d.class_names == ("a", "b", "c")
    assert d.name == path


def test_float_labels_that_are_integral_are_accepted(tmp_path: Path) -> None:
    x, y = make_xy()
    d = load_dataset(save(tmp_path, x=x, y=y.astype(np.float64)), seed=0)
    assert d.y_train.dtype == np.int64


def raises(tmp_path: Path, match: str, **arrays) -> None:
    with pytest.raises(DatasetError, match=match):
        load_dataset(save(tmp_path, **arrays), seed=0)


def test_error_length_mismatch(tmp_path: Path) -> None:
    x, y = make_xy()
    raises(tmp_path, "x has 30 samples but y has 29", x=x, y=y[:-1])


def test_error_non_integer_labels(tmp_path: Path) -> None:
    x, y = make_xy()
    y = y.astype(np.float64)
    y[5] = 1.5
    raises(tmp_path, "integer class indices, got 1.5 at index 5", x=x, y=y)
    raises(tmp_path, "dtype <U", x=x, y=np.array(["cat"] * len(x)))


def test_error_negative_labels(tmp_path: Path) -> None:
    x, y = make_xy()
    y[7] = -1
    raises(tmp_path, "negative label -1 at index 7", x=x, y=y)


def test_error_nan_in_x(tmp_path: Path) -> None:
    x, y = make_xy()
    x[4, 3] = np.nan
    raises(tmp_path, "NaN or infinite values \\(first in sample 4\\)", x=x, y=y)


def test_error_fewer_than_two_classes(tmp_path: Path) -> None:
    x, _ = make_xy()
    raises(tmp_path, "at least 2 classes", x=x, y=np.zeros(len(x), dtype=np.int64))


def test_error_class_too_small_to_split(tmp_path: Path) -> None:
    x, y = make_xy()
    y[:9] = 1  # class 0 keeps a single sample
    raises(tmp_path, "class 0 .* has 1 training sample", x=x, y=y)
    _, y = make_xy()
    y[y == 2] = 3  # label 2 unused: class 2 has no samples at all
    raises(tmp_path, "class 2 .* has 0 training sample", x=x, y=y)


def test_error_x_test_shape_mismatch(tmp_path: Path) -> None:
    x, y = make_xy(shape=(12,))
    x_test, y_test = make_xy(shape=(13,))
    raises(tmp_path, "x_test samples have shape \\(1, 13\\)", x=x, y=y, x_test=x_test, y_test=y_test)
    raises(tmp_path, "x_test is given but y_test is not", x=x, y=y, x_test=x_test[:, :12])


def test_error_npz_keys(tmp_path: Path) -> None:
    x, y = make_xy()
    raises(tmp_path, "missing key 'y'", x=x)
    raises(tmp_path, "unknown key\\(s\\) \\['x_val'\\]", x=x, y=y, x_val=x)
    raises(tmp_path, "unknown layout 'NWC'", x=x, y=y, layout=np.array("NWC"))


def test_error_unknown_name_lists_datasets_and_mentions_paths() -> None:
    with pytest.raises(UnknownNameError) as info:
        load_dataset("digitz")
    message = str(info.value)
    assert "did you mean 'digits'" in message and "mnist1d" in message and ".npz" in message
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset("missing/data.npz")


def test_error_unsupported_file(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("1,2\n")
    with pytest.raises(DatasetError, match="unsupported file type '.csv'"):
        load_dataset(str(path))


@pytest.mark.parametrize(
    "kwargs",
    [{"seed": -1}, {"seed": 1.5}, {"val_fraction": 0.0}, {"test_fraction": 1.0}, {"val_fraction": 0.001}],
)
def test_bad_settings_raise_config_error(kwargs) -> None:
    with pytest.raises(ConfigError):
        load_dataset("digits", **kwargs)


def test_register_dataset(tmp_path: Path) -> None:
    x, y = make_xy(shape=(2, 8))
    register_dataset("_tiny_test", lambda: RawData(x=x, y=y), "three blobs", overwrite=True)
    assert ("_tiny_test", "three blobs") in list_datasets()
    check_dataset(load_dataset("_tiny_test", seed=0), 3, (2, 8))
    with pytest.raises(ValueError, match="already registered"):
        register_dataset("_tiny_test", lambda: RawData(x=x, y=y), "again")


# ---------------------------------------------------------------------------------------------
# image folders


def write_images(
    root: Path, classes: dict[str, int], mode: str = "L", size=(6, 5), odd: str | None = None
) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, (cls, count) in enumerate(sorted(classes.items())):
        (root / cls).mkdir(parents=True)
        for i in range(count):
            channels = () if mode == "L" else (3,)
            pixels = rng.integers(0, 256, size=(size[1], size[0], *channels), dtype=np.uint8)
            pixels[0, 0] = 50 * label  # a marker to check labels follow sorted class names
            Image.fromarray(pixels, mode=mode).save(root / cls / f"img{i}.png")
        (root / cls / "notes.txt").write_text("not an image: ignored")
    if odd:  # one image of another size and mode
        Image.new("RGB", (9, 9), (10, 20, 30)).save(root / odd / "odd.png")


def test_image_folder_greyscale(tmp_path: Path) -> None:
    write_images(tmp_path, {"b_cat": 6, "a_dog": 5, "c_owl": 7})
    d = load_dataset(str(tmp_path), seed=0)
    check_dataset(d, 3, (1, 5, 6))  # (C, H, W) from 6x5 (width x height) images
    assert d.class_names == ("a_dog", "b_cat", "c_owl")
    assert len(d.y_train) + len(d.y_val) + len(d.y_test) == 18


def test_image_folder_mixed_modes_and_sizes_become_rgb_of_the_common_size(tmp_path: Path) -> None:
    write_images(tmp_path, {"a": 5, "b": 5}, odd="a")
    d = load_dataset(str(tmp_path), seed=0)
    check_dataset(d, 2, (3, 5, 6))


def test_image_folder_with_train_and_test(tmp_path: Path) -> None:
    write_images(tmp_path / "train", {"a": 6, "b": 6, "c": 6}, mode="RGB")
    write_images(tmp_path / "test", {"a": 2, "b": 2, "c": 2}, mode="RGB")
    d = load_dataset(str(tmp_path), seed=0)
    check_dataset(d, 3, (3, 5, 6))
    assert len(d.y_test) == 6 and len(d.y_train) + len(d.y_val) == 18


def test_image_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(DatasetError, match="no class sub-folders"):
        load_dataset(str(tmp_path / "empty_root"))
    write_images(tmp_path / "one", {"a": 5})
    (tmp_path / "one" / "b").mkdir()
    with pytest.raises(DatasetError, match="class folder has no images"):
        load_dataset(str(tmp_path / "one"))
    write_images(tmp_path / "broken", {"a": 5, "b": 5})
    (tmp_path / "broken" / "a" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="bad.png: not a readable image"):
        load_dataset(str(tmp_path / "broken"))
