"""A user's own model, to compress: a TorchScript file, or a builder plus a state dict.

Three ways to hand one over (``nas-run compress --model SPEC [--weights FILE]``):

- ``SPEC`` = a ``.pt2`` file (``torch.export.save`` of an ExportedProgram), loaded with
  ``torch.export.load(...).module()``: a fixed graph like TorchScript (``kind == "pt2"``).

- ``SPEC`` = a TorchScript file (``torch.jit.save``; ``.pt``/``.pth``/``.ts``), loaded with
  ``torch.jit.load``. TorchScript fixes the module structure: its weights can be read, changed in
  place, fine-tuned and exported, but layers cannot be replaced, so *structural* passes
  (structured pruning, low-rank) cannot run on it. ``kind == "torchscript"`` says so and
  `require_eager` is the check those passes call. Give a builder + state dict to prune it.
- ``SPEC`` = a builder ``package.module:callable`` (importable from ``sys.path`` /
  ``PYTHONPATH``; the current directory is searched last) or ``path/to/file.py:callable``,
  called with no arguments, or with ``num_classes=`` / ``input_shape=`` when it accepts those
  keywords. ``--weights`` is a state dict: ``.safetensors``, or ``.pt``/``.pth`` read with
  ``torch.load(weights_only=True)`` (tensors only: nothing is unpickled), loaded ``strict``.

A nas-run export (TorchScript or pt2) is checked against its manifest first: an edited file is
refused (`compress.export_manifest`). Nothing here writes to the user's files. ``UserModel.sha1`` hashes the file(s) the model came
from (the TorchScript file; the builder's source file, callable, keywords and the weights) and
is the model's identity in results. Every bad input is a `PolicyError` naming the file or
callable, so the CLI prints one line.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
import types
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas.integrity import file_sha256

from .errors import PolicyError

if TYPE_CHECKING:
    import torch

    from nas.data import Dataset

__all__ = ["FIXED_GRAPH", "UserModel", "check_builder", "check_input", "load_user_model", "portable_builder",
           "require_eager"]

FIXED_GRAPH = ("torchscript", "pt2")  # kinds whose layers cannot be replaced (only int8 / evaluation)

_IDENT = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@dataclass(frozen=True, eq=False)  # eq=False: two loads are two models; compare `sha1` for identity
class UserModel:
    module: torch.nn.Module  # in eval mode, on the CPU
    spec: str
    weights: str | None
    kind: str  # "torchscript" | "pt2" | "builder"
    sha1: str


def load_user_model(
    spec: str,
    weights: str | None = None,
    input_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
) -> UserModel:
    """Load a TorchScript file or build a model from ``package.module:callable`` (see the module
    docstring). ``input_shape`` and ``num_classes`` go to a builder that accepts them."""
    spec = str(spec)
    h = hashlib.sha1()
    builder = _parse_builder(spec)
    if builder is None:
        path = Path(spec).expanduser()
        if not path.is_file():
            looks_like_name = not path.suffix or (
                _IDENT.match(spec) and path.suffix not in (".pt", ".pth", ".ts")
            )
            hint = (
                "; a builder is written package.module:callable or file.py:callable"
                if looks_like_name
                else ""
            )
            raise PolicyError(f"model file not found: {spec!r}{hint}")
        _check_if_export(path)
        kind = "pt2" if _is_pt2(path) else "torchscript"
        module = _load_pt2(path) if kind == "pt2" else _load_torchscript(path)
        h.update(kind.encode() + b"\0" + _file_sha1(path).encode())
    else:
        target, attr = builder
        fn, source = _import_callable(spec, target, attr)
        kwargs = _builder_kwargs(fn, input_shape, num_classes)
        module = _call_builder(spec, attr, fn, kwargs)
        kind = "torchscript" if _is_script(module) else "builder"
        h.update(b"builder\0" + (_file_sha1(source).encode() if source else target.encode()))
        h.update(f"\0{attr}\0{json.dumps(kwargs, sort_keys=True)}".encode())
    if weights is not None:
        wpath = Path(weights).expanduser()
        state = _read_state_dict(wpath)
        _load_into(module, state, wpath, spec)
        h.update(b"\0weights\0" + _file_sha1(wpath).encode())
    module.eval()
    return UserModel(
        module=module,
        spec=spec,
        weights=None if weights is None else str(weights),
        kind=kind,
        sha1=h.hexdigest(),
    )


def require_eager(model: UserModel | torch.nn.Module | Any, pass_name: str) -> None:
    """Raise `PolicyError` when ``model`` is TorchScript: pass ``pass_name`` must rebuild layers.

    ``model`` is a `UserModel`, a module, or anything with ``.module`` / ``.kind`` like it."""
    if isinstance(model, UserModel) or hasattr(model, "kind"):
        module, kind = getattr(model, "module", None), getattr(model, "kind", None)
    else:
        module, kind = model, None
    if kind in FIXED_GRAPH or _is_script(module):
        raise PolicyError(
            f"pass {pass_name!r}: a TorchScript model can only be quantized (int8) or evaluated (a pt2 graph too); "
            f"give a builder + state dict to prune it (--model package.module:callable --weights FILE)"
        )


def check_input(module: torch.nn.Module, dataset: Dataset, batch: int = 8) -> int:
    """Run one batch of ``dataset`` through ``module`` and check its output against the labels;
    returns the output's width. Class labels need (N, K) with K >= num_classes (a head may know
    classes the data do not show: the caller then counts K), rows of scores (N, num_classes),
    regression targets (N,) or (N, 1)."""
    import torch

    x = torch.as_tensor(dataset.x_train[:batch])
    param = next(iter(module.parameters()), None)
    if param is not None:
        x = x.to(param.device)
    kind = getattr(dataset, "label_kind", "classes")  # a hand-made Dataset-like object may lack it
    n, k = len(x), int(dataset.num_classes)
    expected = {"classes": f"({n}, K) with K >= {k} (batch, the {k} classes of {dataset.name})",
                "multilabel": f"({n}, {k}) (batch, the {k} targets per sample of {dataset.name})",
                "regression": f"({n},) or ({n}, 1) (batch, the regression target of {dataset.name})"}[kind]  # fmt: skip
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(x)
    except Exception as exc:
        raise PolicyError(
            f"the model fails on a batch of {dataset.name} of shape {tuple(x.shape)} "
            f"(N, *input_shape={tuple(dataset.input_shape)}): {_one_line(exc)}"
        ) from None
    finally:
        module.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise PolicyError(
            f"the model returns a {type(out).__name__} for a batch of shape {tuple(x.shape)}; "
            f"expected one tensor of shape {expected}"
        )
    shape = tuple(out.shape)
    fits = {"classes": len(shape) == 2 and shape[0] == n and shape[1] >= k,
            "multilabel": shape == (n, k),
            "regression": shape in ((n,), (n, 1))}[kind]  # fmt: skip
    if not fits:
        raise PolicyError(
            f"the model returns shape {shape} for a batch of shape {tuple(x.shape)}; expected {expected}"
        )
    return int(shape[1]) if len(shape) == 2 else 1


# -- the spec ------------------------------------------------------------------------------------
def _parse_builder(spec: str) -> tuple[str, str] | None:
    """``(module-or-file, callable)`` for a builder spec; None for a file path."""
    if Path(spec).expanduser().is_file() or ":" not in spec:
        return None
    target, _, attr = spec.rpartition(":")
    if not target or not _IDENT.match(attr):
        raise PolicyError(
            f"model {spec!r}: a builder is written package.module:callable or path/to/file.py:callable"
        )
    if not _is_file_target(target) and not _IDENT.match(target):
        raise PolicyError(
            f"model {spec!r}: {target!r} is neither a module name (package.module) nor a .py file"
        )
    return target, attr


def _is_file_target(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def _import_callable(spec: str, target: str, attr: str) -> tuple[Any, Path | None]:
    """The callable and the source file it lives in (for the identity hash)."""
    if _is_file_target(target):
        path = Path(target).expanduser()
        if not path.is_file():
            raise PolicyError(f"model {spec!r}: builder file not found: {target!r}")
        module = _exec_file(spec, path)
    else:
        module = _import_module(spec, target)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            import difflib

            names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n, None))]
            close = difflib.get_close_matches(part, names, n=1)
            hint = (
                f"did you mean {close[0]!r}?"
                if close
                else f"it has: {', '.join(sorted(names)[:8]) or 'no callables'}"
            )
            raise PolicyError(f"model {spec!r}: {target!r} has no callable {attr!r} ({hint})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise PolicyError(f"model {spec!r}: {attr!r} in {target!r} is a {type(obj).__name__}, not a callable")
    source = getattr(module, "__file__", None)
    return obj, Path(source) if source else None


def _import_module(spec: str, name: str) -> Any:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)  # like `python -m`, but after everything installed: it cannot shadow
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.split(".")[0] == exc.name.split(".")[0] and name.startswith(exc.name):
            raise PolicyError(
                f"model {spec!r}: cannot import module {name!r} ({exc}); is it on sys.path / PYTHONPATH?"
            ) from None
        raise PolicyError(f"model {spec!r}: importing module {name!r} failed: {_one_line(exc)}") from None
    except Exception as exc:  # a syntax error or anything the module raises at import
        raise PolicyError(f"model {spec!r}: importing module {name!r} failed: {_one_line(exc)}") from None


def _exec_file(spec: str, path: Path) -> Any:
    # a unique module name per file content, registered in sys.modules so dataclasses, pickling of
    # classes by reference and relative look-ups inside the file behave as for an imported module
    digest = _file_sha1(path)[:12]
    name = f"_nas_run_user_model_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    mod_spec = importlib.util.spec_from_file_location(name, path)
    if mod_spec is None or mod_spec.loader is None:
        raise PolicyError(f"model {spec!r}: cannot load {str(path)!r} as a Python file")
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = module
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)  # sibling imports of the user's file
    try:
        mod_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise PolicyError(f"model {spec!r}: importing {str(path)!r} failed: {_one_line(exc)}") from None
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    return module


def _builder_kwargs(fn: Any, input_shape: tuple[int, ...] | None, num_classes: int | None) -> dict[str, Any]:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # some C callables have no signature: call them bare
        return {}
    open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    out: dict[str, Any] = {}
    for key, value in (("num_classes", num_classes), ("input_shape", input_shape)):
        if value is not None and (key in params or open_kwargs):
            out[key] = int(value) if key == "num_classes" else [int(d) for d in value]
    return out


def _call_builder(spec: str, attr: str, fn: Any, kwargs: dict[str, Any]) -> torch.nn.Module:
    import torch

    call = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    shown = ", ".join(f"{k}={v!r}" for k, v in call.items())
    try:
        module = fn(**call)
    except Exception as exc:
        raise PolicyError(f"model {spec!r}: calling {attr}({shown}) raised {_one_line(exc)}") from None
    if not isinstance(module, torch.nn.Module):
        raise PolicyError(
            f"model {spec!r}: the builder returned a {type(module).__name__}, not a torch.nn.Module"
        )
    return module.cpu()


# -- portable builder paths ----------------------------------------------------------------------
def portable_builder(spec: str) -> tuple[str, str | None]:
    """A builder as an export stores it, resolvable from any folder: a module path as given (with
    its source file's SHA-256, for a note when it changed), a file builder as its absolute path
    with the file's SHA-256 (`check_builder` refuses a changed file)."""
    builder = _parse_builder(spec)
    if builder is None:
        return spec, None
    target, attr = builder
    if _is_file_target(target):
        path = Path(target).expanduser().resolve()
        return f"{path}:{attr}", file_sha256(path) if path.is_file() else None
    found = _source_of(target)
    return spec, file_sha256(found) if found else None


def check_builder(spec: str, sha256: str | None) -> None:
    """Before a stored builder rebuilds a model: a file builder whose source changed since it was
    stored is refused (the structure may differ); a module's is noted (packages are upgraded)."""
    builder = _parse_builder(spec) if sha256 else None
    if builder is None:
        return
    target, _ = builder
    path = Path(target).expanduser() if _is_file_target(target) else _source_of(target)
    if path is None or not path.is_file():
        if _is_file_target(target):
            raise PolicyError(f"builder file {target!r} not found (the export names it by its absolute path)")
        return
    if file_sha256(path) == sha256:
        return
    if _is_file_target(target):
        raise PolicyError(
            f"builder file {str(path)!r} changed since the export was written (SHA-256 differs): the model it "
            f"builds may not be the exported one; restore it or export again"
        )
    from nas import integrity

    integrity.on_note(f"builder module {target!r} changed since the export was written ({path}); rebuilt from today's code")


def _source_of(module: str) -> Path | None:
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return Path(found.origin) if found is not None and found.origin and found.origin.endswith(".py") else None


# -- files ---------------------------------------------------------------------------------------
def _check_if_export(path: Path) -> None:
    """A nas-run export (its metadata in the archive) is checked against its manifest first."""
    names = _zip_names(path)
    if names is not None and any(n.split("/", 1)[-1] == "extra/nas_run.json" for n in names):
        from .export_manifest import check_export

        check_export(path).raise_if_bad()


def _is_pt2(path: Path) -> bool:
    names = _zip_names(path)
    if names is None:
        return path.suffix.lower() == ".pt2"
    return any(n.split("/", 1)[-1] in ("archive_format", "models/model.json") for n in names)


def _load_pt2(path: Path) -> torch.nn.Module:
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open(path, "rb") as f:  # any file name (torch.export warns on one not ending .pt2)
                module = torch.export.load(f).module()
    except Exception as exc:
        if _looks_truncated(path) or _zip_names(path) is None:
            raise PolicyError(f"model {str(path)!r}: truncated or corrupted (not a readable pt2 archive)") from None
        raise PolicyError(f"model {str(path)!r}: not a torch.export file (torch.export.load: {_one_line(exc)})") from None
    # an exported graph refuses .train()/.eval() (its mode was fixed at export); the passes and
    # fine-tuning call them, so they only set the flag here
    module.train = types.MethodType(_set_mode, module)
    module.eval = types.MethodType(_set_eval, module)
    return module


def _set_eval(self: torch.nn.Module) -> torch.nn.Module:
    return _set_mode(self, False)


def _set_mode(self: torch.nn.Module, mode: bool = True) -> torch.nn.Module:
    for m in self.modules():
        m.training = mode
    return self


def _load_torchscript(path: Path) -> torch.nn.Module:
    import torch

    if path.suffix.lower() == ".safetensors":
        raise PolicyError(
            f"model {str(path)!r} is a safetensors state dict, not a model; give the builder as "
            f"--model package.module:callable and this file as --weights"
        )
    names = _zip_names(path)
    if names is not None and not _is_torchscript_zip(names) and any(n.endswith("data.pkl") for n in names):
        raise PolicyError(
            f"model {str(path)!r} is a torch.save file (a state dict or a pickled model), not "
            f"TorchScript; save the model with torch.jit.save(torch.jit.script(model), path), or give "
            f"its builder as --model package.module:callable and a state dict as --weights"
        )
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        if _looks_truncated(path):
            raise PolicyError(
                f"model {str(path)!r}: truncated or corrupted (its zip directory is missing)"
            ) from None
        raise PolicyError(
            f"model {str(path)!r}: not a TorchScript file (torch.jit.load: {_one_line(exc)}); a model "
            f"file is what torch.jit.save writes"
        ) from None
    return module.eval()


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    import torch

    if not path.is_file():
        raise PolicyError(f"weights file not found: {str(path)!r}")
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path), device="cpu")
        except Exception as exc:  # SafetensorError: bad or incomplete header, truncated data
            raise PolicyError(
                f"weights {str(path)!r}: not a readable safetensors file, truncated or corrupted? ({_one_line(exc)})"
            ) from None
        return dict(state)
    names = _zip_names(path)
    if names is not None and _is_torchscript_zip(names):
        raise PolicyError(
            f"weights {str(path)!r} is a TorchScript model, not a state dict; give it as --model "
            f"(without --weights), or save model.state_dict()"
        )
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        pickled = "Weights only load failed" in text and (names is not None or _starts_like_pickle(path))
        if pickled:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
            what = f" (it refers to {found.group(1)})" if found else ""
            raise PolicyError(
                f"weights {str(path)!r} holds pickled Python objects{what}, which are never loaded: only "
                f"tensors are accepted; save model.state_dict() (torch.save or safetensors) instead"
            ) from None
        if _looks_truncated(path):
            raise PolicyError(
                f"weights {str(path)!r}: truncated or corrupted (its zip directory is missing)"
            ) from None
        raise PolicyError(
            f"weights {str(path)!r}: not a PyTorch state-dict file (corrupted?) ({_one_line(exc)})"
        ) from None
    if not isinstance(state, Mapping):
        raise PolicyError(
            f"weights {str(path)!r} hold a {type(state).__name__}, not a state dict (a mapping of "
            f"parameter names to tensors, as model.state_dict() gives)"
        )
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad or not all(isinstance(k, str) for k in state):
        keys = ", ".join(repr(k) for k in list(state)[:5])
        hint = next((f"; save checkpoint[{k!r}] instead" for k in ("state_dict", "model") if k in state), "")
        raise PolicyError(
            f"weights {str(path)!r} are not a state dict: {bad[0]!r} is a {type(state[bad[0]]).__name__}, "
            f"not a tensor (keys: {keys}){hint}"
            if bad
            else f"weights {str(path)!r} are not a state dict: its keys are not all strings"
        )
    return dict(state)


def _load_into(module: torch.nn.Module, state: Mapping[str, torch.Tensor], path: Path, spec: str) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_some(missing)}")
        if unexpected:
            parts.append(f"unexpected {_some(unexpected)}")
        hint = ""
        if unexpected and all(k.startswith("module.") for k in unexpected):
            hint = " (saved from DataParallel? strip the 'module.' prefix)"
        raise PolicyError(f"weights {str(path)!r} do not fit model {spec!r}: {'; '.join(parts)}{hint}")
    for key, value in own.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise PolicyError(
                f"weights {str(path)!r} do not fit model {spec!r}: {key!r} has shape "
                f"{tuple(state[key].shape)} in the file, {tuple(value.shape)} in the model"
            )
    try:
        module.load_state_dict(state, strict=True)
    except Exception as exc:
        raise PolicyError(f"weights {str(path)!r} do not fit model {spec!r}: {_one_line(exc)}") from None


def _some(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:3])
    return f"{len(keys)} key(s) {shown}" + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def _zip_names(path: Path) -> list[str] | None:
    try:
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (OSError, zipfile.BadZipFile):
        return None


def _is_torchscript_zip(names: list[str]) -> bool:
    # torch.jit.save archives carry the module's code and constants; torch.save ones only data.pkl
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _looks_truncated(path: Path) -> bool:
    """A zip (what torch.save and torch.jit.save write) whose end directory is gone."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head == b"PK\x03\x04" and not zipfile.is_zipfile(path)


def _starts_like_pickle(path: Path) -> bool:
    # torch.save's legacy (pre-1.6) format is a bare pickle stream, protocol 2 or later
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def _file_sha1(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha1").hexdigest()


def _is_script(module: Any) -> bool:
    import torch

    return isinstance(module, torch.jit.ScriptModule)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:300]}" + ("..." if len(text) > 300 else "")
