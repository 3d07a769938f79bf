"""The docs: README stays a landing page with its two commands, docs/config.md is what the config
dataclasses generate, the Python API page names what exists, and the MkDocs site builds strictly."""

from __future__ import annotations

import ast
import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAIN_COMMAND = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e . && "
    "nas-run search --compress --report --export onnx"
)
TEST_COMMAND = "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e '.[dev]' && pytest"


def test_readme_is_a_landing_page_with_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200, "README.md is the landing page: move detail into docs/"
    lines = text.splitlines()
    assert MAIN_COMMAND in lines and TEST_COMMAND in lines
    # .ci/run runs the README's install-and-test command exactly
    assert TEST_COMMAND in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()


def test_config_reference_is_in_sync():
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import gen_config_reference as gen
    finally:
        sys.path.remove(str(ROOT / "docs"))
    committed = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert committed == gen.render(), "docs/config.md is stale: run python docs/gen_config_reference.py"
    from compress.run import CompressConfig
    from nas.config import SearchConfig
    from nas.recipes import Recipe

    for cls in (SearchConfig, CompressConfig, Recipe):
        for name in cls.__dataclass_fields__:
            assert f"| `{name}` |" in committed


def test_api_page_names_what_exists():
    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    imported = 0
    for block in blocks:
        for line in block.splitlines():
            if line.startswith(("from ", "import ")):
                node = ast.parse(line).body[0]
                if isinstance(node, ast.ImportFrom):
                    module = importlib.import_module(node.module)
                    for alias in node.names:
                        assert hasattr(module, alias.name), f"docs/api.md: {node.module}.{alias.name} is gone"
                        imported += 1
    assert imported >= 20


@pytest.mark.skipif(shutil.which("mkdocs") is None, reason="mkdocs is in the dev extra")
def test_mkdocs_builds_strictly(tmp_path):
    out = subprocess.run(
        ["mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "site" / "config" / "index.html").is_file()
    assert (tmp_path / "site" / "results" / "compress" / "index.html").is_file()
