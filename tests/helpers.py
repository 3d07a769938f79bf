"""Small helpers several test files share (tests are not a package; pytest puts this folder on
sys.path, so `from helpers import ...` works from any test file here)."""

from __future__ import annotations

import functools
from typing import Any


@functools.lru_cache(maxsize=1)
def digits() -> Any:
    """scikit-learn's digits, split and standardised as a run would (seed 0), loaded once."""
    from nas.data import load_dataset

    return load_dataset("digits", seed=0)


def digits_ctx(seed: int = 0) -> Any:
    from compress.passes.base import PassContext

    return PassContext(digits(), seed=seed)


def train_briefly(model: Any, ctx: Any, epochs: int = 6, lr: float = 3e-3, seed: int = 0) -> Any:
    """A few epochs of Adam on the context's training part: a model with real structure in its
    weights for the quantisation tests, in well under a second. Returns the model in eval mode."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    x, y = (torch.from_numpy(a) for a in ctx.training())
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = order[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()
