"""Latency relative to a fixed reference model, timed beside it: a measure that survives a loaded host.

One ORT timing of a model (``onnx_latency_ms``) holds the host's load at that moment: on a
shared 2-vCPU VM the same model measured up to 2x apart a minute apart, and one timing ranked
two models wrongly 5-8% of the time (``bench/latency_noise.py``). Load slows every model alike,
so a reference model whose runs are interleaved one for one with the candidate's keeps what the
candidate costs: the ratio spread CV 0.01-0.03 where the milliseconds spread 0.13-0.15.
A compression trial's ``onnx_latency_ms`` is its model's median from these same interleaved runs.

``onnx_latency_rel`` = candidate median / reference median. The reference is the same bytes in
every trial of a run and on every worker (a fixed small ConvNet with seeded weights, built for
the run's input shape), so ratios of one run compare; ratios of runs on different input shapes
do not.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

__all__ = ["paired_latency_ms", "reference_onnx"]

REFERENCE_CHANNELS = 32


@functools.lru_cache(maxsize=8)
def reference_onnx(input_shape: tuple[int, ...]) -> bytes:
    """The reference model for inputs of ``input_shape`` (no batch): two 3x3 convolutions of
    32 channels, global pooling and a linear layer (Conv1d for (C, L), Conv2d for (C, H, W), an
    MLP for flat inputs), weights from a fixed seed."""
    import torch
    from torch import nn

    from .passes.int8 import export_float_onnx

    gen = torch.Generator().manual_seed(0)
    c = REFERENCE_CHANNELS
    if len(input_shape) == 3:
        layers: list[nn.Module] = [nn.Conv2d(input_shape[0], c, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    elif len(input_shape) == 2:
        layers = [nn.Conv1d(input_shape[0], c, 3, padding=1), nn.ReLU(),
                  nn.Conv1d(c, c, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten()]
    else:
        layers = [nn.Flatten(), nn.Linear(math.prod(input_shape), 4 * c), nn.ReLU(),
                  nn.Linear(4 * c, c), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(c, 10)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return export_float_onnx(model, input_shape)


def paired_latency_ms(
    model: bytes, reference: bytes, input_shape: Sequence[int], threads: int | None = 1,
    warmup: int = 5, repeats: int = 30,
) -> tuple[float, float]:
    """Median wall times (ms) of one ``session.run`` of ``model`` and of ``reference`` (batch 1,
    ORT's CPU provider, ``threads`` intra-op threads), their runs interleaved one for one so both
    see the same load."""
    import time

    import numpy as np

    from .passes.int8 import _session

    x = np.random.default_rng(0).standard_normal((1, *input_shape)).astype(np.float32)
    sessions = [_session(b, threads) for b in (model, reference)]
    feeds = [{s.get_inputs()[0].name: x} for s in sessions]
    for _ in range(warmup):
        for s, f in zip(sessions, feeds, strict=True):
            s.run(None, f)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for t, s, f in zip(times, sessions, feeds, strict=True):
            start = time.perf_counter()
            s.run(None, f)
            t.append(time.perf_counter() - start)
    return float(np.median(times[0]) * 1e3), float(np.median(times[1]) * 1e3)
