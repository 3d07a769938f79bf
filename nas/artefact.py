"""An artefact: one model a stage produced, as files that say what they hold.

Every stage that produces a model writes one: a search trial (`keep_trial_artefact`, beside the
weights the `TrainingEvaluator` keeps), ``nas-run train`` (`nas.final_training`) and a
compression trial (`compress.evaluate`). An artefact is the model file — safetensors weights, or
``model.onnx`` for an int8 model that exists only in ONNX Runtime — plus its manifest beside it,
``<model file stem>.manifest.json``::

    weights/<gid>-s<seed>-e<budget>.safetensors     + <gid>-s<seed>-e<budget>.manifest.json   (trial)
    train/<key>/model.safetensors, trained/<gid>.safetensors + model / <gid>.manifest.json  (train)
    compressed/<gid>+<pid>/model.safetensors | model.onnx    + model.manifest.json (compressed)

The manifest (plain JSON, `ARTEFACT_VERSION`) holds the ``kind``, the ``model`` that rebuilds the
structure without a pickle (genotype, space and its resolved options, or a user's builder;
input shape and classes; the policy as applied and one record per pass — the keys of
`compress`'s ``ModelSpec``), the trial's ``policy``, the ``input_spec`` (shape, layout,
standardisation, class names), the ``data`` it was trained and measured on, the ``training``
(recipe, epochs, seed), the ``metrics``, and ``files``: the SHA-256 of every file of the artefact.
The manifest itself has a ``.sha256`` sidecar (`nas.integrity`), so an edited manifest is refused
like an edited weight file.

`open_artefact` verifies an artefact before anything reads it: the manifest against its sidecar,
then every file against the manifest; any mismatch is an `IntegrityError` (one line naming the
file). Building the model is `compress.artefact_loader.load_artefact` (it replays compression
records, which `nas` cannot import). A model file written before manifests were kept is opened
from a description its reader gives (``legacy=``: the run's config and record), with a note.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search_spaces import ConfigError, Genotype

from .integrity import IntegrityError, digest_path, file_sha256, replace_with_digest, verify_file

if TYPE_CHECKING:
    from .data import Dataset
    from .training import TrainingEvaluator

__all__ = [
    "ARTEFACT_VERSION",
    "KINDS",
    "MANIFEST_SUFFIX",
    "Artefact",
    "describe_model",
    "has_manifest",
    "input_spec",
    "keep_trial_artefact",
    "manifest_path",
    "open_artefact",
    "write_artefact",
]

ARTEFACT_VERSION = 1
KINDS = ("trial", "train", "compressed")
MANIFEST_SUFFIX = ".manifest.json"
_REQUIRED = ("kind", "model_file", "files", "model")
_noted_legacy: set[str] = set()


def manifest_path(model_file: str | os.PathLike[str]) -> Path:
    """``weights/g-s0-e8.safetensors`` -> ``weights/g-s0-e8.manifest.json``."""
    p = Path(model_file)
    return p.with_name(p.stem + MANIFEST_SUFFIX)


def has_manifest(model_file: str | os.PathLike[str]) -> bool:
    return manifest_path(model_file).is_file()


@dataclass(frozen=True)
class Artefact:
    """An opened (verified) artefact; ``legacy``: described by its reader, not by a manifest."""

    model_file: Path
    manifest: Mapping[str, Any]
    legacy: bool = False

    @property
    def kind(self) -> str:
        return str(self.manifest["kind"])

    @property
    def format(self) -> str:
        """``safetensors`` (torch weights) or ``onnx`` (an int8 model, ONNX Runtime only)."""
        return "onnx" if self.model_file.suffix == ".onnx" else "safetensors"

    @property
    def model(self) -> Mapping[str, Any]:
        """What rebuilds the structure (the keys of `compress`'s ``ModelSpec``)."""
        return self.manifest["model"]

    @property
    def genotype(self) -> str:
        return str(self.model["genotype"])

    @property
    def metrics(self) -> dict[str, float]:
        return dict(self.manifest.get("metrics") or {})

    @property
    def manifest_file(self) -> Path:
        return manifest_path(self.model_file)


# ---------------------------------------------------------------------------------------------
# writing


def write_artefact(model_file: str | os.PathLike[str], kind: str, model: Mapping[str, Any],
                   extra_files: Sequence[str | os.PathLike[str]] = (), **fields: Any) -> Path:
    """The manifest of ``model_file`` (already written in full) and of ``extra_files`` (in the same
    folder), written atomically with its digest; returns its path. ``model``: what rebuilds the
    structure (`describe_model`); ``fields``: policy, input_spec, data, training, metrics, ..."""
    from importlib import metadata as md

    if kind not in KINDS:
        raise ValueError(f"artefact kind {kind!r}; one of {KINDS}")
    p = Path(model_file)
    files = [p, *(Path(f) for f in extra_files)]
    if any(f.parent != p.parent for f in files):
        raise ValueError("an artefact's files share one folder")
    manifest = {
        "nas_run_artefact": ARTEFACT_VERSION,
        "kind": kind,
        "model_file": p.name,
        "files": {f.name: file_sha256(f) for f in files},
        "model": dict(model),
        **{k: v for k, v in fields.items() if v is not None},
        "producer": f"nas-run {md.version('nas-run')}",
    }
    target = manifest_path(p)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(_plain(manifest), indent=1, sort_keys=True), encoding="utf-8")
    replace_with_digest(tmp, target)
    return target


def describe_model(genotype: Genotype | str, input_shape: Sequence[int], num_classes: int, space: str | None = None,
                   space_options: Mapping[str, Any] | None = None, **more: Any) -> dict[str, Any]:
    """The ``model`` part of a manifest for a genotype of a space (an uncompressed model); a
    compression stage adds ``applied_policy`` and ``records`` (or a builder instead of a space)."""
    g = Genotype.from_str(genotype) if isinstance(genotype, str) else genotype
    return {"genotype": g.to_str(), "genotype_id": g.id, "space": space, "space_options": dict(space_options or {}),
            "builder": None, "builder_sha256": None, "input_shape": [int(v) for v in input_shape],
            "num_classes": int(num_classes), "applied_policy": "", "records": [], **more}


def input_spec(data: Dataset, standardized: bool = True) -> dict[str, Any]:
    """What the model expects as input: shape (batch first), layout, the standardisation, classes."""
    return {
        "shape": ["batch", *(int(v) for v in data.input_shape)],
        "dtype": "float32",
        "layout": data.layout or None,
        # x = (raw - mean) / std per channel, when the run standardised its inputs
        "standardize": {"mean": [float(v) for v in data.mean], "std": [float(v) for v in data.std]} if standardized else None,
        "class_names": [str(c) for c in data.class_names],
    }


def keep_trial_artefact(
    evaluator: TrainingEvaluator, genotype: Genotype, budget: int, metrics: Mapping[str, float]
) -> Path | None:
    """A finished search trial's manifest beside the weights its `TrainingEvaluator` kept (its
    ``weights_path``); None when it keeps none (no weights_dir)."""
    weights = evaluator.weights_path(genotype, budget)
    if weights is None or not weights.is_file():
        return None
    return write_artefact(weights, "trial", **describe_training(evaluator, genotype, budget, metrics))


def describe_training(evaluator: TrainingEvaluator, genotype: Genotype, epochs: int, metrics: Mapping[str, float],
                      **training: Any) -> dict[str, Any]:
    """The manifest fields of a model a `TrainingEvaluator` trained (a search trial, ``nas-run train``)."""
    data = evaluator.data()
    return {
        "model": describe_model(genotype, data.input_shape, data.num_classes, evaluator.space,
                                evaluator.space_options),
        "input_spec": input_spec(data),
        "data": {"dataset": evaluator.dataset, "seed": evaluator.data_seed, "val_fraction": evaluator.val_fraction,
                 "layout": evaluator.layout, "standardize": True},
        "training": {**evaluator.record(), "epochs": int(epochs), "seed": evaluator.seed, **training},
        "metrics": {k: float(v) for k, v in metrics.items()},
    }


# ---------------------------------------------------------------------------------------------
# reading


def open_artefact(path: str | os.PathLike[str], legacy: Mapping[str, Any] | None = None) -> Artefact:
    """The artefact of ``path`` (its model file, its manifest, or a folder holding one), verified:
    the manifest against its digest, every file against the manifest. Without a manifest, a model
    file written before artefacts is opened from ``legacy`` (the manifest fields its reader knows:
    at least ``kind`` and ``model``), checked against its own digest if it has one, with a note."""
    model_file, manifest_file = _resolve(Path(path))
    if not manifest_file.is_file():
        if legacy is None:
            raise ConfigError(f"{str(model_file)!r} is not a nas-run artefact: no manifest {manifest_file.name!r} beside it")
        verify_file(model_file, "model")  # a sidecar of its own, where it has one
        key = str(model_file.resolve())
        if key not in _noted_legacy:  # once per file and process, as `nas.integrity` notes
            _noted_legacy.add(key)
            from . import integrity

            integrity.on_note(f"{str(model_file)!r} was written before artefacts kept a manifest: "
                              f"described from the run's config and records")
        return Artefact(model_file, {"files": {}, **legacy, "model_file": model_file.name}, legacy=True)
    if not digest_path(manifest_file).is_file():  # every manifest is written with one
        raise IntegrityError(f"artefact manifest {str(manifest_file)!r} has no recorded SHA-256 "
                             f"({digest_path(manifest_file).name} is missing); nothing was read")
    verify_file(manifest_file, "artefact manifest")
    manifest = _read_manifest(manifest_file)
    if manifest["model_file"] != model_file.name:
        raise IntegrityError(f"artefact manifest {str(manifest_file)!r} describes {manifest['model_file']!r}, "
                             f"not {model_file.name!r}")
    for name, wanted in manifest["files"].items():
        f = model_file.parent / str(name)
        if not f.is_file():
            raise IntegrityError(f"artefact {str(model_file)!r}: its file {str(f)!r} is missing")
        if file_sha256(f) != wanted:
            raise IntegrityError(f"artefact file {str(f)!r} does not match its manifest ({manifest_file.name}: SHA-256 "
                                 f"differs): truncated or modified after it was written; nothing was read")
    return Artefact(model_file, manifest)


def _resolve(p: Path) -> tuple[Path, Path]:
    """(model file, manifest file) of a model file, a manifest or a folder."""
    if p.is_dir():
        found = sorted(p.glob(f"*{MANIFEST_SUFFIX}"))
        if len(found) != 1:
            raise ConfigError(f"{str(p)!r} holds {len(found)} artefact manifests (*{MANIFEST_SUFFIX}); name the model file")
        p = found[0]
    if p.name.endswith(MANIFEST_SUFFIX):
        manifest = _read_manifest(p) if p.is_file() else None
        if manifest is None:
            raise ConfigError(f"no artefact manifest at {str(p)!r}")
        return p.with_name(str(manifest["model_file"])), p
    return p, manifest_path(p)


def _read_manifest(p: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"artefact manifest {str(p)!r} is unreadable: {type(exc).__name__}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("nas_run_artefact") != ARTEFACT_VERSION:
        version = manifest.get("nas_run_artefact") if isinstance(manifest, dict) else None
        raise ConfigError(f"{str(p)!r}: artefact version {version!r}; this nas-run reads version {ARTEFACT_VERSION}")
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing or manifest["kind"] not in KINDS:
        raise ConfigError(f"{str(p)!r} is not a complete artefact manifest (kind {manifest.get('kind')!r}, missing {missing})")
    return manifest


def _plain(value: Any) -> Any:
    """JSON values only: tuples as lists, numpy scalars as numbers."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        return value.item()
    return value
