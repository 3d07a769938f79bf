"""The `darts` preset is DARTS's cell space; DARTS's notation and published cells; version 1 strings."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from search_spaces import GenotypeError, UnknownNameError, get_space
from search_spaces.darts_genotypes import (
    DARTS_CIFAR10,
    GENOTYPES,
    build_named,
    darts_v2,
    from_darts_str,
    named_genotype,
    to_darts_str,
)
from search_spaces.genotype import Genotype
from search_spaces.nasnet_cell import cell_blocks, loose_ends
from search_spaces.nasnet_model import NASNetNetwork

# DARTS-V2 exactly as quark0/darts cnn/genotypes.py writes it
DARTS_V2_TEXT = (
    "Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1), "
    "('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)], "
    "normal_concat=[2, 3, 4, 5], reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), "
    "('max_pool_3x3', 1), ('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), "
    "('max_pool_3x3', 1)], reduce_concat=[2, 3, 4, 5])"
)
DARTS_V2 = (
    "darts@2"
    "|normal=((0,sep_conv_3x3,1,sep_conv_3x3),(0,sep_conv_3x3,1,sep_conv_3x3),"
    "(0,skip_connect,1,sep_conv_3x3),(0,skip_connect,2,dil_conv_3x3))"
    "|reduce=((0,max_pool_3x3,1,max_pool_3x3),(1,max_pool_3x3,2,skip_connect),"
    "(0,max_pool_3x3,2,skip_connect),(1,max_pool_3x3,2,skip_connect))"
)
# a genotype sampled by version 1 of `darts` (seed 0, tiny) and its parameter count then
DARTS_V1_STRING = (
    "darts@1|normal=((1,sep_conv_5x5,1,avg_pool_3x3),(0,max_pool_3x3,0,max_pool_3x3),"
    "(0,dil_conv_3x3,2,dil_conv_5x5),(2,sep_conv_5x5,4,dil_conv_3x3))|reduce=((1,sep_conv_3x3,1,dil_conv_5x5),"
    "(0,dil_conv_3x3,2,max_pool_3x3),(1,dil_conv_5x5,2,max_pool_3x3),(3,dil_conv_3x3,4,avg_pool_3x3))"
)
DARTS_V1_PARAMS = 37466  # tiny setting, (3, 8, 8) input, 10 classes


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _params(model: torch.nn.Module) -> int:
    """Parameters without the auxiliary head, as DARTS's ``count_parameters_in_MB`` counts."""
    return sum(p.numel() for name, p in model.named_parameters() if "auxiliary" not in name)


def test_sampled_darts_genotypes_are_darts_cells() -> None:
    space = get_space("darts")
    rng = np.random.default_rng(0)
    for _ in range(1000):
        g = space.sample(rng)
        for blocks in cell_blocks(g).values():
            assert len(blocks) == 4
            for b, block in enumerate(blocks):
                assert 0 <= block.in1 < block.in2 < 2 + b  # two distinct inputs, canonical order
        # every sample is a DARTS cell: DARTS's notation (all nodes concatenated) reads it back
        text = to_darts_str(g)
        assert text.count("_concat=[2, 3, 4, 5]") == 2
        assert from_darts_str(text) == g


def test_nasnet_keeps_its_rules() -> None:
    space = get_space("nasnet")
    rng = np.random.default_rng(1)
    repeats = partial = 0
    for _ in range(300):
        blocks = cell_blocks(space.sample(rng))
        for cell in blocks.values():
            repeats += any(b.in1 == b.in2 for b in cell)
            partial += len(loose_ends(cell)) < len(cell)
    assert repeats > 100 and partial > 100  # inputs repeat; consumed blocks are not concatenated
    model = space.tiny().build(space.sample(np.random.default_rng(2)), (3, 8, 8), 10)
    for cell in model.cells:
        assert cell.concat == loose_ends(cell.blocks)
    # DARTS's rules on NASNet's ops, and NASNet's rules on DARTS's: both presets are options
    assert get_space("nasnet", rules="darts").distinct_inputs
    assert get_space("darts", rules="nasnet").concat == "loose_ends"


def test_darts_v2_round_trips_through_darts_notation() -> None:
    g = from_darts_str(DARTS_V2_TEXT)
    assert g == get_space("darts").from_str(DARTS_V2) and g == named_genotype("DARTS_V2")
    text = to_darts_str(g)
    assert from_darts_str(text) == g
    assert text.startswith("Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ")
    # the same cell with node 2's pairs in DARTS's order is written in canonical order
    assert "('skip_connect', 0), ('sep_conv_3x3', 1)" in text and text.endswith("reduce_concat=[2, 3, 4, 5])")
    assert named_genotype("darts-v2") == g  # case and -/_ ignored


def test_darts_v2_has_the_published_parameter_count() -> None:
    model = darts_v2(auxiliary=True)  # DARTS's CIFAR-10 setting: C=36, 20 cells, auxiliary head
    assert len(model.cells) == 20 and model.stem[0].out_channels == 3 * 36
    assert [k for k, cell in enumerate(model.cells) if cell.reduction] == [
        6,
        13,
    ]  # layers // 3, 2 layers // 3
    assert model.aux_at == 13 and model.auxiliary_head is not None
    assert abs(_params(model) / 3.3e6 - 1) <= 0.03  # Liu et al. 2019, Table 1: 3.3M
    assert _params(model) == 3_349_342  # what DARTS's train.py logs: "param size = 3.349342MB"
    model.train()
    logits, aux = model.forward_with_aux(torch.randn(2, 3, 32, 32))
    assert logits.shape == aux.shape == (2, 10)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert darts_v2().auxiliary_head is None  # the builder for compress/export: no dead head


def test_recorded_params_and_flops_leave_the_auxiliary_head_out() -> None:
    # `profile` gives a trial's params/flops metrics (and the static ones constraints reject on)
    from nas.cost import count_params, profile

    with_head, without = darts_v2(auxiliary=True), darts_v2()
    stats = profile(with_head, (3, 32, 32))
    assert stats.params == _params(with_head) == count_params(without) == 3_349_342  # DARTS's count
    assert count_params(with_head) > stats.params  # the head is there, only not counted
    assert stats.flops == profile(without, (3, 32, 32)).flops
    # the space's build with auxiliary=true, as a trial builds it
    space = get_space("darts", **DARTS_CIFAR10)
    model = space.build(named_genotype("DARTS_V2"), (3, 32, 32), 10)
    assert model.auxiliary_head is not None and profile(model, (3, 32, 32)).params == 3_349_342


@pytest.mark.parametrize("name", [n for n, g in GENOTYPES.items() if g.params_m is not None])
def test_published_cells_have_their_papers_parameter_counts(name: str) -> None:
    model = build_named(name, auxiliary=False)
    assert abs(_params(model) / (GENOTYPES[name].params_m * 1e6) - 1) <= 0.03


@pytest.mark.parametrize("name", sorted(GENOTYPES))
def test_every_published_cell_reads_writes_and_trains(name: str) -> None:
    entry = GENOTYPES[name]
    space = get_space(entry.space)
    g = named_genotype(name)
    assert from_darts_str(to_darts_str(g), space) == g
    tiny = space.tiny()
    model = tiny.build(g, (3, 8, 8), 10)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 8, 8)), torch.tensor([1, 2]))
    loss.backward()
    assert torch.isfinite(loss)


def test_darts_notation_variants() -> None:
    as_range = DARTS_V2_TEXT.replace("normal_concat=[2, 3, 4, 5]", "normal_concat=range(2, 6)")
    assert from_darts_str(as_range) == from_darts_str(DARTS_V2_TEXT)
    nested = (  # one list of two pairs per node, as some forks print genotypes
        "genotypes.Genotype(normal=[[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], [('sep_conv_3x3', 0), "
        "('sep_conv_3x3', 1)], [('sep_conv_3x3', 1), ('skip_connect', 0)], [('skip_connect', 0), "
        "('dil_conv_3x3', 2)]], normal_concat=range(2, 6), reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), "
        "('skip_connect', 2), ('max_pool_3x3', 1), ('max_pool_3x3', 0), ('skip_connect', 2), "
        "('skip_connect', 2), ('max_pool_3x3', 1)], reduce_concat=range(2, 6))"
    )
    assert from_darts_str(nested) == from_darts_str(DARTS_V2_TEXT)
    positional = DARTS_V2_TEXT.replace("normal=", "").replace("normal_concat=", "")
    positional = positional.replace("reduce=", "").replace("reduce_concat=", "")
    assert from_darts_str(positional) == from_darts_str(DARTS_V2_TEXT)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("__import__('os').system('true')", "looks like Genotype"),
        (
            DARTS_V2_TEXT.replace("[2, 3, 4, 5]", "__import__('os').listdir('.')", 1),
            "only string and int literals",
        ),
        (DARTS_V2_TEXT.replace("normal_concat", "normal_concatt"), "did you mean 'normal_concat'"),
        (DARTS_V2_TEXT.replace("('dil_conv_3x3', 2)", "('dil_conv_3x3', 5)"), "reads input 5"),
        (DARTS_V2_TEXT.replace("('dil_conv_3x3', 2)", "('none', 2)"), "'none' only exists"),
        (DARTS_V2_TEXT.replace("dil_conv_3x3", "dil_conv_7x7"), "dil_conv_7x7.*allowed"),
        (DARTS_V2_TEXT.replace("normal_concat=[2, 3, 4, 5]", "normal_concat=[5]"), "rules='nasnet'"),
        (DARTS_V2_TEXT.replace("('dil_conv_3x3', 2)", "('dil_conv_3x3', 0)"), "reads input 0 twice"),
        (DARTS_V2_TEXT[:-5], "cannot read DARTS notation"),
        ("darts@2|normal=()", "nas-run genotype string"),
    ],
)
def test_bad_darts_notation_is_a_genotype_error(text: str, message: str) -> None:
    with pytest.raises(GenotypeError, match=message):
        from_darts_str(text)


def test_nasnet_rule_cells_need_nasnet_rules() -> None:
    nasnet = GENOTYPES["NASNet"].text
    with pytest.raises(GenotypeError, match="rules='nasnet'"):
        from_darts_str(
            nasnet, get_space("darts", ops=get_space("nasnet").options["ops"] + ("skip_connect",), blocks=5)
        )
    g = from_darts_str(nasnet, "nasnet")  # skip_connect is NASNet's identity
    assert g == named_genotype("NASNet") and "identity" in g.to_str() and "skip_connect" not in g.to_str()
    assert "('skip_connect', 0)" in to_darts_str(g) and "reduce_concat=[4, 5, 6]" in to_darts_str(g)
    with pytest.raises(UnknownNameError, match="did you mean 'DARTS_V2'"):
        named_genotype("DARTS_V3")


def test_darts_cifar10_setting_is_darts_train_py() -> None:
    space = get_space("darts", **DARTS_CIFAR10)
    assert space.options["init_filters"] == 36 and 3 * space.options["cells_per_stage"] + 2 == 20
    assert space.options["auxiliary"] and space.options["drop_path_prob"] == 0.2


def test_version_1_strings() -> None:
    # darts@1 was a NASNet-rule cell: the DARTS space refuses to build it differently ...
    with pytest.raises(GenotypeError, match=r"darts@1.*get_space\('darts', rules='nasnet'\)"):
        get_space("darts").from_str(DARTS_V1_STRING)
    # ... and NASNet's rules read it as the same network, in canonical form
    legacy = get_space("darts", rules="nasnet").tiny()
    g = legacy.from_str(DARTS_V1_STRING)
    assert g.version == 2 and g["normal"][0] == (1, "avg_pool_3x3", 1, "sep_conv_5x5")
    model = legacy.build(g, (3, 8, 8), 10).eval()
    assert _params(model) == DARTS_V1_PARAMS
    # the version-1 network, built from the blocks as written: the same function
    old = Genotype.from_str(DARTS_V1_STRING)
    blocks = cell_blocks(old)
    torch.manual_seed(0)
    reference = NASNetNetwork(
        blocks["normal"], blocks["reduce"], 3, 10, init_filters=8, cells_per_stage=1, reductions=2
    ).eval()
    state = {}
    for key, value in reference.state_dict().items():
        parts = key.split(".")
        if parts[0] == "cells" and parts[2] == "ops":  # op k of block k // 2 may have moved
            cell = reference.cells[int(parts[1])]
            k = int(parts[3])
            b1 = cell.blocks[k // 2]
            if (b1[2], b1[3]) < (b1[0], b1[1]):
                parts[3] = str(k + 1 if k % 2 == 0 else k - 1)
        state[".".join(parts)] = value
    model.load_state_dict(state)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    # nasnet@1: same rules, so the string reads as the same network in canonical form
    nasnet = get_space("nasnet")
    h = nasnet.sample(np.random.default_rng(3))
    swapped = ",".join(f"({b[2]},{b[3]},{b[0]},{b[1]})" for b in cell_blocks(h)["normal"])
    text = h.to_str().replace("nasnet@2", "nasnet@1")
    text = text.split("|")[0] + f"|normal=({swapped})|" + text.split("|")[2]
    assert nasnet.from_str(text) == h


def test_training_adds_the_auxiliary_loss_when_the_network_has_the_head():

    from nas.data import load_dataset
    from nas.recipes import get_recipe
    from nas.trainer import Trainer

    space = get_space("darts").tiny().with_options(auxiliary=True)
    model = space.build(space.sample(np.random.default_rng(0)), (1, 8, 8), 10)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    ce = torch.nn.CrossEntropyLoss()
    model.eval()  # no drop-path, fixed BatchNorm statistics: every forward pass below agrees
    logits, aux = model.forward_with_aux(x)
    assert aux is not None
    trainer = Trainer(model, load_dataset("digits"), get_recipe("darts"), 1, 0, torch.device("cpu"))
    loss = trainer._loss(x, y)
    assert torch.allclose(loss, ce(logits, y) + 0.4 * ce(aux, y))
    assert torch.allclose(model(x), logits)  # evaluation: the main head only
