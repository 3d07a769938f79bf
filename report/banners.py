"""Warnings a report shows above a run's summary, so a number that means nothing is not read as
a result: models at chance (the search's ``at_chance``, `nas.chance`), compressions that
collapsed (`nas.collapse`) and compressions that lose more accuracy than the run allows.

Each banner is a headline and detail lines, plain text (the page escapes them).
"""

from __future__ import annotations

from typing import Any

from nas.objectives import Constraint, acc_drop_bounds

from .runs import RunData
from .units import human

__all__ = ["DEFAULT_DROP_LIMIT", "banners"]

# without an acc_drop constraint a compression losing more than 1 point is still worth a warning
# (the export check's threshold, #19)
DEFAULT_DROP_LIMIT = 1.0
_MAX_LINES = 10


def _flags(df: Any, col: str) -> Any:
    import pandas as pd

    return pd.to_numeric(df[col], errors="coerce").fillna(0.0) >= 0.5


def _at_chance(run: RunData) -> tuple[str, list[str]] | None:
    df = run.trials
    done = df[(df["kind"] != "compressed") & (df["status"] == "complete")]
    if "at_chance" not in df.columns or done.empty:
        return None
    hit = done[_flags(done, "at_chance")]
    if hit.empty:
        return None
    chance = hit["chance_acc"].median() if "chance_acc" in hit.columns else float("nan")
    level = (
        f"always answering the commonest class scores {chance:.3f}" if chance == chance else "chance level"
    )
    if len(hit) == len(done):
        head = (f"every trained model ({len(done)}) scores at chance ({level}): these accuracies rank nothing. "
                "Train longer (--epochs), check the learning rate, the labels and the data size.")  # fmt: skip
    else:
        head = f"{len(hit)} of {len(done)} trained models score at chance ({level}); their accuracies rank nothing"
    lines = [
        f"#{int(r['number'])} {r['genotype_id']}: val_acc {human(r['val_acc'])}"
        for r in hit.to_dict("records")
    ]
    return head, lines


def _drop_limits(run: RunData) -> tuple[tuple[Constraint, ...], str]:
    """The run's acc_drop upper bounds (search and compression constraints), and how the banner
    names them."""
    cs = {str(c): c for c in (*run.constraints, *run.compress_constraints)}.values()
    limits = acc_drop_bounds(tuple(cs))
    if limits:
        return limits, "the run's constraint " + ", ".join(f"{c} points" for c in limits)
    named = f"{DEFAULT_DROP_LIMIT:g} point (the run sets no acc_drop constraint)"
    return (Constraint("acc_drop", "<=", DEFAULT_DROP_LIMIT),), named


def _over(drop: float, limits: tuple[Constraint, ...]) -> bool:
    return not all(c.satisfied({"acc_drop": drop}) for c in limits)


def _drops(run: RunData) -> tuple[str, list[str]] | None:
    df = run.trials
    comp = df[(df["kind"] == "compressed") & (df["status"] == "complete") & df["acc_drop"].notna()]
    if comp.empty:
        return None
    limits, named = _drop_limits(run)
    over = comp[comp["acc_drop"].map(lambda d: _over(float(d), limits))].sort_values(
        "acc_drop", ascending=False
    )
    if over.empty:
        return None
    head = f"{len(over)} of {len(comp)} compressed models lose more accuracy than {named}"
    lines = [f"#{int(r['number'])} {r['policy_label']} on {r['genotype_id']}: drops {human(r['acc_drop'], 'acc_drop')}"
             for r in over.to_dict("records")]  # fmt: skip
    return head, lines


def _collapsed(run: RunData) -> tuple[str, list[str]] | None:
    from nas.collapse import collapse_warnings

    lines = collapse_warnings(run.trials)
    if not lines:
        return None
    return f"{len(lines)} collapsed trial(s): accuracy at chance", lines


def banners(run: RunData) -> list[tuple[str, list[str]]]:
    """(headline, detail lines) of each warning about ``run``; at most 10 lines each."""
    out = []
    for found in (_at_chance(run), _collapsed(run), _drops(run)):
        if found is None:
            continue
        head, lines = found
        if len(lines) > _MAX_LINES:
            lines = [*lines[:_MAX_LINES], f"... and {len(lines) - _MAX_LINES} more (see the table)"]
        out.append((head, lines))
    return out
