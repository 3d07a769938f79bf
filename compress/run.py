"""`run_compress`: compress a search run's best candidates, or a user's own model — the function
behind `nas-run compress`.

A compression run is a list of (architecture, policy) candidates, each evaluated as a trial
(stage "compress") through the same runners and store as the search. For ``--run DIR`` the
trials go into that run's own study, next to the architecture trials; for ``--model SPEC`` a
new folder gets its own study. ``compress.json`` in the folder holds the resolved compression
config, so ``--resume`` continues exactly (see `CompressionController`).

Folder contents added by compression::

    compress.json                 the resolved compression config
    compressed/<gid>+<pid>/       per candidate (an artefact): model.safetensors or model.onnx, policy.json,
                                  model.manifest.json
    compress.csv                  one row per compression trial (written at the end)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from nas.config import RUNNERS
from nas.final_training import TRAINED_DIR
from nas.objectives import Objective, losses, parse_objectives
from nas.store import RunStore
from nas.trial import Candidate, TrialResult
from search_spaces import ConfigError, Genotype, UnknownNameError

from .controller import COMPRESS_STAGE, CompressionController
from .evaluate import CompressionEvaluator, check_policy, needs_eager, user_genotype
from .policy import Policy
from .policy_search import ControllerChain

__all__ = [
    "COMPRESS_METRICS",
    "CompressConfig",
    "CompressRun",
    "builtin_policies",
    "compress_config",
    "policy_from_flags",
    "prepare_compress",
    "read_compress_config",
    "resume_config",
    "run_compress",
]

CONFIG_FILE = "compress.json"
# --model without --loss: the loss that fits the data's labels (`nas.data.Dataset.label_kind`)
LOSS_FOR_LABELS = {"classes": "ce", "multilabel": "bce", "regression": "mse"}
ARTEFACTS = "compressed"
# what `CompressionEvaluator` reports: objectives of a --model run must be among these
COMPRESS_METRICS = (
    "val_acc",
    "acc_drop",
    "onnx_latency_ms",
    "onnx_latency_rel",
    "latency_ms",
    "speedup",
    "file_bytes",
    "zip_bytes",
    "size_ratio",
    "params",
    "flops",
    "macs",
    "sparsity",
)


@dataclass(frozen=True)
class CompressConfig:
    run: str | None = None  # a search run folder: compress its best candidates
    model: str | None = None  # or a user's model: TorchScript file or package.module:callable
    weights: str | None = None  # state dict (.pt/.pth/.safetensors) for a builder
    dataset: str | None = None  # --model: required; --run: the run's own
    standardize: bool = False  # --model: feed data as stored unless asked
    layout: str | None = None  # --model: the data's axes (nas.data.LAYOUTS): fed channel-first, not as stored
    out: str | None = None  # --model: the folder for results (a --run writes into the run)
    top_k: int = 3
    policies: tuple[str, ...] = ()  # canonical policy texts; empty: the built-in set
    nni_config: str | None = None  # an NNI pruning config_list file: turned into one more policy
    objectives: tuple[str, ...] = ("val_acc", "onnx_latency_ms")  # --model runs (a run keeps its own)
    finetune_epochs: int = 8  # of the built-in policies (keep-best makes more epochs safe for pretrained models)
    finetune_lr: float = 3e-3  # of the built-in policies (the search's own training lr)
    seed: int = 0
    calib_size: int = 256
    runner: str = "local"
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int = 2
    max_retries: int = 2  # Ray: re-runs of a trial whose worker or node died (not the candidate's fault)
    ray_address: str | None = None
    # policy search (instead of a fixed list): a strategy, evaluations per architecture, the
    # family of policies searched (`compress.policy_space.KINDS`) and constraints on its metrics
    search: str | None = None
    budget: int = 20
    policy_space: str = "prune+int8"
    constraints: tuple[str, ...] = ()
    search_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    policy_space_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # e.g. {"round_to": 8}
    # the strategy's seed, when it should differ from ``seed`` (which also splits --model data)
    search_seed: int | None = None
    # --model: fine-tuning's loss and the metric measured (`compress.tasks`). loss None: from the
    # data's labels (ce for classes, bce for multi-label rows, mse for regression), resolved and kept
    # in compress.json by `prepare_compress`; metric None: the loss's default
    loss: str | None = None
    metric: str | None = None

    def __post_init__(self) -> None:
        if (self.run is None) == (self.model is None):
            raise ConfigError("give exactly one of --run DIR (a search run) or --model SPEC (your own model)")
        if self.model is not None and (self.dataset is None or self.out is None):
            raise ConfigError("--model needs --dataset (the data to calibrate, fine-tune and measure on) and --out DIR")
        if self.run is not None and self.weights is not None:
            raise ConfigError("--weights goes with --model; a run's weights are in its folder")
        if self.max_retries < 0:
            raise ConfigError(f"max_retries must be an integer >= 0, got {self.max_retries}")
        if self.run is not None and (self.loss not in (None, "ce") or self.metric is not None):
            # a run's compression trials share its study with the search's: val_acc must stay accuracy
            raise ConfigError("--loss and --metric go with --model; a search run's models are classifiers "
                              "trained with cross-entropy and compared by accuracy")
        from .tasks import make_task

        make_task(self.loss or "ce", self.metric)  # a bad name or module:function fails before anything runs
        if self.top_k < 1 or self.finetune_epochs < 0 or self.calib_size < 1 or self.finetune_lr <= 0:
            raise ConfigError(
                f"top_k and calib_size must be >= 1, finetune_epochs >= 0 and finetune_lr > 0, got "
                f"{self.top_k}, {self.calib_size}, {self.finetune_epochs}, {self.finetune_lr}"
            )
        if self.runner not in RUNNERS:
            raise UnknownNameError("runner", self.runner, RUNNERS)
        if self.search is not None:
            from nas.strategies.base import get_strategy

            from .policy_search import STRATEGY_ALIASES
            from .policy_space import KINDS

            if self.search not in STRATEGY_ALIASES:
                try:
                    get_strategy(self.search)
                except UnknownNameError:
                    from nas.strategies.base import list_strategies

                    raise UnknownNameError("policy search strategy", self.search,
                                           [*dict(list_strategies()), *STRATEGY_ALIASES]) from None
            if self.policy_space not in KINDS:
                raise UnknownNameError("policy space", self.policy_space, KINDS)
            if self.budget < 1:
                raise ConfigError(f"--budget is the number of policy evaluations per model, >= 1; got {self.budget}")
            if self.policies or self.nni_config:
                raise ConfigError("--search searches policies itself; drop --policy/--nni-config and the pass flags")
            from .policy_space import PolicySpace

            settable = {k: v for k, v in PolicySpace.default_options.items()
                        if k not in ("kind", "groups", "layers", "ends", "model", "group_sensitivity", "finetune",
                                     "blocks", "block_sensitivity")}
            for key in self.policy_space_options:
                if key not in settable:
                    raise UnknownNameError("policy space option", key, settable)
            from nas.objectives import parse_constraints

            named = [o.metric for o in parse_objectives(self.objectives)] + [
                c.metric for c in parse_constraints(self.constraints)]
            for metric in named:
                if metric not in COMPRESS_METRICS:
                    raise UnknownNameError("metric for compression objectives and constraints", metric, COMPRESS_METRICS)
        elif self.constraints:
            raise ConfigError("--constraint goes with --search (a policy search); a fixed list is measured as given")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "config") -> CompressConfig:
        """Strict: unknown keys and wrong types (an edited compress.json) are `ConfigError`s."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source} must hold a table of settings, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            norm = str(key).replace("-", "_")
            if norm not in known:
                raise UnknownNameError(f"key in {source}", key, known)
            kwargs[norm] = _typed(norm, value, source)
        if "search_options" in kwargs and not isinstance(kwargs["search_options"], Mapping):
            raise ConfigError(f"search_options in {source} is a table of strategy options, got {kwargs['search_options']!r}")
        return cls(**kwargs)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    def replace(self, **changes: Any) -> CompressConfig:
        return dataclasses.replace(self, **changes)


def _typed(key: str, value: Any, source: str) -> Any:
    """``value`` checked against the field's annotation (lists become tuples): `__post_init__`
    compares numbers, and a string where a number belongs would be a TypeError there."""
    import types
    import typing

    hint = typing.get_type_hints(CompressConfig)[key]
    if typing.get_origin(hint) in (types.UnionType, typing.Union):  # `X | None`
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    origin = typing.get_origin(hint)
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and number and isinstance(value, int):
        return value
    if hint is float and number and _finite(value):
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    if origin is tuple and isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    if origin is Mapping and isinstance(value, Mapping):
        return value
    kind = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(
        hint, "a list of strings" if origin is tuple else "a table")
    raise ConfigError(f"{key} in {source} must be {kind}, got {value!r}"[:300])


def _finite(value: float) -> bool:
    import math

    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


# What a compression run's finished trials were measured with beyond their (architecture, policy)
# pair. A re-run skips a finished pair, so another value would change nothing for those trials
# (and mix two settings in one table): a re-run or --resume that gives another one is refused.
MEASURED = ("calib_size", "seed", "dataset", "weights", "standardize", "layout", "loss", "metric", "model")
# ... and those of a policy search, compared when both the stored run and the re-run search
SEARCHED = ("search", "search_seed", "policy_space", "policy_space_options", "search_options", "objectives",
            "constraints")
# how trials run, not what they measure: a --resume may change these
EXECUTION = ("runner", "cpus_per_trial", "gpus_per_trial", "max_concurrent", "max_retries", "ray_address")


def read_compress_config(folder: str | Path) -> CompressConfig:
    """A folder's compress.json; damaged or edited into something else, a `ConfigError` naming it."""
    from nas.config import read_json_file

    path = Path(folder) / CONFIG_FILE
    return CompressConfig.from_mapping(read_json_file(path, "compression settings"), source=str(path))


def _same(key: str, a: Any, b: Any) -> bool:
    if key in ("run", "out", "dataset", "weights") and a is not None and b is not None:
        return Path(str(a)).resolve() == Path(str(b)).resolve() or a == b
    plain = lambda v: tuple(v) if isinstance(v, list | tuple) else dict(v) if isinstance(v, Mapping) else v  # noqa: E731
    return plain(a) == plain(b)


def resume_config(folder: str | Path, given: Mapping[str, Any] | None = None) -> CompressConfig:
    """What `--resume DIR` continues: DIR's compress.json, in DIR (wherever the folder was made:
    a copied or moved folder resumes itself, not the original). ``given`` (the flags): how trials
    run may change; any other setting must equal the stored one — a resumed run finishes the
    trials it was making, with what its finished ones were made with."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{str(folder)!r} holds no {CONFIG_FILE}; nothing to resume")
    stored = read_compress_config(folder)
    stored = stored.replace(**({"run": str(folder)} if stored.run is not None else {"out": str(folder)}))
    for key, value in (given or {}).items():
        if key in EXECUTION or _same(key, getattr(stored, key), value):
            continue
        more = (f"; `nas-run compress --run {folder}` without --resume adds trials with it"
                if stored.run is not None and key not in MEASURED + SEARCHED else "; make another run for other settings")
        raise ConfigError(f"--resume continues {folder} as {path} says: {key} is {getattr(stored, key)!r} there, "
                          f"not {value!r}{more}")
    return stored.replace(**{k: v for k, v in (given or {}).items() if k in EXECUTION})


def compress_config(settings: Mapping[str, Any], resume: str | Path | None = None, source: str = "flags") -> CompressConfig:
    """The config of `nas-run compress` from the settings its flags give. ``--resume``: see
    `resume_config`. A re-run of ``--run DIR`` whose compress.json exists (to add policies or
    candidates): the measured settings not given are the stored ones, so the new trials are
    made as the finished ones were (a given one that differs is refused by `prepare_compress`)."""
    if resume is not None:
        return resume_config(resume, settings)
    run = settings.get("run")
    if run is not None and (Path(str(run)) / CONFIG_FILE).is_file():
        stored = read_compress_config(str(run))
        keep = MEASURED + (SEARCHED if stored.search is not None and settings.get("search") is not None else ())
        settings = {**{k: getattr(stored, k) for k in keep if k not in settings}, **settings}
    return CompressConfig.from_mapping(settings, source)


def _check_rerun(cfg: CompressConfig) -> None:
    """A second `compress --run DIR` measures its trials as the first did, or is refused."""
    if cfg.run is None or not (Path(cfg.run) / CONFIG_FILE).is_file():
        return
    stored = read_compress_config(cfg.run)
    keep = MEASURED + (SEARCHED if stored.search is not None and cfg.search is not None else ())
    for key in keep:
        old, new = getattr(stored, key), getattr(cfg, key)
        if not _same(key, old, new):
            raise ConfigError(
                f"{key} {new!r} differs from the {old!r} the compression trials of {cfg.run} were made with "
                f"({Path(cfg.run) / CONFIG_FILE}): a finished (architecture, policy) pair is not run again, so it "
                f"would change nothing for them; drop it to keep {old!r}"
            )


def builtin_policies(finetune_epochs: int = 8, lr: float = 3e-3) -> list[Policy]:
    """What `nas-run compress` tries when no policy is given: one of each kind, and a chain.

    Fine-tuning after structural changes distils from the uncompressed model (soft targets
    recover more than labels alone after pruning). It keeps the finetune pass's one-cycle
    schedule (warm-up to ``lr``, then cosine down): on the searched large-kernel models, cosine
    from the peak without warm-up and 3-10x lower peaks recovered less after pruning
    (results/compress.md); more epochs are what helps most. int8 uses the settings that were
    fastest in ONNX Runtime on this CPU (QOperator, per-channel; QDQ gives no speed-up here,
    BENCHMARKS.md) and the pass's defaults for the rest: GELUs stay float as one fused node,
    the file is compacted. The ratios are moderate: the default search's models have 1-10k
    parameters and 8-16 channels per layer, where every channel counts (results/compress.md).
    """
    ft = ("finetune", {"epochs": finetune_epochs, "lr": lr, "kd": True})
    plain_ft = ("finetune", {"epochs": finetune_epochs, "lr": lr})
    int8 = ("int8", {"format": "qoperator", "per_channel": True, "calibration": "minmax"})
    out = [
        Policy.of(("structured", {"ratio": 0.3, "importance": "l1"}), ft),
        Policy.of(("structured", {"ratio": 0.5, "importance": "l1"}), ft),
        Policy.of(("lowrank", {"target": 0.5, "allocation": "optimal"}), ft),
        Policy.of(("unstructured", {"sparsity": 0.5, "scope": "global"}), plain_ft),
        Policy.of(int8),
        Policy.of(("structured", {"ratio": 0.3, "importance": "l1"}), ft, int8),
    ]
    if finetune_epochs == 0:
        out = [Policy(tuple(s for s in p.passes if s.name != "finetune")) for p in out]
    return out


def policy_from_flags(
    prune: float | None = None,
    sparsity: float | None = None,
    lowrank: float | None = None,
    int8: bool = False,
    kd: bool = False,
    finetune_epochs: int = 8,
    importance: str = "l1",
    finetune_lr: float = 3e-3,
) -> Policy | None:
    """One policy chaining what the flags ask for, in the order that makes sense: structure
    first (pruning, low-rank), then unstructured sparsity, fine-tuning, and int8 last.
    ``lowrank`` is the kept fraction of parameters (``--lowrank 2x`` -> 0.5)."""
    steps: list[tuple[str, dict[str, Any]]] = []
    if prune:
        steps.append(("structured", {"ratio": prune, "importance": importance}))
    if lowrank:
        steps.append(("lowrank", {"target": lowrank}))
    if sparsity:
        steps.append(("unstructured", {"sparsity": sparsity}))
    if steps and finetune_epochs > 0:
        steps.append(("finetune", {"epochs": finetune_epochs, "lr": finetune_lr, "kd": kd}))
    if int8:
        steps.append(("int8", {}))
    return Policy.of(*steps) if steps else None


@dataclass
class CompressRun:
    out: Path
    config: CompressConfig
    store: RunStore
    controller: CompressionController | ControllerChain
    evaluator: CompressionEvaluator
    architectures: list[Genotype]
    policies: list[Policy]
    lock: Any = None
    created: bool = False

    def table(self) -> Any:
        """The compression trials, one row each (pandas)."""
        df = self.store.dataframe()
        if df.empty:
            return df
        return df[df["stage"] == COMPRESS_STAGE].reset_index(drop=True)

    def write_table(self) -> Path:
        path = self.out / "compress.csv"
        self.table().to_csv(path, index=False)
        if self.config.run is not None:
            from nas.search import write_tables

            write_tables(self.out, self.store)
        return path


def search_run_evaluator(
    run_cfg: Any, out: Path, space: Any, calib_size: int = 256, cpus_per_trial: float = 1.0
) -> CompressionEvaluator:
    """The evaluator of compression trials on a search run's architectures (``run_cfg`` its
    `SearchConfig`, ``space`` its resolved space): trained weights from ``out/weights`` (trained
    there first, seeded as the search trains, if missing), models kept under ``out/compressed``."""
    return CompressionEvaluator(
        dataset=run_cfg.dataset,
        artefacts_dir=str((out / ARTEFACTS).resolve()),
        data_seed=run_cfg.seed,
        val_fraction=run_cfg.val_fraction,
        standardize=True,
        seed=run_cfg.seed,
        space=run_cfg.space,
        space_options=tuple(sorted(dict(space.options).items())),
        weights_dir=str((out / "weights").resolve()),
        final_weights_dir=str((out / TRAINED_DIR).resolve()),
        train_epochs=run_cfg.epochs,
        recipe=run_cfg.recipe if isinstance(run_cfg.recipe, str) else json.dumps(dict(run_cfg.recipe), sort_keys=True),
        lr=run_cfg.lr,
        batch_size=run_cfg.batch_size,
        cache_dir=run_cfg.cache_dir,
        layout=run_cfg.layout,
        calib_size=calib_size,
        threads=max(1, int(cpus_per_trial)),
    )


def _top_candidates(store: RunStore, k: int) -> list[str]:
    """The ``k`` best finished architectures of the run: its feasible Pareto front first (best
    primary objective first), then, if the front holds fewer than ``k``, the next fronts of
    non-dominated sorting — `--top-k 3` compresses 3 candidates even when one dominates all."""
    records = store.records()
    recs = [r for r in records if r.get("stage") in ("search", None) and r["status"] == "complete"]
    if not recs:  # a joint run: its (architecture, policy) pairs, best pair of each architecture first
        from .joint import is_joint_trial

        recs = [r for r in records if is_joint_trial(r) and r["status"] == "complete"]
    recs = [r for r in recs if losses(store.objectives, r["metrics"]) is not None]
    if not recs:
        raise ConfigError("the run has no completed trials to compress yet")
    recs = [r for r in recs if not (r.get("violation") or 0) > 0]
    if not recs:
        raise ConfigError(f"the run has no completed trial that meets its constraints {[str(c) for c in store.constraints]}")
    # a joint run may hold one architecture twice
    return list(dict.fromkeys(r["genotype"] for r in store.ranked(recs)))[:k]


def prepare_compress(config: CompressConfig | None = None, resume: str | Path | None = None) -> CompressRun:
    """Validate everything (policies against the model, data against the model), open the
    store; run nothing. Bad input raises before anything is written."""
    from nas.search import _lock_run_folder, read_config

    if resume is not None and config is None:
        cfg = resume_config(resume)
    elif config is None:
        raise ConfigError("nothing to compress: give --run DIR or --model SPEC")
    else:
        cfg = config  # with ``resume``: `resume_config`'s, with the flags checked against the stored ones
        if resume is None:
            _check_rerun(cfg)

    policies = [Policy.from_json(p) for p in cfg.policies] or builtin_policies(cfg.finetune_epochs, cfg.finetune_lr)
    if cfg.search is not None:
        policies = []  # a policy search proposes its own
    if cfg.run is not None:
        out = Path(cfg.run)
        run_cfg = read_config(out)
        from search_spaces import get_space

        space = get_space(run_cfg.space, **dict(run_cfg.space_options))
        if run_cfg.tiny:
            space = space.tiny()
        evaluator = search_run_evaluator(run_cfg, out, space, cfg.calib_size, cfg.cpus_per_trial)
        objectives_from = None
        from nas.runners.ray_tune import SpaceParser

        parse: Callable[[str], Genotype] = SpaceParser(run_cfg.space, dict(space.options))
    else:
        out = Path(str(cfg.out))
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {str(out)!r} is a file; give a folder")
        if resume is None and (out / CONFIG_FILE).exists():
            raise ConfigError(f"{str(out)!r} already holds a compression run; continue it with --resume {out}")
        evaluator = CompressionEvaluator(
            dataset=str(cfg.dataset),
            artefacts_dir=str((out / ARTEFACTS).resolve()),
            data_seed=cfg.seed,
            standardize=cfg.standardize,
            seed=cfg.seed,
            model_spec=cfg.model,
            model_weights=cfg.weights,
            layout=cfg.layout,
            loss=cfg.loss or "ce",
            metric=cfg.metric,
            calib_size=cfg.calib_size,
            threads=max(1, int(cfg.cpus_per_trial)),
        )
        objectives_from = parse_objectives(cfg.objectives)
        for o in objectives_from:
            if o.metric not in COMPRESS_METRICS:
                raise UnknownNameError("metric for compression objectives", o.metric, COMPRESS_METRICS)
        parse = Genotype.from_str

    from nas.collapse import drop_limit

    # a trial losing more than the run allows is flagged (large_drop); 5 points without a constraint
    evaluator = dataclasses.replace(evaluator, drop_limit=drop_limit(cfg.constraints))
    data = evaluator.data()  # a bad data set fails now
    if cfg.model is not None and cfg.loss is None:
        kind = getattr(data, "label_kind", "classes")
        loss = LOSS_FOR_LABELS.get(kind, "ce")
        if loss != "ce":
            print(f"fine-tuning loss: {loss} (the labels of {data.name} are {kind} targets); --loss chooses another")
        cfg, evaluator = cfg.replace(loss=loss), dataclasses.replace(evaluator, loss=loss)
    # pre-flight on the real model: layer names, data shape, TorchScript limits
    if cfg.model is not None:
        from .user_model import FIXED_GRAPH, check_input, load_user_model

        user = load_user_model(cfg.model, cfg.weights, data.input_shape, data.num_classes)
        width = check_input(user.module, data)
        if data.label_kind == "classes" and width > data.num_classes:
            # the model's head knows classes the labels do not show (a subset of its data): its
            # width is the class count; probed again on --resume, so nothing needs keeping
            evaluator = dataclasses.replace(evaluator, num_classes=width)
            data = evaluator.data()
        from .tasks import check_task

        check_task(evaluator.task(), user.module, data)  # the loss and metric run on a batch, now
        target = user.module
        if user.kind in FIXED_GRAPH and (cfg.nni_config or any(needs_eager(p) for p in policies)):
            from .onnx_to_torch import to_eager

            target = to_eager(user.module, tuple(data.input_shape))  # an unknown op: one line, now
        for pol in policies:
            if user.kind not in FIXED_GRAPH or needs_eager(pol):
                check_policy(pol, target)
        architectures = [user_genotype(user.sha1)]
    else:
        store_ro = _open_run_store(out, read_only=True)
        # parsed by the run's space: strings of older genotype versions come back in today's form
        architectures = [parse(text) for text in _top_candidates(store_ro, cfg.top_k)]
        # a final-trained architecture (`nas-run train`) is what the user chose: it goes first,
        # with its final weights, and the user is told
        trained = [parse(r["genotype"]) for r in store_ro.records() if r["stage"] == "train" and r["status"] == "complete"]
        trained = [g for g in dict.fromkeys(trained) if evaluator.final_weights(g) is not None]
        architectures = (trained + [g for g in architectures if g not in trained])[: max(cfg.top_k, len(trained))]
        for g in architectures:  # a tampered or truncated weights file: one line before the store opens
            evaluator.verify_base(g)
        for g in trained:
            print(f"compressing {g.id} from its final-trained weights (nas-run train): {evaluator.final_weights(g)}")
        probe = evaluator.trainer()
        # the training form: the passes start from it (see `deploy_policy`)
        model = probe.search_space().build(architectures[0], data.input_shape, data.num_classes)
        for pol in policies:
            check_policy(pol, model)
    if cfg.nni_config is not None:
        # converted once, against the real model, and kept as a policy text: a resume does not
        # depend on the file any more
        from .nni_config import policy_from_nni_config

        nni_target = target if cfg.model is not None else model
        nni_policy = policy_from_nni_config(_read_nni_config(cfg.nni_config), nni_target)
        check_policy(nni_policy, nni_target)
        policies = [*([Policy.from_json(p) for p in cfg.policies]), nni_policy]
        cfg = cfg.replace(policies=tuple(p.to_str() for p in policies), nni_config=None)
    if cfg.runner == "ray":
        from nas.runners.ray_tune import check_ray_address

        check_ray_address(cfg.ray_address)

    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {str(out)!r}: {exc.strerror or exc}") from None
    lock = _lock_run_folder(out)
    try:
        store = _open_run_store(out) if cfg.run is not None else _user_store(out, objectives_from or ())
    except Exception:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    (out / CONFIG_FILE).write_text(json.dumps(cfg.to_json(), indent=2))
    controller: CompressionController | ControllerChain
    if cfg.search is not None:
        try:
            controller = _policy_search(cfg, out, store, evaluator, architectures)
        except BaseException:
            lock.close()
            raise
        controller.parse = parse
    else:
        candidates = [(g, p.to_str()) for g in architectures for p in policies]
        controller = CompressionController(store, candidates, budget=cfg.finetune_epochs, seed=cfg.seed, parse=parse)
    return CompressRun(out, cfg, store, controller, evaluator, architectures, policies, lock, created)


def _policy_search(
    cfg: CompressConfig, out: Path, store: RunStore, evaluator: CompressionEvaluator, architectures: Sequence[Genotype]
) -> ControllerChain:
    """One policy space per architecture (measured on its trained model, or read back from the
    run folder) and a controller searching it."""
    from nas.objectives import parse_constraints

    from .policy_search import policy_controllers, policy_space_for

    objectives = parse_objectives(cfg.objectives)  # names checked by CompressConfig
    constraints = parse_constraints(cfg.constraints)
    finetune = {"epochs": cfg.finetune_epochs, "lr": cfg.finetune_lr, "kd": True}
    spaces = [
        (g, policy_space_for(out, g, functools.partial(_trained_forms, evaluator, g), evaluator.data(),
                             cfg.policy_space, finetune, cfg.policy_space_options))
        for g in architectures
    ]
    return policy_controllers(
        out, store, spaces, cfg.search, cfg.budget, objectives, constraints,
        cfg.seed if cfg.search_seed is None else cfg.search_seed, cfg.finetune_epochs,
        options=dict(cfg.search_options),
    )


def _trained_forms(evaluator: CompressionEvaluator, g: Genotype) -> tuple[Any, Any]:
    """(training form, deploy form) of a trained model, TorchScript turned eager (for probes)."""
    base = evaluator.load_base(g)
    if base.kind == "torchscript":
        base = evaluator.as_eager(base)
    return base.module, base.deploy


def _read_nni_config(path: str) -> list[Any]:
    """An NNI ``config_list``: a JSON/YAML/TOML file holding the list, or a table with a
    ``config_list`` key."""
    from nas.config import load_config_file

    p = Path(path)
    if p.suffix == ".json" and p.is_file():
        try:
            data: Any = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"cannot parse {p}: {exc}") from None
    else:
        data = load_config_file(p)
    if isinstance(data, Mapping):
        data = data.get("config_list")
    if not isinstance(data, list):
        raise ConfigError(f"{p}: expected an NNI config_list (a list of tables, or config_list = [...])")
    return data


def _open_run_store(out: Path, read_only: bool = False) -> RunStore:
    from nas.search import open_store

    return open_store(out, read_only=read_only)


def _user_store(out: Path, objectives: Sequence[Objective]) -> RunStore:
    return RunStore(_user_store_url(out), objectives, (), study_name=user_study_name(out))


def _user_store_url(out: Path) -> str:
    return f"sqlite:///{(out / 'study.db').resolve()}"


def user_study_name(out: Path) -> str:
    """The study of a --model folder is named after it; a folder moved or copied since keeps the
    old name inside its study.db, then the one study there (found, not made anew beside it)."""
    name = out.resolve().name
    if (out / "study.db").is_file():
        import optuna

        from nas.store import check_sqlite

        url = _user_store_url(out)
        check_sqlite(url)
        names = optuna.study.get_all_study_names(storage=url)
        if name not in names and len(names) == 1:
            return names[0]
    return name


def run_compress(
    config: CompressConfig | None = None,
    resume: str | Path | None = None,
    on_result: Callable[[Candidate, TrialResult], None] | None = None,
) -> CompressRun:
    run = prepare_compress(config, resume)
    cfg = run.config
    try:
        if cfg.runner == "ray":
            from nas.runners.ray_tune import run_ray

            run_ray(
                run.controller,  # type: ignore[arg-type]
                run.evaluator,
                cpus_per_trial=cfg.cpus_per_trial,
                gpus_per_trial=cfg.gpus_per_trial,
                max_concurrent=cfg.max_concurrent,
                address=cfg.ray_address,
                scheduler="none",  # one fine-tuning per candidate: nothing to stop early
                storage_path=str((run.out / "ray-compress").resolve()),
                parse=run.controller.parse,
                on_result=on_result,
                max_retries=cfg.max_retries,
            )
        else:
            from nas.runners.local import run_local

            run_local(run.controller, run.evaluator, on_result=on_result)  # type: ignore[arg-type]
    except KeyboardInterrupt:
        run.write_table()
        raise KeyboardInterrupt(f"nas-run compress --resume {run.out}") from None
    finally:
        if run.lock is not None and not run.lock.closed:
            run.lock.close()
    run.write_table()
    return run
