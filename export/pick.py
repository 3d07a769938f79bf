"""Which trial `nas-run export` takes when no ``--trial`` is given: a rule over the run's
completed trials (architectures and compressed trials alike), judged on its objectives and
constraints.

Rules (``--pick``)::

    best                         the run's objectives in order: best primary, ties broken by the
                                 others, then the lower val_loss (the default)
    min METRIC / max METRIC      that metric; ties broken as ``best``
    knee                         the knee of the front of the run's first two objectives: the point
                                 farthest from the line joining its extremes (objectives scaled
                                 to [0, 1] over the front), on the side of the ideal point

each optionally followed by ``where METRIC<=X[, METRIC>=Y ...]`` (or ``and``). A trial is
*feasible* when it meets the run's constraints (a compressed trial: also those of the policy
search that made it), the ``where`` conditions, and has every metric the rule reads. An
uncompressed model is its own float base: its ``acc_drop`` reads 0, ``speedup`` and
``size_ratio`` 1, so ``where acc_drop<=0.5`` keeps architectures in.

The pool: the run's completed trials of the search and compression stages; when the run holds
a final-trained model (``nas-run train``), that model and the compressed trials made from its
final weights instead (the user chose that architecture and trained it for deployment).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from compress.policy import Policy
from nas.objectives import Constraint, Objective, acc_drop_bounds, losses, parse_constraints
from nas.store import tie_break
from search_spaces import ConfigError

__all__ = ["GRAMMAR", "PickError", "Picked", "Rule", "drop_limit", "parse_rule", "pick_trial", "pool"]

GRAMMAR = ("a rule is 'best' (the run's objectives), 'min METRIC', 'max METRIC' or 'knee', optionally "
           "followed by 'where METRIC<=X[, METRIC>=Y ...]' (operators <=, >=, <, >)")
DEFAULT_DROP_LIMIT = 1.0  # points: what an export may lose against its float base without a constraint
# what an uncompressed model is against itself (its own float base)
UNCOMPRESSED = {"acc_drop": 0.0, "speedup": 1.0, "size_ratio": 1.0}
_RULE = re.compile(r"\s*(?:(?P<dir>min|max)\s+(?P<metric>[A-Za-z_]\w*)|(?P<word>best|knee))"
                   r"(?:\s+where\s+(?P<where>.+?))?\s*")


class PickError(ConfigError):
    """A ``--pick`` rule that cannot be read, or that no trial of the run meets."""


@dataclass(frozen=True)
class Rule:
    kind: str  # "best", "min", "max" or "knee"
    metric: str | None = None
    where: tuple[Constraint, ...] = ()
    text: str = "best"

    @property
    def default(self) -> bool:
        return self.kind == "best" and not self.where


@dataclass
class Picked:
    record: dict[str, Any]
    rule: str  # as shown: the rule given, or the run's objectives spelt out
    feasible: int
    candidates: int
    notes: list[str] = field(default_factory=list)
    given: bool = True  # False: the default (no --pick)
    where: tuple[Constraint, ...] = ()  # the rule's conditions (they bound the export's drop too)

    def line(self) -> str:
        how = f"{self.rule!r}" if self.given else f"the run's objectives {self.rule!r}"
        return f"picked trial {self.record['number']} by {how} ({self.feasible} of {self.candidates} feasible)"


def parse_rule(text: str | None, metrics: Iterable[str]) -> Rule:
    """``text`` (None: the default) -> a `Rule`; its metrics must be among ``metrics``."""
    known = sorted(set(metrics))

    def bad(why: str) -> PickError:
        return PickError(f"--pick {text!r}: {why}; {GRAMMAR}; metrics of this run: {', '.join(known) or 'none'}")

    if text is None:
        return Rule("best")
    m = _RULE.fullmatch(text)
    if not m:
        raise bad("cannot read it")
    where: list[Constraint] = []
    if m["where"]:
        for part in re.split(r",|\s+and\s+", m["where"]):
            try:
                where.extend(parse_constraints(part))
            except ConfigError:
                raise bad(f"{part.strip()!r} is not a condition") from None
        if not where:
            raise bad("'where' needs a condition")
    for name in [m["metric"], *(c.metric for c in where)]:
        if name is not None and name not in known:
            raise bad(f"unknown metric {name!r}")
    kind = m["dir"] or m["word"]
    shown = f"{kind} {m['metric']}" if m["metric"] else kind
    if where:
        shown += " where " + ", ".join(str(c) for c in where)
    return Rule(kind, m["metric"], tuple(where), shown)


def pool(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The completed trials a pick chooses among (see the module docstring)."""
    done = [dict(r) for r in records if r.get("status") == "complete"]
    trained = [r for r in done if r.get("stage") == "train"]
    if trained:
        return trained + [r for r in done if r.get("stage") == "compress" and r["metrics"].get("final_trained")]
    return [r for r in done if r.get("stage") in ("search", "compress", None)]


def metrics_of(rec: Mapping[str, Any]) -> dict[str, float]:
    """The record's metrics as rules read them (an uncompressed model's drop is 0, see above)."""
    m = {k: v for k, v in rec["metrics"].items() if isinstance(v, int | float)}
    if not rec.get("policy"):
        for k, v in UNCOMPRESSED.items():
            m.setdefault(k, v)
    return m


def pick_trial(
    records: Sequence[Mapping[str, Any]],
    objectives: Sequence[Objective],
    rule: str | None = None,
    constraints: Sequence[Constraint] = (),
    compress_constraints: Sequence[Constraint] = (),
    int8_ok: bool = True,
    keep: Callable[[Mapping[str, Any]], bool] | None = None,
) -> Picked:
    """The trial ``rule`` picks among the run's completed ``records`` (`pool`). ``constraints``
    are the run's (every trial), ``compress_constraints`` those of its policy search (compressed
    trials). ``int8_ok`` False leaves int8 (ONNX Runtime only) trials out: the format asked
    cannot hold them. ``keep`` narrows the pool further (``--policy``)."""
    candidates = pool(records)
    notes: list[str] = []
    if not int8_ok:
        int8 = [r for r in candidates if r.get("policy") and Policy.from_json(r["policy"]).terminal]
        if int8:
            notes.append(f"{len(int8)} int8 trial(s) left out: a float format cannot hold an int8 model (--format onnx-int8 can)")
            candidates = [r for r in candidates if r not in int8]
    if keep is not None:
        candidates = [r for r in candidates if keep(r)]
    views = [metrics_of(r) for r in candidates]
    parsed = parse_rule(rule, {k for m in views for k in m})
    needs = [parsed.metric] if parsed.metric else [o.metric for o in objectives]
    if parsed.kind == "knee":
        if len(objectives) < 2:
            raise PickError(f"--pick {rule!r}: a knee needs two objectives; the run has one "
                            f"({objectives[0]}); {GRAMMAR}")
        needs = [o.metric for o in objectives[:2]]
    feasible = [i for i, (r, m) in enumerate(zip(candidates, views, strict=True))
                if _feasible(r, m, needs, constraints, compress_constraints, parsed.where)]
    missing = sum(any(not _finite(m.get(k)) for k in needs) for m in views)
    if missing:
        notes.append(f"{missing} trial(s) have no {' or '.join(needs)}")
    shown = parsed.text if rule is not None else _objectives_text(objectives)
    if not feasible:
        judged = [*map(str, constraints), *(f"{c} (compressed trials)" for c in compress_constraints)]
        raise PickError(
            f"no completed trial of the run meets {shown!r}"
            + (f" and the run's constraints {', '.join(judged)}" if judged else "")
            + f" ({len(candidates)} candidates{'; ' + '; '.join(notes) if notes else ''}); "
            "loosen --pick, or export one by --trial N"
        )

    def order(i: int) -> tuple[Any, ...]:
        ls = losses(objectives, views[i]) or (math.inf,) * len(objectives)
        return (*ls, tie_break(views[i]), candidates[i].get("number", 0))

    if parsed.kind in ("min", "max"):
        sign = 1.0 if parsed.kind == "min" else -1.0
        best = min(feasible, key=lambda i: (sign * float(views[i][str(parsed.metric)]), *order(i)))
    elif parsed.kind == "knee":
        best = _knee(feasible, [losses(objectives[:2], views[i]) for i in feasible], order)
        shown += f" ({objectives[0].metric}, {objectives[1].metric})"
    else:
        best = min(feasible, key=order)
    return Picked(candidates[best], shown, len(feasible), len(candidates), notes, rule is not None, parsed.where)


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def _feasible(rec: Mapping[str, Any], m: Mapping[str, float], needs: Sequence[str], constraints: Sequence[Constraint],
              compress_constraints: Sequence[Constraint], where: Sequence[Constraint]) -> bool:
    if any(not _finite(m.get(k)) for k in needs):
        return False
    if (rec.get("violation") or 0) > 0:  # as recorded when the trial finished
        return False
    # judged again on the metrics: records of older runs hold 0 for a policy search's violations
    judged = [*constraints, *where, *(compress_constraints if rec.get("stage") == "compress" else ())]
    return all(c.satisfied(m) for c in judged)


def _objectives_text(objectives: Sequence[Objective]) -> str:
    return ", then ".join(f"{o.direction} {o.metric}" for o in objectives)


def _knee(idx: Sequence[int], pts: Sequence[tuple[float, ...] | None], order: Callable[[int], Any]) -> int:
    """The knee among feasible points (2 losses each): the front's point farthest from the line
    joining its two extremes, towards the ideal point; a front of 1-2 points has none, so the
    best by ``order`` is taken (as for a front where no point lies towards the ideal)."""
    import numpy as np

    from nas.pareto import pareto_mask

    arr = np.array(pts, dtype=float)
    on = np.flatnonzero(pareto_mask(arr))
    front = arr[on]
    span = front.max(0) - front.min(0)
    scaled = (front - front.min(0)) / np.where(span > 0, span, 1.0)
    a = scaled[np.lexsort((scaled[:, 1], scaled[:, 0]))[0]]  # best on the first objective
    b = scaled[np.lexsort((scaled[:, 0], scaled[:, 1]))[0]]  # best on the second
    d = b - a
    norm = float(np.hypot(*d))
    # signed distance: positive on the side of the ideal point (0, 0) of the scaled front
    dist = np.zeros(len(front)) if norm == 0 else ((scaled - a) @ np.array([d[1], -d[0]])) / norm
    if norm and float(np.array([d[1], -d[0]]) @ (np.zeros(2) - a)) < 0:
        dist = -dist
    top = dist.max()
    tied = [idx[int(on[j])] for j in range(len(front)) if dist[j] >= top - 1e-12]
    return min(tied, key=order)


def drop_limit(rule_where: Sequence[Constraint], *run_constraints: Sequence[Constraint]) -> tuple[float, str]:
    """The largest accuracy drop (points) an export may show against its float base: the tightest
    ``acc_drop<=X`` of the ``--pick`` rule or the run, else `DEFAULT_DROP_LIMIT`; and whence."""
    found = [(c.bound, f"--pick {c}") for c in acc_drop_bounds(rule_where)]
    found += [(c.bound, f"the run's constraint {c}") for cs in run_constraints for c in acc_drop_bounds(cs)]
    if not found:
        return DEFAULT_DROP_LIMIT, "the default"
    return min(found)
