"""Ranking genotypes by their proxies, and what a strategy needs from a proxy source.

A proxy source is any callable ``genotype -> vector`` of proxy values (NaN = missing), e.g.
`ProxyFeatures`. Two optional attributes refine it: ``rank_columns`` (the columns the rank mix
uses; default all) and ``budget_allows(genotypes, what) -> bool`` (whether computing the
proxies of these genotypes now is worth its cost; default yes). Plain functions work too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from search_spaces import Genotype, SearchSpace

__all__ = [
    "budget_allows",
    "diverse_subset",
    "proxy_matrix",
    "proxy_warmup",
    "rank_mix",
    "standardise",
]

ProxySource = Callable[[Genotype], Any]


def proxy_matrix(source: ProxySource, genotypes: Sequence[Genotype]) -> np.ndarray:
    """(n, n_proxies) float64, NaN where a proxy is missing."""
    rows = [np.asarray(source(g), dtype=np.float64).ravel() for g in genotypes]
    if not rows:
        return np.zeros((0, 0))
    return np.stack(rows)


def budget_allows(source: ProxySource, genotypes: Sequence[Genotype], what: str) -> bool:
    check = getattr(source, "budget_allows", None)
    return True if check is None else bool(check(genotypes, what))


def rank_columns(source: ProxySource, width: int) -> list[int]:
    cols = getattr(source, "rank_columns", None)
    return list(range(width)) if cols is None else list(cols)


def rank_mix(matrix: np.ndarray, columns: Sequence[int] | None = None) -> np.ndarray:
    """Mean over proxy columns of each row's rank, scaled to [0, 1] (1 = highest value = best;
    every proxy here is higher-is-better). A missing value ranks below every present one (a
    proxy fails on degenerate networks, e.g. one whose output ignores its input); a column
    missing everywhere is left out. Ties share their mean rank. Rank, not value: proxies live on
    unrelated scales, and a mean of ranks is the "voting" of Abdelfattah et al. (2021) made
    continuous."""
    from scipy.stats import rankdata

    m = np.asarray(matrix, dtype=np.float64)
    n = len(m)
    if n == 0:
        return np.zeros(0)
    cols = range(m.shape[1]) if columns is None else columns
    ranks = []
    for c in cols:
        col = m[:, c]
        if np.isnan(col).all():
            continue
        filled = np.where(np.isnan(col), -np.inf, col)  # missing: below everything present
        ranks.append((rankdata(filled) - 1.0) / max(1, n - 1))
    return np.mean(ranks, axis=0) if ranks else np.full(n, 0.5)


def standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Each column z-scored by the mean and std of ``train``'s present values (the run's own
    scale: a proxy's units differ between spaces and data sets); the same map for ``others``,
    so every row of one fit sees one transform. NaN stays NaN; a constant column becomes 0."""
    with np.errstate(all="ignore"):
        mean = np.nanmean(train, axis=0) if len(train) else np.zeros(train.shape[1])
        std = np.nanstd(train, axis=0) if len(train) else np.ones(train.shape[1])
    mean = np.where(np.isfinite(mean), mean, 0.0)
    std = np.where(np.isfinite(std) & (std > 0), std, 1.0)
    return [((a - mean) / std).astype(np.float32) for a in (train, *others)]


def diverse_subset(encodings: np.ndarray, k: int) -> list[int]:
    """``k`` row indices chosen greedily by farthest-point sampling (Gonzalez 1985): row 0 first
    (pass rows best-first), then repeatedly the row farthest (Euclidean) from those chosen, ties
    to the earlier (better) row. Spreads an initial design over the space instead of crowding it
    around the proxies' favourite."""
    X = np.asarray(encodings, dtype=np.float64)
    k = min(k, len(X))
    if k <= 0:
        return []
    chosen = [0]
    dist = np.linalg.norm(X - X[0], axis=1)
    while len(chosen) < k:
        dist[chosen] = -1.0  # never twice, even among duplicates (all at distance 0)
        nxt = int(np.argmax(dist))  # first maximum: the better-ranked of equally far rows
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(X - X[nxt], axis=1))
    return chosen


def proxy_warmup(space: SearchSpace, proxies_fn: ProxySource, n: int, rng: np.random.Generator) -> list[Genotype]:
    """``n`` random distinct genotypes of ``space``, best first by the rank mix of their proxies:
    the order a strategy (evolution, random) can ask them in, or take the head of, before its
    own proposals. Fewer than ``n`` only when the space holds fewer distinct genotypes."""
    pool: dict[str, Genotype] = {}
    for _ in range(20 * n):
        if len(pool) >= n:
            break
        g = space.sample(rng)
        pool.setdefault(g.to_str(), g)
    genotypes = list(pool.values())
    if not genotypes:
        return []
    matrix = proxy_matrix(proxies_fn, genotypes)
    scores = rank_mix(matrix, rank_columns(proxies_fn, matrix.shape[1]))
    return [genotypes[int(i)] for i in np.argsort(-scores, kind="stable")]
