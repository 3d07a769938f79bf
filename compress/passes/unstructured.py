"""Unstructured magnitude pruning ("unstructured"), one-shot or iterative (Lottery Ticket).

The prunable weights are the ``weight`` of every Conv1d/2d/3d and Linear layer (biases, norms and
embeddings stay dense). A weight is pruned by setting it to zero -- no `torch.nn.utils.prune`
re-parametrisation hooks, which break deepcopy and ONNX export -- so the pruned model is a plain
module whose zeros *are* the mask; `masks_of(model)` reads that pattern back so the fine-tuning
after the pass can keep the zeros zero (``compress.passes.finetune.train(..., masks=...)``).

- ``scope="global"``: one magnitude threshold over all prunable weights (layers end up with
  different sparsities); ``scope="layer"``: the same sparsity in every layer. ``per_layer``
  pins a layer's own sparsity; ``ignore`` leaves layers dense. Ties are broken by position, so
  the count of zeros is exact: ``round(sparsity * n)``.
- ``iterations > 1``: iterative magnitude pruning (Frankle & Carbin 2019, "The Lottery Ticket
  Hypothesis"): step t of n reaches sparsity ``1 - (1 - s)^(t/n)`` (each step removes the same
  fraction of the survivors), ranking the surviving weights by magnitude, with
  ``epochs_per_iteration`` epochs of masked training between steps. With ``rewind`` the
  survivors are reset after every step to their values when the pass began (the "iteration 0"
  weights of LTH) before training on, so the model the pass returns is ``w_0 * mask``.

Replay: the record holds each layer's mask (``numpy.packbits`` of the flattened 0/1 pattern,
base64). Replay multiplies the *original* weights by the masks. With ``iterations == 1`` (no
training in the pass) that is exactly what apply returns. With training (or rewinding) the
weights apply returns depend on the training run: replay then gives ``mask * original weights``
(the rewound model when ``rewind`` is set, except for the biases and norms training also moved),
and the trained weights must be loaded separately (they are saved with the fine-tuned model).

Unstructured zeros shrink a compressed file (`compressed_size_bytes`) but a dense runtime still
multiplies by them: no speed-up, which the record and ``ctx.notes`` say.
"""

from __future__ import annotations

import base64
import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import PolicyError
from .base import PassContext, check_settings, register_pass, resolve_layers

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["NOTE", "UnstructuredPass", "compressed_size_bytes", "masks_of", "prunable_layers", "unstructured"]

NOTE = "unstructured sparsity shrinks a compressed file but gives no dense-runtime speed-up"
SCOPES = ("global", "layer")


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{layer name: module} of every Conv1d/2d/3d and Linear with a weight, in module order."""
    from torch import nn

    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return {n: m for n, m in model.named_modules() if n and isinstance(m, kinds) and m.weight is not None}


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """{parameter name ("conv.weight"): 0/1 tensor} for the prunable weights that hold zeros --
    the pattern a masked fine-tune must keep. Dense layers are left out (nothing to keep)."""
    out = {}
    for name, m in prunable_layers(model).items():
        w = m.weight.detach()
        if not bool(w.ne(0).all()):
            out[f"{name}.weight"] = w.ne(0).to(w.dtype)
    return out


def compressed_size_bytes(model: nn.Module) -> int:
    """Bytes of the float32 state dict (tensors in state-dict order) after zlib level 9: what
    zero weights save in a compressed file, reported honestly next to the dense size."""
    import torch

    z = zlib.compressobj(9)
    size = 0
    for t in model.state_dict().values():
        size += len(z.compress(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()))
    return size + len(z.flush())


def _pack(mask: torch.Tensor) -> str:
    import numpy as np

    return base64.b64encode(np.packbits(mask.detach().cpu().numpy().astype(bool).ravel()).tobytes()).decode()


def _unpack(text: str, shape: list[int], like: torch.Tensor) -> torch.Tensor:
    import numpy as np
    import torch

    n = int(np.prod(shape))
    bits = np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8), count=n)
    return torch.from_numpy(bits.reshape(shape).copy()).to(like.device, like.dtype)


class UnstructuredPass:
    name = "unstructured"
    terminal = False
    defaults: Mapping[str, Any] = {
        "sparsity": 0.0,
        "scope": "global",
        "per_layer": {},
        "ignore": [],
        "iterations": 1,
        "epochs_per_iteration": 1,
        "rewind": False,
        "lr": 1e-3,
    }

    def validate(self, settings: Mapping[str, Any]) -> None:
        s = check_settings(self.name, settings, self.defaults)
        _fraction("sparsity", s["sparsity"])
        if s["scope"] not in SCOPES:
            raise PolicyError(f"unstructured: scope {s['scope']!r} is not one of {list(SCOPES)}")
        if not isinstance(s["per_layer"], Mapping):
            raise PolicyError(f"unstructured: per_layer is a table {{layer: sparsity}}, got {s['per_layer']!r}")
        for layer, v in s["per_layer"].items():
            _fraction(f"per_layer[{layer!r}]", v)
        if not isinstance(s["ignore"], list | tuple) or not all(isinstance(n, str) for n in s["ignore"]):
            raise PolicyError(f"unstructured: ignore is a list of layer names, got {s['ignore']!r}")
        for key, low in (("iterations", 1), ("epochs_per_iteration", 0)):
            v = s[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise PolicyError(f"unstructured: {key} must be an integer >= {low}, got {v!r}")
        if not isinstance(s["rewind"], bool):
            raise PolicyError(f"unstructured: rewind is true or false, got {s['rewind']!r}")
        lr = s["lr"]
        if isinstance(lr, bool) or not isinstance(lr, int | float) or lr <= 0:
            raise PolicyError(f"unstructured: lr must be a positive number, got {lr!r}")

    def apply(self, model: nn.Module, settings: Mapping[str, Any], ctx: PassContext) -> tuple[nn.Module, dict]:
        import torch

        s = check_settings(self.name, settings, self.defaults)
        self.validate(s)
        layers = prunable_layers(model)
        ignore = set(resolve_layers(model, s["ignore"], "unstructured ignore"))
        per_layer = {str(k): float(v) for k, v in s["per_layer"].items()}
        for name in resolve_layers(model, list(per_layer), "unstructured per_layer"):
            if name not in layers:
                raise PolicyError(f"unstructured per_layer: {name!r} is not a Conv/Linear layer; prunable: {list(layers)[:8]}")
        targets = {n: per_layer.get(n, float(s["sparsity"])) for n in layers if n not in ignore}
        if not any(v > 0 for v in targets.values()):
            return model, {"layers": {}, "sparsity": 0.0}

        weights = {n: layers[n].weight for n in targets}
        start = {n: w.detach().clone() for n, w in weights.items()}  # iteration-0 weights (LTH)
        n_iter = int(s["iterations"])
        masks: dict[str, torch.Tensor] = {}
        for t in range(1, n_iter + 1):
            # geometric schedule: every step keeps the same fraction of the survivors
            step = {n: 1.0 - (1.0 - v) ** (t / n_iter) for n, v in targets.items()}
            masks = _magnitude_masks(weights, step, per_layer, s["scope"], masks)
            with torch.no_grad():
                for n, w in weights.items():
                    w.copy_((start[n] if s["rewind"] else w) * masks[n])
            if t < n_iter and s["epochs_per_iteration"] > 0:
                from .finetune import train

                train(
                    model,
                    ctx,
                    int(s["epochs_per_iteration"]),
                    lr=float(s["lr"]),
                    masks={f"{n}.weight": m for n, m in masks.items()},
                    seed=ctx.seed + t,
                )
        record = {
            "layers": {
                n: {"shape": list(m.shape), "sparsity": float(1.0 - m.mean()), "mask": _pack(m)}
                for n, m in masks.items()
            },
            **_overall(layers, ignore),
            "iterations": n_iter,
            "rewind": bool(s["rewind"]),
            "trained": n_iter > 1 and s["epochs_per_iteration"] > 0,
            "note": NOTE,
        }
        if NOTE not in ctx.notes:
            ctx.notes.append(NOTE)
        return model, record

    def replay(self, model: nn.Module, record: Mapping[str, Any], ctx: PassContext) -> nn.Module:
        """``mask * weight`` of the model given (the original); trained weights load separately."""
        import torch

        entries = record.get("layers", {})
        resolve_layers(model, list(entries), "unstructured record")
        with torch.no_grad():
            for name, entry in entries.items():
                w = model.get_submodule(name).weight
                if list(w.shape) != list(entry["shape"]):
                    raise PolicyError(
                        f"unstructured record: layer {name!r} has weight shape {list(w.shape)}, "
                        f"the record was made for {entry['shape']}"
                    )
                w.mul_(_unpack(entry["mask"], entry["shape"], w))
        if entries and NOTE not in ctx.notes:
            ctx.notes.append(NOTE)
        return model


def _fraction(what: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= v < 1.0:
        raise PolicyError(f"unstructured: {what} is the fraction of weights set to zero, in [0, 1); got {v!r}")


def _magnitude_masks(
    weights: Mapping[str, torch.Tensor],
    targets: Mapping[str, float],
    pinned: Mapping[str, float],
    scope: str,
    previous: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """0/1 masks with exactly round(target * n) zeros, smallest magnitudes first. Weights already
    pruned (``previous``) rank below every survivor, so masks only ever lose ones (IMP): being
    zero they would rank lowest anyway, but a weight that is exactly zero without having been
    pruned ties with them, and the tie must not un-prune one."""
    import torch

    def scores(n: str) -> torch.Tensor:
        a = weights[n].detach().abs().flatten().double()
        return a.masked_fill(previous[n].flatten() == 0, -1.0) if n in previous else a

    def lowest(score: torch.Tensor, k: int) -> torch.Tensor:
        keep = torch.ones_like(score)
        if k > 0:  # stable sort: ties go by position, so the count is exact and repeatable
            keep[torch.sort(score, stable=True).indices[:k]] = 0.0
        return keep

    masks: dict[str, torch.Tensor] = {}
    pooled = [n for n in weights if scope == "global" and n not in pinned]
    for n in weights:
        if n not in pooled:
            sc = scores(n)
            masks[n] = lowest(sc, round(targets[n] * sc.numel())).reshape(weights[n].shape)
    if pooled:
        # one threshold over the pooled layers: their common target applies to their union
        sc = torch.cat([scores(n) for n in pooled])
        keep = lowest(sc, round(targets[pooled[0]] * sc.numel()))
        for n, part in zip(pooled, keep.split([weights[n].numel() for n in pooled]), strict=True):
            masks[n] = part.reshape(weights[n].shape)
    return {n: masks[n].to(weights[n].dtype) for n in weights}


def _overall(layers: Mapping[str, nn.Module], ignore: set[str]) -> dict[str, float]:
    """Achieved fraction of zeros over the pruned layers and over all prunable weights."""
    zeros = total = zeros_all = total_all = 0
    for n, m in layers.items():
        z, k = int((m.weight == 0).sum()), m.weight.numel()
        zeros_all, total_all = zeros_all + z, total_all + k
        if n not in ignore:
            zeros, total = zeros + z, total + k
    return {"sparsity": zeros / max(total, 1), "sparsity_all": zeros_all / max(total_all, 1)}


unstructured = register_pass(
    UnstructuredPass(), "magnitude pruning of Conv/Linear weights to zeros, global or per layer, iterative (LTH)"
)
