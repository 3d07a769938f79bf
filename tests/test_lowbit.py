"""Simulated low-bit weights (RTN and GPFQ) on a small CNN briefly trained on `digits`."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from helpers import train_briefly  # noqa: E402

from compress.errors import PolicyError  # noqa: E402
from compress.passes.base import PassContext, get_pass  # noqa: E402
from compress.passes.lowbit import _rows, pack_codes, unpack_codes  # noqa: E402
from compress.policy import Policy  # noqa: E402
from nas.data import load_dataset  # noqa: E402

nn = torch.nn
LOWBIT = get_pass("lowbit")
ALL = {"skip_first_last": False}  # quantize every Conv/Linear, so low bits really hurt


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
    )


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, PassContext]:
    data = load_dataset("digits", seed=0)
    ctx = PassContext(data, seed=0)
    torch.manual_seed(0)
    return train_briefly(_net(), ctx), ctx


def _apply(model: nn.Module, ctx: PassContext, **settings) -> tuple[nn.Module, dict]:
    return LOWBIT.apply(copy.deepcopy(model), {**LOWBIT.defaults, **settings}, ctx)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _output_error(model: nn.Module, ref_model: nn.Module, x: np.ndarray) -> float:
    with torch.no_grad():
        xt = torch.from_numpy(np.asarray(x))
        ref = ref_model(xt)
        return float((model(xt) - ref).norm() / ref.norm())


def test_32_bits_is_the_identity(trained):
    model, ctx = trained
    out, record = _apply(model, ctx, bits=32, method="gpfq", **ALL)
    assert record["layers"] == {} and _same_weights(out, model)


def test_no_layer_left_is_the_identity(trained):
    _, ctx = trained
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).eval()
    out, record = _apply(model, ctx, bits=2)  # skip_first_last leaves nothing of two layers
    assert record["layers"] == {} and _same_weights(out, model)


@pytest.mark.parametrize("method", ["rtn", "gpfq"])
@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_codes_take_at_most_2_to_the_bits_levels(trained, bits, method):
    model, ctx = trained
    out, record = _apply(model, ctx, bits=bits, method=method, **ALL)
    modules = dict(out.named_modules())
    assert list(record["layers"]) == ["0", "3", "6", "9", "11"]  # execution order
    qmax = 2 ** (bits - 1) - 1
    for name, entry in record["layers"].items():
        n = math.prod(entry["shape"])
        codes = unpack_codes(entry["codes"], bits, n).reshape(entry["shape"][0], -1)
        assert codes.min() >= -qmax and codes.max() <= qmax
        w = modules[name].weight.detach().reshape(entry["shape"][0], -1).numpy()
        for c in range(codes.shape[0]):
            assert len(np.unique(codes[c])) <= 2**bits and len(np.unique(w[c])) <= 2**bits
        # the weights are exactly the dequantized codes
        scale = np.asarray(entry["scale"], np.float32)[:, None]
        np.testing.assert_array_equal(w, codes.astype(np.float32) * scale)
        # bit-packed: ceil(n * bits / 8) bytes, in base64
        assert len(entry["codes"]) == 4 * math.ceil(math.ceil(n * bits / 8) / 3)


def test_rtn_error_decreases_with_bits(trained):
    model, ctx = trained
    ref = dict(model.named_modules())
    errors = []
    for bits in (2, 3, 4, 8):
        out, record = _apply(model, ctx, bits=bits, method="rtn", **ALL)
        mods = dict(out.named_modules())
        errors.append(sum(float((mods[n].weight - ref[n].weight).detach().norm() ** 2) for n in record["layers"]))
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] > 0


@pytest.mark.parametrize("bits", [4, 3])
def test_gpfq_has_lower_output_error_than_rtn(trained, bits):
    """Zhang, Zhou & Saab (2023): greedy path-following beats rounding on the network's output."""
    model, ctx = trained
    x = ctx.data.x_val  # held out: GPFQ saw only the calibration part of the training split
    rtn, _ = _apply(model, ctx, bits=bits, method="rtn", **ALL)
    gpfq, _ = _apply(model, ctx, bits=bits, method="gpfq", **ALL)
    e_rtn, e_gpfq = _output_error(rtn, model, x), _output_error(gpfq, model, x)
    assert e_gpfq < e_rtn, (e_gpfq, e_rtn)


@pytest.mark.parametrize(
    "settings",
    [{"method": "rtn", "bits": 4}, {"method": "gpfq", "bits": 3}, {"method": "gpfq", "bits": 2, "per_channel": False}],
)
def test_replay_equals_apply(trained, settings):
    model, ctx = trained
    policy = Policy.of(("lowbit", settings))
    done = policy.apply(model, ctx)
    records = json.loads(json.dumps(done.records))
    again = policy.replay(model, records, ctx)
    assert _same_weights(done.model, again)
    assert not _same_weights(done.model, model)
    assert _same_weights(model, trained[0])  # the original is untouched


def test_named_layers_only(trained):
    model, ctx = trained
    out, record = _apply(model, ctx, bits=2, layers=["6"])
    assert list(record["layers"]) == ["6"]
    changed = {k for k, v in out.state_dict().items() if not torch.equal(v, model.state_dict()[k])}
    assert changed == {"6.weight"}


@pytest.mark.parametrize(
    "settings, needle",
    [({"bits": 5}, "bits"), ({"bits": True}, "bits"), ({"method": "gptq"}, "method"), ({"layer": []}, "layers")],
)
def test_bad_settings_are_policy_errors(settings, needle):
    with pytest.raises(PolicyError, match=needle):
        Policy.of(("lowbit", settings))


@pytest.mark.parametrize("layer, needle", [("33", "33"), ("1", "BatchNorm2d")])
def test_bad_layers_are_policy_errors(trained, layer, needle):
    model, ctx = trained
    with pytest.raises(PolicyError, match=needle):
        _apply(model, ctx, layers=[layer])


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # user models may be TorchScript
def test_torchscript_is_a_policy_error(trained):
    model, ctx = trained
    with pytest.raises(PolicyError, match="TorchScript"):
        _apply(torch.jit.script(model), ctx, bits=4)


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Conv2d(6, 8, 3, padding=1), (2, 6, 7, 7)),
        (nn.Conv2d(6, 4, (3, 2), stride=2, dilation=(1, 2), groups=2, padding_mode="reflect", padding=1), (2, 6, 9, 8)),
        (nn.Conv2d(4, 4, 5, padding="same", groups=4), (2, 4, 6, 6)),
        (nn.Conv1d(3, 6, 5, stride=2, padding=2, groups=3), (2, 3, 20)),
        (nn.Linear(5, 3), (2, 4, 5)),
    ],
)
def test_gpfq_rows_are_the_layer_inputs(layer, shape):
    """im2col oracle: rows times the weight rows give the layer's output (without bias)."""
    torch.manual_seed(0)
    x = torch.randn(shape)
    rows = _rows(layer, x)  # (G, m, N0)
    g = rows.shape[0]
    w = layer.weight.detach().reshape(g, layer.weight.shape[0] // g, -1)
    y = torch.einsum("gmn,gon->gmo", rows, w)  # (G, m, out per group)
    with torch.no_grad():
        linear = isinstance(layer, nn.Linear)
        ref = layer(x) - (layer.bias if linear else layer.bias.view(-1, *([1] * (x.dim() - 2))))
    if linear:
        expect = ref.reshape(1, -1, ref.shape[-1])
    else:
        b, o = ref.shape[:2]
        expect = ref.reshape(b, g, o // g, -1).permute(1, 0, 3, 2).reshape(g, -1, o // g)
    torch.testing.assert_close(y, expect, rtol=1e-4, atol=1e-5)
    # gathering a few rows gives exactly those rows of the full matrix
    pick = torch.tensor([0, 3, rows.shape[1] - 1])
    torch.testing.assert_close(_rows(layer, x, pick), rows[:, pick], rtol=0, atol=0)


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_pack_round_trip(bits):
    qmax = 2 ** (bits - 1) - 1
    codes = np.random.default_rng(bits).integers(-qmax, qmax + 1, size=37)
    np.testing.assert_array_equal(unpack_codes(pack_codes(codes, bits), bits, 37), codes)
