"""The `unireplk` space: re-parameterisation is exact, tiny models train, genotypes round-trip."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from search_spaces.errors import DatasetError, GenotypeError
from search_spaces.genotype import Genotype
from search_spaces.large_kernel import LargeKernelSpace, reparameterize
from search_spaces.lk_blocks import DilatedReparamBlock, branch_plan, dilated_to_dense


def _space(tiny: bool = True) -> LargeKernelSpace:
    space = LargeKernelSpace("unireplk")
    return space.tiny() if tiny else space  # type: ignore[return-value]


def _randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN statistics and affine parameters, so fusing them is really tested."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen))
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.randn(n, generator=gen))
                m.bias.copy_(torch.randn(n, generator=gen))


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kernel", range(3, 32, 2))
def test_branch_plan_fits_inside_kernel(kernel: int) -> None:
    plan = branch_plan(kernel)
    assert plan
    for k, d in plan:
        extent = (k - 1) * d + 1
        assert extent <= kernel and extent % 2 == 1


def test_dilated_to_dense_matches_dilated_conv() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 1, 3, 3, generator=gen)
    x = torch.randn(1, 4, 9, 9, generator=gen)
    dense = dilated_to_dense(w, 3, ndim=2)
    assert dense.shape == (4, 1, 7, 7)
    expected = torch.nn.functional.conv2d(x, w, padding=3, dilation=3, groups=4)
    torch.testing.assert_close(torch.nn.functional.conv2d(x, dense, padding=3, groups=4), expected)


@pytest.mark.parametrize("ndim", [1, 2])
@pytest.mark.parametrize("kernel", [3, 5, 13, 19, 31])
def test_dilated_reparam_block_is_exact(ndim: int, kernel: int) -> None:
    gen = torch.Generator().manual_seed(kernel)
    torch.manual_seed(kernel)
    block = DilatedReparamBlock(ndim, channels=6, kernel=kernel, rep=True)
    _randomise_bn(block, gen)
    block.eval()
    x = torch.randn(3, 6, *([11] * ndim), generator=gen)
    before, n_before = block(x), _n_params(block)
    block.reparameterize()
    assert block.deployed and len(block.branches) == 0
    assert (block(x) - before).abs().max().item() <= 1e-4
    assert _n_params(block) < n_before


@pytest.mark.parametrize("shape", [(1, 40), (1, 8, 8), (2, 28, 28)])
@pytest.mark.parametrize("kernel", [3, 13, 31])
def test_model_reparameterize_is_exact(shape: tuple[int, ...], kernel: int) -> None:
    space = _space()
    g = space.from_dims(
        {
            **space.to_dims(space.sample(np.random.default_rng(0))),
            **{f"s{i}_{f}": v for i in range(space.num_stages) for f, v in (("kernel", kernel), ("rep", 1))},
        }
    )
    torch.manual_seed(1)
    model = space.build(g, shape, num_classes=5)
    model.train()
    with torch.no_grad():  # a few train-mode passes give BN real running statistics ...
        for _ in range(3):
            model(torch.randn(8, *shape) * 3 + 1)
    _randomise_bn(model, torch.Generator().manual_seed(2))  # ... and random affine/stats on top
    model.eval()
    x = torch.randn(4, *shape)
    before, n_before = model(x), _n_params(model)
    assert reparameterize(model) is model
    assert not any(isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) for m in model.modules())
    after = model(x)
    assert after.shape == (4, 5)
    assert (after - before).abs().max().item() <= 1e-4
    assert _n_params(model) < n_before


def test_model_method_reparameterize_returns_self_and_is_idempotent() -> None:
    space = _space()
    g = space.sample(np.random.default_rng(3))
    model = space.build(g, (1, 8, 8), 10).eval()
    x = torch.randn(2, 1, 8, 8)
    before = model(x)
    assert model.reparameterize() is model
    assert model.reparameterize() is model
    torch.testing.assert_close(model(x), before, atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", [(1, 40), (1, 8, 8)])
def test_sampled_tiny_models_train(shape: tuple[int, ...]) -> None:
    space = _space()
    rng = np.random.default_rng(7)
    torch.manual_seed(0)
    for _ in range(4):
        g = space.sample(rng)
        model = space.build(g, shape, num_classes=10)
        out = model(torch.randn(2, *shape))
        assert out.shape == (2, 10)
        nn.functional.cross_entropy(out, torch.tensor([0, 1])).backward()
        grads = [p.grad for p in model.parameters()]
        assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)


def test_downsampling_stops_at_tiny_sizes() -> None:
    space = _space(tiny=False)
    g = space.sample(np.random.default_rng(0))
    assert space.build(g, (1, 8, 8), 10).sizes == [8, 4, 2, 2]
    assert space.build(g, (1, 40), 10).sizes == [20, 10, 5, 3]  # stem stride 2 for >= 16
    assert space.build(g, (1, 28, 28), 10).sizes == [14, 7, 4, 2]
    assert space.with_options(stem_stride=1).build(g, (1, 28, 28), 10).sizes == [28, 14, 7, 4]


def test_genotype_string_round_trips() -> None:
    for space in (_space(), _space(tiny=False)):
        rng = np.random.default_rng(11)
        for _ in range(5):
            g = space.sample(rng)
            text = space.to_str(g)
            assert space.from_str(text) == g
            assert Genotype.from_str(text) == g
            assert space.encode(g).sum() == len(space.dims)
            assert space.validate(space.mutate(g, rng)) != g
    g = _space(tiny=False).from_str(
        "unireplk@1|s0=(2,32,13,1,0,4)|s1=(1,64,31,1,1,3)|s2=(3,96,3,0,0,2)|s3=(1,128,7,1,1,4)"
    )
    assert g["s1"] == (1, 64, 31, 1, 1, 3)


def test_bad_kernel_names_allowed_values() -> None:
    space = _space()
    with pytest.raises(GenotypeError, match=r"s0_kernel.*allowed: 3, 5, 7, 9, 13, 31"):
        space.from_str("unireplk@1|s0=(1,8,11,1,0,2)|s1=(2,16,3,0,1,4)")


@pytest.mark.parametrize(
    "text",
    [
        "unireplk@1|s0=(1,8,3,1,0)|s1=(2,16,3,0,1,4)",  # 5 values
        "unireplk@1|s0=(1,8,3,1,0,2)",  # missing stage
        "unireplk@1|s0=(1,8,3,1,0,2)|s1=(2,16,3,0,1,4)|s2=(1,8,3,1,0,2)",  # extra stage
        "unireplk@1|s0=(1,8,3,1,0,2)|s1=relu",  # not a tuple
        "unireplk@1|s0=(1,8,3,2,0,2)|s1=(2,16,3,0,1,4)",  # rep not 0/1
        "unireplk@2|s0=(1,8,3,1,0,2)|s1=(2,16,3,0,1,4)",  # version
    ],
)
def test_malformed_genotypes_raise(text: str) -> None:
    with pytest.raises(GenotypeError):
        _space().from_str(text)


def test_bad_input_shape_is_a_clear_error() -> None:
    space = _space()
    g = space.sample(np.random.default_rng(0))
    with pytest.raises(DatasetError, match=r"\(C, L\) or \(C, H, W\)"):
        space.build(g, (1, 4, 8, 8), 10)


def test_space_module_imports_without_torch() -> None:
    code = "import sys, search_spaces.large_kernel; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
