"""The candidate operations of the NASNet and DARTS cell spaces, by name.

Every entry of `OPS` is a factory ``OPS[name](C_in, C_out, stride, affine) -> nn.Module`` whose
module maps (N, C_in, H, W) -> (N, C_out, ceil(H / stride), ceil(W / stride)) for stride 1 or 2
and any H, W >= 1, odd sizes included. That is what lets a cell sum the outputs of any two ops
applied to its inputs. Convolutions use the ReLU -> Conv -> BN ordering of NASNet (Zoph et al.,
2018, Sec. 3) and DARTS (Liu et al., 2019): a block's output is an un-activated sum of two BN
outputs, so each op starts with the ReLU it needs.

NASNet's 13 ops: identity, conv_1x3_3x1, conv_1x7_7x1, dil_conv_3x3, avg_pool_3x3,
max_pool_3x3, max_pool_5x5, max_pool_7x7, conv_1x1, conv_3x3, sep_conv_3x3, sep_conv_5x5,
sep_conv_7x7. DARTS adds skip_connect (the same as identity) and dil_conv_5x5.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "OPS",
    "OpFactory",
    "DilConv",
    "FactorizedConv",
    "FactorizedReduce",
    "Pool",
    "ReLUConvBN",
    "SepConv",
    "identity",
]

OpFactory = Callable[[int, int, int, bool], nn.Module]


def _check_stride(stride: int) -> None:
    if stride not in (1, 2):
        raise ValueError(f"cell ops support stride 1 or 2, got {stride!r}")


class ReLUConvBN(nn.Sequential):
    """ReLU -> k x k conv -> BN; padding k // 2 keeps (H, W) -> ceil(H / s), ceil(W / s)."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, affine: bool = True):
        _check_stride(stride)
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel_size, stride, kernel_size // 2, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )


class FactorizedConv(nn.Sequential):
    """ReLU -> 1 x k conv -> k x 1 conv -> BN: a k x k receptive field with 2k instead of k^2
    weights per channel pair (NASNet's "1x7 then 7x1 convolution")."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, affine: bool = True):
        _check_stride(stride)
        pad = kernel_size // 2
        super().__init__(
            nn.ReLU(inplace=False),
            # (N, C_in, H, W) -> (N, C_out, H, ceil(W / s)) -> (N, C_out, ceil(H / s), ceil(W / s))
            nn.Conv2d(C_in, C_out, (1, kernel_size), (1, stride), (0, pad), bias=False),
            nn.Conv2d(C_out, C_out, (kernel_size, 1), (stride, 1), (pad, 0), bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )


class DilConv(nn.Sequential):
    """ReLU -> depthwise k x k conv (dilation d) -> pointwise 1x1 conv -> BN.

    Padding d * (k - 1) / 2 covers the dilated kernel, so the output is ceil(H / s) for odd k.
    """

    def __init__(
        self, C_in: int, C_out: int, kernel_size: int, stride: int, dilation: int, affine: bool = True
    ):
        _check_stride(stride)
        pad = dilation * (kernel_size - 1) // 2
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, stride, pad, dilation=dilation, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )


class SepConv(nn.Sequential):
    """Depthwise-separable conv applied twice, as in NASNet and DARTS: the first one carries the
    stride and keeps C_in channels, the second maps to C_out."""

    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, affine: bool = True):
        super().__init__(
            DilConv(C_in, C_in, kernel_size, stride, 1, affine),
            DilConv(C_in, C_out, kernel_size, 1, 1, affine),
        )


class FactorizedReduce(nn.Module):
    """Halve the resolution without skipping pixels: two 1x1 stride-2 convs, one on x and one on
    x shifted by one pixel, concatenated on channels (DARTS' identity at stride 2).

    DARTS shifts with ``x[:, :, 1:, 1:]``, which gives floor(H / 2) rows on odd H while the first
    branch gives ceil(H / 2); padding one zero row and column first makes both ceil(H / 2).
    """

    def __init__(self, C_in: int, C_out: int, affine: bool = True):
        super().__init__()
        self.relu = nn.ReLU(inplace=False)
        c_a, c_b = C_out - C_out // 2, C_out // 2  # c_b is 0 only when C_out == 1
        self.conv_a = nn.Conv2d(C_in, c_a, 1, stride=2, bias=False)
        self.conv_b = nn.Conv2d(C_in, c_b, 1, stride=2, bias=False) if c_b else None
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)  # (N, C_in, H, W)
        out = self.conv_a(x)  # (N, c_a, ceil(H/2), ceil(W/2))
        if self.conv_b is not None:
            shifted = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]  # (N, C_in, H, W), one pixel down-right
            out = torch.cat([out, self.conv_b(shifted)], dim=1)  # (N, C_out, ceil(H/2), ceil(W/2))
        return self.bn(out)


class Pool(nn.Module):
    """k x k max or average pool (padding k // 2), then a 1x1 ReLU-conv-BN when the channel count
    changes; the pool is first so a stride-2 pool halves the work of the projection."""

    def __init__(self, kind: str, kernel_size: int, C_in: int, C_out: int, stride: int, affine: bool = True):
        super().__init__()
        _check_stride(stride)
        pad = kernel_size // 2
        if kind == "max":
            self.pool: nn.Module = nn.MaxPool2d(kernel_size, stride, pad)
        elif kind == "avg":  # padded zeros would bias the border means towards 0
            self.pool = nn.AvgPool2d(kernel_size, stride, pad, count_include_pad=False)
        else:
            raise ValueError(f"pool kind must be 'max' or 'avg', got {kind!r}")
        self.project = ReLUConvBN(C_in, C_out, 1, 1, affine) if C_in != C_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x)  # (N, C_in, ceil(H/s), ceil(W/s))
        return x if self.project is None else self.project(x)


def identity(C_in: int, C_out: int, stride: int, affine: bool = True) -> nn.Module:
    """The identity where shapes allow it; otherwise the cheapest op that matches the shapes:
    a factorized reduce at stride 2, a 1x1 ReLU-conv-BN when only the channels change."""
    _check_stride(stride)
    if stride == 2:
        return FactorizedReduce(C_in, C_out, affine)
    if C_in != C_out:
        return ReLUConvBN(C_in, C_out, 1, 1, affine)
    return nn.Identity()


def _pool(kind: str, k: int) -> OpFactory:
    return lambda C_in, C_out, stride, affine: Pool(kind, k, C_in, C_out, stride, affine)


def _conv(k: int) -> OpFactory:
    return lambda C_in, C_out, stride, affine: ReLUConvBN(C_in, C_out, k, stride, affine)


def _factorized(k: int) -> OpFactory:
    return lambda C_in, C_out, stride, affine: FactorizedConv(C_in, C_out, k, stride, affine)


def _sep(k: int) -> OpFactory:
    return lambda C_in, C_out, stride, affine: SepConv(C_in, C_out, k, stride, affine)


def _dil(k: int) -> OpFactory:
    return lambda C_in, C_out, stride, affine: DilConv(C_in, C_out, k, stride, 2, affine)


# The names must equal `nasnet_cell.OP_NAMES` (kept there so the space needs no torch);
# tests/test_nasnet_cell.py checks that they do.
OPS: dict[str, OpFactory] = {
    "identity": identity,
    "skip_connect": identity,
    "conv_1x1": _conv(1),
    "conv_3x3": _conv(3),
    "conv_1x3_3x1": _factorized(3),
    "conv_1x7_7x1": _factorized(7),
    "dil_conv_3x3": _dil(3),  # 3x3 kernel, dilation 2: a 5x5 receptive field
    "dil_conv_5x5": _dil(5),  # 5x5 kernel, dilation 2: a 9x9 receptive field
    "sep_conv_3x3": _sep(3),
    "sep_conv_5x5": _sep(5),
    "sep_conv_7x7": _sep(7),
    "avg_pool_3x3": _pool("avg", 3),
    "max_pool_3x3": _pool("max", 3),
    "max_pool_5x5": _pool("max", 5),
    "max_pool_7x7": _pool("max", 7),
}
