"""The command line: list, user errors (one line, exit 2, no traceback), a real tiny search."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nas_run.cli import main


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "nas_run", *args], capture_output=True, text=True, timeout=300
    )


def test_list_prints_spaces_presets_datasets_and_strategies(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("darts", "nasnet", "nb201", "unireplk", "digits", "mnist1d", "mnist5k", "surrogate", "tpe"):
        assert name in out
    assert "preset of nasnet_cell" in out
    assert "kappa=1.0" in out and "population=20" in out  # strategy options with defaults


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["search", "--space", "dart"], "did you mean 'darts'"),
        (["search", "--dataset", "digitz"], "did you mean 'digits'"),
        (["search", "--strategy", "tpee"], "did you mean 'tpe'"),
        (["search", "--runner", "rayy"], "valid: local, ray"),
        (["search", "--objectives", "val_acc,latncy_ms"], "did you mean 'latency_ms'"),
        (["search", "--constraint", "params=<5"], "must look like"),
        (["search", "--trials", "0"], "trials must be a positive integer"),
        (["search", "--resume", "/nonexistent/run"], "not a run folder"),
        (["search", "--out", __file__], "is a file; give a folder"),
        (["search", "--dataset", "digits", "--out", __file__ + "/run"], "cannot create the run folder"),
        (["search", "--dataset", "digits", "--storage", "nonsense"], "expected a SQLAlchemy URL"),
    ],
)
def test_user_errors_exit_2_with_one_line(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_config_file_typo_names_the_valid_key(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text('space = "nb201"\ntrails = 3\n')
    assert main(["search", "--config", str(cfg)]) == 2
    assert "did you mean 'trials'" in capsys.readouterr().err
    yml = tmp_path / "run.yaml"
    yml.write_text("space: nb201\nepochs: two\n")
    assert main(["search", "--config", str(yml)]) == 2
    assert "epochs in" in capsys.readouterr().err


def test_bad_genotype_in_a_subprocess_is_one_line_exit_2(tmp_path):
    res = run_cli("search", "--space", "nb201", "--dataset", str(tmp_path / "missing.npz"))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and res.stderr.startswith("nas-run: error:")


def test_tiny_search_from_a_yaml_config(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"space: nb201\ndataset: digits\nstrategy: surrogate\ntrials: 3\nepochs: 1\nout: {tmp_path / 'run'}\n"
        "strategy_options:\n  n_init: 2\n  pool: 50\n"
    )
    res = run_cli("search", "--config", str(cfg))
    assert res.returncode == 0, res.stderr
    assert "Pareto front" in res.stdout and "optuna-dashboard sqlite:///" in res.stdout
    assert "test_acc" in res.stdout  # measured for the final report
    assert (tmp_path / "run" / "study.db").exists()
    again = run_cli("search", "--config", str(cfg))  # same folder: refuse, point at --resume
    assert again.returncode == 2 and "--resume" in again.stderr

    db = (tmp_path / "run" / "study.db").read_bytes()
    shown = run_cli("show", str(tmp_path / "run"), "--all")
    assert shown.returncode == 0, shown.stderr
    assert "Pareto front" in shown.stdout and "(of 3 requested)" in shown.stdout
    assert shown.stdout.count("complete") >= 3  # one line per trial, then the counts
    assert "--resume" not in shown.stdout  # finished: nothing to continue
    assert (tmp_path / "run" / "study.db").read_bytes() == db  # a reader writes nothing


def test_show_tells_a_running_run_from_an_abandoned_one(tmp_path, capsys):
    from nas.config import SearchConfig
    from nas.search import prepare_run

    cfg = SearchConfig(space="nb201", dataset="digits", trials=2, epochs=1, out=str(tmp_path / "run"))
    run = prepare_run(cfg)  # holds the folder's lock, as a driver does
    run.controller.next()  # one trial open, none finished
    assert main(["show", str(run.out)]) == 0
    assert "driving this run now" in capsys.readouterr().out
    run.lock.close()  # the driver is gone
    assert main(["show", str(run.out), "--all"]) == 0
    out = capsys.readouterr().out
    assert "running" in out and f"nas-run search --resume {run.out}" in out


def test_storage_without_driver_is_a_user_error_and_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["search", "--space", "nb201", "--storage", "mysql://u:p@127.0.0.1/db", "--out", str(out)]
    assert main(args) == 2
    assert "needs a database driver" in capsys.readouterr().err
    assert not out.exists()


def test_progress_lines_format_metrics_by_kind():
    from nas_run.progress import format_metric

    assert format_metric("val_acc", 0.94249) == "val_acc=0.9425"
    assert format_metric("params", 6370) == "params=6.37k"
    assert format_metric("latency_ms", 1.003887) == "latency_ms=1.004"  # was "1" with :.3g
    assert format_metric("onnx_latency_ms", 123.45) == "onnx_latency_ms=123.5"


def _closed_port() -> int:
    import socket

    with socket.socket() as s:  # bound then released: nothing listens there afterwards
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "no-port-here"])
def test_a_ray_address_nothing_answers_at_fails_fast_and_leaves_no_folder(tmp_path, address):
    out = tmp_path / "run"
    address = address.format(port=_closed_port())
    done = run_cli(
        "search", "--space", "nb201", "--dataset", "digits", "--runner", "ray",
        "--ray-address", address, "--trials", "1", "--epochs", "1", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and f"--ray-address {address!r}" in done.stderr
    assert not out.exists()


def test_ray_address_auto_without_a_cluster_is_a_user_error(monkeypatch):
    import ray._private.services as services

    from nas.runners.ray_tune import check_ray_address
    from search_spaces import ConfigError

    def no_cluster(*args, **kwargs):  # what Ray raises when no `ray start` ran on this machine
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(services, "canonicalize_bootstrap_address_or_die", no_cluster)
    with pytest.raises(ConfigError, match="no Ray cluster runs on this machine"):
        check_ray_address("auto")
