"""Simulated low-bit weights (fake quantization): Conv/Linear weights are replaced by their
dequantized b-bit values, so the model stays a float torch module whose accuracy can be studied.

Alphabet: symmetric, ``qmax = 2^(b-1) - 1``, codes ``-qmax..qmax`` (2^b - 1 levels: ternary at
2 bits), ``w ~= scale * code`` with ``scale = max|w| / qmax`` per output channel (or per layer).

Methods:

- ``rtn``: round to nearest, ``code = clip(round(w / scale))``.
- ``gpfq``: greedy path-following quantization (Lybrand & Saab, "A greedy algorithm for
  quantizing neural networks", JMLR 2021; Zhang, Zhou & Saab, "Post-training quantization for
  neural networks with provable guarantees", SIMODS 2023, Alg. 1). Each neuron ``w`` (a row of the
  weight) is quantized one input coordinate ``t`` at a time so that the running output error on
  calibration data stays small::

      u_0 = 0,   q_t = Q(<Xq_t, u_{t-1} + w_t X_t> / ||Xq_t||^2),   u_t = u_{t-1} + w_t X_t - q_t Xq_t

  where ``X`` (m x N0) holds the layer's inputs in the original network and ``Xq`` those in the
  network whose earlier layers are already quantized (layers go in execution order), ``X_t`` is
  column t and ``u_t`` in R^m is the error of the partial dot products. For a conv, ``X`` is the
  unfolded (im2col) input, one row per output position; grouped convs run one GPFQ per group.
  Rows are subsampled (seeded) to at most ``MAX_ROWS``; calibration data is ``ctx.calibration()``.

Biases stay float. The record holds, per layer, the bits, the scales (float32 values, exact in
JSON) and the integer codes bit-packed (b bits each) in base64, so replay restores the exact
weights without data.
"""

from __future__ import annotations

import base64
import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ..errors import PolicyError
from .base import PassContext, check_settings, register_pass, resolve_layers

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = ["LOWBIT", "dequantize", "gpfq_codes", "pack_codes", "rtn_codes", "unpack_codes"]

BITS = (32, 8, 4, 3, 2)  # 32 = leave the weights as they are
METHODS = ("rtn", "gpfq")
MAX_ROWS = 4096  # calibration rows (samples x output positions) GPFQ uses per layer
ROW_BUDGET = 1 << 23  # floats per (groups x rows x inputs) matrix: bounds memory for depthwise convs
CALIB_BATCH = 128


class LowBitPass:
    """Fake-quantize Conv/Linear weights to 8/4/3/2 bits by round-to-nearest or GPFQ."""

    name = "lowbit"
    terminal = False
    defaults: Mapping[str, Any] = {
        "bits": 8,
        "method": "rtn",
        "per_channel": True,
        "layers": [],  # empty: every Conv1d/Conv2d/Linear
        "skip_first_last": True,  # with layers empty: keep the first and last such layer in float
    }

    def validate(self, settings: Mapping[str, Any]) -> None:
        s = check_settings(self.name, settings, self.defaults)
        if isinstance(s["bits"], bool) or s["bits"] not in BITS:
            raise PolicyError(f"lowbit: bits={s['bits']!r} is not one of {list(BITS)}")
        if s["method"] not in METHODS:
            raise PolicyError(f"lowbit: method={s['method']!r} is not one of {list(METHODS)}")
        for key in ("per_channel", "skip_first_last"):
            if not isinstance(s[key], bool):
                raise PolicyError(f"lowbit: {key} must be true or false, got {s[key]!r}")
        if not isinstance(s["layers"], list | tuple) or not all(isinstance(x, str) for x in s["layers"]):
            raise PolicyError(f"lowbit: layers must be a list of layer names, got {s['layers']!r}")

    def apply(self, model: torch.nn.Module, settings: Mapping[str, Any], ctx: PassContext) -> tuple[torch.nn.Module, dict]:
        import torch

        from ..user_model import require_eager

        s = check_settings(self.name, settings, self.defaults)
        self.validate(s)
        require_eager(model, self.name)  # GPFQ hooks into layers; a ScriptModule has none to hook
        bits = int(s["bits"])
        record: dict[str, Any] = {"bits": bits, "method": s["method"], "per_channel": s["per_channel"], "layers": {}}
        names = _targets(model, s, ctx)
        if bits == 32 or not names:
            return model, record
        modules = dict(model.named_modules())
        analog = _copy(model) if s["method"] == "gpfq" else None  # the unquantized network: X
        for index, name in enumerate(names):
            layer = modules[name]
            w = layer.weight.detach()
            scale = _scales(w, bits, s["per_channel"])
            if s["method"] == "rtn":
                codes = rtn_codes(w, scale, bits)
            else:
                x_float = _layer_rows(analog, name, ctx, index)
                x_quant = _layer_rows(model, name, ctx, index)  # earlier layers already quantized
                codes = gpfq_codes(w, scale, bits, x_float, x_quant, layer)
            with torch.no_grad():
                layer.weight.copy_(dequantize(codes, scale).to(w.device, w.dtype))
            record["layers"][name] = {
                "bits": bits,
                "shape": list(w.shape),
                "scale": [float(v) for v in scale.cpu().tolist()],
                "codes": pack_codes(codes.cpu().numpy(), bits),
            }
        return model, record

    def replay(self, model: torch.nn.Module, record: Mapping[str, Any], ctx: PassContext) -> torch.nn.Module:
        import numpy as np
        import torch

        from ..user_model import require_eager

        require_eager(model, self.name)
        layers = record.get("layers", {})
        resolve_layers(model, list(layers), "lowbit replay")
        modules = dict(model.named_modules())
        for name, entry in layers.items():
            layer = modules[name]
            w = layer.weight
            if list(w.shape) != list(entry["shape"]):
                raise PolicyError(f"lowbit replay: layer {name!r} has weight shape {list(w.shape)}, the record {entry['shape']}")
            n = int(np.prod(entry["shape"]))
            codes = torch.from_numpy(unpack_codes(entry["codes"], entry["bits"], n).reshape(entry["shape"]))
            scale = torch.tensor(entry["scale"], dtype=torch.float32)
            with torch.no_grad():
                w.copy_(dequantize(codes, scale).to(w.device, w.dtype))
        return model


# ---------------------------------------------------------------------------------------------
# the quantizers


def _qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def _scales(w: torch.Tensor, bits: int, per_channel: bool) -> torch.Tensor:
    """float32 scale per output channel (dim 0), or one repeated for all: max|w| / qmax."""
    import torch

    flat = w.detach().float().reshape(w.shape[0], -1).abs()
    peak = flat.amax(1) if per_channel else flat.amax().expand(w.shape[0])
    scale = peak / _qmax(bits)
    return torch.where(scale > 0, scale, torch.ones_like(scale)).cpu()  # an all-zero channel: codes 0


def rtn_codes(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Round to nearest: int codes in [-qmax, qmax], same shape as ``w``."""
    q = _qmax(bits)
    s = scale.to(w.device).view(-1, *([1] * (w.dim() - 1)))
    return (w.detach().float() / s).round().clamp(-q, q).to(dtype=_int_dtype())


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``codes * scale`` in float32 with the scale broadcast over dim 0 (apply and replay share it)."""
    s = scale.float().to(codes.device).view(-1, *([1] * (codes.dim() - 1)))
    return codes.float() * s


def gpfq_codes(
    w: torch.Tensor, scale: torch.Tensor, bits: int, x: torch.Tensor, xq: torch.Tensor, layer: torch.nn.Module
) -> torch.Tensor:
    """GPFQ codes for ``w`` (out, in/groups, *k) given rows ``x``/``xq`` of shape (groups, m, N0).

    All neurons of a group advance together: ``U`` (groups, m, outputs per group) holds u_t for
    every neuron, so step t costs O(m * outputs) (Zhang, Zhou & Saab 2023, Alg. 1)."""
    import torch

    q = _qmax(bits)
    groups = getattr(layer, "groups", 1)
    out = w.shape[0]
    W = w.detach().float().reshape(groups, out // groups, -1).to(x.device)  # (G, O, N0)
    s = scale.float().to(x.device).view(groups, out // groups)  # (G, O)
    G, m, n0 = x.shape
    U = torch.zeros(G, m, out // groups, device=x.device)
    norms = (xq * xq).sum(1)  # (G, N0): ||Xq_t||^2
    codes = torch.zeros_like(W)
    for t in range(n0):
        V = U + x[:, :, t, None] * W[:, None, :, t]  # u_{t-1} + w_t X_t
        proj = torch.einsum("gm,gmo->go", xq[:, :, t], V) / norms[:, t, None].clamp_min(1e-30)
        # a column that is zero on every calibration row carries no signal: fall back to w_t
        proj = torch.where(norms[:, t, None] > 0, proj, W[:, :, t])
        c = (proj / s).round().clamp(-q, q)
        codes[:, :, t] = c
        U = V - xq[:, :, t, None] * (c * s)[:, None, :]
    return codes.reshape(w.shape).to(dtype=_int_dtype()).cpu()


def _int_dtype() -> Any:
    import torch

    return torch.int16


# ---------------------------------------------------------------------------------------------
# which layers, and their inputs


def _quantizable() -> tuple[type, ...]:
    import torch

    return (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)


def _targets(model: torch.nn.Module, s: Mapping[str, Any], ctx: PassContext) -> list[str]:
    """Layer names to quantize, in execution order (GPFQ needs earlier layers done first)."""
    kinds = _quantizable()
    order = _execution_order(model, ctx)
    modules = dict(model.named_modules())
    if s["layers"]:
        names = resolve_layers(model, s["layers"], "lowbit layers")
        for n in names:
            if not isinstance(modules[n], kinds):
                raise PolicyError(
                    f"lowbit layers: {n!r} is a {type(modules[n]).__name__}; only Conv1d, Conv2d and Linear weights are quantized"
                )
        return sorted(set(names), key=lambda n: order.index(n) if n in order else len(order))
    names = [n for n in order if isinstance(modules[n], kinds)]
    return names[1:-1] if s["skip_first_last"] else names


def _execution_order(model: torch.nn.Module, ctx: PassContext) -> list[str]:
    """Module names in the order of their first call on one calibration sample."""
    import torch

    order: list[str] = []
    hooks = [
        m.register_forward_pre_hook(lambda _m, _i, n=name: order.append(n) if n not in order else None)
        for name, m in model.named_modules()
        if name and isinstance(m, _quantizable())
    ]
    x, _ = ctx.calibration()
    try:
        with _eval(model), torch.no_grad():
            model(torch.as_tensor(x[:1], device=_device(model)))
    finally:
        for h in hooks:
            h.remove()
    # layers never called keep their definition order, after the called ones
    rest = [n for n, m in model.named_modules() if n and isinstance(m, _quantizable()) and n not in order]
    return order + rest


def _layer_rows(model: torch.nn.Module, name: str, ctx: PassContext, index: int) -> torch.Tensor:
    """The inputs of layer ``name`` on the calibration data as GPFQ rows (groups, m, N0).

    Rows (sample, output position) are subsampled to about ``MAX_ROWS`` (fewer for wide grouped
    layers: ``ROW_BUDGET``) per batch with a generator seeded by (seed, layer, batch): the runs on
    the float and on the partly quantized network see the same shapes, so they pick the same rows.
    Only the picked patches are gathered, never the whole im2col matrix (large depthwise kernels)."""
    import numpy as np
    import torch

    layer = dict(model.named_modules())[name]
    x, _ = ctx.calibration()
    groups = getattr(layer, "groups", 1)
    n0 = layer.weight[0].numel()
    chunks: list[torch.Tensor] = []
    state: dict[str, Any] = {"batch": 0, "keep": None}

    def hook(_m: Any, inputs: tuple[Any, ...]) -> None:
        inp = inputs[0].detach().float()
        r = _row_count(layer, inp)
        if state["keep"] is None:  # fixed on the first call, from the layer's real input size
            total = r * len(x) / len(inp)
            state["keep"] = min(1.0, MAX_ROWS / total, ROW_BUDGET / (groups * n0 * total))
        k = max(1, math.ceil(state["keep"] * r))
        pick = None
        if k < r:
            rng = np.random.default_rng([ctx.seed, index, state["batch"]])
            pick = torch.as_tensor(np.sort(rng.choice(r, size=k, replace=False)), device=inp.device)
        state["batch"] += 1
        chunks.append(_rows(layer, inp, pick))

    handle = layer.register_forward_pre_hook(hook)
    try:
        with _eval(model), torch.no_grad():
            for i in range(0, len(x), CALIB_BATCH):
                model(torch.as_tensor(x[i : i + CALIB_BATCH], device=_device(model)))
    finally:
        handle.remove()
    return torch.cat(chunks, dim=1)


def _conv_geometry(layer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple, tuple, tuple, tuple]:
    """(padded input as (B, C, H, W), kernel, dilation, stride, output (Ho, Wo)); a Conv1d is a
    2-D conv over a height of 1."""
    import torch
    import torch.nn.functional as F

    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    x = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)  # also right for padding="same"
    if isinstance(layer, torch.nn.Conv1d):
        x = x.unsqueeze(2)
        kernel, dilation, stride = (1, *layer.kernel_size), (1, *layer.dilation), (1, *layer.stride)
    else:
        kernel, dilation, stride = tuple(layer.kernel_size), tuple(layer.dilation), tuple(layer.stride)
    out = tuple((x.shape[2 + i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(2))
    return x, kernel, dilation, stride, out


def _row_count(layer: torch.nn.Module, x: torch.Tensor) -> int:
    import torch

    if isinstance(layer, torch.nn.Linear):
        return math.prod(x.shape[:-1])
    *_, out = _conv_geometry(layer, x[:1])
    return len(x) * out[0] * out[1]


def _rows(layer: torch.nn.Module, x: torch.Tensor, pick: torch.Tensor | None = None) -> torch.Tensor:
    """im2col: (B, C, *spatial) -> (groups, rows, C/groups * prod(kernel)), one row per (sample,
    output position) in row-major order, columns in the order of ``weight[o].reshape(-1)``; Linear:
    (..., in) -> (1, rows, in). ``pick`` (sorted row indices) gathers only those rows."""
    import torch
    import torch.nn.functional as F

    if isinstance(layer, torch.nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
        return (rows if pick is None else rows[pick]).unsqueeze(0)
    g = layer.groups
    xp, kernel, dilation, stride, (ho, wo) = _conv_geometry(layer, x)
    if pick is None:
        cols = F.unfold(xp, kernel, dilation=dilation, stride=stride)  # (B, C * k, P), C-major
        b, ck, p = cols.shape
        return cols.reshape(b, g, ck // g, p).permute(1, 0, 3, 2).reshape(g, b * p, ck // g)
    dev = xp.device
    b, rest = pick // (ho * wo), pick % (ho * wo)
    hi = (rest // wo)[:, None] * stride[0] + torch.arange(kernel[0], device=dev) * dilation[0]  # (n, kh)
    wi = (rest % wo)[:, None] * stride[1] + torch.arange(kernel[1], device=dev) * dilation[1]  # (n, kw)
    c = torch.arange(xp.shape[1], device=dev)
    patches = xp[b[:, None, None, None], c[None, :, None, None], hi[:, None, :, None], wi[:, None, None, :]]
    n = len(pick)
    return patches.reshape(n, g, -1).permute(1, 0, 2)  # (G, n, C/G * kh * kw)


# ---------------------------------------------------------------------------------------------
# bit packing


def pack_codes(codes: np.ndarray, bits: int) -> str:
    """Codes in [-qmax, qmax] as ``bits`` bits each (offset by qmax), packed, base64."""
    import numpy as np

    u = (codes.reshape(-1).astype(np.int32) + _qmax(bits)).astype(np.uint8)
    planes = ((u[:, None] >> np.arange(bits, dtype=np.uint8)) & 1).astype(np.uint8)
    return base64.b64encode(np.packbits(planes.reshape(-1), bitorder="little").tobytes()).decode("ascii")


def unpack_codes(text: str, bits: int, n: int) -> np.ndarray:
    """Inverse of `pack_codes`: ``n`` int16 codes."""
    import numpy as np

    raw = np.frombuffer(base64.b64decode(text), dtype=np.uint8)
    planes = np.unpackbits(raw, count=n * bits, bitorder="little").reshape(n, bits).astype(np.int32)
    return ((planes << np.arange(bits)).sum(1) - _qmax(bits)).astype(np.int16)


# ---------------------------------------------------------------------------------------------
# small helpers


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)


def _device(model: torch.nn.Module) -> Any:
    import torch

    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@contextlib.contextmanager
def _eval(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the block (BatchNorm uses running statistics), the old mode restored after."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


LOWBIT = register_pass(LowBitPass(), "simulated low-bit weights (8/4/3/2 bits) by round-to-nearest or GPFQ")
