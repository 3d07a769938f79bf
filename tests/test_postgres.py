"""The run store on a real PostgreSQL server: a search, `show` and `report` on it, and a driver
killed with SIGKILL then resumed, losing and repeating nothing.

Marked ``postgres``: deselected by default, run in their own CI step (`.ci/run`) as
``. .ci/postgres.sh && pytest -m postgres``. The server's URL comes from NAS_RUN_POSTGRES_URL;
without it these tests fail (a CI step without its server is broken, not skipped). Each test
works in a database of its own, created for it and dropped after it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.postgres

ENV = "NAS_RUN_POSTGRES_URL"
FAST = ["--space", "nb201", "--dataset", "digits", "--epochs", "1"]


def _connect(url):
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    return psycopg.connect(
        host=u.host, port=u.port or 5432, user=u.username, password=u.password, dbname=u.database,
        autocommit=True, connect_timeout=10,
    )  # fmt: skip


@pytest.fixture
def pg_url():
    """A SQLAlchemy URL of a fresh, empty database on the server NAS_RUN_POSTGRES_URL names
    (its role needs CREATEDB, as `.ci/postgres.sh` makes it); dropped after the test."""
    base = os.environ.get(ENV)
    if not base:
        pytest.fail(
            f"{ENV} is not set: these tests need a PostgreSQL server. Start one and export its URL "
            f"with `. .ci/postgres.sh` (e.g. postgresql+psycopg://nasrun:nasrun@localhost:5432/nasrun)",
            pytrace=False,
        )
    from sqlalchemy.engine import make_url

    url = make_url(base)
    name = f"nasrun_test_{uuid.uuid4().hex[:12]}"
    with _connect(url) as con:
        con.execute(f'create database "{name}"')
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with _connect(url) as con:  # FORCE: a killed driver's session may linger a moment
            con.execute(f'drop database if exists "{name}" with (force)')


def nas_run(*args, timeout=400):
    return subprocess.run(
        [sys.executable, "-m", "nas_run", *args], capture_output=True, text=True, timeout=timeout
    )


def _finished_trials(url: str) -> int:
    """Trials the store has finished (the test's database holds this one run's study only)."""
    with _connect(url) as con:
        if con.execute("select to_regclass('trials')").fetchone()[0] is None:
            return 0  # the driver has not created Optuna's tables yet
        return con.execute("select count(*) from trials where state in ('COMPLETE', 'PRUNED')").fetchone()[0]


def test_a_search_on_postgres_completes_and_show_and_report_read_it(tmp_path, pg_url):
    import optuna

    out = tmp_path / "run"
    res = nas_run(
        "search", *FAST, "--strategy", "random", "--trials", "3", "--storage", pg_url, "--out", str(out)
    )
    assert res.returncode == 0, res.stderr
    assert "Pareto front" in res.stdout
    assert not (out / "study.db").exists()  # the trials went to PostgreSQL, not a SQLite file
    assert "optuna-dashboard sqlite" not in res.stdout

    study = optuna.load_study(study_name=out.name, storage=pg_url)  # a plain Optuna study there
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert all(t.user_attrs["genotype"] and t.user_attrs["history"] for t in study.trials)

    shown = nas_run("show", str(out), "--all")
    assert shown.returncode == 0, shown.stderr
    assert "(of 3 requested)" in shown.stdout and shown.stdout.count("complete") >= 3
    assert "--resume" not in shown.stdout  # finished: nothing to continue

    report = nas_run("report", str(out), "--no-png")
    assert report.returncode == 0, report.stderr
    assert "run: 3 complete" in report.stdout
    html = Path(report.stdout.split("report: ", 1)[1].split()[0])
    assert html.is_file() and html.parent == out / "report"
    assert len((out / "report" / "trials.csv").read_text().strip().splitlines()) == 1 + 3


# extra `nas-run search` arguments of each variant: a search, and a joint architecture x
# compression search (its trials are (architecture, policy) pairs)
VARIANTS = [[], ["--joint"]]


@pytest.mark.parametrize("extra", VARIANTS, ids=lambda a: " ".join(a) or "plain")
def test_kill_minus_9_and_resume_on_postgres_loses_and_repeats_nothing(tmp_path, pg_url, extra):
    """As test_search_run's SQLite kill -9 test, the store on PostgreSQL."""
    from nas.controller import uses_evaluation
    from nas.search import open_store

    n, out = 6, tmp_path / "run"
    args = ["--space", "nb201", "--dataset", "digits", "--strategy", "evolution", "--epochs", "2", *extra]
    args += ["--trials", str(n), "--storage", pg_url, "--out", str(out), "--quiet"]
    cmd = [sys.executable, "-m", "nas_run", "search", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and _finished_trials(pg_url) < 2:
            time.sleep(0.2)
        assert proc.poll() is None, f"the driver ended before the kill: {proc.stderr.read().decode()}"
        os.kill(proc.pid, signal.SIGKILL)  # mid-run: its PostgreSQL session dies with it
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    before = open_store(out, read_only=True).dataframe()
    before = before[before.status.isin(["complete", "stopped"])].set_index("number")
    assert len(before) >= 2 and len(before) < n

    done = nas_run("search", "--resume", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    df = open_store(Path(out), read_only=True).dataframe()
    key = df.genotype + "\n" + df.policy.fillna("")  # the evaluation: architecture (+ policy)

    counted = df[[uses_evaluation(s, str(e or "")) for s, e in zip(df.status, df.error, strict=True)]]
    complete = df[df.status == "complete"]
    assert len(counted) == n and len(complete) == n  # nothing lost: exactly the requested evaluations
    assert (df.state != "RUNNING").all()  # the interrupted trial was closed, not left open
    for number, row in before.iterrows():  # finished trials kept, untouched
        kept = complete.set_index("number").loc[number]
        assert kept.genotype == row.genotype and kept.val_acc == pytest.approx(row.val_acc)
    interrupted = df[df.error.str.startswith("interrupted")]
    assert len(interrupted) <= 1
    # nothing repeated: every completed evaluation once, except an interrupted one re-run once
    assert key[complete.index].is_unique
    assert set(key[interrupted.index]) <= set(key[complete.index])
    assert not set(key[interrupted.index]) & set(before.genotype + "\n" + before.policy.fillna(""))


def test_a_joint_run_on_ray_with_postgres_records_every_pair(tmp_path, pg_url):
    from nas.search import open_store

    out = tmp_path / "ray"
    res = nas_run("search", "--joint", *FAST, "--strategy", "surrogate", "--trials", "4", "--runner", "ray",
                  "--max-concurrent", "2", "--storage", pg_url, "--out", str(out), "--quiet")
    assert res.returncode == 0, res.stderr
    df = open_store(out, read_only=True).dataframe()
    assert (df.status == "complete").sum() == 4 and df.proposal.str.startswith("joint@").all()
    assert df.onnx_latency_ms.gt(0).all() and df.stage.eq("compress").all()


def test_a_new_run_never_takes_over_another_runs_study(tmp_path, pg_url):
    """Two run folders of one name on one database: the second is refused in one line, and the
    first run's study is untouched."""
    import optuna

    first, second = tmp_path / "a" / "run", tmp_path / "b" / "run"
    args = [*FAST, "--strategy", "random", "--trials", "2", "--storage", pg_url, "--quiet"]
    assert nas_run("search", *args, "--out", str(first)).returncode == 0
    res = nas_run("search", *args, "--out", str(second))
    assert res.returncode == 2 and "already holds a study named 'run'" in res.stderr
    assert "Traceback" not in res.stderr and not second.exists()
    assert len(optuna.load_study(study_name="run", storage=pg_url).trials) == 2
