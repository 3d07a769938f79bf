"""The `structured` pass: Torch-Pruning channel pruning that shrinks layers on every registered space.

Properties, not numbers: pruned models run forward and backward and cost strictly less; replay
equals apply; ratio 0 is the identity; ``round_to`` holds; and an oracle for dependency handling
-- if the channels to remove are exactly zero (weights, biases, BN affine) the pruned model must
compute the same function, which fails if any coupled layer (residual add, concat, grouped conv,
classifier input) lost the wrong channels.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import PolicyError
from compress.passes.base import PassContext, get_pass
from compress.policy import Policy
from nas.cost import export_onnx, profile
from nas.data import Dataset
from search_spaces import get_space
from search_spaces.large_kernel import reparameterize

P = get_pass("structured")
SPACES = [("unireplk", (1, 40)), ("unireplk", (1, 8, 8)), ("darts", (1, 8, 8)), ("nasnet", (1, 8, 8)),
          ("nb201", (1, 8, 8))]
IDS = [f"{n}-{len(s) - 1}d" for n, s in SPACES]
SEEDS = (0, 1, 2)
IMG = (1, 8, 8)


def _ctx(shape: tuple[int, ...], seed: int = 0, n: int = 48, classes: int = 10) -> PassContext:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *shape)).astype(np.float32)
    y = rng.integers(0, classes, n)
    data = Dataset("synthetic", x, y, x[:8], y[:8], x[:8], y[:8], classes, tuple(shape), (0.0,), (1.0,),
                   tuple(str(i) for i in range(classes)), seed)
    return PassContext(data, seed=seed, calib_size=24)


def _space_model(name: str, shape: tuple[int, ...], seed: int) -> nn.Module:
    space = get_space(name).tiny()
    torch.manual_seed(seed)
    model = space.build(space.sample(np.random.default_rng(seed)), shape, 10)
    if name == "unireplk":  # the compression stage prunes the merged (deploy) form
        _randomise_bn(model, seed)
        reparameterize(model)
    return model.eval()


def _settings(**kw: object) -> dict:
    """The defaults, but any channel count allowed: these tests check which channels go, exactly
    (the default grid of 8 is checked on its own, `test_round_to_keeps_multiples`)."""
    return {**P.defaults, "round_to": 1, **kw}


def _randomise_bn(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen))
                m.running_mean.copy_(torch.randn(n, generator=gen))
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)


def _zero_odd_channels(model: nn.Module) -> None:
    """Make every odd channel of every layer exactly zero: out rows, in columns, biases, BN affine."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.conv._ConvNd | nn.Linear):
                m.weight[1::2] = 0.0
                if m.weight.shape[1] > 1:
                    m.weight[:, 1::2] = 0.0
                if m.bias is not None:
                    m.bias[1::2] = 0.0
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight[1::2] = 0.0
                m.bias[1::2] = 0.0


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k], sb[k]), k


def _widths(model: nn.Module) -> dict[str, int]:
    return {n: (m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features)
            for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd | nn.Linear)}


class Block(nn.Module):
    """ResNet basic block; ``groups`` makes its first conv a grouped conv."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, groups=groups, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                      if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.short(x))


class ChannelScale(nn.Module):
    """A custom op Torch-Pruning has no pruner for: its own weight, applied functionally."""

    def __init__(self, c: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c, c, 1, 1) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight)


class Shuffle(nn.Module):
    """ShuffleNet's channel shuffle (2 groups): moves channels, so pruning through it is unsafe."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


class SmallResNet(nn.Module):
    """A user CNN: stem, residual blocks (one with a 3-group conv), a strided block, pool, linear."""

    def __init__(self, extra: nn.Module | None = None):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 12, 3, 1, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.layer1 = Block(12, 12)
        self.layer2 = Block(12, 12, groups=3)
        self.extra = extra if extra is not None else nn.Identity()
        self.layer3 = Block(12, 24, stride=2)
        self.head = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.extra(self.layer2(self.layer1(self.stem(x))))
        return self.head(self.layer3(x).mean((2, 3)))


def _cnn(extra: nn.Module | None = None, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = SmallResNet(extra)
    _randomise_bn(model, seed)
    return model.eval()


# -- settings -------------------------------------------------------------------------------------


def test_registered_with_defaults() -> None:
    assert P.name == "structured" and not P.terminal
    assert set(P.defaults) == {"ratio", "per_layer", "global_pruning", "importance", "round_to", "ignore"}
    P.validate(dict(P.defaults))


@pytest.mark.parametrize(
    "bad",
    [{"ratio": 1.0}, {"ratio": -0.1}, {"ratio": "0.5"}, {"ratio": True}, {"importance": "l3"},
     {"round_to": 0}, {"round_to": 2.0}, {"ignore": "stem"}, {"per_layer": {"stem.0": 1.5}},
     {"per_layer": ["stem.0"]}, {"global_pruning": "yes"}],
)
def test_validate_rejects(bad: dict) -> None:
    with pytest.raises(PolicyError, match="structured"):
        P.validate(_settings(**bad))


def test_unknown_setting_names_closest() -> None:
    with pytest.raises(PolicyError, match="ratio"):
        P.apply(_cnn(), {"ratoi": 0.5}, _ctx(IMG))


def test_bad_layer_names_are_policy_errors() -> None:
    with pytest.raises(PolicyError, match="stem.O"):
        P.apply(_cnn(), _settings(ratio=0.5, per_layer={"stem.O": 0.5}), _ctx(IMG))
    with pytest.raises(PolicyError, match="layer9"):
        P.apply(_cnn(), _settings(ratio=0.5, ignore=["layer9"]), _ctx(IMG))


# -- every space ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("space", "shape"), SPACES, ids=IDS)
def test_prunes_every_space(space: str, shape: tuple[int, ...], seed: int) -> None:
    model = _space_model(space, shape, seed)
    ctx = _ctx(shape, seed)
    pruned, record = P.apply(copy.deepcopy(model), _settings(ratio=0.5), ctx)
    before, after = profile(model, shape), profile(pruned, shape)
    assert after.params < before.params and after.flops < before.flops
    assert record["params"] == [before.params, after.params] and record["macs"] == [before.macs, after.macs]
    assert record["layers_skipped"] == []
    assert json.loads(json.dumps(record)) == record
    # replay on a fresh copy, without data, gives the same structure and weights
    _assert_same_state(P.replay(copy.deepcopy(model), record, ctx), pruned)
    # forward + backward in training mode, classifier width kept
    x = torch.randn(2, *shape)
    for m in (model, pruned):
        m.train()
        out = m(x)
        assert out.shape == (2, 10)
        out.square().mean().backward()
    # the same parameters get gradients (a NASNet cell input no block reads gets none in either)
    assert [n for n, p in pruned.named_parameters() if p.grad is not None] == [
        n for n, p in model.named_parameters() if p.grad is not None
    ]


@pytest.mark.parametrize(("space", "shape"), SPACES, ids=IDS)
def test_zero_channels_are_removed_exactly(space: str, shape: tuple[int, ...]) -> None:
    """Oracle: odd channels all zero -> L1 ranks them last -> pruning them keeps the function."""
    model = _space_model(space, shape, seed=1)
    _zero_odd_channels(model)
    x = torch.randn(4, *shape)
    pruned, record = P.apply(copy.deepcopy(model), _settings(ratio=0.5), _ctx(shape))
    assert record["history"] and all(len(h["keep"]) * 2 == h["channels"] for h in record["history"])
    torch.testing.assert_close(pruned(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which", ["cnn", "nb201", "darts"])
def test_zero_bn_channels_are_removed_exactly_bn_scale(which: str) -> None:
    model = _cnn() if which == "cnn" else _space_model(which, IMG, seed=2)
    _randomise_bn(model, 3)
    _zero_odd_channels(model)
    x = torch.randn(4, *IMG)
    pruned, record = P.apply(copy.deepcopy(model), _settings(ratio=0.5, importance="bn_scale"), _ctx(IMG))
    assert record["params"][1] < record["params"][0]
    torch.testing.assert_close(pruned(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("space", "shape"), [*SPACES, ("cnn", IMG)], ids=[*IDS, "cnn"])
def test_zero_ratio_is_identity(space: str, shape: tuple[int, ...]) -> None:
    model = _cnn() if space == "cnn" else _space_model(space, shape, seed=0)
    pruned, record = P.apply(copy.deepcopy(model), _settings(ratio=0.0, per_layer={}), _ctx(shape))
    _assert_same_state(pruned, model)
    assert record["history"] == [] and record["params"][0] == record["params"][1]
    _assert_same_state(P.replay(copy.deepcopy(model), record, _ctx(shape)), model)


@pytest.mark.parametrize(("space", "shape"), [("unireplk", IMG), ("darts", IMG), ("nb201", IMG)])
def test_round_to_keeps_multiples(space: str, shape: tuple[int, ...]) -> None:
    """The pass's own default keeps channel counts on ONNX Runtime's kernel grid (a policy that
    says only ``ratio`` must not make the model slower by leaving odd widths)."""
    assert P.defaults["round_to"] == 8
    model = _space_model(space, shape, seed=0)
    pruned, record = P.apply(copy.deepcopy(model), {**P.defaults, "ratio": 0.4}, _ctx(shape))
    old, new = _widths(model), _widths(pruned)
    changed = [n for n in new if new[n] != old[n]]
    assert changed, "round_to=8 should still prune the wider layers"
    assert all(new[n] % 8 == 0 and new[n] > 0 for n in changed)
    _assert_same_state(P.replay(copy.deepcopy(model), record, _ctx(shape)), pruned)


def test_grid_rounding_never_prunes_more_than_asked() -> None:
    """Issue #22, item 5: the kept count goes *up* to the grid, so no layer loses more channels
    than asked, at least one group stays, and no further group could go without overshooting."""
    from compress.passes.structured import grid_pruned

    for channels in range(1, 65):
        for step in (1, 2, 4, 8, 16):
            for asked in range(channels):
                n = grid_pruned(asked, channels, step)
                kept = channels - n
                assert 0 <= n <= asked and kept >= min(channels, step)
                if n and step > 1:
                    assert kept % step == 0
                if step > 1:  # maximal: pruning one more group would overshoot or empty the layer
                    assert kept - step < max(channels - asked, step) or kept - step < 1
    assert grid_pruned(5, 16, 8) == 0  # ratio 0.3 of 16 on a grid of 8: Torch-Pruning pruned 8 (0.5)
    assert grid_pruned(8, 16, 8) == 8 and grid_pruned(10, 32, 8) == 8 and grid_pruned(15, 16, 8) == 8


def test_round_to_on_a_16_channel_layer_prunes_at_most_the_ratio_and_records_it() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    ctx = _ctx(IMG)
    pruned, record = P.apply(copy.deepcopy(model), {**P.defaults, "ratio": 0.3, "round_to": 8}, ctx)
    assert pruned[0].out_channels == 16 and pruned[2].out_channels == 24  # not 8 and 16: never past 0.3
    assert record["ratios"]["0"] == {"asked": 0.3, "actual": 0.0, "channels": [16, 16]}
    assert record["ratios"]["2"] == {"asked": 0.3, "actual": 0.25, "channels": [32, 24]}
    assert "6" not in record["ratios"]  # the classifier is never asked
    assert any("never prunes more than asked" in n and "asked 0.30, pruned 0.00 of 16" in n for n in ctx.notes), ctx.notes
    _assert_same_state(P.replay(copy.deepcopy(model), record, _ctx(IMG)), pruned)
    half, rec = P.apply(copy.deepcopy(model), {**P.defaults, "ratio": 0.5, "round_to": 8}, _ctx(IMG))
    assert (half[0].out_channels, half[2].out_channels) == (8, 16) and rec["ratios"]["0"]["actual"] == 0.5


def test_odd_channel_counts_are_named_in_the_notes() -> None:
    """Off the grid a 2-D model can get slower (results/round_to.md): the user is told, once."""
    model = _space_model("unireplk", IMG, seed=0)
    odd, grid = _ctx(IMG), _ctx(IMG)
    P.apply(copy.deepcopy(model), _settings(ratio=0.3, round_to=1), odd)
    P.apply(copy.deepcopy(model), {**P.defaults, "ratio": 0.3}, grid)
    assert [n for n in odd.notes if "off a multiple of 4" in n], odd.notes
    assert not [n for n in grid.notes if "off a multiple of 4" in n], grid.notes


# -- settings at work ----------------------------------------------------------------------------


def test_local_ratio_is_per_layer_and_global_ranking_is_not() -> None:
    model = _cnn()
    _, local = P.apply(copy.deepcopy(model), _settings(ratio=0.5), _ctx(IMG))
    glob_model, glob = P.apply(copy.deepcopy(model), _settings(ratio=0.5, global_pruning=True), _ctx(IMG))
    assert {len(h["keep"]) / h["channels"] for h in local["history"]} == {0.5}
    assert len({len(h["keep"]) / h["channels"] for h in glob["history"]}) > 1
    assert glob["params"][1] < glob["params"][0]
    _assert_same_state(P.replay(copy.deepcopy(model), glob, _ctx(IMG)), glob_model)


def test_per_layer_ratio_and_ignore() -> None:
    model = _cnn()
    old = _widths(model)
    pruned, _ = P.apply(copy.deepcopy(model), _settings(per_layer={"layer1.conv1": 0.5}), _ctx(IMG))
    new = _widths(pruned)
    assert new["layer1.conv1"] == old["layer1.conv1"] // 2
    assert {n: w for n, w in new.items() if n != "layer1.conv1"} == {n: w for n, w in old.items() if n != "layer1.conv1"}
    kept, _ = P.apply(copy.deepcopy(model), _settings(ratio=0.5, ignore=["layer1.conv1"]), _ctx(IMG))
    assert _widths(kept)["layer1.conv1"] == old["layer1.conv1"]
    assert _widths(kept)["layer3.conv1"] < old["layer3.conv1"]
    assert _widths(kept)["head"] == old["head"]  # the classifier's classes are never pruned


def test_taylor_uses_calibration_gradients() -> None:
    model = _cnn()
    model.train()
    ctx = _ctx(IMG, seed=0)
    pruned, record = P.apply(copy.deepcopy(model), _settings(ratio=0.5, importance="taylor"), ctx)
    assert all(m.training for m in pruned.modules())  # the train/eval flags survive
    assert all(p.grad is None for p in pruned.parameters())  # no leftover calibration gradients
    _, other = P.apply(copy.deepcopy(model), _settings(ratio=0.5, importance="taylor"), _ctx(IMG, seed=5))
    _, l1 = P.apply(copy.deepcopy(model), _settings(ratio=0.5), ctx)
    assert record["history"] != other["history"] and record["history"] != l1["history"]
    _assert_same_state(P.replay(copy.deepcopy(model), record, ctx), pruned)


# -- what Torch-Pruning cannot handle -------------------------------------------------------------


def test_custom_op_is_left_unpruned_and_named() -> None:
    model = _cnn(ChannelScale(12))
    pruned, record = P.apply(copy.deepcopy(model), _settings(ratio=0.5), _ctx(IMG))
    assert record["layers_skipped"] == ["extra"]
    assert torch.equal(pruned.extra.weight, model.extra.weight)
    assert record["params"][1] < record["params"][0]
    pruned(torch.randn(2, *IMG)).sum().backward()
    _assert_same_state(P.replay(copy.deepcopy(model), record, _ctx(IMG)), pruned)


def test_channel_shuffle_is_not_pruned_through() -> None:
    model = _cnn(Shuffle())
    _zero_odd_channels(model)
    x = torch.randn(4, *IMG)
    pruned, record = P.apply(copy.deepcopy(model), _settings(ratio=0.5), _ctx(IMG))
    assert record["layers_skipped"] and record["params"][1] < record["params"][0]
    torch.testing.assert_close(pruned(x), model(x), atol=1e-5, rtol=1e-5)  # not silently wrong


class Borrowed(nn.Module):
    """Uses a Linear's weight functionally, so Torch-Pruning never sees the layer: pruning the
    conv before it breaks the forward pass, which the pass must notice and undo."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(1, 12, 3, padding=1)
        self.conv1 = nn.Conv2d(12, 12, 3, padding=1)
        self.proj = nn.Linear(12, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(F.relu(self.conv0(x)))).mean((2, 3))
        return self.head(F.linear(x, self.proj.weight, self.proj.bias))


def test_group_that_breaks_the_model_is_skipped() -> None:
    torch.manual_seed(0)
    model = Borrowed().eval()
    pruned, record = P.apply(copy.deepcopy(model), _settings(ratio=0.5), _ctx(IMG))
    assert record["layers_skipped"] == ["conv1"]
    assert pruned.conv1.out_channels == 12 and pruned.conv0.out_channels == 6
    assert pruned(torch.randn(2, *IMG)).shape == (2, 10)
    _assert_same_state(P.replay(copy.deepcopy(model), record, _ctx(IMG)), pruned)


def test_model_that_does_not_run_on_the_input_is_a_policy_error() -> None:
    with pytest.raises(PolicyError, match="SmallResNet"):
        P.apply(_cnn(), _settings(ratio=0.5), _ctx((1, 40)))


def test_replay_rejects_a_different_model() -> None:
    _, record = P.apply(_cnn(), _settings(ratio=0.5), _ctx(IMG))
    once, _ = P.apply(_cnn(), _settings(ratio=0.5), _ctx(IMG))
    with pytest.raises(PolicyError, match="fresh copy"):
        P.replay(once, record, _ctx(IMG))
    bad = {**record, "history": [{**record["history"][0], "layer": "nope"}]}
    with pytest.raises(PolicyError, match="nope"):
        P.replay(_cnn(), bad, _ctx(IMG))


# -- deployment ---------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Constant folding")  # the exporter, on DARTS' factorized reduce
@pytest.mark.parametrize(("space", "shape"), [*SPACES, ("cnn", IMG)], ids=[*IDS, "cnn"])
def test_pruned_model_deep_copies_and_exports_to_onnx(space: str, shape: tuple[int, ...], tmp_path) -> None:
    import onnxruntime as ort

    model = _cnn() if space == "cnn" else _space_model(space, shape, seed=0)
    pruned, _ = P.apply(model, _settings(ratio=0.5), _ctx(shape))
    twin = copy.deepcopy(pruned)
    _assert_same_state(twin, pruned)
    path = export_onnx(twin, shape, tmp_path / "pruned.onnx")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = torch.randn(1, *shape)
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = pruned.eval()(x).numpy()
    assert np.abs(got - want).max() <= 1e-4


def test_policy_apply_and_replay() -> None:
    model = _space_model("nasnet", IMG, seed=2)
    policy = Policy.of(("structured", {"ratio": 0.5}))
    done = policy.apply(model, _ctx(IMG))
    assert done.records[0]["pass"] == "structured"
    _assert_same_state(policy.replay(model, done.records, _ctx(IMG)), done.model)
