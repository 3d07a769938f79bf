"""`search_spaces.morph.inherit`: a child starts from its parent's weights (Net2Net / EAS), and
where it claims to compute the parent's function (``preserving``), it does.

Every parent has random weights and random BN running statistics (not the trivial init), every
comparison is in eval mode on random inputs.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from torch import nn

from search_spaces import GenotypeError, SearchSpace, get_space
from search_spaces.darts_genotypes import named_genotype
from search_spaces.genotype import Genotype
from search_spaces.large_kernel import reparameterize
from search_spaces.morph import Inheritance, inherit

TOLERANCE = 1e-5
LK_SHAPES = [(2, 24), (2, 12, 12)]  # 1-D and 2-D inputs of the same genotypes
IMAGE = (3, 8, 8)


def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Weights and BN statistics away from their init, at a scale that keeps outputs ~1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) * 1.5 + 0.5)
            elif name.endswith(("running_mean", "bias")):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
            elif t.dim() == 1:  # BN scales
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            else:
                t.mul_(1 + 0.5 * torch.randn(t.shape, generator=gen))
    return model


def morph(
    space: SearchSpace, parent: Genotype, child: Genotype, shape: Sequence[int], seed: int = 0
) -> tuple[nn.Module, nn.Module, Inheritance]:
    """A random parent, its child filled by `inherit`; both in eval mode."""
    parent_model = randomise(space.build(parent, shape, 3), seed).eval()
    child_model = space.build(child, shape, 3)
    result = inherit(space, parent, parent_model.state_dict(), child, child_model, seed=seed)
    return parent_model, child_model.eval(), result


def max_diff(a: nn.Module, b: nn.Module, shape: Sequence[int], seed: int = 0) -> float:
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return float((a(x) - b(x)).abs().max())


def check(result: Inheritance, parent_model: nn.Module, child_model: nn.Module, shape: Sequence[int]) -> None:
    """The invariants of every result: keys partitioned, JSON-able, ``preserving`` true to fact."""
    keys = list(child_model.state_dict())
    assert sorted(result.copied + list(result.transformed) + result.fresh) == sorted(keys)
    assert json.loads(json.dumps(result.to_json())) == result.to_json()
    if result.preserving:
        assert max_diff(parent_model, child_model, shape) <= TOLERANCE, result.mutation


# -- unireplk: every field of a stage -----------------------------------------------------------
LK = get_space("unireplk").tiny()  # 2 stages; depth 1-2, width 8/16, kernel 3..31, ffn 2/4
BASE = ((1, 8, 5, 1, 1, 2), (1, 8, 7, 1, 0, 2))  # (depth, width, kernel, rep, se, ffn) per stage


def lk(*stages: tuple[int, ...]) -> Genotype:
    return LK.validate(Genotype("unireplk", 1, tuple((f"s{i}", s) for i, s in enumerate(stages))))


FIELDS = ("depth", "width", "kernel", "rep", "se", "ffn")


def lk_pair(stage: int, parent_changes: dict, child_changes: dict) -> tuple[Genotype, Genotype]:
    """BASE with ``parent_changes`` at ``stage``; the child has ``child_changes`` on top."""
    stages = [dict(zip(FIELDS, s, strict=True)) for s in BASE]
    stages[stage].update(parent_changes)
    parent = lk(*(tuple(s.values()) for s in stages))
    stages[stage].update(child_changes)
    return parent, lk(*(tuple(s.values()) for s in stages))


# (name, stage, parent's change to BASE, child's change to the parent, function-preserving?)
LK_MUTATIONS = [
    ("width up, stage 0 (next stage reads it)", 0, {}, {"width": 16}, True),
    ("width up, last stage (head reads it)", 1, {}, {"width": 16}, True),
    ("width down", 0, {"width": 16}, {"width": 8}, False),
    ("depth up", 0, {}, {"depth": 2}, True),
    ("depth down", 0, {"depth": 2}, {"depth": 1}, False),
    ("kernel up 3->5, rep branches padded", 0, {"kernel": 3}, {"kernel": 5}, True),
    ("kernel up 7->31, dilation-3 branch folded", 1, {}, {"kernel": 31}, True),
    ("kernel up 13->31", 0, {"kernel": 13}, {"kernel": 31}, True),
    ("kernel up, no branches", 0, {"rep": 0}, {"kernel": 13}, True),
    ("kernel down", 0, {"kernel": 9}, {"kernel": 5}, False),
    ("rep 0->1", 0, {"rep": 0}, {"rep": 1}, True),
    ("rep 1->0, branches folded", 0, {}, {"rep": 0}, True),
    ("se 0->1", 1, {}, {"se": 1}, True),
    ("se 1->0", 0, {}, {"se": 0}, False),
    ("ffn up", 0, {}, {"ffn": 4}, True),
    ("ffn down", 0, {"ffn": 4}, {"ffn": 2}, False),
]


@pytest.mark.parametrize("shape", LK_SHAPES, ids=["1d", "2d"])
@pytest.mark.parametrize(
    ("name", "stage", "before", "after", "preserving"), LK_MUTATIONS, ids=[m[0] for m in LK_MUTATIONS]
)
def test_unireplk_mutation(
    name: str, stage: int, before: dict, after: dict, preserving: bool, shape: tuple
) -> None:
    parent, child = lk_pair(stage, before, after)
    assert parent != child
    parent_model, child_model, result = morph(LK, parent, child, shape)
    assert result.preserving is preserving, (name, result.mutation)
    assert result.copied, "the unchanged stem, stages and head carry over"
    check(result, parent_model, child_model, shape)
    if not preserving:  # the harness does see a changed function
        assert max_diff(parent_model, child_model, shape) > TOLERANCE


def test_unireplk_reports_what_it_did() -> None:
    parent, child = lk_pair(0, {}, {"width": 16})
    _, _, wider = morph(LK, parent, child, LK_SHAPES[1])
    assert wider.mutation == "s0_width 8->16"
    assert "net2wider" in wider.transformed["stages.0.0.conv.weight"]
    assert "divided by replica count" in wider.transformed["stages.1.0.conv.weight"]
    assert "stem.0.conv.weight" in wider.copied and not wider.fresh

    parent, child = lk_pair(0, {}, {"depth": 2})
    _, _, deeper = morph(LK, parent, child, LK_SHAPES[1])
    assert "identity block" in deeper.transformed["stages.0.2.project.bn.weight"]
    assert "stages.0.2.dw.lk.weight" in deeper.fresh

    parent, child = lk_pair(0, {"kernel": 3}, {"kernel": 5})
    _, _, padded = morph(LK, parent, child, LK_SHAPES[1])
    assert padded.transformed["stages.0.1.dw.lk.weight"] == "zero-pad kernel 3x3->5x5"
    assert "zero-init new branch" in padded.transformed["stages.0.1.dw.branches.1.1.weight"]


@pytest.mark.parametrize(
    ("stage", "before", "after"),
    [(0, {"rep": 0}, {"rep": 1}), (1, {}, {"kernel": 31}), (0, {}, {"width": 16}), (1, {}, {"se": 1})],
    ids=["rep 0->1", "kernel 7->31", "width up", "se 0->1"],
)
def test_unireplk_preserving_without_batchnorm(stage: int, before: dict, after: dict) -> None:
    """Deploy form (every BN and branch folded into its conv) of child and parent agree too."""
    parent, child = lk_pair(stage, before, after)
    shape = LK_SHAPES[1]
    parent_model, child_model, result = morph(LK, parent, child, shape)
    assert result.preserving
    deployed_parent = reparameterize(copy.deepcopy(parent_model))
    deployed_child = reparameterize(copy.deepcopy(child_model))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed_child.modules())
    assert max_diff(deployed_parent, deployed_child, shape) <= TOLERANCE
    assert max_diff(child_model, deployed_child, shape) <= TOLERANCE


def test_unireplk_parent_trained_in_train_mode() -> None:
    """Running statistics from real train-mode batches; inherit into a child in train mode: in
    eval mode both agree, and inherit leaves the child's mode alone."""
    parent, child = lk_pair(0, {"rep": 0}, {"width": 16, "depth": 2})
    shape = LK_SHAPES[1]
    parent_model = randomise(LK.build(parent, shape, 3), 1).train()
    with torch.no_grad():
        for _ in range(3):
            parent_model(torch.randn(16, *shape) * 2 + 0.5)
    child_model = LK.build(child, shape, 3).train()
    result = inherit(LK, parent, parent_model.state_dict(), child, child_model, seed=3)
    assert child_model.training and result.preserving
    assert max_diff(parent_model.eval(), child_model.eval(), shape) <= TOLERANCE


def test_same_pair_and_seed_give_the_same_child() -> None:
    parent, child = lk_pair(0, {}, {"width": 16, "ffn": 4})
    parent_state = randomise(LK.build(parent, LK_SHAPES[0], 3), 0).state_dict()

    def child_state(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(123)  # the same fresh init: only `seed` may differ
        model = LK.build(child, LK_SHAPES[0], 3)
        inherit(LK, parent, parent_state, child, model, seed=seed)
        return model.state_dict()

    first, again, other = child_state(7), child_state(7), child_state(8)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)  # the replicas are seeded


def test_identical_genotype_copies_everything() -> None:
    for space, genotype, shape in (
        (LK, lk(*BASE), LK_SHAPES[0]),
        (NB201, NB201.sample(np.random.default_rng(0)), IMAGE),
        (DARTS, DARTS_V2, IMAGE),
    ):
        parent_model, child_model, result = morph(space, genotype, genotype, shape)
        assert result.mutation == "" and result.preserving
        assert result.copied == list(child_model.state_dict()) and not result.transformed and not result.fresh
        assert max_diff(parent_model, child_model, shape) == 0.0


def test_multi_decision_change_keeps_what_it_can() -> None:
    parent = lk((1, 16, 13, 1, 1, 4), (2, 16, 9, 0, 1, 2))
    child = lk((2, 8, 5, 0, 0, 2), (1, 8, 31, 1, 0, 4))
    parent_model, child_model, result = morph(LK, parent, child, LK_SHAPES[1])
    assert not result.preserving and len(result.mutation.split("; ")) == 12
    assert result.fresh and result.copied and result.transformed
    check(result, parent_model, child_model, LK_SHAPES[1])


def test_width_down_is_not_preserving_but_copies() -> None:
    parent, child = lk_pair(0, {"width": 16}, {"width": 8})
    _, _, result = morph(LK, parent, child, LK_SHAPES[0])
    assert not result.preserving
    assert "stem.0.conv.weight" in result.copied
    assert "narrowed 16->8" in result.transformed["stages.0.0.conv.weight"]


def test_missing_parent_weights_leave_the_module_fresh() -> None:
    parent = child = lk(*BASE)
    parent_model = randomise(LK.build(parent, LK_SHAPES[0], 3), 0)
    state = {k: v for k, v in parent_model.state_dict().items() if k != "stages.1.1.expand.bias"}
    child_model = LK.build(child, LK_SHAPES[0], 3)
    result = inherit(LK, parent, state, child, child_model)
    assert not result.preserving
    assert "stages.1.1.expand.weight" in result.fresh and "stages.1.0.conv.weight" in result.copied


# -- nasnet / darts: a block's op or input --------------------------------------------------------
DARTS = get_space("darts").tiny()
NASNET = get_space("nasnet").tiny()
DARTS_V2 = named_genotype("DARTS_V2", DARTS)  # normal b0 = (0, sep_conv_3x3, 1, sep_conv_3x3)


def with_dims(space: SearchSpace, genotype: Genotype, **dims: str) -> Genotype:
    return space.from_dims({**space.to_dims(genotype), **dims})


NASNET_BASE = with_dims(
    NASNET, NASNET.sample(np.random.default_rng(1)), normal_b0_inputs="0+1", reduce_b1_inputs="0+2"
)
# (space, parent dims, child dims, function-preserving?)
CELL_MUTATIONS = [
    ("darts sep_conv 3x3->5x5", DARTS, {}, {"normal_b0_op1": "sep_conv_5x5"}, True),
    (
        "darts dil_conv 3x3->5x5",
        DARTS,
        {"reduce_b2_op1": "dil_conv_3x3"},
        {"reduce_b2_op1": "dil_conv_5x5"},
        True,
    ),
    (
        "darts sep_conv 5x5->3x3",
        DARTS,
        {"normal_b0_op1": "sep_conv_5x5"},
        {"normal_b0_op1": "sep_conv_3x3"},
        False,
    ),
    ("darts max_pool->sep_conv", DARTS, {}, {"reduce_b0_op1": "sep_conv_3x3"}, False),
    ("darts input change", DARTS, {}, {"normal_b2_inputs": "1+2"}, False),
    ("nasnet conv 1x1->3x3", NASNET, {"normal_b0_op1": "conv_1x1"}, {"normal_b0_op1": "conv_3x3"}, True),
    (
        "nasnet conv 1x3_3x1->1x7_7x1",
        NASNET,
        {"reduce_b1_op2": "conv_1x3_3x1"},
        {"reduce_b1_op2": "conv_1x7_7x1"},
        True,
    ),
    (
        "nasnet sep_conv 3x3->7x7",
        NASNET,
        {"normal_b0_op2": "sep_conv_3x3"},
        {"normal_b0_op2": "sep_conv_7x7"},
        True,
    ),
    (
        "nasnet identity->conv_3x3",
        NASNET,
        {"normal_b0_op1": "identity"},
        {"normal_b0_op1": "conv_3x3"},
        False,
    ),
    (
        "nasnet input change (loose ends)",
        NASNET,
        {"normal_b3_inputs": "0+1"},
        {"normal_b3_inputs": "0+2"},
        False,
    ),
]


@pytest.mark.parametrize(
    ("name", "space", "before", "after", "preserving"), CELL_MUTATIONS, ids=[m[0] for m in CELL_MUTATIONS]
)
def test_cell_mutation(name: str, space: SearchSpace, before: dict, after: dict, preserving: bool) -> None:
    base = DARTS_V2 if space is DARTS else NASNET_BASE
    parent = with_dims(space, base, **before)
    child = with_dims(space, parent, **after)
    assert parent != child
    parent_model, child_model, result = morph(space, parent, child, IMAGE)
    assert result.preserving is preserving, (name, result.mutation)
    assert any(k.startswith("cells.") for k in result.copied), "the unchanged ops carry over"
    check(result, parent_model, child_model, IMAGE)
    if "kernel" in " ".join(result.transformed.values()):
        grew = preserving
        assert all(("zero-pad" if grew else "crop") in how for how in result.transformed.values())


def test_cell_op_change_leaves_the_new_op_fresh_and_input_change_copies_the_op() -> None:
    child = with_dims(DARTS, DARTS_V2, reduce_b0_op1="sep_conv_3x3")  # was max_pool_3x3
    _, _, result = morph(DARTS, DARTS_V2, child, IMAGE)
    assert "cells.1.ops.0.0.1.weight" in result.fresh  # cell 1 is the first reduction cell
    child = with_dims(DARTS, DARTS_V2, normal_b2_inputs="1+2")  # (0, skip, 1, sep) -> (1, skip, 2, sep)
    _, _, moved = morph(DARTS, DARTS_V2, child, IMAGE)
    assert "cells.0.ops.5.0.1.weight" in moved.copied and not moved.preserving


def test_nasnet_loose_ends_change_remaps_the_consumers() -> None:
    """Under NASNet's rules an input change can change which blocks a cell outputs: the next
    cells read a block the parent did not output with zero weights."""
    rng = np.random.default_rng(0)
    for _ in range(30):
        parent = NASNET.sample(rng)
        child = NASNET.mutate(parent, rng)
        before, after = NASNET.concatenated(parent), NASNET.concatenated(child)
        if any(set(after[c]) - set(before[c]) for c in after):
            break
    else:
        pytest.fail("no mutation changed the concatenated blocks")
    parent_model, child_model, result = morph(NASNET, parent, child, IMAGE)
    assert any("zero weights from new units" in how for how in result.transformed.values())
    check(result, parent_model, child_model, IMAGE)


def test_auxiliary_head_the_parent_lacks_stays_fresh() -> None:
    space = DARTS.with_options(auxiliary=True)
    parent_model = randomise(DARTS.build(DARTS_V2, IMAGE, 3), 0).eval()  # no auxiliary head
    child_model = space.build(DARTS_V2, IMAGE, 3)
    result = inherit(space, DARTS_V2, parent_model.state_dict(), DARTS_V2, child_model)
    assert result.preserving and result.fresh
    assert all(k.startswith("auxiliary_head.") for k in result.fresh)
    assert max_diff(parent_model, child_model.eval(), IMAGE) == 0.0


# -- nb201: an edge's op ---------------------------------------------------------------------------
NB201 = get_space("nb201").tiny()
CONV3, CONV1 = "nor_conv_3x3", "nor_conv_1x1"


def nb201(*ops: str) -> Genotype:
    return NB201.from_dims({f"e{i}": op for i, op in enumerate(ops)})


# e0=0->1, e1=0->2, e2=1->2, e3=0->3, e4=1->3, e5=2->3
NB201_MUTATIONS = [
    ("none->conv3x3", nb201(CONV3, "none", CONV1, "skip_connect", CONV3, CONV3), 1, CONV3, True),
    ("none->conv1x1", nb201(CONV3, "none", CONV1, "skip_connect", CONV3, CONV3), 1, CONV1, True),
    ("conv1x1->conv3x3", nb201(CONV3, CONV1, CONV1, "skip_connect", CONV3, CONV3), 2, CONV3, True),
    ("conv3x3->conv1x1", nb201(CONV3, CONV1, CONV1, "skip_connect", CONV3, CONV3), 0, CONV1, False),
    ("skip->conv3x3", nb201(CONV3, CONV1, CONV1, "skip_connect", CONV3, CONV3), 3, CONV3, False),
    (
        "conv->pool, node 2 cut from the output",
        nb201(CONV3, CONV1, CONV1, CONV3, CONV3, "none"),
        2,
        "avg_pool_3x3",
        True,
    ),
    # node 1 receives zeros (e0 = none), but conv-BN(0) is BN's shift, which does reach the output
    ("conv->pool, zero input", nb201("none", CONV1, CONV1, CONV3, CONV1, CONV3), 4, "avg_pool_3x3", False),
]


@pytest.mark.parametrize(
    ("name", "parent", "edge", "op", "preserving"), NB201_MUTATIONS, ids=[m[0] for m in NB201_MUTATIONS]
)
def test_nb201_mutation(name: str, parent: Genotype, edge: int, op: str, preserving: bool) -> None:
    child = with_dims(NB201, parent, **{f"e{edge}": op})
    parent_model, child_model, result = morph(NB201, parent, child, IMAGE)
    assert result.preserving is preserving, name
    assert result.copied
    check(result, parent_model, child_model, IMAGE)
    if not preserving:
        assert max_diff(parent_model, child_model, IMAGE) > TOLERANCE


# -- any pair ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("space", "shape", "pairs"),
    [
        (LK, LK_SHAPES[0], 40),
        (LK, LK_SHAPES[1], 40),
        (NB201, IMAGE, 40),
        (NASNET, IMAGE, 12),
        (DARTS, IMAGE, 12),
    ],
    ids=["unireplk-1d", "unireplk-2d", "nb201", "nasnet", "darts"],
)
def test_random_pairs_never_raise_and_preserving_holds(space: SearchSpace, shape: tuple, pairs: int) -> None:
    """(parent, mutate(parent)) and, every fourth, two unrelated genotypes (many decisions)."""
    rng = np.random.default_rng(2024)
    preserved = 0
    for i in range(pairs):
        parent = space.sample(rng)
        child = space.sample(rng) if i % 4 == 3 else space.mutate(parent, rng)
        parent_model, child_model, result = morph(space, parent, child, shape, seed=i)
        check(result, parent_model, child_model, shape)
        preserved += result.preserving
    if space is LK:  # most single decisions of unireplk have a preserving form
        assert preserved >= pairs // 3


# -- errors and imports --------------------------------------------------------------------------
class BareSpace(SearchSpace):
    """A space `inherit` has no mapping for."""

    def dimensions(self) -> list:
        return []

    def to_dims(self, g: Genotype) -> dict:
        return {}

    def from_dims(self, values: dict) -> Genotype:
        return Genotype(self.name, self.version, ())

    def build(self, g: Genotype, input_shape: Sequence[int], num_classes: int) -> nn.Module:
        return nn.Identity()


def test_unsupported_space_and_foreign_genotype_are_refused() -> None:
    bare = BareSpace("bare")
    g = bare.from_dims({})
    with pytest.raises(GenotypeError, match="supports the spaces unireplk, nasnet, darts, nb201"):
        inherit(bare, g, {}, g, nn.Identity())
    with pytest.raises(GenotypeError):
        inherit(LK, DARTS_V2, {}, lk(*BASE), LK.build(lk(*BASE), LK_SHAPES[0], 3))


def test_morph_imports_no_torch() -> None:
    code = "import sys, search_spaces.morph; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
