"""`nas-run export` picks by the run's objectives and constraints (`export.pick`): over
architectures and compressed trials, feasible first, `--pick` rules (min/max/knee, `where`),
bad rules one line; the exported model's accuracy is stated against its float base and
`--strict` refuses a drop over the limit; constraints are stored (compress.csv), judged with a
boundary tolerance, and shown (`show` of a `compress --model` folder prints its front)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from compress.policy import Policy
from export.pick import PickError, drop_limit, pick_trial
from nas.objectives import Constraint, excess, parse_constraints, parse_objectives
from nas_run.cli import main

sys.path.insert(0, str(Path(__file__).parent))

BUILDER = f"{Path(__file__).parent / 'user_models.py'}:resnet_cnn"
INT8 = Policy.of(("int8", {}))
SPARSE = Policy.of(("unstructured", {"sparsity": 0.5}), ("finetune", {"epochs": 1}))
PRUNE = Policy.of(("structured", {"ratio": 0.3}), ("finetune", {"epochs": 1}))
HEAVY = Policy.of(("structured", {"ratio": 0.7}))  # no fine-tuning: loses points against its base
OBJ = parse_objectives("val_acc,onnx_latency_ms")


def _rec(n: int, policy: Policy | None, stage: str = "compress", violation: float = 0.0, **metrics: float) -> dict:
    return {"number": n, "stage": stage, "status": "complete", "policy": policy.to_str() if policy else "",
            "violation": violation, "metrics": metrics}


def _dominated(rec: dict, others: list[dict], objectives=OBJ) -> bool:
    from nas.objectives import losses

    mine = np.array(losses(objectives, rec["metrics"]))
    for o in others:
        ls = losses(objectives, o["metrics"])
        if ls is not None and (np.array(ls) <= mine).all() and (np.array(ls) < mine).any():
            return True
    return False


# -- rules on constructed records -------------------------------------------------------------------


def test_default_pick_is_the_best_primary_objective_ties_by_the_others_then_val_loss():
    recs = [
        _rec(0, None, "search", val_acc=0.90, onnx_latency_ms=2.0),  # an architecture
        _rec(1, SPARSE, val_acc=0.93, onnx_latency_ms=2.0, acc_drop=-3.0),  # the old pick: lowest number of the tie
        _rec(2, PRUNE, val_acc=0.93, onnx_latency_ms=0.7, acc_drop=-3.0, val_loss=0.5),
        _rec(3, PRUNE, val_acc=0.93, onnx_latency_ms=0.7, acc_drop=-3.0, val_loss=0.4),
        _rec(4, INT8, val_acc=0.99, onnx_latency_ms=0.1, violation=2.0),  # best everywhere, infeasible
        {**_rec(5, INT8, val_acc=1.0, onnx_latency_ms=0.1), "status": "failed"},
    ]
    p = pick_trial(recs, OBJ)
    assert p.record["number"] == 3  # 0.93 (not the dominated unstructured 1), faster, then the lower val_loss
    assert p.line() == "picked trial 3 by the run's objectives 'max val_acc, then min onnx_latency_ms' (4 of 5 feasible)"
    assert not _dominated(p.record, [r for r in recs if r["violation"] == 0 and r["status"] == "complete"])
    # a constraint of the policy search (compressed trials only) is judged on the metrics too
    p = pick_trial(recs, OBJ, compress_constraints=parse_constraints("acc_drop<=-3.5"))
    assert p.record["number"] == 0 and "1 of 5 feasible" in p.line()
    # an architecture is its own float base: acc_drop 0 meets where acc_drop<=0.5
    assert pick_trial(recs[:1], OBJ, "max val_acc where acc_drop<=0.5").record["number"] == 0


def test_unstructured_is_never_picked_when_dominated_by_any_rule():
    recs = [
        _rec(0, SPARSE, val_acc=0.90, onnx_latency_ms=3.0, acc_drop=0.0, file_bytes=9e4),
        _rec(1, PRUNE, val_acc=0.90, onnx_latency_ms=1.0, acc_drop=0.0, file_bytes=3e4),
        _rec(2, INT8, val_acc=0.85, onnx_latency_ms=0.5, acc_drop=5.0, file_bytes=1e4),
        _rec(3, HEAVY, val_acc=0.70, onnx_latency_ms=0.2, acc_drop=20.0, file_bytes=2e4),
    ]
    for rule in (None, "best", "knee", "max val_acc", "max val_acc where acc_drop<=1"):
        p = pick_trial(recs, OBJ, rule)
        assert p.record["number"] != 0, rule
        assert not _dominated(p.record, recs), rule


def test_min_where_knee_and_the_boundary_tolerance():
    recs = [
        _rec(0, PRUNE, val_acc=0.75, onnx_latency_ms=3.0, acc_drop=0.0),
        # 100 * (0.75 - 0.747) is 0.30000000000000027: at the bound, which <= accepts
        _rec(1, SPARSE, val_acc=0.747, onnx_latency_ms=1.0, acc_drop=100 * (0.75 - 0.747)),
        _rec(2, INT8, val_acc=0.70, onnx_latency_ms=0.9, acc_drop=5.0),
        _rec(3, HEAVY, val_acc=0.40, onnx_latency_ms=0.1, acc_drop=35.0),
    ]
    assert recs[1]["metrics"]["acc_drop"] > 0.3
    p = pick_trial(recs, OBJ, "min onnx_latency_ms where acc_drop<=0.3")
    assert p.record["number"] == 1
    assert p.line() == "picked trial 1 by 'min onnx_latency_ms where acc_drop<=0.3' (2 of 4 feasible)"
    assert pick_trial(recs, OBJ, "min onnx_latency_ms where acc_drop<0.3").record["number"] == 0  # strict: at the bound breaks it
    assert pick_trial(recs, OBJ, "min onnx_latency_ms where acc_drop<=5 and val_acc>=0.7").record["number"] == 2
    assert pick_trial(recs, OBJ, "min onnx_latency_ms").record["number"] == 3
    # knee: (val_acc, latency) scaled over the front; trial 1 sits towards the ideal point
    assert pick_trial(recs, OBJ, "knee").record["number"] == 1
    # a float format leaves the int8 trial out, and says so
    p = pick_trial(recs, OBJ, "min onnx_latency_ms where acc_drop<=5", int8_ok=False)
    assert p.record["number"] == 1 and "int8" in p.notes[0] and "of 3 feasible" in p.line()


def test_knee_of_a_convex_front_and_of_a_two_point_front():
    # losses (x, y) on 1 - x^2 ... a front bulging towards the ideal at (0.2, 0.2)
    pts = [(0.0, 1.0), (0.1, 0.5), (0.2, 0.2), (0.5, 0.1), (1.0, 0.0), (0.6, 0.6)]  # the last is dominated
    recs = [_rec(i, PRUNE, val_acc=1 - x, onnx_latency_ms=y) for i, (x, y) in enumerate(pts)]
    assert pick_trial(recs, OBJ, "knee").record["number"] == 2
    # two points: both on the line joining them; the best primary is taken
    assert pick_trial([recs[0], recs[4]], OBJ, "knee").record["number"] == 0


def test_a_final_trained_model_and_its_compressed_variants_are_the_pool():
    recs = [
        _rec(0, None, "search", val_acc=0.99, onnx_latency_ms=0.1),
        _rec(1, None, "train", val_acc=0.90, onnx_latency_ms=1.0),
        _rec(2, PRUNE, val_acc=0.95, onnx_latency_ms=0.5, final_trained=1.0),
        _rec(3, PRUNE, val_acc=0.97, onnx_latency_ms=0.5, final_trained=0.0),
    ]
    p = pick_trial(recs, OBJ)
    assert p.record["number"] == 2 and p.candidates == 2


@pytest.mark.parametrize("rule", ["fastest", "min", "min latency", "max val_acc where", "knee where acc_drop=<1",
                                  "max val_acc where nope<=1", "best of all"])
def test_a_bad_rule_is_one_line_naming_the_grammar_and_the_metrics(rule):
    recs = [_rec(0, PRUNE, val_acc=0.9, onnx_latency_ms=1.0, acc_drop=0.1)]
    with pytest.raises(PickError) as err:
        pick_trial(recs, OBJ, rule)
    msg = str(err.value)
    assert "\n" not in msg and f"--pick {rule!r}" in msg
    assert "'min METRIC'" in msg and "where METRIC<=X" in msg and "onnx_latency_ms" in msg and "acc_drop" in msg


def test_knee_needs_two_objectives_and_an_impossible_rule_says_so():
    recs = [_rec(0, PRUNE, val_acc=0.9, onnx_latency_ms=1.0, acc_drop=0.1)]
    with pytest.raises(PickError, match="two objectives"):
        pick_trial(recs, parse_objectives("val_acc"), "knee")
    with pytest.raises(PickError, match="no completed trial .* meets 'max val_acc where acc_drop<=0'"):
        pick_trial(recs, OBJ, "max val_acc where acc_drop<=0")


def test_drop_limit_is_the_tightest_acc_drop_bound_else_one_point():
    assert drop_limit((), ()) == (1.0, "the default")
    run = parse_constraints("acc_drop<=2,params<=1e6")
    assert drop_limit((), run) == (2.0, "the run's constraint acc_drop<=2")
    assert drop_limit(parse_constraints("acc_drop<=0.5"), run)[0] == 0.5


# -- constraints: tolerance and what the store records ---------------------------------------------


def test_constraints_meet_their_bound_within_the_tolerance(tmp_path):
    from nas.store import RunStore
    from nas.trial import Candidate, TrialResult
    from search_spaces import get_space

    c = Constraint("acc_drop", "<=", 0.3)
    at = {"acc_drop": 100 * (0.75 - 0.747)}
    assert c.satisfied(at) and excess(c, at) <= 0
    assert not Constraint("acc_drop", "<", 0.3).satisfied(at)
    assert not c.satisfied({"acc_drop": 0.3001}) and excess(c, {"acc_drop": 0.3001}) > 0
    assert Constraint("speedup", ">=", 1.1).satisfied({"speedup": 1.1 - 1e-13})

    store = RunStore(f"sqlite:///{tmp_path / 'study.db'}", OBJ)
    space = get_space("nb201")
    g = space.sample(np.random.default_rng(0))
    own = parse_constraints("acc_drop<=0.3")
    for drop in (at["acc_drop"], 0.8):
        n = store.start(g.to_str(), g.id, 1, "random", 0, stage="compress")
        store.finish(Candidate(g, 1, n), TrialResult("complete", {"val_acc": 0.7, "onnx_latency_ms": 1.0, "acc_drop": drop}),
                     own)
    rows = store.records()
    assert rows[0]["violation"] == 0 and rows[1]["violation"] == pytest.approx(0.5)
    assert all(r["constraints"] == "acc_drop<=0.3" for r in rows)
    assert store.pareto()["number"].tolist() == [0]  # the violating trial is off the front


# -- a real compress --model run, through the CLI ---------------------------------------------------


@pytest.fixture(scope="module")
def model_runs(tmp_path_factory) -> dict[str, Path]:
    """A briefly trained CNN compressed by a fixed list (int8, unstructured, structured with and
    without fine-tuning), and a policy search whose constraints every trial breaks."""
    import torch
    from helpers import digits_ctx, train_briefly
    from safetensors.torch import save_file
    from user_models import resnet_cnn

    root = tmp_path_factory.mktemp("pick")
    torch.manual_seed(0)
    model = train_briefly(resnet_cnn(10, 1), digits_ctx(), epochs=3)
    weights = root / "cnn.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    base = ["compress", "--model", BUILDER, "--weights", str(weights), "--dataset", "digits", "--standardize", "--quiet"]
    pols = []
    for i, p in enumerate((INT8, SPARSE, PRUNE, HEAVY)):
        (root / f"p{i}.json").write_text(p.to_str())
        pols += ["--policy", str(root / f"p{i}.json")]
    assert main([*base, "--out", str(root / "fixed"), *pols]) == 0
    assert main([*base, "--out", str(root / "search"), "--search", "random", "--budget", "2", "--policy-space", "int8",
                 "--constraint", "size_ratio>=100", "--constraint", "acc_drop<=50"]) == 0
    return {"fixed": root / "fixed", "search": root / "search"}


def _records(run: Path) -> list[dict]:
    from export.run_folder import open_run

    return open_run(run).store.records()


def _export(capsys, run: Path, out: Path, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["export", str(run), "--out", str(out), *args])
    got = capsys.readouterr()
    return rc, got.out, got.err


def test_export_default_and_rules_on_a_real_compress_run(model_runs, tmp_path, capsys):
    run = model_runs["fixed"]
    recs = [r for r in _records(run) if r["status"] == "complete"]
    floats = [r for r in recs if not Policy.from_json(r["policy"]).terminal]
    assert len(recs) == 4 and len(floats) == 3

    rc, out, _ = _export(capsys, run, tmp_path / "a.onnx", "--format", "onnx")
    want = max(floats, key=lambda r: (r["metrics"]["val_acc"], -r["metrics"]["onnx_latency_ms"]))
    assert rc == 0 and f"picked trial {want['number']} by the run's objectives 'max val_acc, then min onnx_latency_ms' " \
                       f"(3 of 3 feasible)" in out
    assert f"exported trial {want['number']} as onnx" in out and not _dominated(want, floats)
    # the float base is the uncompressed model's accuracy the compression recorded
    base = want["metrics"]["base_val_acc"]
    assert f"float base {base:.4f}" in out and "accuracy: val_acc" in out

    rc, out, _ = _export(capsys, run, tmp_path / "b.onnx", "--format", "onnx-int8")  # int8 trials are candidates too
    assert rc == 0 and "of 4 feasible" in out

    rule = "min onnx_latency_ms where acc_drop<=0.5"
    rc, out, _ = _export(capsys, run, tmp_path / "c.onnx", "--format", "onnx-int8", "--pick", rule)
    ok = [r for r in recs if r["metrics"]["acc_drop"] <= 0.5 + 1e-9]
    want = min(ok, key=lambda r: r["metrics"]["onnx_latency_ms"])
    assert rc == 0 and f"picked trial {want['number']} by {rule!r} ({len(ok)} of 4 feasible)" in out
    assert "limit of 0.5 pts: --pick acc_drop<=0.5" in out

    rc, out, _ = _export(capsys, run, tmp_path / "d.onnx", "--format", "onnx", "--pick", "knee")
    n = int(out.split("picked trial ")[1].split()[0])
    assert rc == 0 and not _dominated(next(r for r in floats if r["number"] == n), floats)


def test_a_bad_rule_and_pick_with_trial_exit_2_in_one_line(model_runs, tmp_path, capsys):
    for args in (["--pick", "fastest"], ["--pick", "min latency"], ["--trial", "0", "--pick", "knee"]):
        rc, _, err = _export(capsys, model_runs["fixed"], tmp_path / "x.onnx", "--format", "onnx-int8", *args)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, args
    assert "metrics of this run:" in err.replace("\n", "") or "--trial N or --pick" in err
    assert not (tmp_path / "x.onnx").exists()


def test_strict_refuses_a_drop_over_the_limit_and_writes_nothing(model_runs, tmp_path, capsys):
    run = model_runs["fixed"]
    heavy = next(r for r in _records(run) if r["policy"] == HEAVY.to_str())
    assert heavy["metrics"]["acc_drop"] > 1.0  # pruned 70% without fine-tuning: the premise
    rc, out, _ = _export(capsys, run, tmp_path / "w.onnx", "--format", "onnx", "--trial", str(heavy["number"]))
    assert rc == 0 and (tmp_path / "w.onnx").is_file()
    assert "warning: the exported model is" in out and "over the limit of 1 pts (the default" in out
    rc, out, err = _export(capsys, run, tmp_path / "s.onnx", "--format", "onnx", "--trial", str(heavy["number"]), "--strict")
    assert rc == 2 and "--strict: nothing was written" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s.onnx").exists() and not list(tmp_path.glob(".s.onnx*"))


def test_policy_search_violations_are_stored_and_shown(model_runs, tmp_path, capsys):
    run = model_runs["search"]
    df = pd.read_csv(run / "compress.csv")
    done = df[df.status == "complete"]
    assert len(done) == 2
    # acc_drop<=50 is met, size_ratio>=100 is not: the violation is how far below 100 the ratio is
    assert (done.violation > 0).all()
    assert np.allclose(done.violation, 100 - done.size_ratio)
    assert done.constraints.str.contains("size_ratio>=100").all() and done.constraints.str.contains("acc_drop<=50").all()
    capsys.readouterr()
    assert main(["show", str(run)]) == 0
    shown = capsys.readouterr().out
    assert "Pareto front (val_acc:max, onnx_latency_ms:min; constraints: size_ratio>=100, acc_drop<=50)" in shown
    assert "(no completed feasible trial)" in shown and "violation" in shown
    rc, _, err = _export(capsys, run, tmp_path / "v.onnx", "--format", "onnx-int8")
    assert rc == 2 and "no completed trial of the run meets" in err and "size_ratio>=100 (compressed trials)" in err


def test_show_of_a_compress_model_folder_prints_its_front(model_runs, capsys):
    run = model_runs["fixed"]
    capsys.readouterr()
    assert main(["show", str(run)]) == 0
    shown = capsys.readouterr().out
    front = shown.split("Pareto front (val_acc:max, onnx_latency_ms:min):")[1].strip().splitlines()
    numbers = [int(line.split()[0]) for line in front[1:] if line.split()[0].isdigit()]
    recs = [r for r in _records(run) if r["status"] == "complete"]
    best = max(recs, key=lambda r: (r["metrics"]["val_acc"], -r["metrics"]["onnx_latency_ms"]))
    assert numbers and numbers[0] == best["number"]  # best primary first
    assert not any(_dominated(r, recs) for r in recs if r["number"] in numbers)
    assert "policy" in front[0] and "acc_drop" in front[0]


# -- a search run folder: architectures and their compressed trials --------------------------------


@pytest.fixture(scope="module")
def search_run(tmp_path_factory) -> Path:
    from compress.run import CompressConfig, run_compress
    from nas.config import SearchConfig
    from nas.search import run_search

    out = tmp_path_factory.mktemp("pick-run") / "run"
    run_search(SearchConfig(space="nb201", dataset="digits", strategy="random", trials=2, epochs=1, out=str(out)))
    run_compress(CompressConfig(run=str(out), top_k=1, policies=(INT8.to_str(), SPARSE.to_str())))
    return out


def test_a_search_runs_default_pick_spans_architectures_and_compressed_trials(search_run, tmp_path, capsys):
    objectives = parse_objectives("val_acc,params")  # the run's (SearchConfig's default)
    recs = [r for r in _records(search_run) if r["status"] == "complete"]
    assert {r["stage"] for r in recs} == {"search", "compress"} and len(recs) == 4

    def best(pool: list[dict]) -> dict:
        return max(pool, key=lambda r: (r["metrics"]["val_acc"], -r["metrics"]["params"], -r["metrics"].get("val_loss", 0)))

    floats = [r for r in recs if not (r["policy"] and Policy.from_json(r["policy"]).terminal)]
    for fmt, pool in (("onnx", floats), ("onnx-int8", recs)):
        rc, out, _ = _export(capsys, search_run, tmp_path / f"{fmt}.onnx", "--format", fmt)
        want = best(pool)
        assert rc == 0 and f"picked trial {want['number']} by the run's objectives 'max val_acc, then min params' " \
                           f"({len(pool)} of {len(pool)} feasible)" in out, out
        assert not _dominated(want, pool, objectives)
    # an architecture trial: its own float base, measured now; the exported file matches it
    arch = best([r for r in recs if r["stage"] == "search"])
    rc, out, _ = _export(capsys, search_run, tmp_path / "arch.onnx", "--format", "onnx", "--trial", str(arch["number"]))
    line = next(x for x in out.splitlines() if x.strip().startswith("accuracy:"))
    assert rc == 0 and "drop +0.00 pts" in line and "within the limit of 1 pts: the default" in line
    # a rule over both kinds: the fewest parameters among models within half a point of their base
    rc, out, _ = _export(capsys, search_run, tmp_path / "few.onnx", "--format", "onnx",
                         "--pick", "min params where acc_drop<=0.5")
    ok = [r for r in floats if r["metrics"].get("acc_drop", 0.0) <= 0.5]
    want = min(ok, key=lambda r: (r["metrics"]["params"], -r["metrics"]["val_acc"]))
    assert rc == 0 and f"picked trial {want['number']} by 'min params where acc_drop<=0.5' ({len(ok)} of 3" in out
