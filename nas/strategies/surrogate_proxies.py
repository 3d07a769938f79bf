"""Zero-cost proxies as free evidence for `SurrogateGuided` (issue #23), each piece switched on
by its own option and off by default, so a run without them is the run it always was (nothing
here draws from the strategy's random generator or calls ``proxies_fn`` while they are off).

* ``proxy_features``: the proxies of the shortlist and of every observed genotype join the
  rescoring model's features (standardised within the fit, `nas.proxies.standardise`), as the
  model statistics do; like them, only for the shortlist, since each costs a model build.
* ``proxy_prescreen`` = k: a candidate pool larger than k keeps its k best by the proxies' rank
  mix before the surrogate scores it.
* ``proxy_design`` = pool size: the random initial design is replaced by one drawn from that
  many random genotypes: their top quartile by rank mix, spread by farthest-point sampling of
  the encodings (diverse, not only the proxies' favourites, which crowd one region).

``proxies_fn`` (`nas.proxies.ProxyFeatures` in a run) maps a genotype to its proxy vector; a
pass whose cost it refuses (`ProxyFeatures.budget_allows`) is skipped and counted in the state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from search_spaces import Genotype

__all__ = ["ProxyEvidence"]


class ProxyEvidence:
    """Mixin for `SurrogateGuided`: the proxy options, their passes and their state."""

    space: Any
    rng: np.random.Generator
    asked: list[str]
    n_init: int
    initial: list[str]

    def _init_proxies(
        self,
        proxies_fn: Callable[[Genotype], Any] | None,
        proxy_features: bool,
        proxy_prescreen: int,
        proxy_design: int,
    ) -> None:
        if min(proxy_prescreen, proxy_design) < 0:
            raise ValueError(f"need proxy_prescreen, proxy_design >= 0 (0: off); got {proxy_prescreen}, {proxy_design}")
        if (proxy_features or proxy_prescreen or proxy_design) and proxies_fn is None:
            raise ValueError("proxy_features, proxy_prescreen and proxy_design need proxies_fn (genotype -> "
                             "proxy vector, e.g. nas.proxies.ProxyFeatures)")  # fmt: skip
        self.proxies_fn = proxies_fn
        self.proxy_features, self.proxy_prescreen, self.proxy_design = proxy_features, proxy_prescreen, proxy_design
        self._design: list[str] | None = None  # chosen at the first design ask, then kept in the state
        self._proxy_skipped: dict[str, int] = {}
        self._proxies_in_fit = False  # this ask's rescoring fit has proxy columns

    def _allows(self, genotypes: list[Genotype], what: str) -> bool:
        from ..proxies.selection import budget_allows

        if budget_allows(self.proxies_fn, genotypes, what):
            return True
        self._proxy_skipped[what] = self._proxy_skipped.get(what, 0) + 1
        return False

    def _rank_scores(self, genotypes: list[Genotype]) -> np.ndarray:
        from ..proxies.selection import proxy_matrix, rank_columns, rank_mix

        matrix = proxy_matrix(self.proxies_fn, genotypes)
        return rank_mix(matrix, rank_columns(self.proxies_fn, matrix.shape[1]))

    # -- initial design -----------------------------------------------------------------------
    def _proxy_design_point(self) -> Genotype | None:
        """The next design point not asked yet; None when off, done, or refused for its cost."""
        if not self.proxy_design:
            return None
        if self._design is None:
            self._design = self._choose_design()
        asked = set(self.asked)
        for key in self._design:
            if key not in asked:
                return self.space.from_str(key)
        return None

    def _choose_design(self) -> list[str]:
        from ..proxies.selection import diverse_subset, standardise

        need = max(0, self.n_init - len(self.initial))
        asked = set(self.asked)
        pool: dict[str, Genotype] = {}
        for _ in range(20 * self.proxy_design):
            if len(pool) >= self.proxy_design:
                break
            g = self.space.sample(self.rng)
            if g.to_str() not in asked:
                pool.setdefault(g.to_str(), g)
        genotypes = list(pool.values())
        if not need or not genotypes or not self._allows(genotypes, "initial design"):
            return []
        order = np.argsort(-self._rank_scores(genotypes), kind="stable")
        top = [genotypes[int(i)] for i in order[: max(need, math.ceil(len(genotypes) / 4))]]
        # distances on standardised columns: an encoding's count features (NB201's parameter
        # proxy spans 0-54) would otherwise outweigh its one-hots and spread the design by size only
        (encodings,) = standardise(np.stack([self.space.encode(g) for g in top]))
        picked = diverse_subset(encodings, need)
        return [top[i].to_str() for i in picked]

    # -- pre-screen ------------------------------------------------------------------------------
    def _prescreened(self, cands: list[Genotype]) -> list[Genotype]:
        if not self.proxy_prescreen or len(cands) <= self.proxy_prescreen:
            return cands
        if not self._allows(cands, "pre-screen"):
            return cands
        order = np.argsort(-self._rank_scores(cands), kind="stable")
        return [cands[int(i)] for i in order[: self.proxy_prescreen]]

    # -- features --------------------------------------------------------------------------------
    def _proxy_features_for(self, train: list[Genotype], cands: list[Genotype]) -> bool:
        """Whether this fit adds proxy columns (on, and its new computations affordable)."""
        self._proxies_in_fit = bool(self.proxy_features) and self._allows(train + cands, "surrogate features")
        return self._proxies_in_fit

    def _with_proxies(
        self, train: list[Genotype], cands: list[Genotype], X_train: np.ndarray, X: np.ndarray, with_stats: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        if not (with_stats and self._proxies_in_fit):
            return X_train, X
        from ..proxies.selection import proxy_matrix, standardise

        P = proxy_matrix(self.proxies_fn, cands)
        if train:
            P_train, P = standardise(proxy_matrix(self.proxies_fn, train), P)
        else:  # nothing observed yet: the candidates' own scale
            (P,) = standardise(P)
            P_train = np.zeros((0, P.shape[1]), dtype=np.float32)
        return np.hstack([X_train, P_train]), np.hstack([X, P])

    # -- state -----------------------------------------------------------------------------------
    def _proxy_state(self) -> dict[str, Any]:
        report = getattr(self.proxies_fn, "cost_report", None)
        return {"proxies": {
            "features": bool(self.proxy_features), "prescreen": self.proxy_prescreen, "design": self.proxy_design,
            "design_points": self._design, "skipped_passes": dict(self._proxy_skipped),
            **({"cost": report()} if callable(report) else {}),
        }}  # fmt: skip

    def _load_proxy_state(self, state: dict[str, Any]) -> None:
        saved = state.get("proxies") or {}  # absent in states saved before proxies existed
        self._design = saved.get("design_points")
        self._proxy_skipped = dict(saved.get("skipped_passes") or {})
