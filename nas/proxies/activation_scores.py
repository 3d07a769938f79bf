"""Proxies read from the activations: naswot, jacob_cov, zen.

Each takes a private copy of the model (`compute_proxies` makes it) and may change it freely.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from .compute import Batch, UnsupportedProxy
from .model_parts import activation_modules, logits_of

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["jacob_cov", "naswot", "zen"]


def naswot(model: nn.Module, batch: Batch) -> float:
    """NASWOT (Mellor et al. 2021): log-determinant of K, K_ij = number of activation units where
    samples i and j are on the same side (both active or both inactive), over every activation
    module. ReLU-like modules are read at the sign of their input, as the paper's binary codes;
    smooth variants (GELU, SiLU, ELU, Mish, ...) too: x > 0 is the side where they are nearly the
    identity, x < 0 where they nearly vanish, so the sign gives the same linear-region code.
    Activations computed with functions (F.relu) rather than modules are not seen; a model with
    none as modules is unsupported."""
    import torch

    acts = activation_modules(model)
    if not acts:
        raise UnsupportedProxy("no activation modules (nn.ReLU, nn.GELU, ...) to read binary codes from")
    n = int(batch.x.shape[0])
    if n < 2:
        raise UnsupportedProxy("needs a batch of at least 2 samples")
    kernel = torch.zeros((n, n), dtype=torch.float64, device=batch.x.device)

    def add_codes(module: nn.Module, inputs: tuple[Any, ...]) -> None:
        # a pre-hook: an in-place ReLU has not overwritten its input yet
        codes = (inputs[0].detach().reshape(n, -1) > 0).to(torch.float64)
        kernel.add_(codes @ codes.T).add_((1.0 - codes) @ (1.0 - codes).T)

    handles = [m.register_forward_pre_hook(add_codes) for m in acts]
    try:
        model.train()  # batch statistics, as the paper's untrained networks
        with torch.no_grad():
            model(batch.x)
    finally:
        for h in handles:
            h.remove()
    sign, logdet = torch.linalg.slogdet(kernel)
    if float(sign) <= 0:
        raise ValueError("the activation-code kernel is singular (samples share one code)")
    return float(logdet)


def jacob_cov(model: nn.Module, batch: Batch) -> float:
    """Jacobian covariance (Mellor et al. 2021, first version): the correlation matrix of the
    per-sample input gradients of the summed outputs, scored -sum(log(v + k) + 1 / (v + k)) over
    its eigenvalues v, k = 1e-5. Higher (closer to 0) is better: less correlated gradients."""
    import torch

    x = batch.x.clone().requires_grad_(True)
    model.train()
    out = logits_of(model(x))
    out.backward(torch.ones_like(out))
    if x.grad is None:
        raise UnsupportedProxy("the output does not depend on the input")
    jac = x.grad.detach().reshape(len(x), -1).to(torch.float64).cpu().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.corrcoef(jac)
    if not np.isfinite(corr).all():
        raise ValueError("a sample's input gradient is constant: the correlation is undefined")
    v = np.clip(np.linalg.eigvalsh(corr), 0.0, None)
    k = 1e-5
    return float(-np.sum(np.log(v + k) + 1.0 / (v + k)))


def zen(model: nn.Module, batch: Batch, mixup_gamma: float = 1e-2) -> float:
    """Zen-score (Lin et al. 2021): with Gaussian weights and Gaussian inputs x, e,
    log E||f(x) - f(x + gamma e)||_1 + sum over BatchNorms of log sqrt(mean batch variance).
    f is the feature map before global pooling: the input of the last adaptive pooling module,
    else of the last Linear layer (a model that pools with ``x.mean``), else the output. BN runs
    in train mode with momentum 1, so its running variance is the mini-batch variance the score
    rescales by; a BN whose input is constant (a branch cut off by a zero op) rescales nothing on
    the signal path and is left out (its log would be -inf). Data-free: only x's shape is used."""
    import torch
    from torch import nn

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.conv._ConvNd | nn.Linear):
                nn.init.normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in norms:
            m.momentum = 1.0
            if m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    model.train()
    x = torch.randn_like(batch.x)
    mixed = x + mixup_gamma * torch.randn_like(batch.x)
    with torch.no_grad():
        diff = _pre_pool_features(model, x) - _pre_pool_features(model, mixed)
        score = torch.log(diff.reshape(len(x), -1).abs().sum(1).mean())
        for m in norms:
            variance = float(torch.mean(m.running_var))
            if variance > 0.0:  # 0: a BN on a dead branch (its input is constant), off the signal path
                score = score + 0.5 * math.log(variance)
    return float(score)


def _pre_pool_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from torch import nn

    pools = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
             nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)  # fmt: skip
    seen: dict[str, Any] = {}

    def remember(kind: str) -> Any:
        def hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            seen[kind] = inputs[0]

        return hook

    handles = [m.register_forward_pre_hook(remember("pool")) for m in model.modules() if isinstance(m, pools)]
    handles += [m.register_forward_pre_hook(remember("linear")) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        out = logits_of(model(x))
    finally:
        for h in handles:
            h.remove()
    return seen.get("pool", seen.get("linear", out))
