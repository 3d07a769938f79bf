"""`nas-run train`: train a run's chosen architecture from scratch with a full recipe.

NASNet, DARTS and every NAS paper search with a cheap proxy (a few epochs, the ``quick`` recipe),
then train the winner from scratch with a full recipe; this is that step. Each (architecture, seed)
is one trial of stage ``train`` in the run's store, with its recipe, learning curve and the test
accuracy measured once, at the end. A checkpoint (weights, optimizer, schedule, grad scaler, EMA,
random generators, history: one safetensors file, its JSON part in the header, replaced atomically)
is written after every epoch under ``DIR/train/``; ``resume=True`` continues from it after a crash
or kill -9 and ends with the same weights as an uninterrupted run. The final weights go to
``DIR/trained/<genotype id>.safetensors`` (the seed with the best validation accuracy), where
`compress --run` and `export` find them. Each seed's final model and the published copy are
artefacts (`nas.artefact`): the weights with a manifest (genotype, space, input spec, recipe,
epochs, seed, split, metrics, file hashes).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search_spaces import ConfigError, Genotype

from .integrity import replace_with_digest, verify_file

if TYPE_CHECKING:
    from .store import RunStore
    from .trainer import Trainer

__all__ = ["TRAINED_DIR", "TrainResult", "best_architecture", "fit_seed", "train_final"]

TRAINED_DIR = "trained"  # DIR/trained/<genotype id>.safetensors: the final-trained weights
CHECKPOINT_DIR = "train"  # DIR/train/<key>/checkpoint.safetensors while (and after) training
TRAIN_ON = ("train", "trainval")


@dataclass(frozen=True)
class TrainResult:
    number: int
    genotype: str
    seed: int
    metrics: dict[str, float]
    weights: Path
    resumed_from: int  # epochs already done when this call started (0: from scratch)


def best_architecture(store: RunStore) -> dict[str, Any]:
    """The run's best feasible finished search trial (`RunStore.ranked`: as `compress --run`
    orders its candidates)."""
    done = [
        r for r in store.records()
        if r.get("stage") in ("search", None) and r["status"] == "complete" and not (r.get("violation") or 0) > 0
    ]  # fmt: skip
    ranked = store.ranked(done)
    if not ranked:
        raise ConfigError("the run has no completed trial that meets its constraints to train")
    return dict(ranked[0])


def train_final(
    run_dir: str | os.PathLike[str],
    epochs: int,
    recipe: str | dict[str, Any] = "standard",
    trial: int | None = None,
    genotype: str | None = None,
    train_on: str = "train",
    seeds: Sequence[int] = (0,),
    resume: bool = False,
    cache_dir: str | None = None,
    progress: bool = False,
    on_epoch: Callable[[int, int, dict[str, float]], None] | None = None,
    device: str = "auto",
    threads: int | None = None,
    runner: str = "local",
    cpus_per_trial: float = 1.0,
    gpus_per_trial: float = 0.0,
    ray_address: str | None = None,
) -> list[TrainResult]:
    """Train the chosen architecture once per seed; ``on_epoch(seed, epoch, metrics)`` after each epoch.
    ``runner="ray"``: the seeds train at once as Ray tasks (``cpus_per_trial``/``gpus_per_trial``
    each, on a cluster at ``ray_address``); the run folder must then be on a filesystem they share."""
    from .recipes import get_recipe
    from .search import _lock_run_folder, open_store, read_config
    from .training import TrainingEvaluator
    from .trial import Candidate, TrialResult

    out = Path(run_dir)
    if type(epochs) is not int or epochs < 1:
        raise ConfigError(f"--epochs must be an integer >= 1, got {epochs!r}")
    if runner not in ("local", "ray"):
        raise ConfigError(f"--runner must be local or ray, got {runner!r}")
    if train_on not in TRAIN_ON:
        raise ConfigError(f"--train-on must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")
    if not seeds or any(type(s) is not int or s < 0 for s in seeds):
        raise ConfigError(f"seeds must be integers >= 0, got {list(seeds)!r}")
    cfg = read_config(out)
    lock = _lock_run_folder(out)  # one driver per run folder: a running search or train is refused
    try:
        store = open_store(out)
        from search_spaces import get_space

        space = get_space(cfg.space, **dict(cfg.space_options))
        if cfg.tiny:
            space = space.tiny()
        g, source = _chosen(store, space, trial, genotype)
        rec = get_recipe(recipe)
        evaluators = [
            TrainingEvaluator(
                space=cfg.space, space_options=dict(space.options), dataset=cfg.dataset, data_seed=cfg.seed,
                val_fraction=cfg.val_fraction,
                seed=seed, recipe=rec, cache_dir=cache_dir, device=device, layout=cfg.layout,
                threads=threads if threads is not None else max(1, int(cfg.cpus_per_trial)),
            )  # fmt: skip
            for seed in seeds
        ]
        evaluators[0].data()  # a missing or broken data set fails now, before any row is written
        opened = [_open_trial(out, store, ev, g, source, epochs, train_on, resume) for ev in evaluators]
        calls = [(ev, g.to_str(), epochs, train_on, str(folder)) for ev, (_, folder) in zip(evaluators, opened, strict=True)]
        t0 = time.perf_counter()
        if runner == "ray":
            from .runners.ray_tune import run_tasks

            done = run_tasks(fit_seed, calls, cpus_per_trial, gpus_per_trial, ray_address)
        else:
            done = [fit_seed(*call, progress=progress, on_epoch=on_epoch) for call in calls]
        results = []
        for (number, folder), (metrics, history, resumed), ev in zip(opened, done, evaluators, strict=True):
            store.finish(
                Candidate(g, epochs, number),
                TrialResult("complete", metrics, tuple(history), duration_s=time.perf_counter() - t0),
            )
            results.append(TrainResult(number, g.to_str(), ev.seed, metrics, folder / "model.safetensors", resumed))
        from .store import tie_break

        # equal accuracy: the lower validation loss
        best = max(results, key=lambda r: (r.metrics.get("val_acc", 0.0), -tie_break(r.metrics)))
        _publish(best.weights, out / TRAINED_DIR / f"{g.id}.safetensors", out)
        return results
    finally:
        lock.close()


def _publish(weights: Path, target: Path, out: Path) -> None:
    """The best seed's artefact copied to where `compress --run` and `export` find the architecture's
    final model: its weights, and its manifest naming where it came from. Copied only as written
    (the seed's artefact is verified first)."""
    from .artefact import open_artefact, write_artefact

    source = open_artefact(weights)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(weights.read_bytes())
    replace_with_digest(tmp, target)
    fields = {k: v for k, v in source.manifest.items() if k not in ("nas_run_artefact", "kind", "model_file", "files", "producer")}
    write_artefact(target, "train", **{**fields, "source": str(weights.relative_to(out))})


def _chosen(store: RunStore, space: Any, trial: int | None, genotype: str | None) -> tuple[Genotype, int | None]:
    if trial is not None and genotype is not None:
        raise ConfigError("give --trial or --genotype, not both")
    if genotype is not None:
        return space.from_str(genotype), None
    if trial is None:
        best = best_architecture(store)
        return space.from_str(best["genotype"]), best["number"]
    by_number = {r["number"]: r for r in store.records()}
    if trial not in by_number:
        span = f"0..{max(by_number)}" if by_number else "none yet"
        raise ConfigError(f"the run has no trial {trial} (trials: {span})")
    rec = by_number[trial]
    if rec.get("stage") not in ("search", None, "train") or not rec.get("genotype"):
        raise ConfigError(f"trial {trial} is a {rec.get('stage')} trial, not an architecture of the search")
    return space.from_str(rec["genotype"]), trial


def _open_trial(
    out: Path, store: RunStore, evaluator: Any, g: Genotype, source: int | None, epochs: int, train_on: str,
    resume: bool,
) -> tuple[int, Path]:  # fmt: skip
    """Checks against earlier trains of the same (architecture, seed, recipe, epochs, split), then the
    store row: the running one a resume continues, else a new one. (trial number, checkpoint folder)."""
    recipe = evaluator.training_recipe()
    folder = out / CHECKPOINT_DIR / f"{g.id}-s{evaluator.seed}-{recipe.name}-e{epochs}-{train_on}"
    strategy = f"train:{recipe.name}"
    rows = [
        r for r in store.records()
        if r["stage"] == "train" and r["genotype_id"] == g.id and r["seed"] == evaluator.seed
        and r["budget"] == epochs and r["strategy"] == strategy
    ]  # fmt: skip
    if any(r["status"] == "complete" for r in rows) and (folder / "model.safetensors").is_file():
        raise ConfigError(
            f"{g.id} seed {evaluator.seed} is already trained with recipe {recipe.name!r} for {epochs} epochs "
            f"({folder / 'model.safetensors'}); change --epochs, --recipe or --seeds to train another"
        )
    if (folder / "checkpoint.safetensors").is_file() and not resume:
        raise ConfigError(
            f"{folder.name} has a checkpoint from an earlier, unfinished train ({folder / 'checkpoint.safetensors'}): "
            "pass --resume to continue it"
        )
    if (folder / "checkpoint.safetensors").is_file():  # checked before the store is touched
        verify_file(folder / "checkpoint.safetensors", "checkpoint")
    running = [r for r in rows if r["status"] == "running"]
    if running and resume:
        return running[-1]["number"], folder
    number = store.start(
        g.to_str(), g.id, epochs, strategy, evaluator.seed, stage="train",
        extra={"recipe": recipe.to_dict(), "train_on": train_on, "source_trial": source,
               "weights": str((folder / "model.safetensors").relative_to(out))},
    )  # fmt: skip
    return number, folder


def fit_seed(
    evaluator: Any, genotype: str, epochs: int, train_on: str, folder: str, progress: bool = False,
    on_epoch: Callable[[int, int, dict[str, float]], None] | None = None,
) -> tuple[dict[str, float], list[dict[str, float]], int]:  # fmt: skip
    """Train one seed from its checkpoint (if any) to the end; runs in the driver or in a Ray task.
    Writes the checkpoint after every epoch and the final weights; (metrics, history, epochs resumed)."""
    g = evaluator.search_space().from_str(genotype)
    ckpt, final = Path(folder) / "checkpoint.safetensors", Path(folder) / "model.safetensors"
    trainer = evaluator.trainer(g, epochs, progress=progress)
    if train_on == "trainval":
        trainer.data = _with_val_in_train(trainer.data)
    if ckpt.is_file():
        trainer.load_state(*_read_checkpoint(ckpt))
    resumed = trainer.epoch

    def after_epoch(t: Trainer) -> None:
        _write_checkpoint(ckpt, t)
        if on_epoch is not None:
            on_epoch(evaluator.seed, t.epoch, t.history[-1])

    trainer.run(after_epoch=after_epoch)
    # test accuracy on the run's real test split (``evaluator.data()``), measured once, here
    metrics = evaluator.measure_trained(trainer, with_test=True, weights=final)
    from .artefact import describe_training, write_artefact

    # the final model as an artefact: the weights and the manifest that says what they are
    write_artefact(final, "train", **describe_training(evaluator, g, epochs, metrics, train_on=train_on))
    return metrics, trainer.history, resumed


def _with_val_in_train(data: Any) -> Any:
    """The same data set with the validation rows added to the training split (``--train-on
    trainval``: the final model sees every labelled row; its val_acc is then not held out)."""
    import dataclasses

    import numpy as np

    from .datasource import StandardizedArray

    xt, xv = data.x_train, data.x_val
    if xt.raw is not xv.raw:
        raise ConfigError("--train-on trainval needs train and val rows from one source")
    rows = StandardizedArray(xt.raw, np.concatenate([xt.index, xv.index]), data.mean, data.std, 1.0)
    rows._a, rows._b = xt._a, xt._b  # the training split's standardisation, unchanged
    return dataclasses.replace(data, x_train=rows, y_train=np.concatenate([data.y_train, data.y_val]))


def _write_checkpoint(path: Path, trainer: Trainer) -> None:
    """One file, replaced atomically: a kill at any instant leaves the previous epoch's checkpoint."""
    from safetensors.torch import save_file

    tensors, rest = trainer.state_tensors()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(
        {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()},
        str(tmp),
        metadata={"nas_run_train_state": json.dumps(rest)},
    )
    replace_with_digest(tmp, path)  # the sidecar names the old and new file while it is swapped


def _read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    verify_file(path, "checkpoint")  # an edited or truncated checkpoint: one line, nothing resumed
    try:
        with safe_open(str(path), framework="pt") as fh:
            rest = json.loads((fh.metadata() or {})["nas_run_train_state"])
        return load_file(str(path)), rest
    except Exception as exc:  # a damaged checkpoint: say which file, never a traceback
        raise ConfigError(f"cannot read the checkpoint {path} ({exc}); delete it to train from scratch") from None
