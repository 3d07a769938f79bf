"""The data cache: decoded once, reused, invalidated when the source changes, rebuilt when corrupt;
memory-mapped sets are never read whole; CIFAR-10 binary batches; bad input is one error."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from nas.data import load_dataset
from search_spaces.errors import DatasetError


def _image_folder(root: Path, n_per_class: int = 6, size: int = 8) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n_per_class):
                a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(a).save(root / split / cls / f"{i}.png")
    return root


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if not p.name.startswith("."))


def test_folder_is_decoded_once_then_mapped_and_redecoded_when_an_image_changes(tmp_path: Path) -> None:
    from PIL import Image

    root, cache = _image_folder(tmp_path / "imgs"), tmp_path / "cache"
    d1 = load_dataset(root, cache_dir=cache)
    [entry] = _entries(cache)
    assert isinstance(d1.x_train.raw, np.memmap) and d1.x_train.raw.dtype == np.uint8
    stamp = (entry / "manifest.json").stat().st_mtime_ns
    d2 = load_dataset(root, cache_dir=cache)
    assert (entry / "manifest.json").stat().st_mtime_ns == stamp  # reused, not decoded again
    np.testing.assert_array_equal(np.asarray(d1.x_train), np.asarray(d2.x_train))
    # the cache holds the pixels exactly
    first = root / "train" / "cat" / "0.png"
    np.testing.assert_array_equal(d1.x_train.raw[0], np.asarray(Image.open(first)).transpose(2, 0, 1))

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(first)  # the source changed
    os.utime(first, ns=(1, 1))
    d3 = load_dataset(root, cache_dir=cache)
    assert len(_entries(cache)) == 2
    assert d3.x_train.raw[0].sum() == 0


def test_corrupt_cache_is_rebuilt_never_trusted(tmp_path: Path, capsys) -> None:
    root, cache = _image_folder(tmp_path / "imgs"), tmp_path / "cache"
    good = np.asarray(load_dataset(root, cache_dir=cache).x_train)
    [entry] = _entries(cache)
    x = entry / "x.npy"
    data = bytearray(x.read_bytes())
    data[-5] ^= 0xFF  # one flipped pixel
    x.write_bytes(bytes(data))
    again = load_dataset(root, cache_dir=cache)
    assert "corrupted" in capsys.readouterr().err
    np.testing.assert_array_equal(np.asarray(again.x_train), good)
    (entry / "y.npy").write_bytes(b"")  # truncated
    np.testing.assert_array_equal(np.asarray(load_dataset(root, cache_dir=cache).x_train), good)


def test_unwritable_cache_folder_and_unreadable_image_are_one_error(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "imgs")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DatasetError, match="--cache-dir"):
        load_dataset(root, cache_dir=blocker / "cache")
    (root / "train" / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="broken.png: not a readable image"):
        load_dataset(root, cache_dir=tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir()]  # no half entry left behind


def test_cifar10_binary_batches(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    images = {}
    for name, n in (("data_batch_1.bin", 30), ("data_batch_2.bin", 30), ("test_batch.bin", 20)):
        labels = np.arange(n, dtype=np.uint8) % 10
        pixels = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        images[name] = (labels, pixels)
        np.concatenate([labels[:, None], pixels], axis=1).tofile(folder / name)
    d = load_dataset(folder, cache_dir=tmp_path / "cache")
    assert d.input_shape == (3, 32, 32) and d.num_classes == 10 and d.class_names[0] == "airplane"
    assert len(d.y_test) == 20 and len(d.y_train) + len(d.y_val) == 60
    labels, pixels = images["test_batch.bin"]
    np.testing.assert_array_equal(d.y_test, labels)
    np.testing.assert_array_equal(d.x_test.raw[3], pixels[3].reshape(3, 32, 32))
    (folder / "test_batch.bin").write_bytes(b"x" * 100)
    with pytest.raises(DatasetError, match="whole number of CIFAR-10 records"):
        load_dataset(folder, cache_dir=tmp_path / "cache")


def test_memory_mapped_set_is_never_read_whole(tmp_path: Path) -> None:
    """A 300 MB uint8 set: loading, standardising statistics and 20 training batches add far less
    than its size to the process's private memory (RssAnon, in a fresh process). Its pages are
    file-backed and shared: every worker on the node maps the same page-cache copy."""
    folder = tmp_path / "big"
    folder.mkdir()
    n = 100_000
    x = np.lib.format.open_memmap(folder / "x.npy", mode="w+", dtype=np.uint8, shape=(n, 3, 32, 32))
    x[:] = 7
    x[::97] = 200
    x.flush()
    del x
    np.save(folder / "y.npy", (np.arange(n) % 10).astype(np.int64))
    code = textwrap.dedent(f"""
        import numpy as np, torch, sklearn.model_selection  # imports are not data
        from nas.data import load_dataset
        from nas.trainer import batches
        def anon():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
        before = anon()
        d = load_dataset({str(folder)!r})
        order = np.random.default_rng(0).permutation(len(d.y_train))[:20 * 128]
        for xb, yb in batches(d.x_train, d.y_train, order, 128, torch.device("cpu")):
            assert xb.dtype == torch.float32 and xb.shape == (len(yb), 3, 32, 32)
        print((anon() - before) / 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    added_mb = float(out.stdout.strip().splitlines()[-1])
    # a float32 copy of the set would be 1.2 GB, a uint8 one 300 MB
    assert added_mb < 100, f"{added_mb:.0f} MB resident for a 300 MB set"


@pytest.mark.slow
def test_two_ray_workers_share_one_cache_entry(tmp_path: Path) -> None:
    """The driver decodes the folder once; both Ray trials map that entry (nothing decoded again)."""
    from nas.config import SearchConfig
    from nas.search import run_search

    root, cache = _image_folder(tmp_path / "imgs", n_per_class=12), tmp_path / "cache"
    load_dataset(root, cache_dir=cache)
    [entry] = _entries(cache)
    stamp = (entry / "manifest.json").stat().st_mtime_ns
    cfg = SearchConfig(space="nb201", dataset=str(root), strategy="random", trials=2, epochs=1, runner="ray",
                       max_concurrent=2, scheduler="none", cache_dir=str(cache), out=str(tmp_path / "run"))
    df = run_search(cfg).store.dataframe()
    assert (df.status == "complete").all() and len(df) == 2
    assert _entries(cache) == [entry] and (entry / "manifest.json").stat().st_mtime_ns == stamp
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no decode started by a worker
