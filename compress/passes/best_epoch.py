"""Keep-best for fine-tuning: score the model on the held-out calibration rows before training and
after every epoch, and give back the best epoch's weights.

Why: a fixed number of epochs at a fixed learning rate is a guess. A pruned CNN needs them (the
pitch model CREPE recovers 14 points in 4 epochs), a pretrained LSTM that lost nothing is damaged
by them (Resemblyzer: -3 cosine points from fine-tuning alone, results/user_models.md). Scoring each
epoch on rows fine-tuning never trains on (``ctx.calibration()``, the int8/GPFQ calibration part of
the training split; the validation split stays untouched for the trial's measurement) lets the pass
keep the weights as they came in (epoch 0) when training only hurt, and an earlier epoch when the
last one overshot.

The score is the task's metric (`compress.tasks`, ``ctx.task.metric``: accuracy by default, a
user's ``--metric`` otherwise), oriented higher-is-better. **Ties go to the later epoch**: the
schedule anneals towards its end, and a tie on a few hundred rows does not show that training hurt,
so keep-best changes nothing unless an earlier epoch scored strictly better.

**BatchNorm.** The deployed policy re-estimates BN statistics after fine-tuning (the ``bn_recalib``
step `compress.evaluate.deploy_policy` inserts), so each candidate is scored with its statistics
re-estimated the same way (same rows, same batches) and its own buffers put back afterwards:
otherwise a momentum-0 model (torchcrepe's BN) would be scored on the stale statistics of the
unpruned model at every epoch, and a momentum-0.1 one on statistics trailing its weights, neither
of which is what ships. Re-estimation is a function of the weights alone (every statistic is reset
first), so the restored best epoch ends up with exactly the statistics it was scored with.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from .base import PassContext

if TYPE_CHECKING:
    import torch

__all__ = ["BestEpoch"]

# scored in batches of this many rows: the calibration part is a few hundred rows
_BATCH = 256


class BestEpoch:
    """Tracks the best-scoring snapshot of ``model`` over epochs (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, ctx: PassContext, device: torch.device):
        import torch

        x, y = ctx.calibration()
        self.model, self.ctx, self.y = model, ctx, y
        self.x = torch.as_tensor(x).to(device)
        self.scores: list[float] = []  # the metric as measured (mae stays positive), epoch 0 first
        self.best_epoch = -1
        self._best_signed = -math.inf
        self._best_state: dict[str, torch.Tensor] | None = None

    @property
    def metric_name(self) -> str:
        return self.ctx.task.metric.name

    def observe(self, epoch: int) -> None:
        """Score the model as it is now; snapshot it when it is at least as good as the best so far."""
        state = _snapshot(self.model)
        value = self._score()
        self.model.load_state_dict(state)  # the model's own BN buffers back: training goes on unchanged
        self.scores.append(value)
        signed = self.ctx.task.metric.signed(value)
        # NaN never wins; a tie goes to the later epoch
        if self.best_epoch < 0 or (signed == signed and signed >= self._best_signed):
            self.best_epoch, self._best_signed, self._best_state = epoch, signed, state

    def restore(self) -> None:
        """Load the best epoch's weights and buffers into the model (masked weights stay zero:
        every snapshot was taken after the masks were applied)."""
        if self._best_state is not None:
            self.model.load_state_dict(self._best_state)

    def _score(self) -> float:
        import torch

        from .bn_recalib import BN_RECALIB, _recalibrate, bn_layers

        if bn_layers(self.model) and not isinstance(self.model, torch.jit.ScriptModule):
            d = BN_RECALIB.defaults
            _recalibrate(self.model, self.ctx, int(d["samples"]), int(d["batch_size"]))
        self.model.eval()
        with torch.no_grad():
            out = torch.cat([self.model(self.x[i : i + _BATCH]) for i in range(0, len(self.x), _BATCH)])
        return float(self.ctx.task.metric(out.float().cpu().numpy(), self.y))


def _snapshot(model: Any) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
