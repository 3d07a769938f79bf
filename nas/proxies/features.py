"""`ProxyFeatures`: genotype -> proxy vector for a search run's strategy, cached and paid for.

Builds the genotype's model as training would (`evaluator.build`, seeded), takes one fixed
mini-batch of the run's training split (same rows for every genotype), computes the proxies
and keeps them in a `ProxyCache`. Values are raw (each proxy on its own scale, NaN = missing):
the strategy standardises each fit's rows together (`selection.standardise`), since z-scoring a
genotype's vector by the statistics of the moment would give one genotype different features
at different asks.

Cost: every computation is timed (model build included). `budget_allows` refuses a pass (a
set of genotypes whose proxies are wanted now) whose new computations would cost more than
``max_fraction`` of one training, and says so in one line, once per kind of pass. One training
is ``training_seconds`` when the driver knows it (set it from the first trial's duration), else
an estimate: one measured forward/backward step at the recipe's batch size x steps per epoch x
``epochs`` x folds, on the proxies' device (the trials may train elsewhere, faster).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from search_spaces import Genotype

from .cache import ProxyCache
from .compute import DEFAULT_PROXIES, ProxyResult, compute_proxies

__all__ = ["DEFAULT_RANK_PROXIES", "ProxyFeatures"]

_log = logging.getLogger("nas.proxies")

# What the rank mix (pre-screen, initial design, warm-up) averages by default; every proxy
# computed is a surrogate feature either way. Chosen on NAS-Bench-201 (results/proxies_nb201.md).
DEFAULT_RANK_PROXIES: tuple[str, ...] = ("synflow", "naswot", "jacob_cov")


class ProxyFeatures:
    """Callable ``genotype -> np.ndarray`` of the ``names`` proxies (NaN = missing)."""

    def __init__(
        self,
        evaluator: Any,
        cache: ProxyCache | str | Path | None = None,
        names: Iterable[str] = DEFAULT_PROXIES,
        rank_names: Iterable[str] | None = DEFAULT_RANK_PROXIES,
        batch_size: int = 32,
        seed: int = 0,
        time_budget_s: float | None = 10.0,
        device: str = "cpu",
        max_fraction: float = 0.1,
        epochs: int = 1,
        training_seconds: float | None = None,
        notify: Callable[[str], None] | None = None,
    ):
        self.evaluator = evaluator
        self.names = tuple(names)
        ranked = [n for n in (rank_names or self.names) if n in self.names]
        # the columns the rank mix averages: the asked ones that are computed, else all
        self.rank_columns = tuple(self.names.index(n) for n in ranked) or tuple(range(len(self.names)))
        self.batch_size, self.seed, self.time_budget_s, self.device = batch_size, seed, time_budget_s, device
        if not max_fraction > 0:  # also refuses NaN
            raise ValueError(f"max_fraction must be > 0, got {max_fraction}")
        self.max_fraction, self.epochs, self.training_seconds = max_fraction, epochs, training_seconds
        self.notify = notify
        settings = {
            "names": list(self.names), "batch_size": batch_size, "seed": seed, "device": device,
            "time_budget_s": time_budget_s, "space": getattr(evaluator, "space", None),
            "space_options": dict(getattr(evaluator, "space_options", {}) or {}),
            "dataset": getattr(evaluator, "dataset", None), "data_seed": getattr(evaluator, "data_seed", None),
        }  # fmt: skip
        self.cache = cache if isinstance(cache, ProxyCache) else ProxyCache(cache, settings)
        self.computed, self.hits = 0, 0
        self.seconds: list[float] = []  # per genotype computed here, model build included
        self.skipped: dict[str, int] = {}  # passes refused for their cost, by kind
        self._batch: tuple[np.ndarray, np.ndarray] | None = None
        self._training_estimate: float | None = None

    # -- values ---------------------------------------------------------------------------------
    def __call__(self, genotype: Genotype) -> np.ndarray:
        return self.result(genotype).vector(self.names)

    def result(self, genotype: Genotype) -> ProxyResult:
        key = genotype.id
        cached = self.cache.get(key)
        if cached is not None:
            self.hits += 1
            return cached
        start = time.perf_counter()
        try:
            model = self._build(genotype)
        except Exception as exc:  # noqa: BLE001 - a genotype that does not build has no proxies
            reason = f"failed: build: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            result = ProxyResult({n: None for n in self.names}, {n: 0.0 for n in self.names},
                                 {n: reason for n in self.names})  # fmt: skip
        else:
            x, y = self.batch()
            result = compute_proxies(model, x, y, self.names, self.seed, self.time_budget_s, self.device)
        self.seconds.append(time.perf_counter() - start)
        self.computed += 1
        self.cache.put(key, result)
        return result

    def batch(self) -> tuple[np.ndarray, np.ndarray]:
        """The fixed mini-batch: ``batch_size`` training rows drawn with ``seed``."""
        if self._batch is None:
            data = self.evaluator.data()
            n = len(data.y_train)
            rows = np.sort(np.random.default_rng(self.seed).choice(n, size=min(self.batch_size, n), replace=False))
            self._batch = (np.asarray(data.x_train[rows], dtype=np.float32), np.asarray(data.y_train[rows]))
        return self._batch

    def _build(self, genotype: Genotype) -> Any:
        import torch

        torch.manual_seed(self.seed)  # the weights training would start from (TrainingEvaluator.trainer)
        return self.evaluator.build(genotype)

    # -- cost -------------------------------------------------------------------------------------
    def seconds_per_candidate(self) -> float | None:
        """Mean seconds of one genotype's proxies: measured here, else as the cache recorded them."""
        if self.seconds:
            return float(np.mean(self.seconds))
        recorded = [r.total_seconds for r in self.cache.results()]
        return float(np.mean(recorded)) if recorded else None

    def training_seconds_estimate(self, genotypes: Sequence[Genotype]) -> float:
        """One training's seconds: as set, else measured on the first of ``genotypes`` that
        trains a step; inf (no pass refused) when none does, e.g. every one fails to build."""
        if self.training_seconds is not None:
            return float(self.training_seconds)
        if self._training_estimate is None:
            for g in genotypes:
                try:
                    self._training_estimate = self._measure_training(g)
                    break
                except Exception:  # noqa: BLE001 - a genotype that cannot train says nothing of the others
                    continue
        return math.inf if self._training_estimate is None else self._training_estimate

    def _measure_training(self, genotype: Genotype) -> float:
        """Steps of one training x the seconds of one forward/backward step (the second of two:
        the first pays for allocation)."""
        import torch

        from ..trainer import capped_batch_size
        from .model_parts import logits_of, task_loss

        data = self.evaluator.data()
        n_train = len(data.y_train)
        batch = capped_batch_size(self.evaluator.training_recipe().batch_size, n_train)
        rows = np.arange(min(batch, n_train))
        x = torch.as_tensor(np.asarray(data.x_train[rows], dtype=np.float32)).to(self.device)
        y = torch.as_tensor(np.asarray(data.y_train[rows])).to(self.device)
        model = self._build(genotype).to(self.device).train()
        step = math.inf
        for _ in range(2):
            start = time.perf_counter()
            task_loss(logits_of(model(x)), y).backward()
            step = time.perf_counter() - start
        folds = int(getattr(self.evaluator, "cv", 1) or 1)
        return step * math.ceil(n_train / batch) * max(1, self.epochs) * folds

    def budget_allows(self, genotypes: Sequence[Genotype], what: str) -> bool:
        """Whether the proxies of ``genotypes`` not cached yet cost at most ``max_fraction`` of one
        training; if not, says so once for this kind of pass (``what``) and counts the skip.
        With no cost measured yet, the first new genotype is computed to measure it."""
        new = list({g.id: g for g in genotypes if g.id not in self.cache}.values())
        if not new:
            return True
        per = self.seconds_per_candidate()
        if per is None:
            self.result(new.pop(0))
            per = self.seconds_per_candidate() or 0.0
        cost = len(new) * per
        train = self.training_seconds_estimate(genotypes)
        if cost <= self.max_fraction * train:
            return True
        if what not in self.skipped:
            self._say(
                f"proxies: {what} skipped: {len(new)} new candidates x {per:.2f} s = {cost:.1f} s, more than "
                f"{self.max_fraction:g} of one training ({train:.1f} s)"
            )
        self.skipped[what] = self.skipped.get(what, 0) + 1
        return False

    def cost_report(self) -> dict[str, Any]:
        """What the proxies cost this process: for the strategy's state and the run's report."""
        per_proxy: dict[str, list[float]] = {}
        for r in self.cache.results():
            for name, s in r.seconds.items():
                per_proxy.setdefault(name, []).append(s)
        return {
            "computed": self.computed,
            "cache_hits": self.hits,
            "seconds_per_candidate": self.seconds_per_candidate(),
            "seconds_per_proxy": {k: float(np.mean(v)) for k, v in per_proxy.items()},
            "training_seconds": self.training_seconds if self.training_seconds is not None else self._training_estimate,
            "skipped_passes": dict(self.skipped),
        }

    def _say(self, line: str) -> None:
        (self.notify or _log.warning)(line)
