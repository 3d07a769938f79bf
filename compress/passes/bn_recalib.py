"""`bn_recalib`: re-estimate every BatchNorm's running mean and variance on training data.

Why: a BN layer normalises with running statistics that were estimated on the activations of the
model *before* compression. Removing channels (structured, lowrank) or weights (unstructured)
changes those activations, and fine-tuning only refreshes the statistics at the layer's momentum:
with ``momentum=0`` (a pretrained model frozen that way, e.g. torchcrepe's BN(momentum=0,
eps=1e-3)) they never move, and eval-mode outputs are garbage although training went well
(a real user's model: 0.92 -> 0.00 after pruning + fine-tuning, 0.92 again after re-estimation).

What it does (`nas.trainer.recalibrate_bn`, the precise-BN the search trials already use): every
BN's statistics are reset and re-accumulated as a cumulative average (``momentum=None``) over
``samples`` rows of ``ctx.training()`` (a seeded subset, in batches of ``batch_size``), with the
BN layers in train mode and everything else (dropout, drop-path) in eval mode; each BN's own
momentum is put back afterwards, so nothing else about the model changes. Weights are untouched.

`compress.evaluate.deploy_policy` inserts this pass automatically after the passes that change a
model's structure or weights (`RECALIBRATE_AFTER`) unless a policy names it itself, once after
each run of them: `compress.passes.finetune.train` does not re-estimate at its end, so pruning +
fine-tuning is estimated once, after the fine-tuning. A TorchScript graph is not recalibrated (its
BN momentum is compiled in); the passes that rebuild layers convert it to an eager module first,
and that one is.

Record: ``{"bn_layers": k, "samples": n, "batch_size": b, "stale_momentum": m}`` (``m``: BN layers
whose momentum is 0 or None, the ones fine-tuning could never have refreshed), or
``{"bn_layers": 0, "skipped": why}`` when there is nothing to do (no BN, a TorchScript graph whose
BN momentum is a compiled constant). `replay` re-runs the estimation when its context carries
training data (same rows, same batches: the same statistics); with a shape-only context (rebuilding
a structure whose weights, BN buffers included, are loaded afterwards) it returns the model as is.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ..errors import PolicyError
from .base import PassContext, check_settings, register_pass

if TYPE_CHECKING:
    import torch

__all__ = ["BN_RECALIB", "BNRecalibration", "bn_layers"]


def bn_layers(model: Any) -> list[Any]:
    """The model's BatchNorm layers that keep running statistics (eager modules only)."""
    from torch import nn

    if not isinstance(model, nn.Module):
        return []
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


class BNRecalibration:
    """Precise-BN re-estimation after compression; see the module docstring."""

    name = "bn_recalib"
    terminal = False
    # 1024 rows: a per-channel mean/variance estimate from ~1000 samples (times the spatial
    # positions) is precise to a few percent, far below the shift pruning causes, and costs a few
    # forward passes; the search's own precise-BN (nas.trainer) is of the same order
    defaults: Mapping[str, Any] = {"samples": 1024, "batch_size": 128}

    def validate(self, settings: Mapping[str, Any]) -> None:
        s = check_settings(self.name, settings, self.defaults)
        for key in ("samples", "batch_size"):
            v = s[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise PolicyError(f"bn_recalib: {key!r} is an integer >= 1, got {v!r}")

    def apply(self, model: Any, settings: Mapping[str, Any], ctx: PassContext) -> tuple[Any, dict]:
        import torch

        s = check_settings(self.name, settings, self.defaults)
        self.validate(s)
        if not isinstance(model, torch.nn.Module):
            raise PolicyError(f"bn_recalib: needs a torch model, got {type(model).__name__} (put int8 last)")
        if isinstance(model, torch.jit.ScriptModule):
            # a compiled graph's BN momentum is a constant; the passes that rebuild layers convert
            # TorchScript to an eager module first, and that one is recalibrated
            return model, {"bn_layers": 0, "skipped": "TorchScript graph: its BatchNorm momentum cannot be changed"}
        bns = bn_layers(model)
        if not bns:
            return model, {"bn_layers": 0, "skipped": "the model has no BatchNorm layers"}
        stale = sum(bn.momentum in (0, 0.0, None) for bn in bns)
        n = _recalibrate(model, ctx, int(s["samples"]), int(s["batch_size"]))
        return model, {"bn_layers": len(bns), "samples": n, "batch_size": int(s["batch_size"]), "stale_momentum": stale}

    def replay(self, model: Any, record: Mapping[str, Any], ctx: PassContext) -> Any:
        if not record.get("bn_layers") or not hasattr(ctx.data, "x_train"):
            return model  # nothing was done, or the caller loads the stored weights (BN buffers too)
        _recalibrate(model, ctx, int(record["samples"]), int(record["batch_size"]))
        return model


def _recalibrate(model: torch.nn.Module, ctx: PassContext, samples: int, batch_size: int) -> int:
    """Re-estimate on ``samples`` seeded rows of ``ctx.training()``; returns the rows used."""
    import numpy as np
    import torch

    from nas.trainer import recalibrate_bn

    x, _ = ctx.training()
    rows = np.sort(np.random.default_rng(ctx.seed).permutation(len(x))[:samples])
    n = len(rows)
    # a trailing batch of one sample cannot give a BatchNorm1d its batch variance; drop that row
    if n > 1 and n % batch_size == 1:
        rows, n = rows[:-1], n - 1
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")

    def batches() -> Iterator[torch.Tensor]:
        for i in range(0, n, batch_size):
            xb = np.asarray(x[rows[i:i + batch_size]], dtype=np.float32)
            yield torch.as_tensor(xb).to(device)

    recalibrate_bn(model, batches())
    model.eval()
    return n


BN_RECALIB = register_pass(
    BNRecalibration(), "re-estimate BatchNorm running statistics on training data (inserted after pruning/fine-tuning)"
)
