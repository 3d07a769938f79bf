"""Search on small data (#22): the batch cut to the training split, cross-validated trials,
ties broken by validation loss, a settable validation share, and chance-level warnings.

The data: 30 of scikit-learn's digits, 10 each of classes 0-2, as a user's .npz file; its
splits hold 18 train / 6 val / 6 test samples."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from nas.chance import at_chance, chance_level
from nas.crossval import cv_folds, default_cv
from nas.trainer import capped_batch_size
from nas.training import TrainingEvaluator
from nas_run.cli import main
from search_spaces import ConfigError, get_space


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory) -> Path:
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(0)
    idx = np.concatenate([rng.choice(np.flatnonzero(d.target == c), 10, replace=False) for c in range(3)])
    path = tmp_path_factory.mktemp("small") / "digits30.npz"
    np.savez(path, x=(d.images[idx] / 16).astype(np.float32), y=d.target[idx])
    return path


def _evaluator(path: Path, **kw) -> TrainingEvaluator:
    options = dict(get_space("nb201").tiny().options)
    return TrainingEvaluator(space="nb201", space_options=options, dataset=str(path), measure_latency=False, **kw)


def _genotype():
    return get_space("nb201").from_str(
        "nb201@1|edges=(nor_conv_3x3,skip_connect,nor_conv_1x1,avg_pool_3x3,nor_conv_3x3,skip_connect)"
    )


# -- the batch size ---------------------------------------------------------------------------------


def test_batch_is_cut_so_an_epoch_takes_several_steps_but_never_below_8():
    assert capped_batch_size(64, 30) == 8  # 30 // 8 = 3 would be noise for BatchNorm: 8
    assert capped_batch_size(64, 200) == 25  # 8 steps per epoch
    assert capped_batch_size(64, 1079) == 64  # digits: as asked
    assert capped_batch_size(16, 1000) == 16  # never raised
    assert capped_batch_size(64, 5) == 5  # fewer samples than 8: one batch of all


def test_trial_records_the_cut_batch_and_val_loss(small_npz):
    metrics = _evaluator(small_npz, cv=1)(_genotype(), 2, lambda e, m: None)
    assert metrics["batch_size"] == 8.0  # 18 training samples: 64 -> 8
    assert 0 < metrics["val_loss"] < 10 and "folds" not in metrics


# -- cross-validation -------------------------------------------------------------------------------


def test_folds_partition_the_pool_and_fold_0_is_the_runs_own_split(small_npz):
    data = _evaluator(small_npz).data()
    folds = cv_folds(data, 3)
    assert folds[0] is data
    pool = np.concatenate([data.x_train.index, data.x_val.index])
    validated = np.concatenate([f.x_val.index for f in folds])
    assert sorted(validated.tolist()) == sorted(pool.tolist())  # every sample validated exactly once
    for f in folds:
        assert not set(f.x_train.index) & set(f.x_val.index)
        assert sorted(np.concatenate([f.x_train.index, f.x_val.index]).tolist()) == sorted(pool.tolist())
        assert set(f.y_val.tolist()) == {0, 1, 2}  # stratified
        np.testing.assert_array_equal(f.y_val, np.asarray([data_label(data, i) for i in f.x_val.index]))


def data_label(data, raw_row):
    where = {int(r): int(y) for r, y in zip(np.concatenate([data.x_train.index, data.x_val.index]),
                                            np.concatenate([data.y_train, data.y_val]), strict=True)}
    return where[int(raw_row)]


def test_default_cv_turns_on_below_1000_samples_only(small_npz):
    from helpers import digits

    assert default_cv(_evaluator(small_npz).data()) == 5
    assert default_cv(digits()) == 1  # 1,438 train+val samples


def test_too_many_folds_is_a_config_error_naming_what_fits(small_npz):
    with pytest.raises(ConfigError, match="--cv 7 or fewer"):
        cv_folds(_evaluator(small_npz).data(), 9)


def test_cross_validated_trial_reports_fold_means_and_keeps_the_cv1_model(small_npz, tmp_path):
    from safetensors.numpy import load_file

    g = _genotype()
    reports: list[dict] = []
    cv3 = _evaluator(small_npz, cv=3, weights_dir=str(tmp_path / "cv3"), with_test=True)
    metrics = cv3(g, 2, lambda e, m: reports.append(dict(m, epoch=e)))
    assert metrics["folds"] == 3.0 and metrics["val_acc_std"] >= 0
    assert [r["epoch"] for r in reports] == [1, 2] and all(r["folds"] == 3.0 for r in reports)  # per-epoch means
    assert metrics["val_acc"] == reports[-1]["val_acc"] and metrics["val_loss"] == reports[-1]["val_loss"]
    one = _evaluator(small_npz, cv=1, weights_dir=str(tmp_path / "cv1"), with_test=True)
    single = one(g, 2, lambda e, m: None)
    # fold 0 is the run's own split, trained from the same seeded init: the kept weights are cv = 1's
    a, b = load_file(str(cv3.weights_path(g, 2))), load_file(str(one.weights_path(g, 2)))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert metrics["test_acc"] == single["test_acc"]


# -- ties -------------------------------------------------------------------------------------------


def test_ties_in_val_acc_go_to_the_lower_val_loss(tmp_path):
    from nas.objectives import parse_objectives
    from nas.store import RunStore
    from nas.trial import Candidate, TrialResult

    store = RunStore(f"sqlite:///{tmp_path}/study.db", parse_objectives("val_acc"))
    records = [
        {"number": 0, "metrics": {"val_acc": 0.8, "val_loss": 0.9}},
        {"number": 1, "metrics": {"val_acc": 0.8, "val_loss": 0.4}},
        {"number": 2, "metrics": {"val_acc": 0.7, "val_loss": 0.1}},  # lower loss, lower accuracy: last
        {"number": 3, "metrics": {"val_acc": 0.8}},  # no loss recorded (an older run): after those with one
    ]
    assert [r["number"] for r in store.ranked(records)] == [1, 0, 3, 2]
    g = _genotype()
    for rec in records:
        n = store.start(g.to_str(), g.id, 1, "random", 0)
        store.finish(Candidate(g, 1, n), TrialResult("complete", dict(rec["metrics"])))
    assert store.pareto()["number"].tolist() == [1, 0, 3]  # the front's "best" row too


def test_export_and_train_picks_break_ties_by_val_loss():
    from export.run_folder import final_trained

    recs = [
        {"number": 5, "stage": "train", "status": "complete", "metrics": {"val_acc": 0.9, "val_loss": 0.5}},
        {"number": 6, "stage": "train", "status": "complete", "metrics": {"val_acc": 0.9, "val_loss": 0.2}},
        {"number": 7, "stage": "train", "status": "complete", "metrics": {"val_acc": 0.9, "val_loss": 0.3}},
    ]
    assert final_trained(None, recs)["number"] == 6


# -- chance level -----------------------------------------------------------------------------------


def test_chance_level_is_the_majority_share():
    y = np.array([0, 0, 0, 1, 2, 2])
    assert chance_level(y) == 0.5
    assert at_chance(0.5, y) and at_chance(0.51, y) and not at_chance(0.6, y)


def test_chance_level_trials_are_warned_about_each_and_at_the_end(tmp_path):
    import io

    from nas.objectives import parse_objectives
    from nas.store import RunStore
    from nas.trial import Candidate, TrialResult
    from nas_run.progress import Progress

    store = RunStore(f"sqlite:///{tmp_path}/study.db", parse_objectives("val_acc"))
    out = io.StringIO()
    progress = Progress(stream=out)
    g = _genotype()
    for acc, stuck in ((0.34, 1.0), (0.33, 1.0), (0.9, 0.0)):
        n = store.start(g.to_str(), g.id, 1, "random", 0)
        result = TrialResult("complete", {"val_acc": acc, "chance_acc": 0.33, "at_chance": stuck})
        store.finish(Candidate(g, 1, n), result)
        progress.on_result(Candidate(g, 1, n), result)
    lines = out.getvalue().splitlines()
    assert sum("at chance level" in line for line in lines) == 2
    assert "trial 0 is at chance level" in out.getvalue() and "trial 2 is at chance" not in out.getvalue()
    progress.summary(SimpleNamespace(out=tmp_path, config=SimpleNamespace(trials=3, storage=None), store=store))
    assert "2 of 3 trials ended at chance level: too few steps? (batch size, epochs)" in out.getvalue()


def test_a_trained_trial_records_whether_it_is_at_chance(small_npz):
    # lr so small that 1 epoch of 3 steps moves nothing: this seed's untrained net answers one class
    stuck = _evaluator(small_npz, cv=1, lr=1e-7, seed=1)(_genotype(), 1, lambda e, m: None)
    assert stuck["chance_acc"] == pytest.approx(1 / 3)
    assert stuck["val_acc"] == pytest.approx(1 / 3) and stuck["at_chance"] == 1.0
    trained = _evaluator(small_npz, cv=1, seed=1)(_genotype(), 4, lambda e, m: None)
    assert trained["val_acc"] > 0.5 and trained["at_chance"] == 0.0


# -- the validation share and the command line ------------------------------------------------------


def test_val_fraction_changes_the_split_sizes(small_npz):
    default, larger = _evaluator(small_npz).data(), _evaluator(small_npz, val_fraction=0.4).data()
    assert (len(default.y_val), len(default.y_train)) == (6, 18)
    assert (len(larger.y_val), len(larger.y_train)) == (12, 12)
    assert len(larger.y_test) == len(default.y_test) == 6


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--val-fraction", "1.5"], "val_fraction must be a number strictly between 0 and 1"),
        (["--cv", "0"], "cv must be a positive integer"),
        (["--batch-size", "0"], "batch_size must be a positive integer"),
        (["--cv", "12"], "--cv 7 or fewer"),
    ],
)
def test_bad_small_data_flags_are_one_line_errors(small_npz, tmp_path, capsys, args, message):
    assert main(["search", "--dataset", str(small_npz), "--out", str(tmp_path / "r"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r" / "config.json").exists()


def test_search_flags_end_to_end_and_later_verbs_use_the_same_split(small_npz, tmp_path, capsys):
    from compress.run import search_run_evaluator
    from nas.search import open_store, read_config

    out = tmp_path / "run"
    argv = ["search", "--dataset", str(small_npz), "--space", "nb201", "--strategy", "random", "--trials", "2",
            "--epochs", "1", "--batch-size", "32", "--val-fraction", "0.3", "--cv", "3", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "batch size 32 -> 8: 15 training samples" in printed  # 30 - 6 test - 9 val
    assert "cross-validation" not in printed  # asked for explicitly: nothing to announce
    saved = json.loads((out / "config.json").read_text())
    assert (saved["batch_size"], saved["val_fraction"], saved["cv"]) == (32, 0.3, 3)
    records = open_store(out, read_only=True).records()
    assert len(records) == 2
    for r in records:
        m = r["metrics"]
        assert m["folds"] == 3.0 and "val_acc_std" in m and m["batch_size"] == 8.0 and "val_loss" in m
    # compress --run (and export, train) reload the run's data with its validation share
    cfg = read_config(out)
    space = get_space(cfg.space, **dict(cfg.space_options)).tiny()
    assert len(search_run_evaluator(cfg, out, space).data().y_val) == 9
    # a resume takes cv and the split from the folder
    assert main(["search", "--resume", str(out), "--trials", "3"]) == 0
    records = open_store(out, read_only=True).records()
    assert len(records) == 3 and records[-1]["metrics"]["folds"] == 3.0


def test_default_cv_is_announced_and_written_to_the_config(small_npz, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["search", "--dataset", str(small_npz), "--space", "nb201", "--strategy", "random",
                 "--trials", "1", "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "cross-validation: 5 folds (24 train+val samples, under 1,000)" in printed
    assert "batch size 64 -> 8: 18 training samples" in printed
    assert json.loads((out / "config.json").read_text())["cv"] == 5


def test_a_run_made_before_cv_existed_resumes_without_it(small_npz, tmp_path):
    from nas.search import read_config

    out = tmp_path / "old"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"space": "nb201", "dataset": str(small_npz)}))
    assert read_config(out).cv == 1
