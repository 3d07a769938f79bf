"""User-facing errors. The CLI turns every `NasRunError` into one line and exit code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["NasRunError", "UnknownNameError", "GenotypeError", "DatasetError", "ConfigError"]


class NasRunError(ValueError):
    """Bad input from a user: a message they can act on, never a traceback."""


class UnknownNameError(NasRunError, KeyError):
    """A name (space, op, dataset, strategy, ...) that is not registered."""

    def __init__(self, kind: str, name: object, allowed: Iterable[str]):
        self.kind, self.name, self.allowed = kind, name, sorted(allowed)
        close = difflib.get_close_matches(str(name), self.allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        super().__init__(f"unknown {kind} {name!r}{hint}; valid: {', '.join(self.allowed)}")

    def __str__(self) -> str:  # KeyError would otherwise quote the whole message
        return self.args[0]


class GenotypeError(NasRunError):
    """A genotype string or value that does not belong to its search space."""


class DatasetError(NasRunError):
    """A data set that cannot be used: wrong shapes, bad labels, missing files."""


class ConfigError(NasRunError):
    """A configuration file or flag that does not validate."""
