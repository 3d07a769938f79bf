"""`Trainer`: one model, one data set, one `Recipe` -- the training loop every trial and `train` share.

Batches come from the data set's `StandardizedArray`s (memory-mapped source rows, standardised per
batch on the training device), never a whole split moved to the device. Per epoch it records
validation accuracy, training loss, images/s and peak memory. Its whole state (weights, optimizer,
schedule, grad scaler, EMA, random generators, history) round-trips through `state_tensors` /
`load_state`, so a killed `nas-run train` resumes bit for bit where it stopped.

Evaluation re-estimates BatchNorm statistics first ("precise BN", Wu & Johnson 2021): after a few
hundred steps the running averages still hold much of their initial (0, 1), and a DARTS cell network
trained 1 epoch on digits scored chance in eval mode (0.10) while it reached 0.92 in train mode.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from .recipes import Recipe

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from .data import Dataset
    from .datasource import StandardizedArray

__all__ = [
    "Trainer", "accuracy", "accuracy_and_loss", "batches", "capped_batch_size", "peak_rss_mb", "recalibrate_bn",
]  # fmt: skip

BN_SAMPLES = 1024  # training rows that re-estimate BatchNorm statistics before each evaluation
# Small data (#22): batch 64 on 30 training series is one step per epoch, and 20 epochs of that
# left 14 of 16 trials at chance. The batch is cut so an epoch takes at least MIN_STEPS steps,
# but never below MIN_BATCH samples (BatchNorm statistics of 2-3 samples are noise).
MIN_STEPS = 8
MIN_BATCH = 8


def capped_batch_size(asked: int, n_train: int) -> int:
    """The batch size training uses on ``n_train`` samples when ``asked`` for: at most
    n_train // MIN_STEPS (at least MIN_STEPS steps per epoch), never below MIN_BATCH (or n_train)."""
    return max(1, min(asked, max(min(MIN_BATCH, n_train), n_train // MIN_STEPS)))


def batches(
    x: StandardizedArray,
    y: np.ndarray,
    positions: np.ndarray,
    batch_size: int,
    device: torch.device,
    workers: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Standardised float32 batches of ``x`` at split ``positions`` (in that order), on ``device``.

    Source rows (uint8 for images) travel to the device and are standardised there: 4x fewer bytes
    to copy than float32. ``workers`` > 0 reads batches in DataLoader worker processes (pinned memory
    and non-blocking copies on CUDA); the order is fixed by ``positions`` either way."""
    import torch

    from .datasource import as_rows

    x = as_rows(x)
    a = torch.as_tensor(x._a, device=device)
    b = torch.as_tensor(x._b, device=device)
    chunks = [positions[i : i + batch_size] for i in range(0, len(positions), batch_size)]
    cuda = device.type == "cuda"
    if workers > 0:
        loader: Any = torch.utils.data.DataLoader(
            _Rows(x, y), batch_size=None, sampler=chunks, num_workers=workers, pin_memory=cuda
        )
    else:
        loader = (_Rows(x, y)[c] for c in chunks)
    for raw, labels in loader:
        xb = raw.to(device, non_blocking=cuda).float() * a + b
        yield xb, labels.to(device, non_blocking=cuda)


class _Rows:
    """Map-style data set whose item is a whole batch: one fancy index into the memory map."""

    def __init__(self, x: StandardizedArray, y: np.ndarray):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, positions: Any) -> tuple[torch.Tensor, torch.Tensor]:
        import numpy as np
        import torch

        positions = np.asarray(positions)
        return torch.from_numpy(np.ascontiguousarray(self.x.raw_rows(positions))), torch.from_numpy(
            np.asarray(self.y[positions])
        )


def accuracy(model: nn.Module, x: StandardizedArray, y: np.ndarray, batch_size: int, device: torch.device) -> float:
    return accuracy_and_loss(model, x, y, batch_size, device)[0]


def accuracy_and_loss(
    model: nn.Module, x: StandardizedArray, y: np.ndarray, batch_size: int, device: torch.device
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` on (x, y). The loss separates models that tie
    on accuracy: on a validation split of 10 samples many candidates score the same."""
    import numpy as np
    import torch

    model.eval()
    correct, loss = 0, 0.0
    with torch.inference_mode():
        for xb, yb in batches(x, y, np.arange(len(y)), batch_size, device):
            logits = model(xb).float()
            correct += int((logits.argmax(1) == yb).sum())
            loss += float(torch.nn.functional.cross_entropy(logits, yb, reduction="sum"))
    return correct / max(len(y), 1), loss / max(len(y), 1)


def recalibrate_bn(model: nn.Module, inputs: Iterator[torch.Tensor]) -> None:
    """Replace every BatchNorm's running mean/var by their exact average over ``inputs`` (train-mode
    BN only; dropout and drop-path stay off), so eval mode matches what training learned."""
    import torch
    from torch import nn

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return
    was_training = model.training
    model.eval()
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches below
        bn.train()
    with torch.no_grad():
        for xb in inputs:
            model(xb)
    for bn, m in zip(bns, momenta, strict=True):
        bn.momentum = m
    model.train(was_training)


class Trainer:
    """Trains ``model`` on ``data`` for ``epochs`` with ``recipe``; ``run()`` returns validation accuracy."""

    def __init__(
        self,
        model: nn.Module,
        data: Dataset,
        recipe: Recipe,
        epochs: int,
        seed: int,
        device: torch.device,
        max_train_batches: int | None = None,
        progress: bool = False,
    ):
        import torch

        self.data, self.recipe, self.epochs, self.device = data, recipe, epochs, device
        self.progress = progress
        n = len(data.y_train)
        self.asked_batch_size = recipe.batch_size
        recipe = self.recipe = recipe.replace(batch_size=capped_batch_size(recipe.batch_size, n))
        # a trailing batch of one sample breaks BatchNorm in train mode: leave that sample out
        # (another one each epoch, as the order is reshuffled)
        n_used = n - 1 if n > 1 and n % recipe.batch_size == 1 else n
        self.steps_per_epoch = max(1, math.ceil(n_used / recipe.batch_size))
        if max_train_batches:
            self.steps_per_epoch = min(self.steps_per_epoch, max_train_batches)
        self.channels_last = recipe.channels_last and device.type == "cuda" and len(data.input_shape) == 3
        self.model = model.to(device, memory_format=torch.channels_last) if self.channels_last else model.to(device)
        if recipe.drop_path is not None and hasattr(model, "drop_path_prob"):
            model.drop_path_prob = recipe.drop_path
        self.forward = torch.compile(self.model) if recipe.compile else self.model
        self.opt = self._optimizer()
        self.sched = self._schedule()
        self.amp_dtype = _amp_dtype(recipe.amp, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = None
        if recipe.ema_decay > 0:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(recipe.ema_decay), use_buffers=True)
        self.loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
        self.order_gen = torch.Generator().manual_seed(seed)  # shuffling
        self.aug_gen = torch.Generator().manual_seed(seed + 1)  # augmentation
        self.epoch = 0  # epochs done
        self.history: list[dict[str, float]] = []

    # -- pieces ---------------------------------------------------------------------------------
    def _optimizer(self) -> torch.optim.Optimizer:
        import torch

        r = self.recipe
        params = self.model.parameters()
        if r.optimizer == "sgd":
            return torch.optim.SGD(params, lr=r.lr, momentum=r.momentum, nesterov=r.nesterov, weight_decay=r.weight_decay)
        return torch.optim.AdamW(params, lr=r.lr, weight_decay=r.weight_decay)

    def _schedule(self) -> Any:
        import torch

        r, total = self.recipe, max(1, self.epochs * self.steps_per_epoch)
        if r.schedule == "onecycle":
            return torch.optim.lr_scheduler.OneCycleLR(self.opt, max_lr=r.lr, total_steps=total, pct_start=0.15)
        warm = min(total - 1, round(r.warmup_epochs * self.steps_per_epoch))

        def factor(step: int) -> float:
            if step < warm:  # linear warm-up from lr/100
                return 0.01 + 0.99 * step / warm
            if r.schedule == "constant":
                return 1.0
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

        return torch.optim.lr_scheduler.LambdaLR(self.opt, factor)

    def eval_model(self) -> nn.Module:
        """The model evaluation and export use: the EMA average when the recipe keeps one."""
        return self.ema.module if self.ema is not None else self.model

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if getattr(self.model, "auxiliary_head", None) is None:
            return self.loss_fn(self.forward(x), y)
        # DARTS (Liu et al. 2019, Sec. 3.3): the auxiliary head's loss joins, weighted; eval uses the main head
        logits, aux = self.model.forward_with_aux(x)
        loss = self.loss_fn(logits, y)
        return loss if aux is None else loss + self.recipe.aux_weight * self.loss_fn(aux, y)

    # -- the loop -------------------------------------------------------------------------------
    def run(
        self, report: Callable[[int, dict[str, float]], None] | None = None, after_epoch: Callable[[Trainer], None] | None = None
    ) -> float:
        """Train the remaining epochs; ``report(epoch, metrics)`` and ``after_epoch(self)`` after each."""
        val_acc = self.history[-1]["val_acc"] if self.history else 0.0
        while self.epoch < self.epochs:
            metrics = self.train_epoch()
            val_acc = metrics["val_acc"]
            if report is not None:
                report(self.epoch, metrics)
            if after_epoch is not None:
                after_epoch(self)
        return val_acc

    def train_epoch(self) -> dict[str, float]:
        import numpy as np
        import torch

        from .augment import augment
        from .datasource import ProgressLine

        r, data, model = self.recipe, self.data, self.model
        if hasattr(model, "set_drop_path_progress"):  # ScheduledDropPath (NASNet)
            model.set_drop_path_progress(self.epoch / max(1, self.epochs))
        model.train()
        order = torch.randperm(len(data.y_train), generator=self.order_gen).numpy()
        order = order[: self.steps_per_epoch * r.batch_size]
        bar = ProgressLine(f"epoch {self.epoch + 1}/{self.epochs}", len(order)) if self.progress else None
        total, seen = 0.0, 0
        t0 = time.perf_counter()
        for xb, yb in batches(data.x_train, data.y_train, order, r.batch_size, self.device, r.loader_workers):
            if r.augments:
                xb = augment(xb, r, self.aug_gen, data.hflip_ok)
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
                loss = self._loss(xb, yb)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()} at epoch {self.epoch + 1}")
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if r.grad_clip > 0:
                self.scaler.unscale_(self.opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
            self.scaler.step(self.opt)
            self.scaler.update()
            self.sched.step()
            if self.ema is not None:
                self.ema.update_parameters(model)
            total += loss.item() * len(yb)
            seen += len(yb)
            if bar is not None:
                bar.update(len(yb))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        train_s = time.perf_counter() - t0
        if bar is not None and sys.stderr.isatty():
            print("\r\033[K", end="", file=sys.stderr)  # the epoch's summary line replaces the bar
        self.epoch += 1
        evaluated = self.eval_model()
        bn_rows = np.linspace(0, len(data.y_train) - 1, min(BN_SAMPLES, len(data.y_train))).astype(np.int64)
        recalibrate_bn(evaluated, (xb for xb, _ in batches(data.x_train, data.y_train, bn_rows, r.batch_size, self.device)))
        # 2x the training batch: inference holds no activations for backward, yet 4x cost a tiny DARTS
        # net 250 MiB of peak memory on CIFAR-10
        val_acc, val_loss = accuracy_and_loss(evaluated, data.x_val, data.y_val, r.batch_size * 2, self.device)
        metrics = {
            "val_acc": val_acc,
            "val_loss": val_loss,
            "train_loss": total / max(seen, 1),
            "images_per_s": seen / max(train_s, 1e-9),
            "epoch_s": train_s,
            "peak_rss_mb": peak_rss_mb(),
            "lr": float(self.opt.param_groups[0]["lr"]),
        }
        if self.device.type == "cuda":
            metrics["gpu_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        self.history.append(metrics)
        return metrics

    # -- state (checkpoints) ----------------------------------------------------------------------
    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors for safetensors, JSON-able rest): everything ``load_state`` needs to continue."""
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        opt = self.opt.state_dict()
        plain_state: dict[str, dict[str, Any]] = {}
        for pid, state in opt["state"].items():
            for name, value in state.items():
                if hasattr(value, "detach"):
                    tensors[f"opt.{pid}.{name}"] = value
                else:
                    plain_state.setdefault(str(pid), {})[name] = value
        if self.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items()})
        tensors["rng.order"] = self.order_gen.get_state()
        tensors["rng.aug"] = self.aug_gen.get_state()
        import torch

        tensors["rng.torch"] = torch.get_rng_state()  # dropout, drop-path
        rest = {
            "epoch": self.epoch,
            "history": self.history,
            "opt_param_groups": opt["param_groups"],
            "opt_plain_state": plain_state,
            "sched": {k: v for k, v in self.sched.state_dict().items() if not callable(v) and k != "lr_lambdas"},
            "scaler": self.scaler.state_dict(),
            "recipe": self.recipe.to_dict(),
        }
        return tensors, rest

    def load_state(self, tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> None:
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, pid, name = key.split(".", 2)
                state.setdefault(int(pid), {})[name] = value  # load_state_dict moves it
        for pid, plain in rest["opt_plain_state"].items():
            state.setdefault(int(pid), {}).update(plain)
        self.opt.load_state_dict({"state": state, "param_groups": rest["opt_param_groups"]})
        self.sched.load_state_dict({**self.sched.state_dict(), **rest["sched"]})
        if rest.get("scaler"):
            self.scaler.load_state_dict(rest["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        self.order_gen.set_state(tensors["rng.order"])
        self.aug_gen.set_state(tensors["rng.aug"])
        import torch

        torch.set_rng_state(tensors["rng.torch"])
        self.epoch, self.history = int(rest["epoch"]), list(rest["history"])


def _amp_dtype(mode: str, device: torch.device) -> Any:
    import torch

    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode == "fp16":
        return torch.float16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 1024)

