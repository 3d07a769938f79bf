"""Shared test settings (one torch thread, so tests stay fast on 2 shared cores) and helpers."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True, scope="session")
def _data_cache_in_tmp(tmp_path_factory):
    """Decoded data sets go to a session folder (and subprocesses inherit it), never ~/.cache."""
    old = os.environ.get("NAS_RUN_CACHE_DIR")
    os.environ["NAS_RUN_CACHE_DIR"] = str(tmp_path_factory.mktemp("data-cache"))
    yield
    if old is None:
        os.environ.pop("NAS_RUN_CACHE_DIR", None)
    else:
        os.environ["NAS_RUN_CACHE_DIR"] = old


def _finished_trials(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:  # read-only: never creates the file
            return con.execute(
                "select count(*) from trials where state in ('COMPLETE', 'PRUNED')"
            ).fetchone()[0]
    except sqlite3.Error:  # the file exists before Optuna has created its tables
        return 0


@pytest.fixture
def kill_and_resume():
    """``run(search_args, out)``: start ``nas-run search *search_args --out out``, SIGKILL it once
    two trials have finished, then ``nas-run search --resume out``. Returns the trials finished
    before the kill (indexed by number) and every trial after the resume, as DataFrames."""
    from nas.search import open_store

    def run(search_args: list[str], out: Path, wait_s: float = 300) -> tuple:
        cmd = [sys.executable, "-m", "nas_run", "search", *search_args, "--out", str(out), "--quiet"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        db, deadline = out / "study.db", time.time() + wait_s
        while time.time() < deadline and not (db.exists() and _finished_trials(db) >= 2):
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        before = open_store(out).dataframe()
        before = before[before.status.isin(["complete", "stopped"])].set_index("number")
        done = subprocess.run(
            [sys.executable, "-m", "nas_run", "search", "--resume", str(out), "--quiet"],
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert done.returncode == 0, done.stderr
        return before, open_store(out).dataframe()

    return run
