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
- ``count``: how many blocks to remove, the first by ``rank`` first;
- ``ratio``: that fraction of the removable blocks (rounded), the first by ``rank`` first;
- ``keep_per_stage`` (default 1): with ``count``/``ratio``, blocks kept in every stage (blocks of
  one container with one output shape). A stage that loses all its blocks computes nothing at its
  resolution but the transition into it; one block is where accuracy falls off a cliff, so the
  default keeps it. 0 lets the pass empty stages.
- ``rank`` (``drop_per_cost``, default, or ``drop``) and ``cost`` (``macs_beyond_params``,
  default, ``macs``, ``latency_beyond_params``, ``latency``): with ``count``/``ratio``, which
  blocks go first (below).

Which go first (with ``count``/``ratio``): each block is removed alone and the calibration rows
(``ctx.calibration()``, held out of the fine-tuning data) are scored with the run's metric
(``ctx.task``): ``drop`` is the metric lost, in points; ``change`` is the relative L2 change of
the outputs; ``macs`` and ``params`` are the shares of the model's MACs and parameters
(`nas.cost.profile`, batch 1) the removal saves, and with a ``latency`` cost ``latency`` the
share of measured time. BatchNorm statistics are not re-estimated for
the probe; the policy's ``bn_recalib`` does that after the removal
(`compress.evaluate.RECALIBRATE_AFTER`). ``rank`` orders the blocks from these:

- ``drop_per_cost`` (default): points lost per share of compute saved, ``max(drop, floor) /
  saved``, smallest first. Removing blocks is a knapsack -- the most compute off for the fewest
  points -- and the greedy for it orders items by cost over value; accuracy alone (``drop``)
  spends the removal on whichever block the net misses least, however little work it does.
  ``floor`` is one calibration row's worth (100 / rows points): a smaller drop is no evidence,
  so blocks that cost nothing measurable go in order of what they save, not all tied at zero.
  ``cost`` says what "saved" is:

  - ``macs_beyond_params`` (default): the MACs share minus the parameter share -- the compute
    the removal saves beyond what channel pruning would save taking the same parameters
    (``structured`` takes a layer's MACs and parameters in about equal proportion). This pass
    is the first of N2N's two stages and ``structured`` the second: what the removal adds over
    width alone is compute that width pruning could not take as cheaply, while the parameters
    are capacity the rest of the net could have kept. The ResNet CNN of results/depth.md shows
    why: its 4x4 block saves 35% of the MACs and 72% of the parameters, its 14x14 block 36% and
    6%; ``macs`` (and ``drop``) pick the 4x4 block, after which matching width-only's parameter
    count barely prunes the expensive 14x14 layers: 2.4-2.6x the MACs of width-only at 4-16x fewer
    parameters; this picks the 14x14 block: 0.65x.
  - ``macs``: the MACs share alone -- when nothing follows to a parameter budget
    (``remove_blocks`` then ``finetune``, or ``structured`` at a fixed ratio, which scales
    whatever is left), the MACs a removal saves are simply what it saves.
  - ``latency_beyond_params`` / ``latency``: the same with the share of measured ONNX Runtime
    latency (CPU, 1 thread, batch 1) in place of MACs. MACs are not batch-1 latency where a
    block's work is many small ops: on the large-kernel model of results/depth.md a block of
    its stage 1 (kernel 5 on 10 positions) holds 21% of the MACs and one of stage 2 (kernel 17
    on 5 positions, squeeze-excite) 6%, yet removing either saves 9-13% of the time; by MACs
    the depth rows remove the stage-1 blocks and lose to the stage-2 choice (1.1x against
    1.2-1.4x faster than width alone at equal parameters). The model is
    timed as it ships (large-kernel branches merged: `search_spaces.large_kernel.reparameterize`,
    a no-op elsewhere) without and with each block, runs interleaved one for one so load hits
    both alike (`compress.latency_reference.paired_latency_ms`; on a shared 2-core VM a
    block's share repeated within 1-2 points at a load average of 4, within about 4 at 7, where
    one-off medians moved 2x). Costs one ONNX export and a few hundred runs per block, and the
    choice changes between runs when blocks' shares are within that noise (results/depth.md:
    one of three large-kernel trials took another pair than its own bisection had) -- not the
    default for that reason; replay is exact either way.

  A block that saves nothing by the ``cost`` measure goes after every one that does, by
  ``drop``.
- ``drop``: points lost alone, ties broken by ``change`` (so on an untrained model, or when
  several blocks cost nothing, the one that changes the function least goes first); ``cost``
  is not used. What the pass did before ``rank`` existed.

Replay never re-ranks: the record names the removed blocks, so it rebuilds the same model
whatever ``rank`` says now, and a record made before ``rank`` existed (no ``rank`` / ``cost``,
scores without ``macs`` / ``params``: it was ranked by ``drop``) replays as it was made. A
policy *text* from then parses with the new defaults, so its canonical form and id change
(``"cost":"macs_beyond_params","rank":"drop_per_cost"`` added), as for any pass that gains a
setting.

Record (plain JSON; `replay` needs only ``input_shape`` and ``removed``)::

    {"input_shape": [1, 8, 8],
     "removed": ["stages.0.2", ...],                  # in forward order
     "kinds": {"stages.0.2": "identity", ...},         # identity / projection / cell
     "candidates": ["stages.0.1", "stages.0.2", ...],  # every removable block
     "stages": {"stages.0.1": "stages.0@16x8x8", ...},
     "scores": {"stages.0.1": {"drop": 1.2, "change": 0.31, "macs": 0.08, "params": 0.02}, ...},
     "rank": "drop_per_cost", "cost": "macs_beyond_params",  # how they were chosen
     "params": [before, after], "macs": [before, after]}

``scores`` is empty and ``rank`` / ``cost`` are null with ``blocks`` (named, not ranked);
``cost`` is null with ``rank = "drop"``.
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

__all__ = ["COSTS", "RANKS", "REMOVE_BLOCKS", "RemoveBlocks", "block_order", "block_scores",
           "choose_blocks", "drop_floor", "refusal"]

_BATCH = 256
_HOW_MANY = ("blocks", "count", "ratio")
RANKS = ("drop_per_cost", "drop")
COSTS = ("macs_beyond_params", "macs", "latency_beyond_params", "latency")
_TIMED_RUNS = 200  # per block and for the base beside it (see the module docstring for the noise)


class RemoveBlocks:
    """Remove residual blocks and cells; see the module docstring."""

    name = "remove_blocks"
    terminal = False
    defaults: Mapping[str, Any] = {"blocks": None, "count": None, "ratio": None, "keep_per_stage": 1,
                                   "rank": "drop_per_cost", "cost": "macs_beyond_params"}

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
        if s["rank"] not in RANKS:
            raise PolicyError(f"remove_blocks: 'rank' is one of {', '.join(RANKS)}; got {s['rank']!r}")
        if s["cost"] not in COSTS:
            raise PolicyError(f"remove_blocks: 'cost' is one of {', '.join(COSTS)}; got {s['cost']!r}")

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
            return model, _record(shape, [], None, {}, None, before, before)
        search = find_blocks(model, shape)
        if not search.blocks:
            raise PolicyError(refusal(model, search))
        scores: dict[str, dict[str, float]] = {}
        ranked = None
        if s["blocks"] is not None:
            chosen = _named(model, search, list(s["blocks"]))
        else:
            timed = s["rank"] == "drop_per_cost" and str(s["cost"]).startswith("latency")
            scores = block_scores(model, search, ctx, latency=timed)
            chosen = choose_blocks(search.blocks, scores, s, ctx)
            ranked = s
        expected = _output_shape(model, shape)
        removed = remove_blocks(model, [b.name for b in chosen], shape)
        got = _output_shape(model, shape)
        if got != expected:  # pragma: no cover - every replacement was checked on its own input
            raise PolicyError(f"remove_blocks: removing {[b.name for b in removed]} changed the output "
                              f"shape from {expected} to {got}")
        return model, _record(shape, removed, search, scores, ranked, before, profile(model, shape))

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


def block_scores(model: torch.nn.Module, search: BlockSearch, ctx: PassContext,
                 latency: bool = False) -> dict[str, dict[str, float]]:
    """Per block, removed alone: metric points lost on the calibration rows (``drop``), the
    relative L2 change of the outputs (``change``), the shares of the model's MACs and
    parameters saved (``macs``, ``params``; `nas.cost.profile` at batch 1) and, with
    ``latency``, of its measured ORT latency (``latency``, see the module docstring)."""
    import numpy as np

    from nas.cost import profile

    from ..blocks import swapped

    x, y = ctx.calibration()
    base = _outputs(model, x)
    metric = ctx.task.metric
    base_score = metric.signed(metric(base, y))
    shape = list(ctx.input_shape)
    whole = profile(model, shape)
    scores: dict[str, dict[str, float]] = {}
    norm = float(np.linalg.norm(base)) or 1.0
    for block in search.blocks:
        with swapped(model, search, block.name):
            out = _outputs(model, x)
            left = profile(model, shape)
        drop = 100.0 * (base_score - metric.signed(metric(out, y)))
        scores[block.name] = {
            "drop": round(float(drop), 6),
            "change": round(float(np.linalg.norm(out - base)) / norm, 6),
            "macs": round((whole.macs - left.macs) / max(1, whole.macs), 6),
            "params": round((whole.params - left.params) / max(1, whole.params), 6),
        }
    if latency:
        for name, share in _latency_shares(model, search, shape).items():
            scores[name]["latency"] = share
    return scores


def _latency_shares(model: torch.nn.Module, search: BlockSearch, shape: list[int]) -> dict[str, float]:
    """Per block: the share of the shipped model's ORT latency (1 thread, batch 1) its removal
    saves, each candidate timed interleaved with the whole model (see the module docstring)."""
    from search_spaces.large_kernel import reparameterize

    from ..blocks import swapped
    from ..latency_reference import paired_latency_ms
    from .int8 import export_float_onnx

    def shipped() -> bytes:  # a merged copy: the model itself stays in its training form
        return export_float_onnx(reparameterize(copy.deepcopy(model).eval()), shape)

    whole = shipped()
    shares = {}
    for block in search.blocks:
        with swapped(model, search, block.name):
            without = shipped()
        ms, base_ms = paired_latency_ms(without, whole, shape, warmup=20, repeats=_TIMED_RUNS)
        shares[block.name] = round(1.0 - ms / base_ms, 4)
    return shares


def drop_floor(ctx: PassContext) -> float:
    """One calibration row's worth of points: a smaller drop is no evidence of a cost."""
    return 100.0 / max(1, len(ctx.calibration()[1]))


def block_order(names: Sequence[str], scores: Mapping[str, Mapping[str, float]], rank: str, cost: str | None,
                floor: float) -> list[int]:
    """Indices into ``names``, the block to remove first first, by ``rank`` / ``cost`` (see the
    module docstring); ties go to the earlier block."""
    if rank not in RANKS:
        raise PolicyError(f"remove_blocks: 'rank' is one of {', '.join(RANKS)}; got {rank!r}")
    if rank == "drop_per_cost" and cost not in COSTS:
        raise PolicyError(f"remove_blocks: 'cost' is one of {', '.join(COSTS)}; got {cost!r}")

    def key(i: int) -> tuple[float, ...]:
        sc = scores[names[i]]
        if rank == "drop":
            return (0.0, sc["drop"], sc["change"], i)
        measure = "latency" if str(cost).startswith("latency") else "macs"
        if measure not in sc:
            raise PolicyError(f"remove_blocks: cost={cost!r} needs the blocks' measured latency; the scores lack it")
        saved = sc[measure] - (sc["params"] if str(cost).endswith("_beyond_params") else 0.0)
        if saved <= 0:  # saves nothing by this measure: after every block that does, by drop
            return (1.0, sc["drop"], sc["change"], i)
        return (0.0, max(sc["drop"], floor) / saved, sc["change"], i)

    return sorted(range(len(names)), key=key)


def choose_blocks(blocks: Sequence[Block], scores: Mapping[str, Mapping[str, float]], s: Mapping[str, Any],
                  ctx: PassContext) -> list[Block]:
    """The first blocks by ``rank`` (`block_order`), as many as ``count`` / ``ratio`` ask,
    keeping ``keep_per_stage`` blocks in every stage."""
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
    order = block_order([b.name for b in blocks], scores, str(s["rank"]), s["cost"], drop_floor(ctx))
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


def _record(shape: list[int], removed: Sequence[Block], search: BlockSearch | None, scores: Mapping[str, Any],
            ranked: Mapping[str, Any] | None, before: Any, after: Any) -> dict[str, Any]:
    blocks = search.blocks if search is not None else []
    return {
        "input_shape": shape,
        "removed": [b.name for b in removed],
        "kinds": {b.name: b.kind for b in removed},
        "candidates": [b.name for b in blocks],
        "stages": {b.name: b.stage for b in blocks},
        "scores": copy.deepcopy(dict(scores)),
        "rank": ranked["rank"] if ranked is not None else None,
        "cost": ranked["cost"] if ranked is not None and ranked["rank"] != "drop" else None,
        "params": [before.params, after.params],
        "macs": [before.macs, after.macs],
    }


REMOVE_BLOCKS = register_pass(RemoveBlocks(), "remove whole residual blocks / same-shape cells (depth pruning)")
