"""NASNet / DARTS cell space: op shapes, genotype round-trips, loose ends, builds, DropPath.
DARTS's own rules, notation and published cells: tests/test_darts_space.py."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from search_spaces.darts_genotypes import named_genotype
from search_spaces.errors import ConfigError, DatasetError, GenotypeError, UnknownNameError
from search_spaces.genotype import Genotype
from search_spaces.nasnet_cell import (
    DARTS_OPS,
    NASNET_OPS,
    OP_NAMES,
    Block,
    NASNetCellSpace,
    canonical_block,
    cell_blocks,
    loose_ends,
    make_genotype,
)
from search_spaces.nasnet_model import NASNetCell, NASNetNetwork
from search_spaces.nasnet_ops import OPS

# DARTS' published "DARTS_V2" cell as canonical (in1, op1, in2, op2) blocks (its literal string
# is checked in test_darts_space.py)
DARTS_V2 = named_genotype("DARTS_V2").to_str()
# A NASNet-rule cell pair (an input read twice; block 0 consumed by block 2).
NASNET = (
    "nasnet@2"
    "|normal=((0,conv_3x3,0,identity),(0,sep_conv_3x3,1,sep_conv_3x3),(1,max_pool_3x3,2,sep_conv_5x5),"
    "(0,avg_pool_3x3,1,identity),(1,conv_1x1,3,identity))"
    "|reduce=((0,max_pool_3x3,1,sep_conv_7x7),(1,identity,2,max_pool_3x3),(0,avg_pool_3x3,1,conv_1x7_7x1),"
    "(1,identity,1,sep_conv_3x3),(4,dil_conv_3x3,5,max_pool_5x5))"
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # These models are tiny: intra-op threads only add sync overhead, and on a busy 2-core
    # machine spinning OpenMP workers made a 0.05 s step take 9 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_op_names_match_the_torch_ops() -> None:
    assert set(OPS) == set(OP_NAMES)
    assert len(NASNET_OPS) == 13 and len(DARTS_OPS) == 7


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize(("C_in", "C_out"), [(4, 4), (3, 6)])
def test_op_output_shape(name: str, stride: int, C_in: int, C_out: int) -> None:
    op = OPS[name](C_in, C_out, stride, True)
    for h, w in [(8, 8), (7, 7), (7, 6), (1, 1)]:
        y = op(torch.randn(2, C_in, h, w))
        assert y.shape == (2, C_out, math.ceil(h / stride), math.ceil(w / stride)), (name, h, w)


def test_identity_is_free_only_where_shapes_allow() -> None:
    assert isinstance(OPS["identity"](4, 4, 1, True), torch.nn.Identity)
    assert not isinstance(OPS["skip_connect"](4, 4, 2, True), torch.nn.Identity)
    with pytest.raises(ValueError, match="stride"):
        OPS["sep_conv_3x3"](4, 4, 3, True)


def test_presets_and_registration() -> None:
    darts, nasnet = NASNetCellSpace("darts"), NASNetCellSpace("nasnet")
    assert darts.options["blocks"] == 4 and darts.options["ops"] == DARTS_OPS
    assert nasnet.options["blocks"] == 5 and nasnet.options["ops"] == NASNET_OPS
    assert (darts.options["rules"], nasnet.options["rules"]) == ("darts", "nasnet")
    assert darts.tiny().options["ops"] == DARTS_OPS and darts.tiny().options["rules"] == "darts"
    assert len(darts.dims) == 2 * 4 * 3 and darts.dims[0].name == "normal_b0_inputs"
    assert darts.dims[0].choices == ("0+1",)  # block 0 reads both cell inputs
    assert darts.dims[3].choices == ("0+1", "0+2", "1+2")  # block 1 may read block 0
    assert nasnet.dims[3].choices == ("0+0", "0+1", "1+1", "0+2", "1+2", "2+2")  # repeats allowed
    try:  # the registry imports every built-in space; others may not be written yet
        from search_spaces import large_kernel, nb201  # noqa: F401
    except ModuleNotFoundError as e:
        pytest.skip(f"registry needs {e.name}")
    from search_spaces import get_space, list_spaces

    infos = {info.name: info for info in list_spaces()}
    assert infos["darts"].preset_of == infos["nasnet"].preset_of == "nasnet_cell"
    assert get_space("darts", init_filters=4).options["blocks"] == 4


def test_options_are_checked() -> None:
    with pytest.raises(UnknownNameError, match="sep_conv_3x3"):
        NASNetCellSpace("darts", ops=("sep_conv_3x3", "sep_conv_3x4"))
    with pytest.raises(UnknownNameError, match="conv3x3_s2"):
        NASNetCellSpace("darts", stem="conv5x5")
    with pytest.raises(ConfigError, match="blocks"):
        NASNetCellSpace("darts", blocks=0)
    with pytest.raises(ConfigError, match="drop_path_prob"):
        NASNetCellSpace("darts", drop_path_prob=1.0)
    with pytest.raises(UnknownNameError, match="cells_per_stage"):
        NASNetCellSpace("darts", cells_per_stag=2)
    with pytest.raises(UnknownNameError, match="did you mean 'nasnet'"):
        NASNetCellSpace("darts", rules="nasnte")
    with pytest.raises(ConfigError, match="auxiliary"):
        NASNetCellSpace("darts", auxiliary=1)
    with pytest.raises(ConfigError, match="stem_multiplier"):
        NASNetCellSpace("darts", stem_multiplier=0)
    custom = NASNetCellSpace("darts", ops=["skip_connect", "conv_3x3"], blocks=2)
    assert custom.options["ops"] == ("skip_connect", "conv_3x3") and len(custom.dims) == 12


def test_hand_written_genotype_round_trips() -> None:
    space = NASNetCellSpace("darts")
    g = space.from_str(DARTS_V2)
    assert space.to_str(g) == DARTS_V2 and Genotype.from_str(g.to_str()) == g
    blocks = cell_blocks(g)
    assert blocks["normal"][3] == Block(0, "skip_connect", 2, "dil_conv_3x3")
    assert blocks["reduce"][0].op1 == "max_pool_3x3"
    assert make_genotype("darts", blocks["normal"], blocks["reduce"]) == g
    assert space.from_dims(space.to_dims(g)) == g
    nasnet = NASNetCellSpace("nasnet")
    h = nasnet.from_str(NASNET)
    assert nasnet.to_str(h) == NASNET and nasnet.from_dims(nasnet.to_dims(h)) == h


def test_swapped_pairs_are_one_genotype() -> None:
    space = NASNetCellSpace("darts")
    g = space.from_str(DARTS_V2)
    blocks = cell_blocks(g)
    # the pairs of a block are ordered canonically: written swapped, it is the same genotype
    swapped = make_genotype(
        "darts", ((1, "sep_conv_3x3", 0, "sep_conv_3x3"),) + blocks["normal"][1:], blocks["reduce"]
    )
    assert swapped == g and swapped.id == g.id
    text = DARTS_V2.replace("(0,skip_connect,2,dil_conv_3x3)", "(2,dil_conv_3x3,0,skip_connect)")
    assert text != DARTS_V2 and space.from_str(text) == g
    # a hand-built Genotype in the other order is refused, naming the canonical block
    normal = g["normal"][:3] + ((2, "dil_conv_3x3", 0, "skip_connect"),)
    raw = Genotype("darts", 2, (("normal", normal), g.fields[1]))
    with pytest.raises(GenotypeError, match=r"block 3 .*first: \(0, 'skip_connect', 2, 'dil_conv_3x3'\)"):
        space.validate(raw)
    # equal inputs (NASNet's rules): the op name that sorts first comes first
    assert canonical_block((1, "sep_conv_3x3", 1, "identity")) == Block(1, "identity", 1, "sep_conv_3x3")
    nasnet = NASNetCellSpace("nasnet")
    h = nasnet.from_str(NASNET)
    assert nasnet.from_str(NASNET.replace("(0,conv_3x3,0,identity)", "(0,identity,0,conv_3x3)")) == h


def test_samples_are_canonical_and_mutants_differ() -> None:
    for preset in ("darts", "nasnet"):
        space = NASNetCellSpace(preset)
        rng = np.random.default_rng(5)
        for _ in range(200):
            g = space.sample(rng)
            for blocks in cell_blocks(g).values():
                assert all(canonical_block(b) == b for b in blocks)
            assert space.from_str(g.to_str()) is not g and space.from_str(g.to_str()) == g
            child = space.mutate(g, rng)
            assert child != g and space.validate(child) == child


def test_sample_mutate_encode() -> None:
    space = NASNetCellSpace("nasnet")
    rng = np.random.default_rng(1)
    for _ in range(20):
        g = space.sample(rng)
        assert space.from_str(g.to_str()) == g
        child = space.mutate(g, rng)
        assert child != g and space.validate(child) == child
        assert space.encode(g).sum() == len(space.dims)
    # numpy ints from a sampler are accepted and stored as ints
    values = {k: (np.int64(v) if isinstance(v, int) else v) for k, v in space.to_dims(g).items()}
    assert space.from_dims(values) == g


def test_typo_op_names_the_allowed_ops() -> None:
    space = NASNetCellSpace("darts")
    with pytest.raises(GenotypeError, match="sep_conv_3x4.*allowed:.*sep_conv_3x3.*dil_conv_5x5"):
        space.from_str(DARTS_V2.replace("sep_conv_3x3", "sep_conv_3x4", 1))
    with pytest.raises(GenotypeError, match="allowed: 0[+]1, 0[+]2, 1[+]2"):
        space.from_str(
            DARTS_V2.replace("(0,sep_conv_3x3,1,sep_conv_3x3),(0,", "(0,sep_conv_3x3,1,sep_conv_3x3),(3,")
        )


def test_malformed_genotypes() -> None:
    space = NASNetCellSpace("darts")
    g = space.from_str(DARTS_V2)
    normal, reduce = g["normal"], g["reduce"]
    with pytest.raises(GenotypeError, match="has 3 blocks"):
        space.validate(g.replace(normal=normal[:3]))
    with pytest.raises(GenotypeError, match=r"\(in1,op1,in2,op2\)"):
        space.validate(g.replace(reduce=((0, "max_pool_3x3", 1),) + reduce[1:]))
    with pytest.raises(GenotypeError, match="inputs must be ints"):
        space.validate(g.replace(normal=(("a", "skip_connect", 1, "skip_connect"),) + normal[1:]))
    with pytest.raises(GenotypeError, match="fields normal, reduce"):
        space.from_str(DARTS_V2 + "|normal_concat=(2,3,4,5)")
    with pytest.raises(GenotypeError, match="space 'nasnet'"):
        space.validate(Genotype("nasnet", 2, g.fields))
    with pytest.raises(GenotypeError, match="reads input 1 twice.*rules='nasnet'"):
        space.validate(g.replace(normal=((1, "skip_connect", 1, "skip_connect"),) + normal[1:]))
    values = space.to_dims(g)
    with pytest.raises(GenotypeError, match="'normal_b0_op1' is missing"):
        space.from_dims({k: v for k, v in values.items() if k != "normal_b0_op1"})
    with pytest.raises(GenotypeError, match="unknown decision 'normal_b0_opp1'.*did you mean"):
        space.from_dims({**values, "normal_b0_opp1": "skip_connect"})
    with pytest.raises(GenotypeError, match="allowed: max_pool_3x3"):
        space.from_dims({**values, "reduce_b1_op2": "conv_3x3"})
    with pytest.raises(GenotypeError, match="allowed: 0[+]1$"):
        space.from_dims({**values, "normal_b0_inputs": "1+1"})


def test_loose_end_concatenation_sets_channels() -> None:
    op = "sep_conv_3x3"
    chain = [(0, op, 1, op), (2, op, 1, op), (3, op, 0, op), (4, op, 1, op)]  # each block feeds the next
    independent = [(0, op, 1, op), (1, op, 1, op), (0, op, 0, op), (1, op, 0, op)]  # none consumed
    assert loose_ends(chain) == (3,) and loose_ends(independent) == (0, 1, 2, 3)
    s0, s1 = torch.randn(2, 6, 7, 7), torch.randn(2, 5, 7, 7)
    assert NASNetCell(chain, 6, 5, 4, False, False)(s0, s1).shape == (2, 4, 7, 7)
    assert NASNetCell(independent, 6, 5, 4, False, False)(s0, s1).shape == (2, 16, 7, 7)
    assert NASNetCell(chain, 6, 5, 4, False, False, concat="all")(s0, s1).shape == (2, 16, 7, 7)  # DARTS
    # a reduction cell halves (ceil) the resolution; reduction_prev reduces s0 from 2x size
    assert NASNetCell(independent, 6, 5, 4, True, False)(s0, s1).shape == (2, 16, 4, 4)
    assert NASNetCell(chain, 6, 5, 4, False, True)(torch.randn(2, 6, 13, 13), s1).shape == (2, 4, 7, 7)
    with pytest.raises(ValueError, match="block 1 input 3"):
        NASNetCell([(0, op, 1, op), (3, op, 1, op)], 6, 5, 4, False, False)


def _train_step(model: torch.nn.Module, x: torch.Tensor) -> None:
    loss = F.cross_entropy(model(x), torch.arange(x.shape[0]) % 10)
    loss.backward()
    assert torch.isfinite(loss)
    # A cell whose output neither of the next two cells reads gets no gradient (nor do the ops
    # on an unread cell input), but the stem and the head always do.
    assert model.stem[0].weight.grad.abs().sum() > 0 and model.head[-1].weight.grad is not None
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("preset", ["darts", "nasnet"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 28, 28)])
def test_tiny_presets_train(preset: str, shape: tuple[int, int, int]) -> None:
    space = NASNetCellSpace(preset).tiny()
    g = space.sample(np.random.default_rng(len(shape) + shape[0]))
    model = space.build(g, shape, 10)
    assert isinstance(model, NASNetNetwork) and len(model.cells) == 5  # 1 normal, (1 reduce, 1 normal) x 2
    # DARTS concatenates all 4 blocks; NASNet only its loose ends and has a ReLU before pooling
    if preset == "darts":
        assert all(cell.out_channels == 4 * cell.preprocess1[1].out_channels for cell in model.cells)
        assert not isinstance(model.head[0], torch.nn.ReLU)
    else:
        assert isinstance(model.head[0], torch.nn.ReLU)
    _train_step(model, torch.randn(2, *shape))


def test_stride_two_stem_and_bad_shapes() -> None:
    space = NASNetCellSpace("darts").tiny().with_options(stem="conv3x3_s2")
    g = space.from_str(DARTS_V2)
    model = space.build(g, (3, 9, 9), 10)
    assert model(torch.randn(2, 3, 9, 9)).shape == (2, 10)
    with pytest.raises(DatasetError, match=r"\(C, H, W\)"):
        space.build(g, (40,), 10)
    with pytest.raises(GenotypeError):
        space.build(NASNetCellSpace("nasnet").sample(np.random.default_rng(0)), (3, 8, 8), 10)


def test_drop_path_only_in_training() -> None:
    space = NASNetCellSpace("darts").tiny().with_options(drop_path_prob=0.5)
    model = space.build(space.from_str(DARTS_V2), (3, 8, 8), 10)
    x = torch.randn(4, 3, 8, 8)
    model.train()
    assert torch.equal(model(x), model(x))  # progress 0: nothing is dropped yet
    model.set_drop_path_progress(1.0)
    assert all(cell.drop_prob == 0.5 for cell in model.cells)
    assert not torch.allclose(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))
    with pytest.raises(ValueError, match="progress"):
        model.set_drop_path_progress(1.5)


def test_space_module_imports_no_torch() -> None:
    code = "import sys, search_spaces.nasnet_cell; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
