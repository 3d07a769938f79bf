"""`ProxyCache`: a run's proxy results by genotype id, kept in a JSON-lines file beside its store.

One line per genotype, appended as it is computed (a pre-screened pool adds hundreds per ask:
rewriting one JSON document each time would cost O(n^2) over a run), flushed at once, so a
killed run loses at most the line being written; a torn last line is ignored on load. The first
line holds the settings the values depend on (proxies, batch, seed, data set): a file made with
other settings is set aside, not mixed in. Not in the Optuna study's attributes: a SQL write per
genotype, on the database a remote run shares, for values that are cheap to recompute.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .compute import ProxyResult

__all__ = ["CACHE_FILE", "ProxyCache"]

CACHE_FILE = "proxies.jsonl"  # in a run folder


class ProxyCache:
    """``get(key)`` / ``put(key, result)`` by genotype id; ``path=None`` keeps it in memory."""

    def __init__(self, path: str | Path | None = None, settings: Mapping[str, Any] | None = None):
        self.path = None if path is None else Path(path)
        self.settings = dict(settings or {})
        self._entries: dict[str, ProxyResult] = {}
        self._started = False  # the settings line is in the file
        if self.path is not None and self.path.is_file():
            self._load(self.path)

    def _load(self, path: Path) -> None:
        lines = path.read_text().splitlines()
        head = _parse(lines[0]) if lines else None
        if head is None or head.get("settings") != json.loads(json.dumps(self.settings)):
            # other proxies or another batch: those values would not compare with new ones
            path.replace(path.with_suffix(".old.jsonl"))
            return
        self._started = True
        for line in lines[1:]:
            entry = _parse(line)
            if entry is not None and "key" in entry:  # a torn last line parses to None
                self._entries[entry["key"]] = ProxyResult.from_json(entry["result"])

    def get(self, key: str) -> ProxyResult | None:
        return self._entries.get(key)

    def put(self, key: str, result: ProxyResult) -> None:
        self._entries[key] = result
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            if not self._started:
                f.write(json.dumps({"settings": self.settings}) + "\n")
                self._started = True
            f.write(json.dumps({"key": key, "result": result.to_json()}) + "\n")
            f.flush()  # the OS has it now: a killed process loses nothing (no fsync: not a ledger)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def results(self) -> list[ProxyResult]:
        return list(self._entries.values())


def _parse(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
