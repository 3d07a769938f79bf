"""`nas-run verify FILE|DIR ...`: check files against the hashes recorded when they were written
and print what was checked: an export's manifest (format, then weights / graph / metadata, each
OK or MISMATCH), a run file's ``.sha256`` sidecar, an artefact's manifest (`nas.artefact`: the
manifest against its sidecar, then every file it names), or all of these under a folder.
Exit 0 when everything matches, 2 otherwise (the first problem as the error line)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_verify_parser", "verify_command"]


def add_verify_parser(sub: Any) -> None:
    v = sub.add_parser(
        "verify",
        help="check exports and run artefacts against their recorded SHA-256 hashes",
        description=(
            "Check an export's manifest (weights, graph or code, metadata), a run artefact against its "
            ".sha256 sidecar, or every artefact with one under a run folder. Prints each hash OK or "
            "MISMATCH; exit 0 when all match, 2 otherwise. Nothing is loaded or written."
        ),
    )
    v.add_argument("paths", nargs="+", metavar="FILE|DIR", help="an export, a run artefact, or a run folder")


def verify_command(args: argparse.Namespace) -> int:
    from search_spaces import NasRunError

    problems: list[str] = []
    for raw in args.paths:
        p = Path(raw)
        files = sorted(q.with_name(q.name[: -len(".sha256")]) for q in p.rglob("*.sha256")) if p.is_dir() else [p]
        if p.is_dir() and not files:
            problems.append(f"{str(p)!r} holds no artefact with a recorded SHA-256")
        for f in files:
            try:
                _verify_one(f, problems)
            except NasRunError as exc:
                print(f"{f}: {'MISSING' if not f.exists() else 'UNREADABLE'}")
                problems.append(str(exc))
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        print(f"nas-run: error: {problems[0]}{more}", file=sys.stderr)
        return 2
    return 0


def _verify_one(f: Path, problems: list[str]) -> None:
    from nas.artefact import MANIFEST_SUFFIX
    from nas.integrity import IntegrityError, digest_path, verify_file

    if f.name.endswith(MANIFEST_SUFFIX):  # an artefact: its manifest, then every file it names
        _verify_artefact(f, problems)
        return
    if digest_path(f).exists():  # a run file with a sidecar
        try:
            verify_file(f, "artefact")
            print(f"{f}: sha256 OK")
        except IntegrityError as exc:
            print(f"{f}: sha256 MISMATCH")
            problems.append(str(exc))
        return
    from compress.export_manifest import ExportError, check_export

    try:
        check = check_export(f)
    except ExportError as exc:
        if "does not match its sidecar" not in str(exc):
            raise
        print(f"{f}: format safetensors\n  weights   MISMATCH")
        problems.append(str(exc))
        return
    print(f"{f}: format {check.format} (export format version {check.version})")
    for name, ok in check.entries.items():
        print(f"  {name:<9} {'OK' if ok else 'MISMATCH'}")
    if check.version < 2:
        print("  note: a format-1 export: its metadata and code carry no hash; export it again to seal them")
    try:
        check.raise_if_bad()
    except ExportError as exc:
        problems.append(str(exc))


def _verify_artefact(manifest: Path, problems: list[str]) -> None:
    from nas.artefact import open_artefact
    from nas.integrity import IntegrityError

    try:
        art = open_artefact(manifest)
    except IntegrityError as exc:
        print(f"{manifest}: artefact MISMATCH")
        problems.append(str(exc))
        return
    print(f"{manifest}: artefact OK ({art.kind}: {', '.join(sorted(art.manifest['files']))} and the manifest)")
