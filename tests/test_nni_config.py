"""NNI config_list -> Policy: NNI's layer selection, legacy keys, global groups (against a
brute-force global magnitude threshold), the policies really run, and every bad entry is a
PolicyError naming it."""

from __future__ import annotations

import sys

import pytest
import torch

from compress.errors import PolicyError
from compress.nni_config import VALID_KEYS, policy_from_nni_config
from compress.passes.base import PassContext
from compress.policy import Policy
from nas.data import load_dataset
from tests.user_models import resnet_cnn

CONVS = ["stem.0", "layer1.conv1", "layer1.conv2", "layer2.conv1", "layer2.conv2", "layer2.shortcut.0"]
ALL = [*CONVS, "fc"]


@pytest.fixture
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return resnet_cnn().eval()


def per_layer(policy: Policy, pass_name: str) -> dict[str, float]:
    specs = [s for s in policy.passes if s.name == pass_name]
    return dict(specs[0].settings["per_layer"]) if specs else {}


def test_per_layer_unstructured(model) -> None:
    policy = policy_from_nni_config([{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.5}], model)
    assert [s.name for s in policy.passes] == ["unstructured"]
    assert policy.passes[0].settings["scope"] == "layer" and policy.passes[0].settings["sparsity"] == 0.0
    assert per_layer(policy, "unstructured") == dict.fromkeys(ALL, 0.5)
    # the same request in the legacy spellings and in NNI 3.0's nested form is the same policy
    for entry in (
        {"op_types": ["Conv2d", "Linear"], "sparsity": 0.5},
        {"op_types": ["default"], "sparsity_per_layer": 0.5},
        {
            "op_types": ["Conv2d", "Linear"],
            "target_names": ["weight", "bias"],
            "target_settings": {
                "weight": {"sparse_ratio": 0.5, "granularity": "default"},
                "bias": {"apply_method": "mul"},
            },
        },
    ):
        assert policy_from_nni_config([entry], model).id == policy.id


def test_the_policy_runs(model) -> None:
    ctx = PassContext(data=load_dataset("digits", seed=0))
    policy = policy_from_nni_config(
        [
            {"op_types": ["Conv2d"], "sparse_ratio": 0.5, "granularity": "out_channel"},
            {"op_names": ["fc"], "sparse_ratio": 0.3},
        ],
        model,
    )
    assert [s.name for s in policy.passes] == ["structured", "unstructured"]  # shapes change first
    assert per_layer(policy, "structured") == dict.fromkeys(CONVS, 0.5)
    out = policy.apply(model, ctx).model
    before = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in out.parameters()) < before  # channels are gone
    fc = out.fc.weight
    assert fc.shape[0] == 10  # the classes stay
    assert int((fc == 0).sum()) == round(0.3 * fc.numel())


def test_selection_follows_nni(model) -> None:
    def chosen(entry: dict) -> list[str]:
        return list(
            per_layer(policy_from_nni_config([{"sparse_ratio": 0.4, **entry}], model), "unstructured")
        )

    assert chosen({"op_names": ["fc", "stem.0"]}) == ["stem.0", "fc"]
    assert chosen({"op_names_re": [r"layer1\."]}) == ["layer1.conv1", "layer1.conv2"]  # containers dropped
    assert chosen({"op_names_re": ["layer"], "op_types": ["Conv2d"]}) == CONVS[1:]  # re.match: from the start
    assert chosen({"op_names": ["fc", "stem.0"], "op_types": ["Linear"]}) == ["fc"]  # intersection
    assert chosen({"op_types": ["Conv2d"], "exclude_op_names": ["stem.0"]}) == CONVS[1:]
    assert chosen({"op_types": ["default"], "exclude_op_types": ["Linear"]}) == CONVS
    assert chosen({"op_types": ["Conv2d"], "exclude_op_names_re": [".*conv2"]}) == [
        "stem.0",
        "layer1.conv1",
        "layer2.conv1",
        "layer2.shortcut.0",
    ]
    assert chosen({"op_partial_names": ["shortcut"]}) == ["layer2.shortcut.0"]


def test_legacy_exclude_entry_removes_layers_from_every_entry(model) -> None:
    policy = policy_from_nni_config(
        [
            {"op_types": ["Conv2d"], "sparsity": 0.5},
            {"exclude": True, "op_names": ["stem.0", "layer2.shortcut.0"]},
        ],
        model,
    )
    assert list(per_layer(policy, "unstructured")) == [
        "layer1.conv1",
        "layer1.conv2",
        "layer2.conv1",
        "layer2.conv2",
    ]


def test_a_later_entry_overrides_an_earlier_one(model) -> None:
    policy = policy_from_nni_config(
        [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.5}, {"op_names": ["fc"], "sparse_ratio": 0.1}],
        model,
    )
    assert per_layer(policy, "unstructured") == {**dict.fromkeys(CONVS, 0.5), "fc": 0.1}


def test_zero_ratio_is_the_empty_policy(model) -> None:
    assert policy_from_nni_config([{"op_types": ["Conv2d"], "sparse_ratio": 0.0}], model) == Policy()


def test_global_group_matches_a_global_magnitude_threshold(model) -> None:
    ratio = 0.6
    policy = policy_from_nni_config([{"op_types": ["Conv2d", "Linear"], "total_sparsity": ratio}], model)
    ratios = per_layer(policy, "unstructured")
    weights = {n: model.get_submodule(n).weight.detach().abs().flatten() for n in ALL}
    total = sum(w.numel() for w in weights.values())
    # oracle: the k smallest |w| over all layers together
    k = round(ratio * total)
    threshold = torch.cat(list(weights.values())).sort().values[k - 1]
    for n, w in weights.items():
        assert abs(round(ratios[n] * w.numel()) - int((w <= threshold).sum())) <= 1, n
    assert len(set(ratios.values())) > 1  # layers differ, unlike the per-layer form
    pruned = sum(ratios[n] * weights[n].numel() for n in ALL) / total
    assert pruned == pytest.approx(ratio, abs=len(ALL) / total)
    # NNI 3.0's spelling of the same group
    same = policy_from_nni_config(
        [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": ratio, "global_group_id": "g"}], model
    )
    assert same.id == policy.id


def test_global_group_respects_the_per_layer_cap(model) -> None:
    cap = 0.7
    policy = policy_from_nni_config(
        [{"op_types": ["Conv2d"], "sparse_ratio": 0.6, "global_group_id": 1, "max_sparse_ratio": cap}], model
    )
    ratios = per_layer(policy, "unstructured")
    sizes = {n: model.get_submodule(n).weight.numel() for n in CONVS}
    assert max(ratios.values()) <= cap
    assert sum(ratios.get(n, 0) * sizes[n] for n in CONVS) / sum(sizes.values()) == pytest.approx(
        0.6, abs=0.01
    )
    uncapped = per_layer(
        policy_from_nni_config([{"op_types": ["Conv2d"], "total_sparsity": 0.6}], model), "unstructured"
    )
    assert max(uncapped.values()) > cap  # so the cap did something


def test_global_out_channel_group(model) -> None:
    policy = policy_from_nni_config(
        [
            {
                "op_types": ["Conv2d"],
                "sparse_ratio": 0.5,
                "global_group_id": "c",
                "granularity": "out_channel",
                "max_sparse_ratio": 0.75,
            }
        ],
        model,
    )
    ratios = per_layer(policy, "structured")
    channels = {n: model.get_submodule(n).out_channels for n in CONVS}
    assert all(0 < r <= 0.75 for r in ratios.values())
    assert all((r * channels[n]).is_integer() for n, r in ratios.items())  # whole channels
    sizes = {n: model.get_submodule(n).weight.numel() for n in CONVS}
    share = sum(ratios.get(n, 0) * sizes[n] for n in CONVS) / sum(sizes.values())
    assert share == pytest.approx(0.5, abs=0.1)


def test_nni_is_not_imported(model) -> None:
    policy_from_nni_config([{"op_types": ["Conv2d"], "sparse_ratio": 0.5}], model)
    assert "nni" not in sys.modules


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"op_names": ["fc2"], "sparse_ratio": 0.5},
            r"op_names names 'fc2', which the model does not have \(did you mean 'fc'\?\)",
        ),
        (
            {"op_types": ["Conv2d"], "exclude_op_names": ["stemm"], "sparse_ratio": 0.5},
            "exclude_op_names names 'stemm'",
        ),
        (
            {"op_types": ["Conv2d"], "sparse_ration": 0.5},
            r"unknown or unsupported key 'sparse_ration' \(did you mean 'sparse_ratio'\?\); valid: .*op_types",
        ),
        (
            {"op_types": ["Conv2d"], "sparse_ratio": 0.5, "sparse_threshold": 0.1},
            "unsupported key 'sparse_threshold'",
        ),
        (
            {"op_types": ["Conv2d"], "sparse_ratio": 0.5, "granularity": "in_channel"},
            "granularity 'in_channel' is not supported; valid: default, out_channel",
        ),
        (
            {"op_types": ["Conv2d"]},
            "give exactly one of sparse_ratio, sparsity, sparsity_per_layer, total_sparsity",
        ),
        ({"op_types": ["Conv2d"], "sparse_ratio": 0.5, "sparsity": 0.5}, "got sparse_ratio and sparsity"),
        ({"op_types": ["Conv2d"], "sparse_ratio": 1.0}, r"sparse_ratio is a fraction in \[0, 1\)"),
        ({"op_types": "Conv2d", "sparse_ratio": 0.5}, "op_types is a list of strings"),
        (
            {"op_types": ["Conv2D"], "sparse_ratio": 0.5},
            r"'Conv2D', which is no module type \(did you mean 'Conv2d'\?\)",
        ),
        (
            {"op_types": ["BatchNorm2d"], "sparse_ratio": 0.5},
            "only Conv1d, Conv2d, Conv3d, Linear weights are pruned",
        ),
        ({"op_names": ["stem.1"], "sparse_ratio": 0.5}, "layer 'stem.1' is a BatchNorm2d"),
        ({"op_types": ["Conv1d"], "sparse_ratio": 0.5}, "selects no prunable layer"),
        ({"sparse_ratio": 0.5}, "select layers with op_names, op_types or op_names_re"),
        ({"op_names_re": ["("], "sparse_ratio": 0.5}, "bad regular expression"),
        (
            {"op_types": ["Conv2d"], "sparse_ratio": 0.5, "min_sparse_ratio": 0.8, "max_sparse_ratio": 0.6},
            "min_sparse_ratio 0.8 is above",
        ),
        ({"op_types": ["Conv2d"], "sparse_ratio": 0.5, "apply_method": "add"}, "apply_method 'add'"),
        (
            {"op_types": ["Conv2d"], "target_names": ["bias"], "sparse_ratio": 0.5},
            "target_names must name 'weight'",
        ),
        ({"op_types": ["Conv2d"], "exclude": "yes", "sparse_ratio": 0.5}, "exclude is true or false"),
        ({"exclude": True, "op_names": ["fc"], "sparsity": 0.5}, "excludes layers; it takes only"),
    ],
)
def test_bad_entries(model, config, message) -> None:
    with pytest.raises(PolicyError, match=message):
        policy_from_nni_config([config], model)


def test_bad_lists_and_groups(model) -> None:
    with pytest.raises(PolicyError, match="a list of dicts"):
        policy_from_nni_config({"op_types": ["Conv2d"], "sparse_ratio": 0.5}, model)  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match="entry 1 is a dict"):
        policy_from_nni_config([{"op_types": ["Conv2d"], "sparse_ratio": 0.5}, "fc"], model)  # type: ignore[list-item]
    with pytest.raises(PolicyError, match=r"global group 'g': .*different sparse_ratio"):
        policy_from_nni_config(
            [
                {"op_names": ["fc"], "sparse_ratio": 0.5, "global_group_id": "g"},
                {"op_names": ["stem.0"], "sparse_ratio": 0.3, "global_group_id": "g"},
            ],
            model,
        )
    with pytest.raises(PolicyError, match=r"cannot be met within the layers' min/max_sparse_ratio bounds"):
        policy_from_nni_config(
            [{"op_types": ["Conv2d"], "total_sparsity": 0.8, "max_sparsity_per_layer": 0.5}], model
        )
    assert "op_types" in VALID_KEYS and "sparse_threshold" not in VALID_KEYS
