"""Export formats: the deploy form of a model, writing it as ONNX / int8 ONNX / pt2 /
TorchScript / safetensors with its metadata, and loading an export back — checked, never
silently wrong.

Every export carries the same metadata (plain JSON): genotype, search space and its resolved
options (or the user's builder), input spec (shape, dtype, layout, the standardisation the
model expects, class names), policy and per-pass records, the trial's metrics, and a manifest:
SHA-256 hashes of the weights, the graph or code, and the metadata (`compress.export_manifest`). Where
it lives:

| format | file | metadata |
|---|---|---|
| ``onnx``, ``onnx-int8`` | ``PATH`` (opset 17, input ``input`` ``(batch, *shape)``, batch dynamic) | ``metadata_props`` |
| ``pt2`` | ``PATH`` (``torch.export.export`` of the deploy model, batch dynamic; ``torch.export.save``) | extra file ``nas_run.json`` |
| ``torchscript`` | ``PATH`` (``torch.jit.trace``; for runtimes older than torch.export: torch 2.13 deprecates it) | extra file ``nas_run.json`` |
| ``safetensors`` | ``PATH`` (the deploy model's state dict) | sidecar ``PATH.json``; genotype also in the safetensors header |

`load_export` checks the manifest (a truncated or edited file, or edited metadata, is an
`ExportError` naming the file), and for safetensors rebuilds the model without any pickle: genotype -> `SearchSpace.build` ->
`Policy.replay` of the applied policy's records (the compression stage's "merge" pass among
them) -> the same deploy form -> the weights, after checking that the rebuilt state dict has exactly the file's keys and
shapes and that the header's genotype is the sidecar's.

Deploy form (`deploy_form`): re-parameterisation branches merged (`lk_blocks.reparameterize`,
which also folds the large-kernel space's BatchNorms) and every other BatchNorm that directly
follows a convolution inside an ``nn.Sequential`` (or NASNet's ``FactorizedReduce``) folded
into it. Only those pairs are folded: there the conv's output provably feeds nothing but the
BN; a BN after a Python ``forward`` is left as it is (still correct, one op more).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress.errors import PolicyError
from compress.export_manifest import EXTRA as TS_EXTRA
from compress.export_manifest import (
    SIDE_SUFFIX,
    STR_KEYS,
    ExportError,
    check_export,
    meta_sha256,
    onnx_sha256,
    zip_sha256,
)
from compress.export_manifest import one_line as _one_line
from compress.model_spec import ModelSpec
from nas.integrity import file_sha256

from . import FORMATS

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

__all__ = [
    "FORMATS",
    "FORMAT_VERSION",
    "OPSET",
    "ExportCheckError",
    "ExportError",
    "Exported",
    "ModelSpec",
    "deploy_form",
    "fold_batchnorm",
    "load_export",
    "load_model",
    "write_export",
]

FORMAT_VERSION = 2  # 2: the manifest (weights, graph/code, metadata); 1 (weights only) still loads
OPSET = 17  # compress.passes.int8.OPSET: the float and int8 exports share it
DEPLOY_STEPS = ["reparameterize", "fold_batchnorm"]
_STR_KEYS = STR_KEYS
_noted_v1: set[str] = set()


class ExportCheckError(ExportError):
    """An export whose outputs, loaded back in its runtime, differ from the trial's model."""


# ---------------------------------------------------------------------------------------------
# deploy form


def deploy_form(model: nn.Module) -> nn.Module:
    """In place: eval mode, re-parameterisation branches merged, Conv+BN pairs folded. Returns it.
    A TorchScript module is returned as it is (its graph is fixed)."""
    import torch

    model.eval()
    if isinstance(model, torch.jit.ScriptModule):
        return model
    from search_spaces.lk_blocks import reparameterize

    reparameterize(model)  # touches only the large-kernel space's modules
    fold_batchnorm(model)
    return model


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every BatchNorm that directly follows a convolution in an ``nn.Sequential`` (the
    conv may be the last layer of a nested plain Sequential, as a low-rank pair is) or in
    NASNet's ``FactorizedReduce`` into that conv (`torch.nn.utils.fusion.fuse_conv_bn_eval`); the
    BN becomes ``nn.Identity``. In place, eval mode; returns the number folded. Which pairs fold
    depends only on the structure, so a rebuilt model folds the same ones."""
    import torch
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    from search_spaces.nasnet_ops import FactorizedReduce

    model.eval()
    counts: dict[int, int] = {}
    for m in model.modules():  # a module reachable twice is shared: folding it is unsafe
        for child in m._modules.values():  # children() would hide a repeat
            if child is None:
                continue
            counts[id(child)] = counts.get(id(child), 0) + 1
    shared = {k for k, v in counts.items() if v > 1}
    folded = 0
    for seq in [m for m in model.modules() if _plain_sequential(m)]:
        for i in range(1, len(seq)):
            bn = seq[i]
            parent, key, conv = seq, i - 1, seq[i - 1]
            touched = {id(conv), id(bn)}
            while _plain_sequential(conv) and len(conv) > 0:  # e.g. a low-rank (first, second) pair
                parent, key, conv = conv, len(conv) - 1, conv[len(conv) - 1]
                touched.add(id(conv))
            if _foldable(conv, bn) and not touched & shared:
                with torch.no_grad():
                    parent[key] = fuse_conv_bn_eval(conv, bn)
                seq[i] = nn.Identity()
                folded += 1
    for m in [m for m in model.modules() if type(m) is FactorizedReduce]:
        bn, convs = m.bn, [c for c in (m.conv_a, m.conv_b) if c is not None]
        if not isinstance(bn, nn.BatchNorm2d) or sum(c.out_channels for c in convs) != bn.num_features:
            continue
        if not all(_foldable(c, _bn_slice(bn, 0, c.out_channels)) for c in convs):
            continue
        start = 0
        with torch.no_grad():
            for name in ("conv_a", "conv_b"):
                conv = getattr(m, name)
                if conv is not None:  # the concatenated channels: conv_a's first, then conv_b's
                    setattr(m, name, fuse_conv_bn_eval(conv, _bn_slice(bn, start, conv.out_channels)))
                    start += conv.out_channels
        m.bn = nn.Identity()
        folded += 1
    return folded


def _plain_sequential(m: Any) -> bool:
    from torch import nn

    # a Sequential subclass with its own forward may use the conv output elsewhere
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _foldable(conv: Any, bn: Any) -> bool:
    from torch import nn
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.conv import _ConvNd

    return (
        isinstance(conv, nn.Conv1d | nn.Conv2d | nn.Conv3d)
        and isinstance(conv, _ConvNd)
        and not conv.transposed
        and isinstance(bn, _BatchNorm)
        and bn.running_mean is not None
        and bn.running_var is not None
        and conv.out_channels == bn.num_features
    )


def _bn_slice(bn: Any, start: int, n: int) -> Any:
    """BatchNorm over channels ``start .. start + n`` of ``bn`` (eval mode)."""
    from torch import nn

    out = nn.BatchNorm2d(n, eps=bn.eps, affine=bn.affine).eval()
    out.running_mean.copy_(bn.running_mean[start : start + n])
    out.running_var.copy_(bn.running_var[start : start + n])
    if bn.affine:
        out.weight.data.copy_(bn.weight.data[start : start + n])
        out.bias.data.copy_(bn.bias.data[start : start + n])
    return out


# ---------------------------------------------------------------------------------------------
# writing


def write_export(path: Path, fmt: str, meta: Mapping[str, Any], model: Any = None, onnx_bytes: bytes | None = None) -> dict[str, Any]:
    """Write ``model`` (a deploy-form torch module) or ``onnx_bytes`` as ``fmt`` at ``path``
    with ``meta``; returns the metadata written (with its ``manifest`` and ``weights_sha256``)."""
    meta = dict(meta, format=fmt, format_version=FORMAT_VERSION)
    if fmt in ("onnx", "onnx-int8"):
        return _write_onnx(path, onnx_bytes if onnx_bytes is not None else _float_onnx(model, meta), meta)
    if fmt == "torchscript":
        return _write_torchscript(path, model, meta)
    if fmt == "pt2":
        return _write_pt2(path, model, meta)
    if fmt == "safetensors":
        return _write_safetensors(path, model, meta)
    from search_spaces import UnknownNameError

    raise UnknownNameError("export format", fmt, FORMATS)


def _float_onnx(model: Any, meta: Mapping[str, Any]) -> bytes:
    from compress.passes.int8 import export_float_onnx

    return export_float_onnx(model, tuple(meta["input_shape"]))


def _write_onnx(path: Path, data: bytes, meta: dict[str, Any]) -> dict[str, Any]:
    import onnx

    proto = onnx.load_from_string(data)
    meta["opset"] = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=OPSET)
    del proto.metadata_props[:]
    proto.producer_name = "nas-run"
    proto.doc_string = f"nas-run export of {meta.get('genotype')} (policy: {meta.get('policy_label') or 'none'})"
    weights, graph = onnx_sha256(proto)
    _seal(meta, weights, graph)
    for key, value in meta.items():
        if value is None and key in _STR_KEYS:
            continue  # absent on load, as None
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value if key in _STR_KEYS and isinstance(value, str) else json.dumps(value)
    path.write_bytes(proto.SerializeToString())
    return meta


def _write_torchscript(path: Path, model: Any, meta: dict[str, Any]) -> dict[str, Any]:
    import torch

    x = torch.zeros((2, *meta["input_shape"]))  # batch 2: nothing specialises on a batch of 1
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch 2.13 deprecates torch.jit; tracer warnings
        if isinstance(model, torch.jit.ScriptModule):
            traced = model
        else:
            traced = torch.jit.trace(model.eval(), (x,), check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        _seal(meta, *zip_sha256(buf))
        torch.jit.save(traced, str(path), _extra_files={TS_EXTRA: json.dumps(meta)})
    _same_archive(path, meta)
    return meta


def _write_pt2(path: Path, model: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """torch.export's ExportedProgram of the deploy model, batch dimension dynamic."""
    import torch

    if isinstance(model, torch.jit.ScriptModule):
        raise PolicyError("a TorchScript model cannot be exported as pt2 (torch.export needs a Python module); use torchscript or onnx")
    x = torch.zeros((2, *meta["input_shape"]))  # batch 2: torch.export specialises a batch of 1
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.export.export(model.eval(), (x,), dynamic_shapes=({0: batch},))
    except Exception as exc:  # noqa: BLE001 - torch.export raises many kinds (UserError, guards, unsupported ops)
        raise PolicyError(f"torch.export cannot export this model: {_one_line(exc)}; use onnx or torchscript") from None
    buf = io.BytesIO()
    torch.export.save(program, buf)
    _seal(meta, *zip_sha256(buf))
    with open(path, "wb") as f:  # a file object: torch.export wants a name ending .pt2, a temporary has none
        torch.export.save(program, f, extra_files={TS_EXTRA: json.dumps(meta)})
    _same_archive(path, meta)
    return meta


def _seal(meta: dict[str, Any], weights: str, graph: str | None) -> None:
    """The manifest, last: it hashes the metadata as it is written."""
    meta["weights_sha256"] = weights
    meta.pop("manifest", None)
    manifest = {"weights_sha256": weights} | ({"graph_sha256": graph} if graph is not None else {})
    meta["manifest"] = manifest | {"metadata_sha256": meta_sha256(meta)}


def _same_archive(path: Path, meta: Mapping[str, Any]) -> None:
    # the hashes came from a first save without the metadata: the file must hold the same records
    if zip_sha256(path) != (meta["manifest"]["weights_sha256"], meta["manifest"]["graph_sha256"]):
        raise ExportError(f"{str(path)!r}: two saves of one model differ; its manifest cannot be trusted")


def _write_safetensors(path: Path, model: Any, meta: dict[str, Any]) -> dict[str, Any]:
    from safetensors.torch import save_file

    if meta.get("space") is None and meta.get("builder") is None:
        raise PolicyError("a safetensors export needs a genotype or builder to rebuild the model from")
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    header = {"format": "nas-run", "format_version": str(FORMAT_VERSION), "genotype": str(meta["genotype"]),
              "policy_id": str(meta.get("policy_id", "none"))}
    save_file(state, str(path), metadata=header)
    _seal(meta, file_sha256(path), None)
    sidecar_path(path).write_text(json.dumps(meta, indent=1))
    return meta


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + SIDE_SUFFIX)


# ---------------------------------------------------------------------------------------------
# loading


@dataclass
class Exported:
    """An export loaded back in its runtime: ``model`` is a torch module (safetensors), a
    TorchScript module (torchscript) or an ``onnxruntime.InferenceSession`` (onnx, onnx-int8)."""

    path: Path
    format: str
    model: Any
    metadata: dict[str, Any]

    def predict(self, x: np.ndarray, batch: int = 256) -> np.ndarray:
        """Logits ``(N, num_classes)`` for float32 inputs ``(N, *input_shape)``, batched."""
        import numpy as np

        outs = []
        if self.format.startswith("onnx"):
            name = self.model.get_inputs()[0].name
            for i in range(0, len(x), batch):
                outs.append(self.model.run(None, {name: np.ascontiguousarray(x[i : i + batch], dtype=np.float32)})[0])
        else:
            import torch

            with torch.no_grad():
                for i in range(0, len(x), batch):
                    outs.append(self.model(torch.as_tensor(np.asarray(x[i : i + batch], dtype=np.float32))).numpy())
        return np.concatenate(outs) if outs else np.zeros((0, int(self.metadata.get("num_classes", 0))), np.float32)

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec.from_json(self.metadata)


def load_model(path: str | os.PathLike[str]) -> Any:
    """An export back in its runtime, checked: a torch ``nn.Module`` in eval mode (safetensors:
    rebuilt from the genotype and the policy's records, no pickle), a TorchScript module, or an
    ONNX Runtime ``InferenceSession``. `load_export` also gives the metadata."""
    return load_export(path).model


def load_export(path: str | os.PathLike[str], threads: int | None = None) -> Exported:
    """Load and verify an export (format from its content; see the module docstring). A missing,
    truncated or edited file, edited metadata, or a sidecar that does not belong to the weights,
    is an `ExportError` naming the file; nothing is loaded before the manifest is checked."""
    p = Path(path)
    check = check_export(p)
    check.raise_if_bad()
    meta = check.metadata
    if check.version < FORMAT_VERSION and str(p.resolve()) not in _noted_v1:
        from nas import integrity

        _noted_v1.add(str(p.resolve()))
        integrity.on_note(f"{str(p)!r} is a format-1 export (before manifests): its weights are checked, "
                          "its metadata and code are not; export it again to seal them")
    fmt = check.format
    if fmt == "torchscript":
        return _load_torchscript(p, meta, check.version)
    if fmt == "pt2":
        return _load_pt2(p, meta)
    if fmt == "safetensors":
        return _load_safetensors(p, meta)
    return _load_onnx(p, meta, threads)


def _sniff(p: Path) -> str:
    from compress.export_manifest import sniff

    return sniff(p)


def _load_onnx(p: Path, meta: dict[str, Any], threads: int | None) -> Exported:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    try:
        sess = ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        raise ExportError(f"ONNX Runtime cannot load {str(p)!r}: {_one_line(exc)}") from None
    return Exported(p, str(meta["format"]), sess, meta)


def _load_torchscript(p: Path, meta: dict[str, Any], version: int) -> Exported:
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch 2.13 deprecates torch.jit
            module = torch.jit.load(str(p), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - a bad zip, a truncated archive, a missing record
        raise ExportError(f"{str(p)!r} is not a readable TorchScript file (truncated or corrupted?): {_one_line(exc)}") from None
    if version == 1 and _state_sha256(module.state_dict()) != meta.get("weights_sha256"):
        raise ExportError(f"{str(p)!r}: its weights were modified after export (SHA-256 differs from its metadata)")
    return Exported(p, "torchscript", module.eval(), meta)


def _load_pt2(p: Path, meta: dict[str, Any]) -> Exported:
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open(p, "rb") as f:  # any file name (torch.export warns on one not ending .pt2)
                module = torch.export.load(f).module()
    except Exception as exc:  # noqa: BLE001 - a bad archive, an unknown op or opset
        raise ExportError(f"{str(p)!r} is not a readable torch.export (pt2) file: {_one_line(exc)}") from None
    return Exported(p, "pt2", module, meta)


def _load_safetensors(p: Path, meta: dict[str, Any]) -> Exported:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    side = sidecar_path(p)  # its weights' hash and the manifest are checked (`check_export`)
    try:
        with safe_open(str(p), "pt") as f:
            header = f.metadata() or {}
        state = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ExportError(f"{str(p)!r} is not a readable safetensors file: {_one_line(exc)}") from None
    if header.get("genotype") != meta.get("genotype"):
        raise ExportError(
            f"{str(p)!r}: the sidecar names genotype {meta.get('genotype')!r}, the weights were saved for "
            f"{header.get('genotype')!r}"
        )
    try:
        model = deploy_form(ModelSpec.from_json(meta).build())
    except (KeyError, TypeError) as exc:
        raise ExportError(f"sidecar {str(side)!r} lacks or garbles a field: {exc}") from None
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if want != got:
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        shapes = sorted(k for k in set(want) & set(got) if want[k] != got[k])
        raise ExportError(
            f"{str(p)!r}: the weights do not fit the model its sidecar describes ({meta.get('genotype')}): "
            f"missing {missing[:3]}, unexpected {extra[:3]}, other shapes {shapes[:3]}"
        )
    model.load_state_dict(state, strict=True)
    return Exported(p, "safetensors", model.eval(), meta)


# ---------------------------------------------------------------------------------------------
# helpers


def _state_sha256(state: Mapping[str, torch.Tensor]) -> str:
    import torch

    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def copy_module(model: Any) -> Any:
    """A private copy (TorchScript modules through save/load; deepcopy does not copy them)."""
    import io

    import torch

    if isinstance(model, torch.jit.ScriptModule):
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(model, buf)
            buf.seek(0)
            return torch.jit.load(buf, map_location="cpu")
    return copy.deepcopy(model)
