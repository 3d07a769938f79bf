"""Pareto fronts over n objectives, all minimised (pass losses, see `nas.objectives.losses`)."""

from __future__ import annotations

import numpy as np

__all__ = ["pareto_mask", "nondominated_rank", "crowding_distance", "hypervolume_2d"]


def _dominates(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``out[i, j]`` is True when row i of a dominates row j of b (<= everywhere, < somewhere)."""
    le = (a[:, None, :] <= b[None, :, :]).all(-1)
    lt = (a[:, None, :] < b[None, :, :]).any(-1)
    return le & lt


def pareto_mask(losses: np.ndarray, feasible: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of the non-dominated rows among the feasible ones.

    losses: (n, m) array, lower is better. Infeasible rows are never on the front and do not
    dominate anything (a constraint-violating candidate must not hide a feasible one).
    Duplicated points are all kept: neither dominates the other.
    """
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 2:
        raise ValueError(f"losses must be (n, m), got shape {losses.shape}")
    ok = np.isfinite(losses).all(1)
    if feasible is not None:
        ok &= np.asarray(feasible, dtype=bool)
    mask = np.zeros(len(losses), dtype=bool)
    idx = np.flatnonzero(ok)
    if idx.size:
        pts = losses[idx]
        mask[idx] = ~_dominates(pts, pts).any(0)
    return mask


def nondominated_rank(losses: np.ndarray) -> np.ndarray:
    """Rank of each row by non-dominated sorting (0 = Pareto front); non-finite rows rank last."""
    losses = np.asarray(losses, dtype=np.float64)
    rank = np.full(len(losses), len(losses), dtype=np.int64)
    remaining = np.flatnonzero(np.isfinite(losses).all(1))
    level = 0
    while remaining.size:
        pts = losses[remaining]
        front = ~_dominates(pts, pts).any(0)
        rank[remaining[front]] = level
        remaining = remaining[~front]
        level += 1
    return rank


def crowding_distance(losses: np.ndarray) -> np.ndarray:
    """NSGA-II crowding distance (Deb et al. 2002) within one front: larger = more isolated."""
    losses = np.asarray(losses, dtype=np.float64)
    n, m = losses.shape
    dist = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for j in range(m):
        order = np.argsort(losses[:, j], kind="stable")
        span = losses[order[-1], j] - losses[order[0], j]
        dist[order[0]] = dist[order[-1]] = np.inf
        if span > 0:
            dist[order[1:-1]] += (losses[order[2:], j] - losses[order[:-2], j]) / span
    return dist


def hypervolume_2d(losses: np.ndarray, ref: np.ndarray) -> float:
    """Area dominated by the rows of a (n, 2) loss array and bounded by the point ``ref``
    (rows not strictly better than ``ref`` in both objectives add nothing)."""
    losses = np.asarray(losses, dtype=np.float64).reshape(-1, 2)
    ref = np.asarray(ref, dtype=np.float64)
    pts = losses[(losses < ref).all(1)]
    if len(pts) == 0:
        return 0.0
    pts = pts[np.argsort(pts[:, 0], kind="stable")]
    rights = np.append(pts[1:, 0], ref[0])
    best = np.minimum.accumulate(pts[:, 1])  # lowest second loss among points left of here
    return float(((rights - pts[:, 0]) * (ref[1] - best)).sum())
