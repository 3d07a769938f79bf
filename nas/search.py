"""`run_search`: a whole search run from a `SearchConfig` — the function behind `nas-run search`.

A run folder holds everything needed to understand and resume it:

    config.json            the resolved configuration (the resume source of truth)
    study.db               the Optuna study (unless ``storage`` names another database)
    strategy_state.json    the strategy's state after the last ask/tell
    trials.csv, pareto.csv written at the end of the run (and on every resume)
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from search_spaces import ConfigError, SearchSpace, UnknownNameError, get_space

from .config import SearchConfig, read_json_file
from .controller import ProposalRows, SearchController
from .objectives import parse_constraints, parse_objectives
from .store import RunStore, check_sqlite
from .strategies.base import make_strategy
from .trial import Candidate, TrialResult

__all__ = [
    "RunPlan",
    "SearchRun",
    "driver_running",
    "open_store",
    "prepare_run",
    "read_config",
    "run_search",
    "write_tables",
    "TRAINING_METRICS",
]

# what `TrainingEvaluator` reports: objectives and constraints must be among these
TRAINING_METRICS = (
    "val_acc",
    "train_loss",
    "params",
    "flops",
    "macs",
    "activations",
    "latency_ms",
    "onnx_latency_ms",
    "epochs",
)
WEIGHTS_DIR = "weights"  # in a run folder: <genotype id>-s<seed>-e<epochs>.safetensors per trained trial
STATIC_METRICS = ("params", "flops", "macs")  # known before training: checked before a trial starts


class RunPlan(Protocol):
    """What a run searches and how one proposal is evaluated, when that is not a plain
    architecture search: a joint architecture x compression search (`compress.joint`) proposes
    (architecture, policy) pairs. `nas` defines this seam and never imports its implementations;
    the CLI hands one in for runs whose config asks for it (``joint = true``)."""

    metrics: tuple[str, ...]  # valid objective and constraint metrics

    def space(self, cfg: SearchConfig, architectures: SearchSpace) -> SearchSpace:
        """The space the strategy searches."""
        ...

    def evaluator(self, cfg: SearchConfig, out: Path, architectures: SearchSpace) -> Any: ...

    def rows(self, space: SearchSpace) -> ProposalRows: ...

    def parse(self, cfg: SearchConfig, architectures: SearchSpace) -> Callable[[str], Any]:
        """Row genotype text -> genotype on Ray workers (picklable)."""
        ...

    def surrogate_options(self, space: SearchSpace, evaluator: Any) -> dict[str, Any]:
        """Options for a surrogate strategy on this space, under the config's own (e.g.
        ``stats_fn``: cheap statistics of a proposal; ``variants``; ``design_key``)."""
        ...

    def strategy(self, cfg: SearchConfig, strategy: Any) -> Any:
        """The strategy the controller drives (e.g. ``strategy`` wrapped to reuse trained weights)."""
        ...


@dataclass
class SearchRun:
    out: Path
    config: SearchConfig
    store: RunStore
    controller: SearchController
    evaluator: Any
    space: SearchSpace
    lock: Any = None  # the open lock file: one driver per run folder
    created: bool = False  # this call made the folder (not a resume, not a pre-made --out)
    parse: Callable[[str], Any] | None = None  # row genotype text -> genotype on Ray workers
    notes: tuple[str, ...] = ()  # what the user should know before it runs (small-data settings)

    def write_tables(self) -> tuple[Path, Path]:
        return write_tables(self.out, self.store)


def write_tables(out: Path, store: RunStore) -> tuple[Path, Path]:
    """trials.csv (every trial, compression ones included) and pareto.csv (the feasible front
    over all completed trials: architectures and (architecture, policy) pairs)."""
    trials, pareto = out / "trials.csv", out / "pareto.csv"
    store.dataframe().to_csv(trials, index=False)
    store.pareto().to_csv(pareto, index=False)
    return trials, pareto


def _default_out(cfg: SearchConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("results") / f"{cfg.space}-{Path(cfg.dataset).name}-{cfg.strategy}-{stamp}"


def _store_for(cfg: SearchConfig, out: Path, read_only: bool = False, new: bool = False) -> RunStore:
    url = cfg.storage or f"sqlite:///{(out / 'study.db').resolve()}"
    if read_only and cfg.storage is None and not (out / "study.db").is_file():
        raise ConfigError(f"{str(out)!r} holds no study.db yet")  # SQLite would create one
    objectives, constraints = parse_objectives(cfg.objectives), parse_constraints(cfg.constraints)
    check_sqlite(url)  # before `_study_name` reads it
    return RunStore(url, objectives, constraints, study_name=_study_name(out, url, cfg), read_only=read_only,
                    new=new)


def _study_name(out: Path, url: str, cfg: SearchConfig) -> str:
    """The study of a run is named after its folder; a folder copied or renamed since keeps the
    old name inside its own study.db, which is then the one study there (found, not recreated)."""
    name = out.resolve().name
    if cfg.storage is None and (out / "study.db").is_file():
        import optuna

        names = optuna.study.get_all_study_names(storage=url)
        if name not in names and len(names) == 1:
            return names[0]
    return name


LOCK_FILE = ".driver.lock"  # held by the driver of a run folder (see _lock_run_folder)


def _lock_run_folder(out: Path) -> Any:
    """An exclusive lock on the run folder for this driver's lifetime: a second driver (say a
    `--resume` while the first still runs) would mark the first one's running trials as
    interrupted. The OS drops the lock when the process dies, kill -9 included."""
    import fcntl

    handle = open(out / LOCK_FILE, "w")  # noqa: SIM115 - held open on purpose
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ConfigError(
            f"another nas-run process is driving {str(out)!r}; wait for it or stop it"
        ) from None
    return handle


def driver_running(run_dir: str | Path) -> bool:
    """Whether a nas-run process drives this run folder now (it holds the folder's lock)."""
    import fcntl

    path = Path(run_dir) / LOCK_FILE
    if not path.exists():
        return False
    with open(path) as handle:
        try:  # a shared lock for an instant: granted only when no driver holds the exclusive one
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def read_config(run_dir: str | Path) -> SearchConfig:
    """The resolved configuration a run folder was made with."""
    cfg_path = Path(run_dir) / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a run folder (no config.json)")
    saved = read_json_file(cfg_path, "configuration")
    saved.setdefault("cv", 1)  # runs made before cross-validation existed validated on one split
    cfg = SearchConfig.from_mapping(saved, source=str(cfg_path))
    return _old_darts_rules(cfg, Path(run_dir))


def open_store(run_dir: str | Path, read_only: bool = False) -> RunStore:
    """The store of an existing run folder (read it, add to it, or point a report at it);
    ``read_only`` writes nothing, for readers beside a running driver."""
    cfg = read_config(run_dir)
    if cfg.storage is None and not (Path(run_dir) / "study.db").is_file():  # SQLite would make an empty one
        raise ConfigError(f"{str(run_dir)!r} holds no study.db: the run's trials are lost, or it is not a run folder")
    return _store_for(cfg, Path(run_dir), read_only)


def prepare_run(
    config: SearchConfig | None = None, resume: str | Path | None = None, plan: RunPlan | None = None
) -> SearchRun:
    """Validate everything, create (or reopen) the run folder and its store; run nothing yet.
    ``plan``: what a joint run searches and evaluates (see `RunPlan`); required when the
    config says ``joint``."""
    from .training import TrainingEvaluator

    if resume is not None:
        out = Path(resume)
        saved = read_config(out)  # also resolves the space of pre-v2 darts runs
        if saved.storage is None:  # a damaged or lost study.db: said now, not after the data are loaded
            if not (out / "study.db").is_file():
                raise ConfigError(f"{str(out)!r} holds no study.db: the run's trials are lost; nothing to resume")
            check_sqlite(f"sqlite:///{(out / 'study.db').resolve()}")
        if (out / "strategy_state.json").exists():  # checked before the store is written to
            from .controller import read_state

            read_state(out / "strategy_state.json")
        # a resume may extend the run: only the number of trials can change
        cfg = saved if config is None else saved.replace(trials=max(config.trials, saved.trials))
    else:
        cfg = config or SearchConfig()
        out = Path(cfg.out) if cfg.out else _default_out(cfg)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {str(out)!r} is a file; give a folder for the run")
        if (out / "config.json").exists():
            raise ConfigError(f"{str(out)!r} already holds a run; continue it with --resume {out}")

    if cfg.joint and plan is None:
        raise ConfigError("this is a joint architecture x compression run: run it with `nas-run search`")
    objectives = parse_objectives(cfg.objectives)
    constraints = parse_constraints(cfg.constraints)
    valid = plan.metrics if plan is not None else TRAINING_METRICS
    for metric in [o.metric for o in objectives] + [c.metric for c in constraints]:
        if metric not in valid:
            raise UnknownNameError("metric for objectives/constraints", metric, valid)
    architectures = space = get_space(cfg.space, **dict(cfg.space_options))
    if cfg.tiny:
        architectures = space = space.tiny()
    evaluator = TrainingEvaluator(
        space=cfg.space,
        space_options=dict(space.options),
        dataset=cfg.dataset,
        data_seed=cfg.seed,
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
        recipe=cfg.recipe,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        cache_dir=cfg.cache_dir,
        layout=cfg.layout,
        threads=max(1, int(cfg.cpus_per_trial)),
        # test accuracy is measured for the final report only: it is not a valid objective or
        # constraint (TRAINING_METRICS), so no strategy ever selects on it
        with_test=True,
        onnx_latency="onnx_latency_ms" in {o.metric for o in objectives} | {c.metric for c in constraints},
        # trained weights of every finished trial: `nas-run compress --run DIR` starts from them
        weights_dir=str((out / WEIGHTS_DIR).resolve()),
    )
    rows: ProposalRows | None = None
    parse = None
    if plan is not None:
        space = plan.space(cfg, architectures)
        evaluator = plan.evaluator(cfg, out, architectures)
        rows, parse = plan.rows(space), plan.parse(cfg, architectures)
    evaluator.data()  # a bad dataset name or file fails now, before any folder is written
    cfg, evaluator, notes = _small_data(cfg, evaluator, plan is None)
    if cfg.runner == "ray":  # so does a cluster address nothing answers at
        from .runners.ray_tune import check_ray_address

        check_ray_address(cfg.ray_address)
    lineage = None
    if cfg.inherit:
        from .inherit import Lineage, default_inherit_epochs

        lineage = Lineage(space, cfg.epochs, cfg.inherit_epochs or default_inherit_epochs(cfg.epochs),
                          evaluator.weights_path)
    options = dict(cfg.strategy_options)
    if cfg.strategy == "surrogate":
        given = plan.surrogate_options(space, evaluator) if plan is not None else {"stats_fn": _model_statistics(evaluator)}
        if plan is None:  # zero-cost proxies (#23): lazy, computed only when a proxy_* option is on
            from .proxies import CACHE_FILE, ProxyFeatures

            given["proxies_fn"] = ProxyFeatures(evaluator, cache=out / CACHE_FILE, epochs=cfg.epochs, seed=cfg.seed)
        if lineage is not None:
            from .inherit import inherit_surrogate_options
            from .strategies.base import get_strategy

            given = {**given, **inherit_surrogate_options(lineage, get_strategy("surrogate").options()["n_init"])}
        options = {**{k: v for k, v in given.items() if v is not None}, **options}  # the config's own win
    strategy = make_strategy(cfg.strategy, space, n_objectives=len(objectives), seed=cfg.seed, **options)
    if plan is not None:
        strategy = plan.strategy(cfg, strategy)

    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # read-only place, a file on the path, ...
        raise ConfigError(f"cannot create the run folder {str(out)!r}: {exc.strerror or exc}") from None
    lock = _lock_run_folder(out)
    try:
        # a new run on a database server: its folder's name must not be another run's study
        store = _store_for(cfg, out, new=resume is None and cfg.storage is not None)
    except Exception:
        if created:  # a bad storage URL must not leave a half-made run folder behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    if resume is None or config is not None:
        (out / "config.json").write_text(json.dumps(cfg.to_json(), indent=2))
    store.set_meta("config", cfg.to_json())
    # a joint run's params/FLOPs are those after compression: nothing to check before training
    static = (
        evaluator.static_metrics
        if plan is None and any(c.metric in STATIC_METRICS for c in constraints)
        else None
    )
    controller = SearchController(
        strategy,
        store,
        budget=cfg.epochs,
        n_trials=cfg.trials,
        seed=cfg.seed,
        state_path=out / "strategy_state.json",
        static_metrics=static,
        rows=rows,
        record=evaluator.record() if hasattr(evaluator, "record") else None,
        lineage=lineage,
    )
    return SearchRun(out, cfg, store, controller, evaluator, space, lock, created, parse, notes)


def _small_data(cfg: SearchConfig, evaluator: Any, architectures: bool) -> tuple[SearchConfig, Any, tuple[str, ...]]:
    """Resolve the run's cross-validation folds (written to config.json as a number) and say
    what small data changes: the batch size training really uses, and the folds. ``architectures``:
    an architecture search (a joint run measures compressed pairs on the validation split)."""
    import dataclasses

    from .crossval import CV_THRESHOLD, check_cv, default_cv
    from .trainer import MIN_BATCH, MIN_STEPS, capped_batch_size

    data = evaluator.data()
    pool = len(data.y_train) + len(data.y_val)
    notes = []
    if not architectures:
        if cfg.cv is not None and cfg.cv > 1:
            raise ConfigError("cv applies to architecture searches; a joint run measures compressed pairs: use cv = 1")
        cv = 1
    elif cfg.cv is None and cfg.inherit:
        cv = 1  # a parent's weights trained on the run's split: other folds would validate on its training data
        if default_cv(data) > 1:
            notes.append(f"cross-validation off: inherited weights trained on one split ({pool} train+val samples)")
    elif cfg.cv is None:
        cv = default_cv(data)
        if cv > 1:
            notes.append(
                f"cross-validation: {cv} folds ({pool} train+val samples, under {CV_THRESHOLD:,}): each trial's "
                f"val_acc is the mean of {cv} trainings; --cv 1 turns it off"
            )
    else:
        cv = cfg.cv
        check_cv(data, cv)
    cfg = cfg.replace(cv=cv)
    if hasattr(evaluator, "cv"):
        evaluator = dataclasses.replace(evaluator, cv=cv)
    # said for the training split (the kept model's; other folds train on a few more or fewer)
    n_train = len(data.y_train)
    asked = evaluator.training_recipe().batch_size if hasattr(evaluator, "training_recipe") else None
    if asked is not None and (batch := capped_batch_size(asked, n_train)) < asked:
        notes.append(
            f"batch size {asked} -> {batch}: {n_train} training samples, {-(-n_train // batch)} steps per epoch "
            f"(the batch is cut for at least {MIN_STEPS} steps per epoch, down to {MIN_BATCH} samples)"
        )
    return cfg, evaluator, tuple(notes)


def _old_darts_rules(cfg: SearchConfig, out: Path) -> SearchConfig:
    """A `darts` run made before genotypes v2 holds `darts@1` cells, which were NASNet-rule cells
    (inputs may repeat, only unconsumed blocks concatenated): resume it in that space, so its
    trials parse and build the network they built."""
    if cfg.space != "darts" or "rules" in cfg.space_options or not (out / "study.db").is_file():
        return cfg
    records = _store_for(cfg, out, read_only=True).records()
    if any(str(r.get("genotype") or "").startswith("darts@1|") for r in records):
        return cfg.replace(space_options={**dict(cfg.space_options), "rules": "nasnet"})
    return cfg


def _model_statistics(evaluator: Any) -> Callable[[Any], np.ndarray]:
    """Cheap model statistics for the surrogate: log10 of parameters and FLOPs of the built
    (untrained) model; they separate architectures the encoding alone cannot size."""

    def stats(genotype: Any) -> np.ndarray:
        m = evaluator.static_metrics(genotype)
        return np.log10(1.0 + np.array([m["params"], m["flops"]]))

    return stats


def run_search(
    config: SearchConfig | None = None,
    resume: str | Path | None = None,
    on_result: Callable[[Candidate, TrialResult], None] | None = None,
    plan: RunPlan | None = None,
    on_note: Callable[[str], None] | None = None,
) -> SearchRun:
    """Make (or resume) the run and evaluate its trials; ``on_note(line)`` hears what small data
    changed (batch size, cross-validation) before the first trial."""
    run = prepare_run(config, resume, plan)
    cfg = run.config
    for note in run.notes:
        if on_note is not None:
            on_note(note)
    try:
        if cfg.runner == "ray":
            from .runners.ray_tune import run_ray

            run_ray(
                run.controller,
                run.evaluator,
                parse=run.parse,
                cpus_per_trial=cfg.cpus_per_trial,
                gpus_per_trial=cfg.gpus_per_trial,
                max_concurrent=cfg.max_concurrent,
                address=cfg.ray_address,
                scheduler=None if cfg.scheduler == "auto" else cfg.scheduler,  # run_ray picks
                grace_period=cfg.grace_period,
                reduction_factor=cfg.reduction_factor,
                storage_path=str((run.out / "ray").resolve()),
                on_result=on_result,
                max_retries=cfg.max_retries,
            )
        else:
            from .runners.local import run_local

            run_local(run.controller, run.evaluator, on_result=on_result)
    except ConfigError:
        # raised before any trial ran (Ray could not join the cluster, too few CPUs): a new,
        # empty run folder would only make the corrected command refuse its --out
        if run.created and not run.store.records():
            if run.lock is not None:
                run.lock.close()
            shutil.rmtree(run.out, ignore_errors=True)
            if cfg.storage is not None:  # its empty study on the server too: the name is free again
                import optuna

                optuna.delete_study(study_name=run.store.study_name, storage=run.store.url)
        raise
    except KeyboardInterrupt:
        # the store already holds every finished trial; tell the user where to pick up
        run.write_tables()
        raise KeyboardInterrupt(f"nas-run search --resume {run.out}") from None
    finally:
        if run.lock is not None and not run.lock.closed:
            run.lock.close()  # the run is over: the folder is free for compress, report, resume
    run.write_tables()
    return run
