"""`export_trial`: one trial of a run folder as a deployable file, loaded back and checked — the
function behind ``nas-run export DIR [--trial N] [--policy P] --format F --out PATH``.

A trial is an architecture trial (stage "search", or "train" for `nas-run train`'s model) or a
compression trial (stage "compress"); its model is its artefact (`nas.artefact`), loaded through
the one loader (`export.reference`: verified, rebuilt from the manifest; an int8 trial is its
kept ``model.onnx``). Without ``trial`` the best completed architecture
trial on the run's primary objective is taken (for a ``--model`` compression run, the best
compression trial); ``policy`` (a policy id or a substring of its label) picks a compression
trial of that architecture.

The exported model is the deploy form (`export.formats.deploy_form`). After writing (to a
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
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.errors import PolicyError
from compress.passes.base import PassContext
from compress.policy import Policy
from search_spaces import ConfigError, UnknownNameError

from . import FORMATS
from .check import TOLERANCE, parity_check, torch_logits, verify_export
from .formats import (
    ExportCheckError,
    Exported,
    ExportError,
    copy_module,
    deploy_form,
    load_export,
    sidecar_path,
    write_export,
)
from .reference import Reference, reference
from .run_folder import RunFolder, choose_trial, open_run, policy_name

if TYPE_CHECKING:
    from nas.data import Dataset
    from nas.store import RunStore

    from .pick import Picked

__all__ = ["ExportResult", "TOLERANCE", "export_trial", "record_export", "verify_export"]

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
    picked: str | None = None  # how the trial was chosen without --trial (`export.pick`)
    # the exported model's accuracy against its float base, and the drop's limit (`_against_base`)
    against_base: dict[str, Any] = field(default_factory=dict)
    warning: str | None = None  # the drop exceeds its limit


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
    Without ``trial``, ``pick`` (an `export.pick` rule; default the run's objectives) chooses.
    ``strict``: a drop against the float base over its limit refuses the export (an
    `AccuracyDropError`, nothing written) instead of a warning."""
    if format not in FORMATS:
        raise ConfigError(str(UnknownNameError("export format", format, FORMATS)))
    if out is None:
        raise ConfigError("give --out PATH for the exported file")
    run = open_run(run_dir)
    rec, picked = choose_trial(run, trial, policy, pick, format)
    out_path = _writable(Path(out))
    data = run.data()
    ref = reference(run, rec, data)
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
            notes.append(f"int8: the trial's own quantized model ({policy_name(rec['policy'])})")
        else:
            q_bytes, meta = _quantize(run, ref, deploy, data, meta, notes)
    elif ref.onnx is not None:
        raise ConfigError(
            f"trial {rec['number']} is an int8 model in ONNX Runtime ({policy_name(rec['policy'])}); it exports only as onnx-int8"
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
        check = parity_check(loaded, ref, q_bytes, data)
        if not check["passed"]:
            raise ExportCheckError(f"export check failed for {out_path}: {check['summary']}; nothing was written")
        base = _against_base(run, ref, loaded, check, data, picked)
        if base["warning"] and strict:  # refused before the file is moved in: nothing written
            raise AccuracyDropError(f"{base['warning']}; --strict: nothing was written to {out_path}")
        _commit(tmp, out_path, format)
    finally:
        for p in (tmp, sidecar_path(tmp)):
            p.unlink(missing_ok=True)
    result = ExportResult(out_path, format, int(rec["number"]), rec["genotype"], policy_name(written["policy"]),
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


def _against_base(run: RunFolder, ref: Reference, loaded: Exported, check: Mapping[str, Any], data: Dataset,
                  picked: Picked | None) -> dict[str, Any]:
    """The exported file's accuracy on the validation split next to its float base — the
    uncompressed model: a compressed trial's ``base_val_acc``, else the trial's own float model
    — the drop in points, and a warning when it exceeds the limit (`export.pick.drop_limit`).
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
            base = float((torch_logits(ref.module, x).argmax(1) == y).mean())
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


def _metadata(run: RunFolder, ref: Reference, data: Dataset) -> dict[str, Any]:
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


def _quantize(run: RunFolder, ref: Reference, deploy: Any, data: Dataset, meta: dict[str, Any],
              notes: list[str]) -> tuple[bytes, dict[str, Any]]:
    """int8 for a float trial: the int8 pass's defaults (the compression stage's fastest settings
    on this CPU), calibrated on the run's training split; the policy becomes trial policy + int8."""
    from compress.evaluate import deploy_policy
    from compress.passes.base import get_pass

    int8 = Policy.of(("int8", {}))
    ctx = PassContext(data=data, seed=run.data_seed, calib_size=run.calib_size)
    q, rec = get_pass("int8").apply(deploy, int8.passes[0].settings, ctx)
    applied = Policy.from_json(ref.spec.applied)
    # as the compression stage would apply it: a model with training branches is merged first
    # no "bn_recalib" here: int8 quantises the trial's stored weights, whose statistics are final
    combined = deploy_policy(Policy._checked(applied.passes + int8.passes), run.space == "unireplk", recalibrate=False)
    records = list(meta["records"])
    if len(combined.passes) == len(applied.passes) + 2:  # a "merge" went in before int8
        records.append({"pass": "merge", "blocks": mergeable_blocks(ref.module)})
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


def mergeable_blocks(model: Any) -> int:
    from search_spaces.lk_blocks import ConvBN, DilatedReparamBlock

    return sum(isinstance(m, ConvBN | DilatedReparamBlock) for m in model.modules())


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
