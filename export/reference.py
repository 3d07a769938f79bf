"""The trial's model in memory, as the run holds it (before merging and folding): what an export is
written from and checked against (`Reference`). It is the trial's artefact (`nas.artefact`: model
file + manifest), located from the trial's record and loaded through the one loader
(`compress.artefact_model.load_artefact`), which verifies it and rebuilds the model from the
manifest. A run made before artefacts still exports: its model file is described from the run's
config and the trial's record (and a compression trial's ``policy.json``), with a note."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.policy import Policy
from search_spaces import ConfigError, Genotype

from .formats import ModelSpec

if TYPE_CHECKING:
    from nas.data import Dataset

    from .run_folder import RunFolder

__all__ = ["Reference", "reference"]


@dataclass
class Reference:
    record: dict[str, Any]
    spec: ModelSpec
    module: Any = None  # the float torch model, eval mode (None for an int8 trial)
    onnx: bytes | None = None  # an int8 trial's kept model.onnx
    float_val_acc: float | None = None  # the uncompressed model's accuracy, for an int8 trial


def reference(run: RunFolder, rec: dict[str, Any], data: Dataset) -> Reference:
    """The trial's artefact (`artefact_file`), loaded through the one loader: verified, rebuilt from
    its manifest. A model file from before artefacts is described from the run (`_legacy`)."""
    from compress.artefact_model import load_artefact
    from nas.artefact import has_manifest

    path = artefact_file(run, rec)
    loaded = load_artefact(path, legacy=None if has_manifest(path) else _legacy(run, rec, path, data))
    if loaded.spec.genotype != rec["genotype"]:
        raise ConfigError(f"the artefact {str(path)!r} holds {loaded.spec.genotype}, trial {rec['number']} is {rec['genotype']}")
    float_acc = rec["metrics"].get("base_val_acc") if loaded.onnx is not None else None
    return Reference(rec, loaded.spec, loaded.module, loaded.onnx, float_acc)


def artefact_file(run: RunFolder, rec: Mapping[str, Any]) -> Path:
    """Where a trial's model file is: a search trial's weights, `nas-run train`'s (its record says
    where), or a compression trial's ``compressed/<gid>+<pid>/model.safetensors`` (``model.onnx``
    for int8)."""
    genotype = Genotype.from_str(rec["genotype"])
    if rec["stage"] == "compress":
        from compress.evaluate import artefact_dir

        policy = Policy.from_json(rec["policy"])
        folder = artefact_dir(run.dir / "compressed", genotype, policy)
        path = folder / ("model.onnx" if policy.terminal else "model.safetensors")
        if not path.is_file():
            raise ConfigError(f"trial {rec['number']}'s compressed model is missing ({path}); "
                              f"run nas-run compress --resume {run.dir}")
        return path
    if rec["stage"] == "train":
        return run.dir / str(run.store.study.get_trials(deepcopy=False)[rec["number"]].user_attrs.get("weights"))
    path = run.dir / "weights" / f"{genotype.id}-s{rec['seed']}-e{rec['budget']}.safetensors"
    if not path.is_file():
        raise ConfigError(
            f"trial {rec['number']} has no trained weights ({path}): the run was made before weights were kept; "
            f"re-run the search, or compress it (nas-run compress --run {run.dir}), which re-trains and keeps them"
        )
    return path


def _legacy(run: RunFolder, rec: Mapping[str, Any], path: Path, data: Dataset) -> dict[str, Any]:
    """The manifest fields of a model file written before artefacts, from the run's config and the
    trial's record (a compression trial's from its verified ``policy.json``)."""
    from nas.artefact import describe_model
    from nas.integrity import verify_file

    model = describe_model(rec["genotype"], data.input_shape, data.num_classes, run.space, run.space_options)
    if rec["stage"] != "compress":
        return {"kind": "train" if rec["stage"] == "train" else "trial", "model": model}
    records_file = path.with_name("policy.json")
    verify_file(records_file, "compressed model's records")
    applied, records = _applied(run, Policy.from_json(rec["policy"]), json.loads(records_file.read_text()))
    model.update(applied_policy=applied.to_str(), records=records)
    if run.space is None:  # a user's builder, stored resolvable from any folder; or a TorchScript file
        spec = str(run.model_spec)
        if ":" in spec and not Path(spec).is_file():
            from compress.user_model import portable_builder

            model["builder"], model["builder_sha256"] = portable_builder(spec)
        else:
            model["base_model"] = spec
    return {"kind": "compressed", "model": model, "policy": rec["policy"]}


def _applied(run: RunFolder, policy: Policy, kept: Mapping[str, Any]) -> tuple[Policy, list[Any]]:
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
