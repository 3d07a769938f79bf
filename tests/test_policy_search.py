"""Compression-policy search (#8): the policy space round-trips and validates, every strategy
proposes valid policies for every registered space and a user CNN, the grid is exhaustive, and
a policy search stopped by kill -9 resumes without losing or repeating evaluations."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from compress.evaluate import check_policy
from compress.policy import Policy
from compress.policy_space import KINDS, PolicySpace, group_layers
from nas.data import load_dataset
from nas.strategies.base import SpaceExhausted, make_strategy
from nas_run.cli import main
from search_spaces import ConfigError, GenotypeError, get_space, list_spaces

sys.path.insert(0, str(Path(__file__).parent))
from user_models import resnet_cnn  # noqa: E402

BUILDER = f"{Path(__file__).parent / 'user_models.py'}:resnet_cnn"
STRATEGIES = ("random", "evolution", "tpe", "nsga2", "surrogate", "grid")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def _models(digits):
    """A tiny trained-form model of every registered space, and a user CNN."""
    import copy

    from search_spaces.large_kernel import reparameterize

    rng = np.random.default_rng(0)
    out = []
    for info in list_spaces():
        space = get_space(info.name).tiny()
        g = space.sample(rng)
        net = space.build(g, digits.input_shape, digits.num_classes).eval()
        deploy = reparameterize(copy.deepcopy(net).eval()) if info.name == "unireplk" else net
        out.append((info.name, net, deploy))
    cnn = resnet_cnn(digits.num_classes, digits.input_shape[0]).eval()
    out.append(("user-cnn", cnn, cnn))
    return out


def test_policy_space_round_trips_through_json_and_validates(digits):
    cnn = resnet_cnn(digits.num_classes, digits.input_shape[0]).eval()
    space = PolicySpace.for_model(cnn, cnn, digits, kind="prune+int8")
    again = PolicySpace.from_json(json.loads(json.dumps(space.to_json())))
    rng = np.random.default_rng(1)
    for _ in range(20):
        g = space.sample(rng)
        assert again.from_str(g.to_str()) == g
        assert np.array_equal(again.encode(g), space.encode(g))
        assert again.policy(g) == space.policy(g)
        assert Policy.from_json(space.policy(g).to_str()) == space.policy(g)  # canonical text
    assert len(space.encode(g)) == space.encoding_size
    with pytest.raises(GenotypeError, match="allowed"):
        space.validate(g.replace(int8_format="qdqq"))
    # probes were measured on the model: sensitivities and per-layer MACs are in the features
    assert len(space.options["group_sensitivity"]) == len(space.options["groups"])
    assert all(d["macs"] > 0 for d in space.options["layers"])


def test_features_follow_what_the_policy_removes(digits):
    cnn = resnet_cnn(digits.num_classes, digits.input_shape[0]).eval()
    space = PolicySpace.for_model(cnn, cnn, digits, kind="prune", probes=False)
    values = {d.name: d.choices[0] for d in space.dims}
    dense = space.from_dims(values)
    pruned = space.from_dims({k: 0.5 for k in values})
    names = list(space.FEATURES)
    f0, f1 = space.features(dense), space.features(pruned)
    assert f0[names.index("macs_kept")] == pytest.approx(1.0)
    assert 0.2 < f1[names.index("macs_kept")] < 0.3  # ~(1 - 0.5)^2 of the MACs when every group loses half
    assert space.policy(dense) == Policy()  # nothing pruned: the identity policy


def test_uniform_points_prune_every_group_alike_and_seed_the_surrogate(digits, tmp_path):
    from compress.evaluate import user_genotype
    from compress.policy_search import policy_controllers
    from nas.objectives import parse_objectives
    from nas.store import RunStore

    cnn = resnet_cnn(digits.num_classes, digits.input_shape[0]).eval()
    space = PolicySpace.for_model(cnn, cnn, digits, kind="prune", probes=False)
    points = space.uniform_points()
    ratios = [r for r in space.options["prune_ratios"] if r > 0]
    assert [set(g.as_dict().values()) for g in points] == [{r} for r in ratios]  # mildest first
    for g, r in zip(points, ratios, strict=True):
        (structured, _) = space.policy(g).passes
        assert set(structured.settings["per_layer"].values()) == {r}
        assert set(structured.settings["per_layer"]) == {n for _, m in space.options["groups"] for n in m}
    assert PolicySpace.for_model(cnn, cnn, digits, kind="int8", probes=False).uniform_points() == []
    # search option initial = "uniform": a surrogate policy search starts from them (as many as
    # fit in its budget, one evaluation left for the search); unseeded by default
    objectives = parse_objectives(["val_acc"])
    store = RunStore(f"sqlite:///{tmp_path / 'study.db'}", objectives)
    arch = user_genotype("0" * 40)
    (tmp_path / "policy_search").mkdir()

    def initial(budget, **options):
        chain = policy_controllers(tmp_path, store, [(arch, space)], "surrogate", budget, objectives, [], 0, 1,
                                   options=options)
        return chain.controllers[0].strategy.initial

    assert initial(10, initial="uniform") == [g.to_str() for g in points]
    assert initial(3, initial="uniform") == [g.to_str() for g in points[:2]]
    assert initial(10) == []


def test_group_layers_keeps_order_and_caps_the_count():
    names = [f"stages.{s}.blocks.{b}.conv{c}" for s in range(4) for b in range(3) for c in range(2)]
    groups = group_layers(names, max_groups=8)
    assert [n for _, members in groups for n in members] == names
    assert len(groups) <= 8 and groups[0][0] == "stages.0"
    assert group_layers(["a", "b"]) == (("a", ("a",)), ("b", ("b",)))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_proposes_valid_policies_for_every_space_and_a_user_cnn(strategy, digits):
    # the grid refuses the combined spaces (millions of points, see the grid test): one family each
    kinds = ("int8", "prune", "lowrank") if strategy == "grid" else ("prune+int8", "lowrank+int8")
    for _name, net, deploy in _models(digits):
        for kind in kinds:
            space = PolicySpace.for_model(net, deploy, digits, kind=kind, probes=False)
            strat = make_strategy(strategy, space, n_objectives=2, seed=3,
                                  **({"n_init": 2} if strategy == "surrogate" else {}))
            for i in range(4):
                g = strat.ask()
                policy = space.policy(space.validate(g))
                # layer names of the passes before int8 exist in the training form, those of
                # int8 in the deploy form (int8 runs after the merge)
                check_policy(Policy(tuple(s for s in policy.passes if s.name != "int8")), net)
                check_policy(Policy(tuple(s for s in policy.passes if s.name == "int8")), deploy)
                strat.tell(g, (float(i), float(-i)) if i != 2 else None, 0.0)


def test_grid_proposes_every_policy_once_then_is_exhausted(digits):
    cnn = resnet_cnn(digits.num_classes, digits.input_shape[0]).eval()
    space = PolicySpace.for_model(cnn, cnn, digits, kind="int8", probes=False)
    strat = make_strategy("grid", space, seed=0)
    seen = [strat.ask().to_str() for _ in range(int(space.size()))]
    assert len(set(seen)) == len(seen) == 192
    with pytest.raises(SpaceExhausted):
        strat.ask()
    assert all(k in KINDS for k in ("int8", "prune+int8"))
    big = PolicySpace.for_model(cnn, cnn, digits, kind="prune+int8", probes=False,
                                prune_ratios=tuple(i / 20 for i in range(20)))
    assert big.size() > 1e6
    with pytest.raises(ConfigError, match="grid search needs a small space"):
        make_strategy("grid", big, seed=0)


# -- the CLI, end to end ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    import torch
    from safetensors.torch import save_file

    from tests.helpers import digits_ctx, train_briefly

    torch.manual_seed(0)
    model = train_briefly(resnet_cnn(10, 1), digits_ctx(), epochs=3)
    path = tmp_path_factory.mktemp("w") / "cnn.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _search_cmd(weights: Path, out: Path, budget: int, strategy: str = "random") -> list[str]:
    return ["compress", "--model", BUILDER, "--weights", str(weights), "--dataset", "digits", "--out", str(out),
            "--search", strategy, "--budget", str(budget), "--policy-space", "int8", "--constraint", "acc_drop<=2",
            "--quiet"]


def _rows(out: Path) -> pd.DataFrame:
    df = pd.read_csv(out / "compress.csv")
    return df.sort_values("number").reset_index(drop=True)


def test_policy_search_records_pairs_and_the_surrogate_runs(weights, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(_search_cmd(weights, out, 5, "surrogate")) == 0
    capsys.readouterr()
    assert main(["show", str(out), "--all"]) == 0  # `show` reads a --model compression folder too
    shown = capsys.readouterr().out
    assert "compression:" in shown and "'complete': 5" in shown and "--resume" not in shown
    rows = _rows(out)
    assert (rows.status == "complete").sum() == 5 and rows.policy.nunique() == 5
    assert rows.strategy.eq("surrogate").all() and rows.stage.eq("compress").all()
    assert (out / "policy_search").is_dir()
    # `report` reads the pairs like any compression trial
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0


def _finished(db: Path) -> int:
    try:  # read-only URI: polling must not create an empty study.db before the run does
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            return con.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_policy_search_killed_by_sigkill_resumes_without_losing_or_repeating(weights, tmp_path):
    budget = 6
    ref = tmp_path / "ref"
    assert main(_search_cmd(weights, ref, budget, "evolution")) == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "nas_run", *_search_cmd(weights, out, budget, "evolution")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and _finished(out / "study.db") < 3:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert main(["compress", "--resume", str(out), "--quiet"]) == 0
    rows, want = _rows(out), _rows(ref)
    done = rows[rows.status == "complete"]
    assert len(done) == budget and done.policy.nunique() == budget  # nothing lost, nothing twice
    # the same proposals as the uninterrupted run, in the same order: the strategy's state resumed
    assert list(done.policy) == list(want[want.status == "complete"].policy)


def test_policy_search_user_errors_exit_2(weights, tmp_path, capsys):
    base = ["compress", "--model", BUILDER, "--weights", str(weights), "--dataset", "digits"]
    cases = [
        [*base, "--out", str(tmp_path / "a"), "--search", "annealing"],
        [*base, "--out", str(tmp_path / "b"), "--search", "random", "--policy-space", "int4"],
        [*base, "--out", str(tmp_path / "c"), "--search", "random", "--constraint", "acc_dorp<=1"],
        [*base, "--out", str(tmp_path / "d"), "--search", "random", "--int8"],
        [*base, "--out", str(tmp_path / "e"), "--constraint", "acc_drop<=1", "--int8"],
    ]
    for argv in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.strip(), argv
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_policy_search_with_the_ray_runner_records_every_evaluation(weights, tmp_path):
    out = tmp_path / "ray"
    argv = [*_search_cmd(weights, out, 4, "random"), "--runner", "ray", "--max-concurrent", "2"]
    assert main(argv) == 0
    rows = _rows(out)
    done = rows[rows.status == "complete"]
    assert len(done) == 4 and done.policy.nunique() == 4


def test_policy_search_on_a_search_run_prunes_the_training_form_and_exports(tmp_path):
    """--run DIR on the large-kernel space: per-group ratios name layers of the training form
    (pruned, then merged), int8 float layers name the merged form; the trials sit in the run's
    store beside the architectures, and export takes one of them."""
    from nas.config import SearchConfig
    from nas.search import open_store, run_search

    run_dir = tmp_path / "run"
    run_search(SearchConfig(space="unireplk", dataset="digits", strategy="random", trials=2, epochs=1,
                            out=str(run_dir)))
    argv = ["compress", "--run", str(run_dir), "--top-k", "1", "--search", "random", "--budget", "2",
            "--policy-space", "prune+int8", "--finetune-epochs", "1", "--objectives", "val_acc,onnx_latency_ms",
            "--quiet"]
    assert main(argv) == 0
    df = open_store(run_dir).dataframe()
    search, comp = df[df.stage == "search"], df[df.stage == "compress"]
    assert len(search) == 2 and (comp.status == "complete").sum() == 2
    assert comp.proposal.str.startswith("policy@1|").all()
    number = int(comp[comp.status == "complete"].number.iloc[0])
    assert main(["export", str(run_dir), "--trial", str(number), "--format", "onnx-int8",
                 "--out", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "m.onnx").stat().st_size > 0


def test_surrogate_prior_from_another_search_finds_the_optimum_in_a_few_asks(digits):
    """Transfer: the whole grid of another model (same decisions, its own model features) as
    prior data; the surrogate then reaches the optimum of a loss it has seen the shape of in a
    handful of evaluations, where 192 points would take random search ~96 on average."""
    cnn = resnet_cnn(digits.num_classes, digits.input_shape[0]).eval()
    other = resnet_cnn(digits.num_classes, digits.input_shape[0]).eval()
    space = PolicySpace.for_model(cnn, cnn, digits, kind="int8", probes=False)
    prior_space = PolicySpace.for_model(other, other, digits, kind="int8", probes=False)

    def loss(g) -> float:
        d = g.as_dict()
        return (2.0 * (d["int8_format"] == "qdq") + 1.0 * (d["int8_granularity"] == "per_tensor")
                + 0.5 * ["none", "first", "last", "both"].index(d["int8_float"])
                + 0.25 * ["minmax", "entropy", "percentile-99.99", "percentile-99.999"].index(d["int8_calibration"])
                + 0.1 * ["u8s8", "s8s8", "u8u8"].index(d["int8_scheme"]))

    grid = make_strategy("grid", prior_space, seed=0)
    points = [grid.ask() for _ in range(int(prior_space.size()))]
    prior = [[prior_space.encode(g).tolist(), [loss(g)], 0.0] for g in points]
    strat = make_strategy("surrogate", space, seed=1, n_init=1, prior=prior)
    best = min(loss(g) for g in points)
    found = []
    for _ in range(8):
        g = strat.ask()
        strat.tell(g, (loss(g),), 0.0)
        found.append(loss(g))
        if found[-1] == best:
            break
    assert best in found, f"not found in 8 asks: {found}"
