"""The `remove_blocks` pass (#20, N2N stage 1): whole residual blocks and same-shape cells go.

Properties: on every kind of network that has blocks (large-kernel 1-D/2-D, NB201, DARTS cells,
a user's ResNet-style CNN) removal keeps the output shape, costs fewer parameters, replays from
its record to the same state_dict and outputs, exports to ONNX with the same outputs, and
structured pruning still works after it. An oracle for the probe: a block whose residual branch
is exactly zero costs nothing, so it must go first, and the model without it computes the same
function; among such free blocks the default ranking removes the one saving the most compute
beyond its parameters' share first (``rank="drop"`` keeps forward order), and a record from
before the ranking existed replays as made. Bad settings and a model without blocks are one-line `PolicyError`s; a depth+prune
policy search runs end to end and its trials export.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compress.errors import PolicyError
from compress.evaluate import deploy_policy
from compress.passes.base import PassContext, get_pass
from compress.passes.int8 import export_float_onnx
from compress.policy import Policy
from compress.policy_space import PolicySpace
from nas.cost import profile
from nas.data import Dataset
from search_spaces import get_space
from search_spaces.large_kernel import reparameterize

sys.path.insert(0, str(Path(__file__).parent))
from user_models import resnet_cnn  # noqa: E402

P = get_pass("remove_blocks")
IMG = (1, 8, 8)
LK = "unireplk@1|s0=(2,8,5,1,0,2)|s1=(2,16,7,1,1,2)"  # two stages of two blocks each, SE in stage 1
MODELS = [("unireplk", (1, 40)), ("unireplk", IMG), ("nb201", IMG), ("darts", IMG), ("user-cnn", IMG)]
IDS = ["unireplk-1d", "unireplk-2d", "nb201", "darts", "user-cnn"]


def _ctx(shape: tuple[int, ...], n: int = 64, classes: int = 10) -> PassContext:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, *shape)).astype(np.float32)
    y = rng.integers(0, classes, n)
    data = Dataset("synthetic", x, y, x[:16], y[:16], x[:16], y[:16], classes, tuple(shape), (0.0,), (1.0,),
                   tuple(str(i) for i in range(classes)), 0)
    return PassContext(data, seed=0, calib_size=32)


def _randomise_bn(model: nn.Module) -> nn.Module:
    """BN statistics and affines away from the identity, so no removal is trivially exact."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return model.eval()


def _model(name: str, shape: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(0)
    if name == "user-cnn":
        return _randomise_bn(resnet_cnn(10, shape[0]))
    space = get_space(name).tiny()
    g = space.from_str(LK) if name == "unireplk" else space.sample(np.random.default_rng(0))
    return _randomise_bn(space.build(g, shape, 10))


def _outputs(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(x).numpy()


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def _onnx_outputs(model: nn.Module, shape: tuple[int, ...], x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(export_float_onnx(model, shape), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


# -- removal on every kind of network ------------------------------------------------------------
@pytest.mark.parametrize(("name", "shape"), MODELS, ids=IDS)
def test_removal_keeps_shapes_replays_exactly_and_exports_to_onnx(name: str, shape: tuple[int, ...]) -> None:
    model, ctx = _model(name, shape), _ctx(shape)
    policy = Policy.of(("remove_blocks", {"count": 1, "keep_per_stage": 0}))
    out = policy.apply(model, ctx)
    record = out.records[0]
    assert len(record["removed"]) == 1 and record["removed"][0] in record["candidates"]
    assert set(record["scores"]) == set(record["candidates"])  # every candidate probed
    assert record["params"][1] < record["params"][0] == profile(model, shape).params
    assert profile(out.model, shape).params == record["params"][1]
    gone = record["removed"][0]
    assert type(out.model.get_submodule(gone)) is not type(model.get_submodule(gone))
    x = torch.randn(5, *shape, generator=torch.Generator().manual_seed(1))
    y = _outputs(out.model, x)
    assert y.shape == _outputs(model, x).shape
    again = policy.replay(model, out.records, ctx)
    assert _same_state(again, out.model)
    assert np.array_equal(_outputs(again, x), y)
    assert np.abs(_onnx_outputs(out.model, shape, x) - y).max() < 1e-4
    assert _same_state(model, _model(name, shape))  # the original is untouched


@pytest.mark.parametrize(("name", "shape"), MODELS, ids=IDS)
def test_structured_pruning_after_removal_shrinks_and_replays(name: str, shape: tuple[int, ...]) -> None:
    model, ctx = _model(name, shape), _ctx(shape)
    policy = Policy.of(("remove_blocks", {"ratio": 1.0, "keep_per_stage": 1 if name == "unireplk" else 0}),
                       ("structured", {"ratio": 0.5, "round_to": 1}))
    out = policy.apply(model, ctx)
    removed, pruned = out.records
    assert removed["removed"] and pruned["history"]
    assert pruned["params"][0] == removed["params"][1] and pruned["params"][1] < pruned["params"][0]
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(2))
    assert _outputs(out.model, x).shape == (3, 10)
    again = policy.replay(model, out.records, ctx)
    assert _same_state(again, out.model)
    assert np.abs(_onnx_outputs(out.model, shape, x) - _outputs(out.model, x)).max() < 1e-4


def test_large_kernel_blocks_have_the_same_names_in_the_training_and_merged_forms() -> None:
    """remove_blocks runs on the training form (before merge): its record replays on the merged
    form to the same model, and the stages keep a block each by default."""
    model, ctx = _model("unireplk", IMG), _ctx(IMG)
    removed, record = P.apply(reparameterize(_model("unireplk", IMG)), {**P.defaults, "count": 2}, ctx)
    assert sorted(record["stages"][b] for b in record["removed"]) == ["stages.0@8x8x8", "stages.1@16x4x4"]
    trained_then_merged = reparameterize(P.replay(model, record, ctx))
    x = torch.randn(4, *IMG)
    assert np.abs(_outputs(trained_then_merged, x) - _outputs(removed, x)).max() < 1e-4
    names = [s.name for s in deploy_policy(Policy.of(("remove_blocks", {"count": 1}), ("structured", {"ratio": 0.3})),
                                           mergeable=True).passes]
    assert names.index("merge") > names.index("structured") > names.index("remove_blocks")


def test_a_removed_darts_cell_passes_its_newer_input_on() -> None:
    """The next cell reads (s0_prev, s1) where it read (s1, cell(s0, s1)): the network equals its
    own loop with that cell skipped."""
    model, ctx = _model("darts", IMG), _ctx(IMG)
    out, record = P.apply(_model("darts", IMG), {**P.defaults, "blocks": ["cells.2"]}, ctx)
    assert record["kinds"] == {"cells.2": "cell"}
    x = torch.randn(2, *IMG)
    with torch.no_grad():
        s0 = s1 = model.stem(x)
        for k, cell in enumerate(model.cells):
            s0, s1 = s1, (s1 if k == 2 else cell(s0, s1))
        expected = model.head(s1)
    assert np.abs(_outputs(out, x) - expected.numpy()).max() < 1e-5


# -- the probe -----------------------------------------------------------------------------------
class _Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _residual_net(zero: int | None) -> nn.Module:
    torch.manual_seed(0)
    blocks = [_Residual(8) for _ in range(4)]
    if zero is not None:
        with torch.no_grad():
            blocks[zero].body[3].weight.zero_()
            blocks[zero].body[3].bias.zero_()
    return _randomise_bn(nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                       nn.Linear(8, 10)))


@pytest.mark.parametrize("rank", ["drop_per_cost", "drop"])
@pytest.mark.parametrize("zero", [2, 4])
def test_a_block_whose_branch_is_zero_goes_first_and_changes_nothing(zero: int, rank: str) -> None:
    """Four blocks of equal compute: whichever way they are ranked, the one that costs nothing goes."""
    model, ctx = _residual_net(zero - 1), _ctx(IMG)
    out, record = P.apply(_residual_net(zero - 1), {**P.defaults, "count": 1, "rank": rank}, ctx)
    assert record["removed"] == [str(zero)] and record["rank"] == rank
    assert {k: record["scores"][str(zero)][k] for k in ("drop", "change")} == {"drop": 0.0, "change": 0.0}
    assert all(s["change"] > 0 for b, s in record["scores"].items() if b != str(zero))
    x = torch.randn(4, *IMG)
    assert np.abs(_outputs(out, x) - _outputs(model, x)).max() < 1e-6
    assert isinstance(out[zero], nn.Identity)
    # keep_per_stage: all four blocks are one stage, so at most three may go
    _, three = P.apply(_residual_net(zero - 1), {**P.defaults, "count": 3}, ctx)
    assert str(zero) in three["removed"] and len(three["removed"]) == 3
    with pytest.raises(PolicyError, match=r"count=4 but only 3 of the 4 removable blocks may go with keep_per_stage=1"):
        P.apply(_residual_net(zero - 1), {**P.defaults, "count": 4}, ctx)


def _mixed_net() -> nn.Module:
    """Three blocks whose residual branches are all zero (each costs nothing to remove), of
    different compute: "1" (4 channels at 8x8: few MACs, fewer parameters), "3" (16 channels at
    8x8: most of the MACs, few parameters) and "6" (64 channels at 1x1: some MACs, most of the
    parameters). Each is a stage of its own."""
    torch.manual_seed(0)
    a, b, c = _Residual(4), _Residual(16), _Residual(64)
    with torch.no_grad():
        for block in (a, b, c):
            block.body[3].weight.zero_()
            block.body[3].bias.zero_()
    return _randomise_bn(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), a, nn.Conv2d(4, 16, 3, padding=1), b,
                                       nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 64, 1), c, nn.Flatten(), nn.Linear(64, 10)))


def _removed(settings: dict) -> list[str]:
    return P.apply(_mixed_net(), {**P.defaults, "keep_per_stage": 0, **settings}, _ctx(IMG))[1]["removed"]


def test_equally_unimportant_blocks_go_by_the_compute_they_save() -> None:
    ctx = _ctx(IMG)
    out, record = P.apply(_mixed_net(), {**P.defaults, "count": 1, "keep_per_stage": 0}, ctx)
    scores = record["scores"]
    assert all(sc["drop"] == 0.0 and sc["change"] == 0.0 for sc in scores.values())  # the oracle: all free
    # the shares are what profiling the model without each block says
    whole = profile(_mixed_net(), IMG)
    for name in ("1", "3", "6"):
        alone = P.apply(_mixed_net(), {**P.defaults, "blocks": [name]}, ctx)[0]
        left = profile(alone, IMG)
        assert scores[name]["macs"] == pytest.approx((whole.macs - left.macs) / whole.macs, abs=1e-6)
        assert scores[name]["params"] == pytest.approx((whole.params - left.params) / whole.params, abs=1e-6)
    assert scores["3"]["macs"] > scores["6"]["macs"] > scores["1"]["macs"]
    assert scores["6"]["params"] > scores["6"]["macs"] and scores["1"]["params"] < scores["1"]["macs"]
    # default (points per share of MACs saved beyond the parameter share): the most compute first
    assert record["removed"] == ["3"] and (record["rank"], record["cost"]) == ("drop_per_cost", "macs_beyond_params")
    x = torch.randn(4, *IMG)
    assert np.abs(_outputs(out, x) - _outputs(_mixed_net(), x)).max() < 1e-6
    # the parameter-heavy 1x1 block saves less than its parameters' share: it goes last ...
    assert _removed({"count": 2}) == ["1", "3"]
    # ... unless only MACs count, where it saves more than the 4-channel block
    assert _removed({"count": 2, "cost": "macs"}) == ["3", "6"]
    # rank="drop", the order before: all tie at zero, so forward order, cost ignored
    _, old = P.apply(_mixed_net(), {**P.defaults, "count": 1, "keep_per_stage": 0, "rank": "drop"}, ctx)
    assert old["removed"] == ["1"] and (old["rank"], old["cost"]) == ("drop", None)
    assert _removed({"count": 2, "rank": "drop", "cost": "macs"}) == ["1", "3"]


def test_points_per_share_saved_trade_a_real_drop_against_compute() -> None:
    """Not a lexicon of drop then compute: a block that costs 2 points but saves 5x the compute
    of a free one goes first once the free one's floor (one calibration row) makes it dearer per
    share saved."""
    from compress.passes.remove_blocks import block_order

    scores = {"free": {"drop": 0.0, "change": 0.0, "macs": 0.10, "params": 0.0},
              "costly": {"drop": 2.0, "change": 0.5, "macs": 0.50, "params": 0.0}}
    names = ["free", "costly"]
    assert block_order(names, scores, "drop_per_cost", "macs", floor=0.3) == [0, 1]  # 3 < 4 points per share
    assert block_order(names, scores, "drop_per_cost", "macs", floor=0.5) == [1, 0]  # 5 > 4
    assert block_order(names, scores, "drop", None, floor=0.5) == [0, 1]  # accuracy alone
    scores["free"]["params"] = 0.2  # saves less than its parameters' share: last under the default
    assert block_order(names, scores, "drop_per_cost", "macs_beyond_params", floor=0.01) == [1, 0]
    with pytest.raises(PolicyError, match="'cost' is one of macs_beyond_params, macs, latency_beyond_params, latency"):
        block_order(names, scores, "drop_per_cost", "time", floor=0.5)
    with pytest.raises(PolicyError, match="needs the blocks' measured latency"):
        block_order(names, scores, "drop_per_cost", "latency", floor=0.5)
    scores["free"]["latency"], scores["costly"]["latency"] = 0.3, 0.1  # measured: the free one saves more time
    assert block_order(names, scores, "drop_per_cost", "latency", floor=0.5) == [0, 1]  # 1.7 < 20
    assert block_order(names, scores, "drop_per_cost", "latency_beyond_params", floor=0.5) == [0, 1]  # 5 < 20


def test_a_latency_cost_times_each_block_and_still_replays_exactly() -> None:
    """Which block a timing picks may vary with load; that it measured every block, that a
    share is a share, and that the record replays to the same model may not."""
    ctx = _ctx(IMG)
    out, record = P.apply(_mixed_net(), {**P.defaults, "count": 1, "keep_per_stage": 0,
                                         "cost": "latency_beyond_params"}, ctx)
    shares = {b: sc["latency"] for b, sc in record["scores"].items()}
    assert set(shares) == {"1", "3", "6"} and all(-1.0 < v < 1.0 for v in shares.values())
    assert record["cost"] == "latency_beyond_params" and len(record["removed"]) == 1
    assert _same_state(P.replay(_mixed_net(), record, ctx), out)


def test_a_record_from_before_rank_replays_as_it_was_made() -> None:
    """Replay reads the removed names, not the ranking: a record without rank / cost / shares
    (as the pass wrote them before) rebuilds the same model, though today's default would choose
    another block."""
    ctx = _ctx(IMG)
    old_out, record = P.apply(_mixed_net(), {**P.defaults, "count": 1, "keep_per_stage": 0, "rank": "drop"}, ctx)
    old = {k: v for k, v in record.items() if k not in ("rank", "cost")}
    old["scores"] = {b: {"drop": sc["drop"], "change": sc["change"]} for b, sc in record["scores"].items()}
    assert old["removed"] == ["1"] != _removed({"count": 1})
    assert _same_state(P.replay(_mixed_net(), old, ctx), old_out)
    settings = {k: v for k, v in P.defaults.items() if k not in ("rank", "cost")}
    text = json.dumps({"passes": [{"pass": "remove_blocks", "settings": {**settings, "count": 1}}]})
    parsed = Policy.from_json(text)  # an old canonical text gets today's defaults (and so a new id)
    assert parsed.passes[0].settings["rank"] == "drop_per_cost" and parsed.passes[0].settings["cost"] == "macs_beyond_params"
    assert parsed.id != Policy.from_json(json.dumps({"passes": [{"pass": "remove_blocks", "settings": {
        **settings, "count": 1, "rank": "drop"}}]})).id


def test_depth_space_decides_on_the_blocks_the_pass_would_remove_first(monkeypatch: pytest.MonkeyPatch) -> None:
    import compress.policy_space as ps

    monkeypatch.setattr(ps, "MAX_BLOCKS", 2)
    space = PolicySpace.for_model(_mixed_net(), _mixed_net(), _ctx(IMG).data, kind="depth+prune", probes=False)
    assert [name for name, _ in space.options["blocks"]] == ["1", "3"]  # forward order; "6" is not decided
    assert space.options["block_sensitivity"] == (0.0, 0.0)


def test_ratio_counts_removable_blocks_and_zero_is_the_identity() -> None:
    ctx = _ctx(IMG)
    model, record = P.apply(_residual_net(None), {**P.defaults, "ratio": 0.5}, ctx)
    assert len(record["removed"]) == 2
    ctx.notes.clear()
    _, record = P.apply(_residual_net(None), {**P.defaults, "ratio": 1.0}, ctx)
    assert len(record["removed"]) == 3 and any("keep_per_stage=1 lets 3 go" in n for n in ctx.notes)
    _, record = P.apply(_residual_net(None), {**P.defaults, "ratio": 1.0, "keep_per_stage": 0}, ctx)
    assert len(record["removed"]) == 4
    same = _residual_net(None)
    for zero in ({"ratio": 0.0}, {"count": 0}, {"blocks": []}):
        out, record = P.apply(same, {**P.defaults, **zero}, ctx)
        assert out is same and record["removed"] == [] and _same_state(out, _residual_net(None))


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("settings", "message"), [
    ({}, "give exactly one of 'blocks' (names), 'count' or 'ratio'; got none"),
    ({"count": 1, "ratio": 0.5}, "give exactly one of 'blocks' (names), 'count' or 'ratio'; got count and ratio"),
    ({"count": -1}, "'count' is a number of blocks, an integer >= 0; got -1"),
    ({"count": 1.5}, "'count' is a number of blocks"),
    ({"count": True}, "'count' is a number of blocks"),
    ({"ratio": 1.5}, "'ratio' is a fraction of the removable blocks in [0, 1]; got 1.5"),
    ({"blocks": "layer1"}, "'blocks' is a list of module names, got 'layer1'"),
    ({"blocks": ["layer1", "layer1"]}, "'blocks' names 'layer1' more than once"),
    ({"count": 1, "keep_per_stage": -1}, "'keep_per_stage' is an integer >= 0; got -1"),
    ({"count": 1, "keep": 1}, "unknown setting of pass 'remove_blocks'"),
    ({"count": 1, "rank": "accuracy"}, "'rank' is one of drop_per_cost, drop; got 'accuracy'"),
    ({"count": 1, "cost": "time"}, "'cost' is one of macs_beyond_params, macs, latency_beyond_params, latency; got 'time'"),
    ({"count": 1, "rank": None}, "'rank' is one of drop_per_cost, drop; got None"),
])
def test_bad_settings_are_one_line_policy_errors(settings: dict, message: str) -> None:
    with pytest.raises(PolicyError) as err:
        Policy.of(("remove_blocks", settings))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_names_that_are_not_blocks_are_refused_naming_the_blocks() -> None:
    ctx = _ctx(IMG)
    with pytest.raises(PolicyError, match=r"'stem' is not a removable block; removable: layer1, layer2$"):
        P.apply(_model("user-cnn", IMG), {**P.defaults, "blocks": ["stem"]}, ctx)
    with pytest.raises(PolicyError, match=r"no layer 'layr1' \(did you mean 'layer1'\?\)"):
        P.apply(_model("user-cnn", IMG), {**P.defaults, "blocks": ["layr1"]}, ctx)
    _, record = P.apply(_model("user-cnn", IMG), {**P.defaults, "count": 1, "keep_per_stage": 0}, ctx)
    wrong = {**record, "removed": ["layer1.conv1"], "kinds": {"layer1.conv1": "identity"}}
    with pytest.raises(PolicyError, match="does not have as a removable block"):
        P.replay(_model("user-cnn", IMG), wrong, ctx)


def test_a_model_without_blocks_is_refused_in_one_line_saying_why() -> None:
    plain = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    with pytest.raises(PolicyError) as err:
        P.apply(plain, {**P.defaults, "count": 1}, _ctx(IMG))
    text = str(err.value)
    assert "has no residual block whose input and output shapes match" in text and "\n" not in text
    with pytest.raises(PolicyError, match="policy space depth\\+prune: Sequential has no residual block"):
        PolicySpace.for_model(plain, plain, _ctx(IMG).data, kind="depth+prune", probes=False)


# -- the depth+prune policy space ----------------------------------------------------------------
def test_depth_prune_space_drops_blocks_and_never_prunes_their_layers() -> None:
    from helpers import digits

    data = digits()
    lk = _model("unireplk", data.input_shape)
    space = PolicySpace.for_model(lk, reparameterize(_model("unireplk", data.input_shape)), data,
                                  kind="depth+prune+int8", probes=False)
    blocks = dict(space.options["blocks"])
    assert set(blocks) == {"stages.0.1", "stages.0.2", "stages.1.1", "stages.1.2"}
    assert len(space.options["block_sensitivity"]) == 4
    again = PolicySpace.from_json(json.loads(json.dumps(space.to_json())))
    rng = np.random.default_rng(0)
    for _ in range(12):
        g = space.sample(rng)
        policy = space.policy(g)
        assert again.policy(g) == policy and np.array_equal(again.encode(g), space.encode(g))
        dropped = [b for i, b in enumerate(blocks) if g.as_dict()[f"drop_b{i}"] == "drop"]
        names = [s.name for s in policy.passes]
        assert names[-1] == "int8" and (names[0] == "remove_blocks") == bool(dropped)
        if dropped:
            assert policy.passes[0].settings["blocks"] == dropped
        per_layer = next((s.settings["per_layer"] for s in policy.passes if s.name == "structured"), {})
        assert not set(per_layer) & {n for b in dropped for n in blocks[b]}
    keep_all = space.from_dims({d.name: d.choices[0] for d in space.dims})
    drop_all = space.from_dims({d.name: ("drop" if d.name.startswith("drop_b") else d.choices[0]) for d in space.dims})
    kept, gone = space.features(keep_all), space.features(drop_all)
    assert gone[space.FEATURES.index("params_kept")] < kept[space.FEATURES.index("params_kept")] == pytest.approx(1.0)


def test_depth_prune_policy_search_runs_end_to_end_and_exports(tmp_path) -> None:
    from helpers import digits_ctx, train_briefly
    from safetensors.torch import save_file

    from nas_run.cli import main

    torch.manual_seed(0)
    model = train_briefly(resnet_cnn(10, 1), digits_ctx(), epochs=3)
    weights = tmp_path / "cnn.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    out = tmp_path / "out"
    argv = ["compress", "--model", f"{Path(__file__).parent / 'user_models.py'}:resnet_cnn", "--weights", str(weights),
            "--dataset", "digits", "--out", str(out), "--search", "random", "--budget", "3",
            "--policy-space", "depth+prune", "--finetune-epochs", "1", "--quiet"]
    assert main(argv) == 0
    import pandas as pd

    rows = pd.read_csv(out / "compress.csv")
    done = rows[rows.status == "complete"]
    assert len(done) == 3
    first = [Policy.from_json(text).passes[0].name for text in done.policy]
    assert "remove_blocks" in first
    assert (done.params < profile(model, (1, 8, 8)).params).all()
    number = int(done[[f == "remove_blocks" for f in first]].number.iloc[0])
    assert main(["export", str(out), "--trial", str(number), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
