"""The run's results: an Optuna study in any Optuna storage (SQLite file by default).

One Optuna trial per candidate. Its user attributes hold the whole record — genotype string and
id, compression policy (empty for now), stage, strategy, budget, seed, metrics, per-epoch
history, error, timings, package versions — so a run can be understood, resumed and opened
in ``optuna-dashboard sqlite:///DIR/study.db`` from the store alone. Objective values are the
measured metrics in their own directions; constraints go to Optuna's native constraint slot
(<= 0 is feasible), so the dashboard and ``study.best_trials`` agree with us.
"""

from __future__ import annotations

import math
import platform
import warnings
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any

import numpy as np

from search_spaces import ConfigError

from .objectives import Constraint, Objective, excess, losses
from .pareto import pareto_mask
from .trial import Candidate, TrialResult

__all__ = ["RunStore", "check_sqlite", "package_versions", "tie_break"]

_PACKAGES = ("nas-run", "torch", "optuna", "ray", "xgboost-cpu", "xgboost", "numpy", "pandas", "onnxruntime")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def tie_break(metrics: Mapping[str, Any]) -> float:
    """What orders trials whose objectives tie exactly (equal val_acc on a small validation split
    is common): the lower validation loss first; trials without one (older runs) after."""
    value = metrics.get("val_loss")
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.inf
    return value if math.isfinite(value) else math.inf


def check_sqlite(url: str) -> None:
    """A SQLite store that is no longer a database (truncated, zeroed, overwritten) is a
    `ConfigError` naming the file, before Optuna or SQLAlchemy touch it (their errors are
    tracebacks of 80 lines, and a writer could make the damage worse). Other URLs, and files
    that do not exist yet (SQLite makes them), pass."""
    import contextlib
    import sqlite3
    from pathlib import Path

    if not url.startswith("sqlite:///") or url == "sqlite:///:memory:":
        return
    path = Path(url.removeprefix("sqlite:///"))
    if not path.is_file():
        return
    if path.stat().st_size == 0:  # a store is made with its tables at once: an empty file was emptied
        raise ConfigError(f"{path} is empty (0 bytes); the run's store is lost")
    try:  # read-only: a reader beside a running driver must not write (nor create a journal)
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)) as con:
            found = con.execute("PRAGMA quick_check(1)").fetchone()
            con.execute("SELECT 1 FROM studies LIMIT 1").fetchall()  # Optuna's own table: this is a study
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):  # a driver is writing: its database is fine
            return
        raise ConfigError(f"{path} is damaged or not an Optuna study ({exc}); the run's store cannot be read") from None
    except sqlite3.DatabaseError as exc:  # "file is not a database", "database disk image is malformed"
        raise ConfigError(f"{path} is damaged ({exc}); the run's store cannot be read") from None
    if found is None or found[0] != "ok":
        detail = " ".join(str(found[0]).split()) if found else "no answer"  # one line, as every error
        raise ConfigError(f"{path} is damaged (SQLite integrity check: {detail}); the run's store cannot be read")


# a trial's inheritance record (`nas.inherit.Lineage.record`)
INHERIT_FIELDS = ("parent", "parent_genotype", "parent_distance", "inherit_epochs", "lineage_epochs")


class RunStore:
    """Read/write access to one run's study. Only the driver process writes."""

    def __init__(
        self,
        url: str,
        objectives: Sequence[Objective],
        constraints: Sequence[Constraint] = (),
        study_name: str = "nas-run",
        read_only: bool = False,
        new: bool = False,
    ):
        """``read_only``: load an existing study and write nothing (a reader beside a driver).
        ``new``: the study must not exist yet (a new run on a shared database server: another
        run's study of the same name is refused, atomically, never taken over)."""
        import optuna

        check_sqlite(url)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self._optuna = optuna
        self.url, self.study_name = url, study_name
        self.objectives, self.constraints = tuple(objectives), tuple(constraints)
        directions = ["maximize" if o.direction == "max" else "minimize" for o in self.objectives]
        try:
            if read_only:
                self.study = optuna.load_study(storage=url, study_name=study_name)
            else:
                self.study = optuna.create_study(
                    storage=url, study_name=study_name, directions=directions, load_if_exists=not new
                )
        except optuna.exceptions.DuplicatedStudyError:
            raise ConfigError(
                f"the database {url.split('@')[-1]!r} already holds a study named {study_name!r} (another run "
                f"folder of that name): give this run another --out, or continue that one with --resume"
            ) from None
        except KeyError:  # load_study: no such study
            raise ConfigError(f"no study {study_name!r} in {url.split('@')[-1]!r}") from None
        except ImportError as exc:  # SQLAlchemy found no driver for the URL's database
            raise ConfigError(
                f"storage {url.split('@')[-1]!r} needs a database driver that is not installed "
                f"({exc}); for PostgreSQL: pip install 'nas-run[postgres]'"
            ) from None
        except Exception as exc:  # noqa: BLE001 - narrowed to SQLAlchemy's own errors below
            if type(exc).__module__.split(".")[0] != "sqlalchemy":
                raise
            # a malformed URL (ArgumentError) or a database that does not answer (OperationalError);
            # the part before '@' may hold a password: never echo it
            raise ConfigError(
                f"storage {url.split('@')[-1]!r}: {type(exc).__name__}: {str(exc).splitlines()[0]}; "
                "expected a SQLAlchemy URL such as sqlite:///path/study.db or "
                "postgresql://user:password@host/db, of a database that answers"
            ) from None
        if [d.name.lower() for d in self.study.directions] != directions:
            raise ValueError(
                f"the store at {url} holds objectives with directions "
                f"{[d.name.lower() for d in self.study.directions]}, this run asks for {directions}"
            )
        self._open: dict[int, Any] = {}
        self._versions = package_versions()
        if read_only:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "experimental" since Optuna 3.2; the dashboard uses it
            self.study.set_metric_names([o.metric for o in self.objectives])

    # -- run-level metadata ----------------------------------------------------------------------
    def set_meta(self, key: str, value: Any) -> None:
        self.study.set_user_attr(key, value)

    def get_meta(self, key: str, default: Any = None) -> Any:
        return self.study.user_attrs.get(key, default)

    # -- trials ----------------------------------------------------------------------------------
    def start(
        self,
        genotype_str: str,
        genotype_id: str,
        budget: int,
        strategy: str,
        seed: int,
        policy: str = "",
        stage: str = "search",
        extra: Mapping[str, Any] | None = None,
    ) -> int:
        """Open a RUNNING trial holding the whole record; ``extra`` adds fields to it (e.g. the
        strategy's proposal when it is not the genotype)."""
        attrs = {
            **dict(extra or {}),
            "genotype": genotype_str,
            "genotype_id": genotype_id,
            "policy": policy,
            "stage": stage,
            "strategy": strategy,
            "budget": budget,
            "seed": seed,
            "versions": self._versions,
        }
        # One write for the row and its record: `study.ask()` + `set_user_attr` per key would be
        # several transactions, and a driver killed between them left a RUNNING trial without
        # its genotype (seen in CI). Optuna's public `add_trial` returns no number, so this uses
        # the storage call behind it, which returns the new trial.
        template = self._optuna.trial.create_trial(
            state=self._optuna.trial.TrialState.RUNNING, user_attrs=attrs
        )
        trial_id = self.study._storage.create_new_trial(self.study._study_id, template_trial=template)
        number = self.study._storage.get_trial_number_from_id(trial_id)
        self._open[number] = self._optuna.trial.Trial(self.study, trial_id)
        return number

    def _trial(self, number: int) -> Any:
        if number not in self._open:
            frozen = self.study.get_trials(deepcopy=False)[number]
            # Optuna has no public "Trial by number"; the id is stable within a storage.
            self._open[number] = self._optuna.trial.Trial(self.study, frozen._trial_id)
        return self._open[number]

    def finish(
        self, candidate: Candidate, result: TrialResult, constraints: Sequence[Constraint] = ()
    ) -> float:
        """Record the result; returns the summed constraint violation (0 = feasible).
        ``constraints``: more than the run's (a policy search's own ``--constraint``): judged and
        recorded with them, so the violation and the constraint texts in the record are the
        ones the search was told."""
        opt = self._optuna
        trial = self._trial(candidate.number)
        violation = 0.0
        judged = list(dict.fromkeys([*self.constraints, *constraints]))
        for c in judged:
            over = excess(c, result.metrics)
            if not c.satisfied(result.metrics):  # strict bounds: at the bound is violated too
                violation += max(over, 1e-12)
                over = max(over, 1e-12)
            trial.set_constraint(str(c), over)
        trial.set_user_attr("status", result.status)
        trial.set_user_attr("metrics", result.metrics)
        trial.set_user_attr("history", list(result.history))
        trial.set_user_attr("error", result.error)
        trial.set_user_attr("duration_s", result.duration_s)
        trial.set_user_attr("violation", violation)
        if judged:  # the texts beside the number: a record says what it was judged against
            trial.set_user_attr("constraints", [str(c) for c in judged])
        values = losses(self.objectives, result.metrics)
        if result.status == "complete" and values is not None:  # "rejected" and "failed": FAIL
            self.study.tell(trial, [result.metrics[o.metric] for o in self.objectives])
        elif result.status == "stopped":
            self.study.tell(trial, state=opt.trial.TrialState.PRUNED)
        else:
            self.study.tell(trial, state=opt.trial.TrialState.FAIL)
        self._open.pop(candidate.number, None)
        return violation

    def interrupted(self, stages: Sequence[str | None] | None = None) -> list[dict[str, Any]]:
        """Trials left RUNNING by a driver that died: mark them failed, return their records
        so the controller can run them again. ``stages`` limits this to trials of those stages
        (a search and a compression of the same run resume their own trials)."""
        opt = self._optuna
        out = []
        for t in self.study.get_trials(deepcopy=False, states=(opt.trial.TrialState.RUNNING,)):
            if stages is not None and t.user_attrs.get("stage") not in stages:
                continue
            trial = self._trial(t.number)
            trial.set_user_attr("status", "failed")
            trial.set_user_attr("error", "interrupted: the driver stopped while this trial ran")
            self.study.tell(trial, state=opt.trial.TrialState.FAIL)
            self._open.pop(t.number, None)
            out.append(dict(t.user_attrs, number=t.number))
        return out

    def records(self) -> list[dict[str, Any]]:
        """One flat dict per trial (finished or not), in trial order."""
        rows = []
        running = self._optuna.trial.TrialState.RUNNING
        for t in self.study.get_trials(deepcopy=False):
            a = t.user_attrs
            row: dict[str, Any] = {
                "number": t.number,
                "state": t.state.name,
                # `finish` writes the attributes, then tells Optuna: a driver killed in between
                # leaves a result that is not final yet (resume marks it interrupted, runs it again)
                "status": "running" if t.state == running else a.get("status", "running"),
                "stage": a.get("stage"),
                "genotype_id": a.get("genotype_id"),
                "strategy": a.get("strategy"),
                "budget": a.get("budget"),
                "seed": a.get("seed"),
                "duration_s": a.get("duration_s"),
                "violation": a.get("violation"),
                # what the violation was judged against, as --constraint takes it ("" when nothing)
                "constraints": ",".join(a.get("constraints") or ()),
                "error": a.get("error", ""),
                "genotype": a.get("genotype"),
                "policy": a.get("policy", ""),
                "proposal": a.get("proposal"),
                "datetime_start": t.datetime_start,
                "datetime_complete": t.datetime_complete,
                "metrics": dict(a.get("metrics") or {}),
            }
            # weight inheritance (`nas.inherit`): only in runs that use it, so other tables keep their columns
            row.update({k: a[k] for k in INHERIT_FIELDS if k in a})
            rows.append(row)
        return rows

    def dataframe(self) -> Any:
        """All trials, one row each, metrics as columns (the record's fields first)."""
        import pandas as pd

        rows = [{**{k: v for k, v in r.items() if k != "metrics"}, **r["metrics"]} for r in self.records()]
        return pd.DataFrame(rows)

    def ranked(self, records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """``records`` with every objective measured, best first: non-dominated rank (fronts of
        non-dominated sorting), then the objectives as losses, primary first, then `tie_break`
        (exact ties: lower validation loss first), then trial number."""
        from .pareto import nondominated_rank

        recs = [r for r in records if losses(self.objectives, r["metrics"]) is not None]
        if not recs:
            return []
        arr = np.array([losses(self.objectives, r["metrics"]) for r in recs], dtype=float)
        rank = nondominated_rank(arr)
        return [
            recs[i]
            for i in sorted(
                range(len(recs)),
                key=lambda i: (int(rank[i]), tuple(arr[i]), tie_break(recs[i]["metrics"]), recs[i].get("number", 0)),
            )
        ]

    def pareto(self) -> Any:
        """Completed, feasible, non-dominated trials as a DataFrame (n objectives). Final-training
        trials (stage "train": a longer recipe, not a candidate of the search) are not on it."""
        df = self.dataframe()
        if df.empty:
            return df
        done = df[(df["status"] == "complete") & (df["stage"] != "train")].reset_index(drop=True)
        if done.empty:
            return done
        ls = [losses(self.objectives, r) for r in done.to_dict("records")]
        ok = [x is not None for x in ls]
        m = len(self.objectives)
        arr = [x if x is not None else (math.inf,) * m for x in ls]
        feasible = [bool(ok[i]) and not (done.loc[i, "violation"] or 0) > 0 for i in range(len(done))]
        mask = pareto_mask(np.array(arr, dtype=float).reshape(len(arr), m), np.array(feasible))
        front = done[mask]
        first = self.objectives[0]
        # equal primary values: the lower validation loss first (`tie_break`), as `ranked` orders them
        front = front.assign(_tie=[tie_break(r) for r in front.to_dict("records")])
        front = front.sort_values([first.metric, "_tie"], ascending=[first.direction == "min", True], kind="stable")
        return front.drop(columns="_tie").reset_index(drop=True)
