"""XGBoost-surrogate-guided search: the toolkit's flagship strategy.

After ``n_init`` random trials, every ask (1) fits one `XGBSurrogate` ensemble per objective on
the finished trials' space encodings, (2) draws a pool of candidates — mostly mutants (1–2
steps) of the current best members, the rest uniform samples — and (3) returns the candidate
with the lowest lower-confidence bound ``mean - kappa * std`` (std across the ensemble). With a
``stats_fn`` (cheap model statistics: parameters, FLOPs of the built model), the best
``shortlist`` candidates are rescored by models fitted on encoding + statistics.

Several objectives: each ask scalarises the normalised predictions with a random weight vector
by the augmented Chebyshev function (ParEGO, Knowles 2006), so successive asks cover the front.
Constraints: when a violation has been observed, a further model predicts it and candidates
predicted infeasible are ranked after the feasible ones.

Failures (trials that crashed, ran out of memory or were rejected before training): the first
``n_init`` asks are random whether they fail or not, and once some trials have failed and some
have run, a feasibility model (the same XGBoost ensemble, fitted to 1 = ran, 0 = failed on every
trial's encoding) gates the pool: only candidates with a predicted chance of running of at
least ``min_feasible`` (or, if none reaches it, the most likely one) are scored, in the spirit of
the probability-of-feasibility factor of constrained Bayesian optimisation (Gardner et al.
2014), as a gate rather than a product since the acquisition is a lower bound, not an
improvement. With ``stats_fn`` the shortlist is gated again with the model statistics, which
predict running out of memory well.

Initial design (``initial``): genotype strings asked first, in order, before the random starts
(they count toward ``n_init``) — points a user would try by hand, e.g. the uniform policies of a
per-layer pruning search (`PolicySpace.uniform_points`), so the surrogate's result is never worse
than them on the data it saw and its random starts are spent on the rest of the space.

Variants (``variants``): a function from a candidate to the candidates that share its costly
part, e.g. every compression policy of one architecture in a joint search (`compress.joint`).
The shortlist's candidates are then rescored with all their variants, so a candidate drawn with
an unlucky cheap part is judged by its best one: a joint pool's pairs carry a random policy, and
ranking an architecture by that policy alone chose architectures for the policy they happened
to be drawn with.

Initial design by key (``design_key``): the random starts last until the history holds
``n_init`` distinct keys rather than ``n_init`` trials — in a joint search the architectures,
whose several policies each are trials of their own.

Transfer (``prior``): observations of *another* search — ``[[encoding, losses or None,
violation], ...]`` with encodings of this space's width, e.g. a policy search of another model,
whose `PolicySpace.encode` carries model features — join every fit, their losses min-max
normalised on their own (another model's latencies have another scale), as Quantune reuses the
XGBoost data of models tuned before. They never count as this run's evaluations.

Zero-cost proxies (``proxies_fn`` with ``proxy_features``, ``proxy_prescreen``, ``proxy_design``;
all off by default): proxy features on the shortlist, a proxy pre-screen of large pools, and an
initial design drawn from proxy-ranked candidates; see `surrogate_proxies` (issue #23).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from search_spaces import Genotype, SearchSpace

from .base import Strategy, constrained_order, register_strategy
from .surrogate_proxies import ProxyEvidence

__all__ = ["SurrogateGuided"]


@register_strategy
class SurrogateGuided(ProxyEvidence, Strategy):
    name = "surrogate"
    description = "XGBoost surrogate ranks sampled + mutated candidates (LCB acquisition, ParEGO for MO)"

    def __init__(
        self,
        space: SearchSpace,
        n_objectives: int = 1,
        seed: int = 0,
        n_init: int = 10,
        pool: int = 1000,
        mutant_fraction: float = 0.7,
        n_parents: int = 5,
        kappa: float = 1.0,
        stats_fn: Callable[[Genotype], np.ndarray] | None = None,
        shortlist: int = 24,
        surrogate: dict[str, Any] | None = None,
        min_feasible: float = 0.5,
        prior: list | None = None,
        initial: list | None = None,
        variants: Callable[[Genotype], list[Genotype]] | None = None,
        design_key: Callable[[Genotype], str] | None = None,
        trial_features: Callable[[Genotype], np.ndarray] | None = None,
        proxies_fn: Callable[[Genotype], np.ndarray] | None = None,
        proxy_features: bool = False,
        proxy_prescreen: int = 0,
        proxy_design: int = 0,
    ):
        super().__init__(space, n_objectives, seed)
        if isinstance(initial, str):
            raise ValueError(f"initial must be a list of genotype strings, got {initial!r} "
                             "('uniform' is for compression policy searches)")
        try:  # parsed now: a bad point is a config error at start, not at ask 3
            self.initial = [space.validate(space.from_str(str(k))).to_str() for k in initial or []]
        except Exception as exc:  # noqa: BLE001 - any parse/validation error names the point
            raise ValueError(f"initial: {exc}") from None
        self._prior = _prior_arrays(prior or [], space.encoding_size, n_objectives)
        if len(self._prior[0]) and trial_features is not None:  # another search's points lack them
            raise ValueError("prior and trial_features cannot be combined")
        if min(n_init, pool, n_parents, shortlist) < 1 or not 0 <= mutant_fraction <= 1 or kappa < 0:
            raise ValueError(
                "need n_init, pool, n_parents, shortlist >= 1, 0 <= mutant_fraction <= 1 and "
                f"kappa >= 0; got {n_init}, {pool}, {n_parents}, {shortlist}, {mutant_fraction}, {kappa}"
            )
        if not 0 <= min_feasible <= 1:
            raise ValueError(f"need 0 <= min_feasible <= 1, got {min_feasible}")
        self.min_feasible = float(min_feasible)
        self.n_init, self.pool, self.mutant_fraction = n_init, pool, mutant_fraction
        self.n_parents, self.kappa = n_parents, kappa
        self.stats_fn = stats_fn
        self.surrogate_params = dict(surrogate or {})
        self.shortlist = shortlist
        self.variants = variants
        self.design_key = design_key
        self.trial_features = trial_features
        self._features: dict[str, np.ndarray] = {}  # caches by genotype string
        self._stats: dict[str, np.ndarray] = {}
        self._init_proxies(proxies_fn, proxy_features, proxy_prescreen, proxy_design)

    # -- features ------------------------------------------------------------------------------
    def features(self, g: Genotype, with_stats: bool = False) -> np.ndarray:
        """The space's encoding, plus the cheap model statistics when asked (and available), plus
        how the trial is (or would be) trained when ``trial_features`` says (weight inheritance:
        `nas.inherit.Lineage.features`; not cached, a candidate's parent changes as trials finish)."""
        key = g.to_str()
        if key not in self._features:
            self._features[key] = self.space.encode(g)
        out = self._features[key]
        if with_stats and self.stats_fn is not None:
            if key not in self._stats:
                self._stats[key] = np.asarray(self.stats_fn(g), dtype=np.float32).ravel()
            out = np.concatenate([out, self._stats[key]])
        if self.trial_features is not None:
            out = np.concatenate([out, np.asarray(self.trial_features(g), dtype=np.float32).ravel()])
        return out

    def _encoded(self, key: str) -> np.ndarray:
        """Encoding by genotype string; parses only strings not seen before (hot path)."""
        if key not in self._features:
            self._features[key] = self.space.encode(self.space.from_str(key))
        return self._features[key]

    def _fit(self, X: np.ndarray, y: np.ndarray) -> Any:
        from ..surrogate import XGBSurrogate

        # small, fast ensembles: refitted at every ask, so ~0.1 s per fit matters more than the
        # last 0.01 of Kendall tau (bench/surrogate_nb201.py measures the full-size model)
        params = {"n_models": 3, "n_estimators": 120, "n_jobs": 1, **self.surrogate_params}
        params["seed"] = int(self.rng.integers(2**31))
        return XGBSurrogate(**params).fit(X, y)

    # -- proposal --------------------------------------------------------------------------------
    def _candidates(self, parents: list[Genotype]) -> list[Genotype]:
        seen = set(self.asked)
        out: dict[str, Genotype] = {}
        n_mut = int(self.pool * self.mutant_fraction) if parents else 0
        for i in range(n_mut):
            child = parents[i % len(parents)]
            for _ in range(1 + int(self.rng.random() < 0.3)):  # mostly 1 step, sometimes 2
                child = self.space.mutate(child, self.rng)
            out.setdefault(child.to_str(), child)
        for _ in range(self.pool - n_mut):
            g = self.space.sample(self.rng)
            out.setdefault(g.to_str(), g)
        # Skip genotypes already asked, and those whose encoding equals an asked one's: spaces
        # may encode equivalent architectures alike (NB201 merges isomorphic cells), and the
        # surrogate cannot learn anything from evaluating the same function twice.
        seen_codes = {self._encoded(k).tobytes() for k in seen}
        fresh = [g for k, g in out.items() if k not in seen and self._encoded(k).tobytes() not in seen_codes]
        return fresh or [g for k, g in out.items() if k not in seen] or list(out.values())

    def _propose(self) -> Genotype:
        if self.initial:  # `asked` is state, so a resumed run skips the ones done
            asked = set(self.asked)
            for key in self.initial:
                if key not in asked:
                    return self.space.from_str(key)
        if self._in_initial_design():
            point = self._proxy_design_point()  # None unless proxy_design is on
            return point if point is not None else self.space.sample(self.rng)
        done = self.finished()
        norm, violation, weights = self._normalised(done)
        parents: list[Genotype] = []
        if done:  # the best under this ask's weights (single objective: simply the best)
            order = constrained_order(norm, violation, weights=weights)
            parents = [done[int(i)][0] for i in order[: self.n_parents]]

        cands, p_run = self._feasible(self._candidates(parents), with_stats=False)
        if len(done) + int(self._prior[2].sum()) < 2:  # no loss model yet: the candidate most likely to run
            return cands[int(np.argmax(p_run))] if p_run is not None else cands[0]
        cands = self._prescreened(cands)  # unchanged unless proxy_prescreen is on
        score = self._score(done, cands, norm, violation, weights, with_stats=False)
        if self.stats_fn is not None or self.variants is not None or self.proxy_features:
            # Model statistics cost a model build each (10-100 ms), and variants multiply the
            # candidates, too much for the whole pool: only the shortlist the encoding-only
            # surrogate likes best is rescored (with its variants).
            top = self._with_variants([cands[int(i)] for i in np.argsort(score, kind="stable")[: self.shortlist]])
            stats = self.stats_fn is not None
            # proxy features are rescoring features too (a model build each, as the statistics)
            stats = self._proxy_features_for([g for g, _, _ in self.history], top) or stats
            cands, _ = self._feasible(top, with_stats=stats)
            score = self._score(done, cands, norm, violation, weights, with_stats=stats)
        return cands[int(np.argmin(score))]

    def _in_initial_design(self) -> bool:
        """Fewer than ``n_init`` trials told (failed ones count: they are data too), or with a
        ``design_key``, fewer than ``n_init`` distinct keys (a joint run's architectures)."""
        if self.design_key is None:
            return len(self.history) < self.n_init
        return len({self.design_key(g) for g, _, _ in self.history}) < self.n_init

    def _with_variants(self, cands: list[Genotype]) -> list[Genotype]:
        """The candidates and their variants not asked yet, each once, in order."""
        if self.variants is None:
            return cands
        seen = set(self.asked)
        out: dict[str, Genotype] = {}
        for g in cands:
            out.setdefault(g.to_str(), g)
            for v in self.variants(g):
                key = v.to_str()
                if key not in seen:
                    out.setdefault(key, v)
        return list(out.values())

    def _normalised(self, done: list[tuple[Genotype, tuple[float, ...], float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Min-max normalised losses of the finished trials, their violations, and this ask's
        random ParEGO weights (one objective: weight 1)."""
        losses = np.array([y for _, y, _ in done], dtype=np.float64).reshape(len(done), self.n_objectives)
        violation = np.array([v for _, _, v in done], dtype=np.float64)
        m = self.n_objectives
        weights = self.rng.dirichlet(np.ones(m)) if m > 1 else np.ones(1)
        norm = np.zeros_like(losses)
        if done:
            lo, hi = losses.min(0), losses.max(0)
            norm = (losses - lo) / np.where(hi > lo, hi - lo, 1.0)
        return norm, violation, weights

    def rank(self, cands: list[Genotype]) -> list[Genotype]:
        """Given candidates, best first by the acquisition an ask would use (feasibility gate,
        LCB, ParEGO weights drawn now); as given while there is too little data for a model.
        For callers that choose among a fixed set, e.g. which policies to try next on an
        architecture already trained (`compress.joint`)."""
        done = self.finished()
        if len(done) < 2 or not cands:
            return list(cands)
        norm, violation, weights = self._normalised(done)
        stats = self.stats_fn is not None
        stats = self._proxy_features_for([g for g, _, _ in self.history], list(cands)) or stats
        kept, _ = self._feasible(list(cands), with_stats=stats)
        score = self._score(done, kept, norm, violation, weights, with_stats=stats)
        ranked = [kept[int(i)] for i in np.argsort(score, kind="stable")]
        return ranked + [g for g in cands if g not in ranked]  # gated-out ones last

    def _feasible(self, cands: list[Genotype], with_stats: bool) -> tuple[list[Genotype], np.ndarray | None]:
        """The candidates the feasibility model expects to run (at least ``min_feasible``, else
        the most likely ones) and their predicted chances; all of them, and None, while the
        history holds no failure (or nothing that ran) to learn from."""
        ran = np.array([y is not None for _, y, _ in self.history], dtype=np.float64)
        X_train = np.stack([self.features(g, with_stats) for g, _, _ in self.history])
        if not with_stats and len(self._prior[0]):
            X_train = np.vstack([X_train, self._prior[0]])
            ran = np.concatenate([ran, self._prior[2]])
        if ran.all() or not ran.any():
            return cands, None
        X = np.stack([self.features(g, with_stats) for g in cands])
        X_train, X = self._with_proxies([g for g, _, _ in self.history], cands, X_train, X, with_stats)
        p_run = np.clip(self._fit(X_train, ran).predict(X), 0.0, 1.0)
        keep = np.flatnonzero(p_run >= min(self.min_feasible, float(p_run.max())))
        return [cands[int(i)] for i in keep], p_run[keep]

    def _score(
        self,
        done: list[tuple[Genotype, tuple[float, ...], float]],
        cands: list[Genotype],
        norm: np.ndarray,
        violation: np.ndarray,
        weights: np.ndarray,
        with_stats: bool,
    ) -> np.ndarray:
        """Acquisition (lower is better): augmented Chebyshev of the predicted normalised losses
        minus ``kappa`` x the ensemble spread, plus a penalty where a violation is predicted."""
        X_train = np.stack([self.features(g, with_stats) for g, _, _ in done]) if done else (
            np.zeros((0, len(self.features(cands[0], with_stats))), dtype=np.float32))
        X = np.stack([self.features(g, with_stats) for g in cands])
        X_train, X = self._with_proxies([g for g, _, _ in done], cands, X_train, X, with_stats)
        if not with_stats and len(self._prior[0]):  # another search's points, ran ones only
            px, py, pran, pv = self._prior
            X_train = np.vstack([X_train, px[pran > 0]])
            norm = np.vstack([norm, py[pran > 0]])
            violation = np.concatenate([violation, pv[pran > 0]])
        score = np.zeros(len(cands))
        spread = np.zeros(len(cands))
        cheb = np.full(len(cands), -np.inf)
        for j in range(self.n_objectives):
            model = self._fit(X_train, norm[:, j])
            mu, sd = model.predict(X), model.predict_std(X)
            cheb = np.maximum(cheb, weights[j] * mu)
            score += 0.05 * weights[j] * mu  # augmentation term of augmented Chebyshev
            spread += weights[j] * sd
        score += cheb - self.kappa * spread
        if (violation > 0).any():
            pred_violation = self._fit(X_train, violation).predict(X)
            score += np.where(pred_violation > 1e-3, 1e6 + pred_violation, 0.0)
        return score

    def _extra_state(self) -> dict[str, Any]:  # the prior comes back from the options
        # the models are refitted from the history at each ask; only the proxies' settings and
        # their chosen initial design are kept
        return self._proxy_state()

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self._load_proxy_state(state)


def _prior_arrays(prior: list, width: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(X, normalised losses, ran 0/1, violation) of another search's observations."""
    if not isinstance(prior, list | tuple):
        raise ValueError(f"prior is a list of [encoding, losses or None, violation], got {type(prior).__name__}")
    X = np.zeros((len(prior), width), dtype=np.float32)
    y = np.zeros((len(prior), m))
    ran = np.zeros(len(prior))
    v = np.zeros(len(prior))
    for i, item in enumerate(prior):
        enc, losses, viol = item
        enc = np.asarray(enc, dtype=np.float32).ravel()
        if enc.shape != (width,):
            raise ValueError(f"prior point {i} has {enc.size} features, this space encodes {width}")
        X[i], v[i] = enc, float(viol)
        if losses is not None:
            if len(losses) != m:
                raise ValueError(f"prior point {i} has {len(losses)} losses, expected {m}")
            y[i], ran[i] = losses, 1.0
    if ran.any():
        lo, hi = y[ran > 0].min(0), y[ran > 0].max(0)
        y = (y - lo) / np.where(hi > lo, hi - lo, 1.0)
    return X, y, ran, v
