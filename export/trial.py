"""`export_trial`: one trial of a run folder as a deployable file, loaded back and checked — the
function behind ``nas-run export DIR [--trial N] [--policy P] --format F --out PATH``.

A trial is an architecture trial (stage "search": the genotype built from the run's config,
its trained weights from ``weights/``) or a compression trial (stage "compress": the policy's
records replayed on the built genotype — re-parameterised first for the large-kernel space, as
compression did — and the fine-tuned weights from ``compressed/<gid>+<pid>/model.safetensors``;
an int8 trial is its kept ``model.onnx``). Without ``trial`` the best completed architecture
trial on the run's primary objective is taken (for a ``--model`` compression run, the best
compression trial); ``policy`` (a policy id or a substring of its label) picks a compression
trial of that architecture.

The exported model is the deploy form (`export_formats.deploy_form`). After writing (to a
temporary name next to ``out``), the file is loaded back in its runtime (`load_export`: ORT,
TorchScript, or rebuilt from the genotype and records) and checked against the in-memory
model — the trial's model as the run holds it, before merging and folding:

- float formats: max abs difference of the logits on the validation split (up to 512 samples)
  at most ``1e-4``;
- ``onnx-int8``: the file's logits equal those of the in-memory quantized model (same 1e-4), and
  its accuracy is re-measured on the whole validation split and stated against the float model.

Only a file that passes is moved to ``out``; a failed check is an `ExportCheckError` (nothing written).
The check is recorded in the run's store (`record_export`) and returned.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search_spaces import ConfigError, Genotype, UnknownNameError

from .errors import PolicyError
from .export_formats import (
    FORMATS,
    ExportCheckError,
    Exported,
    ExportError,
    ModelSpec,
    copy_module,
    deploy_form,
    load_export,
    sidecar_path,
    write_export,
)
from .passes.base import PassContext
from .policy import Policy

if TYPE_CHECKING:
    import numpy as np

    from nas.data import Dataset
    from nas.store import RunStore

    from .pick import Picked

__all__ = ["ExportResult", "export_trial", "record_export", "verify_export", "TOLERANCE"]

TOLERANCE = 1e-4  # max abs logit difference of a float export against the in-memory model
PARITY_SAMPLES = 512  # validation samples the float parity check runs (the int8 accuracy uses all)
EXPORTS_ATTR = "exports"  # study user attr "exports:<trial number>": the list of checked exports


@dataclass
class ExportResult:
    path: Path
    format: str
    trial: int
    genotype: str
    policy_label: str
    opset: int | None
    check: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    picked: str | None = None  # how the trial was chosen without --trial (`compress.pick`)
    # the exported model's accuracy against its float base, and the drop's limit (`_against_base`)
    against_base: dict[str, Any] = field(default_factory=dict)
    warning: str | None = None  # the drop exceeds its limit


# ---------------------------------------------------------------------------------------------
# a run folder, read


@dataclass
class _Run:
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


def _open_run(run_dir: str | os.PathLike[str]) -> _Run:
    from nas.objectives import parse_constraints, parse_objectives
    from nas.search import open_store, read_config
    from nas.store import RunStore

    from .run import read_compress_config

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
        return _Run(d, open_store(d, read_only=True), cfg.dataset, cfg.seed, True, cfg.space,
                    dict(space.options), None, calib, cfg.joint, cfg.val_fraction, layout=cfg.layout, **extra)
    if comp.get("model"):
        if not (d / "study.db").is_file():
            raise ConfigError(f"{str(d)!r} holds no study.db: nothing was compressed there yet")
        url = f"sqlite:///{(d / 'study.db').resolve()}"
        store = RunStore(url, parse_objectives(comp.get("objectives") or ("val_acc",)), (),
                         study_name=d.resolve().name, read_only=True)
        return _Run(d, store, str(comp["dataset"]), int(comp.get("seed", 0)), bool(comp.get("standardize", False)),
                    None, {}, str(comp["model"]), calib, layout=comp.get("layout"), **extra)
    raise ConfigError(f"{str(d)!r} is not a run folder (no config.json or compress.json)")


def _label(policy: str) -> str:
    return Policy.from_json(policy).label() if policy else "none"


def _select(run: _Run, trial: int | None, policy: str | None) -> dict[str, Any]:
    from nas.objectives import losses
    from nas.store import tie_break

    records = run.store.records()
    by_number = {r["number"]: r for r in records}
    if trial is not None:
        if trial not in by_number:
            span = f"0..{max(by_number)}" if by_number else "none yet"
            raise ConfigError(f"the run {str(run.dir)!r} has no trial {trial} (trials: {span})")
        rec = by_number[trial]
    elif policy is None and (trained := _final_trained(run, records)) is not None:
        rec = trained  # `nas-run train`'s model of the run's chosen architecture: what the user trained for
    else:
        stage = "search" if run.space is not None and not run.joint else "compress"
        done = [r for r in records if r["stage"] == stage and r["status"] == "complete"
                and losses(run.store.objectives, r["metrics"]) is not None]
        if stage == "compress" and policy is not None:  # a --model run: the best of that policy
            done = [r for r in done if _policy_matches(r["policy"], policy)]
            done = [r for r in done if Policy.from_json(r["policy"]).matches(policy)] or done  # whole name first
            if len({r["policy"] for r in done}) > 1:
                raise ConfigError(f"--policy {policy!r} matches several policies: "
                                  f"{', '.join(sorted({_label(r['policy']) for r in done}))}; give a policy id or --trial N")
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
            if not _policy_matches(rec["policy"], policy):
                raise ConfigError(f"trial {rec['number']} has policy {_label(rec['policy'])!r}, which --policy {policy!r} does not name")
        else:
            rec = _pick_policy(run, records, rec, policy)
    _check_usable(rec)
    return rec


def _choose(run: _Run, trial: int | None, policy: str | None, pick: str | None,
            fmt: str) -> tuple[dict[str, Any], Picked | None]:
    """The trial to export: ``--trial`` (and ``--policy`` without a rule) as `_select` finds them;
    otherwise the one the ``--pick`` rule (default: the run's objectives) picks among the run's
    architectures and compressed trials (`compress.pick`), narrowed to ``--policy``'s."""
    if trial is not None and pick is not None:
        raise ConfigError("give --trial N or --pick RULE, not both: --pick chooses the trial")
    if trial is not None or (policy is not None and pick is None):
        return _select(run, trial, policy), None
    from .pick import pick_trial

    def keep(rec: Mapping[str, Any]) -> bool:
        return bool(rec.get("policy")) and _policy_matches(rec["policy"], str(policy))

    picked = pick_trial(run.store.records(), run.store.objectives, pick, run.store.constraints, run.constraints,
                        int8_ok=fmt == "onnx-int8", keep=keep if policy is not None else None)
    _check_usable(picked.record)
    return picked.record, picked


def _final_trained(run: _Run, records: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The run's best final-trained model (stage train, best validation accuracy), if any."""
    from nas.store import tie_break

    done = [r for r in records if r["stage"] == "train" and r["status"] == "complete"]
    # equal accuracy: the lower validation loss (`nas.store.tie_break`), then the latest
    return max(done, key=lambda r: (r["metrics"].get("val_acc", 0.0), -tie_break(r["metrics"]), r["number"])) if done else None


def _policy_matches(text: str, wanted: str) -> bool:
    # whole names only: `structured` is not `unstructured` (a name that fits several is refused)
    pol = Policy.from_json(text)
    return pol.matches(wanted) or pol.has_passes(wanted)


def _pick_policy(run: _Run, records: Sequence[dict[str, Any]], arch: dict[str, Any], wanted: str) -> dict[str, Any]:
    comp = [r for r in records if r["stage"] == "compress" and r["policy"]]
    if not comp:
        raise ConfigError(f"--policy {wanted!r}: the run {str(run.dir)!r} has no compression trials (nas-run compress --run DIR)")
    mine = [r for r in comp if r["genotype"] == arch["genotype"] and _policy_matches(r["policy"], wanted)]
    exact = [r for r in mine if Policy.from_json(r["policy"]).matches(wanted)]  # an id or whole label first
    mine = exact or mine
    if not mine:
        others = [r for r in comp if _policy_matches(r["policy"], wanted)]
        own = [f"{r['number']} {_label(r['policy'])}" for r in comp if r["genotype"] == arch["genotype"]]
        if others:
            hint = f"; compression trials of other architectures match it: {', '.join(str(r['number']) for r in others[:6])} (give --trial N)"
        else:
            hint = f"; its compression trials: {', '.join(own)[:400] or 'none'}"
        raise ConfigError(f"trial {arch['number']} ({arch['genotype_id']}) has no compression trial matching --policy {wanted!r}{hint}")
    done = [r for r in mine if r["status"] == "complete"]
    if len({r["policy"] for r in done}) > 1:
        listed = "; ".join(f"trial {r['number']}: {Policy.from_json(r['policy']).id} {_label(r['policy'])}" for r in done)
        raise ConfigError(f"--policy {wanted!r} matches several policies ({listed}); give a policy id or --trial N")
    return (done or mine)[-1]


def _check_usable(rec: Mapping[str, Any]) -> None:
    status = rec["status"]
    if status == "complete":
        return
    what = {"failed": "failed", "stopped": "was stopped early", "rejected": "was rejected before training",
            "running": "has not finished"}.get(status, status)
    err = f" ({str(rec.get('error') or '').splitlines()[0][:160]})" if rec.get("error") else ""
    raise ConfigError(f"trial {rec['number']} {what}{err}; only completed trials can be exported")


# ---------------------------------------------------------------------------------------------
# the trial's model, rebuilt in memory


@dataclass
class _Reference:
    record: dict[str, Any]
    spec: ModelSpec
    module: Any = None  # the float torch model, eval mode (None for an int8 trial)
    onnx: bytes | None = None  # an int8 trial's kept model.onnx
    float_val_acc: float | None = None  # the uncompressed model's accuracy, for an int8 trial


def _reference(run: _Run, rec: dict[str, Any], data: Dataset) -> _Reference:
    import torch
    from safetensors.torch import load_file

    from nas.integrity import verify_file

    genotype = Genotype.from_str(rec["genotype"])
    shape, classes = tuple(data.input_shape), int(data.num_classes)
    base = {"genotype": rec["genotype"], "input_shape": shape, "num_classes": classes, "space": run.space,
            "space_options": run.space_options}
    if rec["stage"] != "compress":  # an architecture trial: build, load its trained weights
        from search_spaces import get_space

        path = run.dir / "weights" / f"{genotype.id}-s{rec['seed']}-e{rec['budget']}.safetensors"
        if rec["stage"] == "train":  # `nas-run train`'s weights, where its record says
            path = run.dir / str(run.store.study.get_trials(deepcopy=False)[rec["number"]].user_attrs.get("weights"))
        if not path.is_file():
            raise ConfigError(
                f"trial {rec['number']} has no trained weights ({path}): the run was made before weights were kept; "
                f"re-run the search, or compress it (nas-run compress --run {run.dir}), which re-trains and keeps them"
            )
        verify_file(path, "weights")  # an edited or truncated file is refused, not exported
        space = get_space(run.space, **run.space_options)
        module = space.build(space.from_str(rec["genotype"]), shape, classes)
        _load_weights(module, load_file(str(path)), path)
        return _Reference(rec, ModelSpec(**base), module.eval())

    from .evaluate import artefact_dir

    policy = Policy.from_json(rec["policy"])
    folder = artefact_dir(run.dir / "compressed", genotype, policy)
    meta_path = folder / "policy.json"
    if not meta_path.is_file():
        raise ConfigError(f"trial {rec['number']}'s compressed model is missing ({folder}); run nas-run compress --resume {run.dir}")
    verify_file(meta_path, "compressed model's records")
    kept = json.loads(meta_path.read_text())
    applied, records = _applied(run, policy, kept)
    builder = None
    if run.space is None:
        builder = run.model_spec
        if builder is None or ":" not in builder or Path(builder).is_file():
            builder = None  # a TorchScript file: no builder to rebuild from
    builder_sha = None
    if builder is not None:  # stored resolvable from any folder: module path, or absolute file + SHA-256
        from .user_model import portable_builder

        builder, builder_sha = portable_builder(builder)
    spec = ModelSpec(**base, builder=builder, applied=applied.to_str(), records=tuple(records), builder_sha256=builder_sha)
    if policy.terminal:
        onnx_path = folder / "model.onnx"
        if not onnx_path.is_file():
            raise ConfigError(f"trial {rec['number']}'s int8 model is missing ({onnx_path})")
        verify_file(onnx_path, "compressed model")
        return _Reference(rec, spec, onnx=onnx_path.read_bytes(), float_val_acc=rec["metrics"].get("base_val_acc"))
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"trial {rec['number']}'s compressed weights are missing ({weights})")
    verify_file(weights, "compressed weights")
    if run.space is None and builder is None:  # a user's TorchScript model: weights go into it
        from .user_model import load_user_model

        module = load_user_model(str(run.model_spec), None, shape, classes).module
        if applied.passes:
            module = applied.replay(module, spec.records, PassContext(data=data))
    else:
        module = spec.build()
    with torch.no_grad():
        _load_weights(module, load_file(str(weights)), weights)
    return _Reference(rec, spec, module.eval())


def _applied(run: _Run, policy: Policy, kept: Mapping[str, Any]) -> tuple[Policy, list[Any]]:
    """The policy as the compression stage applied it, and its records. Artefacts kept since the
    "merge" pass name it (``applied``); older ones of the large-kernel space were compressed in
    the merged form, i.e. "merge" then the policy."""
    records = list(kept["records"])
    if "applied" in kept:
        applied = Policy.from_json(kept["applied"])
    elif run.space == "unireplk":
        applied = Policy(Policy.of("merge").passes + policy.passes)
        records = [{"pass": "merge", "blocks": 0}, *records]
    else:
        applied = policy
    if len(records) != len(applied.passes):
        raise ConfigError(f"the kept records ({len(records)}) do not fit the policy {applied.label()!r}")
    return applied, records


def _load_weights(module: Any, state: Mapping[str, Any], path: Path) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"the weights {str(path)!r} do not fit the rebuilt model: {str(exc).splitlines()[0]}") from None


# ---------------------------------------------------------------------------------------------
# export


def export_trial(
    run_dir: str | os.PathLike[str],
    trial: int | None = None,
    format: str = "onnx",  # noqa: A002 - the CLI flag's name
    out: str | os.PathLike[str] | None = None,
    policy: str | None = None,
    record: bool = True,
    pick: str | None = None,
    strict: bool = False,
) -> ExportResult:
    """Export one trial of ``run_dir`` as ``format`` to ``out``, load it back, check it, record
    the check in the run's store (see the module docstring). Bad input is a `ConfigError`.
    Without ``trial``, ``pick`` (a `compress.pick` rule; default the run's objectives) chooses.
    ``strict``: a drop against the float base over its limit refuses the export (an
    `AccuracyDropError`, nothing written) instead of a warning."""
    if format not in FORMATS:
        raise ConfigError(str(UnknownNameError("export format", format, FORMATS)))
    if out is None:
        raise ConfigError("give --out PATH for the exported file")
    run = _open_run(run_dir)
    rec, picked = _choose(run, trial, policy, pick, format)
    out_path = _writable(Path(out))
    data = run.data()
    ref = _reference(run, rec, data)
    notes: list[str] = []
    if rec["stage"] == "train":
        notes.append(f"the final-trained model (nas-run train, {rec['budget']} epochs, seed {rec['seed']}): "
                     f"val_acc {rec['metrics'].get('val_acc', float('nan')):.4f}, test_acc {rec['metrics'].get('test_acc', float('nan')):.4f}")
    meta = _metadata(run, ref, data)
    q_bytes: bytes | None = None
    deploy = None
    if ref.module is not None:
        deploy = deploy_form(copy_module(ref.module))
    if format == "onnx-int8":
        if ref.onnx is not None:
            q_bytes = ref.onnx
            notes.append(f"int8: the trial's own quantized model ({_label(rec['policy'])})")
        else:
            q_bytes, meta = _quantize(run, ref, deploy, data, meta, notes)
    elif ref.onnx is not None:
        raise ConfigError(
            f"trial {rec['number']} is an int8 model in ONNX Runtime ({_label(rec['policy'])}); it exports only as onnx-int8"
        )
    elif format == "safetensors" and ref.spec.space is None and ref.spec.builder is None:
        raise ConfigError("a TorchScript model cannot be exported as safetensors (nothing rebuilds it); use torchscript or onnx")

    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        try:
            written = write_export(tmp, format, meta, model=deploy, onnx_bytes=q_bytes)
        except (OSError, RuntimeError, ValueError, TypeError) as exc:  # not ours: the exporter's or the disk's
            if isinstance(exc, PolicyError):
                raise
            raise ConfigError(
                f"trial {rec['number']} cannot be exported as {format}: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
            ) from None
        loaded = load_export(tmp, threads=1)
        check = _check(loaded, ref, q_bytes, data)
        if not check["passed"]:
            raise ExportCheckError(f"export check failed for {out_path}: {check['summary']}; nothing was written")
        base = _against_base(run, ref, loaded, check, data, picked)
        if base["warning"] and strict:  # refused before the file is moved in: nothing written
            raise AccuracyDropError(f"{base['warning']}; --strict: nothing was written to {out_path}")
        _commit(tmp, out_path, format)
    finally:
        for p in (tmp, sidecar_path(tmp)):
            p.unlink(missing_ok=True)
    result = ExportResult(out_path, format, int(rec["number"]), rec["genotype"], _label(written["policy"]),
                          written.get("opset"), check, notes, written)
    result.picked = picked.line() if picked is not None else None
    result.notes[:0] = picked.notes if picked is not None else []
    result.against_base, result.warning = base, base["warning"]
    result.check = dict(check, against_base={k: v for k, v in base.items() if k != "line"})
    if record:
        record_export(run.store, result)
    return result


class AccuracyDropError(ConfigError):
    """``--strict``: the exported model is further below its float base than the limit allows."""


def _against_base(run: _Run, ref: _Reference, loaded: Exported, check: Mapping[str, Any], data: Dataset,
                  picked: Picked | None) -> dict[str, Any]:
    """The exported file's accuracy on the validation split next to its float base — the
    uncompressed model: a compressed trial's ``base_val_acc``, else the trial's own float model
    — the drop in points, and a warning when it exceeds the limit (`compress.pick.drop_limit`).
    Accuracy is measured (argmax) where labels are classes scored by accuracy; otherwise (a
    --model run's --metric) the recorded values are stated."""
    from .pick import drop_limit

    rec, x, y = ref.record, data.x_val, data.y_val
    measured = data.label_kind == "classes" and run.metric in (None, "accuracy") and len(y) > 0
    if check.get("kind") == "accuracy":  # int8: measured on the whole split by the check
        acc = float(check["val_acc"])
    elif measured:
        acc = float((loaded.predict(x).argmax(1) == y).mean())
    else:
        acc = float(rec["metrics"].get("val_acc", float("nan")))
    base = rec["metrics"].get("base_val_acc") if rec.get("policy") else None
    if base is None:  # the trial is its own float base (quantised now, or a float format)
        if check.get("float_val_acc") is not None:
            base = check["float_val_acc"]
        elif measured and ref.module is not None:
            base = float((_torch_logits(ref.module, x).argmax(1) == y).mean())
        else:
            base = rec["metrics"].get("val_acc", float("nan"))
    base = float(base)
    drop = 100.0 * (base - acc)
    limit, whence = drop_limit(picked.where if picked is not None else (), run.store.constraints, run.constraints)
    over = drop > limit + 1e-9  # the boundary tolerance of `nas.objectives`
    how = f"on {len(y)} validation samples" if measured or check.get("kind") == "accuracy" else "as recorded"
    line = (f"val_acc {acc:.4f} {how} (the exported file); float base {base:.4f}: drop {drop:+.2f} pts "
            f"({'over' if over else 'within'} the limit of {limit:g} pts: {whence})")
    warning = (f"the exported model is {drop:.2f} points below its float base ({acc:.4f} vs {base:.4f}), "
               f"over the limit of {limit:g} pts ({whence})") if over else None
    return {"val_acc": acc, "base_val_acc": base, "acc_drop_pts": drop, "limit_pts": limit, "limit_from": whence,
            "measured": measured, "line": line, "warning": warning}


def _writable(out: Path) -> Path:
    if out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a folder; give the path of the file to write")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.with_name(f".{out.name}.probe-{os.getpid()}")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"cannot write --out {str(out)!r}: {exc.strerror or exc}") from None
    return out


def _commit(tmp: Path, out: Path, fmt: str) -> None:
    if fmt == "safetensors":
        os.replace(sidecar_path(tmp), sidecar_path(out))
    os.replace(tmp, out)


def _metadata(run: _Run, ref: _Reference, data: Dataset) -> dict[str, Any]:
    from importlib import metadata as md

    rec, spec = ref.record, ref.spec
    pol = Policy.from_json(rec["policy"] or "")
    layout = data.layout or None  # None: a --model run's data as stored, axes not given nor readable
    meta = spec.to_json()
    meta.update(
        producer=f"nas-run {md.version('nas-run')}",
        run=str(run.dir.resolve()),
        trial=int(rec["number"]),
        stage=rec["stage"] or "search",
        policy=pol.to_str(),  # the trial's policy, as the store and compressed/<gid>+<pid> name it
        policy_id=pol.id,
        policy_label=pol.label(),
        metrics={k: float(v) for k, v in rec["metrics"].items()},
        input_spec={
            "name": "input",
            "shape": ["batch", *data.input_shape],
            "dtype": "float32",
            "layout": layout,
            # the run's inputs were standardised per channel: x = (raw - mean) / std
            "standardize": {"mean": list(data.mean), "std": list(data.std)} if run.standardize else None,
            "class_names": list(data.class_names),
        },
        deploy=["reparameterize", "fold_batchnorm"],
    )
    return meta


def _quantize(run: _Run, ref: _Reference, deploy: Any, data: Dataset, meta: dict[str, Any],
              notes: list[str]) -> tuple[bytes, dict[str, Any]]:
    """int8 for a float trial: the int8 pass's defaults (the compression stage's fastest settings
    on this CPU), calibrated on the run's training split; the policy becomes trial policy + int8."""
    from .evaluate import deploy_policy
    from .passes.base import get_pass

    int8 = Policy.of(("int8", {}))
    ctx = PassContext(data=data, seed=run.data_seed, calib_size=run.calib_size)
    q, rec = get_pass("int8").apply(deploy, int8.passes[0].settings, ctx)
    applied = Policy.from_json(ref.spec.applied)
    # as the compression stage would apply it: a model with training branches is merged first
    # no "bn_recalib" here: int8 quantises the trial's stored weights, whose statistics are final
    combined = deploy_policy(Policy._checked(applied.passes + int8.passes), run.space == "unireplk", recalibrate=False)
    records = list(meta["records"])
    if len(combined.passes) == len(applied.passes) + 2:  # a "merge" went in before int8
        records.append({"pass": "merge", "blocks": _mergeable_blocks(ref.module)})
    records.append({"pass": "int8", **rec})
    trial_policy = Policy._checked(Policy.from_json(meta["policy"]).passes + int8.passes)
    s = int8.passes[0].settings
    notes.append(
        f"int8: quantized now with the int8 pass's defaults ({s['format']}, activations {s['activation_type']}, "
        f"weights {s['weight_type']}, {'per-channel' if s['per_channel'] else 'per-tensor'}, {s['calibration']} "
        f"calibration on {rec['calib_samples']} samples of the run's training split)"
    )
    notes.extend(ctx.notes)
    meta = dict(meta, policy=trial_policy.to_str(), policy_id=trial_policy.id, policy_label=trial_policy.label(),
                applied_policy=combined.to_str(), records=records, int8_settings=dict(s))
    return q.model_bytes, meta


# ---------------------------------------------------------------------------------------------
# the check


def _mergeable_blocks(model: Any) -> int:
    from search_spaces.lk_blocks import ConvBN, DilatedReparamBlock

    return sum(isinstance(m, ConvBN | DilatedReparamBlock) for m in model.modules())


def _check(loaded: Exported, ref: _Reference, q_bytes: bytes | None, data: Dataset) -> dict[str, Any]:
    import numpy as np

    if loaded.format == "onnx-int8":
        from .passes.int8 import onnx_logits

        x, y = data.x_val, data.y_val
        got = loaded.predict(x)
        want = onnx_logits(q_bytes, x)  # the in-memory quantized model, same runtime
        diff = float(np.abs(got - want).max()) if len(x) else 0.0
        acc = float((got.argmax(1) == y).mean()) if len(y) else 0.0
        float_acc = ref.float_val_acc
        if float_acc is None and ref.module is not None:
            float_acc = float((_torch_logits(ref.module, x).argmax(1) == y).mean())
        drop = None if float_acc is None else 100.0 * (float_acc - acc)
        passed = diff <= TOLERANCE
        summary = (f"int8 val_acc {acc:.4f} in ONNX Runtime on {len(y)} validation samples"
                   + (f"; float {float_acc:.4f}: drop {drop:+.2f} pts" if drop is not None else "")
                   + f"; file vs in-memory int8 model max abs diff {diff:.2e}")
        return {"passed": passed, "kind": "accuracy", "val_acc": acc, "float_val_acc": float_acc,
                "acc_drop_pts": drop, "max_abs_diff": diff, "tolerance": TOLERANCE, "samples": int(len(y)),
                "summary": summary if passed else f"{summary} > {TOLERANCE:g}"}
    x = data.x_val[:PARITY_SAMPLES]
    want = _torch_logits(ref.module, x)
    got = loaded.predict(x)
    if got.shape != want.shape:
        return {"passed": False, "kind": "max_abs_diff", "max_abs_diff": float("inf"), "tolerance": TOLERANCE,
                "samples": int(len(x)), "summary": f"output shape {got.shape}, the model's {want.shape}"}
    diff = float(np.abs(got - want).max()) if len(x) else 0.0
    passed = bool(np.isfinite(diff) and diff <= TOLERANCE)
    runtime = {"onnx": "ONNX Runtime", "pt2": "torch.export", "torchscript": "TorchScript",
               "safetensors": "PyTorch (rebuilt)"}[loaded.format]
    summary = (f"max abs diff {diff:.2e} {'<=' if passed else '>'} {TOLERANCE:g} on {len(x)} validation samples "
               f"({runtime} vs the trial's model in PyTorch)")
    return {"passed": passed, "kind": "max_abs_diff", "max_abs_diff": diff, "tolerance": TOLERANCE,
            "samples": int(len(x)), "summary": summary}


def _torch_logits(module: Any, x: np.ndarray, batch: int = 256) -> np.ndarray:
    import numpy as np
    import torch

    module.eval()
    with torch.no_grad():
        outs = [module(torch.as_tensor(np.asarray(x[i : i + batch], dtype=np.float32))).numpy()
                for i in range(0, len(x), batch)]
    return np.concatenate(outs)


def verify_export(path: str | os.PathLike[str], run_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Check an existing export again against its trial (``run_dir``, default the run its
    metadata names): loaded (hash checked), then the same parity / accuracy check as at export.
    Returns the check; a failed one is an `ExportError`."""
    loaded = load_export(path, threads=1)
    meta = loaded.metadata
    run = _open_run(run_dir if run_dir is not None else meta["run"])
    rec = _select(run, int(meta["trial"]), None)
    if rec["genotype"] != meta["genotype"]:
        raise ExportError(f"{str(path)!r} was exported from genotype {meta['genotype']}, trial {rec['number']} is {rec['genotype']}")
    data = run.data()
    ref = _reference(run, rec, data)
    q_bytes = None
    if loaded.format == "onnx-int8":
        if ref.onnx is not None:
            q_bytes = ref.onnx
        else:  # quantized at export: replay the int8 record (exact: its ranges, no calibration)
            from .passes.base import get_pass

            int8_rec = {k: v for k, v in meta["records"][-1].items() if k != "pass"}
            deploy = deploy_form(copy_module(ref.module))
            q_bytes = get_pass("int8").replay(deploy, int8_rec, PassContext(data=data)).model_bytes
    check = _check(loaded, ref, q_bytes, data)
    if not check["passed"]:
        raise ExportCheckError(f"export check failed for {str(path)!r}: {check['summary']}")
    return check


# ---------------------------------------------------------------------------------------------
# the store


def record_export(store: RunStore, result: ExportResult) -> dict[str, Any]:
    """Append the export and its check to the trial's record in the store.

    Optuna refuses user attributes on finished trials, so the list lives in the study's user
    attribute ``exports:<trial number>`` (one key per trial: two exports of different trials
    never race on one value)."""
    entry = {
        "format": result.format,
        "path": str(result.path.resolve()),
        "policy_id": result.metadata.get("policy_id"),
        "opset": result.opset,
        "check": {k: v for k, v in result.check.items() if k != "summary"} | {"summary": result.check["summary"]},
        "time": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    key = f"{EXPORTS_ATTR}:{result.trial}"
    study = store.study
    current = list(study.user_attrs.get(key, []))
    study.set_user_attr(key, [*current, entry])
    return entry


def exports_of(store: RunStore, trial: int) -> list[dict[str, Any]]:
    """The checked exports recorded for ``trial``."""
    return list(store.study.user_attrs.get(f"{EXPORTS_ATTR}:{trial}", []))


__all__ += ["exports_of", "AccuracyDropError", "ExportCheckError", "ExportError", "PolicyError"]
