"""`nas-run train`: the final training of a run's architecture — kill -9 + --resume ends with the
same weights as an uninterrupted run; compress/export use the final weights; bad input is one line."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from nas_run.cli import main

SEARCH = ["search", "--space", "nb201", "--dataset", "digits", "--strategy", "random", "--trials", "2",
          "--epochs", "1", "--quiet"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "run"
    assert main([*SEARCH, "--out", str(out)]) == 0
    return out


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nas_run", *args], capture_output=True, text=True, timeout=600)


def test_kill_and_resume_ends_with_the_same_weights(run_dir: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(run_dir, a)
    shutil.copytree(run_dir, b)
    args = ["--epochs", "6", "--recipe", "standard"]
    assert _cli("train", "--run", str(a), *args).returncode == 0

    proc = subprocess.Popen([sys.executable, "-m", "nas_run", "train", "--run", str(b), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not list((b / "train").glob("*/checkpoint.safetensors")) and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    again = _cli("train", "--run", str(b), *args)
    assert again.returncode == 2 and "--resume" in again.stderr  # a checkpoint is never silently thrown away
    resumed = _cli("train", "--run", str(b), *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at epoch" in resumed.stdout

    [wa] = (a / "trained").glob("*.safetensors")
    wb = b / "trained" / wa.name
    sa, sb = load_file(str(wa)), load_file(str(wb))
    assert sa.keys() == sb.keys()
    for k in sa:
        assert (sa[k] == sb[k]).all(), k
    show = _cli("show", str(b))
    assert "final training" in show.stdout and "standard" in show.stdout


def test_export_and_compress_use_the_final_weights(run_dir: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    assert main(["train", "--run", str(run), "--epochs", "2", "--recipe", "quick"]) == 0
    capsys.readouterr()
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert "final-trained model (nas-run train, 2 epochs" in out and "check:    passed" in out
    assert main(["compress", "--run", str(run), "--top-k", "1", "--int8", "--quiet"]) == 0
    assert "from its final-trained weights" in capsys.readouterr().out
    import pandas as pd

    assert main(["report", str(run), "--no-png"]) == 0
    trials = pd.read_csv(run / "report" / "trials.csv")
    final = trials[trials["kind"] == "final"]
    assert len(final) == 1 and not final["on_front"].any()  # listed, but not a search candidate


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--epochs", "2", "--trial", "99"], "no trial 99"),
        (["--epochs", "2", "--recipe", "standrd"], "valid: darts, quick, standard"),
        (["--epochs", "2", "--train-on", "everything"], "train, trainval"),
        (["--epochs", "two"], "--epochs must be an integer"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(run_dir: Path, capsys, args: list[str], message: str) -> None:
    assert main(["train", "--run", str(run_dir), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_ray_trains_the_seeds_at_once(run_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    out = _cli("train", "--run", str(run), "--epochs", "2", "--recipe", "quick", "--seeds", "2",
               "--runner", "ray", "--cpus-per-trial", "1")
    assert out.returncode == 0, out.stderr[-2000:]
    from nas.search import open_store

    rows = [r for r in open_store(run, read_only=True).records() if r["stage"] == "train"]
    assert sorted(r["seed"] for r in rows) == [0, 1] and all(r["status"] == "complete" for r in rows)
    for seed in (0, 1):  # each seed wrote its own final weights
        assert list((run / "train").glob(f"*-s{seed}-quick-e2-train/model.safetensors"))
    assert len(list((run / "trained").glob("*.safetensors"))) == 1
