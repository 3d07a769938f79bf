"""The collapse guard (issue #22, item 2): a compression trial whose accuracy ends near chance while
its uncompressed model did not is flagged in its metrics, on the console, in `nas-run show` and in
the HTML report, with the cheaply detectable causes named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from nas.collapse import (
    DROP_LIMIT,
    collapse_message,
    collapse_metrics,
    collapse_threshold,
    drop_limit,
    large_drop_message,
    large_drop_metrics,
    large_drop_warnings,
)
from nas_run.cli import main

torch.set_num_threads(1)
BUILDER = f"{Path(__file__).parent / 'user_models.py'}:resnet_cnn"
TEN = np.repeat(np.arange(10), 20)  # ten balanced classes: chance 0.1


def test_threshold_is_near_chance_and_needs_a_base_clearly_above_it() -> None:
    assert collapse_threshold(0.1) == pytest.approx(0.145) and collapse_threshold(0.5) == pytest.approx(0.525)
    assert collapse_threshold(0.9) == pytest.approx(0.92)  # never closer than 2 points
    m = collapse_metrics(0.1, TEN, base_acc=0.9)
    assert m["collapsed"] == 1.0 and m["chance_acc"] == pytest.approx(0.1)
    assert collapse_metrics(0.14, TEN, base_acc=0.9)["collapsed"] == 1.0
    assert collapse_metrics(0.2, TEN, base_acc=0.9)["collapsed"] == 0.0  # learnt something
    assert collapse_metrics(0.1, TEN, base_acc=0.15)["collapsed"] == 0.0  # the base never learnt: not destroyed
    skewed = np.array([0] * 90 + [1] * 10)
    assert collapse_metrics(0.9, skewed, base_acc=0.99)["collapsed"] == 1.0  # "always class 0" is chance here
    assert collapse_metrics(0.95, skewed, base_acc=0.99)["collapsed"] == 0.0


def test_likely_causes_are_checked_on_the_model_and_named() -> None:
    torch.manual_seed(0)
    sigmoid = nn.Sequential(nn.Flatten(), nn.Linear(4, 10), nn.Sigmoid())
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    m = collapse_metrics(0.1, TEN, base_acc=0.9, model=sigmoid, x=x, steps=12)
    assert m["collapse_prob_outputs"] == 1.0 and m["collapse_few_steps"] == 1.0 and m["collapse_stale_bn"] == 0.0
    text = collapse_message({**m, "val_acc": 0.1, "base_val_acc": 0.9})
    assert text.startswith("collapsed:") and "probabilities" in text and "too few optimisation steps" in text
    frozen = nn.Sequential(nn.Flatten(), nn.Linear(4, 10), nn.BatchNorm1d(10, momentum=0.0))
    assert collapse_metrics(0.1, TEN, 0.9, frozen, x, steps=500)["collapse_stale_bn"] == 1.0
    assert collapse_metrics(0.1, TEN, 0.9, frozen, x, recalibrated=True)["collapse_stale_bn"] == 0.0
    logits = nn.Sequential(nn.Flatten(), nn.Linear(4, 10))
    quiet = collapse_metrics(0.1, TEN, 0.9, logits, x * 50, steps=500)
    assert "no cheap check found a cause" in collapse_message(quiet)
    assert collapse_message(collapse_metrics(0.8, TEN, 0.9)) is None


def test_large_drop_is_flagged_above_the_limit_and_not_at_it() -> None:
    assert DROP_LIMIT == 5.0 and drop_limit(()) == 5.0
    at = 100.0 * (0.90 - 0.85)  # 5.000000000000004: exactly the limit, up to float rounding
    assert large_drop_metrics(at) == {"large_drop": 0.0, "drop_limit": 5.0}
    assert large_drop_metrics(5.01)["large_drop"] == 1.0 and large_drop_metrics(-3.0)["large_drop"] == 0.0
    # a run's acc_drop constraint is the limit (the tightest upper bound); others do not count
    assert drop_limit(["acc_drop<=2", "onnx_latency_ms<=1", "acc_drop<3"]) == 2.0
    assert drop_limit(["acc_drop>=1"]) == 5.0
    assert large_drop_metrics(3.0, drop_limit(["acc_drop<=2"]))["large_drop"] == 1.0
    # a regression metric's val_acc is -mae: acc_drop = 100 * (base - val) > 0 when the mae grew
    base, val = -0.10, -0.16
    m = {**large_drop_metrics(100 * (base - val)), "acc_drop": 100 * (base - val), "val_acc": val, "base_val_acc": base}
    assert m["large_drop"] == 1.0
    text = large_drop_message(m)
    assert text.startswith("large drop:") and "6.00 points" in text and "limit of 5" in text
    assert large_drop_message({**m, "large_drop": 0.0}) is None
    table = pd.DataFrame([
        {"number": 0, **m, "collapsed": float("nan")},
        {"number": 1, **m, "collapsed": 1.0},  # says so as collapsed
        {"number": 2, **m, "large_drop": 0.0},
    ])  # fmt: skip
    assert large_drop_warnings(table) == [f"trial 0 {text}"]


@pytest.fixture(scope="module")
def trained_weights(tmp_path_factory) -> Path:
    """The test user model trained on digits as the compress command reads them (as stored)."""
    import sys

    from safetensors.torch import save_file

    from compress.passes.base import PassContext
    from compress.passes.finetune import evaluate_accuracy, train
    from nas.data import load_dataset

    sys.path.insert(0, str(Path(__file__).parent))
    from user_models import resnet_cnn

    data = load_dataset("digits", seed=0, standardize=False)
    torch.manual_seed(0)
    model = resnet_cnn(num_classes=10, in_channels=1)
    train(model, PassContext(data=data, seed=0), epochs=2, lr=1e-2)
    assert evaluate_accuracy(model, data.x_val, data.y_val) > 0.5
    path = tmp_path_factory.mktemp("collapse") / "cnn.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_a_zeroed_model_is_flagged_in_metrics_console_show_and_report(trained_weights, tmp_path, capsys) -> None:
    policy = tmp_path / "zero.json"
    policy.write_text(json.dumps({"passes": [{"pass": "unstructured", "sparsity": 0.999}]}))  # no fine-tuning
    out = tmp_path / "out"
    args = ["compress", "--model", BUILDER, "--weights", str(trained_weights), "--dataset", "digits",
            "--out", str(out), "--policy", str(policy)]
    assert main(args) == 0, capsys.readouterr().err
    console = capsys.readouterr().out
    row = pd.read_csv(out / "compress.csv").iloc[0]
    assert row.status == "complete" and row.collapsed == 1.0 and row.base_val_acc > 0.5
    assert row.val_acc <= collapse_threshold(row.chance_acc)
    assert row.large_drop == 1.0 and row.drop_limit == 5.0  # said once, as the collapse it is
    assert "large drop:" not in console
    assert console.count(f"trial {int(row.number)} collapsed: accuracy at chance") == 2, console  # on_result + summary
    assert "warning:" in console
    kept = next((out / "compressed").glob("*/policy.json"))
    assert any(n.startswith("collapsed:") for n in json.loads(kept.read_text())["notes"])

    assert main(["show", str(out)]) == 0
    assert "collapsed: accuracy at chance" in capsys.readouterr().out

    assert main(["report", str(out), "--no-png"]) == 0
    html = next((out / "report").glob("*.html")).read_text()
    assert "collapsed trial(s)" in html and "collapsed: accuracy at chance" in html
