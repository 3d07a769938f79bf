"""Weight inheritance in search (issue #20, `nas.inherit`): which trained trial a proposal starts
from, what its trial records, and a driver killed at any store write resuming to the same
children from the same parents. The end-to-end tests train real models (tests marked below)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_resume_points import Killed, kill_at

from nas.controller import SearchController
from nas.inherit import Lineage, Parent, default_inherit_epochs
from nas.objectives import parse_objectives
from nas.runners.local import run_local
from nas.store import RunStore
from nas.strategies.base import make_strategy
from search_spaces import get_space

SPACE = get_space("nb201")
EPOCHS, CHILD_EPOCHS, N_TRIALS = 4, 1, 8


def weights_in(folder):
    def path(genotype, budget):
        return folder / "weights" / f"{genotype.id}-e{budget}.bin"

    return path


class FakeEvaluator:
    """Accuracy from the genotype, plus a bonus for every epoch behind an inherited model's weights;
    keeps a 'weights' file per trained trial as the real evaluator does."""

    def __init__(self, folder):
        self.path = weights_in(folder)

    def __call__(self, genotype, budget, report, parent=""):
        convs = sum(e.startswith("nor_conv") for e in genotype["edges"])
        bonus = 0.0
        if parent:
            p = Parent.from_text(parent)
            assert Path(p.weights).is_file()  # the parent's kept weights, where the lineage found them
            bonus = 0.01 * p.lineage_epochs
        for epoch in range(1, budget + 1):
            report(epoch, {"val_acc": 0.1 * epoch})
        out = self.path(genotype, budget)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(parent or "scratch")
        return {"val_acc": convs / 6 + bonus, "params": 100.0 * convs + 1}


def make_controller(folder, strategy="evolution", inherit=True, seed=3):
    objs = parse_objectives("val_acc,params")
    store = RunStore(f"sqlite:///{folder}/study.db", objs)
    options = {"population": 4, "sample": 2} if strategy == "evolution" else {}
    options = {"n_init": 3, "mutant_fraction": 1.0} if strategy == "surrogate" else options
    lineage = Lineage(SPACE, EPOCHS, CHILD_EPOCHS, weights_in(folder)) if inherit else None
    if strategy == "surrogate" and lineage is not None:  # as `prepare_run` gives it
        options["trial_features"] = lineage.features
    return SearchController(
        make_strategy(strategy, SPACE, n_objectives=2, seed=seed, **options),
        store, budget=EPOCHS, n_trials=N_TRIALS, seed=seed, state_path=folder / "state.json", lineage=lineage,
    )


def rows(folder):
    df = RunStore(f"sqlite:///{folder}/study.db", parse_objectives("val_acc,params")).dataframe()
    df = df[~df.error.str.startswith("interrupted")]
    parent = df["parent_genotype"] if "parent_genotype" in df else [None] * len(df)
    # parents by genotype: a trial re-run after a kill has a new number, not a new parent
    return [(g, int(b), None if not isinstance(p, str) else p, round(v, 6))
            for g, b, p, v in zip(df.genotype, df.budget, parent, df.val_acc, strict=True)]


# -- the parent rule ---------------------------------------------------------------------------
def _lineage(tmp_path, max_distance=2):
    return Lineage(SPACE, EPOCHS, CHILD_EPOCHS, weights_in(tmp_path), max_distance=max_distance)


def _trained(lineage, tmp_path, number, genotype, loss, lineage_epochs=EPOCHS):
    path = weights_in(tmp_path)(genotype, EPOCHS)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("w")
    lineage.add_trained(number, genotype, EPOCHS, loss, lineage_epochs)


def _neighbours(g, n, rng):
    out = {}
    while len(out) < n:
        m = SPACE.mutate(g, rng)
        out.setdefault(m.to_str(), m)
    return list(out.values())


def test_the_parent_is_the_nearest_trained_trial_then_the_best_then_the_earliest(tmp_path):
    rng = np.random.default_rng(0)
    child = SPACE.sample(rng)
    near_a, near_b = _neighbours(child, 2, rng)
    far = SPACE.mutate(SPACE.mutate(near_a, rng), rng)
    lineage = _lineage(tmp_path)
    _trained(lineage, tmp_path, 0, far, loss=-0.99)  # the best, but further away
    _trained(lineage, tmp_path, 1, near_a, loss=-0.5)
    _trained(lineage, tmp_path, 2, near_b, loss=-0.7)
    parent = lineage.parent_for(child)
    assert parent is not None and parent.number == 2 and parent.distance == 1
    # chosen once: a better neighbour trained later does not change a proposal's parent
    _trained(lineage, tmp_path, 3, _neighbours(child, 3, rng)[2], loss=-0.9)
    assert lineage.parent_for(child) == parent
    assert lineage.budget(parent) == CHILD_EPOCHS and lineage.budget(None) == EPOCHS
    record = lineage.record(parent)
    assert record["parent"] == 2 and record["lineage_epochs"] == EPOCHS + CHILD_EPOCHS


def test_no_parent_beyond_the_distance_limit_or_without_weights(tmp_path):
    rng = np.random.default_rng(1)
    child = SPACE.sample(rng)
    neighbour = _neighbours(child, 1, rng)[0]
    lineage = _lineage(tmp_path, max_distance=0)
    _trained(lineage, tmp_path, 0, neighbour, loss=-0.5)
    assert lineage.parent_for(child) is None
    lineage = _lineage(tmp_path)
    lineage.add_trained(0, SPACE.mutate(child, rng), 7, -0.5, 7)  # no weights file kept for budget 7
    lineage.add_trained(1, neighbour, EPOCHS, float("nan"), EPOCHS)  # a NaN result is nobody's parent
    assert lineage.parent_for(child) is None
    assert list(lineage.features(child)) == pytest.approx([0.0, np.log2(1 + EPOCHS)])


def test_lineage_state_round_trips_and_features_follow_the_chosen_parent(tmp_path):
    rng = np.random.default_rng(2)
    child = SPACE.sample(rng)
    lineage = _lineage(tmp_path)
    _trained(lineage, tmp_path, 5, _neighbours(child, 1, rng)[0], loss=-0.5, lineage_epochs=9)
    parent = lineage.parent_for(child)
    again = _lineage(tmp_path)
    again.load_state(json.loads(json.dumps(lineage.state())))
    assert again.parent_for(child) == parent  # from the saved choice, with no trained trial known
    assert list(again.features(child)) == pytest.approx([1.0, np.log2(1 + 9 + CHILD_EPOCHS)])
    assert Parent.from_text(parent.to_text()) == parent


def test_default_child_epochs_are_a_quarter_rounded_up():
    assert [default_inherit_epochs(e) for e in (1, 4, 5, 8, 50)] == [1, 1, 2, 2, 13]


# -- the controller ----------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["evolution", "surrogate", "random"])
def test_children_of_trained_trials_train_fewer_epochs_and_record_their_parent(tmp_path, strategy):
    run_local(make_controller(tmp_path, strategy), FakeEvaluator(tmp_path))
    done = rows(tmp_path)
    assert len(done) == N_TRIALS
    children = [r for r in done if r[2] is not None]
    if strategy != "random":  # mutants of trained members: most proposals after the first ones
        assert len(children) >= 3, done
    for genotype, budget, parent, _ in done:
        assert budget == (CHILD_EPOCHS if parent is not None else EPOCHS)
        if parent is not None:  # the parent finished before its child was opened, one or two decisions away
            order = [r[0] for r in done]
            assert order.index(parent) < order.index(genotype)
            ours, theirs = SPACE.to_dims(SPACE.from_str(genotype)), SPACE.to_dims(SPACE.from_str(parent))
            assert 1 <= sum(ours[k] != theirs[k] for k in ours) <= 2


def test_inheritance_off_trains_every_trial_from_scratch_and_records_nothing_new(tmp_path):
    run_local(make_controller(tmp_path, inherit=False), FakeEvaluator(tmp_path))
    df = RunStore(f"sqlite:///{tmp_path}/study.db", parse_objectives("val_acc,params")).dataframe()
    assert (df.budget == EPOCHS).all()
    assert not {"parent", "lineage_epochs", "inherit_epochs"} & set(df.columns)
    assert "parents" not in json.loads((tmp_path / "state.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = {}
    for strategy in ("evolution", "surrogate"):
        folder = tmp_path_factory.mktemp(f"ref-{strategy}")
        run_local(make_controller(folder, strategy), FakeEvaluator(folder))
        out[strategy] = rows(folder)
    return out


@pytest.mark.parametrize("strategy", ["evolution", "surrogate"])
def test_a_kill_at_any_store_write_resumes_to_the_same_children_and_parents(tmp_path, reference, strategy):
    assert any(r[2] is not None for r in reference[strategy])
    for method, call in [("start", c) for c in range(2, N_TRIALS + 1)] + [("finish", c) for c in range(2, 7)]:
        for after in (False, True):
            folder = tmp_path / f"{method}-{call}-{after}"
            folder.mkdir()
            controller = make_controller(folder, strategy)
            kill_at(controller.store, method, call, after)
            with pytest.raises(Killed):
                run_local(controller, FakeEvaluator(folder))
            run_local(make_controller(folder, strategy), FakeEvaluator(folder))
            assert rows(folder) == reference[strategy], f"killed {'after' if after else 'before'} {method} #{call}"


# -- real training (search_spaces.morph carries the weights over) -------------------------------
REAL = dict(space="nb201", dataset="digits", batch_size=128, epochs=2, inherit=True, inherit_epochs=1,
            strategy="evolution", strategy_options={"population": 3, "sample": 2})


def test_a_real_search_with_inheritance_trains_children_from_their_parents_weights(tmp_path):
    from nas.config import SearchConfig
    from nas.search import run_search

    run = run_search(SearchConfig(**REAL, trials=7, out=str(tmp_path / "run")))
    df = run.store.dataframe().sort_values("number")
    assert (df.status == "complete").all()
    children = df[df.parent.notna()]
    assert len(children) >= 3
    assert (children.budget == 1).all() and (children.epochs == 1).all() and (children.inherited == 1).all()
    assert (df[df.parent.isna()].budget == 2).all()
    for row in children.itertuples():  # every child's weights kept too: it can be a parent and be compressed
        genotype = run.space.from_str(row.genotype)
        assert run.evaluator.weights_path(genotype, 1).is_file()
        assert row.lineage_epochs == df.set_index("number").loc[int(row.parent), "lineage_epochs"] + 1
        assert 0 < row.inherited_share <= 1
    assert set(children.function_preserving.astype(float)) <= {0.0, 1.0}
    trials_csv = (run.out / "trials.csv").read_text().splitlines()[0].split(",")
    assert {"parent", "lineage_epochs", "inherited"} <= set(trials_csv)


def test_a_child_whose_parent_weights_were_edited_fails_with_a_clear_error(tmp_path):
    from nas.config import SearchConfig
    from nas.search import prepare_run
    from nas.trial import run_trial

    run = prepare_run(SearchConfig(**REAL, trials=1, out=str(tmp_path / "run")))
    space, evaluator = run.space, run.evaluator
    parent = space.sample(np.random.default_rng(0))
    evaluator(parent, 1, lambda *_: None)
    path = evaluator.weights_path(parent, 1)
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    text = Parent(0, parent.to_str(), str(path), 1, 1).to_text()
    result = run_trial(evaluator, space.mutate(parent, np.random.default_rng(1)), 1, parent=text)
    assert result.status == "failed" and "weights" in result.error and str(path.name) in result.error
    run.lock.close()


def test_kill_minus_9_and_resume_with_inheritance_keeps_every_parent(tmp_path, kill_and_resume):
    args = ["--space", "nb201", "--dataset", "digits", "--strategy", "evolution", "--trials", "7", "--epochs", "2",
            "--inherit", "--inherit-epochs", "1", "--batch-size", "128", "--config", str(tmp_path / "evo.toml")]
    (tmp_path / "evo.toml").write_text("[strategy_options]\npopulation = 3\nsample = 2\n")
    before, df = kill_and_resume(args, tmp_path / "run", wait_s=240)
    complete = df[df.status == "complete"].set_index("number")
    assert len(complete) == 7 and complete.genotype.is_unique
    for number, row in before.iterrows():  # finished trials kept, untouched
        assert complete.loc[number, "val_acc"] == pytest.approx(row["val_acc"])
    children = complete[complete.parent.notna()]
    assert len(children) >= 2
    for number, row in children.iterrows():  # a parent is a complete trial finished before its child
        assert int(row.parent) in complete.index and int(row.parent) < number
        assert complete.loc[int(row.parent), "genotype"] == row.parent_genotype



def test_the_surrogate_under_inheritance_proposes_mutants_from_a_smaller_random_start(tmp_path):
    from nas.config import SearchConfig
    from nas.search import prepare_run

    base = dict(space="nb201", dataset="digits", inherit=True, trials=1)
    run = prepare_run(SearchConfig(**base, out=str(tmp_path / "a")))
    strategy = run.controller.strategy
    assert (strategy.n_init, strategy.mutant_fraction) == (5, 1.0) and strategy.trial_features is not None
    run.lock.close()
    own = prepare_run(SearchConfig(**base, strategy_options={"n_init": 8}, out=str(tmp_path / "b")))
    assert own.controller.strategy.n_init == 8  # the config's own options win
    own.lock.close()
