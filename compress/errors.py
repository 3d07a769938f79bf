"""Errors of the compression half. `PolicyError` is a user error: the CLI prints one line, exit 2."""

from __future__ import annotations

from search_spaces.errors import ConfigError

__all__ = ["PolicyError"]


class PolicyError(ConfigError):
    """A policy that cannot be applied as written: an unknown pass or setting, a layer name the
    model does not have, a setting the runtime refuses. The message names the offending value."""
