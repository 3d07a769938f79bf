"""`structured`: remove whole channels/filters so layers physically shrink, through Torch-Pruning.

DepGraph (Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023) groups every
parameter that must lose the same channels together -- a conv's filters, its BN, the next
layers' input slices, everything joined by a residual add or sliced out of a concatenation --
so pruning a group keeps the network consistent. We use Torch-Pruning's graph, importance
criteria and `BasePruner` as they are and write no tracer of our own:

- importance: ``l1``/``l2`` filter norms (Li et al., "Pruning Filters for Efficient ConvNets",
  ICLR 2017), ``taylor`` first-order |w * dL/dw| (Molchanov et al., CVPR 2019) from the loss on
  ``ctx.calibration()``, ``bn_scale`` BN gammas (Liu et al., "Network Slimming", ICCV 2017);
- ``global_pruning``: one ranking over all groups instead of the same ratio in each.

Settings: ``per_layer`` names a layer or a container (every prunable layer inside gets that
ratio); ``ignore`` keeps the *output* channels of the named layers (their input channels still
follow the layer feeding them), as Torch-Pruning's ``ignored_layers``; the classifier (the
layer producing the model output) is always ignored, and no group is ever pruned to zero.
``round_to`` keeps channel counts multiples of it, rounding the kept count *up* (`grid_pruned`):
a layer never loses more channels than the ratio asks (0.3 of 16 on a grid of 8 prunes none
rather than half), and ``ratios`` in the record shows each layer's asked and actual ratio.

Four things Torch-Pruning would get wrong are handled around it:

1. Modules whose output never reaches the model output (a NASNet cell input that no block
   reads, whose preprocessing conv still runs) are invisible to its autograd trace, so pruning
   their producer would leave their input width stale. The trace therefore also starts from
   every parameterised module's output (`_forward_all`).
2. Leaf modules of types it has no pruner for that hold per-channel parameters or buffers
   (custom ops) would be treated as element-wise and silently mis-pruned. They are registered as
   opaque "frozen" layers: every group touching them is dropped, so they and their neighbours
   keep their channels, and they are listed in the record's ``layers_skipped``.
3. Ops that move channels (a channel shuffle's transpose, gathers) are also taken as
   element-wise: the model would run and be wrong. Groups through them are left unpruned and
   their root layers named in ``layers_skipped``.
4. Anything else (a layer used only through its weight, a topology its index mapping gets
   wrong): the pruned model must still run a forward pass. If it does not, pruning restarts from
   the original checking the forward pass after every group, and the group that breaks it is
   left out (its root layer ignored and named in ``layers_skipped``). A model that still fails
   at the end is a `PolicyError` naming it -- never a silently broken model.

Record (plain JSON)::

    {"input_shape": [1, 8, 8],
     "history": [{"layer": "stem.0", "dim": "out", "channels": 24, "keep": [0, 3, ...]}, ...],
     "layers": {"stem.0": [24, 12], ...},          # out channels before -> after, pruned layers
     "ratios": {"stem.0": {"asked": 0.5, "actual": 0.5, "channels": [24, 12]}, ...},  # every layer asked
     "layers_skipped": ["cells.0.weird"],          # layers Torch-Pruning could not handle
     "params": [before, after], "macs": [before, after]}

``history`` is Torch-Pruning's pruning history (root layer name, out/in, indices) in the order
it was applied, with the *kept* indices among the layer's ``channels`` at that step; replaying it
on a fresh copy of the original through the same dependency graph (what
``DependencyGraph.load_pruning_history`` does) rebuilds the same structure and weights, no data.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import PolicyError
from .base import PassContext, check_settings, register_pass, resolve_layers

if TYPE_CHECKING:
    import torch

__all__ = ["IMPORTANCES", "StructuredPruning", "STRUCTURED"]

IMPORTANCES = ("l1", "l2", "taylor", "bn_scale")
_TAYLOR_BATCH = 64


class StructuredPruning:
    """Channel pruning with Torch-Pruning's DepGraph; see the module docstring."""

    name = "structured"
    terminal = False
    defaults: Mapping[str, Any] = {
        "ratio": 0.0,  # fraction of channels removed (per group, or overall with global_pruning)
        "per_layer": {},  # {layer name: ratio} overriding ``ratio`` for those layers
        "global_pruning": False,
        "importance": "l1",
        # keep channel counts multiples of this: ONNX Runtime's fast conv kernels (MLAS NCHWc) want
        # multiples of 4-16; off that grid (1 or 2) a 30%-pruned UniRepLKNet ran 1.3-12x *slower*
        # than unpruned on this CPU, on the grid 1.5-5x faster (results/round_to.md)
        "round_to": 8,
        "ignore": [],  # layers whose output channels are never pruned
    }

    # -- settings -----------------------------------------------------------------------------------
    def validate(self, settings: Mapping[str, Any]) -> None:
        _check_ratio("ratio", settings["ratio"])
        per_layer = settings["per_layer"]
        if not isinstance(per_layer, Mapping):
            raise PolicyError(f"structured: 'per_layer' is a table {{layer: ratio}}, got {per_layer!r}")
        for layer, ratio in per_layer.items():
            _check_ratio(f"per_layer[{layer!r}]", ratio)
        if not isinstance(settings["global_pruning"], bool):
            raise PolicyError(f"structured: 'global_pruning' is true or false, got {settings['global_pruning']!r}")
        if settings["importance"] not in IMPORTANCES:
            raise PolicyError(
                f"structured: unknown importance {settings['importance']!r}; valid: {', '.join(IMPORTANCES)}"
            )
        round_to = settings["round_to"]
        if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
            raise PolicyError(f"structured: 'round_to' is an integer >= 1, got {round_to!r}")
        ignore = settings["ignore"]
        if isinstance(ignore, str) or not isinstance(ignore, Sequence) or not all(isinstance(n, str) for n in ignore):
            raise PolicyError(f"structured: 'ignore' is a list of layer names, got {ignore!r}")

    # -- apply --------------------------------------------------------------------------------------
    def apply(self, model: torch.nn.Module, settings: Mapping[str, Any], ctx: PassContext) -> tuple[Any, dict]:
        from nas.cost import profile

        s = check_settings(self.name, settings, self.defaults)
        self.validate(s)
        per_layer = dict(zip(resolve_layers(model, list(s["per_layer"]), "structured: per_layer"),
                             (float(r) for r in s["per_layer"].values()), strict=True))
        ignore = resolve_layers(model, s["ignore"], "structured: ignore")
        shape = list(ctx.input_shape)
        x = _example(model, shape)
        expected = _output_shape(model, x)  # a PolicyError if the model does not take this input
        before = profile(model, shape)
        if float(s["ratio"]) == 0.0 and not any(per_layer.values()):
            return model, _record(shape, [], {}, [], before, before)

        modes = _training_flags(model)
        names = dict(model.named_modules())
        keep_out = sorted(set(ignore) | set(_classifiers(model, x)))
        skipped = _frozen_layers(model)  # custom ops Torch-Pruning has no pruner for
        failed: list[str] = []  # roots of groups whose pruning broke the forward pass
        check_each = False  # optimistic first: one forward pass at the end, per group only if that fails
        for _ in range(len(names) + 2):  # each failure ignores one more layer, so this ends
            work = copy.deepcopy(model)
            wnames = dict(work.named_modules())
            pruner = _pruner(work, x, s, {wnames[n]: r for n, r in per_layer.items()},
                             [wnames[n] for n in keep_out + failed if n in wnames], skipped)
            if s["importance"] == "taylor":
                _taylor_gradients(work, ctx)
            unsafe: list[str] = []
            off_grid: list[str] = []
            broke, widths = _prune_checked(pruner, work, x, expected, int(s["round_to"]), unsafe, off_grid,
                                           check_each)
            if broke is None and (check_each or _run(work, x) == expected):
                break
            if broke is not None:
                failed.append(broke)
            check_each = True
        else:  # pragma: no cover - every retry ignores a further layer
            raise PolicyError(f"structured: could not prune {type(model).__name__} without breaking it")
        history = [_entry(n, *h) for n, h in zip(widths, pruner.pruning_history(), strict=True)]
        for p in work.parameters():
            p.grad = None
        _restore_flags(work, modes)
        _verify(work, x, expected, type(model).__name__, history)
        _notes(ctx, work, s, history, off_grid)
        left = sorted({*skipped, *failed, *unsafe})
        if left:  # named, not hidden: the model is valid, these layers just kept their channels
            ctx.notes.append(f"structured: left unpruned (Torch-Pruning cannot prune them safely): {', '.join(left[:8])}"
                             + (f" and {len(left) - 8} more" if len(left) > 8 else ""))
        after = profile(work, shape)
        layers = _layer_widths(model, work)
        odd = sorted(n for n, (_, kept) in layers.items() if kept % 4)
        if odd and len(shape) == 3:  # 2-D convs: 1-D ones barely care (results/round_to_mnist1d.md)
            ctx.notes.append(f"structured: round_to={s['round_to']} left {len(odd)} layer(s) with channel counts "
                             f"off a multiple of 4 (e.g. {odd[0]}: {layers[odd[0]][1]}); ONNX Runtime may run such "
                             "a model slower than the unpruned one (round_to=8 keeps them on its kernels' grid)")
        ratios = _layer_ratios(model, work, float(s["ratio"]), per_layer, keep_out)
        short = [n for n, r in ratios.items() if r["actual"] < r["asked"] - 1.0 / r["channels"][0] and n not in left]
        if short and int(s["round_to"]) > 1 and not s["global_pruning"]:  # said, so a reader of the ratio is not misled
            r = ratios[short[0]]
            ctx.notes.append(f"structured: round_to={s['round_to']} never prunes more than asked, so {len(short)} layer(s) "
                             f"kept more channels than the ratio (e.g. {short[0]}: asked {r['asked']:.2f}, pruned "
                             f"{r['actual']:.2f} of {r['channels'][0]}); a smaller round_to prunes them closer to it")
        return work, _record(shape, history, layers, sorted({*skipped, *failed, *unsafe}), before, after, ratios)

    # -- replay -------------------------------------------------------------------------------------
    def replay(self, model: torch.nn.Module, record: Mapping[str, Any], ctx: PassContext) -> Any:
        history = record.get("history", [])
        if not history:
            return model
        import torch_pruning as tp

        shape = list(record["input_shape"])
        modes = _training_flags(model)
        x = _example(model, shape)
        expected = _output_shape(model, x)
        with _quiet():
            dg = tp.DependencyGraph().build_dependency(
                model, x, forward_fn=_forward_all, customized_pruners=_frozen_pruners(model), verbose=False
            )
        names = dict(model.named_modules())
        for step in history:  # DependencyGraph.load_pruning_history, with kept indices and checks
            layer, dim, channels, keep = step["layer"], step["dim"], int(step["channels"]), step["keep"]
            if layer not in names:
                raise PolicyError(f"structured: the record prunes layer {layer!r}, which this model lacks")
            module = names[layer]
            handler = dg.get_pruner_of_module(module)
            now = dg.get_out_channels(module) if dim == "out" else dg.get_in_channels(module)
            if now != channels or not set(keep) <= set(range(channels)):
                raise PolicyError(
                    f"structured: layer {layer!r} has {now} {dim}put channels, the record expects {channels}; "
                    "replay needs a fresh copy of the model the record was made on"
                )
            fn = handler.prune_out_channels if dim == "out" else handler.prune_in_channels
            kept = set(keep)
            pruned = [i for i in range(channels) if i not in kept]
            if pruned:
                dg.get_pruning_group(module, fn, pruned).prune(record_history=False)
        _restore_flags(model, modes)
        _verify(model, x, expected, type(model).__name__, history)
        return model


# ---------------------------------------------------------------------------------------------
# Torch-Pruning set-up


def _pruner(
    model: torch.nn.Module,
    x: torch.Tensor,
    s: Mapping[str, Any],
    per_layer: dict[torch.nn.Module, float],
    ignored: list[torch.nn.Module],
    frozen: list[str],
) -> Any:
    import torch_pruning as tp

    importance = {
        "l1": lambda: tp.importance.MagnitudeImportance(p=1),
        "l2": lambda: tp.importance.MagnitudeImportance(p=2),
        "taylor": tp.importance.TaylorImportance,
        "bn_scale": tp.importance.BNScaleImportance,
    }[s["importance"]]()
    names = dict(model.named_modules())
    with _quiet():
        return _pruner_class()(
            model,
            x,
            importance=importance,
            global_pruning=bool(s["global_pruning"]),
            pruning_ratio=float(s["ratio"]),
            pruning_ratio_dict=per_layer or None,
            ignored_layers=ignored + [names[n] for n in frozen],
            round_to=int(s["round_to"]) if s["round_to"] > 1 else None,
            forward_fn=_forward_all,
            customized_pruners=_frozen_pruners(model),
        )


def grid_pruned(n_pruned: int, channels: int, round_to: int) -> int:
    """How many of ``channels`` to prune when ``n_pruned`` are asked and the kept count must be a
    multiple of ``round_to``: the kept count is rounded *up* to the grid, so pruning never exceeds
    what was asked (Torch-Pruning rounds it down: ratio 0.3 of 16 channels on a grid of 8 pruned
    half of them), and at least one ``round_to`` group is kept (a layer no wider than that is not
    pruned). A layer whose width is off the grid may keep all its channels."""
    if round_to <= 1:
        return max(0, min(n_pruned, channels - 1))
    kept = -(-(channels - n_pruned) // round_to) * round_to  # ceil to a multiple of round_to
    kept = max(kept, round_to)
    return channels - kept if kept < channels else 0


@functools.cache
def _pruner_class() -> type:
    """Torch-Pruning's `BasePruner` with `grid_pruned` as its channel rounding."""
    import torch_pruning as tp

    class Pruner(tp.pruner.BasePruner):
        def _round_to(self, n_pruned: int, current_channels: int, round_to: int) -> int:
            return grid_pruned(int(n_pruned), int(current_channels), int(round_to))

    return Pruner


def _prune_checked(
    pruner: Any,
    model: torch.nn.Module,
    x: torch.Tensor,
    expected: tuple[int, ...],
    round_to: int,
    unsafe: list[str],
    off_grid: list[str],
    check_each: bool,
) -> tuple[str | None, list[int]]:
    """Prune group by group. Returns the root of the first group whose pruning raised or (with
    ``check_each``) after which the model no longer runs -- the model is then inconsistent and
    must be discarded -- or None, and the root's width before
    each pruned group (one per entry of the pruning history, which each ``prune()`` extends).
    Groups running through a channel-reordering op are left alone, their roots put in ``unsafe``;
    so are groups where some layer would miss the ``round_to`` grid (``off_grid``)."""
    dg, widths = pruner.DG, []
    for group in pruner.step(interactive=True):
        root, handler = group[0].dep.target.module, group[0].dep.handler
        name = dg._module2name.get(root, "?")
        if not any(len(idxs) for _, idxs in group):  # `grid_pruned` kept every channel
            continue
        if _reorders_channels(group):
            unsafe.append(name)
            continue
        if not _on_grid(dg, group, round_to):
            off_grid.append(name)
            continue
        widths.append(dg.get_out_channels(root) if dg.is_out_channel_pruning_fn(handler) else dg.get_in_channels(root))
        try:
            with _quiet():
                group.prune()
        except Exception:  # e.g. Torch-Pruning's own index checks; the model is half-pruned
            return name, widths
        if check_each and _run(model, x) != expected:
            return name, widths
    return None, widths


# Ops Torch-Pruning treats as element-wise although they move channels (channel shuffle's transpose,
# gathers, rolls): pruning through them shrinks the right widths but removes the wrong inputs
# downstream -- a model that runs and is silently wrong. Matched against autograd node names.
_REORDERING_OPS = ("transpose", "permute", "shuffle", "index", "gather", "scatter", "roll", "flip",
                   "unfold", "repeat", "tile", "unknown")


def _on_grid(dg: Any, group: Any, round_to: int) -> bool:
    """Whether every layer losing output channels in ``group`` keeps a multiple of ``round_to``.
    Torch-Pruning rounds the root's count only; a layer feeding part of a concatenation (DARTS'
    factorized reduce: two convs of C/2 concatenated) then gets half of a multiple."""
    if round_to <= 1:
        return True
    for dep, idxs in group:
        layer = dep.target.module
        if dg.is_out_channel_pruning_fn(dep.handler) and isinstance(layer, _known_types()) and idxs:
            n = dg.get_out_channels(layer)
            if n is not None and (n - len(idxs)) % round_to:
                return False
    return True


def _reorders_channels(group: Any) -> bool:
    import torch_pruning as tp

    for dep, _ in group:
        node = dep.target
        if isinstance(node.module, tp.ops._ElementWiseOp) and node.inputs:  # on the activation path
            op = str(node.module._grad_fn).lower()
            if any(k in op for k in _REORDERING_OPS):
                return True
    return False


def _forward_all(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The model output plus the output of every module holding parameters, so Torch-Pruning's
    trace also reaches layers whose result is computed but never used (dead cell inputs)."""
    import torch

    outs: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            outs.append(output)

    handles = [m.register_forward_hook(hook) for m in model.modules() if _owns_state(m)]
    try:
        y = model(x)
    finally:
        for h in handles:
            h.remove()
    return [y, *outs]


def _known_types() -> tuple[type, ...]:
    from torch import nn

    return (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm,
            nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.PReLU, nn.Embedding,
            nn.MultiheadAttention, nn.LSTM)


def _owns_state(m: torch.nn.Module) -> bool:
    return any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False))


def _frozen_layers(model: torch.nn.Module) -> list[str]:
    """Names of the leaf modules Torch-Pruning cannot prune: unknown types holding a per-channel
    (more than one element) parameter or buffer, and every instance of such a type (the opaque
    pruner is registered per type). Containers holding a parameter of their own (a ViT position
    embedding) are left to Torch-Pruning's unwrapped-parameter rule and the forward checks."""
    known = _known_types()
    types = {
        type(m)
        for n, m in model.named_modules()
        if n and not isinstance(m, known) and not any(True for _ in m.children())
        and any(t.numel() > 1 for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)))
    }
    return [n for n, m in model.named_modules() if n and type(m) in types]


def _frozen_pruners(model: torch.nn.Module) -> dict[type, Any]:
    """An opaque pruner for each frozen type. ``prune_in_channels = prune_out_channels`` makes
    Torch-Pruning treat every dependency on the layer as output pruning, so with the layer among
    the ignored ones any group touching it is dropped (its neighbours keep their widths too)."""
    from torch_pruning.pruner.function import BasePruningFunc

    class Frozen(BasePruningFunc):
        def prune_out_channels(self, layer: Any, idxs: Sequence[int]) -> Any:
            return layer

        prune_in_channels = prune_out_channels

        def get_out_channels(self, layer: Any) -> None:
            return None

        def get_in_channels(self, layer: Any) -> None:
            return None

    names = dict(model.named_modules())
    return {type(names[n]): Frozen() for n in _frozen_layers(model)}


def _classifiers(model: torch.nn.Module, x: torch.Tensor) -> list[str]:
    """Layers whose output is the model output (their out features are the classes): the leaf
    modules returning the output tensor itself, else the last conv/linear that ran."""
    import torch
    from torch import nn

    ran: list[tuple[str, Any]] = []
    handles = [
        m.register_forward_hook(lambda mod, i, o, n=n: ran.append((n, o)))
        for n, m in model.named_modules()
        if n and not any(True for _ in m.children())
    ]
    try:
        with torch.no_grad(), _eval_mode(model):
            y = model(x)
    finally:
        for h in handles:
            h.remove()
    outputs = [t for t in (y if isinstance(y, tuple | list) else [y]) if isinstance(t, torch.Tensor)]
    names = dict(model.named_modules())
    direct = [n for n, o in ran if any(o is t for t in outputs) and isinstance(names[n], nn.Linear | nn.modules.conv._ConvNd)]
    if direct:
        return sorted(set(direct))
    layers = [n for n, _ in ran if isinstance(names[n], nn.Linear | nn.modules.conv._ConvNd)]
    return layers[-1:]


def _taylor_gradients(model: torch.nn.Module, ctx: PassContext) -> None:
    """dL/dw of the run's loss (``ctx.task``: cross-entropy unless a user's model names another)
    on the calibration split, accumulated over batches (eval mode, so BN statistics are not
    touched); zeros for parameters the loss does not reach."""
    import torch
    import torch.nn.functional as F

    xs, ys = ctx.calibration()
    device = next(model.parameters()).device
    model.zero_grad(set_to_none=True)
    with _eval_mode(model):
        for i in range(0, len(ys), _TAYLOR_BATCH):
            xb = torch.as_tensor(xs[i:i + _TAYLOR_BATCH], dtype=torch.float32, device=device)
            out = model(xb)
            if ctx.task.outputs == "auto":  # a user's model: its outputs may be probabilities
                ctx.task, note = ctx.task.resolve(out.detach())
                if note and note not in ctx.notes:
                    ctx.notes.append(note)
            if ctx.task.name == "ce" and ctx.task.outputs == "logits":  # the sum it always was
                yb = torch.as_tensor(ys[i:i + _TAYLOR_BATCH], dtype=torch.long, device=device)
                loss = F.cross_entropy(out, yb, reduction="sum") / len(ys)
            else:  # the task's mean loss, weighted by the batch's share of the split
                yb = torch.as_tensor(ys[i:i + _TAYLOR_BATCH], device=device)
                loss = ctx.task.loss(out, yb) * (len(yb) / len(ys))
            loss.backward()
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)


# ---------------------------------------------------------------------------------------------
# records and checks


def _entry(channels: int, layer: str, is_out: bool, pruned: Sequence[int]) -> dict[str, Any]:
    """One step of Torch-Pruning's history, ``[root name, is_out, pruned indices]``, stored as
    the indices kept among the root's ``channels`` at that step."""
    channels = int(channels)
    gone = {int(i) for i in pruned}
    return {"layer": layer, "dim": "out" if is_out else "in", "channels": channels,
            "keep": [i for i in range(channels) if i not in gone]}


def _notes(ctx: PassContext, model: torch.nn.Module, s: Mapping[str, Any], history: list, off_grid: list[str]) -> None:
    """Honest remarks for the output when the settings pruned less than asked."""
    from torch import nn

    if not history:
        if s["importance"] == "bn_scale" and not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                                     for m in model.modules()):
            ctx.notes.append("structured: bn_scale importance needs BatchNorm layers; this model has none "
                             "(re-parameterised?), so nothing was pruned")
        else:
            ctx.notes.append("structured: no channel group could be pruned at these settings (all skipped, "
                             "too narrow for round_to, or tied importances under global pruning)")
    if off_grid:
        ctx.notes.append(f"structured: round_to={s['round_to']} left {len(off_grid)} group(s) unpruned whose "
                         f"layers could not all keep multiples of it (roots {', '.join(off_grid[:5])})")


def _record(shape: list[int], history: list[dict[str, Any]], layers: dict[str, list[int]],
            skipped: list[str], before: Any, after: Any, ratios: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "input_shape": shape,
        "history": history,
        "layers": layers,
        "layers_skipped": skipped,
        "ratios": ratios or {},
        "params": [before.params, after.params],
        "macs": [before.macs, after.macs],
    }


def _layer_ratios(original: torch.nn.Module, pruned: torch.nn.Module, ratio: float, per_layer: Mapping[str, float],
                  keep_out: Sequence[str]) -> dict[str, dict[str, Any]]:
    """{layer: {"asked", "actual", "channels": [before, after]}} for every conv/linear that was
    asked to lose channels: its ``per_layer`` ratio (the layer's, else its closest container's),
    else ``ratio`` (under global pruning, the overall target)."""
    from torch import nn

    now = dict(pruned.named_modules())
    out: dict[str, dict[str, Any]] = {}
    for name, m in original.named_modules():
        if not isinstance(m, nn.modules.conv._ConvNd | nn.Linear) or name in keep_out or name not in now:
            continue
        owners = [k for k in per_layer if name == k or name.startswith(k + ".")]
        asked = per_layer[max(owners, key=len)] if owners else ratio
        a, b = _width(m), _width(now[name])
        if asked > 0 or a != b:
            out[name] = {"asked": float(asked), "actual": round(1.0 - b / a, 6), "channels": [a, b]}
    return out


def _layer_widths(original: torch.nn.Module, pruned: torch.nn.Module) -> dict[str, list[int]]:
    """{name: [out channels before, after]} for every conv/linear whose width changed."""
    from torch import nn

    old = dict(original.named_modules())
    out: dict[str, list[int]] = {}
    for name, m in pruned.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd | nn.Linear):
            a, b = _width(old[name]), _width(m)
            if a != b:
                out[name] = [a, b]
    return out


def _width(m: Any) -> int:
    return int(m.out_channels if hasattr(m, "out_channels") else m.out_features)


def _verify(model: torch.nn.Module, x: torch.Tensor, expected: tuple[int, ...], what: str,
            history: list[dict[str, Any]]) -> None:
    """The pruned model must run and give the original output shape; no layer may be empty."""
    from torch import nn

    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd | nn.Linear) and _width(m) < 1:
            raise PolicyError(f"structured: pruning left layer {name!r} of {what} with no channels")
    got = _run(model, x)
    if got != expected:
        last = history[-1]["layer"] if history else "none"
        raise PolicyError(
            f"structured: the pruned {what} no longer runs a forward pass on a {tuple(x.shape)} input "
            f"(got {got}, expected output {expected}); last pruned layer {last!r}"
        )


def _run(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, ...] | str:
    """Output shape of an eval-mode forward pass, or the error message if it fails."""
    import torch

    try:
        with torch.no_grad(), _eval_mode(model):
            return tuple(model(x).shape)
    except Exception as exc:  # a broken model is reported, not raised, here
        return f"{type(exc).__name__}: {exc}"


def _output_shape(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    got = _run(model, x)
    if isinstance(got, str):
        raise PolicyError(f"structured: {type(model).__name__} does not run on a {tuple(x.shape)} input: {got}")
    return got


def _example(model: torch.nn.Module, shape: Sequence[int]) -> torch.Tensor:
    """A seeded random (1, *shape) input on the model's device (tracing needs only shapes)."""
    import torch

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    return torch.randn((1, *shape), generator=torch.Generator().manual_seed(0)).to(device)


def _check_ratio(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) < 1.0:
        raise PolicyError(f"structured: {key} is a fraction of channels in [0, 1), got {value!r}")


def _training_flags(model: torch.nn.Module) -> dict[str, bool]:
    return {n: m.training for n, m in model.named_modules()}


def _restore_flags(model: torch.nn.Module, flags: Mapping[str, bool]) -> None:
    """Torch-Pruning's trace switches the model to eval mode; put every module's flag back."""
    for n, m in model.named_modules():
        m.training = flags.get(n, m.training)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    flags = _training_flags(model)
    model.eval()
    try:
        yield
    finally:
        _restore_flags(model, flags)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # Torch-Pruning warns about every unwrapped parameter and unknown op it meets
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


STRUCTURED = register_pass(StructuredPruning(), "channel/filter pruning that shrinks layers (Torch-Pruning DepGraph)")
