"""A damaged or mislabelled `.npz` is a `DatasetError` naming the file, never a zipfile traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nas.data import load_dataset
from search_spaces.errors import DatasetError


def _good(path: Path, compressed: bool = False) -> bytes:
    rng = np.random.default_rng(0)
    x = rng.random((60, 1, 8, 8), dtype=np.float32)
    y = np.arange(60) % 3
    (np.savez_compressed if compressed else np.savez)(path, x=x, y=y)
    return path.read_bytes()


def _flip(data: bytes, start: int, stop: int) -> bytes:
    b = bytearray(data)
    for i in range(start, min(stop, len(b))):
        b[i] ^= 0x5A
    return bytes(b)


def _write(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.npz"
    if kind == "truncated":
        data = _good(tmp_path / "src.npz")
        path.write_bytes(data[: len(data) // 2])
    elif kind == "crc":  # the zip directory is intact, a stored member's bytes are not
        data = _good(tmp_path / "src.npz")
        path.write_bytes(_flip(data, 200, 260))
    elif kind == "deflate":  # a compressed member's stream is damaged
        data = _good(tmp_path / "src.npz", compressed=True)
        path.write_bytes(_flip(data, 100, 400))
    elif kind == "text":
        path.write_text("x,y\n1,2\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "npy":  # a single .npy array renamed to .npz
        np.save(tmp_path / "a.npy", np.zeros((60, 8)))
        path.write_bytes((tmp_path / "a.npy").read_bytes())
    elif kind == "pickle":  # object arrays need allow_pickle, which is never given
        np.savez(path, x=np.array([{"a": 1}] * 60, dtype=object), y=np.arange(60) % 3)
    else:
        raise AssertionError(kind)
    return path


KINDS = {
    "truncated": "truncated",
    "crc": "corrupted",
    "deflate": "corrupted",
    "text": "not a .npz file",
    "empty": "not a .npz file",
    "npy": "not a .npz file",
    "pickle": "object (pickled) arrays",
}


def test_the_intact_file_loads(tmp_path: Path) -> None:
    _good(tmp_path / "ok.npz")
    assert load_dataset(tmp_path / "ok.npz").num_classes == 3


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_bad_npz_is_a_dataset_error_naming_the_file(tmp_path: Path, kind: str) -> None:
    path = _write(tmp_path, kind)
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    message = str(info.value)
    assert str(path) in message
    assert KINDS[kind] in message
    assert "\n" not in message


@pytest.mark.parametrize("kind", ["truncated", "crc", "pickle"])
def test_cli_prints_one_line_and_exits_2(tmp_path: Path, kind: str) -> None:
    path = _write(tmp_path, kind)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "nas_run",
            "search",
            "--dataset",
            str(path),
            "--trials",
            "1",
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert str(path) in lines[0] and KINDS[kind] in lines[0]
