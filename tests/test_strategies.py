"""Strategy conformance: every registered strategy must pass these (Optuna's sampler tests are
the model). A synthetic objective on NB201 genotypes keeps them fast and deterministic."""

from __future__ import annotations

import json

import pytest

from nas.strategies.base import list_strategies, make_strategy
from search_spaces import get_space

STRATEGIES = [name for name, _ in list_strategies()]
SPACE = get_space("nb201")
FAST = {"surrogate": {"n_init": 5, "pool": 100, "surrogate": {"n_models": 2, "n_estimators": 30}}}


def objective(g, n_obj=2):
    """Synthetic losses: count of convs (to maximise) and a size proxy (to minimise)."""
    edges = g["edges"]
    convs = sum(e.startswith("nor_conv") for e in edges)
    size = sum({"nor_conv_3x3": 9, "nor_conv_1x1": 1}.get(e, 0) for e in edges)
    return (-convs + 0.1 * edges.count("skip_connect"), float(size))[:n_obj]


def make(name, n_obj=2, seed=0):
    return make_strategy(name, SPACE, n_objectives=n_obj, seed=seed, **FAST.get(name, {}))


def drive(strategy, n, n_obj=2, fail_every=0):
    asked = []
    for i in range(n):
        g = strategy.ask()
        SPACE.validate(g)
        asked.append(g)
        if fail_every and i % fail_every == fail_every - 1:
            strategy.tell(g, None)  # crashed / NaN trial
        else:
            strategy.tell(g, objective(g, n_obj), violation=0.0)
    return asked


@pytest.mark.parametrize("name", STRATEGIES)
def test_valid_asks_and_failures_accepted(name):
    asked = drive(make(name), 24, fail_every=5)
    assert len({g.to_str() for g in asked}) == len(asked)  # no repeats


@pytest.mark.parametrize("name", STRATEGIES)
def test_same_seed_same_sequence(name):
    a = drive(make(name, seed=3), 16)
    b = drive(make(name, seed=3), 16)
    c = drive(make(name, seed=4), 16)
    assert a == b
    assert a != c


@pytest.mark.parametrize("name", STRATEGIES)
def test_state_round_trip_continues_the_same_sequence(name):
    s = make(name)
    drive(s, 14, fail_every=6)
    state = json.loads(json.dumps(s.state_dict()))  # must be plain JSON
    restored = make(name, seed=99)  # the seed comes back from the state
    restored.load_state_dict(state)
    assert drive(s, 6) == drive(restored, 6)


@pytest.mark.parametrize("name", STRATEGIES)
def test_single_objective(name):
    drive(make(name, n_obj=1), 12, n_obj=1)


def test_guided_strategies_beat_random_on_a_synthetic_objective():
    # Not a benchmark (see bench/), a sanity check: learning strategies find more convs.
    def best(name):
        s = make(name, n_obj=1, seed=0)
        return min(objective(g, 1)[0] for g in drive(s, 30, n_obj=1))

    assert best("surrogate") <= best("random")
    assert best("surrogate") <= -5.0


def test_unknown_strategy_names_valid_ones():
    from search_spaces import UnknownNameError

    with pytest.raises(UnknownNameError, match="did you mean 'evolution'"):
        make_strategy("evolutoin", SPACE)


def test_surrogate_uses_cheap_model_statistics_on_a_shortlist():
    calls = []

    def stats(g):  # exact for the synthetic objective: the surrogate should exploit it
        calls.append(g.to_str())
        return [sum(e.startswith("nor_conv") for e in g["edges"])]

    s = make_strategy(
        "surrogate", SPACE, n_objectives=1, seed=0, stats_fn=stats, shortlist=8, **FAST["surrogate"]
    )
    asked = drive(s, 12, n_obj=1)
    assert len(set(calls)) <= 12 + 7 * 8  # history + shortlists, never the whole pool
    assert min(objective(g, 1)[0] for g in asked[5:]) <= -5.0


@pytest.mark.parametrize(
    ("strategy", "options", "message"),
    [
        ("surrogate", {"poll": 5}, "did you mean 'pool'"),
        ("surrogate", {"kappa": "x"}, "must be a float"),
        ("surrogate", {"pool": 0}, "pool"),
        ("evolution", {"population": 1}, "population >= 2"),
        ("evolution", {"avoid_failures": 1}, "must be a bool"),
        ("surrogate", {"min_feasible": 1.5}, "min_feasible"),
        ("tpe", {"n_startup": 3}, "did you mean 'n_startup_trials'"),
        ("tpe", {"n_startup_trials": 3.5}, "must be an int"),
        ("nsga2", {"population_size": True}, "must be an int"),
        ("random", {"x": 1}, "takes no options"),
    ],
)
def test_bad_strategy_options_are_config_errors_naming_the_valid_ones(strategy, options, message):
    from search_spaces.errors import NasRunError  # ConfigError, or UnknownNameError for names

    with pytest.raises(NasRunError, match=message):
        make_strategy(strategy, get_space("nb201"), seed=0, **options)


def test_valid_strategy_options_reach_the_strategy():
    space = get_space("nb201")
    assert make_strategy("surrogate", space, pool=50, kappa=0, seed=0).kappa == 0  # int for a float
    tpe = make_strategy("tpe", space, n_startup_trials=3, seed=0)
    assert tpe._make_sampler(0)._n_startup_trials == 3


def test_surrogate_asks_its_initial_design_first_and_a_resumed_one_skips_what_was_asked():
    space = get_space("nb201")
    rng = __import__("numpy").random.default_rng(3)
    initial = [space.sample(rng).to_str() for _ in range(3)]
    s = make_strategy("surrogate", space, seed=0, n_objectives=1, initial=initial, **FAST["surrogate"])
    first = s.ask()
    s.tell(first, objective(first, 1))
    again = make_strategy("surrogate", space, seed=0, n_objectives=1, initial=initial, **FAST["surrogate"])
    again.load_state_dict(json.loads(json.dumps(s.state_dict())))
    rest = drive(again, 4, n_obj=1)
    assert [first.to_str(), *(g.to_str() for g in rest[:2])] == initial
    assert rest[2].to_str() not in initial  # then the random starts


def test_a_bad_initial_point_is_a_config_error_naming_it():
    from search_spaces.errors import NasRunError

    with pytest.raises(NasRunError, match="initial"):
        make_strategy("surrogate", get_space("nb201"), seed=0, initial=["nb201@1|edges=(nope)"])
