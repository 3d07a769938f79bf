"""The manifest of an export: SHA-256 hashes of its weights, its graph or code, and its metadata,
read and checked without loading the model (the function behind `load_export`'s refusal and
``nas-run verify FILE``).

| format | ``weights_sha256`` | ``graph_sha256`` |
|---|---|---|
| ``onnx``, ``onnx-int8`` | the serialised graph (initializers and nodes) | the whole model, metadata left out |
| ``torchscript``, ``pt2`` | the archive's ``data/`` records (tensor storages) | every other record: code, pickled structure, constants |
| ``safetensors`` | the file | the builder's source file, for a user's builder given as a file |

``metadata_sha256`` hashes the metadata (canonical JSON, the manifest itself left out), so an edited
metric, input statistic or genotype is refused too. The hashes sit in the metadata (``manifest``):
they prove the file is the one written, not who wrote it. Exports of format version 1 (hashes of
the weights only) still load, with a note.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nas.integrity import file_sha256

from .errors import PolicyError

__all__ = ["ExportError", "ManifestCheck", "check_export", "meta_sha256", "sniff", "zip_sha256"]

EXTRA = "nas_run.json"  # the archive record (extra file) holding the metadata: torchscript, pt2
SIDE_SUFFIX = ".json"  # safetensors sidecar: PATH + ".json"
# metadata keys whose values are plain strings in ONNX metadata_props (the others are JSON)
STR_KEYS = frozenset({"format", "producer", "genotype", "genotype_id", "space", "builder", "policy", "applied_policy",
                      "policy_id", "policy_label", "stage", "run", "weights_sha256", "builder_sha256"})
# records that differ between two saves of one model (a random id): not part of what is checked
_VOLATILE = (".data/serialization_id",)


class ExportError(PolicyError):
    """An export file that cannot be trusted: truncated, edited, or with a sidecar of another
    model. The message names the file."""


@dataclass
class ManifestCheck:
    """What `check_export` found: ``entries`` maps each hash (weights, graph, metadata) to
    whether the file still has it."""

    path: Path
    format: str
    version: int
    metadata: dict[str, Any]
    entries: dict[str, bool] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(self.entries.values())

    def raise_if_bad(self) -> None:
        what = {"weights": "its weights", "graph": "its graph or code", "metadata": "its metadata",
                "builder": "its builder's source file"}
        bad = [k for k, ok in self.entries.items() if not ok]
        if bad:
            parts = " and ".join(what.get(k, k) for k in bad)
            raise ExportError(f"{str(self.path)!r}: {parts} were modified after export (SHA-256 differs from its manifest)")


def sniff(p: Path) -> str:
    """The format of an export from its content: a zip is TorchScript or pt2, a u64 header size
    then JSON is safetensors, anything else is read as ONNX."""
    with open(p, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(p) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError):
            names = []  # truncated: the loader names the file
        # torch.export.save archives carry models/ and archive_format; torch.jit.save ones code/
        pt2 = any(n.split("/", 1)[-1] in ("archive_format", "models/model.json") for n in names)
        return "pt2" if pt2 or p.suffix == ".pt2" else "torchscript"
    if len(head) == 9 and head[8:9] == b"{" and p.suffix != ".onnx":
        return "safetensors"
    return "onnx"


def meta_sha256(meta: Mapping[str, Any]) -> str:
    """SHA-256 of the metadata as canonical JSON, without the manifest (and without absent
    values, which ONNX cannot store)."""
    plain = json.loads(json.dumps(dict(meta), default=lambda v: list(v) if isinstance(v, tuple | set) else str(v)))
    body = {k: v for k, v in plain.items() if k != "manifest" and v is not None}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def zip_sha256(source: Any) -> tuple[str, str]:
    """(weights, graph) hashes of a torch archive (a path or a file object): its records by name
    (the archive's own folder name left out: it follows the file name), metadata and random
    ids left out."""
    weights, graph = hashlib.sha256(), hashlib.sha256()
    with zipfile.ZipFile(source) as z:
        for info in sorted(z.infolist(), key=lambda i: i.filename.split("/", 1)[-1]):
            name = info.filename.split("/", 1)[-1]
            if name.startswith("extra/") or name in _VOLATILE or info.is_dir():
                continue
            h = weights if name.startswith("data/") else graph
            h.update(f"{name}\0{info.file_size}\0".encode())
            h.update(z.read(info))
    return weights.hexdigest(), graph.hexdigest()


def onnx_sha256(proto: Any) -> tuple[str, str]:
    """(weights, graph) hashes of an ONNX model: the serialised graph, and the model without its
    metadata."""
    import onnx

    bare = onnx.ModelProto()
    bare.CopyFrom(proto)
    del bare.metadata_props[:]
    return (hashlib.sha256(proto.graph.SerializeToString(deterministic=True)).hexdigest(),
            hashlib.sha256(bare.SerializeToString(deterministic=True)).hexdigest())


def check_export(path: Path) -> ManifestCheck:
    """Read an export's metadata and compare each hash of its manifest with the file's (see the
    module docstring). An unreadable file or metadata is an `ExportError`; mismatches are
    reported in the entries, not raised."""
    p = Path(path)
    if not p.is_file():
        raise ExportError(f"no export file at {str(p)!r}")
    fmt = sniff(p)
    if fmt == "onnx":
        return _check_onnx(p)
    if fmt == "safetensors":
        return _check_safetensors(p)
    return _check_archive(p, fmt)


def _check_onnx(p: Path) -> ManifestCheck:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load(str(p))
    except (DecodeError, ValueError, OSError) as exc:
        raise ExportError(f"{str(p)!r} is not a readable ONNX model (truncated or corrupted?): {one_line(exc)}") from None
    props = {e.key: e.value for e in proto.metadata_props}
    if "weights_sha256" not in props or "genotype" not in props:
        raise ExportError(f"{str(p)!r} is an ONNX model but not a nas-run export (no nas-run metadata)")
    meta = {k: (v if k in STR_KEYS else read_json(v, p)) for k, v in props.items()}
    weights, graph = onnx_sha256(proto)
    return _entries(p, str(meta.get("format", "onnx")), meta, weights, graph)


def _check_archive(p: Path, fmt: str) -> ManifestCheck:
    try:
        with zipfile.ZipFile(p) as z:
            name = next((n for n in z.namelist() if n.split("/", 1)[-1] == f"extra/{EXTRA}"), None)
            text = z.read(name).decode() if name else ""
        weights, graph = zip_sha256(p)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, UnicodeDecodeError) as exc:
        kind = "TorchScript" if fmt == "torchscript" else "torch.export (pt2)"
        raise ExportError(f"{str(p)!r} is not a readable {kind} file (truncated or corrupted?): {one_line(exc)}") from None
    if not text:
        raise ExportError(f"{str(p)!r} is a {fmt} file but not a nas-run export (no {EXTRA})")
    meta = read_json(text, p)
    if not isinstance(meta, dict):
        raise ExportError(f"{str(p)!r}: its nas-run metadata is not a JSON object")
    return _entries(p, fmt, meta, weights, graph)


def _check_safetensors(p: Path) -> ManifestCheck:
    side = p.with_name(p.name + SIDE_SUFFIX)
    if not side.is_file():
        raise ExportError(f"{str(p)!r} has no sidecar {side.name!r}: a nas-run safetensors export is the pair")
    try:
        meta = read_json(side.read_text(), side)
    except (OSError, UnicodeDecodeError) as exc:
        raise ExportError(f"sidecar {str(side)!r} is unreadable: {one_line(exc)}") from None
    if not isinstance(meta, dict):
        raise ExportError(f"{str(side)!r}: its nas-run metadata is not a JSON object")
    check = _entries(p, "safetensors", meta, file_sha256(p), None)
    builder, wanted = meta.get("builder"), meta.get("builder_sha256")
    target = str(builder).rpartition(":")[0] if builder else ""
    if wanted and target.endswith(".py"):  # a builder given as a file: its code is the model's structure
        src = Path(target)
        check.entries["builder"] = src.is_file() and file_sha256(src) == wanted
    if check.entries.get("weights") is False:  # the pair is the unit: say so
        raise ExportError(
            f"{str(p)!r} does not match its sidecar {side.name!r} (SHA-256 differs: truncated, modified, or another model's sidecar)"
        )
    return check


def _entries(p: Path, fmt: str, meta: dict[str, Any], weights: str, graph: str | None) -> ManifestCheck:
    version = meta.get("format_version")
    if version not in (1, 2):
        raise ExportError(f"{str(p)!r}: export format version {version!r}; this nas-run reads versions 1 and 2")
    check = ManifestCheck(p, str(meta.get("format", fmt)), int(version), meta)
    manifest = meta.get("manifest")
    if version == 1:  # weights only; a TorchScript file's (its state dict's) is checked on load
        if fmt != "torchscript":
            check.entries["weights"] = weights == meta.get("weights_sha256")
        return check
    if not isinstance(manifest, dict):
        raise ExportError(f"{str(p)!r}: format version 2 without a manifest (its metadata was edited)")
    check.entries["weights"] = weights == manifest.get("weights_sha256")
    if graph is not None or "graph_sha256" in manifest:
        check.entries["graph"] = graph == manifest.get("graph_sha256")
    check.entries["metadata"] = meta_sha256(meta) == manifest.get("metadata_sha256")
    return check


def read_json(text: str, p: Path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ExportError(f"{str(p)!r}: its nas-run metadata is not valid JSON: {exc}") from None


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]
