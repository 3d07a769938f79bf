"""Runners: execute a search's evaluations (in-process, or as Ray Tune trials)."""

__all__: list[str] = []
