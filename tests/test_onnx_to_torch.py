"""`compress.onnx_to_torch.to_eager`: TorchScript -> ONNX -> eager fx GraphModule that prunes."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import PolicyError
from compress.onnx_to_torch import SUPPORTED_OPS, _handlers, to_eager
from tests.user_models import resnet_cnn

torch.set_num_threads(1)


def _script(model: nn.Module, kind: str, shape: tuple[int, ...]) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.13 deprecates torch.jit
        if kind == "script":
            return torch.jit.script(model.eval())
        return torch.jit.trace(model.eval(), torch.randn(2, *shape))


def _max_diff(a: nn.Module, b: nn.Module, shape: tuple[int, ...], batch: int = 5) -> float:
    x = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return float((a.eval()(x) - b.eval()(x)).abs().max())


def _trained_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics, so a dropped or mis-wired BatchNorm changes the output."""
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


class Net1d(nn.Module):
    """A 1-D conv net over (1, 40) signals, flattening with ``view(x.size(0), -1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, 8, 5, padding=2)
        self.bn1 = nn.BatchNorm1d(8)
        self.conv2 = nn.Conv1d(8, 16, 3, padding=1, groups=2)
        self.bn2 = nn.BatchNorm1d(16)
        self.head = nn.Linear(16 * 10, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool1d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = F.avg_pool1d(F.gelu(self.bn2(self.conv2(x))), 2)
        return self.head(x.view(x.size(0), -1))


class MixedOps(nn.Module):
    """Many ops at once: asymmetric pad, ReLU6, hardswish, constants, concat, tokens + MatMul."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 2)
        self.proj = nn.Linear(6, 8)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 8))
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(F.pad(x, (0, 1, 0, 1)))  # (N, 6, 8, 8)
        y = torch.cat([F.relu6(y), F.hardswish(y) * 0.5 - 1.0], dim=1)[:, :6]
        tokens = y.flatten(2).transpose(1, 2)  # (N, 64, 6)
        t = torch.sigmoid(self.proj(tokens)) * self.scale / 2.0  # MatMul + Add -> Linear
        attn = torch.softmax(t @ t.transpose(1, 2), dim=-1)  # tensor-tensor MatMul
        z = (attn @ t).mean(dim=1)  # (N, 8)
        return self.out(torch.cat([torch.tanh(z), z.unsqueeze(1).squeeze(1)], dim=1))


class TopK(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(40, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.topk(self.fc(x.flatten(1)), 3, dim=1).values


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(8, 6, batch_first=True)
        self.fc = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.lstm(x)[0][:, -1])


@pytest.mark.parametrize("kind", ["script", "trace"])
def test_resnet_torchscript_becomes_eager_with_its_own_layer_names(kind: str) -> None:
    torch.manual_seed(0)
    model = _trained_bn(resnet_cnn(num_classes=10, in_channels=1))
    gm = to_eager(_script(model, kind, (1, 8, 8)), (1, 8, 8))
    assert isinstance(gm, torch.fx.GraphModule)
    assert _max_diff(model, gm, (1, 8, 8)) <= 1e-4
    layer_types = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)
    want = {n: type(m) for n, m in model.named_modules() if isinstance(m, layer_types)}
    got = {n: type(m) for n, m in gm.named_modules() if isinstance(m, layer_types)}
    assert got == want  # BN kept separate, and "layer2.shortcut.0" names the same layer
    for name, p in model.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            assert torch.equal(gm.state_dict()[name], p), name


def test_conv1d_net_with_runtime_view() -> None:
    torch.manual_seed(1)
    model = _trained_bn(Net1d())
    gm = to_eager(_script(model, "script", (1, 40)), (1, 40))
    assert _max_diff(model, gm, (1, 40)) <= 1e-4
    assert {type(m) for m in gm.modules()} >= {nn.Conv1d, nn.BatchNorm1d, nn.Linear}
    assert gm.get_submodule("conv2").groups == 2


def test_mixed_ops_eager_module_and_matmul_add_fused_into_linear() -> None:
    torch.manual_seed(2)
    model = MixedOps().eval()
    gm = to_eager(model, (1, 8, 8))
    assert _max_diff(model, gm, (1, 8, 8)) <= 1e-4
    assert isinstance(gm.get_submodule("proj"), nn.Linear) and gm.get_submodule("proj").bias is not None
    x = torch.randn(4, 1, 8, 8)
    assert gm(x).shape == (4, 4)  # the batch stays dynamic


def test_converted_module_deep_copies_independently() -> None:
    gm = to_eager(_script(resnet_cnn(10, 1), "trace", (1, 8, 8)), (1, 8, 8))
    twin = copy.deepcopy(gm)
    assert _max_diff(gm, twin, (1, 8, 8)) == 0.0
    with torch.no_grad():
        twin.get_submodule("stem.0").weight.zero_()
    assert _max_diff(gm, twin, (1, 8, 8)) > 0.0


def test_structured_pruning_then_finetune_on_converted_torchscript(tmp_path) -> None:
    from compress.passes.base import PassContext
    from compress.policy import Policy
    from nas.cost import export_onnx, profile
    from nas.data import load_dataset

    ctx = PassContext(load_dataset("digits", seed=0), calib_size=64)
    gm = to_eager(_script(resnet_cnn(10, 1), "script", (1, 8, 8)), (1, 8, 8))
    pruned = Policy.of(("structured", {"ratio": 0.5, "round_to": 4})).apply(gm, ctx).model  # layer1 is 8 wide: the default grid of 8 cannot thin it
    assert profile(pruned, (1, 8, 8)).params < profile(gm, (1, 8, 8)).params
    assert pruned.get_submodule("layer1.conv1").out_channels < gm.get_submodule("layer1.conv1").out_channels
    x = torch.randn(3, 1, 8, 8)
    pruned.train()
    loss = pruned(x).square().mean()
    loss.backward()
    assert pruned.get_submodule("stem.0").weight.grad is not None
    assert export_onnx(pruned, (1, 8, 8), tmp_path / "pruned.onnx").stat().st_size > 0
    tuned = Policy.of(("finetune", {"epochs": 1})).apply(pruned, ctx).model
    assert any(not torch.equal(a, b) for a, b in zip(tuned.parameters(), pruned.parameters(), strict=True))


@pytest.mark.parametrize(("model", "shape", "op"), [(TopK(), (1, 40), "TopK"), (Recurrent(), (5, 8), "LSTM")])
def test_unsupported_op_is_a_policy_error_naming_it(model: nn.Module, shape: tuple[int, ...], op: str) -> None:
    with pytest.raises(PolicyError, match=op) as info:
        to_eager(_script(model, "trace", shape), shape)
    assert "int8" in str(info.value) and "finetune" in str(info.value)


def test_a_wrong_rebuild_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import compress.onnx_to_torch as o

    def wrong() -> dict:
        table = _handlers()
        table["Relu"] = table["Sigmoid"]
        return table

    monkeypatch.setattr(o, "_handlers", wrong)
    with pytest.raises(PolicyError, match="differs from the original"):
        to_eager(resnet_cnn(10, 1).eval(), (1, 8, 8))


def test_supported_ops_lists_exactly_the_handlers() -> None:
    assert set(SUPPORTED_OPS) == set(_handlers())
