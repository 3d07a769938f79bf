"""Proxies read from the weights and their gradients: synflow, snip, grad_norm, fisher; and the
model's size, log_params and log_flops.

Each takes a private copy of the model (`compute_proxies` makes it) and may change it freely.
The sums span many orders of magnitude across architectures, so each is returned as its natural
log (a monotone map: Kendall tau and tree models are unchanged, standardised features behave). A
sum of exactly zero (the output does not depend on any weight, e.g. a NB201 cell whose every
path is cut by ``none``) has no log: the proxy is then recorded as missing, which the rank mix
treats as the worst value.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .compute import Batch, UnsupportedProxy
from .model_parts import logits_of, task_loss, weighted_layers, without_batchnorm

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["fisher", "grad_norm", "log_flops", "log_params", "snip", "synflow"]


def _log(total: float, what: str) -> float:
    if total <= 0.0:
        raise ValueError(f"{what} is {total:g}: the output does not depend on the weights")
    return math.log(total)


def _layers(model: nn.Module) -> list[nn.Module]:
    layers = weighted_layers(model)
    if not layers:
        raise UnsupportedProxy("no Conv or Linear layer with a trainable weight")
    return layers


def _backward_task_loss(model: nn.Module, batch: Batch) -> None:
    """One forward/backward of the run's loss in train mode (batch statistics, as in training)."""
    model.train()
    model.zero_grad(set_to_none=True)
    task_loss(logits_of(model(batch.x)), batch.y).backward()


def synflow(model: nn.Module, batch: Batch) -> float:
    """SynFlow (Tanaka et al. 2020; as a NAS proxy, Abdelfattah et al. 2021): with every weight
    replaced by its absolute value, BatchNorm off and an all-ones input of one sample, the sum
    over Conv/Linear weights of |w * dR/dw| where R is the sum of the outputs. Data-free. In
    float64, whose range holds the products of the deep networks tried here; an overflow is
    recorded as missing (not finite)."""
    import torch

    layers = _layers(without_batchnorm(model))
    model.double().eval()  # eval: no dropout; BN is gone already
    with torch.no_grad():
        for p in model.parameters():
            p.abs_()
    ones = torch.ones((1, *batch.x.shape[1:]), dtype=torch.float64, device=batch.x.device)
    model.zero_grad(set_to_none=True)
    logits_of(model(ones)).sum().backward()
    total = sum(float((m.weight.detach() * m.weight.grad).abs().sum()) for m in layers if m.weight.grad is not None)
    return _log(total, "synflow")


def snip(model: nn.Module, batch: Batch) -> float:
    """SNIP's connection sensitivity (Lee et al. 2019): sum over Conv/Linear weights of
    |w * dL/dw| on the mini-batch."""
    layers = _layers(model)
    _backward_task_loss(model, batch)
    total = sum(float((m.weight.detach() * m.weight.grad).abs().sum()) for m in layers if m.weight.grad is not None)
    return _log(total, "snip")


def grad_norm(model: nn.Module, batch: Batch) -> float:
    """Sum over Conv/Linear layers of the L2 norm of dL/dw (Abdelfattah et al. 2021)."""
    layers = _layers(model)
    _backward_task_loss(model, batch)
    total = sum(float(m.weight.grad.norm()) for m in layers if m.weight.grad is not None)
    return _log(total, "grad_norm")


def fisher(model: nn.Module, batch: Batch) -> float:
    """Fisher information of the channels (Theis et al. 2018; as a NAS proxy, Turner et al. 2020):
    for every Conv/Linear output a and its gradient g, 0.5 * mean over the batch of
    (sum over positions of a * g)^2, summed over channels and layers."""
    import torch

    layers = _layers(model)
    captured: list[tuple[torch.Tensor, list[torch.Tensor]]] = []

    def keep(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            grads: list[torch.Tensor] = []
            output.register_hook(grads.append)
            captured.append((output.detach().clone(), grads))  # clone: a later in-place op may change it

    handles = [m.register_forward_hook(keep) for m in layers]
    try:
        _backward_task_loss(model, batch)
    finally:
        for h in handles:
            h.remove()
    total = 0.0
    for act, grads in captured:
        if not grads:
            continue
        per_channel = act * grads[0]
        if per_channel.dim() > 2:  # sum over positions: (N, C, *S) -> (N, C)
            per_channel = per_channel.flatten(2).sum(-1)
        total += float(0.5 * per_channel.pow(2).mean(0).sum())
    return _log(total, "fisher")


def log_params(model: nn.Module, batch: Batch) -> float:
    """ln(1 + parameters), training-only heads left out (`nas.cost.count_params`)."""
    from ..cost import count_params

    return math.log1p(count_params(model, inference_only=True))


def log_flops(model: nn.Module, batch: Batch) -> float:
    """ln(1 + FLOPs of one sample), counted by `nas.cost.profile`."""
    from ..cost import profile

    return math.log1p(profile(model, tuple(batch.x.shape[1:])).flops)
