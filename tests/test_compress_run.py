"""`nas-run compress` end to end: a search run's candidates compressed as trials of its store,
kept artefacts that replay, resume after kill -9, and user errors as one line and exit 2."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compress.policy import Policy
from compress.run import CompressConfig, run_compress
from nas.config import SearchConfig
from nas.search import open_store, run_search
from nas_run.cli import main

INT8 = Policy.of(("int8", {})).to_str()
LOWRANK = Policy.of(("lowrank", {"target": 0.5}), ("finetune", {"epochs": 1})).to_str()
SPARSE = Policy.of(("unstructured", {"sparsity": 0.6}), ("finetune", {"epochs": 1})).to_str()


@pytest.fixture(scope="module")
def search_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "search"
    cfg = SearchConfig(space="unireplk", dataset="digits", strategy="random", trials=3, epochs=2, out=str(out))
    run_search(cfg)
    return out


def _compress_rows(out: Path):
    df = open_store(out).dataframe()
    return df[df.stage == "compress"].reset_index(drop=True)


def test_compress_records_pairs_in_the_runs_store_next_to_the_architectures(search_dir, tmp_path):
    run = run_compress(CompressConfig(run=str(search_dir), top_k=2, policies=(INT8, LOWRANK)))
    rows = _compress_rows(search_dir)
    assert len(rows) == 4 and set(rows.status) == {"complete"}
    assert set(rows.policy) == {INT8, LOWRANK}
    assert rows.genotype.nunique() == 2
    # the architectures compressed are the run's own, on its front
    searched = open_store(search_dir).dataframe()
    searched = searched[searched.stage == "search"]
    assert set(rows.genotype) <= set(searched.genotype)
    for _, r in rows.iterrows():
        assert 0 <= r.val_acc <= 1 and r.onnx_latency_ms > 0 and r.file_bytes > 0
        assert r.acc_drop == pytest.approx(100 * (r.base_val_acc - r.val_acc))
    low = rows[rows.policy == LOWRANK]
    assert (low.params < low.base_params).all()  # low-rank really shrinks the model
    q = rows[(rows.policy == INT8) & (rows.base_params > 20_000)]
    # int8 really shrinks the file; a tiny model's ONNX file is mostly graph (node and tensor
    # names), so only models with some weights are asserted on
    assert len(q) and (q.file_bytes * 1.5 < q.base_file_bytes).all()
    # artefacts: the compressed model and the records that rebuild it
    for _, r in rows.iterrows():
        folder = search_dir / "compressed" / f"{r.genotype_id}+{Policy.from_json(r.policy).id}"
        meta = json.loads((folder / "policy.json").read_text())
        assert meta["genotype"] == r.genotype and Policy.from_json(meta["policy"]).to_str() == r.policy
        assert (folder / ("model.onnx" if r.policy == INT8 else "model.safetensors")).is_file()
    # running it again repeats nothing: every pair is done
    again = run_compress(CompressConfig(run=str(search_dir), top_k=2, policies=(INT8, LOWRANK)))
    assert again.controller.resumed_done == 4 and len(_compress_rows(search_dir)) == 4
    assert (search_dir / "compress.csv").is_file()
    assert run.out == search_dir


def test_a_search_resumed_after_compression_ignores_the_compression_trials(search_dir):
    before = open_store(search_dir).dataframe()
    n_search = int((before.stage == "search").sum())
    run_search(SearchConfig(trials=n_search + 1), resume=search_dir)
    after = open_store(search_dir).dataframe()
    assert int((after.stage == "search").sum()) == n_search + 1  # one more architecture, not fewer


def test_low_rank_replay_from_the_kept_records_rebuilds_the_compressed_structure(search_dir):
    from safetensors.torch import load_file

    from compress.evaluate import CompressionEvaluator
    from compress.passes.base import PassContext

    rows = _compress_rows(search_dir)
    r = rows[rows.policy == LOWRANK].iloc[0]
    folder = search_dir / "compressed" / f"{r.genotype_id}+{Policy.from_json(r.policy).id}"
    meta = json.loads((folder / "policy.json").read_text())
    from compress.run import prepare_compress

    run = prepare_compress(resume=search_dir)
    run.lock.close()
    ev: CompressionEvaluator = run.evaluator
    from search_spaces import Genotype

    base = ev.load_base(Genotype.from_str(r.genotype))
    # the applied policy: the trial's, with the merge of the large-kernel branches inserted and
    # the BatchNorm re-estimation after the passes that change the model
    applied = Policy.from_json(meta["applied"])
    assert [s.name for s in applied.passes] == ["merge", "lowrank", "finetune", "bn_recalib"]
    rebuilt = applied.replay(base.module, meta["records"], PassContext(ev.data()))
    saved = load_file(str(folder / "model.safetensors"))
    state = rebuilt.state_dict()
    assert set(state) == set(saved)
    assert all(state[k].shape == saved[k].shape for k in saved)
    rebuilt.load_state_dict(saved)  # the fine-tuned weights fit the replayed structure


def _finished_compress(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:  # read-only: never creates the file
            return con.execute(
                "select count(*) from trials t join trial_user_attributes a on a.trial_id = t.trial_id "
                "where a.key = 'stage' and a.value_json = '\"compress\"' and t.state = 'COMPLETE'"
            ).fetchone()[0]
    except sqlite3.Error:
        return 0


def test_kill_minus_9_during_compress_and_resume_loses_and_repeats_nothing(search_dir, tmp_path):
    policies = []
    for i, sparsity in enumerate((0.3, 0.4, 0.5, 0.6)):
        p = tmp_path / f"p{i}.json"
        p.write_text(Policy.of(("unstructured", {"sparsity": sparsity}), ("finetune", {"epochs": 1})).to_str())
        policies += ["--policy", str(p)]
    before_n = _finished_compress(search_dir / "study.db")
    cmd = [sys.executable, "-m", "nas_run", "compress", "--run", str(search_dir), "--top-k", "1", "--quiet", *policies]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and _finished_compress(search_dir / "study.db") < before_n + 2:
        time.sleep(0.1)
    assert proc.poll() is None, proc.stderr.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = _compress_rows(search_dir)
    done_before = done_before[done_before.status == "complete"].set_index("number")
    res = subprocess.run(
        [sys.executable, "-m", "nas_run", "compress", "--resume", str(search_dir), "--quiet"],
        capture_output=True, text=True, timeout=400,
    )
    assert res.returncode == 0, res.stderr
    rows = _compress_rows(search_dir)
    complete = rows[rows.status == "complete"]
    wanted = {Policy.from_json(json.loads(Path(policies[i + 1]).read_text())).to_str() for i in range(0, 8, 2)}
    mine = complete[complete.policy.isin(wanted)]
    assert len(mine) == 4 and mine.policy.nunique() == 4  # each pair exactly once
    for number, r in done_before.iterrows():  # finished before the kill: kept as they were
        kept = rows.set_index("number").loc[number]
        assert kept.status == "complete" and kept.val_acc == r.val_acc
    # a trial the kill interrupted is marked so, and was run again
    interrupted = rows[rows.error.fillna("").str.startswith("interrupted")]
    assert len(interrupted) <= 1


def test_user_errors_are_one_line_and_exit_2(search_dir, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"passes": [{"pass": "lowrank", "target": 0.5, "ranks": {"no_such_layer": 2}}]}))
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"passes": [{"pass": "lowrnk"}]}))
    n = len(_compress_rows(search_dir))
    cases = [
        (["--run", str(search_dir), "--policy", str(bad)], "no_such_layer"),
        (["--run", str(search_dir), "--policy", str(typo)], "lowrank"),
        (["--run", str(tmp_path / "nothing")], "not a run folder"),
        (["--run", str(search_dir), "--lowrank", "0x"], "--lowrank"),
        (["--model", "no_such_pkg.mod:build", "--dataset", "digits", "--out", str(tmp_path / "o")], "no_such_pkg"),
        (["--model", "x:y"], "--dataset"),
    ]
    for args, needle in cases:
        assert main(["compress", *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and needle in err, (args, err)
    assert len(_compress_rows(search_dir)) == n  # nothing half-written in the store
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_compress_with_the_ray_runner_records_every_pair(search_dir):
    sparse2 = Policy.of(("unstructured", {"sparsity": 0.7}), ("finetune", {"epochs": 1})).to_str()
    cfg = CompressConfig(run=str(search_dir), top_k=2, policies=(SPARSE, sparse2), runner="ray", max_concurrent=2)
    run_compress(cfg)
    rows = _compress_rows(search_dir)
    mine = rows[rows.policy.isin([SPARSE, sparse2])]
    assert len(mine) == 4 and set(mine.status) == {"complete"}
    assert (mine.sparsity > 0.5).all()
