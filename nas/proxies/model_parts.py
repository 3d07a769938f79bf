"""What the proxies need to find in any model: its weighted layers, its activations, its logits,
its loss. Module types only, never a space's class names, so a user's model works as a space's."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["activation_modules", "logits_of", "task_loss", "weighted_layers", "without_batchnorm"]


def weighted_layers(model: nn.Module) -> list[nn.Module]:
    """Conv (any dimension, transposed too) and Linear layers with a trainable weight: the
    "prunable" layers the gradient proxies sum over (Abdelfattah et al. 2021, as in SNIP)."""
    from torch import nn

    kinds = (nn.modules.conv._ConvNd, nn.Linear)
    return [m for m in model.modules() if isinstance(m, kinds) and getattr(m, "weight", None) is not None
            and m.weight.requires_grad]  # fmt: skip


def activation_modules(model: nn.Module) -> list[nn.Module]:
    """Activation modules whose sign pattern defines a linear region: ReLU-like ones, and the
    smooth ReLU variants (GELU, SiLU, ...), read at the sign of their input (see `naswot`)."""
    from torch import nn

    kinds = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU,
             nn.Mish, nn.Hardswish)  # fmt: skip
    return [m for m in model.modules() if isinstance(m, kinds)]


def without_batchnorm(model: nn.Module) -> nn.Module:
    """Every BatchNorm replaced by the identity, in place (synflow's data-free pass: BN would
    rescale by the statistics of an all-ones input; Abdelfattah et al. 2021 turn it off)."""
    from torch import nn

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(parent, name, nn.Identity())
    return model


def logits_of(output: Any) -> torch.Tensor:
    """The main output of a forward pass: the tensor itself, or the first of a tuple/list
    (a network that also returns auxiliary logits)."""
    import torch

    while isinstance(output, tuple | list):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"the model returned {type(output).__name__}, not a tensor")
    return output


def task_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The training loss the run would use: cross-entropy for class indices, binary cross-entropy
    for (N, K) float targets (multi-label), mean squared error for (N,) float targets."""
    from torch.nn import functional as F

    if not y.is_floating_point():
        return F.cross_entropy(logits, y.long())
    if y.dim() == logits.dim():
        return F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype))
    return F.mse_loss(logits.reshape(y.shape), y.to(logits.dtype))
