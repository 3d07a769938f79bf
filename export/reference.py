"""The trial's model rebuilt in memory, as the run holds it (before merging and folding): what an
export is written from and checked against (`Reference`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.passes.base import PassContext
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
        return Reference(rec, ModelSpec(**base), module.eval())

    from compress.evaluate import artefact_dir

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
        from compress.user_model import portable_builder

        builder, builder_sha = portable_builder(builder)
    spec = ModelSpec(**base, builder=builder, applied=applied.to_str(), records=tuple(records), builder_sha256=builder_sha)
    if policy.terminal:
        onnx_path = folder / "model.onnx"
        if not onnx_path.is_file():
            raise ConfigError(f"trial {rec['number']}'s int8 model is missing ({onnx_path})")
        verify_file(onnx_path, "compressed model")
        return Reference(rec, spec, onnx=onnx_path.read_bytes(), float_val_acc=rec["metrics"].get("base_val_acc"))
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"trial {rec['number']}'s compressed weights are missing ({weights})")
    verify_file(weights, "compressed weights")
    if run.space is None and builder is None:  # a user's TorchScript model: weights go into it
        from compress.user_model import load_user_model

        module = load_user_model(str(run.model_spec), None, shape, classes).module
        if applied.passes:
            module = applied.replay(module, spec.records, PassContext(data=data))
    else:
        module = spec.build()
    with torch.no_grad():
        _load_weights(module, load_file(str(weights)), weights)
    return Reference(rec, spec, module.eval())


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


def _load_weights(module: Any, state: Mapping[str, Any], path: Path) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"the weights {str(path)!r} do not fit the rebuilt model: {str(exc).splitlines()[0]}") from None


