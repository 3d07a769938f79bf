"""`TrainingEvaluator`: build a genotype's model, train it on a named data set, measure it.

A frozen dataclass of plain values, so Ray ships it to workers once and each worker loads the
data set itself (cached per process). Validation accuracy is reported after every epoch (the
signal ASHA stops on); test accuracy is computed only when ``with_test`` is set (the final
report), so a search never selects on the test split.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search_spaces import ConfigError, Genotype, SearchSpace, get_space

from .trial import Reporter

if TYPE_CHECKING:
    import torch

    from .data import Dataset
    from .recipes import Recipe
    from .trainer import Trainer

__all__ = ["TrainingEvaluator", "save_weights"]


@functools.lru_cache(maxsize=4)
def _dataset(
    name: str, seed: int, cache_dir: str | None = None, val_fraction: float = 0.2, layout: str | None = None
) -> Dataset:
    from .data import load_dataset

    return load_dataset(name, seed=seed, cache_dir=cache_dir, val_fraction=val_fraction, layout=layout)


@dataclass(frozen=True)
class TrainingEvaluator:
    space: str
    space_options: Mapping[str, Any] = field(default_factory=dict)
    dataset: str = "digits"
    data_seed: int = 0
    val_fraction: float = 0.2  # of the labelled pool, held out for validation (the run's split)
    seed: int = 0
    # > 1: each trial trains on that many folds of train+val and reports their mean (nas.crossval)
    cv: int = 1
    # how candidates train: a recipe name (quick, standard, darts) or a table ({"base": ..., ...});
    # batch_size / lr / weight_decay, when given, override the recipe's
    recipe: str | Mapping[str, Any] = "quick"
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    cache_dir: str | None = None  # where folders and .npz files are decoded (nas.datasource.cache_root)
    layout: str | None = None  # the axes of a user's x (nas.data.LAYOUTS), if the data do not say
    device: str = "auto"  # "auto": the GPU a trial is given if any, else the CPU
    # torch threads for training; the runner gives each trial its CPUs. More threads than
    # cores (two trials x default threads on 2 cores) made small models ~10x slower here.
    threads: int | None = 1
    latency_threads: int = 1  # latency is timed on the CPU, batch 1, this many threads
    measure_latency: bool = True
    onnx_latency: bool = False  # also time the exported model in ONNX Runtime (onnx_latency_ms)
    with_test: bool = False
    max_train_batches: int | None = None  # cap per epoch, for smoke tests on big data
    # where a finished trial's trained weights go (safetensors, one file per genotype, seed and
    # budget: training is seeded, so the triple names the weights); None keeps none
    weights_dir: str | None = None

    def __post_init__(self) -> None:
        if (self.batch_size is not None and self.batch_size < 1) or (self.lr is not None and self.lr <= 0):
            raise ConfigError(f"batch_size must be >= 1 and lr > 0, got {self.batch_size}, {self.lr}")
        if type(self.cv) is not int or self.cv < 1:
            raise ConfigError(f"cv must be an integer >= 1 (1: no cross-validation), got {self.cv!r}")
        self.training_recipe()  # a bad recipe fails here, in the driver
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")

    # -- pieces ----------------------------------------------------------------------------------
    def search_space(self) -> SearchSpace:
        return get_space(self.space, **dict(self.space_options))

    def data(self) -> Dataset:
        return _dataset(self.dataset, self.data_seed, self.cache_dir, self.val_fraction, layout=self.layout)

    def training_recipe(self) -> Recipe:
        from .recipes import get_recipe

        return get_recipe(self.recipe, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay)

    def record(self) -> dict[str, Any]:
        """What every trial's record holds about how it was trained (the recipe, replayable)."""
        return {"recipe": self.training_recipe().to_dict()}

    def _device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def static_metrics(self, genotype: Genotype) -> dict[str, float]:
        """Params and FLOPs without training: used to reject candidates that break a
        constraint before they cost a trial."""
        from .cost import profile

        data = self.data()
        model = self.search_space().build(genotype, data.input_shape, data.num_classes)
        stats = profile(model, data.input_shape)
        return {"params": float(stats.params), "flops": float(stats.flops), "macs": float(stats.macs)}

    # -- the evaluation ----------------------------------------------------------------------------
    def weights_path(self, genotype: Genotype, budget: int) -> Path | None:
        """Where the trained weights of (genotype, budget) are kept, if this evaluator keeps them."""
        if self.weights_dir is None:
            return None
        return Path(self.weights_dir) / f"{genotype.id}-s{self.seed}-e{budget}.safetensors"

    def train_model(
        self, genotype: Genotype, budget: int, report: Reporter | None = None
    ) -> tuple[nn.Module, float, torch.device]:
        """Build and train the genotype's model: (trained model, last val_acc, device)."""
        trainer = self.trainer(genotype, budget)
        val_acc = trainer.run(report)
        return trainer.eval_model(), val_acc, trainer.device

    def trainer(
        self,
        genotype: Genotype,
        budget: int,
        progress: bool = False,
        data: Dataset | None = None,
        parent: str = "",
        inherited: dict[str, float] | None = None,
    ) -> Trainer:
        """A `Trainer` for the genotype's freshly built (seeded) model; nothing trained yet.
        ``data``: another split of the same data set (a cross-validation fold). ``parent``
        (`nas.inherit.Parent` text): the model starts from that trained trial's weights, carried
        over by `search_spaces.morph`; what carried over goes into ``inherited``."""
        import torch

        from .trainer import Trainer

        if self.threads is not None:
            torch.set_num_threads(self.threads)
        data = data if data is not None else self.data()
        recipe = self.training_recipe()
        torch.manual_seed(self.seed)
        model = self.build(genotype, auxiliary=recipe.auxiliary)
        if parent:  # before the Trainer: its EMA copy and optimiser must see the inherited weights
            from .inherit import load_parent

            report = load_parent(model, self.search_space(), genotype, parent, self.seed)
            if inherited is not None:
                inherited.update(report)
        return Trainer(
            model, data, recipe, budget, self.seed, self._device(), self.max_train_batches, progress=progress
        )

    def build(self, genotype: Genotype, auxiliary: bool = False) -> nn.Module:
        """The genotype's model; cell networks get their auxiliary head when the recipe trains one."""
        data = self.data()
        options = dict(self.space_options)
        if auxiliary and self.space in ("darts", "nasnet"):
            options["auxiliary"] = True
        return get_space(self.space, **options).build(genotype, data.input_shape, data.num_classes)

    def __call__(self, genotype: Genotype, budget: int, report: Reporter, parent: str = "") -> dict[str, float]:
        if self.cv > 1:
            if parent:  # the parent trained on fold 0's split: other folds would validate on its training data
                raise ConfigError("weight inheritance needs cv = 1")
            metrics = self._cross_validated(genotype, budget, report)
        else:
            inherited: dict[str, float] = {}
            trainer = self.trainer(genotype, budget, parent=parent, inherited=inherited)
            trainer.run(report)
            # the compression stage starts from these trained weights
            metrics = {**self.measure_trained(trainer, self.with_test, self.weights_path(genotype, budget)), **inherited}
        from .artefact import keep_trial_artefact

        keep_trial_artefact(self, genotype, budget, metrics)  # the kept weights' manifest (none kept: nothing)
        return metrics

    def _cross_validated(self, genotype: Genotype, budget: int, report: Reporter) -> dict[str, float]:
        """The candidate trained on every fold (`nas.crossval.cv_folds`), epoch by epoch across the
        folds, so each epoch's report (what ASHA stops on) is already the mean over folds. The kept
        weights, test accuracy and costs are fold 0's: the model of the run's own train/val split."""
        import numpy as np

        from .chance import at_chance, chance_level
        from .crossval import cv_folds, fold_mean

        folds = cv_folds(self.data(), self.cv)
        trainers = [self.trainer(genotype, budget, data=fold) for fold in folds]
        summary: dict[str, float] = {}
        while trainers[0].epoch < budget:
            summary = fold_mean([t.train_epoch() for t in trainers])
            report(trainers[0].epoch, summary)
        metrics = self.measure_trained(trainers[0], self.with_test, self.weights_path(genotype, budget))
        for key in ("val_acc", "val_loss", "val_acc_std", "folds"):
            if key in summary:
                metrics[key] = summary[key]
        pool = np.concatenate([fold.y_val for fold in folds])  # every train+val label, once
        metrics["chance_acc"] = chance_level(pool)
        metrics["at_chance"] = float(at_chance(metrics["val_acc"], pool))
        return metrics

    def measure_trained(self, trainer: Trainer, with_test: bool, weights: Path | None) -> dict[str, float]:
        """A finished `Trainer`'s metrics (accuracy, throughput, memory, costs); its evaluated
        model's weights go to ``weights`` (training-only parts left out). Trials and `train` alike."""
        from .chance import at_chance, chance_level

        model, device, history = trainer.eval_model(), trainer.device, trainer.history
        data = self.data()
        # gpu: 1 when this trial trained on a CUDA device, so a run's records show that GPU
        # trials really used one (Ray hides the GPUs a trial was not given)
        metrics: dict[str, float] = {
            "val_acc": history[-1]["val_acc"] if history else 0.0,
            "epochs": float(trainer.epochs),
            "gpu": float(device.type == "cuda"),
            # what training really used: the asked batch cut on small data (nas.trainer.capped_batch_size)
            "batch_size": float(trainer.recipe.batch_size),
            # a model at the majority-class share learned nothing: flagged, so it is not read as a measurement
            "chance_acc": chance_level(trainer.data.y_val),
        }
        metrics["at_chance"] = float(at_chance(metrics["val_acc"], trainer.data.y_val))
        if history and "val_loss" in history[-1]:  # breaks ties in val_acc (RunStore.ranked)
            metrics["val_loss"] = history[-1]["val_loss"]
        if history:  # throughput and memory of the training itself
            metrics["images_per_s"] = sum(h["images_per_s"] for h in history) / len(history)
            metrics["peak_rss_mb"] = max(h["peak_rss_mb"] for h in history)
        if with_test:
            from .trainer import accuracy

            metrics["test_acc"] = accuracy(model, data.x_test, data.y_test, 256, device)
        model = model.cpu()
        metrics.update(self._costs(model, data.input_shape))
        if weights is not None:
            save_weights(model, weights, drop_prefixes=("auxiliary_head.",))
        return metrics

    def _costs(self, model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, float]:
        from .cost import measure, measure_latency, profile

        if not self.measure_latency:
            stats = profile(model, input_shape)
            return {k: float(getattr(stats, k)) for k in ("params", "flops", "macs", "activations")}
        # CPU, batch 1: the deployment case FLOPs do not predict (depthwise, large kernels)
        out = measure(model, input_shape, batch_size=1, threads=self.latency_threads, warmup=3, repeats=15)
        if self.onnx_latency:
            lat = measure_latency(model, input_shape, 1, self.latency_threads, 3, 15, runtime="onnxruntime")
            out["onnx_latency_ms"] = lat.median_ms
        return out


def save_weights(model: nn.Module, path: Path, drop_prefixes: tuple[str, ...] = ()) -> None:
    """The model's state dict as safetensors, written atomically (a killed trial leaves no
    half file that a later compression would read), its SHA-256 in ``PATH.sha256`` (`nas.integrity`:
    checked before anything reads it). ``drop_prefixes``: training-only parts (an auxiliary head)
    that the deployed model, built without them, does not hold."""
    from safetensors.torch import save_file

    from .integrity import replace_with_digest

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(drop_prefixes)}
    # contiguous clones: safetensors refuses views that share storage
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(tmp))
    replace_with_digest(tmp, path)


if TYPE_CHECKING:
    from torch import nn
