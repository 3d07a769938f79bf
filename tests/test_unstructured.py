"""Unstructured magnitude pruning: exact sparsity, global vs per-layer thresholds, identity at 0,
replay = apply, zlib size falls, iterative pruning (LTH) with its geometric schedule and rewind."""

from __future__ import annotations

import zlib

import pytest
import torch
from helpers import digits, digits_ctx
from torch import nn

from compress.errors import PolicyError
from compress.passes import finetune
from compress.passes.unstructured import NOTE, compressed_size_bytes, masks_of, prunable_layers
from compress.policy import Policy

_digits, _ctx = digits, digits_ctx


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 16, 32), nn.ReLU(), nn.Linear(32, 10),
    )  # fmt: skip


def _prune(**settings) -> Policy:
    return Policy.of(("unstructured", settings))


def _zeros(model: nn.Module, names=None) -> float:
    layers = prunable_layers(model)
    ws = [layers[n].weight for n in (names or layers)]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def _same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("sparsity", [0.3, 0.8, 0.95])
def test_achieved_sparsity_matches_target(scope, sparsity):
    ctx = _ctx()
    out = _prune(sparsity=sparsity, scope=scope).apply(_cnn(), ctx)
    rec = out.records[0]
    assert abs(_zeros(out.model) - sparsity) <= 0.01
    assert rec["sparsity"] == pytest.approx(_zeros(out.model))
    assert rec["note"] == NOTE and NOTE in ctx.notes and NOTE in out.notes


def test_global_threshold_varies_per_layer_and_layer_scope_does_not():
    model = _cnn()
    glob = _prune(sparsity=0.6, scope="global").apply(model, _ctx()).model
    per = _prune(sparsity=0.6, scope="layer").apply(model, _ctx()).model
    g = {n: _zeros(glob, [n]) for n in prunable_layers(glob)}
    p = {n: _zeros(per, [n]) for n in prunable_layers(per)}
    # global: one threshold, so layers initialised at different scales (fan-in) differ
    assert max(g.values()) - min(g.values()) > 0.1
    magnitudes = torch.cat([m.weight.detach().abs().flatten() for m in prunable_layers(glob).values()])
    survivors = magnitudes[magnitudes > 0]
    orig = torch.cat([m.weight.detach().abs().flatten() for m in prunable_layers(model).values()])
    assert survivors.min() >= orig[(magnitudes == 0)].max()  # every pruned weight <= every survivor
    # layer: the same sparsity everywhere (up to one weight of rounding)
    for n, v in p.items():
        assert abs(v - 0.6) <= 1.0 / prunable_layers(per)[n].weight.numel()


def test_zero_sparsity_is_identity():
    model, ctx = _cnn(), _ctx()
    out = _prune(sparsity=0.0).apply(model, ctx)
    _same_state(model, out.model)
    assert out.records[0]["layers"] == {} and ctx.notes == []
    assert _prune(sparsity=0.0, per_layer={"0": 0.0}).apply(model, ctx).records[0]["layers"] == {}


def test_replay_equals_apply_with_per_layer_and_ignore():
    model = _cnn()
    policy = _prune(sparsity=0.7, per_layer={"3": 0.2}, ignore=["9"])
    out = policy.apply(model, _ctx())
    assert _zeros(out.model, ["9"]) == 0.0
    assert abs(_zeros(out.model, ["3"]) - 0.2) <= 0.01
    assert abs(_zeros(out.model, ["0", "7"]) - 0.7) <= 0.01  # the global pool without the pinned layer
    replayed = policy.replay(model, out.records, _ctx())
    _same_state(out.model, replayed)
    assert out.records[0]["sparsity_all"] < out.records[0]["sparsity"]  # the ignored layer is dense


def test_masks_of_is_the_zero_pattern_and_survives_finetuning():
    out = _prune(sparsity=0.5, ignore=["9"]).apply(_cnn(), _ctx())
    masks = masks_of(out.model)
    assert set(masks) == {"0.weight", "3.weight", "7.weight"}
    for key, mask in masks.items():
        w = out.model.get_parameter(key)
        assert torch.equal(mask == 0, w == 0)
    finetune.train(out.model, _ctx(), 1, lr=1e-2, masks=masks, seed=0)
    for key, mask in masks.items():
        assert torch.all(out.model.get_parameter(key)[mask == 0] == 0)


def test_compressed_size_falls_with_sparsity():
    model = _cnn()
    sizes = [compressed_size_bytes(_prune(sparsity=s).apply(model, _ctx()).model) for s in (0.0, 0.5, 0.9)]
    assert sizes[0] > sizes[1] > sizes[2]
    raw = b"".join(t.float().numpy().tobytes() for t in model.state_dict().values())
    assert sizes[0] == len(zlib.compress(raw, 9))  # the streamed count is the one-shot zlib size


def test_bad_settings_are_policy_errors():
    with pytest.raises(PolicyError, match="nope"):
        _prune(sparsity=0.5, ignore=["nope"]).apply(_cnn(), _ctx())
    with pytest.raises(PolicyError, match="not a Conv/Linear"):
        _prune(per_layer={"2": 0.5}).apply(_cnn(), _ctx())
    for bad in ({"sparsity": 1.0}, {"sparsity": -0.1}, {"scope": "block"}, {"iterations": 0}, {"rewind": 1}, {"spars": 0.5}):
        with pytest.raises(PolicyError):
            _prune(**bad)


@pytest.fixture
def spy(monkeypatch):
    """Wraps the real `finetune.train` and keeps the masks of each call."""
    calls: list[dict[str, torch.Tensor]] = []
    real = finetune.train

    def train(model, ctx, epochs, **kw):
        calls.append({k: v.clone() for k, v in kw["masks"].items()})
        return real(model, ctx, epochs, **kw)

    monkeypatch.setattr(finetune, "train", train)
    return calls


def test_iterative_pruning_reaches_final_sparsity_geometrically(spy):
    model = _cnn()
    out = _prune(sparsity=0.875, iterations=3, epochs_per_iteration=1, lr=1e-2).apply(model, _ctx())
    assert len(spy) == 2  # training between the three pruning steps, none after the last
    # geometric: the survivors halve every step, 1 - 0.125^(t/3) = 0.5, 0.75, 0.875
    for t, masks in enumerate(spy, start=1):
        kept = sum(float(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
        assert abs(kept - 0.125 ** (t / 3)) <= 0.01
    final = masks_of(out.model)
    for key in final:  # masks only lose ones: a weight pruned once stays pruned
        assert torch.all(final[key] <= spy[1][key]) and torch.all(spy[1][key] <= spy[0][key])
    assert abs(_zeros(out.model) - 0.875) <= 0.01
    assert out.records[0]["trained"]
    # training moved the survivors: without rewind they are not the original weights
    layer = out.model.get_submodule("7").weight
    assert not torch.equal(layer, model.get_submodule("7").weight * (layer != 0))


def test_rewind_resets_survivors_to_the_initial_weights(spy):
    model = _cnn()
    policy = _prune(sparsity=0.8, iterations=3, rewind=True, lr=1e-2)
    out = policy.apply(model, _ctx())
    assert len(spy) == 2
    for name, layer in prunable_layers(out.model).items():
        original = model.get_submodule(name).weight
        assert torch.equal(layer.weight, original * (layer.weight != 0))  # w_0 * mask, exactly
    assert not torch.equal(out.model.get_submodule("9").bias, model.get_submodule("9").bias)  # it trained
    # replay restores mask * original weights: with rewind, exactly apply's pruned weights
    replayed = policy.replay(model, out.records, _ctx())
    for name, layer in prunable_layers(out.model).items():
        assert torch.equal(replayed.get_submodule(name).weight, layer.weight)
