"""Zero-cost proxies: scores of an untrained network from one mini-batch, as free evidence for
the search (features of the surrogate, a pre-screen of its candidate pool, its initial design,
a warm-up for evolution and random search).

- `compute_proxies(model, x, y, ...)`: synflow, snip, grad_norm, fisher, naswot, jacob_cov,
  zen, log_params, log_flops of any torch model; failures recorded, never fatal.
- `ProxyCache`: the values of a run by genotype id, in ``proxies.json`` beside the run's store,
  so a resumed run computes none twice.
- `ProxyFeatures(evaluator, ...)`: genotype -> proxy vector for the surrogate strategy, with its
  cost counted against a fraction of one training.
- `rank_mix`, `proxy_warmup`, `diverse_subset`: ranking genotypes by their proxies.
"""

from .cache import CACHE_FILE, ProxyCache
from .compute import (
    ALL_PROXIES,
    DEFAULT_PROXIES,
    ProxyResult,
    ProxyTimeout,
    UnsupportedProxy,
    compute_proxies,
)
from .features import DEFAULT_RANK_PROXIES, ProxyFeatures
from .selection import diverse_subset, proxy_matrix, proxy_warmup, rank_mix, standardise

__all__ = [
    "ALL_PROXIES",
    "CACHE_FILE",
    "DEFAULT_PROXIES",
    "DEFAULT_RANK_PROXIES",
    "ProxyCache",
    "ProxyFeatures",
    "ProxyResult",
    "ProxyTimeout",
    "UnsupportedProxy",
    "compute_proxies",
    "diverse_subset",
    "proxy_matrix",
    "proxy_warmup",
    "rank_mix",
    "standardise",
]
