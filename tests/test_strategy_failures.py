"""Strategies learn from failed and rejected candidates (random search stays random).

A synthetic NB201 space where most candidates fail: a cell with a pooling edge "crashes"
(``tell(g, None)``), one with more than two 3x3 convolutions is "rejected" by a constraint
(``tell(g, None, violation)``), as the controller tells them. About 77% of uniform samples fail.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from nas.strategies.base import make_strategy
from search_spaces import get_space

SPACE = get_space("nb201")
ASKS = 40
SEEDS = (0, 1)
FAST = {
    "surrogate": {"n_init": 8, "pool": 150, "surrogate": {"n_models": 2, "n_estimators": 30}},
    "nsga2": {"population_size": 10},
    "evolution": {"population": 10, "sample": 3},
}


def outcome(g) -> tuple[tuple[float, ...] | None, float]:
    """(losses or None, violation) of a cell: the quantity to maximise is its number of convs."""
    edges = g["edges"]
    if "avg_pool_3x3" in edges:
        return None, 0.0  # crashed
    big = edges.count("nor_conv_3x3") - 2
    if big > 0:
        return None, float(big)  # rejected before training
    return (-float(sum(e.startswith("nor_conv") for e in edges)),), 0.0


def drive(name: str, seed: int, asks: int = ASKS, strategy=None):
    if strategy is None:
        strategy = make_strategy(name, SPACE, n_objectives=1, seed=seed, **FAST.get(name, {}))
    failed, best = 0, 0.0
    for _ in range(asks):
        g = strategy.ask()
        losses, violation = outcome(g)
        strategy.tell(g, losses, violation)
        failed += losses is None
        best = min(best, losses[0]) if losses is not None else best
    return strategy, failed, best


def test_the_space_mostly_fails() -> None:
    rng = np.random.default_rng(0)
    share = np.mean([outcome(SPACE.sample(rng))[0] is None for _ in range(2000)])
    assert 0.7 < share < 0.85


@pytest.fixture(scope="module")
def random_failures() -> int:
    return sum(drive("random", seed)[1] for seed in SEEDS)


@pytest.mark.parametrize("name", ["evolution", "tpe", "nsga2", "surrogate"])
def test_learning_strategies_ask_fewer_failing_candidates_than_random(
    name: str, random_failures: int
) -> None:
    failed = [drive(name, seed)[1] for seed in SEEDS]
    assert sum(failed) < random_failures, (name, failed, random_failures)
    assert drive(name, SEEDS[0])[1] == failed[0]  # deterministic


def test_random_stays_random(random_failures: int) -> None:
    # about the space's share, whatever it was told
    assert 0.6 * len(SEEDS) * ASKS < random_failures < 0.95 * len(SEEDS) * ASKS


def test_evolution_counts_failures_as_members_that_never_win() -> None:
    s = make_strategy("evolution", SPACE, n_objectives=1, seed=0, **FAST["evolution"])
    drive("evolution", 0, asks=10, strategy=s)
    assert len(s.population) == 10  # full after `population` asks, failures included
    assert any(y is None for _, y, _ in s.population)
    parents = []
    real_mutate = s._mutate_away_from_failures  # the mutation once something has failed
    s._mutate_away_from_failures = lambda g: parents.append(g) or real_mutate(g)
    drive("evolution", 0, asks=15, strategy=s)
    assert parents and all(outcome(p)[0] is not None for p in parents)  # only what ran is a parent
    state = json.loads(json.dumps(s.state_dict()))  # failed members survive a JSON round trip
    assert any(y is None for _, y, _ in state["population"])


def test_surrogate_starts_its_models_after_n_init_asks_failures_included() -> None:
    s = make_strategy("surrogate", SPACE, n_objectives=1, seed=0, **FAST["surrogate"])
    fits = []
    real_fit = s._fit
    s._fit = lambda X, y: fits.append(len(y)) or real_fit(X, y)
    for _ in range(9):
        g = s.ask()
        s.tell(g, *outcome(g))
    assert fits and fits[0] == 8  # the feasibility model, on all 8 trials (most of them failed)


def test_optuna_samplers_see_failures_as_infeasible_complete_trials() -> None:
    import optuna

    for name in ("tpe", "nsga2"):
        s, failed, _ = drive(name, 0, asks=12)
        trials = s.study.get_trials(deepcopy=False)  # redrawn repeats are FAIL: not data
        complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
        infeasible = [t for t in complete if sum(t.constraints.values()) > 0]
        assert len(complete) == 12 and len(infeasible) == failed > 0
        assert all(t.user_attrs.get("failed") for t in infeasible)
        rejected = [t for t in infeasible if outcome(SPACE.from_dims(t.params))[1] > 0]
        assert all(t.constraints["0"] == outcome(SPACE.from_dims(t.params))[1] for t in rejected)
    # TPE's "good" group never holds more trials than ran and met the constraints
    tpe = drive("tpe", 1, asks=30)[0]
    assert tpe._make_sampler(0)._gamma(1000) == tpe.n_feasible() < 25


def test_evolution_mutates_as_the_space_does_until_something_fails() -> None:
    def run(avoid: bool) -> list[str]:
        s = make_strategy(
            "evolution", SPACE, n_objectives=1, seed=4, population=6, sample=2, avoid_failures=avoid
        )
        asked = []
        for _ in range(20):
            g = s.ask()
            s.tell(g, (-float(g["edges"].count("nor_conv_3x3")),))  # nothing fails
            asked.append(g.to_str())
        return asked

    assert run(True) == run(False)


def test_evolution_stops_proposing_a_value_every_failure_shares() -> None:
    s = make_strategy("evolution", SPACE, n_objectives=1, seed=0, **FAST["evolution"])
    drive("evolution", 0, asks=60, strategy=s)
    late = [g for g, _, _ in s.history[30:]]
    assert sum("avg_pool_3x3" in g["edges"] for g in late) <= 6  # ~74% of uniform samples have one


@pytest.mark.parametrize("name", ["tpe", "nsga2"])
def test_optuna_samplers_ask_at_most_half_as_many_failing_candidates_as_random(name: str) -> None:
    # Issue #9's goal on this space. Without the feasibility gate both ask about 60% as many
    # failures as random here (a product-kernel TPE and a uniform mutation do not learn "any
    # pooling edge crashes"), so this fails if the gate stops working.
    asks = 60
    random_failed = sum(drive("random", seed, asks)[1] for seed in SEEDS)
    gated = [drive(name, seed, asks) for seed in SEEDS]
    assert sum(f for _, f, _ in gated) <= random_failed / 2, (name, [f for _, f, _ in gated], random_failed)
    assert min(best for _, _, best in gated) <= -5.0  # and still finds cells of many convs
    ungated = sum(
        drive(name, seed, asks, make_strategy(name, SPACE, 1, seed, **FAST.get(name, {}), min_feasible=0))[1]
        for seed in SEEDS
    )
    assert ungated > random_failed / 2  # the synthetic space is hard enough to need the gate


def test_feasibility_model_condemns_the_value_every_failure_shares() -> None:
    from nas.strategies.optuna_samplers import FeasibilityModel

    rng = np.random.default_rng(0)
    cells = [SPACE.sample(rng) for _ in range(60)]
    crashed = ["avg_pool_3x3" in g["edges"] for g in cells]  # only the crash rule of `outcome`
    model = FeasibilityModel(SPACE).fit(cells, crashed)
    with_pool = [g for g, c in zip(cells, crashed, strict=True) if c]
    without = [g for g, c in zip(cells, crashed, strict=True) if not c]
    assert max(model.p_run(g) for g in with_pool) < 0.5 < min(model.p_run(g) for g in without)
    # the fit depends on the set of trials, not on the order they were told in (resume re-tells)
    shuffled = FeasibilityModel(SPACE).fit(cells[::-1], crashed[::-1])
    assert np.array_equal(model.q, shuffled.q)


@pytest.mark.parametrize("name", ["tpe", "nsga2"])
@pytest.mark.parametrize("min_feasible", [0.5, 1.0])  # 1.0: most asks end in `_fallback`
def test_the_gate_resumes_exactly(name: str, min_feasible: float) -> None:
    import optuna

    opts = {**FAST.get(name, {}), "min_feasible": min_feasible}
    s, _, _ = drive(name, 0, asks=30, strategy=make_strategy(name, SPACE, 1, seed=0, **opts))
    assert s.feasibility_model() is not None
    refused = [
        t
        for t in s.study.get_trials(deepcopy=False)
        if t.state == optuna.trial.TrialState.FAIL and SPACE.from_dims(t.params).to_str() not in s.asked
    ]
    assert refused  # the gate turned proposals down (not only repeats of asked genotypes)
    state = json.loads(json.dumps(s.state_dict()))
    restored = make_strategy(name, SPACE, n_objectives=1, seed=7, **opts)
    restored.load_state_dict(state)
    drive(name, 0, 15, s)
    drive(name, 0, 15, restored)
    assert restored.asked == s.asked and len(set(s.asked)) == len(s.asked)  # same asks, no repeat
    fallbacks = [t for t in s.study.get_trials(deepcopy=False) if "fixed_params" in t.system_attrs]
    assert fallbacks or min_feasible < 1


@pytest.mark.parametrize("name", ["tpe", "nsga2"])
def test_the_gate_changes_nothing_until_a_failure(name: str) -> None:
    def nothing_fails(strategy) -> list[str]:
        out = []
        for _ in range(25):
            g = strategy.ask()
            strategy.tell(g, (-float(g["edges"].count("nor_conv_3x3")),))
            out.append(g.to_str())
        return out

    opts = FAST.get(name, {})
    gated = make_strategy(name, SPACE, 1, seed=2, **opts)
    off = make_strategy(name, SPACE, 1, seed=2, **opts, min_feasible=0)
    assert nothing_fails(gated) == nothing_fails(off)
