"""The HTML report in a real browser: headless Chromium loads it from file:// (no network, no
server), with no console message, every plot drawn as SVG with the expected number of points,
the trial table filled, and a screenshot saved.

Needs the Debian packages ``chromium`` (and ``chromium-driver``, which `.ci/run` installs too;
this test drives Chromium by its own command-line flags, no WebDriver). Without Chromium the
test fails under CI (``CI`` set) and is skipped with a warning elsewhere: never silently.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import warnings
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from report_runs import add_compression, fake_run

from nas.search import open_store
from report import make_report

pytestmark = pytest.mark.slow

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--hide-scrollbars",
)
SCATTERS = ("torch_latency_ms", "ort_latency_ms", "params", "flops", "size_bytes")


def chromium_path() -> str:
    exe = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if exe is None:
        msg = (
            "CHROMIUM IS NOT INSTALLED: the HTML report was NOT checked in a real browser "
            "(apt-get install -y chromium chromium-driver)"
        )
        if os.environ.get("CI"):
            pytest.fail(msg)
        warnings.warn(msg, stacklevel=2)
        pytest.skip(msg)
    return exe


def chromium(exe: str, page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """One headless Chromium run on a fresh profile; stderr carries the page's console."""
    cmd = [exe, *FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
           "--virtual-time-budget=30000", *args, page.resolve().as_uri()]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


class DomReader(HTMLParser):
    """Attributes of <body> and of the plot divs; rows of the trial table."""

    def __init__(self) -> None:
        super().__init__()
        self.body: dict[str, str] = {}
        self.plots: dict[str, dict[str, str]] = {}
        self.trial_rows = 0
        self._in_trials = False

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.body = a
        elif tag == "div" and a.get("id", "").startswith("plot-"):
            self.plots[a["id"]] = a
        elif tag == "table" and a.get("id") == "trials":
            self._in_trials = True
        elif tag == "tr" and self._in_trials:
            self.trial_rows += 1

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_trials = False


def expected_points(run_dirs: list[Path], table: pd.DataFrame, x: str) -> tuple[int, int]:
    """Trials with finite accuracy and ``x``, and those of them on each run's stored front."""
    ok = table.val_acc.map(math.isfinite) & table[x].map(lambda v: isinstance(v, float) and math.isfinite(v))
    front = 0
    for d, name in zip(run_dirs, table.run.unique(), strict=True):
        numbers = set(open_store(d, read_only=True).pareto().number)
        front += int((ok & (table.run == name) & table.number.isin(numbers)).sum())
    return int(ok.sum()), front


def check_page(exe: str, report, run_dirs: list[Path], tmp: Path) -> None:
    dom = chromium(exe, report.html, tmp / "profile-dom", "--dump-dom")
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], "console messages:\n" + "\n".join(console)
    reader = DomReader()
    reader.feed(dom.stdout)
    assert reader.body.get("data-report") == "rendered", reader.body
    assert reader.body.get("data-errors") == "0"
    table = pd.read_csv(report.out / "trials.csv")
    plots = [f"plot-{x}" for x in SCATTERS if table[x].notna().any()]
    assert plots and set(plots) <= set(reader.plots)
    for x in SCATTERS:
        div = reader.plots.get(f"plot-{x}")
        if div is None:
            continue
        counts = json.loads(div["data-points"])
        points, front = expected_points(run_dirs, table, x)
        assert int(div["data-svg"]) > 0, x
        assert counts.get("points", 0) == points and points > 0, (x, counts)
        assert counts.get("front", 0) == front and front > 0, (x, counts)
    for div in ("plot-hypervolume", "plot-curves"):
        assert json.loads(reader.plots[div]["data-points"]).get("other", 0) > 0, div
    assert reader.trial_rows == 1 + len(table)  # header + one row per trial
    shot = report.out / "screenshot.png"
    chromium(exe, report.html, tmp / "profile-shot", "--window-size=1300,4000", f"--screenshot={shot}")
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert img.shape == (4000, 1300) and img.std() > 10  # not a blank page


def test_report_page_renders_in_headless_chromium(tmp_path):
    exe = chromium_path()
    run = fake_run(tmp_path / "darts", space="darts", trials=10, fail_every=4, constraints=("params<=60000",))
    add_compression(run, top=2)
    check_page(exe, make_report([run], png=False), [run], tmp_path)


def test_compared_runs_render_in_headless_chromium(tmp_path):
    exe = chromium_path()
    a = fake_run(tmp_path / "random", trials=8, strategy="random")
    b = fake_run(tmp_path / "evolution", trials=8, strategy="evolution", seed=1, fail_every=5)
    add_compression(b, top=1)
    check_page(exe, make_report([a, b], png=False), [a, b], tmp_path)
