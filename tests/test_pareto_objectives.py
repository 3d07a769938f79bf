"""Pareto fronts against a brute-force oracle; objective and constraint parsing."""

from __future__ import annotations

import numpy as np
import pytest

from nas.objectives import Constraint, losses, parse_constraints, parse_objectives
from nas.pareto import nondominated_rank, pareto_mask
from search_spaces import ConfigError, UnknownNameError


def brute_force_front(points, feasible):
    n = len(points)
    out = np.zeros(n, dtype=bool)
    for i in range(n):
        if not feasible[i]:
            continue
        dominated = any(
            feasible[j] and np.all(points[j] <= points[i]) and np.any(points[j] < points[i]) for j in range(n)
        )
        out[i] = not dominated
    return out


@pytest.mark.parametrize("seed", range(30))
def test_pareto_mask_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, m = int(rng.integers(1, 40)), int(rng.integers(1, 5))
    pts = rng.integers(0, 6, size=(n, m)).astype(float)  # small ints: ties and duplicates happen
    feasible = rng.random(n) > 0.2
    assert np.array_equal(pareto_mask(pts, feasible), brute_force_front(pts, feasible))


def test_rank_zero_is_the_front_and_ranks_peel():
    rng = np.random.default_rng(1)
    pts = rng.random((50, 3))
    rank = nondominated_rank(pts)
    assert np.array_equal(rank == 0, pareto_mask(pts))
    rest = rank > 0
    assert np.array_equal(rank[rest] == 1, pareto_mask(pts[rest]))


def test_objectives_and_losses():
    objs = parse_objectives("val_acc,latency_ms,custom:max")
    assert [(o.metric, o.direction) for o in objs] == [
        ("val_acc", "max"),
        ("latency_ms", "min"),
        ("custom", "max"),
    ]
    assert losses(objs, {"val_acc": 0.9, "latency_ms": 2.0, "custom": 3.0}) == (-0.9, 2.0, -3.0)
    assert losses(objs, {"val_acc": float("nan"), "latency_ms": 2.0, "custom": 3.0}) is None
    with pytest.raises(UnknownNameError, match="did you mean 'val_acc'"):
        parse_objectives("val_ac")


def test_constraints():
    (c,) = parse_constraints("params<=1e6")
    assert c == Constraint("params", "<=", 1e6)
    assert c.satisfied({"params": 1e6}) and not c.satisfied({"params": 1e6 + 1})
    assert not c.satisfied({})  # unknown is never feasible
    assert len(parse_constraints(["params<=1e6,latency_ms<5"])) == 2
    with pytest.raises(ConfigError, match="must look like"):
        parse_constraints("params=<1e6")


@pytest.mark.parametrize("seed", range(20))
def test_hypervolume_2d_equals_a_brute_force_union_of_boxes(seed):
    from nas.pareto import hypervolume_2d

    rng = np.random.default_rng(seed)
    pts = rng.integers(0, 8, size=(rng.integers(1, 9), 2)).astype(float)  # ties and duplicates
    ref = np.array([7.0, 7.0])  # some points lie on it: they add nothing
    cells = {
        (x, y) for px, py in pts for x in range(int(px), 7) for y in range(int(py), 7) if px < 7 and py < 7
    }  # unit cells dominated by some point inside the reference box
    assert hypervolume_2d(pts, ref) == pytest.approx(len(cells))
