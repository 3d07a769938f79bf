"""A driver killed at any write of the search loop resumes to the run it would have finished.

The kill -9 test in test_search_run.py hits whichever instant the timing gives; these tests stop
the controller at each store write in turn (before and after the write lands), build a new
controller on the same files, and compare the finished run with one that was never stopped.
"""

from __future__ import annotations

import pytest

from nas.controller import SearchController
from nas.objectives import parse_constraints, parse_objectives
from nas.runners.local import run_local
from nas.store import RunStore
from nas.strategies.base import make_strategy
from search_spaces import get_space

N_TRIALS = 6
CONSTRAINT = "params<=300"  # rejects 2 of the 8 proposals of this seed


class Killed(BaseException):
    """Stands for kill -9: not an Exception, so nothing in the loop catches it."""


def evaluate(genotype, budget, report):
    convs = sum(e.startswith("nor_conv") for e in genotype["edges"])
    for epoch in range(1, budget + 1):
        report(epoch, {"val_acc": 0.1 * epoch})
    return {"val_acc": convs / 6, "params": 100.0 * convs}


def static_metrics(genotype):
    return {"params": 100.0 * sum(e.startswith("nor_conv") for e in genotype["edges"])}


def make_controller(folder, strategy="evolution"):
    objs, cons = parse_objectives("val_acc,params"), parse_constraints([CONSTRAINT])
    store = RunStore(f"sqlite:///{folder}/study.db", objs, cons)
    space = get_space("nb201")
    return SearchController(
        make_strategy(strategy, space, n_objectives=len(objs), seed=3),
        store,
        budget=2,
        n_trials=N_TRIALS,
        seed=3,
        state_path=folder / "state.json",
        static_metrics=static_metrics,
    )


def kill_at(store, method, call, after):
    """Make `store.method` raise Killed at its `call`-th use, before or after the real write."""
    real, seen = getattr(store, method), [0]

    def wrapped(*args, **kwargs):
        seen[0] += 1
        if seen[0] == call and not after:
            raise Killed
        out = real(*args, **kwargs)
        if seen[0] == call and after:
            raise Killed
        return out

    setattr(store, method, wrapped)


def trials(folder):
    return RunStore(f"sqlite:///{folder}/study.db", parse_objectives("val_acc,params")).dataframe()


def proposals(df):
    """The run's rows in order, without the bookkeeping rows of interrupted trials."""
    return [(r.genotype, r.status) for r in df.itertuples() if not r.error.startswith("interrupted")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    runs = {}
    for strategy in STRATEGIES:
        folder = tmp_path_factory.mktemp(f"reference-{strategy}")
        run_local(make_controller(folder, strategy), evaluate)
        df = trials(folder)
        assert (df.status == "complete").sum() == N_TRIALS
        assert (df.status == "rejected").any()  # the kill points below cover the rejection path
        runs[strategy] = proposals(df)
    return runs


STRATEGIES = ("random", "evolution", "tpe", "nsga2", "surrogate")
KILL_POINTS = [("start", c) for c in range(1, 9)] + [("finish", c) for c in range(1, 6)]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_kill_at_any_store_write_resumes_to_the_same_run(tmp_path, reference, strategy):
    for method, call in KILL_POINTS:
        for after in (False, True):
            folder = tmp_path / f"{method}-{call}-{after}"
            folder.mkdir()
            controller = make_controller(folder, strategy)
            kill_at(controller.store, method, call, after)
            with pytest.raises(Killed):
                run_local(controller, evaluate)

            run_local(make_controller(folder, strategy), evaluate)

            df, where = trials(folder), f"killed {'after' if after else 'before'} {method} #{call}"
            done = df[df.status == "complete"]
            assert len(done) == N_TRIALS, where  # nothing lost
            assert done.genotype.is_unique, where  # nothing trained twice
            # the strategy went on exactly where it stopped, and nothing was rejected twice
            assert proposals(df) == reference[strategy], where
            assert (done.params <= 300).all(), where  # a kill mid-rejection trains no too-big model


def test_a_second_kill_before_the_requeued_trial_runs_loses_nothing(tmp_path, reference):
    first = make_controller(tmp_path)
    kill_at(first.store, "start", 3, after=True)
    with pytest.raises(Killed):
        run_local(first, evaluate)
    second = make_controller(tmp_path)  # requeues the interrupted trial ...
    assert second.requeued
    kill_at(second.store, "start", 1, after=False)  # ... and dies before running it
    with pytest.raises(Killed):
        run_local(second, evaluate)

    run_local(make_controller(tmp_path), evaluate)
    assert proposals(trials(tmp_path)) == reference["evolution"]
