"""The model of an artefact (`nas.artefact`): loading any kind (`load_artefact`, the one loader
`export`, ``compress --run`` and `nas-run train`'s copy go through) and describing the kind this
stage writes (`describe_compressed`).

`load_artefact` opens the artefact (verified: manifest against its digest, every file against the
manifest) and rebuilds its model without a pickle: the structure from the manifest's ``model``
(`ModelSpec`: genotype built, or the user's builder; the applied policy's records replayed), then
the weights, which must fit it exactly. An int8 artefact is its ONNX bytes (ONNX Runtime only);
a compressed user TorchScript model is its graph (``base_model``) with the records replayed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas.artefact import Artefact, open_artefact
from search_spaces import ConfigError

from .model_spec import ModelSpec, _ShapeOnly
from .passes.base import PassContext
from .policy import Compressed, Policy

if TYPE_CHECKING:
    from torch import nn

__all__ = ["LoadedArtefact", "describe_compressed", "load_artefact"]


@dataclass
class LoadedArtefact:
    artefact: Artefact
    spec: ModelSpec
    module: nn.Module | None = None  # the float torch model, eval mode, CPU (None for int8)
    onnx: bytes | None = None  # an int8 artefact's model, for ONNX Runtime

    @property
    def kind(self) -> str:
        return self.artefact.kind


def load_artefact(source: str | os.PathLike[str] | Artefact, legacy: Mapping[str, Any] | None = None) -> LoadedArtefact:
    """``source``: a model file, a manifest, an artefact folder, or an `Artefact` already opened.
    ``legacy``: the description of a model file written before artefacts (`nas.artefact.open_artefact`).
    A refused file or weights that do not fit are a `ConfigError` naming the file."""
    art = source if isinstance(source, Artefact) else open_artefact(source, legacy)
    spec = ModelSpec.from_json(art.model)
    if art.format == "onnx":
        return LoadedArtefact(art, spec, onnx=art.model_file.read_bytes())
    base_model = art.model.get("base_model")
    if spec.space is None and spec.builder is None and base_model:
        module = _torchscript_base(str(base_model), spec)
    else:
        module = spec.build()
    _load_weights(module, art.model_file)
    return LoadedArtefact(art, spec, module.eval())


def _torchscript_base(path: str, spec: ModelSpec) -> nn.Module:
    """A user's TorchScript model with the applied policy's (float) records replayed on it."""
    from .user_model import load_user_model

    module = load_user_model(path, None, spec.input_shape, spec.num_classes).module
    policy = Policy.from_json(spec.applied)
    passes, records = policy.passes, list(spec.records)
    if policy.terminal:
        passes, records = passes[:-1], records[:-1]
    if passes:
        module = Policy(passes).replay(module, records, PassContext(data=_ShapeOnly(spec.input_shape, spec.num_classes)))
    return module


def _load_weights(module: Any, path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    try:
        with torch.no_grad():
            module.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"the weights {str(path)!r} do not fit the rebuilt model: {str(exc).splitlines()[0]}") from None


def describe_compressed(model: Mapping[str, Any], out: Compressed) -> dict[str, Any]:
    """The ``model`` of a compressed artefact: its uncompressed model's (``model``: genotype and
    space, or builder / base_model) with the policy as applied (``out.policy``) and its records."""
    return {**model, "applied_policy": out.policy.to_str(), "records": list(out.records)}
