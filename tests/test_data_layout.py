"""Data fed as stored to a user's model (`nas-run compress --model`), layouts for the rest,
label kinds and the bound on label values (issue #22, item 3)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nas.data import load_dataset, read_layout
from nas_run.cli import main
from search_spaces.errors import DatasetError

# a pitch-tracker-like model: it takes (N, L) frames and adds the channel axis itself, so a
# batch given a channel axis by nas-run ((N, 1, L) -> (N, 1, 1, L)) fails in its first conv
FRAMES_MODEL = '''
import torch
from torch import nn


class Frames(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.conv = nn.Conv1d(1, 8, 5, padding=2)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        if x.ndim != 2:
            raise ValueError(f"expects (N, L) frames, got {tuple(x.shape)}")
        h = torch.relu(self.conv(x.unsqueeze(1))).mean(-1)
        return self.head(h)


def build(num_classes):
    torch.manual_seed(0)
    return Frames(num_classes)


def build12():  # a head of 12 classes whatever the data show
    torch.manual_seed(0)
    return Frames(12)
'''


@pytest.fixture
def frames_model(tmp_path: Path) -> Path:
    path = tmp_path / "frames_model.py"
    path.write_text(FRAMES_MODEL)
    return path


def frames(tmp_path: Path, n: int = 90, length: int = 32, classes: int = 3, **extra) -> Path:
    rng = np.random.default_rng(0)
    y = np.arange(n) % classes
    x = (rng.standard_normal((n, length)) + y[:, None]).astype(np.float32)
    path = tmp_path / "frames.npz"
    np.savez(path, x=x, y=extra.pop("y", y), **extra)
    return path


def compress(model: str, data: Path, out: Path, *extra: str) -> int:
    return main(["compress", "--model", model, "--dataset", str(data), "--out", str(out), "--int8", "--quiet",
                 "--calib-size", "16", *extra])


def test_frames_fed_as_stored_to_a_model_end_to_end(tmp_path: Path, frames_model: Path, capsys) -> None:
    data = frames(tmp_path)
    assert compress(f"{frames_model}:build", data, tmp_path / "out") == 0, capsys.readouterr().err
    row = pd.read_csv(tmp_path / "out" / "compress.csv").iloc[0]
    assert row.status == "complete" and 0 <= row.val_acc <= 1  # (an untrained model: any accuracy)
    # the same file through a search's eyes gets its channel axis
    d, m = load_dataset(data, seed=0), load_dataset(data, seed=0, for_model=True, standardize=False)
    assert d.input_shape == (1, 32) and m.input_shape == (32,) and m.layout == "NL"
    np.testing.assert_array_equal(m.x_train[:4], np.load(data)["x"][m.x_train.index[:4]])  # values as stored
    # --standardize on an array without a channel axis: one mean and std over all its values
    s = load_dataset(data, seed=0, for_model=True, standardize=True)
    assert len(s.mean) == 1 and abs(float(np.asarray(s.x_train).mean())) < 1e-4


def test_layout_flag_turns_model_data_channel_first(tmp_path: Path, frames_model: Path, capsys) -> None:
    # --layout NL asks for the channel axis: this model refuses (N, 1, L), one line, exit 2
    data = frames(tmp_path)
    assert compress(f"{frames_model}:build", data, tmp_path / "out", "--layout", "NL") == 2
    err = capsys.readouterr().err.strip()
    assert "(8, 1, 32)" in err and len(err.splitlines()) == 1


def test_classes_from_the_models_output(tmp_path: Path, frames_model: Path, capsys) -> None:
    # labels 0..3 only, one of them (3) with a single sample; the model's head has 12 classes
    y = np.arange(90) % 3
    y[0] = 3
    data = frames(tmp_path, y=y)
    with pytest.raises(DatasetError, match="class 3 .* has 1 training sample"):
        load_dataset(data, seed=0)  # a search still needs every class in every split
    assert compress(f"{frames_model}:build12", data, tmp_path / "out") == 0, capsys.readouterr().err
    d = load_dataset(data, seed=0, for_model=True, num_classes=12)
    assert d.num_classes == 12 and len(d.class_names) == 12
    assert 0 in d.x_train.index  # the class with one sample is trained on, never held out
    assert set(d.y_val.tolist()) == {0, 1, 2}  # stratified among the classes that can be


@pytest.mark.parametrize("shape", [(90, 6, 100), (90, 7, 9), (90, 3, 8), (90, 32, 32, 3)])
def test_ambiguous_arrays_are_refused_with_a_layout_hint(tmp_path: Path, shape) -> None:
    assert read_layout(shape) is None
    path = tmp_path / "amb.npz"
    np.savez(path, x=np.zeros(shape, np.float32), y=np.arange(90) % 3)
    with pytest.raises(DatasetError, match="give its layout, one of NL, NCL, NLC, NHW, NCHW, NHWC: a 'layout' key"):
        load_dataset(path, seed=0)
    # a user's model gets it as stored; standardising it needs the channel axis
    assert load_dataset(path, seed=0, for_model=True, standardize=False).input_shape == shape[1:]
    with pytest.raises(DatasetError, match="--standardize needs its channel axis"):
        load_dataset(path, seed=0, for_model=True, standardize=True)


def test_ambiguous_array_exits_2_in_one_line(tmp_path: Path, frames_model: Path, capsys) -> None:
    path = tmp_path / "amb.npz"
    np.savez(path, x=np.zeros((90, 6, 100), np.float32), y=np.arange(90) % 3)
    assert compress(f"{frames_model}:build", path, tmp_path / "out", "--standardize") == 2
    err = capsys.readouterr().err.strip()
    assert "layout" in err and "(90, 6, 100)" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "shape,layout,expected",
    [
        ((6, 100), "NCL", (6, 100)),
        ((100, 6), "NLC", (6, 100)),
        ((6, 100), "NHW", (1, 6, 100)),
        ((32, 32, 3), "NHWC", (3, 32, 32)),
        ((2, 40), None, (2, 40)),  # the rule: a few channels of a long series
        ((28, 28), None, (1, 28, 28)),  # the rule: a square image
    ],
)
def test_layouts_accepted(tmp_path: Path, shape, layout, expected) -> None:
    x = np.random.default_rng(0).standard_normal((90, *shape)).astype(np.float32)
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=np.arange(90) % 3, **({"layout": np.array(layout)} if layout else {}))
    assert load_dataset(path, seed=0).input_shape == expected
    # the key in the file and the argument are the same thing; for a model, a layout means channel-first
    np.savez(path, x=x, y=np.arange(90) % 3)
    assert load_dataset(path, seed=0, layout=layout, for_model=True).input_shape == (expected if layout else shape)


def test_layout_key_and_argument_must_agree(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((90, 6, 100), np.float32), y=np.arange(90) % 3, layout=np.array("NCL"))
    with pytest.raises(DatasetError, match="layout key says NCL but layout NLC was given"):
        load_dataset(path, seed=0, layout="NLC")


def test_soft_and_float_labels_load_for_a_model_and_are_refused_for_a_search(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    soft = rng.dirichlet(np.ones(4), size=90)  # (N, K) soft targets
    soft[np.arange(90) % 1 == 0, np.arange(90) % 4] += 1.0  # argmax: every class present
    soft /= soft.sum(1, keepdims=True)
    target = rng.standard_normal(90) * 3.0  # regression
    for y, kind, k, y_shape in ((soft, "multilabel", 4, (4,)), (target, "regression", 1, ())):
        data = frames(tmp_path, y=y)
        d = load_dataset(data, seed=0, for_model=True)
        assert (d.label_kind, d.num_classes) == (kind, k)
        assert d.y_train.dtype == np.float32 and d.y_train.shape[1:] == y_shape
        assert len(d.y_train) + len(d.y_val) + len(d.y_test) == 90
        with pytest.raises(DatasetError, match="search spaces classify"):
            load_dataset(data, seed=0)
    # multi-label is stratified on the top score: every class reaches val
    d = load_dataset(frames(tmp_path, y=soft), seed=0, for_model=True)
    assert set(d.y_val.argmax(1).tolist()) == {0, 1, 2, 3}
    # class labels stay int64
    assert load_dataset(frames(tmp_path), seed=0, for_model=True).y_train.dtype == np.int64


def test_huge_label_refused_before_any_allocation(tmp_path: Path) -> None:
    y = np.arange(90) % 3
    y[17] = 2_000_000_000
    data = frames(tmp_path, y=y)
    for for_model in (False, True):
        t0 = time.perf_counter()
        with pytest.raises(DatasetError, match="label 2000000000 at index 17; class indices must be 0..K-1 with K"):
            load_dataset(data, seed=0, for_model=for_model)
        assert time.perf_counter() - t0 < 5  # no 16 GB bincount attempted


def test_search_config_layout_reaches_the_trainer(tmp_path: Path) -> None:
    # an x.npy folder has no `layout` key: a search's config gives it
    from nas.config import SearchConfig
    from nas.training import TrainingEvaluator

    folder = tmp_path / "series"
    folder.mkdir()
    np.save(folder / "x.npy", np.random.default_rng(0).standard_normal((90, 100, 6)).astype(np.float32))
    np.save(folder / "y.npy", np.arange(90) % 3)
    with pytest.raises(DatasetError, match="layout"):
        TrainingEvaluator(space="unireplk", dataset=str(folder)).data()
    cfg = SearchConfig(dataset=str(folder), layout="NLC")
    ev = TrainingEvaluator(space="unireplk", dataset=cfg.dataset, layout=cfg.layout)
    assert ev.data().input_shape == (6, 100)
