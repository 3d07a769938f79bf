"""Training recipes: how a model is trained, named, serialisable and recorded in every trial.

timm's habit (``train.py``): a recipe is a flat set of named settings -- optimizer, schedule with
warm-up, label smoothing, augmentation, precision, EMA -- that a config file and the command line
both set. Three are built in:

- ``quick``: what search trials used before recipes existed, and still do by default: AdamW with a
  one-cycle schedule, no augmentation. Cheap and good at ranking candidates in a few epochs.
- ``standard``: SGD (Nesterov momentum 0.9) with a linear warm-up then cosine decay, weight decay
  5e-4, label smoothing 0.1, random crop with padding + horizontal flip (images) or random shift,
  scaling and noise (sequences), gradient clipping: the usual from-scratch recipe of CNNs.
- ``darts``: DARTS' final training (``train.py``; Liu et al. 2019, Sec. 5.1): SGD 0.025 momentum
  0.9, weight decay 3e-4, cosine, cutout 16 (of 32 px), ScheduledDropPath 0.2, auxiliary head
  weighted 0.4, gradient clipping 5.

Sizes of augmentations are fractions of the input side so one recipe fits 8x8 digits and 224 px
images alike (``crop_pad=0.125`` is DARTS' 4 px on 32 px CIFAR).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from search_spaces.errors import ConfigError, UnknownNameError

__all__ = ["RECIPES", "Recipe", "get_recipe"]

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("onecycle", "cosine", "constant")
AMP_MODES = ("auto", "off", "bf16", "fp16")


@dataclass(frozen=True)
class Recipe:
    name: str = "custom"
    optimizer: str = "adamw"
    lr: float = 3e-3
    momentum: float = 0.9  # SGD only
    nesterov: bool = False
    weight_decay: float = 1e-4
    schedule: str = "onecycle"
    warmup_epochs: float = 0.0  # cosine/constant: linear warm-up from lr/100; onecycle has its own (15%)
    batch_size: int = 64
    label_smoothing: float = 0.0
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    ema_decay: float = 0.0  # EMA of the weights (evaluated and kept instead of the raw ones); 0 = off
    # augmentation: images
    crop_pad: float = 0.0  # random crop after zero padding by this fraction of each side
    hflip: bool = False  # random horizontal flips (skipped for data sets where a mirror changes the label)
    cutout: float = 0.0  # square hole of this fraction of the side (DeVries & Taylor 2017); 0 = off
    # augmentation: sequences (N, C, L)
    seq_shift: float = 0.0  # random shift by up to this fraction of the length (zero fill)
    seq_scale: float = 0.0  # multiply by U(1 - s, 1 + s)
    seq_noise: float = 0.0  # add N(0, noise^2) in standardised units
    # cell networks (NASNet / DARTS spaces)
    drop_path: float | None = None  # ScheduledDropPath's maximum; None: the space's own setting
    aux_weight: float = 0.4  # auxiliary head's loss weight, where the network has one
    auxiliary: bool = False  # build cell networks with their auxiliary head (final training)
    # execution
    amp: str = "auto"  # auto: fp16 + grad scaler (bf16 where supported) on CUDA, off on the CPU
    channels_last: bool = True  # on CUDA only: the memory format its convolutions are fastest in
    compile: bool = False  # torch.compile the model (first epoch pays the compilation)
    loader_workers: int = 0  # DataLoader worker processes; 0 = batches are read in the training process

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise UnknownNameError("recipe optimizer", self.optimizer, OPTIMIZERS)
        if self.schedule not in SCHEDULES:
            raise UnknownNameError("recipe schedule", self.schedule, SCHEDULES)
        if self.amp not in AMP_MODES:
            raise UnknownNameError("recipe amp", self.amp, AMP_MODES)
        positive = {"lr": self.lr, "batch_size": self.batch_size}
        for key, value in positive.items():
            if not _finite(value) or value <= 0:
                raise ConfigError(f"recipe {key} must be > 0, got {value!r}")
        nonneg = {
            "momentum": self.momentum, "weight_decay": self.weight_decay, "warmup_epochs": self.warmup_epochs,
            "grad_clip": self.grad_clip, "aux_weight": self.aux_weight, "seq_scale": self.seq_scale,
            "seq_noise": self.seq_noise, "loader_workers": self.loader_workers,
        }  # fmt: skip
        for key, value in nonneg.items():
            if not _finite(value) or value < 0:
                raise ConfigError(f"recipe {key} must be >= 0, got {value!r}")
        fractions = {
            "label_smoothing": self.label_smoothing, "ema_decay": self.ema_decay, "crop_pad": self.crop_pad,
            "cutout": self.cutout, "seq_shift": self.seq_shift, "drop_path": self.drop_path or 0.0,
        }  # fmt: skip
        for key, value in fractions.items():
            if not _finite(value) or not 0 <= value < 1:
                raise ConfigError(f"recipe {key} must be in [0, 1), got {value!r}")
        if type(self.batch_size) is not int or type(self.loader_workers) is not int:
            raise ConfigError("recipe batch_size and loader_workers must be integers")

    def replace(self, **changes: Any) -> Recipe:
        """A copy with ``changes``; unknown keys name the valid ones."""
        valid = {f.name for f in dataclasses.fields(self)}
        for key in changes:
            if key not in valid:
                raise UnknownNameError("recipe setting", key, valid)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        return cls().replace(**dict(data))

    @property
    def augments(self) -> bool:
        return bool(self.crop_pad or self.hflip or self.cutout or self.seq_shift or self.seq_scale or self.seq_noise)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


RECIPES: dict[str, Recipe] = {
    "quick": Recipe(name="quick"),
    "standard": Recipe(
        name="standard", optimizer="sgd", lr=0.1, nesterov=True, weight_decay=5e-4, schedule="cosine",
        warmup_epochs=1.0, batch_size=128, label_smoothing=0.1, grad_clip=5.0, crop_pad=0.125, hflip=True,
        seq_shift=0.1, seq_scale=0.1, seq_noise=0.05,
    ),
    "darts": Recipe(
        name="darts", optimizer="sgd", lr=0.025, weight_decay=3e-4, schedule="cosine", batch_size=96,
        grad_clip=5.0, crop_pad=0.125, hflip=True, cutout=0.5, seq_shift=0.1, drop_path=0.2, aux_weight=0.4,
        auxiliary=True,
    ),
}  # fmt: skip


def get_recipe(name_or_table: str | Mapping[str, Any] | Recipe, **overrides: Any) -> Recipe:
    """A recipe by name (``quick``, ``standard``, ``darts``) or a config table: ``{"base": "standard",
    "lr": 0.05, ...}`` (``base`` defaults to quick); ``overrides`` (not None) win over both."""
    if isinstance(name_or_table, Recipe):
        recipe = name_or_table
    elif isinstance(name_or_table, str):
        if name_or_table not in RECIPES:
            raise UnknownNameError("recipe", name_or_table, RECIPES)
        recipe = RECIPES[name_or_table]
    else:
        table = dict(name_or_table)
        base = get_recipe(table.pop("base", "quick"))
        recipe = base.replace(name=table.pop("name", f"{base.name}+custom"), **table)
    given = {k: v for k, v in overrides.items() if v is not None}
    return recipe.replace(**given) if given else recipe
