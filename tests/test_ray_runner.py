"""Ray Tune runner: MO-ASHA's promotion rule (pure), and real local Ray runs that train tiny
NB201 cells on digits: ASHA stops some trials early, crashes become failed records."""

from __future__ import annotations

import json
import math
import os
import pickle
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nas.controller import SearchController
from nas.objectives import parse_objectives
from nas.pareto import pareto_mask
from nas.runners.mo_asha import Rungs, milestones, promote
from nas.store import RunStore
from nas.strategies.base import make_strategy
from nas.trial import Candidate, Reporter, TrialResult
from search_spaces import Genotype, get_space
from search_spaces.errors import ConfigError, UnknownNameError

# -- promote: the MO-ASHA decision, without Ray ---------------------------------------------------


def test_dominated_point_is_stopped() -> None:
    rung = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    assert not promote(rung, 3, 2)  # dominated by all three others; only 4 // 2 = 2 go on
    assert promote(rung, 0, 2)


def test_nondominated_point_continues() -> None:
    rung = np.array([[0.0, 3.0], [3.0, 0.0], [2.0, 2.0], [2.5, 2.5], [2.6, 2.6], [2.7, 2.7]])
    for i in (0, 1):  # the front's extreme points: nothing is better by rank or crowding
        assert promote(rung, i, 3)
    assert not promote(rung, 5, 3)


def test_fewer_results_than_reduction_factor_continue() -> None:
    rung = np.array([[0.0, 0.0], [5.0, 5.0]])
    assert promote(rung, 1, 3)  # dominated, but 2 results cannot say which third is best


def test_ties_in_a_front_are_broken_by_crowding() -> None:
    # one front of four: the two extremes have infinite crowding distance and take both places
    rung = np.array([[0.0, 4.0], [1.0, 3.0], [1.1, 2.9], [4.0, 0.0]])
    assert promote(rung, 0, 2) and promote(rung, 3, 2)
    assert not promote(rung, 1, 2) and not promote(rung, 2, 2)


def test_non_finite_results_rank_last() -> None:
    rung = np.array([[np.nan, 1.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    assert not promote(rung, 0, 2)


def test_single_objective_matches_asha_quantile() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        n, rf = int(rng.integers(1, 12)), int(rng.integers(2, 5))
        x = rng.normal(size=n)
        for i in range(n):
            expected = n < rf or int((x < x[i]).sum()) < n // rf
            assert promote(x[:, None], i, rf) == expected


def test_front_members_survive_when_the_front_is_small() -> None:
    # oracle: with at most n // rf points on the front, every front point continues
    rng = np.random.default_rng(1)
    for _ in range(50):
        pts = rng.random((int(rng.integers(3, 15)), 2))
        front = np.flatnonzero(pareto_mask(pts))
        if len(front) <= len(pts) // 2:
            assert all(promote(pts, int(i), 2) for i in front)


def test_promote_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        promote(np.zeros(3), 0, 2)
    with pytest.raises(IndexError):
        promote(np.zeros((2, 2)), 2, 2)
    with pytest.raises(ValueError):
        promote(np.zeros((2, 2)), 0, 1)


def test_milestones_are_below_max_t() -> None:
    assert milestones(1, 2, 4) == [1, 2]
    assert milestones(1, 3, 27) == [1, 3, 9]
    assert milestones(2, 2, 2) == []


def test_rungs_decide_once_per_rung_and_fill_missing_objectives() -> None:
    objectives = parse_objectives("val_acc,params")
    rungs = Rungs(objectives, max_t=8, grace_period=1, reduction_factor=2)
    calls: list[str] = []

    def fill(params: float) -> Any:
        def f() -> Mapping[str, float]:
            calls.append("fill")
            return {"params": params}

        return f

    assert rungs.decide("a", 1, {"val_acc": 0.9}, fill(100.0))  # first at rung 1
    assert not rungs.decide("b", 1, {"val_acc": 0.5}, fill(200.0))  # dominated by a
    assert rungs.decide("c", 1, {"val_acc": 0.5}, fill(50.0))  # fewer params: on the front
    assert calls == ["fill"] * 3
    assert rungs.decide("a", 1, {"val_acc": 0.1})  # decided already at rung 1
    assert rungs.decide("a", 1.5, {"val_acc": 0.1})  # no new rung reached
    assert set(rungs.records[1]) == {"a", "b", "c"} and not rungs.records[2]


# -- a real local Ray ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """One local Ray for this module's runs (starting it costs ~10 s on 2 cores); run_ray
    leaves a Ray it did not start running."""
    ray = pytest.importorskip("ray")
    # The evaluators below live in this test module, which workers cannot import: ship by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING"
    )
    yield
    ray.shutdown()


def _space() -> Any:
    return get_space("nb201").tiny()


def _evaluator() -> Any:
    from nas.training import TrainingEvaluator

    space = _space()
    # 8 batches of 64 per epoch: about a second per trial, accuracies still differ by genotype
    return TrainingEvaluator(
        space="nb201", space_options=dict(space.options), dataset="digits", max_train_batches=8
    )


def _controller(tmp_path: Path, objectives: str, budget: int, n_trials: int) -> SearchController:
    objs = parse_objectives(objectives)
    store = RunStore(f"sqlite:///{tmp_path}/study.db", objs)
    strategy = make_strategy("random", _space(), n_objectives=len(objs), seed=0)
    return SearchController(
        strategy, store, budget=budget, n_trials=n_trials, seed=0, state_path=tmp_path / "state.json"
    )


def test_asha_stops_trials_early_and_records_all(ray_local: None, tmp_path: Path) -> None:
    from nas.runners.ray_tune import run_ray

    ctl = _controller(tmp_path, "val_acc", budget=4, n_trials=6)
    seen: list[tuple[Candidate, TrialResult]] = []
    run_ray(
        ctl,
        _evaluator(),
        max_concurrent=2,
        cpus_per_trial=1,
        scheduler="asha",
        grace_period=1,
        reduction_factor=2,
        storage_path=tmp_path / "ray",
        on_result=lambda c, r: seen.append((c, r)),
    )

    records = ctl.store.records()
    assert len(records) == 6 and len(seen) == 6
    assert {r["status"] for r in records} <= {"complete", "stopped"}
    assert not ctl.in_flight and ctl.remaining() == 0
    stopped = [r for _, r in seen if r.status == "stopped"]
    assert stopped, "ASHA stopped no trial"
    for r in stopped:
        assert 1 <= len(r.history) < 4 and "val_acc" in r.metrics
        assert [h["epoch"] for h in r.history] == list(range(1, len(r.history) + 1))
    for _, r in seen:
        if r.status == "complete":  # every metric of the final report came through
            assert {"val_acc", "params", "flops", "latency_ms"} <= set(r.metrics)
            assert len(r.history) == 4
    # the store holds the same: stopped trials are PRUNED with their partial history
    assert sum(r["state"] == "PRUNED" for r in records) == len(stopped)


@dataclass(frozen=True)
class CrashingEvaluator:
    """Wraps an evaluator: raises on some genotypes, kills its worker process on others."""

    inner: Any
    raise_on: tuple[str, ...] = ()
    exit_on: tuple[str, ...] = ()

    def __call__(self, genotype: Genotype, budget: int, report: Reporter) -> dict[str, float]:
        if genotype.to_str() in self.raise_on:
            raise ValueError("this cell is cursed")
        if genotype.to_str() in self.exit_on:
            os._exit(3)  # a segfault or the OOM killer, seen from Tune: the worker is gone
        return self.inner(genotype, budget, report)


def test_crashes_are_recorded_as_failed_and_the_run_completes(ray_local: None, tmp_path: Path) -> None:
    from nas.runners.ray_tune import run_ray

    # the controller's random strategy proposes this same sequence (same space and seed)
    twin = make_strategy("random", _space(), n_objectives=2, seed=0)
    order = [twin.ask().to_str() for _ in range(4)]
    evaluator = CrashingEvaluator(_evaluator(), raise_on=(order[0],), exit_on=(order[2],))
    ctl = _controller(tmp_path, "val_acc,params", budget=2, n_trials=4)
    run_ray(ctl, evaluator, max_concurrent=2, storage_path=tmp_path / "ray")  # 2 objectives: MO-ASHA

    by_genotype = {r["genotype"]: r for r in ctl.store.records()}
    assert list(by_genotype) == order or set(by_genotype) == set(order)
    assert by_genotype[order[0]]["status"] == "failed"
    assert "ValueError" in by_genotype[order[0]]["error"] and "cursed" in by_genotype[order[0]]["error"]
    # the dead worker's trial: Tune's error text, handed over by the runner's callback
    assert by_genotype[order[2]]["status"] == "failed" and by_genotype[order[2]]["error"].startswith("ray: ")
    for g in (order[1], order[3]):
        assert by_genotype[g]["status"] in ("complete", "stopped")
    assert by_genotype[order[0]]["state"] == "FAIL" and not ctl.in_flight


def _epoch(epoch: int, acc: float) -> dict[str, Any]:
    """A per-epoch result as Tune hands it to the searcher (trainable keys plus Tune's own)."""
    return {
        "epoch": epoch,
        "val_acc": acc,
        "params": math.nan,
        "trial_status": "running",
        "metrics_json": json.dumps({"val_acc": acc, "train_loss": 1.0}),
        "training_iteration": epoch,
        "time_total_s": 0.5 * epoch,
    }


def test_searcher_tells_finished_stopped_and_interrupted_trials_apart(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    from nas.runners.ray_tune import controller_searcher

    ctl = _controller(tmp_path, "val_acc,params", budget=4, n_trials=3)
    searcher = controller_searcher(ctl, static=lambda g: {"params": 123.0, "flops": 9.0})
    configs = [searcher.suggest(f"t{i}") for i in range(3)]
    assert searcher.suggest("t3") is None  # all started, but not FINISHED while they run: a
    # trial lost with its worker is run again (see test_ray_worker_death.py)
    for c in configs:  # only plain values travel to workers
        assert set(c) == {"genotype", "budget", "number", "policy", "parent"}
        assert {type(v) for v in c.values()} <= {str, int}

    # t0 runs to the end: its summary report is the record
    history = [{"epoch": float(e), "val_acc": 0.2 * e, "train_loss": 1.0} for e in range(1, 5)]
    for e in (1, 2, 3):
        searcher.on_trial_result("t0", _epoch(e, 0.2 * e))
    metrics = {"val_acc": 0.8, "params": 50.0, "latency_ms": 1.5}
    final = {
        **metrics,
        "trial_status": "complete",
        "error": "",
        "duration_s": 2.0,
        "metrics_json": json.dumps(metrics),
        "history_json": json.dumps(history),
    }
    searcher.on_trial_result("t0", final)
    searcher.on_trial_complete("t0", final)
    # t1: a scheduler stops it on epoch 2, a result the searcher sees only on completion
    searcher.on_trial_result("t1", _epoch(1, 0.3))
    searcher.on_trial_complete("t1", _epoch(2, 0.35))
    # t2: Tune ends it on a result already seen (Ctrl-C): not a result, left open for resume
    searcher.on_trial_result("t2", _epoch(1, 0.1))
    searcher.on_trial_complete("t2", _epoch(1, 0.1))

    recs = {r["number"]: r for r in ctl.store.records()}
    n0, n1, n2 = (c["number"] for c in configs)
    assert recs[n0]["status"] == "complete" and recs[n0]["metrics"] == metrics
    assert recs[n1]["status"] == "stopped" and recs[n1]["state"] == "PRUNED"
    # static params complete the stopped trial's metrics, so the strategy can rank it
    assert recs[n1]["metrics"] == {"val_acc": 0.35, "train_loss": 1.0, "params": 123.0}
    assert [h[1] for h in ctl.strategy.history[1:2]] == [(-0.35, 123.0)]
    assert recs[n2]["status"] == "running" and n2 in ctl.in_flight
    assert [c.number for c in searcher.interrupted] == [n2]
    assert searcher.suggest("t4") == "FINISHED"  # nothing runs any more


def test_scheduler_is_checked_and_mo_asha_pickles(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    from nas.runners.mo_asha import make_mo_asha
    from nas.runners.ray_tune import SpaceParser, run_ray

    ctl = _controller(tmp_path, "val_acc", budget=2, n_trials=1)
    with pytest.raises(UnknownNameError):
        run_ray(ctl, _evaluator(), scheduler="hyperband")
    sched = make_mo_asha(parse_objectives("val_acc,latency_ms"), max_t=9, reduction_factor=3)
    again = pickle.loads(pickle.dumps(sched))  # Tune pickles its scheduler with the experiment
    assert type(again) is type(sched) and list(again.rungs.records) == [1, 3]
    parse = pickle.loads(pickle.dumps(SpaceParser("nb201", dict(_space().options))))
    g = _space().sample(np.random.default_rng(0))
    assert parse(g.to_str()) == g


def test_asking_for_more_gpus_than_ray_has_is_a_config_error(ray_local: None, tmp_path: Path) -> None:
    from nas.runners.ray_tune import run_ray

    ctl = _controller(tmp_path, "val_acc", budget=1, n_trials=1)
    with pytest.raises(ConfigError, match="GPU"):
        run_ray(ctl, _evaluator(), gpus_per_trial=1.0, storage_path=tmp_path / "ray")
    assert ctl.store.records() == []  # refused before any trial was opened


def test_run_search_with_the_ray_runner(ray_local: None, tmp_path: Path) -> None:
    """The path `nas-run search --runner ray` takes: config -> run folder -> Tune trials."""
    from nas.config import SearchConfig
    from nas.search import run_search

    cfg = SearchConfig(
        space="nb201",
        dataset="digits",
        strategy="evolution",
        trials=3,
        epochs=1,
        runner="ray",
        max_concurrent=2,
        out=str(tmp_path / "run"),
    )
    run = run_search(cfg)
    df = run.store.dataframe()
    assert len(df) == 3 and set(df.status) <= {"complete", "stopped"}
    assert (run.out / "ray").is_dir() and (run.out / "pareto.csv").exists()


def test_a_run_refused_before_its_first_trial_leaves_no_folder(ray_local: None, tmp_path: Path) -> None:
    from nas.config import SearchConfig
    from nas.search import run_search

    cfg = SearchConfig(
        space="nb201", dataset="digits", trials=1, epochs=1, runner="ray", gpus_per_trial=1.0,
        out=str(tmp_path / "run"),
    )  # fmt: skip
    with pytest.raises(ConfigError, match="GPU"):
        run_search(cfg)
    assert not (tmp_path / "run").exists()  # the corrected command may use the same --out


@pytest.mark.slow  # Ray start-up and two real trainings per child: the CI's slow step
def test_ray_trials_with_asha_inherit_through_the_trial_config(ray_local: None, tmp_path: Path) -> None:
    from nas.config import SearchConfig
    from nas.search import run_search

    cfg = SearchConfig(space="nb201", dataset="digits", batch_size=128, epochs=2, inherit=True, inherit_epochs=1,
                       strategy="evolution", strategy_options={"population": 2, "sample": 1}, trials=6, runner="ray",
                       scheduler="asha", max_concurrent=2, out=str(tmp_path / "run"))
    df = run_search(cfg).store.dataframe()
    assert len(df) == 6 and set(df.status) <= {"complete", "stopped"}
    children = df[df.parent.notna()]
    assert len(children) >= 1 and (children.budget == 1).all()
    # the worker got the parent: it reports what carried over
    assert (children[children.status == "complete"].inherited == 1).all()
    parents = df.set_index("number").loc[children.parent.astype(int)]
    assert (parents.status == "complete").all()  # an ASHA-stopped trial kept no weights: nobody's parent
