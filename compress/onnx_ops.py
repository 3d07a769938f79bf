"""The ONNX ops `compress.onnx_to_torch` rebuilds: ONNX semantics as torch functions and one
handler per op type that turns an ONNX node into fx nodes (layers for Conv/BatchNorm/Linear).

The ``onnx_*`` functions are what a converted GraphModule calls at run time (module level, so fx
code generation and ``copy.deepcopy`` find them); the handlers run once, at conversion.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .errors import PolicyError

if TYPE_CHECKING:
    import onnx
    import torch

    from .onnx_to_torch import _Builder

class _Const:
    """A value known at conversion time (initializer, Constant, or folded)."""

    __slots__ = ("t",)

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


# ---- ONNX semantics as plain torch functions (module level so fx codegen and deepcopy see them)
def onnx_shape(x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
    import torch

    return torch._shape_as_tensor(x)[start:end]


def onnx_reshape(x: torch.Tensor, shape: Any) -> torch.Tensor:
    dims = [int(v) for v in (shape.tolist() if hasattr(shape, "tolist") else shape)]
    dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]  # ONNX: 0 copies the dim
    return x.reshape(dims)


def onnx_flatten(x: torch.Tensor, axis: int) -> torch.Tensor:
    axis = axis % x.dim() if x.dim() else 0
    if axis == 0:
        return x.reshape(1, -1)
    return x.flatten(axis).flatten(0, axis - 1) if axis > 1 else x.flatten(1)


def onnx_gather(data: torch.Tensor, indices: torch.Tensor, axis: int) -> torch.Tensor:
    import torch

    n = data.shape[axis]
    indices = torch.as_tensor(indices)  # a 0-d constant index arrives as a Python int
    idx = torch.where(indices < 0, indices + n, indices).long()
    out = data.index_select(axis, idx.reshape(-1))
    axis = axis % data.dim()
    return out.reshape((*data.shape[:axis], *idx.shape, *data.shape[axis + 1:]))


def onnx_unsqueeze(x: torch.Tensor, axes: Sequence[int]) -> torch.Tensor:
    rank = x.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


def onnx_squeeze(x: torch.Tensor, axes: Sequence[int] | None) -> torch.Tensor:
    if axes is None:
        return x.squeeze()
    for a in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(a)
    return x


def onnx_slice(x: torch.Tensor, starts: Sequence[int], ends: Sequence[int], axes: Sequence[int],
               steps: Sequence[int]) -> torch.Tensor:
    import torch

    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        a = a % x.dim()
        n = x.shape[a]
        if st > 0:
            x = x[(slice(None),) * a + (slice(s, min(e, n), st),)]
        else:  # torch has no negative-step slicing; ONNX marks "to the front" with an end < -n
            keep = list(range(n))[slice(s, None if e < -n else e, st)]
            x = x.index_select(a, torch.tensor(keep, dtype=torch.long, device=x.device))
    return x


def onnx_constant_of_shape(shape: Any, value: float | int, dtype: int) -> torch.Tensor:
    import torch

    dims = [int(v) for v in (shape.tolist() if hasattr(shape, "tolist") else shape)]
    return torch.full(dims, value, dtype=_dtype(dtype))


def onnx_reduce(x: torch.Tensor, op: str, axes: Sequence[int] | None, keepdims: bool) -> torch.Tensor:
    dims = list(range(x.dim())) if axes is None else [a % x.dim() for a in axes]
    if op == "mean":
        return x.mean(dim=dims, keepdim=keepdims)
    if op == "sum":
        return x.sum(dim=dims, keepdim=keepdims)
    return (x.amax if op == "max" else x.amin)(dim=dims, keepdim=keepdims)


def onnx_div(a: Any, b: Any) -> Any:
    import torch

    floating = any(isinstance(v, float) or (isinstance(v, torch.Tensor) and v.is_floating_point()) for v in (a, b))
    if floating:
        return a / b
    return torch.div(torch.as_tensor(a), torch.as_tensor(b), rounding_mode="trunc")  # ONNX int Div truncates


def onnx_hardsigmoid(x: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    return (x * alpha + beta).clamp(0.0, 1.0)


def onnx_pad(x: torch.Tensor, pads: Sequence[int], mode: str, value: float) -> torch.Tensor:
    import torch.nn.functional as F

    n = len(pads) // 2
    torch_pads: list[int] = []
    for d in reversed(range(n)):  # ONNX: all begins then all ends, first dim first; torch: last dim first
        torch_pads += [pads[d], pads[d + n]]
    while len(torch_pads) > 2 and torch_pads[-2:] == [0, 0]:  # reflect/replicate pad only trailing dims
        torch_pads = torch_pads[:-2]
    if mode == "constant":
        return F.pad(x, torch_pads, "constant", value)
    return F.pad(x, torch_pads, mode)


def _cast(x: torch.Tensor, to: int) -> torch.Tensor:
    return x.to(_dtype(to))


def _dtype(onnx_type: int) -> torch.dtype:
    import torch

    table = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32,
             7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}
    if onnx_type not in table:
        raise PolicyError(f"to_eager: Cast to ONNX data type {onnx_type} is not supported")
    return table[onnx_type]


def _f32(v: float) -> float:
    """The shortest decimal of a float32 attribute (1e-05, not 9.999999747378752e-06)."""
    import numpy as np

    return float(repr(np.float32(v)).removeprefix("np.float32(").removesuffix(")"))


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


# ---- op handlers: (builder, node, attrs) -> list of outputs ----------------------------------------
def _conv(b: _Builder, node: onnx.NodeProto, a: dict) -> list:
    torch = b.torch
    w = b.need_const(node, 1, "weight")
    bias = b.need_const(node, 2, "bias")
    nd = w.dim() - 2
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise PolicyError(f"to_eager: Conv {node.name!r} uses auto_pad={a['auto_pad']!r}; only explicit pads are supported")
    pads = list(a.get("pads", [0] * 2 * nd))
    x = b.arg(node.input[0])
    if pads[:nd] != pads[nd:]:  # asymmetric: an explicit zero pad in front, then an unpadded conv
        x = b.call(onnx_pad, (x, [0, 0, *pads[:nd], 0, 0, *pads[nd:]], "constant", 0.0))
        pads = [0] * 2 * nd
    cls = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}.get(nd)
    if cls is None:
        raise PolicyError(f"to_eager: Conv {node.name!r} is {nd}-D; 1-D, 2-D and 3-D are supported")
    group = int(a.get("group", 1))
    conv = cls(w.shape[1] * group, w.shape[0], tuple(w.shape[2:]), stride=tuple(a.get("strides", [1] * nd)),
               padding=tuple(pads[:nd]), dilation=tuple(a.get("dilations", [1] * nd)), groups=group,
               bias=bias is not None)
    with torch.no_grad():
        conv.weight.copy_(w)
        if bias is not None:
            conv.bias.copy_(bias)
    return [b.module(node, conv, x, ("Conv", node.input[1], tuple(node.input[2:]), repr(sorted(a.items()))))]


def _batchnorm(b: _Builder, node: onnx.NodeProto, a: dict) -> list:
    torch = b.torch
    scale, bias, mean, var = (b.need_const(node, i, what) for i, what in
                              ((1, "scale"), (2, "bias"), (3, "mean"), (4, "variance")))
    x = b.arg(node.input[0])
    rank = b.example[x].dim()
    cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}.get(rank)
    if cls is None:
        raise PolicyError(f"to_eager: BatchNormalization {node.name!r} has a {rank}-D input; 2-D to 5-D are supported")
    # ONNX momentum weighs the running value, torch's the new batch statistic
    bn = cls(scale.numel(), eps=_f32(a.get("epsilon", 1e-5)), momentum=_f32(1.0 - _f32(a.get("momentum", 0.9))))
    with torch.no_grad():
        bn.weight.copy_(scale)
        bn.bias.copy_(bias)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
    return [b.module(node, bn, x)]


def _linear(b: _Builder, node: onnx.NodeProto, x: Any, weight: torch.Tensor, bias: torch.Tensor | None,
            key: tuple) -> Any:
    torch = b.torch
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias.reshape(-1).expand(weight.shape[0]))
    return b.module(node, lin, x, key)


def _gemm(b: _Builder, node: onnx.NodeProto, a: dict) -> list:
    w = b.need_const(node, 1, "weight (B)")
    c = b.need_const(node, 2, "bias (C)")
    x = b.arg(node.input[0])
    if a.get("transA", 0):
        x = b.call(b.torch.t, (x,))
    weight = (w if a.get("transB", 0) else w.t()) * float(a.get("alpha", 1.0))
    if c is not None:
        if c.numel() not in (1, weight.shape[0]) or c.dim() > 1 and c.shape[0] != 1:
            raise PolicyError(f"to_eager: Gemm {node.name!r} has a bias of shape {tuple(c.shape)}; a per-output bias is supported")
        c = c.reshape(-1) * float(a.get("beta", 1.0))
    return [_linear(b, node, x, weight, c, ("Gemm", node.input[1], tuple(node.input[2:]), repr(sorted(a.items()))))]


def _matmul(b: _Builder, node: onnx.NodeProto, a: dict) -> list:
    w = b.const(node.input[1])
    if w is None or w.dim() != 2 or b.const(node.input[0]) is not None:
        return [b.call(b.torch.matmul, b.const_args(node))]
    bias, out = None, node.output[0]
    users = b.consumers.get(out, [])
    if len(users) == 1 and users[0].op_type == "Add" and out not in b.outputs:  # MatMul + Add -> one Linear
        other = [n for n in users[0].input if n != out]
        c = b.const(other[0]) if len(other) == 1 else None
        if c is not None and c.dim() <= 1 and c.numel() in (1, w.shape[1]):
            bias = c
            b.skip.add(users[0].name)
    y = _linear(b, node, b.arg(node.input[0]), w.t(), bias, ("MatMul", node.input[1], bias is not None))
    if bias is not None:
        b.env[users[0].output[0]] = y
    return [y]


def _unary(fn: Callable) -> Callable:
    def handler(b: _Builder, node: onnx.NodeProto, a: dict) -> list:
        return [b.call(fn, b.const_args(node)[:1])]
    return handler


def _binary(fn: Callable) -> Callable:
    def handler(b: _Builder, node: onnx.NodeProto, a: dict) -> list:
        return [b.call(fn, b.const_args(node)[:2])]
    return handler


def _clip(b: _Builder, node: onnx.NodeProto, a: dict) -> list:
    lo, hi = b.need_const(node, 1, "min"), b.need_const(node, 2, "max")
    lo = a.get("min") if lo is None else lo.item()  # opset < 11 kept them as attributes
    hi = a.get("max") if hi is None else hi.item()
    return [b.call(b.torch.clamp, (b.arg(node.input[0]),), {"min": lo, "max": hi})]


def _pool(kind: str) -> Callable:
    def handler(b: _Builder, node: onnx.NodeProto, a: dict) -> list:
        import torch.nn.functional as F

        x = b.arg(node.input[0])
        nd = b.example[x].dim() - 2
        k = list(a["kernel_shape"])
        pads = list(a.get("pads", [0] * 2 * nd))
        if pads[:nd] != pads[nd:] or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise PolicyError(f"to_eager: {node.op_type} {node.name!r} has asymmetric/auto padding {pads}; only symmetric pads are supported")
        kw: dict[str, Any] = {"kernel_size": k, "stride": list(a.get("strides", [1] * nd)), "padding": pads[:nd],
                              "ceil_mode": bool(a.get("ceil_mode", 0))}
        if kind == "max":
            fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
            kw["dilation"] = list(a.get("dilations", [1] * nd))
        else:
            fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
            kw["count_include_pad"] = bool(a.get("count_include_pad", 0))
        return [b.call(fn, (x,), kw)]
    return handler


def _global_pool(op: str) -> Callable:
    def handler(b: _Builder, node: onnx.NodeProto, a: dict) -> list:
        x = b.arg(node.input[0])
        return [b.call(onnx_reduce, (x, op, list(range(2, b.example[x].dim())), True))]
    return handler


def _reduce(op: str) -> Callable:
    def handler(b: _Builder, node: onnx.NodeProto, a: dict) -> list:
        axes = a.get("axes")
        if axes is None and len(node.input) > 1:  # opset 18 (and ReduceSum 13) pass axes as an input
            axes = b.ints(node, 1, "axes")
        if axes is not None and not axes and a.get("noop_with_empty_axes", 0):
            return [b.env[node.input[0]]]
        args = b.const_args(node)[:1]
        return [b.call(onnx_reduce, (*args, op, None if not axes else list(axes), bool(a.get("keepdims", 1))))]
    return handler


def _reshape(b: _Builder, node: onnx.NodeProto, a: dict) -> list:
    if a.get("allowzero", 0):
        raise PolicyError(f"to_eager: Reshape {node.name!r} uses allowzero=1, which is not supported")
    shape = b.const(node.input[1])
    data = b.const_args(node)[0]
    if shape is None:  # computed at run time from Shape/Gather/Concat: keep the computation
        return [b.call(onnx_reshape, (data, b.arg(node.input[1])))]
    dims = [int(v) for v in shape.tolist()]
    if isinstance(data, b.torch.fx.Node) and len(dims) == 2 and dims[0] in (0, -1):
        ex = b.example[data]
        if dims[1] in (-1, int(ex[0].numel())) and ex.dim() >= 2:  # a flatten: keep it width-agnostic
            return [b.call(b.torch.flatten, (data, 1))]
    return [b.call(onnx_reshape, (data, dims))]


def _shape(b: _Builder, node: onnx.NodeProto, a: dict) -> list:
    return [b.call(onnx_shape, (b.arg(node.input[0]), int(a.get("start", 0)), a.get("end")))]


def _gather(b: _Builder, node: onnx.NodeProto, a: dict) -> list:
    data, idx = b.const_args(node)[:2]
    return [b.call(onnx_gather, (data, idx, int(a.get("axis", 0))))]


def _concat(b: _Builder, node: onnx.NodeProto, a: dict) -> list:
    return [b.call(b.torch.cat, (list(b.const_args(node)),), {"dim": int(a["axis"])})]


def _transpose(b: _Builder, node: onnx.NodeProto, a: dict) -> list:
    x = b.const_args(node)[0]
    rank = (x.dim() if isinstance(x, b.torch.Tensor) else b.example[x].dim())
    return [b.call(b.torch.permute, (x, list(a.get("perm", reversed(range(rank))))))]


def _squeeze(unsqueeze: bool) -> Callable:
    def handler(b: _Builder, node: onnx.NodeProto, a: dict) -> list:
        axes = a.get("axes")
        if axes is None and len(node.input) > 1:
            axes = b.ints(node, 1, "axes")
        x = b.const_args(node)[0]
        if unsqueeze:
            return [b.call(onnx_unsqueeze, (x, list(axes)))]
        return [b.call(onnx_squeeze, (x, None if axes is None else list(axes)))]
    return handler


def _slice(b: _Builder, node: onnx.NodeProto, a: dict) -> list:
    starts, ends = b.ints(node, 1, "starts"), b.ints(node, 2, "ends")
    axes = b.ints(node, 3, "axes") or list(range(len(starts)))
    steps = b.ints(node, 4, "steps") or [1] * len(starts)
    if 0 in steps:
        raise PolicyError(f"to_eager: Slice {node.name!r} has a zero step")
    return [b.call(onnx_slice, (b.const_args(node)[0], starts, ends, axes, steps))]


def _pad(b: _Builder, node: onnx.NodeProto, a: dict) -> list:
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode not in ("constant", "reflect", "edge"):
        raise PolicyError(f"to_eager: Pad {node.name!r} mode {mode!r}; constant, reflect and edge are supported")
    if len(node.input) > 3 and node.input[3]:
        raise PolicyError(f"to_eager: Pad {node.name!r} with an axes input is not supported")
    pads = b.ints(node, 1, "pads")
    value = b.need_const(node, 2, "value")
    return [b.call(onnx_pad, (b.arg(node.input[0]), pads, "replicate" if mode == "edge" else mode,
                              0.0 if value is None else float(value.item())))]


def _softmax(log: bool) -> Callable:
    def handler(b: _Builder, node: onnx.NodeProto, a: dict) -> list:
        fn = b.torch.log_softmax if log else b.torch.softmax
        return [b.call(fn, (b.arg(node.input[0]), int(a.get("axis", -1))))]
    return handler


def _constant(b: _Builder, node: onnx.NodeProto, a: dict) -> list:
    from onnx import numpy_helper

    torch = b.torch
    if "value" in a:
        return [_Const(torch.from_numpy(numpy_helper.to_array(a["value"]).copy()))]
    for key, dtype in (("value_float", torch.float32), ("value_floats", torch.float32),
                       ("value_int", torch.int64), ("value_ints", torch.int64)):
        if key in a:
            return [_Const(torch.tensor(a[key], dtype=dtype))]
    raise PolicyError(f"to_eager: Constant {node.name!r} has no supported value attribute ({sorted(a)})")


def _constant_of_shape(b: _Builder, node: onnx.NodeProto, a: dict) -> list:
    from onnx import TensorProto, numpy_helper

    value, dtype = 0.0, TensorProto.FLOAT
    if "value" in a:
        value, dtype = numpy_helper.to_array(a["value"]).reshape(-1)[0].item(), a["value"].data_type
    return [b.call(onnx_constant_of_shape, (b.const_args(node)[0], value, dtype))]


def _identity(b: _Builder, node: onnx.NodeProto, a: dict) -> list:
    return [b.env[node.input[0]]]


def _handlers() -> dict[str, Callable]:
    import torch
    import torch.nn.functional as F

    def gelu(b: _Builder, node: onnx.NodeProto, a: dict) -> list:
        approx = a.get("approximate", b"none")
        approx = approx.decode() if isinstance(approx, bytes) else approx
        return [b.call(F.gelu, (b.arg(node.input[0]),), {"approximate": approx})]

    def leaky(b: _Builder, node: onnx.NodeProto, a: dict) -> list:
        return [b.call(F.leaky_relu, (b.arg(node.input[0]), float(a.get("alpha", 0.01))))]

    def elu(b: _Builder, node: onnx.NodeProto, a: dict) -> list:
        return [b.call(F.elu, (b.arg(node.input[0]), float(a.get("alpha", 1.0))))]

    def hardsigmoid(b: _Builder, node: onnx.NodeProto, a: dict) -> list:
        return [b.call(onnx_hardsigmoid, (b.arg(node.input[0]), float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))))]

    def cast(b: _Builder, node: onnx.NodeProto, a: dict) -> list:
        return [b.call(_cast, (b.const_args(node)[0], int(a["to"])))]

    return {
        "Conv": _conv, "BatchNormalization": _batchnorm, "Gemm": _gemm, "MatMul": _matmul,
        "Relu": _unary(torch.relu), "Sigmoid": _unary(torch.sigmoid), "Tanh": _unary(torch.tanh),
        "Erf": _unary(torch.erf), "Gelu": gelu, "Clip": _clip, "HardSigmoid": hardsigmoid,
        "HardSwish": _unary(F.hardswish), "LeakyRelu": leaky, "Elu": elu, "Softplus": _unary(F.softplus),
        "Exp": _unary(torch.exp), "Log": _unary(torch.log), "Sqrt": _unary(torch.sqrt),
        "Abs": _unary(torch.abs), "Neg": _unary(torch.neg), "Reciprocal": _unary(torch.reciprocal),
        # operator.* (not torch.add) so a Python scalar may sit on either side
        "Add": _binary(operator.add), "Sub": _binary(operator.sub), "Mul": _binary(operator.mul),
        "Div": _binary(onnx_div), "Pow": _binary(operator.pow),
        "MaxPool": _pool("max"), "AveragePool": _pool("avg"),
        "GlobalAveragePool": _global_pool("mean"), "GlobalMaxPool": _global_pool("max"),
        "ReduceMean": _reduce("mean"), "ReduceSum": _reduce("sum"), "ReduceMax": _reduce("max"),
        "ReduceMin": _reduce("min"),
        "Flatten": lambda b, n, a: [b.call(onnx_flatten, (b.const_args(n)[0], int(a.get("axis", 1))))],
        "Reshape": _reshape, "Shape": _shape, "Gather": _gather, "Concat": _concat, "Transpose": _transpose,
        "Squeeze": _squeeze(False), "Unsqueeze": _squeeze(True), "Slice": _slice, "Pad": _pad,
        "Softmax": _softmax(False), "LogSoftmax": _softmax(True), "Cast": cast,
        "Constant": _constant, "ConstantOfShape": _constant_of_shape, "Identity": _identity, "Dropout": _identity,
    }
