"""Torch modules of the large-kernel ConvNet space: UniRepLKNet-style blocks, 1-D and 2-D.

Two papers, one idea: a few *large* depthwise kernels see far without going deep.

- RepLKNet (Ding et al., "Scaling Up Your Kernels to 31x31", CVPR 2022): a 31x31 depthwise
  kernel is trainable if a small (5x5) kernel runs beside it during training and is merged into
  it afterwards (structural re-parameterisation).
- UniRepLKNet (Ding et al., "UniRepLKNet: A Universal Perception Large-Kernel ConvNet ...",
  CVPR 2024): the *Dilated Reparam Block* adds several small *dilated* kernels, each with its
  own BatchNorm; a dilated kernel equals a sparse large kernel (zeros between taps), so every
  branch folds into one large kernel for inference. Block: large DW conv + BN -> SE -> FFN.

Every module takes ``ndim`` (1 for sequences (N, C, L), 2 for images (N, C, H, W)) and is
otherwise identical, because the re-parameterisation algebra does not depend on the number of
spatial axes. ``reparameterize()`` turns a training-form module into its deploy form in place:
conv+BN pairs become one conv with bias and parallel branches become one kernel; in eval mode
the output is unchanged (up to float rounding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "StageSpec",
    "branch_plan",
    "fuse_conv_bn",
    "dilated_to_dense",
    "ConvBN",
    "DilatedReparamBlock",
    "SqueezeExcite",
    "LargeKernelBlock",
    "LargeKernelNet",
    "reparameterize",
    "stem_stride_for",
]

_CONV: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d}
_BN: dict[int, type[nn.Module]] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}

# UniRepLKNet's own branch table (official code, `DilatedReparamBlock`): kernel K ->
# ((small kernel k, dilation d), ...). Each branch's extent (k-1)*d+1 is <= K.
_UNIREPLK_BRANCHES: dict[int, tuple[tuple[int, int], ...]] = {
    5: ((3, 1), (3, 2)),
    7: ((5, 1), (3, 2), (3, 3)),
    9: ((5, 1), (5, 2), (3, 3), (3, 4)),
    11: ((5, 1), (5, 2), (3, 3), (3, 4), (3, 5)),
    13: ((5, 1), (7, 2), (3, 3), (3, 4), (3, 5)),
    15: ((5, 1), (7, 2), (3, 3), (3, 5), (3, 7)),
    17: ((5, 1), (9, 2), (3, 4), (3, 5), (3, 7)),
}


def _check_ndim(ndim: int) -> None:
    if ndim not in _CONV:
        raise ValueError(f"ndim must be 1 (sequences) or 2 (images), got {ndim!r}")


def branch_plan(kernel: int) -> tuple[tuple[int, int], ...]:
    """The parallel training branches ``((k, dilation), ...)`` beside a ``kernel``-size DW conv.

    K in 5..17: UniRepLKNet's table. K = 3: no dilated kernel fits, so one 1-tap branch (a
    per-channel scale, as RepVGG's 1x1 branch). K >= 19 (UniRepLKNet stops at 17; RepLKNet's
    31x31 used a single 5x5): the K=17 set with its widest 3-tap branch stretched to span the
    whole kernel, so some branch still sees the full extent. Every branch satisfies
    ``(k-1)*d + 1 <= kernel`` and has odd extent, so it centres exactly inside the big kernel.
    """
    if not isinstance(kernel, int) or kernel < 3 or kernel % 2 == 0:
        raise ValueError(f"large-kernel size must be an odd int >= 3 (centred padding), got {kernel!r}")
    if kernel == 3:
        return ((1, 1),)
    if kernel in _UNIREPLK_BRANCHES:
        return _UNIREPLK_BRANCHES[kernel]
    return ((5, 1), (9, 2), (3, 4), (3, 5), (3, (kernel - 1) // 2))


def fuse_conv_bn(conv: nn.Module, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of one conv equal to ``bn(conv(x))`` with BN's running statistics.

    BN(y) = gamma * (y - mean) / sqrt(var + eps) + beta, and y = W*x + b is linear, so
    scale = gamma / std folds into every output channel: W' = W * scale, b' = beta + (b - mean) * scale.
    Weight shape (C_out, C_in/groups, *kernel); bias shape (C_out,).
    """
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std
    weight = conv.weight * scale.reshape(-1, *([1] * (conv.weight.dim() - 1)))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    return weight, bn.bias + (bias - bn.running_mean) * scale


def dilated_to_dense(weight: torch.Tensor, dilation: int, ndim: int) -> torch.Tensor:
    """The dense kernel of a dilated one: taps spread ``dilation`` apart, zeros in between.

    (C, 1, k, ..) -> (C, 1, (k-1)*d+1, ..). UniRepLKNet does this with a transposed conv of an
    identity kernel; plain strided assignment does the same for any number of spatial axes.
    """
    if dilation == 1:
        return weight
    k = weight.shape[-1]
    extent = (k - 1) * dilation + 1
    dense = weight.new_zeros(*weight.shape[:2], *([extent] * ndim))
    dense[(slice(None), slice(None)) + (slice(None, None, dilation),) * ndim] = weight
    return dense


def _deploy_conv(template: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """A copy of ``template``'s geometry with bias, holding the fused ``weight`` and ``bias``."""
    conv = type(template)(
        template.in_channels,
        template.out_channels,
        template.kernel_size,
        stride=template.stride,
        padding=template.padding,
        dilation=template.dilation,
        groups=template.groups,
        bias=True,
    ).to(device=weight.device, dtype=weight.dtype)
    conv.weight.data.copy_(weight)
    conv.bias.data.copy_(bias)
    return conv


class ConvBN(nn.Module):
    """conv (no bias) + BN; ``reparameterize()`` folds BN into the conv (then BN is Identity)."""

    def __init__(
        self, ndim: int, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__()
        _check_ndim(ndim)
        self.conv = _CONV[ndim](c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn: nn.Module = _BN[ndim](c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))

    @torch.no_grad()
    def reparameterize(self) -> None:
        if isinstance(self.bn, nn.Identity):  # already deployed
            return
        self.conv = _deploy_conv(self.conv, *fuse_conv_bn(self.conv, self.bn))
        self.bn = nn.Identity()


class DilatedReparamBlock(nn.Module):
    """Depthwise K-kernel conv + BN, plus (``rep``) parallel small/dilated DW conv + BN branches.

    Training form: ``bn0(conv_K(x)) + sum_i bn_i(conv_{k_i, d_i}(x))``; every conv is
    depthwise with "same" padding, so all terms have x's shape (N, C, *S).
    Deploy form (after `reparameterize`): one depthwise K-kernel conv with bias, the exact sum
    (UniRepLKNet Sec. 3.2: fuse each BN, dilated -> sparse dense kernel, zero-pad to K, add).
    Kernels larger than the feature map are allowed: padding K//2 keeps the size.
    """

    def __init__(self, ndim: int, channels: int, kernel: int, rep: bool = True) -> None:
        super().__init__()
        _check_ndim(ndim)
        self.ndim, self.kernel = ndim, kernel
        self.plan = branch_plan(kernel) if rep else ()
        conv, bn = _CONV[ndim], _BN[ndim]
        self.lk = conv(channels, channels, kernel, 1, kernel // 2, groups=channels, bias=False)
        self.lk_bn: nn.Module = bn(channels)
        self.branches = nn.ModuleList(
            nn.Sequential(
                conv(channels, channels, k, 1, (k - 1) * d // 2, dilation=d, groups=channels, bias=False),
                bn(channels),
            )
            for k, d in self.plan
        )

    @property
    def deployed(self) -> bool:
        return isinstance(self.lk_bn, nn.Identity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lk_bn(self.lk(x))
        for branch in self.branches:
            out = out + branch(x)
        return out

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.deployed:
            return
        weight, bias = fuse_conv_bn(self.lk, self.lk_bn)
        for (_, d), branch in zip(self.plan, self.branches, strict=True):
            w, b = fuse_conv_bn(branch[0], branch[1])
            dense = dilated_to_dense(w, d, self.ndim)  # (C, 1, k, ..) -> (C, 1, (k-1)d+1, ..)
            pad = (self.kernel - dense.shape[-1]) // 2  # both odd: centres exactly
            weight = weight + F.pad(dense, [pad] * (2 * self.ndim))
            bias = bias + b
        self.lk = _deploy_conv(self.lk, weight, bias)
        self.lk_bn = nn.Identity()
        self.branches = nn.ModuleList()
        self.plan = ()


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018) as in UniRepLKNet's SEBlock: C -> C/4 -> C gates."""

    def __init__(self, ndim: int, channels: int, reduction: int = 4) -> None:
        super().__init__()
        _check_ndim(ndim)
        hidden = max(1, channels // reduction)
        self.down = _CONV[ndim](channels, hidden, 1)
        self.up = _CONV[ndim](hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=tuple(range(2, x.dim())), keepdim=True)  # (N, C, 1, ..)
        return x * torch.sigmoid(self.up(F.relu(self.down(s))))


class LargeKernelBlock(nn.Module):
    """UniRepLKNet block: x + FFN(SE(DW_K(x))), all shapes (N, C, *S).

    UniRepLKNet: dwconv -> BN -> SE -> Linear(C, rC) -> GELU -> GRN -> Linear(rC, C) -> layer
    scale, one residual. Here the norms are BatchNorms (fusable at deploy time) and GRN/layer
    scale are replaced by a BN after the projection, which plays the same role of a learned
    per-channel scale on the residual branch and folds into the projection.
    """

    def __init__(self, ndim: int, channels: int, kernel: int, rep: bool, se: bool, ffn_ratio: int) -> None:
        super().__init__()
        conv = _CONV[ndim]
        self.dw = DilatedReparamBlock(ndim, channels, kernel, rep)
        self.se: nn.Module = SqueezeExcite(ndim, channels) if se else nn.Identity()
        self.expand = conv(channels, channels * ffn_ratio, 1)  # pointwise expansion
        self.act = nn.GELU()
        self.project = ConvBN(ndim, channels * ffn_ratio, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.se(self.dw(x))
        return x + self.project(self.act(self.expand(y)))


class StageSpec(NamedTuple):
    """One stage's decisions: ``depth`` blocks of ``width`` channels, DW ``kernel``, flags."""

    depth: int
    width: int
    kernel: int
    rep: bool
    se: bool
    ffn: int


# UniRepLKNet's 4x stem is sized for 224-pixel images; 8x8 digits would lose most of their
# detail, so the stem halves only inputs >= 16. Large depthwise kernels are memory bound and
# slow on CPU: a 4-stage net on 28x28 trains ~9x faster with the 14x14 stem output.
_STEM_STRIDE_MIN_SIZE = 16
# Stages halve the resolution only while it is at least this large: below ~2 pixels/steps
# there is nothing left to aggregate.
_DOWNSAMPLE_MIN_SIZE = 4


def stem_stride_for(size: int) -> int:
    """Stem stride for an input whose smallest spatial size is ``size``."""
    return 2 if size >= _STEM_STRIDE_MIN_SIZE else 1


class LargeKernelNet(nn.Module):
    """stem -> stages (transition conv + blocks) -> global average pool -> linear.

    Input (N, C_in, L) for ``ndim=1`` or (N, C_in, H, W) for ``ndim=2``; output (N, classes).
    Stem: 3-tap conv + BN + GELU (stride 2 only for inputs >= 16). Each stage starts with a
    3-tap conv + BN that changes the width and, for stages after the first, halves the
    resolution while it is >= 4 (UniRepLKNet's strided downsampling layers).
    """

    def __init__(
        self,
        ndim: int,
        in_channels: int,
        spatial_size: int,
        num_classes: int,
        stem_width: int,
        stages: Sequence[StageSpec],
        stem_stride: int | None = None,
    ) -> None:
        super().__init__()
        _check_ndim(ndim)
        self.ndim = ndim
        stride = stem_stride_for(spatial_size) if stem_stride is None else stem_stride
        self.stem = nn.Sequential(ConvBN(ndim, in_channels, stem_width, 3, stride), nn.GELU())
        size = math.ceil(spatial_size / stride)
        self.sizes: list[int] = []  # smallest spatial size in each stage, for reports
        width = stem_width
        layers: list[nn.Module] = []
        for i, spec in enumerate(stages):
            down = 2 if i > 0 and size >= _DOWNSAMPLE_MIN_SIZE else 1
            size = math.ceil(size / down)  # k=3, pad=1: ceil(n / stride)
            self.sizes.append(size)
            blocks = [ConvBN(ndim, width, spec.width, 3, down)]
            blocks += [
                LargeKernelBlock(ndim, spec.width, spec.kernel, bool(spec.rep), bool(spec.se), spec.ffn)
                for _ in range(spec.depth)
            ]
            layers.append(nn.Sequential(*blocks))
            width = spec.width
        self.stages = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))  # (N, C_last, *S_last)
        return self.head(x.mean(dim=tuple(range(2, x.dim()))))  # pool -> (N, C_last) -> (N, classes)

    def reparameterize(self) -> LargeKernelNet:
        """Merge every branch and BN into its conv, in place (deploy form); returns self.

        Uses the BN running statistics, so the deploy model equals this model in eval mode.
        """
        return reparameterize(self)


def reparameterize(model: nn.Module) -> nn.Module:
    """Switch every re-parameterisable submodule of ``model`` to its deploy form; returns it."""
    # Collect first: reparameterize() replaces submodules, which must not happen mid-iteration.
    targets = [m for m in model.modules() if isinstance(m, ConvBN | DilatedReparamBlock)]
    for module in targets:
        module.reparameterize()
    return model
