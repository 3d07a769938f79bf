"""`to_eager`: turn a TorchScript (or any ONNX-exportable) model into an eager `torch.fx.GraphModule`.

Torch-Pruning builds its dependency graph from an eager forward pass (autograd ``grad_fn``s and
module hooks), and a `torch.jit.ScriptModule` exposes neither real ``nn.Conv2d``/``nn.Linear``
leaves nor a graph it may rewrite. So we export the model to ONNX with the TorchScript exporter
(which works for ScriptModules) and rebuild the ONNX graph node by node as a ``torch.fx.Graph``:

- parameterised nodes become real layers: ``Conv`` -> ``nn.Conv1d/2d/3d``,
  ``BatchNormalization`` -> ``nn.BatchNorm1d/2d/3d``, ``Gemm`` and ``MatMul`` with a constant
  weight (plus a following ``Add`` of a constant bias) -> ``nn.Linear``;
- everything else becomes a ``call_function`` node (``torch.relu``, ``torch.add``, ...);
- a node whose inputs are all constants is folded at conversion time (the exporter shares equal
  initializers through ``Identity`` nodes, for instance).

The export uses ``training=PRESERVE`` on the eval-mode model, which skips the exporter's
Conv+BN fusion (`_jit_pass_onnx_eval_peephole`), so BatchNorm layers survive for fine-tuning.

Layer names come from the ONNX node names, which carry the torch module path
(``/layer1/conv1/Conv`` -> ``layer1.conv1``; the GraphModule gets the same nested containers),
so per-layer settings written for the original model name the same layers here. Duplicates get
``_1``, ``_2``; nodes outside any module are named after their op (``gemm``, ``conv``).

While building, every node is also run on an example batch, so shapes are known (ranks for
BatchNorm, Reshape-to-flatten detection), and the finished module is checked against the
original on a seeded batch: a mismatch is a `PolicyError`, never a silently different model.

Limits: other float constants (a learned layer scale used through ``x * self.scale``, positional
embeddings) become buffers, so fine-tuning leaves them fixed; shape arithmetic on the batch axis
runs at call time (``onnx_shape``/``onnx_reshape``). The op handlers live in `compress.onnx_ops`.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import PolicyError
from .onnx_ops import _attrs, _Const, _handlers

if TYPE_CHECKING:
    import onnx
    import torch

__all__ = ["SUPPORTED_OPS", "to_eager"]

OPSET = 17  # as nas.cost.export_onnx and the int8 pass
_TOL = 1e-4
_CHECK_BATCH = 3
_WORKS_ANYWAY = "the int8 and finetune passes still work on it as it is"


# ---- the builder --------------------------------------------------------------------------------
class _Builder:
    def __init__(self, model: onnx.ModelProto, example: torch.Tensor) -> None:
        import torch
        from onnx import numpy_helper

        self.torch = torch
        self.graph = torch.fx.Graph()
        self.root: dict[str, Any] = {}  # target -> module or constant tensor
        self.env: dict[str, Any] = {}  # ONNX value name -> fx.Node | _Const
        self.example: dict[Any, Any] = {}  # fx.Node -> example value
        self.used_names: set[str] = set()
        self.shared: dict[tuple, str] = {}  # (op, weight name, attrs) -> module target (tied weights)
        self.skip: set[str] = set()  # ONNX node names fused into an earlier layer
        self.onnx = model
        g = model.graph
        for init in g.initializer:
            self.env[init.name] = _Const(torch.from_numpy(numpy_helper.to_array(init).copy()))
        inits = {i.name for i in g.initializer}
        inputs = [i.name for i in g.input if i.name not in inits]
        if len(inputs) != 1:
            raise PolicyError(f"to_eager: the exported graph has {len(inputs)} inputs {inputs}; one is supported")
        x = self.graph.placeholder("x")
        self.env[inputs[0]] = x
        self.example[x] = example
        self.consumers: dict[str, list[Any]] = {}
        for node in g.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.outputs = [o.name for o in g.output]

    # -- values
    def const(self, name: str) -> torch.Tensor | None:
        v = self.env.get(name) if name else None
        return v.t if isinstance(v, _Const) else None

    def need_const(self, node: onnx.NodeProto, i: int, what: str) -> torch.Tensor | None:
        if i >= len(node.input) or not node.input[i]:
            return None
        t = self.const(node.input[i])
        if t is None:
            raise PolicyError(f"to_eager: {node.op_type} node {node.name!r} needs a constant {what}; "
                              f"this one is computed at run time, which is not supported ({_WORKS_ANYWAY})")
        return t

    def ints(self, node: onnx.NodeProto, i: int, what: str) -> list[int] | None:
        t = self.need_const(node, i, what)
        return None if t is None else [int(v) for v in t.reshape(-1).tolist()]

    def arg(self, name: str) -> Any:
        """An fx argument for ONNX value `name`: a node, a Python scalar, or a registered buffer."""
        v = self.env[name]
        if not isinstance(v, _Const):
            return v
        if v.t.dim() == 0:
            return v.t.item()
        target = f"onnx_const_{len([k for k in self.root if k.startswith('onnx_const_')])}"
        self.root[target] = v.t
        node = self.graph.get_attr(target)
        self.example[node] = v.t
        self.env[name] = node  # materialise once
        return node

    def _ex(self, a: Any) -> Any:
        if isinstance(a, self.torch.fx.Node):
            return self.example[a]
        if isinstance(a, list | tuple):
            return type(a)(self._ex(v) for v in a)
        return a

    def call(self, fn: Callable, args: tuple, kwargs: dict | None = None) -> Any:
        """fx call_function, or the folded value when no argument depends on the input."""
        kwargs = kwargs or {}
        flat = list(args) + list(kwargs.values())
        if not any(isinstance(a, self.torch.fx.Node) or _holds_node(a) for a in flat):
            with self.torch.no_grad():
                return _Const(fn(*args, **kwargs))
        node = self.graph.call_function(fn, args, kwargs)
        with self.torch.no_grad():
            self.example[node] = fn(*self._ex(args), **{k: self._ex(v) for k, v in kwargs.items()})
        return node

    def const_args(self, node: onnx.NodeProto) -> tuple:
        """Inputs as tensors/nodes for folding: constants stay tensors (not buffers) when all are."""
        if all(self.const(n) is not None for n in node.input if n):
            return tuple(self.const(n) if n else None for n in node.input)
        return tuple(self.arg(n) if n else None for n in node.input)

    def module(self, node: onnx.NodeProto, mod: torch.nn.Module, x: Any, key: tuple | None = None) -> Any:
        if key is not None and key in self.shared:
            target = self.shared[key]
        else:
            target = self._name(node)
            self.root[target] = mod
            if key is not None:
                self.shared[key] = target
        out = self.graph.call_module(target, (x,))
        self.root[target].eval()  # the example pass must not move BatchNorm running statistics
        with self.torch.no_grad():
            self.example[out] = self.root[target](self.example[x])
        return out

    def _name(self, node: onnx.NodeProto) -> str:
        parts: list[str] = []
        prev = ""
        for raw in node.name.strip("/").split("/")[:-1]:
            # eager exports repeat the parent's name for container children (/stem/stem.0/Conv,
            # /layer2/shortcut/shortcut.0/Conv); scripted ones do not (/stem/0/Conv)
            p = raw[len(prev) + 1:] if prev and raw.startswith(prev + ".") else raw
            parts += [_ident(q) for q in p.split(".") if q]
            prev = raw
        base = ".".join(parts or [_ident(node.op_type.lower())])
        name, k = base, 0
        while not self._free(name):
            k += 1
            name = f"{base}_{k}"
        self.used_names.add(name)
        return name

    def _free(self, name: str) -> bool:
        if name in self.used_names or any(u.startswith(name + ".") for u in self.used_names):
            return False
        parts = name.split(".")
        return not any(".".join(parts[:i]) in self.used_names for i in range(1, len(parts)))


def _holds_node(a: Any) -> bool:
    import torch

    return isinstance(a, list | tuple) and any(isinstance(v, torch.fx.Node) for v in a)


def _ident(s: str) -> str:
    s = re.sub(r"\W", "_", s)
    return s or "_"


SUPPORTED_OPS: tuple[str, ...] = (
    "Abs", "Add", "AveragePool", "BatchNormalization", "Cast", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv", "Div",
    "Dropout", "Elu", "Erf", "Exp", "Flatten", "Gather", "Gelu", "Gemm", "GlobalAveragePool", "GlobalMaxPool",
    "HardSigmoid", "HardSwish", "Identity", "LeakyRelu", "Log", "LogSoftmax", "MatMul", "MaxPool",
    "Mul", "Neg", "Pad", "Pow", "Reciprocal", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceSum", "Relu",
    "Reshape", "Shape", "Sigmoid", "Slice", "Softmax", "Softplus", "Sqrt", "Squeeze", "Sub", "Tanh",
    "Transpose", "Unsqueeze",
)


# ---- public entry point ---------------------------------------------------------------------------
def to_eager(module: torch.nn.Module, input_shape: tuple[int, ...]) -> torch.fx.GraphModule:
    """An eager `torch.fx.GraphModule` computing what `module` computes on ``(batch, *input_shape)``.

    `module` is a `torch.jit.ScriptModule` (scripted or traced) or any module the TorchScript
    ONNX exporter accepts. Conv/BatchNorm/Linear become real ``nn`` layers named after the
    original module path. Raises `PolicyError` naming the ONNX ops outside `SUPPORTED_OPS`, or
    when the rebuilt module's outputs differ from the original's by more than 1e-4."""
    import torch

    shape = tuple(int(d) for d in input_shape)
    model = _export(module, shape)
    handlers = _handlers()
    unsupported = sorted({n.op_type for n in model.graph.node if n.op_type not in handlers or n.domain not in ("", "ai.onnx")})
    if unsupported:
        raise PolicyError(f"to_eager: the model uses ONNX op(s) {', '.join(unsupported)} that cannot be rebuilt as "
                          f"eager torch layers, so structured/unstructured/lowrank/lowbit passes cannot run on it; "
                          f"{_WORKS_ANYWAY}")
    gen = torch.Generator().manual_seed(0)
    b = _Builder(model, torch.randn((2, *shape), generator=gen))
    for node in model.graph.node:
        if node.name and node.name in b.skip:
            continue
        outs = handlers[node.op_type](b, node, _attrs(node))
        for name, value in zip(node.output, outs, strict=False):
            if name:
                b.env[name] = value
    results = tuple(b.arg(name) for name in b.outputs)
    b.graph.output(results[0] if len(results) == 1 else results)
    gm = torch.fx.GraphModule(_nested(b.root), b.graph, class_name="EagerFromOnnx")
    gm.train(module.training)
    _verify(module, gm, shape)
    return gm


def _nested(flat: dict[str, Any]) -> torch.nn.Module:
    """A root holding ``"layer1.conv1"`` as ``root.layer1.conv1``, in graph order (so
    ``named_modules()`` lists layers as they run; fx's dict root sorts them by depth)."""
    import torch

    root = torch.nn.Module()
    for target, obj in flat.items():
        *path, leaf = target.split(".")
        owner = root
        for p in path:
            if not hasattr(owner, p):
                owner.add_module(p, torch.nn.Module())
            owner = getattr(owner, p)
        if isinstance(obj, torch.nn.Module):
            owner.add_module(leaf, obj)
        else:
            owner.register_buffer(leaf, obj)
    return root


def _export(module: torch.nn.Module, shape: tuple[int, ...]) -> onnx.ModelProto:
    import onnx
    import torch

    if isinstance(module, torch.jit.ScriptModule):
        # export a save/load copy: exporting a ScriptModule rewrites its (shared) graph in place
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            buf = io.BytesIO()
            torch.jit.save(module, buf)
            buf.seek(0)
            module = torch.jit.load(buf, map_location="cpu")
    was_training = module.training
    module.eval()
    out = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (torch.zeros((1, *shape)),), out, input_names=["input"], output_names=["output"],
                              opset_version=OPSET, dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    except Exception as exc:  # the exporter's errors name the unsupported aten op
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PolicyError(f"to_eager: cannot export the model to ONNX to rebuild it ({first}), so only passes "
                          f"that need no conversion apply: finetune (int8 needs the same export)") from None
    finally:
        module.train(was_training)
    return onnx.load_from_string(out.getvalue())


def _verify(original: torch.nn.Module, gm: torch.fx.GraphModule, shape: tuple[int, ...]) -> None:
    import torch

    x = torch.randn((_CHECK_BATCH, *shape), generator=torch.Generator().manual_seed(1))
    flags = [m.training for m in (original, gm)]
    original.eval()
    gm.eval()
    try:
        with torch.no_grad():
            want, got = _flat(original(x)), _flat(gm(x))
    except Exception as exc:
        raise PolicyError(f"to_eager: the rebuilt module fails on a batch of {_CHECK_BATCH}: {exc}") from None
    finally:
        original.train(flags[0])
        gm.train(flags[1])
    if len(want) != len(got) or any(w.shape != g.shape for w, g in zip(want, got, strict=False)):
        raise PolicyError(f"to_eager: the rebuilt module's outputs {[tuple(g.shape) for g in got]} differ in shape "
                          f"from the original's {[tuple(w.shape) for w in want]}")
    diff = max(float((w.float() - g.float()).abs().max()) for w, g in zip(want, got, strict=True))
    if not diff <= _TOL:
        raise PolicyError(f"to_eager: the rebuilt module differs from the original by {diff:.3g} (> {_TOL}); "
                          f"{_WORKS_ANYWAY}")


def _flat(out: Any) -> list[torch.Tensor]:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, list | tuple):
        return [t for o in out for t in _flat(o)]
    raise PolicyError(f"to_eager: the model returns {type(out).__name__}; tensors (or tuples of them) are supported")
