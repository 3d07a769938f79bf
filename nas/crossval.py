"""Cross-validation of a search trial on small data sets.

On 30-60 training samples the validation split holds 7-13, so many candidates tie at the top
and one lucky split decides the pick (#22). With ``cv = K`` a trial trains its candidate K times
from the same seeded initialisation and its val_acc is the mean over K validation folds.

The folds partition the train+val pool so that **fold 0 is the run's own split**: it trains on
the training split and validates on the validation split, exactly as ``cv = 1`` does. Folds
1..K-1 validate on a stratified (K-1)-way partition of the training split and train on the rest
of the pool. Every pool sample is validated exactly once; fold 0's model is the trial's kept
model (weights for compress and export), and its validation split stays unseen by it, so
later verbs that measure on the validation split measure honestly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from search_spaces import ConfigError

if TYPE_CHECKING:
    from .data import Dataset
    from .datasource import StandardizedArray

__all__ = ["CV_FOLDS", "CV_THRESHOLD", "check_cv", "cv_folds", "default_cv", "fold_mean"]

CV_THRESHOLD = 1000  # train+val samples below which a search cross-validates by default
CV_FOLDS = 5


def _min_class_count(y: Sequence[int]) -> int:
    import numpy as np

    counts = np.bincount(np.asarray(y, dtype=np.int64))
    return int(counts[counts > 0].min()) if counts.size else 0


def default_cv(data: Dataset) -> int:
    """Folds a search on ``data`` uses when the config does not say: CV_FOLDS below CV_THRESHOLD
    train+val samples (fewer when a class has too few training samples to split), else 1."""
    if len(data.y_train) + len(data.y_val) >= CV_THRESHOLD:
        return 1
    k = min(CV_FOLDS, 1 + _min_class_count(data.y_train))
    return k if k >= 2 else 1


def check_cv(data: Dataset, k: int) -> None:
    """A `ConfigError` when ``data`` cannot be cut into ``k`` folds as `cv_folds` does."""
    if k <= 1:
        return
    if data.x_train.raw is not data.x_val.raw:
        raise ConfigError(
            f"cv = {k}: the train and val rows of {data.name} come from different sources; use cv = 1"
        )
    least = _min_class_count(data.y_train)
    if k - 1 > least:
        raise ConfigError(
            f"cv = {k} needs at least {k - 1} training samples of every class ({data.name}'s training split "
            f"holds {least} of its smallest class): use --cv {max(1, least + 1)} or fewer (--cv 1: no cross-validation)"
        )


def _rows(like: StandardizedArray, index: Sequence[int]) -> StandardizedArray:
    """Rows ``index`` of ``like``'s source, standardised exactly as ``like`` is (the run's
    training-split statistics: every fold sees the same inputs the run does)."""
    import numpy as np

    from .datasource import StandardizedArray

    rows = StandardizedArray(like.raw, np.asarray(index, dtype=np.int64), np.zeros(1), np.ones(1), 1.0)
    rows._a, rows._b = like._a, like._b
    return rows


def cv_folds(data: Dataset, k: int) -> list[Dataset]:
    """``k`` (train, val) views of the train+val pool, fold 0 being ``data`` itself (see module)."""
    import numpy as np

    check_cv(data, k)
    if k <= 1:
        return [data]
    xt, yt, xv, yv = data.x_train, data.y_train, data.x_val, data.y_val
    positions = np.arange(len(yt))
    if k == 2:
        parts = [positions]  # the other fold validates on the whole training split
    else:
        from sklearn.model_selection import StratifiedKFold

        splitter = StratifiedKFold(n_splits=k - 1, shuffle=True, random_state=data.seed)
        parts = [held for _, held in splitter.split(positions, yt)]
    folds = [data]
    for held in parts:
        kept = np.setdiff1d(positions, held)
        folds.append(
            dataclasses.replace(
                data,
                x_train=_rows(xt, np.concatenate([xt.index[kept], xv.index])),
                y_train=np.concatenate([yt[kept], yv]),
                x_val=_rows(xt, xt.index[held]),
                y_val=yt[held],
            )
        )
    return folds


def fold_mean(per_fold: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Every metric the folds share, averaged; plus ``val_acc_std`` (sample std over folds) and ``folds``."""
    import numpy as np

    keys = [key for key in per_fold[0] if all(key in m for m in per_fold)]
    out = {key: float(np.mean([m[key] for m in per_fold])) for key in keys}
    accs = [m["val_acc"] for m in per_fold if "val_acc" in m]
    out["val_acc_std"] = float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0
    out["folds"] = float(len(per_fold))
    return out
