"""Ray beyond one process (marked slow: `pytest -m slow`, the second CI step).

A cluster started with `ray start --head`, joined by `nas-run search --ray-address`; and a
driver running Ray Tune trials killed with SIGKILL, then resumed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from nas.search import open_store

pytestmark = pytest.mark.slow

NB201_DIGITS = ["--space", "nb201", "--dataset", "digits"]
SEARCH = [sys.executable, "-m", "nas_run", "search", *NB201_DIGITS]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


@pytest.fixture
def ray_head():
    """`ray start --head --block` in its own temp dir (short: Ray puts sockets there); ending
    the blocking process stops every process of that cluster."""
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="nr")
    head = subprocess.Popen(
        [_ray_cli(), "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false"]
        + [f"--temp-dir={temp}", "--block"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert head.poll() is None, "ray start --head exited"
            time.sleep(0.5)
    time.sleep(3)  # the GCS port opens before the head node has registered
    yield f"127.0.0.1:{port}"
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()
    shutil.rmtree(temp, ignore_errors=True)


def test_search_joins_a_cluster_started_with_ray_start(ray_head, tmp_path):
    out = tmp_path / "run"
    # Ray >= 2.59 turns token authentication on for `ray start`; a driver joining by host:port
    # must say so (the token itself is read from ~/.ray/auth_token, as the head wrote it)
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    done = subprocess.run(
        [*SEARCH, "--runner", "ray", "--ray-address", ray_head, "--trials", "3", "--epochs", "1"]
        + ["--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    df = open_store(out).dataframe()
    assert len(df) == 3 and set(df.status) <= {"complete", "stopped"}


def test_kill_minus_9_of_a_ray_driver_and_resume(tmp_path, kill_and_resume):
    trials = 10
    args = [*NB201_DIGITS, "--runner", "ray", "--max-concurrent", "2", "--strategy", "evolution"]
    before, df = kill_and_resume([*args, "--trials", str(trials), "--epochs", "3"], tmp_path / "run")
    assert len(before) >= 2

    counted = df[df.status.isin(["complete", "stopped"])]
    assert len(counted) == trials  # nothing lost
    assert counted.genotype.is_unique  # nothing repeated
    after = counted.set_index("number")
    for number, row in before.iterrows():  # finished trials kept, untouched
        assert after.loc[number, "val_acc"] == pytest.approx(row["val_acc"])
    interrupted = df[df.error.str.startswith("interrupted")]
    assert set(interrupted.genotype) <= set(counted.genotype)  # in-flight ones ran again
