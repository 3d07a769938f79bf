"""SHA-256 digests of the files a run writes (trial weights, compressed models, final-training
checkpoints and weights), checked before anything reads them.

One scheme everywhere: a sidecar ``<file>.sha256`` next to the file, in ``sha256sum`` format
(``<hex>  <name>``), so ``sha256sum -c`` checks it too. A file that is replaced while a run may be
killed (`replace_with_digest`: checkpoints, weights) lists the old and the new digest in its
sidecar for the instant between the two renames, so a kill -9 at any point leaves a file that
verifies; a tampered or truncated file matches neither.

`verify_file` raises `IntegrityError` (a `ConfigError`: one line, exit 2) naming the file. A file
written before digests were kept (no sidecar) is read with a note, once per file and process.
This is integrity, not authenticity: whoever can edit the file can edit its sidecar.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

from search_spaces import ConfigError

__all__ = [
    "DIGEST_SUFFIX",
    "IntegrityError",
    "digest_path",
    "file_sha256",
    "recorded_digests",
    "replace_with_digest",
    "verify_file",
    "write_digest",
]

DIGEST_SUFFIX = ".sha256"


class IntegrityError(ConfigError):
    """A file whose content is not what was written: truncated, edited, or replaced."""


def _stderr_note(text: str) -> None:
    print(f"nas-run: note: {text}", file=sys.stderr)


# where notes about unverified legacy files go (the CLI's stderr by default; tests may swap it)
on_note: Callable[[str], None] = _stderr_note
_noted: set[str] = set()


def digest_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p.with_name(p.name + DIGEST_SUFFIX)


def file_sha256(path: str | os.PathLike[str]) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_sidecar(path: Path, digests: list[str]) -> None:
    side = digest_path(path)
    tmp = side.with_name(side.name + ".tmp")
    tmp.write_text("".join(f"{d}  {path.name}\n" for d in dict.fromkeys(digests)))
    os.replace(tmp, side)  # a sidecar is never half written either


def write_digest(path: str | os.PathLike[str]) -> str:
    """Record the SHA-256 of ``path`` in its sidecar; returns it."""
    p = Path(path)
    digest = file_sha256(p)
    _write_sidecar(p, [digest])
    return digest


def replace_with_digest(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> str:
    """``os.replace(tmp, path)`` with the digest kept in step: the sidecar names the old and the
    new content while the rename happens, then the new one alone. Returns the new digest."""
    tmp_p, p = Path(tmp), Path(path)
    new = file_sha256(tmp_p)
    # a file from before digests were kept has no sidecar: its own digest stands for the old one
    old = (recorded_digests(p) or [file_sha256(p)]) if p.is_file() else []
    _write_sidecar(p, [new, *old])
    os.replace(tmp_p, p)
    _write_sidecar(p, [new])
    return new


def recorded_digests(path: str | os.PathLike[str]) -> list[str]:
    """The digests a sidecar lists ([] when there is none or it is unreadable)."""
    side = digest_path(path)
    try:
        text = side.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError):
        return []
    out = [line.split()[0].lower() for line in text.splitlines() if line.split()]
    return [d for d in out if len(d) == 64 and all(c in "0123456789abcdef" for c in d)]


def verify_file(path: str | os.PathLike[str], what: str = "file") -> bool:
    """Check ``path`` against its sidecar before it is read. Returns True when verified, False
    for a file without a sidecar (written before digests were kept: noted once). A missing file,
    a mismatch or a sidecar that lists no digest is an `IntegrityError` naming the file."""
    p = Path(path)
    if not p.is_file():
        raise IntegrityError(f"{what} {str(p)!r} is missing")
    side = digest_path(p)
    if not side.exists():
        key = str(p.resolve())
        if key not in _noted:
            _noted.add(key)
            on_note(f"{what} {str(p)!r} has no recorded SHA-256 (written before nas-run kept digests); read unverified")
        return False
    wanted = recorded_digests(p)
    if not wanted:
        raise IntegrityError(f"{what} {str(p)!r}: its digest file {side.name!r} is unreadable or empty")
    if file_sha256(p) not in wanted:
        raise IntegrityError(
            f"{what} {str(p)!r} does not match its recorded SHA-256 ({side.name}): truncated or modified "
            f"after it was written; nothing was read"
        )
    return True
