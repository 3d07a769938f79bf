"""Cluster faults are not candidate faults: a trial whose Ray worker (or node) died is recorded
"interrupted: ..." (not counted) and its proposal runs again first, up to ``max_retries`` times;
only then, or when the candidate fails on its own, is it a counted failure.

The controller's `retry` is tested without Ray (including resume after a driver kill); the
searcher's handling with Ray imported but not started; and a real local Ray run in which the
test SIGKILLs the worker process of a running trial (about 10 s with Ray's start: not marked
slow, like the runs of test_ray_runner.py)."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nas.controller import SearchController, uses_evaluation
from nas.objectives import parse_objectives
from nas.store import RunStore
from nas.strategies.base import make_strategy
from nas.trial import Candidate, Reporter, TrialResult
from search_spaces import Genotype, get_space

LOST = "ray: Ray worker died (ActorDiedError): the actor is dead"


def _space() -> Any:
    return get_space("nb201").tiny()


def _controller(tmp_path: Path, n_trials: int = 3, objectives: str = "val_acc") -> SearchController:
    objs = parse_objectives(objectives)
    tmp_path.mkdir(parents=True, exist_ok=True)
    store = RunStore(f"sqlite:///{tmp_path}/study.db", objs)
    strategy = make_strategy("random", _space(), n_objectives=len(objs), seed=0)
    return SearchController(
        strategy, store, budget=2, n_trials=n_trials, seed=0, state_path=tmp_path / "state.json"
    )


def _row(ctl: SearchController, number: int) -> dict[str, Any]:
    return next(r for r in ctl.store.records() if r["number"] == number)


# -- the controller, without Ray --------------------------------------------------------------------


def test_retry_records_an_uncounted_row_and_runs_the_proposal_again_first(tmp_path: Path) -> None:
    ctl = _controller(tmp_path, n_trials=3)
    first, second = ctl.next(), ctl.next()
    assert first is not None and second is not None
    told = len(ctl.strategy.history)

    assert ctl.retries_used(first) == 0
    assert ctl.retry(first, LOST, history=[{"epoch": 1.0, "val_acc": 0.2}])
    row = _row(ctl, first.number)
    assert row["status"] == "failed" and row["error"] == f"interrupted: {LOST}"
    assert not uses_evaluation(row["status"], row["error"])
    assert ctl.counted() == 0 and first.number not in ctl.in_flight
    assert len(ctl.strategy.history) == told  # a lost trial teaches the strategy nothing
    assert ctl.remaining() == 2  # 3 trials, one in flight, none counted

    again = ctl.next()  # the lost proposal before any new one
    assert again is not None and again.genotype == first.genotype and again.number > second.number
    assert ctl.retries_used(again) == 1
    ctl.finish(again, TrialResult("complete", {"val_acc": 0.5}))
    assert ctl.counted() == 1


def test_retries_exhausted_become_a_counted_failure_with_the_reason(tmp_path: Path) -> None:
    ctl = _controller(tmp_path, n_trials=2)
    cand = ctl.next()
    assert cand is not None
    assert ctl.retry(cand, LOST, max_retries=1)
    again = ctl.next()
    assert again is not None and again.genotype == cand.genotype
    assert not ctl.retry(again, LOST, max_retries=1)  # the second loss of the same proposal
    row = _row(ctl, again.number)
    assert row["status"] == "failed" and row["error"] == LOST and row["state"] == "FAIL"
    assert ctl.counted() == 1 and not ctl.in_flight
    assert ctl.strategy.history[-1][0] == cand.genotype and ctl.strategy.history[-1][1] is None
    nxt = ctl.next()  # not requeued a third time
    assert nxt is not None and nxt.genotype != cand.genotype

    none = _controller(tmp_path / "zero", n_trials=1)
    c = none.next()
    assert c is not None and not none.retry(c, LOST, max_retries=0)
    assert _row(none, c.number)["error"] == LOST and none.counted() == 1


def test_a_requeued_retry_survives_a_driver_kill(tmp_path: Path) -> None:
    ctl = _controller(tmp_path, n_trials=3)
    cand = ctl.next()
    assert cand is not None
    assert ctl.retry(cand, LOST)
    del ctl  # the driver dies before the proposal ran again (kill -9: nothing more is written)

    again = _controller(tmp_path, n_trials=3)
    assert [g.to_str() for g in again.requeued] == [cand.genotype.to_str()]
    assert again.resumed_told == 0 and again.counted() == 0  # the interrupted row is not a result
    assert again.retries_used(Candidate(cand.genotype, 2, 99)) == 1  # the count was saved too
    nxt = again.next()
    assert nxt is not None and nxt.genotype == cand.genotype
    assert json.loads((tmp_path / "state.json").read_text())["retries"] == {cand.genotype.to_str(): 1}


def test_a_kill_between_saving_and_writing_the_row_requeues_once(tmp_path: Path) -> None:
    ctl = _controller(tmp_path, n_trials=3)
    cand = ctl.next()
    assert cand is not None

    def killed(*args: Any, **kwargs: Any) -> float:
        raise SystemExit("kill -9")  # after `retry` saved its state, before the row is written

    ctl.store.finish = killed  # type: ignore[method-assign]
    with pytest.raises(SystemExit):
        ctl.retry(cand, LOST)
    del ctl

    again = _controller(tmp_path, n_trials=3)  # the row was RUNNING: the store marks it interrupted
    assert [g.to_str() for g in again.requeued] == [cand.genotype.to_str()]  # once, not twice
    assert _row(again, cand.number)["error"].startswith("interrupted")
    assert again.counted() == 0 and again.resumed_told == 0


def test_compression_controller_and_chain_retry(tmp_path: Path) -> None:
    from compress.controller import CompressionController
    from compress.policy_search import ControllerChain

    objs = parse_objectives("val_acc")
    store = RunStore(f"sqlite:///{tmp_path}/c.db", objs)
    g = _space().sample(__import__("numpy").random.default_rng(0))
    ctl = CompressionController(store, [(g, "p1"), (g, "p2")], budget=1, seed=0)
    cand = ctl.next()
    assert cand is not None and cand.policy == "p1"
    assert ctl.retry(cand, LOST, max_retries=1) and ctl.remaining() == 2
    again = ctl.next()
    assert again is not None and again.policy == "p1"  # first again, before p2
    assert not ctl.retry(again, LOST, max_retries=1)
    errors = [r["error"] for r in store.records()]
    assert errors == [f"interrupted: {LOST}", LOST]

    chain = ControllerChain([_controller(tmp_path / "chain", n_trials=2)])
    c = chain.next()
    assert c is not None and chain.retries_used(c) == 0
    assert chain.retry(c, LOST)
    c2 = chain.next()
    assert c2 is not None and c2.genotype == c.genotype and chain.retries_used(c2) == 1


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("abc", "--max-retries must be an integer >= 0, got 'abc'"),
        ("-1", "max_retries must be an integer >= 0, got -1"),
    ],
)
def test_max_retries_flag_is_checked_in_one_line(
    value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from nas.config import SearchConfig
    from nas_run.cli import main

    assert main(["search", "--runner", "ray", "--max-retries", value]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert SearchConfig().max_retries == 2
    assert SearchConfig.from_mapping({"max-retries": 0}).max_retries == 0


# -- the searcher, with Ray imported but not running ------------------------------------------------


def test_lost_reason_tells_infrastructure_from_candidate_failures() -> None:
    rex = pytest.importorskip("ray.exceptions")
    from nas.runners.ray_tune import lost_reason

    assert lost_reason(rex.ActorDiedError()) == "Ray worker died (ActorDiedError)"
    assert lost_reason(rex.WorkerCrashedError()) == "Ray worker crashed (WorkerCrashedError)"
    assert lost_reason(rex.NodeDiedError("gone")) == "Ray node died (NodeDiedError)"
    try:
        raise ValueError("cannot unpickle the evaluator")
    except ValueError as exc:
        task_error = rex.RayTaskError("__init__", "traceback", exc)
    assert lost_reason(task_error) is None  # the trainable itself raised
    assert lost_reason(rex.ActorDiedError(task_error)) is None  # its constructor raised: everywhere
    assert lost_reason(ValueError("x")) is None and lost_reason(None) is None


def test_searcher_retries_a_lost_trial_and_finishes_only_when_nothing_runs(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    from nas.runners.ray_tune import controller_searcher

    ctl = _controller(tmp_path, n_trials=2)
    events: list[str] = []
    results: list[TrialResult] = []
    searcher = controller_searcher(
        ctl, on_result=lambda c, r: results.append(r), max_retries=1, on_event=events.append
    )
    a, b = searcher.suggest("a"), searcher.suggest("b")
    assert isinstance(a, dict) and isinstance(b, dict)
    assert searcher.suggest("c") is None  # all started, but trials run: not FINISHED yet

    searcher.on_trial_complete("a", error=True)
    searcher.record_error("a", "ray: the actor is dead", lost="Ray worker died (ActorDiedError)")
    assert events == [
        f"trial {a['number']} ({ctl.strategy.space.from_str(a['genotype']).id}): "
        "Ray worker died (ActorDiedError); retrying (1/1)"
    ]
    assert results == []  # not a result: the progress lines do not count it
    a2 = searcher.suggest("a2")
    assert isinstance(a2, dict) and a2["genotype"] == a["genotype"] and a2["number"] > b["number"]

    searcher.on_trial_complete("a2", error=True)  # lost again: out of retries
    searcher.record_error("a2", "ray: the actor is dead", lost="Ray worker died (ActorDiedError)")
    assert events[-1].endswith("recorded as failed (after 1 retry)")
    assert [r.status for r in results] == ["failed"] and results[0].error.startswith("ray: Ray worker died")
    assert searcher.suggest("d") is None  # b still runs

    searcher.on_trial_complete("b", error=True)  # a failure in Tune that is not a lost worker
    searcher.record_error("b", "ray: ImportError: no module named x")
    assert _row(ctl, b["number"])["error"] == "ray: ImportError: no module named x"
    assert searcher.suggest("e") == "FINISHED"
    assert ctl.counted() == 2 and len(ctl.store.records()) == 3


# -- a real local Ray: SIGKILL a worker mid-trial -----------------------------------------------------


@dataclass(frozen=True)
class HangOnce:
    """A toy evaluator (a score from the genotype text, no training). The first call for
    ``target``, in whichever worker runs it, writes that worker's pid to ``pid_file`` and
    sleeps until the test kills the process; later calls evaluate it like any other."""

    target: str
    pid_file: str

    def __call__(self, genotype: Genotype, budget: int, report: Reporter) -> dict[str, float]:
        text = genotype.to_str()
        if text == self.target:
            try:
                fd = os.open(self.pid_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass  # the retry: run normally
            else:
                os.write(fd, f"{os.getpid()}\n".encode())
                os.close(fd)
                time.sleep(120)  # SIGKILLed long before this ends
        acc = (zlib.crc32(text.encode()) % 1000) / 1000.0
        for epoch in range(1, budget + 1):
            report(epoch, {"val_acc": acc * epoch / budget, "train_loss": 1.0 / epoch})
        return {"val_acc": acc, "params": float(len(text))}


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING"
    )
    yield
    ray.shutdown()


def _kill_when_written(pid_file: Path, killed: list[int], timeout_s: float = 240) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):  # not there yet, or half written
            time.sleep(0.1)
            continue
        time.sleep(0.5)  # well inside the evaluator's sleep
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        return


def test_a_killed_worker_is_retried_and_the_run_completes(
    ray_local: None, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from nas.runners.ray_tune import SpaceParser, run_ray

    trials = 4
    twin = make_strategy("random", _space(), n_objectives=1, seed=0)  # the controller's sequence
    order = [twin.ask().to_str() for _ in range(trials)]
    target, pid_file = order[1], tmp_path / "worker.pid"
    ctl = _controller(tmp_path, n_trials=trials)
    killed: list[int] = []
    watcher = threading.Thread(target=_kill_when_written, args=(pid_file, killed), daemon=True)
    watcher.start()
    seen: list[tuple[Candidate, TrialResult]] = []
    run_ray(
        ctl,
        HangOnce(target, str(pid_file)),
        parse=SpaceParser("nb201", dict(_space().options)),
        max_concurrent=2,
        scheduler="none",  # every trial runs to its end: "complete" is the only right status
        storage_path=tmp_path / "ray",
        on_result=lambda c, r: seen.append((c, r)),
    )
    watcher.join(timeout=1)
    out, err = capfd.readouterr()

    assert len(killed) == 1, "the evaluator never wrote its pid"
    records = ctl.store.records()
    complete = [r for r in records if r["status"] == "complete"]
    assert len(complete) == trials and ctl.counted() == trials and not ctl.in_flight
    assert {r["genotype"] for r in complete} == set(order)  # the killed candidate ran again
    lost = [r for r in records if r["status"] != "complete"]
    assert len(lost) == 1 and lost[0]["genotype"] == target
    assert lost[0]["error"].startswith("interrupted: ray: Ray worker died (ActorDiedError)")
    assert not uses_evaluation(lost[0]["status"], lost[0]["error"])
    retried = next(r for r in complete if r["genotype"] == target)
    assert retried["number"] > lost[0]["number"] and math.isfinite(retried["metrics"]["val_acc"])
    assert len(seen) == trials and all(r.status == "complete" for _, r in seen)  # progress lines

    console = out + err
    line = re.compile(
        rf"^trial {lost[0]['number']} \(\w+\): Ray worker died \(ActorDiedError\); retrying \(1/2\)$", re.M
    )
    assert len(line.findall(console)) == 1, console
    assert "Traceback" not in console and "Trial task failed" not in console, console
    assert "Trials did not complete" not in console, console
