"""NB201 space (strings, keys, canonical form, encoding, model), the tabular benchmark and the
XGBoost surrogate."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from scipy.stats import kendalltau

from nas.benchmarks import FIXTURE, NB201Table, TabularEvaluator
from nas.surrogate import XGBSurrogate
from search_spaces.errors import DatasetError, GenotypeError, NasRunError, UnknownNameError
from search_spaces.nb201 import (
    OPS,
    NB201Space,
    canonical_key,
    from_index_key,
    from_nb201_str,
    live_edges,
    to_index_key,
    to_nb201_str,
)

EXAMPLE = "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|"


@pytest.fixture(scope="module")
def space() -> NB201Space:
    return NB201Space("nb201")


def test_nb201_string_round_trip(space: NB201Space) -> None:
    g = from_nb201_str(EXAMPLE)
    assert g["edges"] == ("nor_conv_3x3", "nor_conv_3x3", "avg_pool_3x3", "skip_connect", "nor_conv_3x3",
                          "skip_connect")  # fmt: skip
    assert to_nb201_str(g) == EXAMPLE
    assert space.validate(g) is g
    assert space.from_str(g.to_str()) == g
    rng = np.random.default_rng(0)
    for _ in range(50):
        h = space.sample(rng)
        assert from_nb201_str(to_nb201_str(h)) == h
        assert from_index_key(to_index_key(h)) == h


def test_registered_by_name() -> None:
    from search_spaces import get_space

    space = get_space("nb201")
    assert isinstance(space, NB201Space) and space.options == {"channels": 16, "cells_per_stage": 5}
    assert space.tiny().options == {"channels": 8, "cells_per_stage": 1}
    assert space.size() == 5**6


def test_index_key_digits() -> None:
    g = from_nb201_str(EXAMPLE)
    assert to_index_key(g) == "334131"  # digit = index into OPS, edges in string order
    assert [OPS[int(c)] for c in to_index_key(g)] == list(g["edges"])
    assert to_index_key(from_index_key("000000")) == "000000"


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|",  # two nodes
        "|nor_conv_3x3~0|+|nor_conv_3x3~0|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|",  # node 2 short
        "|conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|",
        "|nor_conv_3x3~1|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|",
        "nor_conv_3x3~0+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|",
        "|nor_conv_3x3|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|",
    ],
)
def test_malformed_strings_raise(bad: str) -> None:
    with pytest.raises(GenotypeError):
        from_nb201_str(bad)


def test_unknown_op_names_allowed_ones(space: NB201Space) -> None:
    with pytest.raises(GenotypeError, match="nor_conv_3x3"):
        from_nb201_str(EXAMPLE.replace("avg_pool_3x3", "max_pool_3x3"))
    with pytest.raises(GenotypeError):
        from_index_key("334135")
    with pytest.raises(GenotypeError):
        space.validate(from_nb201_str(EXAMPLE).replace(edges=("none",) * 5))


def test_canonical_key_merges_equivalent_cells() -> None:
    # conv3x3(x) directly, or behind a skip, or with a dead branch: one function
    assert canonical_key(from_index_key("000300")) == "000300"
    assert canonical_key(from_index_key("100030")) == "000300"
    assert canonical_key(from_index_key("030300")) == "000300"  # 0->2 leads nowhere
    assert canonical_key(from_index_key("300003")) == "000000"  # output disconnected
    assert live_edges([3, 0, 0, 0, 0, 3]) == (False,) * 6
    # nodes 1 and 2 swap when nothing joins them
    assert canonical_key(from_index_key("230032")) == canonical_key(from_index_key("320023"))
    assert canonical_key(from_index_key("333333")) != canonical_key(from_index_key("333332"))


def test_encode_shape_and_function_invariance(space: NB201Space) -> None:
    a, b = space.encode(from_index_key("334131")), space.encode(from_index_key("000000"))
    assert a.shape == b.shape == (space.encoding_size,) and a.dtype == np.float32
    assert not np.array_equal(a, b)
    assert a[:30].sum() == 6  # the one-hot of the canonical edges comes first
    # one function, one vector; another function, another vector
    assert np.array_equal(space.encode(from_index_key("100030")), space.encode(from_index_key("000300")))
    assert not np.array_equal(space.encode(from_index_key("000200")), space.encode(from_index_key("000300")))


def test_tiny_model_forward_backward(space: NB201Space) -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = space.tiny().build(from_nb201_str(EXAMPLE), (3, 8, 8), 10)
    out = model(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_full_size_params_match_benchmark(space: NB201Space) -> None:
    pytest.importorskip("torch")
    table = NB201Table.from_json(FIXTURE)
    g = from_nb201_str(EXAMPLE)
    model = space.build(g, (3, 32, 32), 10)
    assert sum(p.numel() for p in model.parameters()) == table.query(g)["params"]


def test_table_fixture_values_and_optimum() -> None:
    table = NB201Table.from_json(FIXTURE)
    assert len(table) >= 300 and table.dataset == "cifar10"
    m = table.query(from_nb201_str(EXAMPLE))
    assert m["val_acc"] == pytest.approx((90.71199999511718 + 90.71599999023438 + 90.87999998779297) / 300)
    assert m["latency_ms"] == pytest.approx(16.852585892928276)
    assert m["params"] == 802426
    assert m["train_time_s"] == pytest.approx(2169.641375541687)
    assert table.query(from_nb201_str(EXAMPLE), seed=2)["val_acc"] == pytest.approx(0.9087999998779297)
    with pytest.raises(NasRunError):
        table.query(from_nb201_str(EXAMPLE), seed=3)
    g, best = table.optimum()
    assert to_index_key(g) == "333132" and best["val_acc"] == pytest.approx(0.9160666665)
    missing = next(k for k in ("444444", "444443", "444442") if k not in table.all_keys())
    with pytest.raises(DatasetError):
        table.query(from_index_key(missing))


def test_tabular_evaluator_deterministic_and_reports() -> None:
    ev = TabularEvaluator(noise="seed", seed=7, path=str(FIXTURE))
    ev = pickle.loads(pickle.dumps(ev))  # runners ship it to workers
    g = from_nb201_str(EXAMPLE)
    reports: list[tuple[int, dict[str, float]]] = []
    first = ev(g, 12, lambda epoch, metrics: reports.append((epoch, dict(metrics))))
    assert reports == [(12, first)]
    assert ev(g, 12, lambda *_: None) == first
    assert first["val_acc"] * 100 in NB201Table.from_json(FIXTURE)._rows["334131"].val_acc
    mean = TabularEvaluator(path=str(FIXTURE))(g, 0, lambda *_: None)
    assert mean["val_acc"] == pytest.approx(0.90769333)
    with pytest.raises(UnknownNameError):
        TabularEvaluator(dataset="cifar11")
    with pytest.raises(UnknownNameError):
        TabularEvaluator(noise="median")  # type: ignore[arg-type]


def test_surrogate_ranks_a_linear_task() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 4)).astype(np.float32)
    y = X @ rng.normal(size=4) + 0.1 * rng.normal(size=400)
    for objective in ("regression", "rank"):
        model = XGBSurrogate(n_models=3, objective=objective, seed=1, n_jobs=1).fit(X[:250], y[:250])
        assert kendalltau(model.predict(X[250:]), y[250:]).statistic > 0.8
        std = model.predict_std(X[250:])
        assert std.shape == (150,) and (std >= 0).all() and std.max() > 0
    assert XGBSurrogate(max_depth=2).get_params()["max_depth"] == 2
    assert XGBSurrogate().set_params(n_models=2).n_models == 2
