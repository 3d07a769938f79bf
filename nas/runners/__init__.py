"""Runners: execute a search's evaluations (in-process, or as Ray Tune trials).

`run_ray` lives in `nas.runners.ray_tune`, imported only when a run asks for Ray.
"""

from .local import run_local

__all__ = ["run_local"]
