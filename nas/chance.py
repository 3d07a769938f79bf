"""Chance level: the accuracy a model reaches by always answering the most common class.

A search trial whose validation accuracy sits at chance learned nothing (too few optimisation
steps, a learning rate that diverged, a collapsed model); its val_acc says nothing about the
architecture, so it is flagged rather than ranked as if it were a measurement. Compression
trials use the same test (`compress` imports these).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

__all__ = ["CHANCE_MARGIN", "at_chance", "chance_level"]

# within 2 points of the majority-class share counts as chance: on a validation split of 50
# samples one more right answer is 2 points, so a model this close has not beaten guessing
CHANCE_MARGIN = 0.02


def chance_level(y: np.ndarray) -> float:
    """The majority class's share of the labels ``y`` (0.0 for no labels)."""
    import numpy as np

    y = np.asarray(y)
    if y.size == 0:
        return 0.0
    return float(np.bincount(y.astype(np.int64)).max() / y.size)


def at_chance(acc: float, y: np.ndarray, margin: float = CHANCE_MARGIN) -> bool:
    """Whether accuracy ``acc`` on labels ``y`` is no better than always answering the majority class."""
    return acc <= chance_level(y) + margin
