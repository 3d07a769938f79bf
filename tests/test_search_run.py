"""The search loop end to end: store records, failures, constraints, kill -9 and resume."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from nas.config import SearchConfig
from nas.controller import SearchController
from nas.objectives import parse_constraints, parse_objectives
from nas.runners.local import run_local
from nas.search import run_search
from nas.store import RunStore
from nas.strategies.base import make_strategy
from search_spaces import get_space

FAST = dict(space="nb201", dataset="digits", epochs=1, batch_size=128)


@dataclass(frozen=True)
class FlakyEvaluator:
    """Crashes on some genotypes and returns NaN on others; fine on the rest."""

    def __call__(self, genotype, budget, report):
        edges = genotype["edges"]
        if edges[0] == "none":
            raise RuntimeError("boom: simulated crash")
        if edges[0] == "skip_connect":
            return {"val_acc": float("nan"), "params": 1.0}
        if edges[0] == "avg_pool_3x3":
            raise MemoryError("simulated: could not allocate tensor")
        for epoch in range(1, budget + 1):
            report(epoch, {"val_acc": 0.1 * epoch})
        return {"val_acc": sum(e.startswith("nor_conv") for e in edges) / 6, "params": 100.0}


def make_controller(tmp_path, n_trials=12, objectives="val_acc,params", constraints=None, static=None):
    space = get_space("nb201")
    objs, cons = parse_objectives(objectives), parse_constraints(constraints)
    store = RunStore(f"sqlite:///{tmp_path}/study.db", objs, cons)
    strategy = make_strategy("random", space, n_objectives=len(objs), seed=0)
    return SearchController(
        strategy,
        store,
        budget=2,
        n_trials=n_trials,
        seed=0,
        state_path=tmp_path / "state.json",
        static_metrics=static,
    )


def test_crashing_and_nan_trials_are_recorded_as_failed_and_the_search_goes_on(tmp_path):
    ctl = make_controller(tmp_path, n_trials=20)
    run_local(ctl, FlakyEvaluator())
    df = ctl.store.dataframe()
    assert len(df) == 20
    failed = df[df.status == "failed"]
    crashed = failed[failed.error.str.contains("boom")]
    nans = failed[failed.error.str.contains("non-finite")]
    ooms = failed[failed.error.str.startswith("out of memory")]
    assert len(crashed) > 0 and len(nans) > 0 and len(ooms) > 0
    assert (df.status == "complete").sum() == 20 - len(failed)
    assert set(df[df.status == "failed"].state) == {"FAIL"}
    front = ctl.store.pareto()
    assert not front.empty and front.status.eq("complete").all()
    assert not front.val_acc.isna().any()


def test_constraints_are_never_violated_on_the_front_and_cheap_checks_reject(tmp_path):
    def static(g):  # a size proxy known before training
        return {"params": float(sum(e == "nor_conv_3x3" for e in g["edges"]))}

    ctl = make_controller(tmp_path, n_trials=10, constraints="params<=2", static=static)
    run_local(ctl, FlakyEvaluator.__call__.__get__(FlakyEvaluator()))  # plain callable works too
    df = ctl.store.dataframe()
    rejected = df[df.status == "rejected"]
    assert len(rejected) > 0 and rejected.error.str.contains("rejected before training").all()
    assert ctl.counted() == 10
    front = ctl.store.pareto()
    assert (front.violation == 0).all()


def test_real_training_search_writes_a_store_dashboard_can_read(tmp_path):
    cfg = SearchConfig(**FAST, strategy="evolution", trials=3, out=str(tmp_path / "run"))
    run = run_search(cfg)
    df = run.store.dataframe()
    assert list(df.status) == ["complete"] * 3
    for col in ("val_acc", "params", "flops", "latency_ms", "genotype", "genotype_id", "seed", "budget"):
        assert col in df.columns and df[col].notna().all()
    assert ((df.val_acc > 0) & (df.val_acc <= 1)).all()
    import torch

    assert (df.gpu == float(torch.cuda.is_available())).all()  # the device each trial trained on
    assert (run.out / "pareto.csv").exists() and (run.out / "trials.csv").exists()
    # the store is a plain Optuna study: Optuna itself opens it
    import optuna

    study = optuna.load_study(study_name=run.store.study_name, storage=run.store.url)
    assert len(study.trials) == 3 and study.trials[0].user_attrs["versions"]["torch"]
    assert all(math.isfinite(t.values[0]) for t in study.trials)


def test_kill_minus_9_and_resume_loses_and_repeats_nothing(tmp_path, kill_and_resume):
    args = [
        "--space",
        "nb201",
        "--dataset",
        "digits",
        "--strategy",
        "evolution",
        "--trials",
        "6",
        "--epochs",
        "2",
    ]
    before, df = kill_and_resume(args, tmp_path / "run", wait_s=240)
    assert len(before) >= 2

    complete = df[df.status == "complete"]
    assert len(complete) == 6  # nothing lost: exactly the requested evaluations
    for number, row in before.iterrows():  # finished trials kept, untouched
        assert complete.set_index("number").loc[number, "val_acc"] == pytest.approx(row["val_acc"])
    interrupted = df[df.error.str.startswith("interrupted")]
    assert len(interrupted) <= 1
    # nothing repeated: every completed genotype once, except an interrupted one re-run once
    assert complete.genotype.is_unique
    assert set(interrupted.genotype) <= set(complete.genotype)


def test_onnx_runtime_latency_can_be_an_objective(tmp_path):
    cfg = SearchConfig(
        **FAST,
        strategy="random",
        trials=2,
        objectives=("val_acc", "onnx_latency_ms"),
        out=str(tmp_path / "run"),
    )
    df = run_search(cfg).store.dataframe()
    assert (df.status == "complete").all() and (df.onnx_latency_ms > 0).all()


def test_a_second_driver_on_the_same_run_folder_is_refused(tmp_path):
    from nas.search import prepare_run
    from search_spaces import ConfigError

    cfg = SearchConfig(**FAST, strategy="random", trials=1, out=str(tmp_path / "run"))
    first = prepare_run(cfg)
    with pytest.raises(ConfigError, match="another nas-run process"):
        prepare_run(None, resume=first.out)
    first.lock.close()  # the driver ends: the folder can be resumed
    assert prepare_run(None, resume=first.out).controller.remaining() == 1
