"""Ray Tune runner: many trials at once, on this machine or a cluster, with early stopping.

The strategy stays on the driver. A Tune `Searcher` wraps the `SearchController`: Tune's
``suggest`` is the controller's ``next`` (ask) and ``on_trial_complete`` its ``finish`` (tell),
the seam Ray Tune shares with Optuna. A trial's config is five plain values (genotype string,
budget, trial number, policy text, parent text for weight inheritance); the evaluator and the genotype parser travel to the workers
once, through `tune.with_parameters`. Each worker runs `run_trial`, so a candidate's crash is a
"failed" record, never a dead run.

Early stopping: the trainable reports every epoch but the last; a scheduler (ASHA on the first
objective, or MO-ASHA on all of them) may stop the trial there, Tune then ends it and the
searcher records it as "stopped" with the last epoch's metrics. A trial that runs to the end
sends one final report with every metric, the per-epoch history and its status.

Lost trials: a trial whose worker process or node died (Ray's `ActorDiedError`,
`WorkerCrashedError`, `NodeDiedError`, ...) is not the candidate's failure: the evaluator's own
exceptions, NaNs and out-of-memory errors never reach Tune, `run_trial` catches them. Its row
is recorded "interrupted: ..." (not counted) and the controller runs the same proposal again
first (`SearchController.retry`), up to ``max_retries`` times; Ray places the new trial on any
live node. The console gets one line per such event instead of Ray's traceback.

This is the only module of the toolkit that imports Ray, and only inside functions.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from search_spaces import ConfigError, Genotype, UnknownNameError, get_space

from ..controller import SearchController
from ..trial import Candidate, Evaluator, TrialResult, run_trial
from .mo_asha import make_mo_asha

__all__ = ["SCHEDULERS", "SpaceParser", "controller_searcher", "lost_reason", "run_ray"]

SCHEDULERS = {
    "asha": "asynchronous successive halving on the first objective (Li et al. 2020)",
    "mo-asha": "multi-objective ASHA: non-dominated sorting at each rung (Schmucker et al. 2021)",
    "none": "no early stopping: every trial trains its full budget",
}
_FINAL = ("complete", "failed", "stopped", "rejected")  # trial_status of a trial's last report


@dataclass(frozen=True)
class SpaceParser:
    """Genotype string -> genotype, by space name and options: small and picklable, so it can
    be shipped to workers instead of a space object."""

    space: str
    space_options: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, text: str) -> Genotype:
        return get_space(self.space, **dict(self.space_options)).from_str(text)


# -- the worker side ---------------------------------------------------------------------------
def _flat(metrics: Mapping[str, float], required: tuple[str, ...]) -> dict[str, float]:
    # Every report carries every objective (NaN if unknown): Tune refuses a result that lacks
    # the metric its scheduler watches, and a failed trial has no metrics at all.
    return {**{k: math.nan for k in required}, **{k: float(v) for k, v in metrics.items()}}


def _trainable(
    config: Mapping[str, Any],
    evaluator: Evaluator,
    parse: Callable[[str], Genotype],
    required: tuple[str, ...],
) -> None:
    """One Tune trial: evaluate the genotype in ``config``, report each epoch, then a summary."""
    from ray import tune

    budget = int(config["budget"])
    try:
        genotype = parse(str(config["genotype"]))
    except Exception as exc:  # noqa: BLE001 - a bad genotype is this trial's failure, not the run's
        result = TrialResult("failed", error=f"could not parse the genotype: {type(exc).__name__}: {exc}")
    else:

        def on_report(epoch: int, metrics: Mapping[str, float]) -> None:
            # The last epoch is not reported on its own: a scheduler could stop the trial on it,
            # and the metrics measured after training (params, latency) would never arrive.
            # The summary below carries it.
            if epoch >= budget:
                return
            row = {k: float(v) for k, v in metrics.items()}
            tune.report(
                {
                    **_flat(row, required),
                    "epoch": int(epoch),
                    "trial_status": "running",
                    "metrics_json": json.dumps(row),  # exact names, apart from Tune's own keys
                }
            )

        result = run_trial(
            evaluator,
            genotype,
            budget,
            on_report=on_report,
            required=required,
            policy=str(config.get("policy") or ""),
            parent=str(config.get("parent") or ""),
        )
    tune.report(
        {
            **_flat(result.metrics, required),
            "trial_status": result.status,
            "error": result.error,
            "duration_s": result.duration_s,
            "metrics_json": json.dumps(result.metrics),
            "history_json": json.dumps(list(result.history)),  # a string keeps the result flat
        }
    )


# -- the driver side ---------------------------------------------------------------------------
@dataclass
class _Live:
    candidate: Candidate
    history: list[dict[str, float]] = field(default_factory=list)


def _row(result: Mapping[str, Any]) -> dict[str, float] | None:
    """A per-epoch history row (as `run_trial` writes it) from a per-epoch Tune result."""
    if result.get("trial_status") != "running" or "metrics_json" not in result:
        return None
    return {"epoch": float(result["epoch"]), **json.loads(result["metrics_json"])}


def lost_reason(exc: BaseException | None) -> str | None:
    """What took the trial down if it was the infrastructure, not the candidate (None then):
    "Ray worker died (ActorDiedError)" and the like.

    A trial's exceptions reach Tune only from outside the evaluator, since `run_trial` catches
    its own; but an actor whose constructor raised (an evaluator the workers cannot unpickle)
    fails the same way on every node, as does any `RayTaskError` the trainable raises: those
    stay candidate failures, never retried."""
    from ray import exceptions as rex

    if isinstance(exc, rex.RayTaskError):  # the trainable raised; lost only if Ray itself was
        cause = getattr(exc, "cause", None)
        return lost_reason(cause) if isinstance(cause, rex.RayError) and cause is not exc else None
    name = type(exc).__name__
    if isinstance(exc, rex.RayActorError):
        if getattr(exc, "actor_init_failed", False):
            return None
        what = "Ray node was preempted" if getattr(exc, "preempted", False) else "Ray worker died"
        return f"{what} ({name})"
    kinds = (
        (rex.WorkerCrashedError, "Ray worker crashed"),
        ((rex.NodeDiedError, rex.LocalRayletDiedError), "Ray node died"),
        (rex.OutOfMemoryError, "Ray's memory monitor killed the worker"),
        (rex.ObjectLostError, "Ray lost an object the trial needed"),
    )
    for types, what in kinds:
        if isinstance(exc, types):
            return f"{what} ({name})"
    return None


def _trial_exception(trial: Any) -> BaseException | None:
    """The exception Tune pickled for a failed trial (None if it could not), read from the
    trial's local folder: Tune writes it there just before the callbacks run."""
    from ray import cloudpickle

    with contextlib.suppress(Exception):
        path = trial.pickled_error_file
        if path:
            return cloudpickle.loads(Path(path).read_bytes())
    return None


def _print_event(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@functools.cache
def _classes() -> tuple[type, type]:
    """The Tune searcher and callback, defined on first use (their bases need Ray imported)."""
    from ray.tune import Callback
    from ray.tune.search import Searcher

    class ControllerSearcher(Searcher):
        """Tune's ask/tell seam around a `SearchController` (driver only)."""

        def __init__(
            self,
            controller: SearchController,
            static: Callable[[Genotype], Mapping[str, float]] | None,
            on_result: Callable[[Candidate, TrialResult], None] | None,
            max_retries: int = 2,
            on_event: Callable[[str], None] | None = None,
        ):
            super().__init__()
            self.controller, self.static, self.on_result = controller, static, on_result
            self.max_retries, self.on_event = max_retries, on_event
            self.live: dict[str, _Live] = {}
            self.errored: set[str] = set()  # failed in Tune; waiting for the callback's error text
            self.interrupted: list[Candidate] = []  # ended unfinished; left open in the store
            self.retried: list[Candidate] = []  # lost with their worker; requeued in the controller
            self.finished = False  # told Tune FINISHED (else Tune stopped on its own: Ctrl-C)

        def __getstate__(self) -> dict[str, Any]:
            # Tune pickles its searcher into the experiment state. A run resumes from its store,
            # not from there, so the driver-only objects (store connection, callbacks) stay out.
            return {**self.__dict__, "controller": None, "static": None, "on_result": None, "on_event": None}

        def save(self, checkpoint_path: str) -> None:
            pass  # the run's store is the checkpoint (see the controller)

        def suggest(self, trial_id: str) -> dict[str, Any] | str:
            cand = self.controller.next()
            if cand is None:
                # Not finished while a trial runs: a lost one is requeued and asked for again.
                # (Tune never asks again once told FINISHED; it does after a None.)
                if any(t not in self.errored for t in self.live):
                    return None
                self.finished = True
                return Searcher.FINISHED
            self.live[trial_id] = _Live(cand)
            g = cand.genotype.to_str()
            return {
                "genotype": g,
                "budget": int(cand.budget),
                "number": int(cand.number),
                "policy": cand.policy,
                "parent": cand.parent,
            }

        def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
            live = self.live.get(trial_id)
            row = _row(result)
            if live is not None and row is not None:
                live.history.append(row)

        def on_trial_complete(
            self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
        ) -> None:
            if error:
                self.errored.add(trial_id)  # recorded by `record_error` (or `flush`) with its text
                return
            live = self.live.get(trial_id)
            if live is None:
                return
            result = result or {}
            row = _row(result)
            if result.get("trial_status") in _FINAL:
                res = TrialResult(
                    result["trial_status"],
                    json.loads(result["metrics_json"]),
                    tuple(json.loads(result["history_json"])),
                    str(result.get("error", "")),
                    float(result.get("duration_s", 0.0)),
                )
            elif row is not None and (not live.history or live.history[-1]["epoch"] < row["epoch"]):
                # Stopped by the scheduler: Tune passes the result a scheduler stops on to the
                # searcher only here, never to on_trial_result, so an unseen epoch means a stop.
                live.history.append(row)
                metrics = {k: v for k, v in row.items() if k != "epoch"}
                duration = float(result.get("time_total_s", 0.0))
                res = TrialResult(
                    "stopped", self._with_static(live, metrics), tuple(live.history), "", duration
                )
            else:
                # Ended by Tune before it finished, on a result we had seen (Ctrl-C, or the
                # experiment stopping): not a result. Its trial stays open in the store, so a
                # resumed run evaluates it again.
                self.interrupted.append(self.live.pop(trial_id).candidate)
                return
            self._finish(trial_id, res)

        def _with_static(self, live: _Live, metrics: dict[str, float]) -> dict[str, float]:
            # A stopped trial lacks what is measured after training; objectives computable from
            # the architecture (params, FLOPs) are added so the strategy still learns from it.
            missing = [o.metric for o in self.controller.objectives if o.metric not in metrics]
            if not missing or self.static is None:
                return metrics
            try:
                static = self.static(live.candidate.genotype)
            except Exception:  # noqa: BLE001 - extra information only; the record stands without it
                return metrics
            return {**{k: float(static[k]) for k in missing if k in static}, **metrics}

        def record_error(self, trial_id: str, text: str, lost: str | None = None) -> None:
            """Record a trial that failed in Tune. ``lost``: why, if the infrastructure took it
            down (`lost_reason`); it is then run again (`SearchController.retry`), not failed."""
            if trial_id not in self.errored:
                return
            self.errored.discard(trial_id)
            live = self.live.get(trial_id)
            if live is None:
                return
            history = tuple(live.history)
            if lost is None:
                self._finish(trial_id, TrialResult("failed", {}, history, text, 0.0))
                return
            cand = self.live.pop(trial_id).candidate
            used = self.controller.retries_used(cand)
            # "ray: " first, as every error of a trial failed in Tune; Ray's own text after
            detail = f"ray: {lost}: {text.removeprefix('ray: ')}"
            retried = self.controller.retry(cand, detail, max_retries=self.max_retries, history=history)
            head = f"trial {cand.number} ({cand.id}): {lost}"
            if retried:
                self.retried.append(cand)
                self._event(f"{head}; retrying ({used + 1}/{self.max_retries})")
                return
            tries = f"after {used} retr{'y' if used == 1 else 'ies'}" if used else "no retries allowed"
            self._event(f"{head}; recorded as failed ({tries})")
            if self.on_result is not None:
                self.on_result(cand, TrialResult("failed", {}, history, detail, 0.0))

        def _event(self, line: str) -> None:
            (self.on_event or _print_event)(line)

        def flush(self) -> None:
            for trial_id in list(self.errored):
                self.record_error(trial_id, "the Ray trial failed outside the evaluator")

        def _finish(self, trial_id: str, result: TrialResult) -> None:
            live = self.live.pop(trial_id)  # popped first: Tune may report a failing tell twice
            self.controller.finish(live.candidate, result)
            if self.on_result is not None:
                self.on_result(live.candidate, result)

    class ErrorText(Callback):
        """Hands the error of a trial that failed in Tune (a dead worker, an unpicklable
        evaluator) to the searcher; Tune tells the searcher only that it failed."""

        def __init__(self, searcher: Any):
            self.searcher = searcher

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            text = "the Ray trial failed outside the evaluator"
            with contextlib.suppress(Exception):  # the file is a best effort; the record is not
                lines = [s for s in Path(trial.error_file).read_text().splitlines() if s.strip()]
                text = "ray: " + (lines[-1] if lines else text)
            lost = None
            with contextlib.suppress(Exception):  # unknown: a failure, as before
                lost = lost_reason(_trial_exception(trial))
            self.searcher.record_error(trial.trial_id, text, lost)

    return ControllerSearcher, ErrorText


def controller_searcher(
    controller: SearchController,
    static: Callable[[Genotype], Mapping[str, float]] | None = None,
    on_result: Callable[[Candidate, TrialResult], None] | None = None,
    max_retries: int = 2,
    on_event: Callable[[str], None] | None = None,
) -> Any:
    """A Ray Tune `Searcher` over ``controller`` (what `run_ray` uses, for your own Tuner).

    ``static(genotype)`` gives metrics known before training (params, FLOPs); they complete
    the metrics of stopped trials, which lack what is measured after training. Trials that
    fail inside Tune (not in the evaluator) are recorded when `record_error(trial_id, text)`
    or `flush()` is called; `run_ray` does both. A trial lost to the infrastructure (see
    `record_error`) runs again up to ``max_retries`` times; ``on_event(line)`` gets one line
    per such event (default: printed to stderr).
    """
    return _classes()[0](controller, static, on_result, max_retries, on_event)


# -- the entry point -------------------------------------------------------------------------------
def check_ray_address(address: str | None, timeout_s: float = 5.0) -> None:
    """Fail fast, with a one-line error, on a cluster address nothing answers at: `ray.init`
    itself retries for minutes on an unreachable host:port and raises a traceback for "auto"
    when no cluster runs on this machine."""
    if not address or address == "local":
        return
    if address == "auto":
        import ray

        try:  # reads RAY_ADDRESS or the address file `ray start --head` leaves on this machine
            address = ray._private.services.canonicalize_bootstrap_address_or_die("auto")
        except AttributeError:  # a Ray without this private helper: `ray.init` decides
            return
        except ConnectionError:
            raise ConfigError(
                "--ray-address auto: no Ray cluster runs on this machine; start one with "
                "`ray start --head`, give its host:port, or leave the address out for a local Ray"
            ) from None
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--ray-address {address!r}: expected host:port (or 'auto'), e.g. 10.0.0.5:6379")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()  # [::1]:6379
    except OSError as exc:
        raise ConfigError(
            f"--ray-address {address!r}: no Ray cluster answers there ({exc.strerror or exc}); "
            "is `ray start --head` running on that machine and the port open?"
        ) from None


@contextlib.contextmanager
def _ray_session(address: str | None) -> Iterator[None]:
    """Join ``address`` (a cluster started with ``ray start --head``), or start a local Ray;
    either is shut down afterwards, but a Ray this process already runs is left alone."""
    import ray

    if ray.is_initialized():
        yield
        return
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING, "ignore_reinit_error": True}
    if address:
        try:
            ray.init(address=address, **quiet)
        except ConnectionError as exc:
            # the usual cause when the port answers: Ray >= 2.59 turns token authentication on
            # for clusters made by `ray start`, and a driver joining by host:port sends no token
            raise ConfigError(
                f"--ray-address {address!r}: {exc}; if the cluster uses token authentication, "
                "set RAY_AUTH_MODE=token (and RAY_AUTH_TOKEN, or the head's ~/.ray/auth_token) here"
            ) from None
    else:
        # "local": a new instance even when `ray start` runs on this machine (Ray would join it)
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, **quiet)
    try:
        yield
    finally:
        ray.shutdown()


def run_tasks(
    fn: Callable[..., Any], calls: Sequence[tuple[Any, ...]], cpus: float, gpus: float, address: str | None
) -> list[Any]:
    """``fn(*call)`` for every call at once as Ray tasks (``cpus``/``gpus`` each), results in order.
    What `nas-run train --runner ray` uses: several seeds or architectures, a GPU each."""
    import ray

    check_ray_address(address)
    with _ray_session(address):
        _check_resources(cpus, gpus)
        remote = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(fn)
        return ray.get([remote.remote(*call) for call in calls])


def _check_resources(cpus: float, gpus: float) -> None:
    import ray

    have = ray.cluster_resources()
    for kind, need in (("CPU", cpus), ("GPU", gpus)):
        if need > have.get(kind, 0.0):
            raise ConfigError(
                f"a trial asks for {need:g} {kind}s but this Ray has {have.get(kind, 0.0):g}; "
                f"lower {kind.lower()}s_per_trial or join a bigger cluster with address=..."
            )


def run_ray(
    controller: SearchController,
    evaluator: Evaluator,
    *,
    parse: Callable[[str], Genotype] | None = None,
    cpus_per_trial: float = 1.0,
    gpus_per_trial: float = 0.0,
    max_concurrent: int = 2,
    address: str | None = None,
    scheduler: str | None = None,
    grace_period: int = 1,
    reduction_factor: int = 2,
    storage_path: str | Path | None = None,
    on_result: Callable[[Candidate, TrialResult], None] | None = None,
    max_retries: int = 2,
    on_event: Callable[[str], None] | None = None,
) -> None:
    """Evaluate the controller's candidates as Ray Tune trials until it has none left.

    ``parse`` turns a genotype string back into a genotype on the workers (default: the
    strategy's space; `SpaceParser` is a light picklable one). ``scheduler`` is one of
    `SCHEDULERS`; None picks "mo-asha" for several objectives, else "asha". Rungs sit at
    ``grace_period * reduction_factor**k`` epochs below the budget. Tune's own files go under
    ``storage_path`` (a temporary folder, removed afterwards, if None). ``on_result(candidate,
    result)`` runs on the driver after each trial is recorded. A trial whose Ray worker or
    node died is run again, first, up to ``max_retries`` times per candidate (then recorded as
    failed); ``on_event(line)`` gets one line per such event (default: printed to stderr).
    """
    objectives = controller.objectives
    name = scheduler or ("mo-asha" if len(objectives) > 1 else "asha")
    if name not in SCHEDULERS:
        raise UnknownNameError("scheduler", name, SCHEDULERS)
    if max_concurrent < 1 or cpus_per_trial < 0 or gpus_per_trial < 0:
        raise ConfigError(
            f"need max_concurrent >= 1 and non-negative resources, got max_concurrent={max_concurrent}, "
            f"cpus_per_trial={cpus_per_trial}, gpus_per_trial={gpus_per_trial}"
        )
    if grace_period < 1 or reduction_factor < 2:
        raise ConfigError(
            f"need grace_period >= 1 and reduction_factor >= 2, got {grace_period}, {reduction_factor}"
        )
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ConfigError(f"max_retries must be an integer >= 0, got {max_retries!r}")
    if controller.remaining() <= 0:
        return  # nothing to run (e.g. a finished run resumed): no need to start Ray
    parse = parse or controller.strategy.space.from_str
    static = controller.static_metrics or getattr(evaluator, "static_metrics", None)
    required = tuple(o.metric for o in objectives)

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter

    def fill(genotype: str) -> Mapping[str, float]:  # MO-ASHA's source of static objectives
        try:
            return static(parse(genotype)) if static is not None else {}
        except Exception:  # noqa: BLE001 - the rung then decides on the objectives it has
            return {}

    if name == "asha":
        first = objectives[0]
        sched: Any = ASHAScheduler(
            time_attr="epoch",
            metric=first.metric,
            mode=first.direction,
            max_t=controller.budget,
            grace_period=grace_period,
            reduction_factor=reduction_factor,
            stop_last_trials=False,
        )
    elif name == "mo-asha":
        sched = make_mo_asha(objectives, controller.budget, grace_period, reduction_factor, "epoch", fill)
    else:
        sched = FIFOScheduler()

    searcher = controller_searcher(controller, static, on_result, max_retries, on_event)
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, evaluator=evaluator, parse=parse, required=required),
        {"cpu": cpus_per_trial, "gpu": gpus_per_trial},
    )
    # RAY_AIR_NEW_OUTPUT=0: Tune's newer console output prints a table even at verbose=0.
    # TUNE_PRINT_ALL_TRIAL_ERRORS=0: no traceback per failed trial (Tune logs each at ERROR);
    # the searcher prints one line per lost trial and the store keeps the error of every one.
    quiet = _env(RAY_AIR_NEW_OUTPUT="0", TUNE_PRINT_ALL_TRIAL_ERRORS="0")
    with _ray_session(address), _folder(storage_path) as where, quiet, _quiet_trial_failures():
        if address is None:  # a cluster may autoscale; a local Ray would wait forever instead
            _check_resources(cpus_per_trial, gpus_per_trial)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=ConcurrencyLimiter(searcher, max_concurrent=max_concurrent),
                scheduler=sched,
                num_samples=-1,  # the searcher ends the run by answering FINISHED
                # one worker process runs trial after trial: starting Python, torch and the
                # data set again for every trial costs more than a small trial itself
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=f"nas-run-{int(time.time())}",
                storage_path=str(where),
                verbose=0,
                callbacks=[_classes()[1](searcher)],
                # Tune's own retries stay off: it would rerun a lost trial under the same id,
                # invisible to the store and to a resumed driver, at the end of its queue, with
                # the searcher's history and the scheduler's rungs holding the first attempt's
                # epochs. The controller retries instead (see `record_error`).
                failure_config=tune.FailureConfig(max_failures=0),
            ),
        )
        tuner.fit()
        searcher.flush()
    # a trial lost and requeued just as Tune stopped (Ctrl-C) is waiting in the controller
    pending = [] if searcher.finished else searcher.retried
    if searcher.interrupted or pending:
        # Tune returns normally after Ctrl-C; the caller must still learn the run is not done.
        numbers = [c.number for c in [*searcher.interrupted, *pending]]
        raise KeyboardInterrupt(
            f"Ray Tune stopped before trials {numbers} finished; resuming the run reruns them"
        )


@contextlib.contextmanager
def _folder(path: str | Path | None) -> Iterator[Path]:
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path).resolve()
        return
    with tempfile.TemporaryDirectory(prefix="nas-run-ray-") as tmp:
        yield Path(tmp)


class _DropTuneSummary(logging.Filter):
    """Tune's closing "Trials did not complete: [...]" lists trials by Tune's names: the lost
    ones were run again and the failed ones are in the store with their errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Trials did not complete")


@contextlib.contextmanager
def _quiet_trial_failures() -> Iterator[None]:
    """For the duration of a run: no Tune summary of errored trials, and none of the raylet's
    long "A worker died or was killed ..." notes the driver prints for every dead worker (the
    searcher prints its own line, the store keeps Ray's text). Ray prints those from a thread
    through a private function, patched here when it exists; other raylet messages still show."""
    tune_log, drop = logging.getLogger("ray.tune.tune"), _DropTuneSummary()
    tune_log.addFilter(drop)
    try:
        from ray._private import worker as ray_worker

        original = ray_worker.print_to_stdstream
    except (ImportError, AttributeError):
        ray_worker = original = None

    def filtered(data: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(data, dict) and data.get("pid") == "raylet":
            lines = [s for s in data.get("lines", []) if "A worker died or was killed" not in str(s)]
            if not lines:
                return None
            data = {**data, "lines": lines}
        return original(data, *args, **kwargs)

    if ray_worker is not None:
        ray_worker.print_to_stdstream = filtered
    try:
        yield
    finally:
        tune_log.removeFilter(drop)
        if ray_worker is not None:
            ray_worker.print_to_stdstream = original


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of the block only."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
