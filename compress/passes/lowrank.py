"""Low-rank decomposition of Linear and Conv1d/Conv2d layers by truncated SVD ("lowrank").

Following Liebenwein et al. 2021, "Compressing Neural Networks: Towards Determining the Optimal
Layer-wise Decomposition" (ALDS): a conv weight ``W`` of shape (out, in/G, *k) (G = the conv's
own groups) is read per conv group as a matrix (out/G, in/G * prod(k)); its columns are split by
input channel into ``c = channel_groups`` slices ``W_i`` (out/G, in/(G c) * prod(k)), and each
slice is truncated to rank ``r`` by SVD, ``W_i ~ U_i V_i``. Because ``W x = sum_i W_i x_i =
[U_1 .. U_c] [V_1 x_1; ..; V_c x_c]``, the layer becomes two real, smaller layers:

    first:  conv in -> r*G*c, kernel k, stride/padding/dilation of the original, groups G*c
            (block b = (conv group j, channel group i) holds V_b reshaped to (r, in/(G c), *k))
    second: 1x1 conv r*G*c -> out, groups G (output group j reads its c blocks), with the bias

realised as ``nn.Sequential(first, second)``, so `nas.cost.profile` sees fewer parameters and
MACs. A Linear becomes two Linears (c = 1) or, for c > 1, ``Unflatten -> Conv1d(groups=c) ->
Conv1d -> Flatten`` on a length-1 axis (this needs (batch, features) inputs, which the probe in
`apply` checks). Parameters of a decomposed layer: ``r * (in * prod(k) + out * c)`` + bias.

Error (Eckart-Young-Mirsky): truncating to rank r leaves the relative Frobenius error
``eps(r) = sqrt(sum_b sum_{i>r} s_{b,i}^2 / sum_b sum_i s_{b,i}^2)`` over the layer's blocks b;
it bounds the output error, ``||(W - W_r) x|| <= eps ||W||_F ||x||``.

Allocation for a global target (fraction of the decomposable layers' parameters to keep):

- ``optimal`` (ALDS's objective): minimise the largest ``eps_l`` over layers. For a given eps each
  layer's cheapest choice is independent: the smallest rank with ``eps_l(r) <= eps``, or the dense
  layer when that rank would not save parameters. The cost is monotone in eps, so a bisection over
  the sorted candidate values ``{eps_l(r)}`` finds the smallest eps that fits the budget -- the exact
  optimum of the min-max problem, hence never worse than any other allocation of that budget.
- ``uniform`` (baseline): one rank ratio ``r_l = max(1, floor(rho * full_rank_l))`` for all layers;
  the largest rho that fits the budget, found by the same bisection.

The record keeps per layer the rank, groups, shape and error; `replay` recomputes the SVD (float64,
deterministic) of the same original weights at the same ranks, so it rebuilds the same weights.
A run that decomposes nothing (a model whose only Conv/Linear is its head, e.g. an LSTM encoder)
says so in ``ctx.notes`` and in the record's ``noop``, so it is never mistaken for a compression.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import PolicyError
from .base import PassContext, check_settings, register_pass, resolve_layers

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["LowRankPass", "decompose_layer", "layer_error", "lowrank"]

ALLOCATIONS = ("optimal", "uniform")


@dataclass
class _Layer:
    """One decomposable layer and its spectra: ``sq[b]`` are block b's squared singular values."""

    name: str
    kind: str  # "conv" or "linear"
    shape: tuple[int, ...]
    conv_groups: int
    channel_groups: int
    full_rank: int
    dense_params: int  # weight + bias
    rank_cost: int  # parameters per unit of rank: in * prod(k) + out * c
    bias: int
    tail: list[float]  # tail[r] = relative error eps at rank r (r = 0..full_rank)

    def params(self, rank: int) -> int:
        return rank * self.rank_cost + self.bias

    @property
    def max_rank(self) -> int:
        """The largest rank that still saves parameters (0: none does)."""
        return max(0, min(self.full_rank, (self.dense_params - self.bias - 1) // self.rank_cost))


class LowRankPass:
    name = "lowrank"
    terminal = False
    defaults: Mapping[str, Any] = {
        "target": 1.0,
        "allocation": "optimal",
        "ranks": {},
        "channel_groups": 1,
        "layers": [],
        "min_params": 256,
    }

    def validate(self, settings: Mapping[str, Any]) -> None:
        s = check_settings(self.name, settings, self.defaults)
        t = s["target"]
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0.0 < t <= 1.0:
            raise PolicyError(f"lowrank: target is the fraction of parameters to keep, in (0, 1]; got {t!r}")
        if s["allocation"] not in ALLOCATIONS:
            raise PolicyError(f"lowrank: allocation {s['allocation']!r} is not one of {list(ALLOCATIONS)}")
        if not isinstance(s["ranks"], Mapping):
            raise PolicyError(f"lowrank: ranks is a table {{layer: rank}}, got {s['ranks']!r}")
        for layer, r in s["ranks"].items():
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise PolicyError(f"lowrank: rank of layer {layer!r} must be an integer >= 1, got {r!r}")
        for key in ("channel_groups", "min_params"):
            v = s[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if key == "channel_groups" else 0):
                raise PolicyError(f"lowrank: {key} must be an integer >= {1 if key == 'channel_groups' else 0}, got {v!r}")
        if not isinstance(s["layers"], list | tuple) or not all(isinstance(n, str) for n in s["layers"]):
            raise PolicyError(f"lowrank: layers is a list of layer names, got {s['layers']!r}")

    # -- apply -----------------------------------------------------------------------------------
    def apply(self, model: nn.Module, settings: Mapping[str, Any], ctx: PassContext) -> tuple[nn.Module, dict]:
        s = check_settings(self.name, settings, self.defaults)
        self.validate(s)
        if s["target"] >= 1.0 and not s["ranks"]:
            return model, {"layers": [], "skipped": [], "target": 1.0}
        ranks = {str(k): int(v) for k, v in s["ranks"].items()}
        resolve_layers(model, list(ranks), "lowrank ranks")
        names = list(dict.fromkeys(resolve_layers(model, s["layers"], "lowrank layers") or _default_layers(model)))
        names += [n for n in ranks if n not in names]
        layers, skipped = _candidates(model, names, ranks, s, ctx)

        fixed = {n: r for n, r in ranks.items() if n in layers}
        free = [layers[n] for n in layers if n not in fixed]
        total = sum(lay.dense_params for lay in layers.values())
        budget = s["target"] * total - sum(_cost(layers[n], r) for n, r in fixed.items())
        alloc = (_allocate_optimal if s["allocation"] == "optimal" else _allocate_uniform)(free, budget)
        chosen = {**alloc, **fixed}

        out_layers = []
        for name, lay in layers.items():
            r = chosen[name]
            if not 0 < r <= lay.max_rank:  # dense is as cheap as the rank this layer would need
                why = (
                    f"rank {r} saves no parameters (at most {lay.max_rank} does)"
                    if name in fixed
                    else "kept dense: the rank its error bound needs saves no parameters"
                )
                skipped.append({"layer": name, "reason": why})
                continue
            out_layers.append(
                {
                    "layer": name,
                    "kind": lay.kind,
                    "rank": r,
                    "channel_groups": lay.channel_groups,
                    "conv_groups": lay.conv_groups,
                    "shape": list(lay.shape),
                    "full_rank": lay.full_rank,
                    "params_before": lay.dense_params,
                    "params_after": lay.params(r),
                    "error": lay.tail[r],
                }
            )
        model = self.replay(model, {"layers": out_layers}, ctx)
        after = sum(_cost(lay, chosen[n]) for n, lay in layers.items())
        noop = None if out_layers else _nothing_to_factorise(model, names)
        if noop is not None and noop not in ctx.notes:  # said: a policy's fine-tuning then runs on the dense model
            ctx.notes.append(noop)
        record = {
            "layers": out_layers,
            "skipped": skipped,
            "target": float(s["target"]),
            "allocation": s["allocation"],
            "params_before": total,
            "params_after": after,
            "kept": after / total if total else 1.0,
            "budget_met": after <= s["target"] * total + 1e-9,
            "max_error": max((d["error"] for d in out_layers), default=0.0),
        }
        if noop is not None:
            record["noop"] = noop  # the pass was skipped: why (the per-layer reasons are in "skipped")
        return model, record

    # -- replay ----------------------------------------------------------------------------------
    def replay(self, model: nn.Module, record: Mapping[str, Any], ctx: PassContext) -> nn.Module:
        for entry in record.get("layers", []):
            name = entry["layer"]
            resolve_layers(model, [name], "lowrank record")
            layer = model.get_submodule(name)
            if list(layer.weight.shape) != list(entry["shape"]):
                raise PolicyError(
                    f"lowrank record: layer {name!r} has weight shape {list(layer.weight.shape)}, "
                    f"the record was made for {entry['shape']}"
                )
            new = decompose_layer(layer, int(entry["rank"]), int(entry["channel_groups"]), entry["kind"])
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        return model


# -- decomposition ---------------------------------------------------------------------------------
def _blocks(weight: torch.Tensor, conv_groups: int, channel_groups: int) -> list[torch.Tensor]:
    """The (out/G, in/(G c) * prod(k)) matrices, block b = j * c + i (conv group j, channel group i)."""
    out = weight.shape[0]
    in_g = weight.shape[1]  # in / G
    import torch

    w = weight.detach().to("cpu", dtype=torch.float64).reshape(conv_groups, out // conv_groups, in_g, -1)
    step = in_g // channel_groups
    return [
        w[j, :, i * step : (i + 1) * step, :].reshape(out // conv_groups, -1)
        for j in range(conv_groups)
        for i in range(channel_groups)
    ]


def decompose_layer(layer: nn.Module, rank: int, channel_groups: int = 1, kind: str | None = None) -> nn.Sequential:
    """``layer`` (Linear, Conv1d, Conv2d) as two smaller layers of rank ``rank`` per block.

    The truncated SVD ``W_b = U S V^T`` is split evenly, first = sqrt(S) V^T and second = U sqrt(S),
    so neither factor's scale dominates (better conditioned for fine-tuning). With
    ``rank = min(rows, cols)`` of each block the result computes the same function."""
    import torch
    from torch import nn

    kind = kind or ("linear" if isinstance(layer, nn.Linear) else "conv")
    w = layer.weight
    conv_groups = 1 if kind == "linear" else layer.groups
    out = w.shape[0]
    c = channel_groups
    firsts, seconds = [], []
    for m in _blocks(w, conv_groups, c):
        u, sv, vh = torch.linalg.svd(m, full_matrices=False)
        if rank > sv.numel():
            raise PolicyError(f"lowrank: rank {rank} exceeds the full rank {sv.numel()} of a block")
        root = sv[:rank].sqrt()
        firsts.append(root[:, None] * vh[:rank])  # (r, in_b * prod(k))
        seconds.append(u[:, :rank] * root[None, :])  # (out/G, r)
    first_w = torch.cat(firsts).reshape(rank * conv_groups * c, w.shape[1] // c, *w.shape[2:])
    # second layer, group j: (out/G, c*r) = [U_{j,1} .. U_{j,c}]
    second_w = torch.cat([torch.cat(seconds[j * c : (j + 1) * c], dim=1) for j in range(conv_groups)])
    opts = {"device": w.device, "dtype": w.dtype}
    bias = layer.bias is not None

    if kind == "linear" and c == 1:
        first = nn.Linear(w.shape[1], rank, bias=False, **opts)
        second = nn.Linear(rank, out, bias=bias, **opts)
        first.weight.data.copy_(first_w.reshape(rank, -1))
        second.weight.data.copy_(second_w)
        mods: list[nn.Module] = [first, second]
    else:
        conv = nn.Conv1d if kind == "linear" or w.dim() == 3 else nn.Conv2d
        if kind == "linear":
            first = conv(w.shape[1], rank * c, 1, groups=c, bias=False, **opts)
        else:
            first = conv(
                layer.in_channels,
                rank * conv_groups * c,
                layer.kernel_size,
                stride=layer.stride,
                padding=layer.padding,
                dilation=layer.dilation,
                groups=conv_groups * c,
                bias=False,
                padding_mode=layer.padding_mode,
                **opts,
            )
        second = conv(rank * conv_groups * c, out, 1, groups=conv_groups, bias=bias, **opts)
        first.weight.data.copy_(first_w.reshape(first.weight.shape))
        second.weight.data.copy_(second_w.reshape(second.weight.shape))
        mods = [first, second]
        if kind == "linear":  # (N, in) -> (N, in, 1) -> convs -> (N, out)
            mods = [nn.Unflatten(-1, (w.shape[1], 1)), first, second, nn.Flatten(-2)]
    if bias:
        second.bias.data.copy_(layer.bias.detach())
    return nn.Sequential(*mods)


def layer_error(original: nn.Module, decomposed: nn.Module) -> float:
    """Relative Frobenius error ||W - W_r|| / ||W|| of a `decompose_layer` result (for tests and
    reports): rebuilds W_r from the two factors."""
    import torch
    from torch import nn

    convs = [m for m in decomposed if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Linear)]
    first, second = convs
    w = original.weight.detach().double()
    groups = 1 if isinstance(original, nn.Linear) else original.groups
    blocks = getattr(first, "groups", 1)
    c = blocks // groups
    r = first.weight.shape[0] // blocks
    f = first.weight.detach().double().reshape(blocks, r, -1)  # (B, r, in_b * k)
    g = second.weight.detach().double().reshape(groups, -1, c, r)  # (G, out/G, c, r)
    approx = torch.stack([g[b // c, :, b % c, :] @ f[b] for b in range(blocks)])
    exact = torch.stack(_blocks(w, groups, c))
    return float((exact - approx).norm() / exact.norm())


# -- candidates and allocation ---------------------------------------------------------------------
def _is_weight_layer(m: nn.Module) -> bool:
    from torch import nn

    return isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d)


def _default_layers(model: nn.Module) -> list[str]:
    """Every Conv1d/Conv2d/Linear except the last one in module order (the classifier)."""
    names = [n for n, m in model.named_modules() if n and _is_weight_layer(m)]
    return names[:-1]


def _nothing_to_factorise(model: nn.Module, names: list[str]) -> str:
    """The note for a run that decomposed no layer, saying why."""
    weight_layers = [n for n, m in model.named_modules() if n and _is_weight_layer(m)]
    if not weight_layers:
        why = "the model has no Conv1d/Conv2d/Linear layer (recurrent weights are not decomposed)"
    elif not names:
        why = f"its only Conv/Linear layer, {weight_layers[0]!r}, is the last one (the head, kept dense)"
    else:
        why = "every candidate layer was skipped or kept dense at these settings (see the record's skipped)"
    return f"lowrank: no layer to factorise: {why}; the model is unchanged"


def _linear_inputs_2d(model: nn.Module, names: list[str], ctx: PassContext) -> dict[str, bool]:
    """Whether each named Linear sees (batch, features) inputs: a grouped Linear is realised with
    Conv1d on a length-1 axis, which needs them. One forward of two zero samples tells."""
    import torch

    seen: dict[str, bool] = {}
    hooks = [
        model.get_submodule(n).register_forward_hook(lambda _m, args, _o, n=n: seen.__setitem__(n, args[0].dim() == 2))
        for n in names
    ]
    p = next(model.parameters())
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(2, *ctx.input_shape, device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return {n: seen.get(n, False) for n in names}


def _candidates(
    model: nn.Module, names: list[str], ranks: dict[str, int], s: Mapping[str, Any], ctx: PassContext
) -> tuple[dict[str, _Layer], list[dict[str, str]]]:
    import torch
    from torch import nn

    layers: dict[str, _Layer] = {}
    skipped: list[dict[str, str]] = []
    c_req = int(s["channel_groups"])
    linears = [n for n in names if isinstance(model.get_submodule(n), nn.Linear)]
    flat = _linear_inputs_2d(model, linears, ctx) if c_req > 1 and linears else {}
    for name in names:
        m = model.get_submodule(name)
        if not _is_weight_layer(m):
            raise PolicyError(
                f"lowrank: layer {name!r} is a {type(m).__name__}; only Linear, Conv1d and Conv2d decompose"
            )
        w = m.weight
        kind = "linear" if isinstance(m, nn.Linear) else "conv"
        groups = 1 if kind == "linear" else m.groups
        if kind == "conv" and groups == m.in_channels and groups > 1:
            skipped.append({"layer": name, "reason": "depthwise (already rank-minimal)"})
            continue
        if w.numel() < s["min_params"] and name not in ranks:
            skipped.append({"layer": name, "reason": f"fewer than min_params={s['min_params']} weights"})
            continue
        c = c_req if (kind == "conv" or flat.get(name, False)) else 1
        if w.shape[1] % c:
            skipped.append({"layer": name, "reason": f"{w.shape[1]} input channels per group not divisible by {c}"})
            continue
        sq = [torch.linalg.svdvals(b).square() for b in _blocks(w, groups, c)]
        energy = float(sum(v.sum() for v in sq))
        full = sq[0].numel()  # every block has the same shape
        # tail[r] = sum over blocks of the energy beyond rank r (Eckart-Young-Mirsky)
        tails = sum(torch.cat([v.flip(0).cumsum(0).flip(0), v.new_zeros(1)])[: full + 1] for v in sq)
        tail = [math.sqrt(max(float(t), 0.0) / energy) if energy > 0 else 0.0 for t in tails]
        k = int(math.prod(w.shape[2:]))
        in_ch = w.shape[1] * groups
        bias = m.bias.numel() if m.bias is not None else 0
        lay = _Layer(name, kind, tuple(w.shape), groups, c, full, w.numel() + bias, in_ch * k + w.shape[0] * c, bias, tail)
        if name in ranks and ranks[name] > full:
            raise PolicyError(f"lowrank: rank {ranks[name]} for layer {name!r} exceeds its full rank {full}")
        if lay.max_rank == 0 and name not in ranks:
            skipped.append({"layer": name, "reason": "no rank saves parameters"})
            continue
        layers[name] = lay
    return layers, skipped


def _cost(lay: _Layer, rank: int) -> int:
    """Parameters of the layer at ``rank``; rank 0 or a rank that saves nothing means dense."""
    return lay.params(rank) if 0 < rank <= lay.max_rank else lay.dense_params


def _bisect(candidates: list[Any], fits: Any) -> int:
    """Index of the first candidate (sorted so that cost falls) that fits; len when none does."""
    lo, hi = 0, len(candidates)
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(candidates[mid]):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _allocate_optimal(layers: list[_Layer], budget: float) -> dict[str, int]:
    """Ranks minimising max_l eps_l under ``sum params <= budget`` (0 = keep the layer dense)."""

    def ranks_at(eps: float) -> dict[str, int]:
        out = {}
        for lay in layers:
            r = next(r for r in range(1, lay.full_rank + 1) if lay.tail[r] <= eps)
            out[lay.name] = r if r <= lay.max_rank else 0
        return out

    def fits(eps: float) -> bool:
        return sum(_cost(lay, r) for lay, r in zip(layers, ranks_at(eps).values(), strict=True)) <= budget

    # eps = 0 keeps every layer dense (exact); the rank-1 errors are the largest that can matter
    cands = sorted({0.0, *(t for lay in layers for t in lay.tail[1 : lay.max_rank + 1])})
    i = _bisect(cands, fits)
    return ranks_at(cands[min(i, len(cands) - 1)]) if cands else {}


def _allocate_uniform(layers: list[_Layer], budget: float) -> dict[str, int]:
    """One rank ratio rho for all layers, r_l = max(1, floor(rho * full_l)); the largest rho that fits."""

    def ranks_at(rho: float) -> dict[str, int]:
        out = {}
        for lay in layers:
            r = max(1, math.floor(rho * lay.full_rank + 1e-9))
            out[lay.name] = r if r <= lay.max_rank else 0
        return out

    def fits(rho: float) -> bool:
        return sum(_cost(lay, r) for lay, r in zip(layers, ranks_at(rho).values(), strict=True)) <= budget

    # candidate ratios, largest first (cost falls along the list); 1.0 is the dense model
    cands = sorted({1.0, *(r / lay.full_rank for lay in layers for r in range(1, lay.full_rank + 1))}, reverse=True)
    i = _bisect(cands, fits)
    return ranks_at(cands[min(i, len(cands) - 1)]) if cands else {}


lowrank = register_pass(LowRankPass(), "low-rank SVD of Conv/Linear layers, per-layer ranks by min-max error (ALDS)")
