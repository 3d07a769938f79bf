"""Zero-cost proxies (nas.proxies) and their use by the surrogate strategy (issue #23)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from nas.proxies import (
    ALL_PROXIES,
    ProxyCache,
    ProxyFeatures,
    compute_proxies,
    diverse_subset,
    proxy_warmup,
    rank_mix,
    standardise,
)
from nas.strategies.base import make_strategy
from search_spaces import get_space
from search_spaces.nb201 import to_index_key

CONV_CELL = "nb201@1|edges=(nor_conv_3x3,nor_conv_1x1,nor_conv_3x3,skip_connect,nor_conv_3x3,avg_pool_3x3)"
# (space, input shape): every space family, tiny, on small inputs
SPACES = {
    "unireplk-1d": ("unireplk", (1, 24)),
    "unireplk-2d": ("unireplk", (1, 12, 12)),
    "nasnet": ("nasnet", (3, 8, 8)),
    "darts": ("darts", (3, 8, 8)),
    "nb201": ("nb201", (3, 8, 8)),
}


def built(space_name, shape, seed=0):
    import torch

    space = get_space(space_name).tiny()
    g = space.from_str(CONV_CELL) if space_name == "nb201" else space.sample(np.random.default_rng(seed))
    torch.manual_seed(seed)
    return space.build(g, shape, 4)


def batch(shape, n=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *shape)).astype(np.float32), rng.integers(0, 4, n)


@pytest.mark.parametrize("case", SPACES)
def test_every_proxy_is_finite_and_deterministic_by_seed_on_every_space(case):
    import torch

    name, shape = SPACES[case]
    model, (x, y) = built(name, shape), batch(shape)
    rng_before = torch.random.get_rng_state()
    a = compute_proxies(model, x, y, seed=0)
    assert a.errors == {}, a.errors
    assert all(math.isfinite(a.values[p]) for p in ALL_PROXIES)
    assert all(s >= 0 for s in a.seconds.values()) and set(a.seconds) == set(ALL_PROXIES)
    assert compute_proxies(model, x, y, seed=0).values == a.values
    # zen draws Gaussian inputs from the seed; the others read the batch and the weights
    assert compute_proxies(model, x, y, names=["zen"], seed=1).values["zen"] != a.values["zen"]
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's random state kept


def test_the_model_is_left_as_it_was():
    import torch

    model = built("nb201", (3, 8, 8))
    model.train()
    model[1].eval()  # a submodule in its own mode: must stay so
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    compute_proxies(model, *batch((3, 8, 8)))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())


def test_an_unsupported_or_failing_model_loses_only_the_proxies_it_breaks():
    import torch
    from torch import nn

    no_activation = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    r = compute_proxies(no_activation, *batch((3, 2, 2)))
    assert r.values["naswot"] is None and r.errors["naswot"].startswith("unsupported")
    assert all(r.values[p] is not None for p in ("synflow", "snip", "grad_norm", "fisher", "log_params"))

    class Boom(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("no backward here")

    class RaisesInBackward(nn.Module):
        def forward(self, x):
            return Boom.apply(x)

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), RaisesInBackward(), nn.Flatten(), nn.Linear(16, 4))
    r = compute_proxies(model, *batch((3, 2, 2)))
    for p in ("synflow", "snip", "grad_norm", "fisher", "jacob_cov"):
        assert r.values[p] is None and "no backward here" in r.errors[p], (p, r.errors)
    for p in ("naswot", "zen", "log_params", "log_flops"):
        assert r.values[p] is not None and p not in r.errors, (p, r.errors)


def test_a_proxy_past_its_time_budget_is_skipped_with_the_reason():
    import time

    from torch import nn

    class Slow(nn.Module):
        def forward(self, x):
            time.sleep(0.03)
            return x

    model = nn.Sequential(*[Slow() for _ in range(6)], nn.Flatten(), nn.Linear(12, 4))
    r = compute_proxies(model, *batch((3, 2, 2)), names=["grad_norm", "log_params"], time_budget_s=0.05)
    assert r.values["grad_norm"] is None and r.errors["grad_norm"].startswith("skipped")
    assert r.seconds["grad_norm"] < 0.15  # stopped at a module call, not after all six
    assert r.values["log_params"] is not None


@pytest.fixture(scope="module")
def evaluator():
    from nas.training import TrainingEvaluator

    return TrainingEvaluator(space="nb201", space_options=dict(get_space("nb201").tiny().options), dataset="digits")


NAMES = ("synflow", "naswot", "log_params")  # the cheap ones: the strategy tests compute many


def test_a_resumed_run_reads_the_proxies_from_the_cache(evaluator, tmp_path, monkeypatch):
    import nas.proxies.features as features

    calls = []
    real = features.compute_proxies
    monkeypatch.setattr(features, "compute_proxies", lambda *a, **k: calls.append(1) or real(*a, **k))
    space = get_space("nb201").tiny()
    genotypes = [space.sample(np.random.default_rng(i)) for i in range(3)]
    path = tmp_path / "proxies.jsonl"

    first = ProxyFeatures(evaluator, cache=path, names=NAMES)
    vectors = [first(g) for g in genotypes]
    first(genotypes[0])  # in memory too
    assert len(calls) == 3 and first.hits == 1
    with open(path, "a") as f:
        f.write('{"key": "torn')  # a run killed mid-line

    resumed = ProxyFeatures(evaluator, cache=path, names=NAMES)
    again = [resumed(g) for g in genotypes]
    assert len(calls) == 3 and resumed.hits == 3  # nothing computed twice
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(vectors, again, strict=True))

    other = ProxyFeatures(evaluator, cache=path, names=NAMES, batch_size=16)  # other settings: not mixed in
    other(genotypes[0])
    assert len(calls) == 4 and len(ProxyCache(path, other.cache.settings)) == 1


def test_proxy_passes_over_budget_are_skipped_with_one_line(evaluator):
    lines = []
    pf = ProxyFeatures(evaluator, names=NAMES, training_seconds=1e-3, notify=lines.append)
    space = get_space("nb201").tiny()
    pool = [space.sample(np.random.default_rng(i)) for i in range(5)]
    assert not pf.budget_allows(pool, "pre-screen")
    assert not pf.budget_allows(pool, "pre-screen")
    assert len(lines) == 1 and "pre-screen skipped" in lines[0] and "\n" not in lines[0]
    report = pf.cost_report()
    assert report["skipped_passes"] == {"pre-screen": 2} and report["seconds_per_candidate"] > 0
    assert ProxyFeatures(evaluator, names=NAMES, training_seconds=1e6).budget_allows(pool, "pre-screen")
    estimated = ProxyFeatures(evaluator, names=NAMES)  # one training measured: a step x steps x epochs
    assert 0 < estimated.training_seconds_estimate(pool) < 60
    import pickle

    copy = pickle.loads(pickle.dumps(pf))  # a strategy's state may travel; so may its proxies
    assert np.array_equal(copy(pool[0]), pf(pool[0]), equal_nan=True)


def test_rank_mix_standardise_and_diverse_subset():
    m = np.array([[1.0, 10.0], [3.0, np.nan], [2.0, 30.0]])
    scores = rank_mix(m)
    assert scores[2] > scores[0] and scores[2] > scores[1]  # best on one, second on the other
    assert rank_mix(m, columns=[1])[1] == 0.0  # missing ranks below every present value
    z_train, z_other = standardise(m, np.array([[2.0, 20.0]]))
    assert np.allclose(np.nanmean(z_train, axis=0), 0) and np.isnan(z_train[1, 1])
    assert np.allclose(z_other, [[0.0, 0.0]], atol=1e-6)
    points = np.array([[0, 0], [0.1, 0], [5, 5], [0, 0.1], [5, 4.9]])
    assert diverse_subset(points, 2) == [0, 2]
    assert sorted(diverse_subset(np.zeros((3, 2)), 3)) == [0, 1, 2]  # duplicates: each once


def test_proxy_warmup_orders_a_random_pool_best_first():
    space = get_space("nb201")

    def convs(g):
        return np.array([sum(e == "nor_conv_3x3" for e in g["edges"])], dtype=float)

    ranked = proxy_warmup(space, convs, 30, np.random.default_rng(0))
    assert len({g.to_str() for g in ranked}) == 30
    values = [convs(g)[0] for g in ranked]
    assert values == sorted(values, reverse=True)


# -- the surrogate strategy ---------------------------------------------------------------------
FAST = {"n_init": 5, "pool": 100, "surrogate": {"n_models": 2, "n_estimators": 30}}


def synthetic(g):
    edges = g["edges"]
    return (-sum(e.startswith("nor_conv") for e in edges) + 0.1 * edges.count("skip_connect"),)


def drive(strategy, n, fail_at=6):
    asked = []
    for i in range(n):
        g = strategy.ask()
        asked.append(to_index_key(g))
        strategy.tell(g, None if i == fail_at else synthetic(g))
    return asked


# Asked by the strategy at commit 3b4a301, before proxies existed (xgboost 3.2, n_jobs 1): the
# random design, the surrogate, and its feasibility gate after the failure at ask 7.
BEFORE_PROXIES = ["433423", "410114", "402403", "024111", "314222", "433323", "431321", "433223", "433322",
                  "233323", "233322", "233223"]  # fmt: skip


def test_with_proxies_off_the_surrogate_asks_what_it_asked_before_proxies_existed():
    space = get_space("nb201")
    default = drive(make_strategy("surrogate", space, seed=7, **FAST), 12)
    assert default == BEFORE_PROXIES

    def never(g):
        raise AssertionError("proxies computed while off")

    off = make_strategy("surrogate", space, seed=7, proxies_fn=never, proxy_features=False, proxy_prescreen=0,
                        proxy_design=0, **FAST)  # fmt: skip
    assert drive(off, 12) == BEFORE_PROXIES
    assert off.state_dict()["proxies"] == {"features": False, "prescreen": 0, "design": 0, "design_points": None,
                                           "skipped_passes": {}}  # fmt: skip


def test_an_option_on_without_proxies_fn_is_a_config_error():
    from search_spaces import ConfigError

    with pytest.raises(ConfigError, match="proxies_fn"):
        make_strategy("surrogate", get_space("nb201"), proxy_prescreen=10)


def test_surrogate_with_real_proxies_runs_and_resumes(evaluator, tmp_path):
    space = get_space("nb201").tiny()
    options = dict(FAST, n_init=4, pool=40, shortlist=6, proxy_features=True, proxy_prescreen=12, proxy_design=16)

    def fresh():
        pf = ProxyFeatures(evaluator, cache=tmp_path / "proxies.jsonl", names=NAMES, training_seconds=1e6)
        return make_strategy("surrogate", space, seed=0, proxies_fn=pf, **options), pf

    s, pf = fresh()
    asked = drive(s, 7, fail_at=5)
    assert len(set(asked)) == 7
    state = json.loads(json.dumps(s.state_dict()))
    design = state["proxies"]["design_points"]
    assert [to_index_key(space.from_str(k)) for k in design] == asked[:4]  # the design, asked first
    scores = rank_mix(np.stack([pf(space.from_str(k)) for k in design]), pf.rank_columns)
    assert scores[0] == scores.max()  # it starts from the proxies' favourite of the pool
    assert state["proxies"]["skipped_passes"] == {} and state["proxies"]["cost"]["computed"] >= 16

    t, pf2 = fresh()  # a resumed run: the state and the cache file
    t.load_state_dict(state)
    assert [to_index_key(t.ask()) for _ in range(2)] == [to_index_key(s.ask()) for _ in range(2)]
    assert pf2.hits >= 7  # every observed genotype's proxies read back, not recomputed


def test_warmup_with_real_proxies_builds_real_networks(evaluator):
    pf = ProxyFeatures(evaluator, names=NAMES)
    ranked = proxy_warmup(get_space("nb201").tiny(), pf, 6, np.random.default_rng(1))
    assert len(ranked) == 6 and pf.computed == 6
    scores = rank_mix(np.stack([pf(g) for g in ranked]), pf.rank_columns)
    assert list(scores) == sorted(scores, reverse=True) and pf.computed == 6  # cached


def test_a_search_run_hands_the_surrogate_its_proxies_and_the_cost_rule_holds(tmp_path):
    """`prepare_run` wires `ProxyFeatures` in; on digits one training costs ~0.1 s, so a proxy
    design of 40 candidates (~1 s each) is skipped and said, and the run goes on as without it."""
    import json

    from nas.config import SearchConfig
    from nas.search import run_search

    cfg = SearchConfig(space="nb201", dataset="digits", epochs=1, batch_size=128, trials=3,
                       strategy_options={"proxy_design": 40, "n_init": 2}, out=str(tmp_path / "run"))
    run = run_search(cfg)
    assert (run.store.dataframe().status == "complete").all()
    state = json.loads((run.out / "strategy_state.json").read_text())["strategy"]["proxies"]
    assert state["design"] == 40 and state["skipped_passes"] == {"initial design": 1}
    assert state["cost"]["seconds_per_candidate"] > state["cost"]["training_seconds"] * 0.1
