"""`TrainingEvaluator`: build a genotype's model, train it on a named data set, measure it.

A frozen dataclass of plain values, so Ray ships it to workers once and each worker loads the
data set itself (cached per process). Validation accuracy is reported after every epoch (the
signal ASHA stops on); test accuracy is computed only when ``with_test`` is set (the final
report), so a search never selects on the test split.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search_spaces import ConfigError, Genotype, SearchSpace, get_space

from .trial import Reporter

if TYPE_CHECKING:
    import torch

    from .data import Dataset

__all__ = ["TrainingEvaluator", "save_weights"]


@functools.lru_cache(maxsize=4)
def _dataset(name: str, seed: int) -> Dataset:
    from .data import load_dataset

    return load_dataset(name, seed=seed)


@dataclass(frozen=True)
class TrainingEvaluator:
    space: str
    space_options: Mapping[str, Any] = field(default_factory=dict)
    dataset: str = "digits"
    data_seed: int = 0
    seed: int = 0
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
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
        if self.batch_size < 1 or self.lr <= 0:
            raise ConfigError(f"batch_size must be >= 1 and lr > 0, got {self.batch_size}, {self.lr}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")

    # -- pieces ----------------------------------------------------------------------------------
    def search_space(self) -> SearchSpace:
        return get_space(self.space, **dict(self.space_options))

    def data(self) -> Dataset:
        return _dataset(self.dataset, self.data_seed)

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
        import torch
        from torch import nn

        if self.threads is not None:
            torch.set_num_threads(self.threads)
        data = self.data()
        device = self._device()
        torch.manual_seed(self.seed)
        model = self.search_space().build(genotype, data.input_shape, data.num_classes).to(device)
        x_tr, y_tr = _tensor(data.x_train, device), _tensor(data.y_train, device)
        x_va, y_va = _tensor(data.x_val, device), _tensor(data.y_val, device)

        opt = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        steps_per_epoch = math.ceil(len(x_tr) / self.batch_size)
        if self.max_train_batches:
            steps_per_epoch = min(steps_per_epoch, self.max_train_batches)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=self.lr, total_steps=max(1, budget * steps_per_epoch), pct_start=0.15
        )
        loss_fn = nn.CrossEntropyLoss()
        gen = torch.Generator().manual_seed(self.seed)
        val_acc = 0.0
        for epoch in range(1, budget + 1):
            if hasattr(model, "set_drop_path_progress"):  # ScheduledDropPath (NASNet)
                model.set_drop_path_progress((epoch - 1) / max(1, budget))
            model.train()
            order = torch.randperm(len(x_tr), generator=gen).to(device)
            total, seen = 0.0, 0
            for step in range(steps_per_epoch):
                idx = order[step * self.batch_size : (step + 1) * self.batch_size]
                loss = self._loss(model, loss_fn, x_tr[idx], y_tr[idx])
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"training loss became {loss.item()} at epoch {epoch}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
                seen += len(idx)
            val_acc = _accuracy(model, x_va, y_va, self.batch_size * 4)
            if report is not None:
                report(epoch, {"val_acc": val_acc, "train_loss": total / max(seen, 1)})
        return model, val_acc, device

    # DARTS (Liu et al. 2019, Sec. 3.3): the auxiliary classifier's loss, weighted 0.4, joins the
    # training loss when the network has one; evaluation uses the main head only
    AUX_WEIGHT = 0.4

    def _loss(self, model: nn.Module, loss_fn: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if getattr(model, "auxiliary_head", None) is None:
            return loss_fn(model(x), y)
        logits, aux = model.forward_with_aux(x)
        loss = loss_fn(logits, y)
        return loss if aux is None else loss + self.AUX_WEIGHT * loss_fn(aux, y)

    def __call__(self, genotype: Genotype, budget: int, report: Reporter) -> dict[str, float]:
        model, val_acc, device = self.train_model(genotype, budget, report)
        data = self.data()
        # gpu: 1 when this trial trained on a CUDA device, so a run's records show that GPU
        # trials really used one (Ray hides the GPUs a trial was not given)
        metrics: dict[str, float] = {
            "val_acc": val_acc,
            "epochs": float(budget),
            "gpu": float(device.type == "cuda"),
        }
        if self.with_test:
            metrics["test_acc"] = _accuracy(
                model, _tensor(data.x_test, device), _tensor(data.y_test, device), self.batch_size * 4
            )
        model = model.cpu()
        metrics.update(self._costs(model, data.input_shape))
        path = self.weights_path(genotype, budget)
        if path is not None:  # the compression stage starts from these trained weights
            save_weights(model, path)
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


def save_weights(model: nn.Module, path: Path) -> None:
    """The model's state dict as safetensors, written atomically (a killed trial leaves no
    half file that a later compression would read)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    # contiguous clones: safetensors refuses views that share storage
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)


def _tensor(array: Any, device: torch.device) -> torch.Tensor:
    import torch

    return torch.as_tensor(array).to(device)


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            correct += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    return correct / max(len(x), 1)


if TYPE_CHECKING:
    from torch import nn
