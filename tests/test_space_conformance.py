"""Conformance: every registered space, 100+ seeds. What any strategy relies on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from search_spaces import get_space, list_spaces

SPACES = [info.name for info in list_spaces()]
SEEDS = range(100)
# the smallest input each space family is built for in tests
INPUTS = {"unireplk": [(1, 40), (1, 8, 8)]}


@pytest.mark.parametrize("name", SPACES)
def test_sampling_validation_round_trip_encoding_mutation(name):
    space = get_space(name)
    size = space.encoding_size
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        g = space.sample(rng)
        assert space.validate(g) is g
        assert space.from_str(space.to_str(g)) == g
        enc = space.encode(g)
        assert enc.shape == (size,) and enc.dtype == np.float32 and np.isfinite(enc).all()
        assert np.array_equal(enc, space.encode(space.from_str(g.to_str())))  # deterministic
        child = space.mutate(g, rng)
        assert child != g
        space.validate(child)
        assert space.from_dims(space.to_dims(g)) == g


@pytest.mark.parametrize("name", SPACES)
def test_same_seed_same_samples(name):
    space = get_space(name)
    a = [space.sample(np.random.default_rng(7)) for _ in range(3)]
    b = [space.sample(np.random.default_rng(7)) for _ in range(3)]
    assert a == b


@pytest.mark.parametrize("name", SPACES)
def test_built_models_train_forward_backward_at_tiny_setting(name):
    space = get_space(name).tiny()
    torch.manual_seed(0)
    for seed in range(4):
        g = space.sample(np.random.default_rng(seed))
        for shape in INPUTS.get(name, [(1, 8, 8)]):
            model = space.build(g, shape, num_classes=10)
            x = torch.randn(2, *shape)
            out = model(x)
            assert out.shape == (2, 10)
            loss = torch.nn.functional.cross_entropy(out, torch.tensor([1, 3]))
            loss.backward()
            assert torch.isfinite(loss)
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            assert grads and all(torch.isfinite(gr).all() for gr in grads)
