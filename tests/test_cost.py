"""Cost model: exact MAC formulas on single layers, mode/thread restoration, ONNX parity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nas.cost import Latency, ModelStats, count_params, export_onnx, measure, measure_latency, profile
from search_spaces.errors import ConfigError, UnknownNameError


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


def test_count_params_counts_shared_once_and_trainable_only() -> None:
    lin = nn.Linear(4, 3)
    model = nn.Sequential(lin, nn.ReLU(), nn.Linear(3, 4), lin)
    assert count_params(model) == (4 * 3 + 3) + (3 * 4 + 4)
    lin.weight.requires_grad_(False)
    assert count_params(model, trainable_only=True) == 3 + (3 * 4 + 4)


@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (2, 1, 1), (1, 2, 2), (3, 1, 2)])
def test_conv2d_macs_exact(stride: int, padding: int, dilation: int) -> None:
    cin, cout, k, h, w, batch = 3, 5, 3, 11, 9, 2
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation)
    ho = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    wo = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    stats = profile(conv, (cin, h, w), batch_size=batch)
    assert stats.macs == batch * cout * ho * wo * cin * k * k
    assert stats.flops == 2 * stats.macs
    assert stats.params == cout * cin * k * k + cout
    assert stats.activations == batch * cout * ho * wo
    assert stats.input_shape == (cin, h, w) and stats.batch_size == batch
    assert stats.uncounted == ()


def test_conv1d_macs_exact_with_stride_and_dilation() -> None:
    conv = nn.Conv1d(4, 6, kernel_size=5, stride=2, dilation=3, padding=1)
    length = 40
    lo = (length + 2 - 3 * 4 - 1) // 2 + 1
    assert profile(conv, (4, length)).macs == 6 * lo * 4 * 5


def test_depthwise_and_grouped_conv_account_for_groups() -> None:
    c, h = 16, 8
    depthwise = nn.Conv2d(c, c, 3, padding=1, groups=c)
    dense = nn.Conv2d(c, c, 3, padding=1)
    grouped = nn.Conv2d(c, 2 * c, 3, padding=1, groups=4)
    assert profile(depthwise, (c, h, h)).macs == c * h * h * 9
    assert profile(dense, (c, h, h)).macs == c * h * h * c * 9
    assert profile(grouped, (c, h, h)).macs == 2 * c * h * h * (c // 4) * 9


def test_linear_macs_exact_including_extra_leading_axes() -> None:
    assert profile(nn.Linear(20, 7), (20,), batch_size=3).macs == 3 * 20 * 7
    # Linear applies to the last axis; every other axis multiplies the work
    assert profile(nn.Linear(20, 7), (5, 20), batch_size=3).macs == 3 * 5 * 20 * 7


def test_conv_transpose_macs() -> None:
    deconv = nn.ConvTranspose2d(4, 6, 2, stride=2)
    assert profile(deconv, (4, 5, 5)).macs == 4 * 5 * 5 * 6 * 4


def test_small_net_total_is_sum_of_layer_rules() -> None:
    stats = profile(small_net(), (1, 8, 8), batch_size=2)
    conv1 = 2 * 8 * 8 * 8 * 9
    elementwise = 2 * (2 * 8 * 8 * 8)  # BatchNorm + ReLU
    pool = 2 * 8 * 4 * 4 * 4
    depthwise = 2 * 8 * 4 * 4 * 9
    adaptive = 2 * 8 * 4 * 4
    linear = 2 * 8 * 10
    assert stats.macs == conv1 + elementwise + pool + depthwise + adaptive + linear
    assert isinstance(stats, ModelStats)
    assert stats.as_dict()["macs"] == stats.macs


def test_unknown_leaf_modules_are_reported() -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.w

    stats = profile(nn.Sequential(nn.Linear(4, 4), Scale()), (4,))
    assert stats.uncounted == ("Scale",)
    assert stats.macs == 16


def test_profile_and_latency_restore_training_flags_and_threads() -> None:
    model = small_net().train()
    model[1].eval()  # a frozen BatchNorm inside a training model: mixed modes must survive
    threads = torch.get_num_threads()
    profile(model, (1, 8, 8))
    measure_latency(model, (1, 8, 8), threads=1, warmup=1, repeats=2)
    assert model.training and not model[1].training and model[0].training
    assert torch.get_num_threads() == threads
    assert all(p.grad is None for p in model.parameters())


def test_profile_does_not_update_batchnorm_statistics() -> None:
    model = small_net().train()
    before = model[1].running_mean.clone()
    profile(model, (1, 8, 8), batch_size=4)
    assert torch.equal(model[1].running_mean, before)


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_measure_latency_returns_sane_record(runtime: str) -> None:
    lat = measure_latency(
        small_net(), (1, 8, 8), batch_size=2, threads=1, warmup=1, repeats=3, runtime=runtime
    )
    assert isinstance(lat, Latency)
    assert lat.runtime == runtime and lat.repeats == 3 and lat.warmup == 1 and lat.threads == 1
    assert lat.batch_size == 2
    assert 0 < lat.median_ms <= lat.p90_ms and lat.mean_ms > 0


def test_unknown_runtime_names_the_valid_ones() -> None:
    with pytest.raises(UnknownNameError, match="onnxruntime"):
        measure_latency(small_net(), (1, 8, 8), runtime="tensorrt")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"repeats": 0},
        {"warmup": -1},
        {"threads": 0},
        {"batch_size": 0},
        {"input_shape": (1, 8.5, 8)},
        {"input_shape": ()},
    ],
)
def test_bad_settings_raise_config_error(kwargs: dict) -> None:
    args = {"input_shape": (1, 8, 8), **kwargs}
    with pytest.raises(ConfigError):
        measure_latency(small_net(), **args)


def test_onnx_export_matches_torch(tmp_path) -> None:
    import onnxruntime as ort

    model = small_net()
    # non-trivial BatchNorm statistics, so the export must carry them
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 1, 8, 8))
    model.eval()
    path = export_onnx(model, (1, 8, 8), tmp_path / "sub" / "net.onnx", batch_size=3)
    assert path.exists()
    x = np.random.default_rng(1).standard_normal((3, 1, 8, 8)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": x})
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert got.shape == want.shape == (3, 10)
    assert np.abs(got - want).max() < 1e-4


def test_measure_flat_dict() -> None:
    metrics = measure(small_net(), (1, 8, 8), warmup=1, repeats=2)
    assert set(metrics) == {"params", "flops", "macs", "activations", "latency_ms"}
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["flops"] == 2 * metrics["macs"]
