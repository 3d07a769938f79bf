"""The collapse guard: a trial whose accuracy ends near chance is flagged, never silently ranked.

Chance is `nas.chance.chance_level`, the majority-class share of the validation labels (what
"always predict the commonest class" scores; 1/K for K balanced classes). A trial *collapsed* when

    acc <= chance + margin,   margin = max(CHANCE_MARGIN (0.02), 0.05 * (1 - chance))

i.e. it got less than 5% of the way from chance to perfect, and never closer than the search's own
at-chance test (`nas.chance.at_chance`, 2 points): 0.145 for ten balanced classes, 0.525 for two,
0.92 when one class holds 90% of the rows. A destroyed model that outputs a constant scores chance
exactly, one that outputs noise 1/K or less, and one that is only mostly broken a little above:
the 5%-of-headroom margin catches that one too while any model that learnt something clears it.
A compression trial is flagged only when the uncompressed model was clearly above chance
(``base_acc > chance + 2 * margin``): a model that never learnt cannot be destroyed. Search trials
are flagged by `nas.chance.at_chance` (metric ``at_chance``) where they are trained.

The metrics are plain floats, so they live in the store like any other: ``collapsed`` (1.0/0.0),
``chance_acc``, and for a collapsed trial one 0/1 flag per cheaply detectable likely cause
(`CAUSES`). `collapse_message` turns them into the one-line warning that the console, ``nas-run
show`` and the HTML report print.

**Large drops.** Chance is far below what a user would accept: the pitch model CREPE lost 42 points
to structured pruning without reaching it (results/user_models.md), and a regression or custom
metric has no chance level at all. So every compression trial also gets ``large_drop`` (1.0/0.0):
``acc_drop`` (points of the task's higher-is-better metric, `compress.tasks`) above ``drop_limit``,
the run's tightest ``acc_drop`` constraint if it has one, else `DROP_LIMIT` (5 points); a drop of
exactly the limit meets it (1e-9 tolerance). `large_drop_message` is its warning line. The HTML
report keeps its own stricter banner (1 point without a constraint, the export check's threshold,
`report.banners`): it is a review of the run, this one is said while trials run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .chance import CHANCE_MARGIN, chance_level

if TYPE_CHECKING:
    import torch

__all__ = ["CAUSES", "DROP_LIMIT", "MIN_STEPS", "collapse_message", "collapse_metrics", "collapse_threshold",
           "collapse_warnings", "drop_limit", "large_drop_message", "large_drop_metrics", "large_drop_warnings"]

# fewer optimisation steps than this rarely move a network anywhere (a fine-tuning of 1 epoch on a
# few hundred rows is ~5 steps)
MIN_STEPS = 50

# metric name -> what it means, in the order the message lists them
CAUSES: dict[str, str] = {
    "collapse_stale_bn": "BatchNorm layers with momentum 0/None whose running statistics were not re-estimated "
                         "(add a bn_recalib pass)",
    "collapse_prob_outputs": "the model's outputs are already probabilities (sigmoid/softmax: all in [0, 1]); a "
                             "cross-entropy on logits flattens their gradients (check --loss)",
    "collapse_few_steps": f"too few optimisation steps (< {MIN_STEPS})",
}


# points of acc_drop above which a trial is flagged when the run sets no acc_drop constraint
DROP_LIMIT = 5.0


def drop_limit(constraints: Any = ()) -> float:
    """The tightest ``acc_drop <= b`` / ``acc_drop < b`` bound among ``constraints`` (`Constraint`s
    or their text), else `DROP_LIMIT`."""
    from .objectives import acc_drop_bounds

    return min((c.bound for c in acc_drop_bounds(constraints)), default=DROP_LIMIT)


def large_drop_metrics(acc_drop: float, limit: float = DROP_LIMIT) -> dict[str, float]:
    """``large_drop`` (1.0 when ``acc_drop`` exceeds ``limit`` points) and the ``drop_limit`` used."""
    from .objectives import Constraint

    met = Constraint("acc_drop", "<=", limit).satisfied({"acc_drop": acc_drop})  # exactly the limit meets it
    return {"large_drop": float(not met and acc_drop == acc_drop), "drop_limit": float(limit)}  # NaN: unknown


def large_drop_message(metrics: Mapping[str, Any]) -> str | None:
    """The warning line for a trial flagged ``large_drop``, None for any other."""
    if not _flag(metrics.get("large_drop")):
        return None
    drop, limit = metrics.get("acc_drop"), metrics.get("drop_limit")
    text = "large drop: the compressed model"
    text += f" loses {drop:.2f} points" if isinstance(drop, int | float) else " loses"
    val, base = metrics.get("val_acc"), metrics.get("base_val_acc")
    if isinstance(val, int | float) and isinstance(base, int | float):
        text += f" (val_acc {val:.4g}, uncompressed {base:.4g})"
    if isinstance(limit, int | float):
        text += f", more than the limit of {limit:g}"
    return text


def large_drop_warnings(table: Any) -> list[str]:
    """One line per trial of a store's ``dataframe()`` flagged ``large_drop`` and not collapsed
    (a collapsed one says so itself, `collapse_warnings`)."""
    if table is None or getattr(table, "empty", True) or "large_drop" not in table.columns:
        return []
    lines = []
    for _, row in table[table["large_drop"].fillna(0) >= 0.5].iterrows():
        message = None if _flag(row.get("collapsed")) else large_drop_message(row.to_dict())
        if message:
            lines.append(f"trial {int(row['number'])} {message}")
    return lines


def collapse_threshold(chance: float) -> float:
    return chance + max(CHANCE_MARGIN, 0.05 * (1.0 - chance))


def collapse_metrics(
    acc: float,
    labels: Any,
    base_acc: float | None = None,
    model: torch.nn.Module | None = None,
    x: Any = None,
    steps: int | None = None,
    recalibrated: bool = False,
) -> dict[str, float]:
    """``collapsed`` and ``chance_acc`` for a trial of accuracy ``acc`` on ``labels``; for a
    collapsed one, the likely causes checked on ``model`` (a batch ``x`` of its inputs) and on the
    number of optimisation ``steps`` (None: none was run, nothing to blame)."""
    chance = chance_level(labels)
    thr = collapse_threshold(chance)
    eligible = base_acc is None or base_acc > chance + 2 * (thr - chance)
    collapsed = bool(eligible and acc <= thr)
    out = {"collapsed": float(collapsed), "chance_acc": chance}
    if collapsed:
        out["collapse_stale_bn"] = float(not recalibrated and _stale_bn(model))
        out["collapse_prob_outputs"] = float(model is not None and x is not None and _prob_outputs(model, x))
        out["collapse_few_steps"] = float(steps is not None and 0 < steps < MIN_STEPS)
    return out


def collapse_message(metrics: Mapping[str, Any]) -> str | None:
    """The warning line for a collapsed trial's metrics, None for any other."""
    if not _flag(metrics.get("collapsed")):
        return None
    acc, chance = metrics.get("val_acc"), metrics.get("chance_acc")
    head = "collapsed: accuracy at chance"
    if isinstance(acc, int | float) and isinstance(chance, int | float):
        head += f" (val_acc {acc:.3f}, chance {chance:.3f}"
        base = metrics.get("base_val_acc")
        head += f", uncompressed {base:.3f})" if isinstance(base, int | float) and base == base else ")"
    causes = [text for key, text in CAUSES.items() if _flag(metrics.get(key))]
    return head + ("; likely: " + "; ".join(causes) if causes else "; no cheap check found a cause")


def _flag(value: Any) -> bool:
    try:
        return float(value) >= 0.5
    except (TypeError, ValueError):
        return False


def _stale_bn(model: Any) -> bool:
    from torch import nn

    if not isinstance(model, nn.Module):
        return False
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.momentum in (0, None)
               for m in model.modules())


def _prob_outputs(model: Any, x: Any) -> bool:
    """Whether the model's outputs on ``x`` (eval mode) are all in [0, 1]: a sigmoid or softmax
    head, whose numbers cross-entropy then reads as logits."""
    import numpy as np
    import torch

    if not isinstance(model, torch.nn.Module):
        return False
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.as_tensor(np.asarray(x, dtype=np.float32)).to(device))
    except Exception:  # a check that cannot run names no cause
        return False
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or out.ndim < 2 or out.shape[1] < 2:
        return False
    return bool(((out >= 0) & (out <= 1)).all())


def collapse_warnings(table: Any) -> list[str]:
    """One line per collapsed trial of a store's ``dataframe()`` (`nas.store.RunStore`): what the
    console summary, ``nas-run show`` and the report print."""
    if table is None or getattr(table, "empty", True) or "collapsed" not in table.columns:
        return []
    lines = []
    for _, row in table[table["collapsed"].fillna(0) >= 0.5].iterrows():
        message = collapse_message(row.to_dict())
        if message:
            lines.append(f"trial {int(row['number'])} {message}")
    return lines
