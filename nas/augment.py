"""Batch augmentation by modality, on whatever device the batch is on, seeded by a generator.

Whole batches at once (gathers and masks, no per-sample Python loop), so a GPU trial augments on
the GPU. Random numbers come from a CPU ``torch.Generator``: the same seed gives the same
augmented batches whatever the device or the number of loader workers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .recipes import Recipe

__all__ = ["augment"]


def augment(x: torch.Tensor, recipe: Recipe, gen: torch.Generator, hflip_ok: bool = True) -> torch.Tensor:
    """An augmented copy of a standardised batch: (B, C, H, W) images or (B, C, L) sequences."""
    if x.ndim == 4:
        return _images(x, recipe, gen, hflip_ok)
    if x.ndim == 3:
        return _sequences(x, recipe, gen)
    return x


def _rand(shape: tuple[int, ...], gen: torch.Generator, device: torch.device) -> torch.Tensor:
    import torch

    return torch.rand(shape, generator=gen).to(device)


def _randint(high: int, n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    import torch

    return torch.randint(0, high, (n,), generator=gen).to(device)


def _images(x: torch.Tensor, recipe: Recipe, gen: torch.Generator, hflip_ok: bool) -> torch.Tensor:
    import torch
    import torch.nn.functional as F

    b, c, h, w = x.shape
    dev = x.device
    pad = round(recipe.crop_pad * min(h, w))
    if pad > 0:  # random crop of the zero-padded image (zero = the channel mean after standardising)
        xp = F.pad(x, (pad, pad, pad, pad))
        oy, ox = _randint(2 * pad + 1, b, gen, dev), _randint(2 * pad + 1, b, gen, dev)
        rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]  # (B, 1, H, 1)
        cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]  # (B, 1, 1, W)
        bi = torch.arange(b, device=dev)[:, None, None, None]
        ci = torch.arange(c, device=dev)[None, :, None, None]
        x = xp[bi, ci, rows, cols]
    if recipe.hflip and hflip_ok:
        flip = _rand((b,), gen, dev) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    size = round(recipe.cutout * min(h, w))
    if size > 0:  # DARTS' Cutout: a size x size hole at a uniform centre, clipped at the border
        cy, cx = _randint(h, b, gen, dev), _randint(w, b, gen, dev)
        ys = torch.arange(h, device=dev)[None, :, None]
        xs = torch.arange(w, device=dev)[None, None, :]
        half = size // 2
        hole = ((ys - cy[:, None, None]).abs() < half + size % 2) & ((xs - cx[:, None, None]).abs() < half + size % 2)
        x = x.masked_fill(hole[:, None], 0.0)
    return x


def _sequences(x: torch.Tensor, recipe: Recipe, gen: torch.Generator) -> torch.Tensor:
    import torch
    import torch.nn.functional as F

    b, c, length = x.shape
    dev = x.device
    shift = round(recipe.seq_shift * length)
    if shift > 0:  # shift by -shift..shift samples, zero fill
        xp = F.pad(x, (shift, shift))
        start = _randint(2 * shift + 1, b, gen, dev)
        idx = (start[:, None] + torch.arange(length, device=dev))[:, None, :].expand(b, c, length)
        x = xp.gather(2, idx)
    if recipe.seq_scale > 0:
        x = x * (1 + recipe.seq_scale * (2 * _rand((b, 1, 1), gen, dev) - 1))
    if recipe.seq_noise > 0:
        x = x + recipe.seq_noise * torch.randn((b, c, length), generator=gen).to(dev)
    return x
