"""Fine-tuning after compression, optionally distilled from the uncompressed model.

`train(model, ctx, epochs, ...)` trains a model in place on ``ctx.training()`` (the training
split minus the calibration part, so int8/GPFQ calibration never sees what fine-tuning fits):
AdamW with a per-step learning-rate schedule (``schedule``: one-cycle, cosine decay from the
peak with no warm-up, or constant; see `_scheduler`), seeded batch order, the same loop as
`nas.training.TrainingEvaluator`. With a ``teacher`` the loss is knowledge distillation
(Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network", eq. 2 and the
T^2 remark of section 2):

    loss = alpha * T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T))
         + (1 - alpha) * CE(z_student, y)

T^2 keeps the soft term's gradient scale independent of T. That is the default task (``ctx.task``,
cross-entropy on logits); a user's model may name another loss (``--loss bce|mse|l1|module:fn``),
and then both terms are the task's (`compress.tasks.Task.loss` / ``kd_loss``). A task whose
outputs are ``auto`` is resolved here on the model's outputs for the first training samples (the
teacher's when distilling): probabilities are detected and said once in ``ctx.notes``.

``masks`` (parameter name -> 0/1 tensor) are multiplied back after every optimizer step, so
weights a pruning pass set to zero stay zero (AdamW's momentum and weight decay would otherwise
revive them).

The pass ``finetune`` wraps `train` with ``keep_best`` on by default (setting ``keep_best``): the
task's metric on the held-out calibration rows before training and after each epoch picks the
weights it keeps (`compress.passes.best_epoch`), so fine-tuning a model it only damages gives it
back as it came. Its record says what happened (epochs, whether KD was on, the last epoch's loss,
``best_epoch``, the metric per epoch as ``monitor``, the SHA-1 of the resulting weights) but training is **not replayed**:
`replay` returns the model unchanged. Whoever stores a policy's result stores the fine-tuned
weights (safetensors) next to the records and loads them after replaying the structural passes;
``weights_sha1`` lets them check that the weights they load are the ones this pass produced.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import PolicyError
from .base import PassContext, check_settings, register_pass
from .best_epoch import BestEpoch

if TYPE_CHECKING:
    import torch

    from ..tasks import Task

__all__ = ["FinetunePass", "evaluate_accuracy", "state_dict_sha1", "train", "zero_masks"]

# a weight counts as pruned when any of it is exactly zero: trained dense weights are essentially
# never exactly zero, and a global magnitude threshold may leave a layer well under 1% pruned,
# whose few zeros must survive fine-tuning too
MASK_MIN_ZERO_FRACTION = 1e-12
_MASKED_TYPES = frozenset(
    {"Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Linear"}
)


def train(
    model: torch.nn.Module,
    ctx: PassContext,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    teacher: torch.nn.Module | None = None,
    temperature: float = 4.0,
    alpha: float = 0.5,
    masks: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
    schedule: str = "onecycle",
    keep_best: bool = False,
) -> dict[str, Any]:
    """Train ``model`` in place on ``ctx.training()``; returns ``{"train_loss", "epochs"}``.

    ``train_loss`` is the mean loss of the last epoch (NaN when ``epochs`` is 0, which trains
    nothing). The model is left in eval mode on ``ctx.device``. Same seed, same data, same
    device: same weights (on the CPU bit for bit). A non-finite loss raises FloatingPointError.

    With ``keep_best`` the task's metric is measured on ``ctx.calibration()`` (rows never trained
    on) before training and after every epoch, and the best epoch's weights are restored at the
    end (`compress.passes.best_epoch`: the last unless an earlier one is clearly better); the result also holds
    ``best_epoch`` (0: the weights as they came in), ``monitor`` (the metric per epoch, epoch 0
    first) and ``monitor_metric``. Scoring does not change the training trajectory.
    """
    import torch

    _check_hyper(epochs, lr, batch_size, temperature, alpha)
    _check_schedule(schedule)
    device = torch.device(ctx.device)
    _make_leaf_parameters(model)
    model.to(device)
    if epochs == 0:
        model.eval()
        return {"train_loss": float("nan"), "epochs": 0, "steps": 0}
    params = dict(model.named_parameters())
    applied = _checked_masks(masks or {}, params, device)

    old_threads = torch.get_num_threads()
    if ctx.threads:
        torch.set_num_threads(ctx.threads)
    try:
        x_np, y_np = ctx.training()
        x = torch.as_tensor(x_np).to(device)
        y = torch.as_tensor(y_np).to(device)
        task = _resolved_task(ctx, teacher if teacher is not None else model, x, device)
        soft = None
        if teacher is not None:
            soft = _teacher_logits(teacher, x, device, batch_size * 4)
            shape = _output_shape(model, x[:2])  # (K,), or () for a regression model's (N,) output
            if tuple(soft.shape[1:]) != shape:
                raise PolicyError(
                    f"finetune: the teacher gives outputs of shape {tuple(soft.shape[1:])} per sample, "
                    f"the model {shape}; distillation needs the same classes"
                )

        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        n = len(x)
        from nas.trainer import capped_batch_size

        batch_size = capped_batch_size(batch_size, n)  # small data: >= 8 steps per epoch, as search trials
        # a trailing batch of one sample breaks BatchNorm in train mode; drop it (a different
        # sample each epoch, since the order is reshuffled)
        n_used = n - 1 if n > 1 and n % batch_size == 1 else n
        steps_per_epoch = max(1, math.ceil(n_used / batch_size))
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        sched = _scheduler(opt, schedule, lr, epochs * steps_per_epoch)
        _apply_masks(applied, params)  # start from the pruned weights exactly
        best = BestEpoch(model, ctx, device) if keep_best else None
        if best is not None:
            best.observe(0)
        mean_loss = float("nan")
        for epoch in range(1, epochs + 1):
            if hasattr(model, "set_drop_path_progress"):  # ScheduledDropPath (NASNet)
                model.set_drop_path_progress((epoch - 1) / max(1, epochs))
            model.train()
            order = torch.randperm(n, generator=gen).to(device)[:n_used]
            total, seen = 0.0, 0
            for step in range(steps_per_epoch):
                idx = order[step * batch_size : (step + 1) * batch_size]
                outputs = model(x[idx])
                loss = task.loss(outputs, y[idx])
                if soft is not None:
                    loss = (1.0 - alpha) * loss + alpha * task.kd_loss(outputs, soft[idx], temperature)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"fine-tuning loss became {loss.item()} at epoch {epoch}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                _apply_masks(applied, params)
                total += loss.item() * len(idx)
                seen += len(idx)
            mean_loss = total / max(seen, 1)
            if best is not None:
                best.observe(epoch)
        if best is not None:
            best.restore()
    finally:
        torch.set_num_threads(old_threads)
    model.eval()
    out: dict[str, Any] = {"train_loss": mean_loss, "epochs": epochs, "steps": epochs * steps_per_epoch}
    if best is not None:
        out.update(best_epoch=best.best_epoch, monitor=best.scores, monitor_metric=best.metric_name)
    return out


SCHEDULES = ("onecycle", "cosine", "constant")


def _scheduler(opt: torch.optim.Optimizer, schedule: str, lr: float, total_steps: int) -> Any:
    """The per-step learning-rate schedule.

    ``onecycle``: warm up over the first 15% of the steps to ``lr``, then cosine down (what
    training from scratch uses). ``cosine``: start at ``lr`` and cosine-anneal to 0 with no
    warm-up, i.e. one cycle of SGDR's warm restart (Loshchilov & Hutter 2017, "SGDR: Stochastic
    Gradient Descent with Warm Restarts", eq. 5), for a model that is trained already.
    ``constant``: ``lr`` throughout. Measured after structured pruning of the searched
    large-kernel models (3 epochs, results/compress.md), one-cycle at 3e-3 recovered the most:
    cosine from the same peak left 0-5 points more drop, and lower peaks far more; only an
    unpruned model, which has nothing to recover, lost a sample or two less at a lower lr.
    """
    import torch

    if schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps, pct_start=0.15)
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps, eta_min=0.0)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def _check_schedule(schedule: Any) -> None:
    if schedule not in SCHEDULES:
        raise PolicyError(f"finetune: schedule must be one of {list(SCHEDULES)}, got {schedule!r}")


def _make_leaf_parameters(model: torch.nn.Module) -> None:
    """``copy.deepcopy`` of a TorchScript module (Policy.apply copies the model) yields parameters
    that are not autograd leaves, which no optimizer accepts; re-register them as leaves."""
    import torch

    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if not p.is_leaf:
                setattr(module, name, torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))


def _resolved_task(ctx: PassContext, model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> Task:
    """``ctx.task`` with its kind of outputs known: probed on up to 256 training samples when it is
    ``auto`` (a user's model), the note said once, and the resolved task kept in ``ctx``."""
    if ctx.task.outputs != "auto":
        return ctx.task
    import torch

    was_training = model.training
    model.to(device).eval()
    try:
        with torch.no_grad():
            probe = model(x[:256])
    finally:
        model.train(was_training)
    task, note = ctx.task.resolve(probe)
    if note and note not in ctx.notes:
        ctx.notes.append(note)
    ctx.task = task
    return task


def _teacher_logits(
    teacher: torch.nn.Module, x: torch.Tensor, device: torch.device, batch: int
) -> torch.Tensor:
    """The teacher's logits for every training sample, computed once: it is frozen, in eval mode,
    and the inputs are not augmented, so its per-step outputs would be these same numbers."""
    import torch

    was_training = teacher.training
    teacher.to(device).eval()
    try:
        with torch.inference_mode():
            out = torch.cat([teacher(x[i : i + batch]) for i in range(0, len(x), batch)])
    finally:
        teacher.train(was_training)
    return out.detach().clone()  # inference tensors cannot join autograd graphs later


def _output_shape(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    import torch

    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train(was_training)
    return tuple(int(d) for d in out.shape[1:])


def evaluate_accuracy(model: torch.nn.Module, x: Any, y: Any, batch: int = 256) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on ``x``, ``y``: numpy arrays, tensors or a
    data set's lazy `StandardizedArray` (read a batch at a time, never whole)."""
    import numpy as np
    import torch

    device = next(iter(model.parameters()), torch.empty(0)).device
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            xb = x[i : i + batch]
            xb = xb if isinstance(xb, torch.Tensor) else torch.as_tensor(np.asarray(xb))
            yb = torch.as_tensor(y[i : i + batch]).to(device)
            correct += int((model(xb.to(device)).argmax(1) == yb).sum())
    return correct / max(len(x), 1)


# -- masks ---------------------------------------------------------------------------------------
def zero_masks(
    model: torch.nn.Module, min_fraction: float = MASK_MIN_ZERO_FRACTION
) -> dict[str, torch.Tensor]:
    """0/1 masks of the exact zeros of Conv/Linear weights that are at least ``min_fraction``
    zero (so unstructured pruning survives fine-tuning); keyed like ``named_parameters()``.
    Works on TorchScript models too (a user's pruned TorchScript file keeps its zeros)."""
    import torch
    from torch import nn

    params = dict(model.named_parameters())
    out = {}
    for name, module in model.named_modules():
        # a TorchScript submodule keeps its eager class name in original_name
        scripted = (
            getattr(module, "original_name", None) if isinstance(module, torch.jit.ScriptModule) else None
        )
        if not (isinstance(module, nn.modules.conv._ConvNd | nn.Linear) or scripted in _MASKED_TYPES):
            continue
        key = f"{name}.weight" if name else "weight"
        w = params.get(key)  # absent when torch.nn.utils.prune re-parametrised it (weight_orig)
        if w is None or w.numel() == 0:
            continue
        zero = w.detach() == 0
        if float(zero.float().mean()) >= min_fraction:
            out[key] = (~zero).to(w.dtype)
    return out


def _checked_masks(
    masks: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor], device: torch.device
) -> dict[str, torch.Tensor]:
    import difflib

    import torch

    out = {}
    for name, mask in masks.items():
        if name not in params:
            close = difflib.get_close_matches(name, list(params), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PolicyError(f"finetune: mask for {name!r}, which is not a parameter of the model{hint}")
        p = params[name]
        mask = torch.as_tensor(mask)
        if tuple(mask.shape) != tuple(p.shape):
            raise PolicyError(
                f"finetune: mask for {name!r} has shape {tuple(mask.shape)}, the weight {tuple(p.shape)}"
            )
        out[name] = mask.to(device=device, dtype=p.dtype)
    return out


def _apply_masks(masks: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]) -> None:
    import torch

    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)


# -- identity of weights -------------------------------------------------------------------------
def state_dict_sha1(model_or_state: torch.nn.Module | Mapping[str, torch.Tensor]) -> str:
    """SHA-1 over every state-dict entry's name, dtype, shape and raw bytes, in state-dict order."""
    import torch

    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    h = hashlib.sha1()
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# -- settings ------------------------------------------------------------------------------------
def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_hyper(epochs: Any, lr: Any, batch_size: Any, temperature: Any, alpha: Any) -> None:
    if not _integer(epochs) or epochs < 0:
        raise PolicyError(f"finetune: epochs must be an integer >= 0, got {epochs!r}")
    if not _number(lr) or lr <= 0:
        raise PolicyError(f"finetune: lr must be a number > 0, got {lr!r}")
    if not _integer(batch_size) or batch_size < 1:
        raise PolicyError(f"finetune: batch_size must be an integer >= 1, got {batch_size!r}")
    if not _number(temperature) or temperature <= 0:
        raise PolicyError(f"finetune: temperature must be a number > 0, got {temperature!r}")
    if not _number(alpha) or not 0 <= alpha <= 1:
        raise PolicyError(f"finetune: alpha must be a number in [0, 1], got {alpha!r}")


class FinetunePass:
    """``finetune``: train the compressed model a few epochs (optionally distilled), keeping
    pruned weights at zero. Not replayed: the caller stores and reloads the resulting weights."""

    name = "finetune"
    terminal = False
    defaults: Mapping[str, Any] = {
        "epochs": 1,
        "lr": 1e-3,
        "kd": False,
        "temperature": 4.0,
        "alpha": 0.5,
        "batch_size": 64,
        # the pass's default stays the schedule of the policies stored before the setting
        # existed, so their texts keep meaning what they meant; the built-in policies pick
        # their own (compress.run.builtin_policies)
        "schedule": "onecycle",
        # restore the epoch that scored best on the calibration rows (`compress.passes.best_epoch`);
        # a policy stored before the setting existed reads as true: its fine-tuned weights are
        # stored, never re-trained on replay, so only a re-run of that trial sees the difference
        "keep_best": True,
    }

    def validate(self, settings: Mapping[str, Any]) -> None:
        s = check_settings(self.name, settings, self.defaults)
        _check_hyper(s["epochs"], s["lr"], s["batch_size"], s["temperature"], s["alpha"])
        _check_schedule(s["schedule"])
        if not isinstance(s["kd"], bool):
            raise PolicyError(f"finetune: kd must be true or false, got {s['kd']!r}")
        if not isinstance(s["keep_best"], bool):
            raise PolicyError(f"finetune: keep_best must be true or false, got {s['keep_best']!r}")

    def apply(self, model: Any, settings: Mapping[str, Any], ctx: PassContext) -> tuple[Any, dict]:
        import torch

        s = check_settings(self.name, settings, self.defaults)
        self.validate(s)
        if not isinstance(model, torch.nn.Module):
            raise PolicyError(f"finetune: needs a torch model, got {type(model).__name__} (put int8 last)")
        if s["kd"] and ctx.teacher is None:
            raise PolicyError("finetune: kd = true needs a teacher (the uncompressed model) in the context")
        if s["epochs"] == 0:
            return model, {
                "epochs": 0,
                "kd": bool(s["kd"]),
                "train_loss": None,
                "weights_sha1": state_dict_sha1(model),
            }
        out = train(
            model,
            ctx,
            epochs=s["epochs"],
            lr=float(s["lr"]),
            batch_size=s["batch_size"],
            teacher=ctx.teacher if s["kd"] else None,
            temperature=float(s["temperature"]),
            alpha=float(s["alpha"]),
            masks=zero_masks(model),
            seed=ctx.seed,
            schedule=s["schedule"],
            keep_best=s["keep_best"],
        )
        record = {
            "epochs": s["epochs"],
            "kd": bool(s["kd"]),
            "train_loss": float(out["train_loss"]),
            "steps": int(out["steps"]),  # optimisation steps, with the batch as cut for small data
            "weights_sha1": state_dict_sha1(model),
            "keep_best": s["keep_best"],
            # the epoch whose weights these are (the last without keep_best) and what picked it
            "best_epoch": int(out.get("best_epoch", s["epochs"])),
        }
        if "monitor" in out:
            record.update(monitor_metric=out["monitor_metric"], monitor=[float(v) for v in out["monitor"]])
            if record["best_epoch"] == 0:  # said: the policy's fine-tuning was run but left no trace
                note = (f"finetune: no epoch beat the weights it started from on the held-out calibration "
                        f"rows ({out['monitor_metric']}); those were kept")
                if note not in ctx.notes:
                    ctx.notes.append(note)
        # trained on the GPU a trial was given, if any; the passes after this one (export,
        # int8 calibration) and the measurements run on the CPU
        model.cpu()
        if ctx.teacher is not None:
            ctx.teacher.cpu()
        return model, record

    def replay(self, model: Any, record: Mapping[str, Any], ctx: PassContext) -> Any:
        """Training is not replayed: the model comes back unchanged, and the caller loads the
        fine-tuned weights it stored (``record["weights_sha1"]`` identifies them)."""
        return model


FINETUNE = register_pass(
    FinetunePass(), "fine-tune the compressed model (AdamW, optional knowledge distillation)"
)
