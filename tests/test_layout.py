"""The layout shows the verbs: ``search_spaces <- nas <- compress <- report, export <- nas_run``.

Each package imports only the ones below it (function-level imports included: a lazy import is
still a dependency), and the CLI's start-up imports none of the heavy rooms."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# package -> the first-party packages it may import (besides itself)
ALLOWED = {
    "search_spaces": set(),
    "nas": {"search_spaces"},
    "compress": {"search_spaces", "nas"},
    "report": {"search_spaces", "nas", "compress"},
    "export": {"search_spaces", "nas", "compress"},
    "nas_run": {"search_spaces", "nas", "compress", "report", "export"},
}


def imported_packages(path: Path) -> set[tuple[str, int]]:
    """(first-party top-level package, line) of every absolute import in ``path``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {(n.split(".")[0], node.lineno) for n in names if n.split(".")[0] in ALLOWED}
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_flow_one_way(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ holds no Python files: the layout changed, update ALLOWED"
    wrong = [f"{f.relative_to(ROOT)}:{line} imports {dep}" for f in files
             for dep, line in sorted(imported_packages(f)) if dep != package and dep not in ALLOWED[package]]
    assert not wrong, "\n".join(wrong)


def test_the_scan_sees_a_wrong_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from report.units import human\n    import export.trial\n")
    assert imported_packages(bad) == {("report", 2), ("export", 3)}


def test_cli_start_up_imports_no_room():
    """Building the parser (what `nas-run --help` and every command pay) imports neither the
    report, the export code, compress, torch nor pandas."""
    code = (
        "import sys; import nas_run.cli as c; c.build_parser(); "
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('report', 'compress', 'torch', 'pandas') "
        "or m.startswith('export.')]; print(heavy); sys.exit(bool(heavy))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
