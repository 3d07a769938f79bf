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


@pytest.mark.parametrize("gpus_per_trial", [0.5, 0.0])
def test_ray_trials_train_where_their_resources_say(tmp_path, gpus_per_trial):
    cfg = SearchConfig(
        space="nb201", dataset="digits", strategy="random", trials=4, epochs=2, runner="ray",
        gpus_per_trial=gpus_per_trial, max_concurrent=2, scheduler="none", out=str(tmp_path / "run"),
    )  # fmt: skip
    df = run_search(cfg).store.dataframe()
    assert len(df) == 4 and (df.status == "complete").all()
    # 0.5 each: two trials share the GPU and both train on it; 0: Ray hides the GPU from them
    assert (df.gpu == float(gpus_per_trial > 0)).all()


def test_compression_trials_fine_tune_on_the_gpu_they_are_given(tmp_path):
    from compress.policy import Policy
    from compress.run import CompressConfig, run_compress

    out = tmp_path / "run"
    run_search(SearchConfig(space="nb201", dataset="digits", strategy="random", trials=2, epochs=1, out=str(out)))
    prune = Policy.of(("structured", {"ratio": 0.5}), ("finetune", {"epochs": 1})).to_str()
    cfg = CompressConfig(run=str(out), top_k=2, policies=(prune,), runner="ray", gpus_per_trial=0.5)
    run = run_compress(cfg)
    table = run.table()
    assert len(table) == len(run.architectures) >= 1 and (table.status == "complete").all()
    assert (table.gpu == 1.0).all() and (table.params < table.base_params).all()


@pytest.mark.parametrize("amp", ["auto", "fp16", "bf16", "off"])
def test_recipes_train_on_the_gpu_with_mixed_precision_channels_last_and_loader_workers(amp):
    """The standard recipe's GPU paths: autocast (fp16 with a grad scaler, or bf16), channels_last,
    batches read by DataLoader workers into pinned memory and copied without blocking."""
    from nas.data import load_dataset
    from nas.recipes import get_recipe
    from nas.trainer import Trainer

    data = load_dataset("digits")
    space = get_space("darts").tiny()
    model = space.build(space.sample(np.random.default_rng(0)), data.input_shape, data.num_classes)
    recipe = get_recipe("standard", amp=amp, loader_workers=2)
    trainer = Trainer(model, data, recipe, 2, 0, torch.device("cuda"))
    assert trainer.channels_last
    val_acc = trainer.run()
    assert val_acc > 0.5 and trainer.history[-1]["gpu_peak_mb"] > 0
    assert next(model.parameters()).is_cuda
    if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()):
        assert trainer.scaler.is_enabled()


def test_nas_run_train_runs_on_the_gpu(tmp_path):
    from nas.final_training import train_final

    out = tmp_path / "run"
    run_search(SearchConfig(space="nb201", dataset="digits", strategy="random", trials=2, epochs=1, out=str(out)))
    [result] = train_final(out, epochs=2, recipe="standard")
    assert result.metrics["gpu"] == 1.0 and result.metrics["test_acc"] > 0.3
