"""`remove_blocks`: drop whole residual blocks / cells, the depth half of compression.

N2N learning (Ashok et al., "N2N Learning: Network to Network Compression via Policy Gradient
Reinforcement Learning", ICLR 2018) compresses in two stages: first aggressively remove layers,
then shrink the layers that are left. This pass is the first stage; ``structured`` is the second,
and ``finetune`` (KD from the uncompressed model) recovers accuracy after both, e.g.
``remove_blocks(count=2) -> structured(ratio=0.5) -> finetune``. Where N2N learns which layers to
drop with a policy-gradient controller, here the `depth+prune` policy space
(`compress.policy_space`) searches the keep/drop decisions with the existing strategies.

Which blocks can go is `compress.blocks`: residual blocks (replaced by the identity or their
shortcut) and same-shape cells in a stack (replaced by the input they would have refined); every
shape stays as it was, so nothing else in the network changes. A model without one is a
`PolicyError` saying so.

Settings -- exactly one of ``blocks``, ``count``, ``ratio``:

- ``blocks``: module names, removed as named (any removable block, ``keep_per_stage`` aside);
- ``count``: how many blocks to remove, the least important first;
- ``ratio``: that fraction of the removable blocks (rounded), the least important first;
- ``keep_per_stage`` (default 1): with ``count``/``ratio``, blocks kept in every stage (blocks of
  one container with one output shape). A stage that loses all its blocks computes nothing at its
  resolution but the transition into it; one block is where accuracy falls off a cliff, so the
  default keeps it. 0 lets the pass empty stages.

Importance (with ``count``/``ratio``): each block is removed alone and the calibration rows
(``ctx.calibration()``, held out of the fine-tuning data) are scored with the run's metric
(``ctx.task``): ``drop`` is the metric lost, in points, ties broken by ``change``, the relative
L2 change of the outputs (so on an untrained model, or when several blocks cost nothing, the one
that changes the function least goes first). BatchNorm statistics are not re-estimated for the
probe; the policy's ``bn_recalib`` does that after the removal (`compress.evaluate.RECALIBRATE_AFTER`).

Record (plain JSON; `replay` needs only ``input_shape`` and ``removed``)::

    {"input_shape": [1, 8, 8],
     "removed": ["stages.0.2", ...],                  # in forward order
     "kinds": {"stages.0.2": "identity", ...},         # identity / projection / cell
     "candidates": ["stages.0.1", "stages.0.2", ...],  # every removable block
     "stages": {"stages.0.1": "stages.0@16x8x8", ...},
     "scores": {"stages.0.1": {"drop": 1.2, "change": 0.31}, ...},  # empty with ``blocks``
     "params": [before, after], "macs": [before, after]}
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import PolicyError
from .base import PassContext, check_settings, register_pass, resolve_layers

if TYPE_CHECKING:
    import torch

    from ..blocks import Block, BlockSearch

__all__ = ["REMOVE_BLOCKS", "RemoveBlocks", "block_scores", "choose_blocks", "refusal"]

_BATCH = 256
_HOW_MANY = ("blocks", "count", "ratio")


class RemoveBlocks:
    """Remove residual blocks and cells; see the module docstring."""

    name = "remove_blocks"
    terminal = False
    defaults: Mapping[str, Any] = {"blocks": None, "count": None, "ratio": None, "keep_per_stage": 1}

    # -- settings -----------------------------------------------------------------------------------
    def validate(self, settings: Mapping[str, Any]) -> None:
        s = check_settings(self.name, settings, self.defaults)
        given = [k for k in _HOW_MANY if s[k] is not None]
        if len(given) != 1:
            got = f"got {' and '.join(given)}" if given else "got none"
            raise PolicyError(f"remove_blocks: give exactly one of 'blocks' (names), 'count' or 'ratio'; {got}")
        blocks, count, ratio, keep = s["blocks"], s["count"], s["ratio"], s["keep_per_stage"]
        if blocks is not None:
            if isinstance(blocks, str) or not isinstance(blocks, Sequence) or not all(isinstance(b, str) for b in blocks):
                raise PolicyError(f"remove_blocks: 'blocks' is a list of module names, got {blocks!r}")
            twice = sorted({b for b in blocks if list(blocks).count(b) > 1})
            if twice:
                raise PolicyError(f"remove_blocks: 'blocks' names {twice[0]!r} more than once")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
            raise PolicyError(f"remove_blocks: 'count' is a number of blocks, an integer >= 0; got {count!r}")
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, int | float)
                                  or not 0.0 <= float(ratio) <= 1.0):
            raise PolicyError(f"remove_blocks: 'ratio' is a fraction of the removable blocks in [0, 1]; got {ratio!r}")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise PolicyError(f"remove_blocks: 'keep_per_stage' is an integer >= 0; got {keep!r}")

    # -- apply --------------------------------------------------------------------------------------
    def apply(self, model: torch.nn.Module, settings: Mapping[str, Any], ctx: PassContext) -> tuple[Any, dict]:
        import torch

        from nas.cost import profile

        from ..blocks import find_blocks, remove_blocks

        s = check_settings(self.name, settings, self.defaults)
        self.validate(s)
        if not isinstance(model, torch.nn.Module) or isinstance(model, torch.jit.ScriptModule):
            raise PolicyError(f"remove_blocks: needs an eager torch model, got {type(model).__name__}")
        shape = list(ctx.input_shape)
        before = profile(model, shape)
        if s["count"] == 0 or s["ratio"] == 0 or s["blocks"] == []:  # nothing asked: the identity
            return model, _record(shape, [], None, {}, before, before)
        search = find_blocks(model, shape)
        if not search.blocks:
            raise PolicyError(refusal(model, search))
        scores: dict[str, dict[str, float]] = {}
        if s["blocks"] is not None:
            chosen = _named(model, search, list(s["blocks"]))
        else:
            scores = block_scores(model, search, ctx)
            chosen = choose_blocks(search.blocks, scores, s, ctx)
        expected = _output_shape(model, shape)
        removed = remove_blocks(model, [b.name for b in chosen], shape)
        got = _output_shape(model, shape)
        if got != expected:  # pragma: no cover - every replacement was checked on its own input
            raise PolicyError(f"remove_blocks: removing {[b.name for b in removed]} changed the output "
                              f"shape from {expected} to {got}")
        return model, _record(shape, removed, search, scores, before, profile(model, shape))

    # -- replay -------------------------------------------------------------------------------------
    def replay(self, model: torch.nn.Module, record: Mapping[str, Any], ctx: PassContext) -> Any:
        from ..blocks import find_blocks, remove_blocks

        removed = list(record.get("removed", []))
        if not removed:
            return model
        shape = list(record["input_shape"])
        search = find_blocks(model, shape)
        known = search.by_name()
        for name in removed:
            kind = record.get("kinds", {}).get(name)
            if name not in known or (kind is not None and known[name].kind != kind):
                raise PolicyError(f"remove_blocks: the record removes block {name!r} ({kind}), which this model "
                                  "does not have as a removable block; replay needs a fresh copy of the model "
                                  "the record was made on")
        remove_blocks(model, removed, shape)
        return model


def refusal(model: Any, search: BlockSearch) -> str:
    """The one line a model without removable blocks gets, saying what was looked for."""
    why = (f"; torch.fx could not trace {', '.join(search.untraceable[:4])}"
           + (f" and {len(search.untraceable) - 4} more" if len(search.untraceable) > 4 else "")
           if search.untraceable else "")
    return (f"remove_blocks: {type(model).__name__} has no residual block whose input and output shapes match "
            f"(x + f(x), or a shortcut module beside f) and no same-shape cell in a stack of cells, so no block "
            f"can go without breaking a shape ({search.modules} modules looked at{why})")


def _named(model: Any, search: BlockSearch, names: list[str]) -> list[Block]:
    resolve_layers(model, names, "remove_blocks: blocks")  # a typo gets its closest real layer
    known = search.by_name()
    for name in names:
        if name not in known:
            raise PolicyError(f"remove_blocks: {name!r} is not a removable block; removable: "
                              f"{', '.join(b.name for b in search.blocks)}")
    return [known[n] for n in names]


def block_scores(model: torch.nn.Module, search: BlockSearch, ctx: PassContext) -> dict[str, dict[str, float]]:
    """Per block: metric points lost on the calibration rows when it alone is removed (``drop``)
    and the relative L2 change of the outputs (``change``)."""
    import numpy as np

    from ..blocks import swapped

    x, y = ctx.calibration()
    base = _outputs(model, x)
    metric = ctx.task.metric
    base_score = metric.signed(metric(base, y))
    scores: dict[str, dict[str, float]] = {}
    norm = float(np.linalg.norm(base)) or 1.0
    for block in search.blocks:
        with swapped(model, search, block.name):
            out = _outputs(model, x)
        drop = 100.0 * (base_score - metric.signed(metric(out, y)))
        scores[block.name] = {"drop": round(float(drop), 6), "change": round(float(np.linalg.norm(out - base)) / norm, 6)}
    return scores


def choose_blocks(blocks: Sequence[Block], scores: Mapping[str, Mapping[str, float]], s: Mapping[str, Any],
                  ctx: PassContext) -> list[Block]:
    """The least important blocks, as many as ``count`` / ``ratio`` ask, keeping
    ``keep_per_stage`` blocks in every stage."""
    keep = int(s["keep_per_stage"])
    left = Counter(b.stage for b in blocks)
    allowed = sum(max(0, n - keep) for n in left.values())
    if s["count"] is not None:
        wanted = int(s["count"])
        if wanted > allowed:
            stages = ", ".join(f"{st}: {n}" for st, n in left.items())
            raise PolicyError(f"remove_blocks: count={wanted} but only {allowed} of the {len(blocks)} removable blocks "
                              f"may go with keep_per_stage={keep} (blocks per stage: {stages}); lower count or "
                              "keep_per_stage, or name the blocks")
    else:
        wanted = round(float(s["ratio"]) * len(blocks))
        if wanted > allowed:
            ctx.notes.append(f"remove_blocks: ratio={s['ratio']:g} asks for {wanted} of {len(blocks)} blocks; "
                             f"keep_per_stage={keep} lets {allowed} go")
            wanted = allowed
        if wanted == 0:
            ctx.notes.append(f"remove_blocks: ratio={s['ratio']:g} of {len(blocks)} blocks rounds to none removed")
    order = sorted(range(len(blocks)), key=lambda i: (scores[blocks[i].name]["drop"],
                                                     scores[blocks[i].name]["change"], i))
    chosen: list[Block] = []
    for i in order:
        if len(chosen) == wanted:
            break
        if left[blocks[i].stage] > keep:
            chosen.append(blocks[i])
            left[blocks[i].stage] -= 1
    return sorted(chosen, key=blocks.index)


def _outputs(model: torch.nn.Module, x: Any) -> Any:
    import torch

    from .structured import _eval_mode

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    xt = torch.as_tensor(x)
    with torch.no_grad(), _eval_mode(model):
        out = torch.cat([model(xt[i:i + _BATCH].to(device)) for i in range(0, len(xt), _BATCH)])
    return out.float().cpu().numpy()


def _output_shape(model: torch.nn.Module, shape: Sequence[int]) -> tuple[int, ...]:
    from .structured import _example, _run

    got = _run(model, _example(model, shape))
    if isinstance(got, str):
        raise PolicyError(f"remove_blocks: {type(model).__name__} does not run on a {(1, *shape)} input: {got}")
    return got


def _record(shape: list[int], removed: Sequence[Block], search: BlockSearch | None,
            scores: Mapping[str, Any], before: Any, after: Any) -> dict[str, Any]:
    blocks = search.blocks if search is not None else []
    return {
        "input_shape": shape,
        "removed": [b.name for b in removed],
        "kinds": {b.name: b.kind for b in removed},
        "candidates": [b.name for b in blocks],
        "stages": {b.name: b.stage for b in blocks},
        "scores": copy.deepcopy(dict(scores)),
        "params": [before.params, after.params],
        "macs": [before.macs, after.macs],
    }


REMOVE_BLOCKS = register_pass(RemoveBlocks(), "remove whole residual blocks / same-shape cells (depth pruning)")
