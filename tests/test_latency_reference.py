"""Latency relative to a reference model timed beside it (`compress.latency_reference`)."""

from __future__ import annotations

import numpy as np
import pytest

from compress.latency_reference import paired_latency_ms, reference_onnx
from compress.passes.int8 import onnx_accuracy
from nas.search import open_store
from nas_run.cli import main


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 40), (64,)])
def test_the_reference_is_the_same_model_every_time(shape):
    first = reference_onnx(shape)
    reference_onnx.cache_clear()  # built again, as a Ray worker builds its own
    assert reference_onnx(shape) == first
    x = np.random.default_rng(0).standard_normal((4, *shape)).astype(np.float32)
    assert 0.0 <= onnx_accuracy(first, x, np.zeros(4, dtype=np.int64)) <= 1.0  # ORT runs it


def test_paired_timing_ranks_a_heavier_model_slower():
    import torch
    from torch import nn

    from compress.passes.int8 import export_float_onnx

    shape = (1, 8, 8)
    reference = reference_onnx(shape)
    wide = nn.Sequential(nn.Conv2d(1, 128, 3, padding=1), nn.ReLU(), nn.Conv2d(128, 128, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(128, 128, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(128, 10)).eval()
    with torch.no_grad():
        heavy = export_float_onnx(wide, shape)
    same_ms, ref_a = paired_latency_ms(reference, reference, shape, repeats=20)
    heavy_ms, ref_b = paired_latency_ms(heavy, reference, shape, repeats=20)
    assert min(same_ms, ref_a, heavy_ms, ref_b) > 0
    assert 0.5 < same_ms / ref_a < 2.0  # the reference against itself: a ratio near 1
    assert heavy_ms / ref_b > 4 * same_ms / ref_a  # ~32x the multiply-adds


def test_a_joint_run_searches_on_the_relative_latency(tmp_path):
    out = tmp_path / "rel"
    assert main(["search", "--joint", "--space", "unireplk", "--dataset", "digits", "--strategy", "random",
                 "--trials", "3", "--epochs", "1", "--objectives", "val_acc,onnx_latency_rel,file_bytes",
                 "--out", str(out), "--quiet"]) == 0
    done = open_store(out).dataframe().query("status == 'complete'")
    assert len(done) == 3
    assert (done.onnx_latency_rel > 0).all() and (done.reference_latency_ms > 0).all()
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "report.html").stat().st_size > 0
