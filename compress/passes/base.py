"""What every compression pass is: plain settings in, a model and a plain-JSON record out.

A pass is a module-level object with

    name: str                          registry name ("structured", "lowrank", "int8", ...)
    defaults: dict[str, Any]           every setting with its default (the canonical form fills
                                       them in, so two spellings of one policy have one id)
    validate(settings) -> None         raise `PolicyError` naming the bad key/value and valid ones
    apply(model, settings, ctx) -> (model, record)
    replay(model, record, ctx) -> model

`apply` may change `model` in place (Policy.apply hands it a private copy) and returns the
compressed model and a JSON-serialisable record (dicts, lists, str, int, float, bool, None).
`replay` applied to a fresh copy of the *same original* rebuilds the same structure and the
same weights from the record alone (plus ``ctx`` for passes whose weights depend on data, such
as int8 calibration or GPFQ). A pass whose strength is zero returns the model unchanged.

Terminal passes (``terminal = True``, int8 in ONNX Runtime) return a `QuantizedOnnx` instead of
a torch module; nothing may follow them in a policy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from search_spaces.errors import UnknownNameError

from ..errors import PolicyError
from ..tasks import Task, classification_task

if TYPE_CHECKING:
    import numpy as np
    import torch

    from nas.data import Dataset

__all__ = [
    "Pass",
    "PassContext",
    "QuantizedOnnx",
    "check_settings",
    "get_pass",
    "list_passes",
    "register_pass",
    "resolve_layers",
]


@dataclass
class PassContext:
    """The data and knobs a pass may use. Built once per policy evaluation.

    ``data`` is the run's `nas.data.Dataset` (channel-first float32 arrays). The training split
    is cut, by ``seed``, into a calibration part (``calib_size`` samples: int8 ranges, GPFQ,
    Taylor importance) and the rest (fine-tuning), so calibration never sees validation data.
    ``teacher`` is the uncompressed model, for knowledge distillation. ``task`` is the loss, its
    distillation term and the metric (`compress.tasks`); the default is cross-entropy on logits,
    what a search run's models are.
    """

    data: Dataset
    seed: int = 0
    calib_size: int = 256
    device: str = "cpu"
    teacher: torch.nn.Module | None = None
    threads: int | None = None
    task: Task = field(default_factory=classification_task)
    notes: list[str] = field(default_factory=list)  # honest remarks for the output ("no dense speed-up")

    def _split(self) -> tuple[np.ndarray, np.ndarray]:
        import numpy as np

        n = len(self.data.y_train)
        order = np.random.default_rng(self.seed).permutation(n)
        k = min(self.calib_size, max(1, n // 4))
        return order[:k], order[k:]

    def calibration(self) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) held out of the training split for calibration."""
        idx, _ = self._split()
        return self.data.x_train[idx], self.data.y_train[idx]

    def training(self) -> tuple[np.ndarray, np.ndarray]:
        """(x, y): the training split without the calibration part (for fine-tuning)."""
        _, idx = self._split()
        return self.data.x_train[idx], self.data.y_train[idx]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.data.input_shape)


@dataclass
class QuantizedOnnx:
    """What a terminal (ONNX Runtime) pass yields: the serialised ONNX model and how it was made.

    ``model_bytes`` is a complete ONNX file (``onnx.ModelProto.SerializeToString()``); run it with
    ``onnxruntime.InferenceSession(model_bytes)``. ``float_layers`` names layers kept in float.
    """

    model_bytes: bytes
    input_name: str = "input"
    float_layers: tuple[str, ...] = ()

    def session(self, threads: int | None = 1) -> Any:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        return ort.InferenceSession(self.model_bytes, opts, providers=["CPUExecutionProvider"])


class Pass(Protocol):
    name: str
    defaults: Mapping[str, Any]
    terminal: bool

    def validate(self, settings: Mapping[str, Any]) -> None: ...

    def apply(self, model: Any, settings: Mapping[str, Any], ctx: PassContext) -> tuple[Any, dict]: ...

    def replay(self, model: Any, record: Mapping[str, Any], ctx: PassContext) -> Any: ...


_PASSES: dict[str, Pass] = {}
_DESCRIPTIONS: dict[str, str] = {}


def register_pass(p: Pass, description: str) -> Pass:
    _PASSES[p.name] = p
    _DESCRIPTIONS[p.name] = description
    return p


def _load_builtin() -> None:
    # the built-in passes register themselves on import; heavy libraries stay inside functions
    import importlib

    for mod in ("unstructured", "structured", "lowrank", "int8", "lowbit", "finetune", "merge", "bn_recalib",
                "remove_blocks"):
        try:
            importlib.import_module(f"compress.passes.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"compress.passes.{mod}":
                raise


def get_pass(name: str) -> Pass:
    _load_builtin()
    if name not in _PASSES:
        raise UnknownNameError("compression pass", name, _PASSES)
    return _PASSES[name]


def list_passes() -> list[tuple[str, str]]:
    _load_builtin()
    return sorted(_DESCRIPTIONS.items())


def check_settings(pass_name: str, settings: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """Unknown keys are a `PolicyError` naming the closest valid one; returns defaults + settings."""
    for key in settings:
        if key not in defaults:
            err = UnknownNameError(f"setting of pass {pass_name!r}", key, defaults)
            raise PolicyError(str(err))
    return {**dict(defaults), **dict(settings)}


def resolve_layers(model: torch.nn.Module, names: Any, what: str) -> list[str]:
    """Check that every name in ``names`` is a submodule of ``model``; a missing one is a
    `PolicyError` naming it and the closest real layer."""
    import difflib

    known = [n for n, _ in model.named_modules() if n]
    out = []
    for name in names or ():
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PolicyError(f"{what}: the model has no layer {name!r}{hint}")
        out.append(str(name))
    return out
