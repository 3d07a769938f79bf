"""Trials on a GPU (run where CUDA exists, e.g. `pytest tests/test_gpu.py` on a GPU machine).

Nothing in the toolkit needs a GPU; these check that when a trial is given one it trains there:
in-process with `device="auto"`, and as Ray Tune trials sharing one GPU (0.5 each).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nas.config import SearchConfig
from nas.search import run_search
from nas.training import TrainingEvaluator
from search_spaces import get_space

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_an_in_process_trial_trains_on_the_gpu():
    space = get_space("nb201").tiny()
    evaluator = TrainingEvaluator(space="nb201", space_options=dict(space.options), dataset="digits")
    metrics = evaluator(space.sample(np.random.default_rng(0)), 2, lambda e, m: None)
    assert metrics["gpu"] == 1.0 and 0 < metrics["val_acc"] <= 1


def test_ray_trials_given_half_a_gpu_each_train_on_it(tmp_path):
    cfg = SearchConfig(
        space="nb201", dataset="digits", strategy="random", trials=4, epochs=2, runner="ray",
        gpus_per_trial=0.5, max_concurrent=2, scheduler="none", out=str(tmp_path / "run"),
    )  # fmt: skip
    df = run_search(cfg).store.dataframe()
    assert len(df) == 4 and (df.status == "complete").all()
    assert (df.gpu == 1.0).all()  # every trial saw its GPU and trained there


def test_ray_trials_given_no_gpu_stay_on_the_cpu(tmp_path):
    cfg = SearchConfig(
        space="nb201", dataset="digits", strategy="random", trials=2, epochs=1, runner="ray",
        gpus_per_trial=0.0, max_concurrent=2, scheduler="none", out=str(tmp_path / "run"),
    )  # fmt: skip
    df = run_search(cfg).store.dataframe()
    assert (df.gpu == 0.0).all()  # Ray hides the GPU from trials that were not given one
