"""A run folder as `export` reads it (`open_run`: a search run, or a ``--model`` compression run),
and the trial ``--trial`` / ``--policy`` name in it (`select_trial`; `choose_trial` adds ``--pick``,
`export.pick`). Nothing here loads a model or writes to the folder.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.policy import Policy
from search_spaces import ConfigError

if TYPE_CHECKING:
    from nas.data import Dataset
    from nas.store import RunStore

    from .pick import Picked

__all__ = ["RunFolder", "check_usable", "choose_trial", "final_trained", "open_run", "policy_matches", "policy_name",
           "select_trial"]


@dataclass
class RunFolder:
    dir: Path
    store: RunStore
    dataset: str
    data_seed: int
    standardize: bool
    space: str | None  # a search run's space; None for a --model compression run
    space_options: dict[str, Any]
    model_spec: str | None  # a --model run's builder or TorchScript file
    calib_size: int
    joint: bool = False  # a joint architecture x compression run: its trials are compressed pairs
    val_fraction: float = 0.2  # a search run's validation share (its config's): the same split
    layout: str | None = None  # a --model run's --layout (else its data are fed as stored)
    # compress.json's: a policy search's --constraint (judged on its compressed trials), --metric
    constraints: tuple[Any, ...] = ()
    metric: str | None = None

    def data(self) -> Dataset:
        from nas.data import load_dataset

        return load_dataset(self.dataset, seed=self.data_seed, standardize=self.standardize,
                            val_fraction=self.val_fraction, layout=self.layout, for_model=self.model_spec is not None)


def open_run(run_dir: str | os.PathLike[str]) -> RunFolder:
    from compress.run import read_compress_config
    from nas.objectives import parse_constraints, parse_objectives
    from nas.search import open_store, read_config
    from nas.store import RunStore

    d = Path(run_dir)
    comp_path = d / "compress.json"
    # checked as `compress --resume` reads it: a damaged or edited file is one line naming it
    comp = read_compress_config(d).to_json() if comp_path.is_file() else {}
    calib = int(comp.get("calib_size", 256))
    extra = {"constraints": parse_constraints(comp.get("constraints") or ()), "metric": comp.get("metric")}
    if (d / "config.json").is_file():
        from search_spaces import get_space

        cfg = read_config(d)
        space = get_space(cfg.space, **dict(cfg.space_options))
        space = space.tiny() if cfg.tiny else space
        return RunFolder(d, open_store(d, read_only=True), cfg.dataset, cfg.seed, True, cfg.space,
                    dict(space.options), None, calib, cfg.joint, cfg.val_fraction, layout=cfg.layout, **extra)
    if comp.get("model"):
        if not (d / "study.db").is_file():
            raise ConfigError(f"{str(d)!r} holds no study.db: nothing was compressed there yet")
        url = f"sqlite:///{(d / 'study.db').resolve()}"
        store = RunStore(url, parse_objectives(comp.get("objectives") or ("val_acc",)), (),
                         study_name=d.resolve().name, read_only=True)
        return RunFolder(d, store, str(comp["dataset"]), int(comp.get("seed", 0)), bool(comp.get("standardize", False)),
                    None, {}, str(comp["model"]), calib, layout=comp.get("layout"), **extra)
    raise ConfigError(f"{str(d)!r} is not a run folder (no config.json or compress.json)")


def policy_name(policy: str) -> str:
    return Policy.from_json(policy).label() if policy else "none"


def select_trial(run: RunFolder, trial: int | None, policy: str | None) -> dict[str, Any]:
    from nas.objectives import losses
    from nas.store import tie_break

    records = run.store.records()
    by_number = {r["number"]: r for r in records}
    if trial is not None:
        if trial not in by_number:
            span = f"0..{max(by_number)}" if by_number else "none yet"
            raise ConfigError(f"the run {str(run.dir)!r} has no trial {trial} (trials: {span})")
        rec = by_number[trial]
    elif policy is None and (trained := final_trained(run, records)) is not None:
        rec = trained  # `nas-run train`'s model of the run's chosen architecture: what the user trained for
    else:
        stage = "search" if run.space is not None and not run.joint else "compress"
        done = [r for r in records if r["stage"] == stage and r["status"] == "complete"
                and losses(run.store.objectives, r["metrics"]) is not None]
        if stage == "compress" and policy is not None:  # a --model run: the best of that policy
            done = [r for r in done if policy_matches(r["policy"], policy)]
            done = [r for r in done if Policy.from_json(r["policy"]).matches(policy)] or done  # whole name first
            if len({r["policy"] for r in done}) > 1:
                raise ConfigError(f"--policy {policy!r} matches several policies: "
                                  f"{', '.join(sorted({policy_name(r['policy']) for r in done}))}; give a policy id or --trial N")
        if not done:
            which = f" matching --policy {policy!r}" if stage == "compress" and policy is not None else ""
            raise ConfigError(f"the run {str(run.dir)!r} has no completed {stage} trial{which} to export")
        # feasible first, then the primary objective (as a loss: smaller is better)
        # (exact ties: the lower validation loss, `nas.store.tie_break`)
        done.sort(key=lambda r: ((r.get("violation") or 0) > 0, losses(run.store.objectives, r["metrics"])[0],
                                 tie_break(r["metrics"])))
        rec = done[0]
    if policy is not None:
        if rec["stage"] == "compress":
            if not policy_matches(rec["policy"], policy):
                raise ConfigError(f"trial {rec['number']} has policy {policy_name(rec['policy'])!r}, which --policy {policy!r} does not name")
        else:
            rec = _pick_policy(run, records, rec, policy)
    check_usable(rec)
    return rec


def choose_trial(run: RunFolder, trial: int | None, policy: str | None, pick: str | None,
            fmt: str) -> tuple[dict[str, Any], Picked | None]:
    """The trial to export: ``--trial`` (and ``--policy`` without a rule) as `select_trial` finds them;
    otherwise the one the ``--pick`` rule (default: the run's objectives) picks among the run's
    architectures and compressed trials (`export.pick`), narrowed to ``--policy``'s."""
    if trial is not None and pick is not None:
        raise ConfigError("give --trial N or --pick RULE, not both: --pick chooses the trial")
    if trial is not None or (policy is not None and pick is None):
        return select_trial(run, trial, policy), None
    from .pick import pick_trial

    def keep(rec: Mapping[str, Any]) -> bool:
        return bool(rec.get("policy")) and policy_matches(rec["policy"], str(policy))

    picked = pick_trial(run.store.records(), run.store.objectives, pick, run.store.constraints, run.constraints,
                        int8_ok=fmt == "onnx-int8", keep=keep if policy is not None else None)
    check_usable(picked.record)
    return picked.record, picked


def final_trained(run: RunFolder, records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The run's best final-trained model (stage train, best validation accuracy), if any."""
    from nas.store import tie_break

    done = [r for r in records if r["stage"] == "train" and r["status"] == "complete"]
    # equal accuracy: the lower validation loss (`nas.store.tie_break`), then the latest
    return max(done, key=lambda r: (r["metrics"].get("val_acc", 0.0), -tie_break(r["metrics"]), r["number"])) if done else None


def policy_matches(text: str, wanted: str) -> bool:
    # whole names only: `structured` is not `unstructured` (a name that fits several is refused)
    pol = Policy.from_json(text)
    return pol.matches(wanted) or pol.has_passes(wanted)


def _pick_policy(run: RunFolder, records: Sequence[dict[str, Any]], arch: dict[str, Any], wanted: str) -> dict[str, Any]:
    comp = [r for r in records if r["stage"] == "compress" and r["policy"]]
    if not comp:
        raise ConfigError(f"--policy {wanted!r}: the run {str(run.dir)!r} has no compression trials (nas-run compress --run DIR)")
    mine = [r for r in comp if r["genotype"] == arch["genotype"] and policy_matches(r["policy"], wanted)]
    exact = [r for r in mine if Policy.from_json(r["policy"]).matches(wanted)]  # an id or whole label first
    mine = exact or mine
    if not mine:
        others = [r for r in comp if policy_matches(r["policy"], wanted)]
        own = [f"{r['number']} {policy_name(r['policy'])}" for r in comp if r["genotype"] == arch["genotype"]]
        if others:
            hint = f"; compression trials of other architectures match it: {', '.join(str(r['number']) for r in others[:6])} (give --trial N)"
        else:
            hint = f"; its compression trials: {', '.join(own)[:400] or 'none'}"
        raise ConfigError(f"trial {arch['number']} ({arch['genotype_id']}) has no compression trial matching --policy {wanted!r}{hint}")
    done = [r for r in mine if r["status"] == "complete"]
    if len({r["policy"] for r in done}) > 1:
        listed = "; ".join(f"trial {r['number']}: {Policy.from_json(r['policy']).id} {policy_name(r['policy'])}" for r in done)
        raise ConfigError(f"--policy {wanted!r} matches several policies ({listed}); give a policy id or --trial N")
    return (done or mine)[-1]


def check_usable(rec: Mapping[str, Any]) -> None:
    status = rec["status"]
    if status == "complete":
        return
    what = {"failed": "failed", "stopped": "was stopped early", "rejected": "was rejected before training",
            "running": "has not finished"}.get(status, status)
    err = f" ({str(rec.get('error') or '').splitlines()[0][:160]})" if rec.get("error") else ""
    raise ConfigError(f"trial {rec['number']} {what}{err}; only completed trials can be exported")


