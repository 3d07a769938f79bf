"""Tasks: the loss fine-tuning minimises, its distillation term, and the metric a compressed model
is measured by (`nas-run compress --model SPEC --loss NAME --metric NAME`).

A `Task` is built from two names by `make_task(loss, metric)`:

``--loss`` (what fine-tuning minimises; ``alpha`` mixes in the KD term as ``(1 - alpha) * loss +
alpha * kd``):

- ``ce`` (default): cross-entropy on logits, targets class labels ``(N,)`` or class
  probabilities ``(N, K)``. KD: Hinton's ``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``.
- ``bce``: BCE-with-logits per output, for multi-label / sigmoid models; targets multi-hot or
  soft ``(N, K)`` floats in [0, 1], or class labels ``(N,)`` turned into one-hot. KD: BCE of
  ``sigmoid(z_s / T)`` against the teacher's ``sigmoid(z_t / T)``, times ``T^2`` (Hinton's
  tempering and scale, per output; at ``T = 1`` plain BCE against the teacher's probabilities).
- ``mse`` / ``l1``: regression on the raw outputs; targets ``(N,)`` or ``(N, K)`` floats (class
  labels ``(N,)`` on a K-output model become one-hot). KD: MSE between the outputs (no ``T``).
- ``package.module:function`` or ``file.py:function`` (imported as `compress.user_model`
  imports builders): ``function(outputs, targets) -> scalar tensor`` on a batch (targets as the
  data hold them). KD: MSE between the outputs.

**Outputs that already are probabilities.** A model such as the pitch tracker torchcrepe ends in
``torch.sigmoid``; applying a sigmoid or softmax again in the loss would flatten every gradient.
For a user's model (``outputs="auto"``) the kind is detected once on a batch of outputs
(`detect_outputs`: all in [0, 1] and rows summing to 1 -> ``softmax``, all in [0, 1] ->
``sigmoid``, else ``logits``), said once in the run's notes, and handled: ``ce`` on
probabilities is the NLL of ``log p`` renormalised to sum to 1 (exactly the NLL of a softmax
output), ``bce`` is BCE on the probabilities themselves, KD uses ``log p`` (ce) or
``logit(p)`` clamped to ``[1e-6, 1 - 1e-6]`` (bce) in place of the logits. A search run's
models output logits and are never probed (``outputs="logits"``), so nothing changes for them.

``--metric`` (measured in ONNX Runtime on the val/test splits; default ``accuracy`` for
ce/bce/user losses, ``mae`` for mse/l1):

- ``accuracy``: argmax against the class label, or against the target's argmax for one-hot /
  soft ``(N, K)`` targets; ``topK`` (``top5``): the label among the K largest outputs;
  ``withinK`` (``within1``): argmax within K classes of the label, for ordinal bins such as
  pitch; ``mae`` / ``mse`` of the outputs (lower is better);
- ``package.module:function(outputs, targets) -> float`` on numpy arrays, higher is better
  unless the function has the attribute ``higher_is_better = False``.

**What the records hold** (`compress.evaluate.CompressionEvaluator.measure`): ``val_acc``,
``test_acc``, ``base_val_acc`` and ``acc_drop`` keep their names for the rest of the product
(objectives, constraints, the report) and hold the task's metric *oriented so higher is
better*: the metric itself, or its negative for a lower-is-better one (``val_acc = -mae``).
``acc_drop`` stays ``100 * (base_val_acc - val_acc)``, positive when the compressed model is
worse, in hundredths of the metric's unit. When the metric is not ``accuracy`` its plain value is
recorded too, as ``val_<metric>``, ``test_<metric>`` and ``base_val_<metric>`` (``val_mae`` is
the positive MAE).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from search_spaces.errors import UnknownNameError

from .errors import PolicyError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from nas.data import Dataset

__all__ = [
    "LOSSES",
    "METRIC_NAMES",
    "Metric",
    "Task",
    "check_task",
    "classification_task",
    "detect_outputs",
    "make_metric",
    "make_task",
]

LOSSES = ("ce", "bce", "mse", "l1")
METRIC_NAMES = ("accuracy", "topK", "withinK", "mae", "mse")  # K a number: top5, within1
OUTPUT_KINDS = ("auto", "logits", "sigmoid", "softmax")
DEFAULT_METRIC = {"ce": "accuracy", "bce": "accuracy", "mse": "mae", "l1": "mae"}
USER_SPEC = "package.module:function"
TARGETS = {
    "ce": "class labels (N,) or class probabilities (N, K)",
    "bce": "multi-hot or soft (N, K) floats in [0, 1], or class labels (N,) (made one-hot)",
    "mse": "floats (N,) or (N, K); class labels (N,) of a K-output model are made one-hot",
    "l1": "floats (N,) or (N, K); class labels (N,) of a K-output model are made one-hot",
    "user": "whatever the user's loss takes, as the data hold them",
}
PROB_EPS = 1e-6  # logit(p) of a probability output is taken on p clamped to [eps, 1 - eps]
_TOPK = re.compile(r"^top(\d+)$")
_WITHINK = re.compile(r"^within(\d+)$")


# -- metrics (numpy: they run on ONNX Runtime's outputs) -----------------------------------------
@dataclass(frozen=True)
class Metric:
    """``fn(outputs, targets) -> float`` with its name; `signed` turns it higher-is-better."""

    name: str
    fn: Callable[[Any, Any], float]
    higher_is_better: bool = True

    def __call__(self, outputs: Any, targets: Any) -> float:
        return float(self.fn(outputs, targets))

    def signed(self, value: float) -> float:
        return value if self.higher_is_better else -value


def _class_targets(targets: Any, what: str) -> np.ndarray:
    import numpy as np

    t = np.asarray(targets)
    if t.ndim == 2:
        return t.argmax(1)
    if t.dtype.kind == "f" and not np.all(np.isfinite(t) & (t == np.round(t))):
        raise PolicyError(f"metric {what}: needs class labels or (N, K) targets; these are real numbers "
                          "(a regression? use --metric mae or mse)")
    return t.astype(np.int64)


def _accuracy(outputs: Any, targets: Any) -> float:
    import numpy as np

    t = _class_targets(targets, "accuracy")
    return float((np.asarray(outputs).argmax(1) == t).mean()) if len(t) else 0.0


def _top_k(k: int) -> Callable[[Any, Any], float]:
    def top(outputs: Any, targets: Any) -> float:
        import numpy as np

        out, t = np.asarray(outputs), _class_targets(targets, f"top{k}")
        kk = min(k, out.shape[1])  # top-K of K or fewer classes always holds the label
        best = np.argpartition(-out, kk - 1, axis=1)[:, :kk]
        return float((best == t[:, None]).any(1).mean()) if len(t) else 0.0

    return top


def _within_k(k: int) -> Callable[[Any, Any], float]:
    def within(outputs: Any, targets: Any) -> float:
        import numpy as np

        t = _class_targets(targets, f"within{k}")
        return float((np.abs(np.asarray(outputs).argmax(1) - t) <= k).mean()) if len(t) else 0.0

    return within


def _regression_targets(outputs: Any, targets: Any) -> Any:
    """Targets shaped like ``outputs`` (numpy or torch): as they are when the shapes agree,
    one-hot when they are class labels of a K-output model, reshaped when they hold as many
    numbers (``(N,)`` targets of an ``(N, 1)`` output)."""
    if tuple(targets.shape) == tuple(outputs.shape):
        return targets
    torch_like = hasattr(targets, "is_floating_point")
    integer = not targets.is_floating_point() if torch_like else targets.dtype.kind in "iub"
    k = outputs.shape[1] if outputs.ndim == 2 else 1
    if targets.ndim == 1 and integer and k > 1 and len(targets) == len(outputs):
        return _one_hot(targets, k, like=outputs)
    size = (lambda a: a.numel()) if torch_like else (lambda a: a.size)
    if size(targets) == size(outputs):
        return targets.reshape(outputs.shape)
    raise PolicyError(f"targets of shape {tuple(targets.shape)} do not fit outputs of shape {tuple(outputs.shape)}")


def _one_hot(labels: Any, k: int, like: Any) -> Any:
    if hasattr(labels, "numel"):  # torch
        import torch.nn.functional as F

        return F.one_hot(labels.long(), k).to(like.dtype)
    import numpy as np

    return np.eye(k, dtype=like.dtype)[labels.astype(np.int64)]


def _mae(outputs: Any, targets: Any) -> float:
    import numpy as np

    out = np.asarray(outputs, dtype=np.float64)
    return float(np.abs(out - _regression_targets(out, np.asarray(targets, dtype=out.dtype))).mean()) if len(out) else 0.0


def _mse(outputs: Any, targets: Any) -> float:
    import numpy as np

    out = np.asarray(outputs, dtype=np.float64)
    return float(((out - _regression_targets(out, np.asarray(targets, dtype=out.dtype))) ** 2).mean()) if len(out) else 0.0


def make_metric(name: str) -> Metric:
    """A built-in metric by name, or a user's ``package.module:function``."""
    name = str(name)
    if name == "accuracy":
        return Metric("accuracy", _accuracy)
    if name in ("mae", "mse"):
        return Metric(name, _mae if name == "mae" else _mse, higher_is_better=False)
    if (m := _TOPK.match(name)) and int(m.group(1)) >= 1:
        return Metric(name, _top_k(int(m.group(1))))
    if m := _WITHINK.match(name):
        return Metric(name, _within_k(int(m.group(1))))
    if ":" in name:
        fn = _user_callable(name, "--metric")

        def checked(outputs: Any, targets: Any) -> float:
            value = fn(outputs, targets)
            try:
                return float(value)
            except (TypeError, ValueError):
                raise PolicyError(f"--metric {name!r} returned a {type(value).__name__}, not a number") from None

        label = re.sub(r"\W", "_", name.rpartition(":")[2]).lower()
        label = "user_acc" if label == "acc" else label  # val_acc is the main metric's own key
        return Metric(label, checked, bool(getattr(fn, "higher_is_better", True)))
    raise UnknownNameError("metric", name, ["accuracy", "mae", "mse", "top<K> (e.g. top5)",
                                            "within<K> (e.g. within1)", USER_SPEC])


# -- tasks (torch: losses run in fine-tuning) ----------------------------------------------------
@dataclass(frozen=True)
class Task:
    """A loss, its distillation term and a metric; ``outputs`` says what the model's outputs are
    (``auto`` until `resolve` has looked at some)."""

    name: str  # "ce", "bce", "mse", "l1", or the user's spec
    metric: Metric
    outputs: str = "auto"
    user_loss: Callable[[Any, Any], Any] | None = None

    @property
    def targets(self) -> str:
        """What the data's labels may look like for this loss (for messages and docs)."""
        return TARGETS["user" if self.user_loss is not None else self.name]

    @property
    def probabilities(self) -> bool:
        return self.outputs in ("sigmoid", "softmax")

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean loss of a batch."""
        import torch.nn.functional as F

        if self.user_loss is not None:
            return _checked_loss(self.name, self.user_loss(outputs, targets))
        if self.name == "ce":
            t = targets if targets.ndim == 1 else targets.to(outputs.dtype)  # class probabilities
            return F.cross_entropy(self._log_space(outputs), t)
        if self.name == "bce":
            t = self._multi_hot(outputs, targets)
            if self.probabilities:  # BCE clamps its logs at -100 itself: saturated outputs stay finite
                return F.binary_cross_entropy(outputs.clamp(0.0, 1.0), t)
            return F.binary_cross_entropy_with_logits(outputs, t)
        t = _regression_targets(outputs, targets.to(outputs.dtype) if targets.is_floating_point() else targets)
        t = t.to(outputs.dtype)
        return F.mse_loss(outputs, t) if self.name == "mse" else F.l1_loss(outputs, t)

    def kd_loss(self, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        """The distillation term against the teacher's outputs (see the module docstring)."""
        import torch
        import torch.nn.functional as F

        if self.name == "ce":
            log_p_s = F.log_softmax(self._log_space(student) / temperature, dim=1)
            log_p_t = F.log_softmax(self._log_space(teacher) / temperature, dim=1)
            # kl_div(input=log q, target=log p, log_target=True) = sum p (log p - log q)
            return temperature**2 * F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
        if self.name == "bce":
            z_s, z_t = self._logit_space(student), self._logit_space(teacher)
            soft = torch.sigmoid(z_t / temperature)
            return temperature**2 * F.binary_cross_entropy_with_logits(z_s / temperature, soft)
        return F.mse_loss(student, teacher)

    def _log_space(self, outputs: torch.Tensor) -> torch.Tensor:
        """Logits for the softmax losses: the outputs, or the log of probability outputs (softmax
        of log p is p renormalised, so a softmax output comes back as it was)."""
        import torch

        if not self.probabilities:
            return outputs
        return torch.log(outputs.clamp_min(torch.finfo(outputs.dtype).tiny))

    def _logit_space(self, outputs: torch.Tensor) -> torch.Tensor:
        import torch

        if not self.probabilities:
            return outputs
        return torch.logit(outputs, eps=PROB_EPS)

    def _multi_hot(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.ndim == 1 and outputs.ndim == 2 and not targets.is_floating_point():
            return _one_hot(targets, outputs.shape[1], like=outputs)
        return _regression_targets(outputs, targets).to(outputs.dtype)

    def resolve(self, outputs: Any) -> tuple[Task, str | None]:
        """This task with ``outputs`` set from a batch of the model's outputs when it is ``auto``,
        and the note to show once when they turn out to be probabilities already."""
        if self.outputs != "auto":
            return self, None
        kind = detect_outputs(outputs)
        task = replace(self, outputs=kind)
        if kind == "logits" or self.name not in ("ce", "bce"):
            return task, None
        how = {
            ("ce", "softmax"): "the NLL of their log (no second softmax)",
            ("ce", "sigmoid"): "the NLL of their log renormalised to sum to 1 (no softmax over them)",
            ("bce", "softmax"): "BCE on them as they are (no sigmoid over them)",
            ("bce", "sigmoid"): "BCE on them as they are (no second sigmoid)",
        }[(self.name, kind)]
        rows = ", rows summing to 1" if kind == "softmax" else ""
        return task, (f"the model's outputs are already {kind} probabilities (all in [0, 1]{rows}): "
                      f"--loss {self.name} uses {how}")


def detect_outputs(outputs: Any) -> str:
    """``softmax`` when every output is in [0, 1] and each row sums to 1, ``sigmoid`` when every
    output is in [0, 1], else ``logits``. Logits of a trained model essentially never all fall in
    [0, 1]; an untrained one's may only by chance, so it is judged on a batch (a few hundred rows)."""
    import numpy as np

    out = outputs.detach().cpu().numpy() if hasattr(outputs, "detach") else np.asarray(outputs)
    if out.ndim != 2 or out.size == 0 or not np.all(np.isfinite(out)):
        return "logits"
    if out.min() < 0.0 or out.max() > 1.0:
        return "logits"
    if out.shape[1] > 1 and np.allclose(out.sum(1, dtype=np.float64), 1.0, atol=1e-3):
        return "softmax"
    return "sigmoid"


def make_task(loss: str = "ce", metric: str | None = None, outputs: str = "auto") -> Task:
    """The task for ``--loss`` / ``--metric`` (metric None: the loss's default). A bad name is an
    `UnknownNameError` naming the valid ones; a bad ``module:function`` a one-line `PolicyError`."""
    if outputs not in OUTPUT_KINDS:
        raise UnknownNameError("kind of outputs", outputs, OUTPUT_KINDS)
    loss = str(loss)
    user = None
    if ":" in loss:
        user = _user_callable(loss, "--loss")
    elif loss not in LOSSES:
        raise UnknownNameError("loss", loss, [*LOSSES, USER_SPEC])
    chosen = metric if metric is not None else DEFAULT_METRIC.get(loss, "accuracy")
    return Task(loss, make_metric(chosen), outputs, user)


def classification_task() -> Task:
    """Cross-entropy on logits, measured by accuracy: what a search run's models are."""
    return make_task("ce", "accuracy", outputs="logits")


def check_task(task: Task, module: torch.nn.Module, data: Dataset, batch: int = 16) -> None:
    """Run the loss and the metric once on a batch of the training split (model in eval mode,
    nothing stepped): targets that do not fit the loss or the metric, or a user's function that
    fails, are one `PolicyError` before any trial starts."""
    import numpy as np
    import torch

    from .user_model import _one_line

    x = torch.as_tensor(np.asarray(data.x_train[:batch]))
    y = np.asarray(data.y_train[:batch])
    was_training = module.training
    module.eval()
    try:
        out = module(x)
        resolved, _ = task.resolve(out.detach())
        for flag, name, run in (
            ("--loss", task.name, lambda: resolved.loss(out, torch.as_tensor(y))),
            ("--metric", task.metric.name, lambda: task.metric(out.detach().numpy(), y)),
        ):
            try:
                run()
            except PolicyError:
                raise
            except Exception as exc:
                raise PolicyError(
                    f"{flag} {name!r} fails on a batch of {data.name} (outputs {tuple(out.shape)}, targets "
                    f"{tuple(y.shape)} {y.dtype}; {task.targets}): {_one_line(exc)}"
                ) from None
    finally:
        module.train(was_training)


def _user_callable(spec: str, flag: str) -> Callable[..., Any]:
    from .user_model import _import_callable, _parse_builder

    try:
        parsed = _parse_builder(spec)
        if parsed is None:  # an existing file without ":function"
            raise PolicyError(f"model {spec!r}: write it package.module:function or path/to/file.py:function")
        fn, _ = _import_callable(spec, *parsed)
    except PolicyError as exc:  # the builder loader's messages, about this flag rather than a model
        text = str(exc).replace(f"model {spec!r}", f"{flag} {spec!r}", 1)
        raise PolicyError(text.replace("a builder is written", "a function is written")) from None
    return fn


def _checked_loss(spec: str, value: Any) -> torch.Tensor:
    import torch

    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        what = f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"
        raise PolicyError(f"--loss {spec!r} returned {what}; a loss returns one number (a 0-d tensor)")
    if not value.requires_grad:
        raise PolicyError(f"--loss {spec!r} returned a tensor without a gradient (was it computed with "
                          ".detach(), numpy or torch.no_grad?)")
    if not math.isfinite(float(value.detach())):
        raise FloatingPointError(f"--loss {spec!r} became {float(value.detach())}")
    return value.reshape(())
