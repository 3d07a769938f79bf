"""`inherit` for the large-kernel space (`unireplk`): every field of every stage.

Model layout (`lk_blocks.LargeKernelNet`): ``stem`` -> ``stages.{i}.0`` (a 3-tap ConvBN that
sets the stage's width) -> ``stages.{i}.{1..depth}`` (`LargeKernelBlock`: ``dw`` large kernel
+ branches, ``se``, ``expand``, ``project``; x + FFN(SE(DW(x)))) -> ``head`` (linear on the
pooled last stage). Per stage field:

- width: Net2Wider on the stage's residual stream: the transition conv's new filters (and BN
  parameters and statistics) replicate random old ones; every block maps its channels the same
  way; the consumers (SE ``down``, ``expand``, the next transition conv, the head) divide the
  weights they read from a replicated channel by its replica count. Narrower: first channels.
- depth: a new block's ``project.bn`` gets scale and shift 0, so the block adds 0 (the
  identity, Net2Deeper); removed blocks are lost (not preserving).
- kernel: the large kernel and each branch zero-padded (exact) or centre-cropped; a branch of
  the parent's `branch_plan` with no branch of the child's dilation is folded into the large
  kernel (exact: all of it is linear in eval mode) when it fits.
- rep: 0->1 new branches with their BN zeroed (add 0); 1->0 branches folded into the kernel.
- se: 0->1 the new SE's ``up`` is zeroed, so its gate is sigmoid(0) = 0.5 for every channel
  and ``expand``'s weights are doubled (both exact in floating point; unlike a gate pushed
  towards 1 by a large bias, sigmoid's gradient is 1/4 there, so the SE trains); 1->0 lost.
- ffn: new hidden units fresh with zero outgoing weights (``project`` columns); narrower keeps
  the hidden units with the largest outgoing L1 norm.
"""

from __future__ import annotations

import numpy as np
import torch

from .genotype import Genotype
from .large_kernel import LargeKernelSpace
from .lk_blocks import StageSpec, branch_plan, dilated_to_dense
from .morph_state import BN_STATS, StateWriter, UnitMap, take_units

__all__ = ["transfer_large_kernel"]

# The fold divides by the large kernel's BN scale (gamma / std); below this it would blow the
# kernel up, so the branch is dropped instead (not preserving).
_MIN_FOLD_SCALE = 1e-6


def transfer_large_kernel(
    space: LargeKernelSpace, parent: Genotype, child: Genotype, w: StateWriter, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    p_specs = [StageSpec(*s) for s in space.stage_specs(parent)]
    c_specs = [StageSpec(*s) for s in space.stage_specs(child)]
    with w.unit("stem"):
        w.copy_all("stem")
    prev = UnitMap.identity(int(space.options["stem_width"]))
    for i, (ps, cs) in enumerate(zip(p_specs, c_specs, strict=True)):
        width = UnitMap.net2wider(ps.width, cs.width, rng)
        if width.drops_units:
            w.not_preserving(f"stage {i}: width {ps.width}->{cs.width} drops channels")
        with w.unit(f"stage {i} transition"):
            w.write_mapped(f"stages.{i}.0.conv.weight", out=width, in_=prev)
            w.map_bn(f"stages.{i}.0.bn", width)
        for b in range(cs.depth):
            prefix = f"stages.{i}.{b + 1}"
            with w.unit(prefix):
                if b < ps.depth:
                    _block(w, prefix, ps, cs, width)
                else:
                    w.zero_bn(f"{prefix}.project.bn", "identity block (net2deeper): BN scale and shift 0")
                    w.fresh_is_harmless(prefix)
        if cs.depth < ps.depth:
            w.not_preserving(f"stage {i}: depth {ps.depth}->{cs.depth} removes blocks")
        prev = width
    with w.unit("head"):
        w.write_mapped("head.weight", in_=prev)
        w.copy("head.bias")


def _block(w: StateWriter, prefix: str, ps: StageSpec, cs: StageSpec, width: UnitMap) -> None:
    _depthwise(w, f"{prefix}.dw", ps, cs, width)
    se_gate = _squeeze_excite(w, f"{prefix}.se", ps, cs, width)
    # FFN hidden units: ranked by the L1 norm of what they write (project's columns)
    project = w.parent_tensor(f"{prefix}.project.conv.weight")
    n_child = w.child[f"{prefix}.expand.weight"].shape[0]
    hidden = UnitMap.extended(project.shape[1], n_child, project.abs().sum(dim=[0, *range(2, project.dim())]))
    if hidden.drops_units:
        w.not_preserving(f"{prefix}: FFN hidden units {project.shape[1]}->{n_child} dropped")
    expand, how = w.mapped(f"{prefix}.expand.weight", out=hidden, in_=width)
    if se_gate != 1.0:  # the new SE halves its input: double what reads it (exact: a power of 2)
        kept = [j for j, s in enumerate(hidden.source) if s >= 0]
        expand[kept] /= se_gate
        how = ", ".join(h for h in (how, "doubled for the new SE's gate 0.5") if h)
    w.write(f"{prefix}.expand.weight", expand, how)
    w.write_mapped(f"{prefix}.expand.bias", out=hidden)
    w.write_mapped(f"{prefix}.project.conv.weight", out=width, in_=hidden)
    w.map_bn(f"{prefix}.project.bn", width)


def _squeeze_excite(w: StateWriter, prefix: str, ps: StageSpec, cs: StageSpec, width: UnitMap) -> float:
    """Transfer the SE; returns the gate a new SE starts at (1.0: none added)."""
    if not cs.se:
        if ps.se:
            w.not_preserving(f"{prefix}: SE removed")
        return 1.0
    if not ps.se:
        for name in ("up.weight", "up.bias"):
            key = f"{prefix}.{name}"
            w.write(key, torch.zeros_like(w.fresh(key)), "zero-init new SE: gate sigmoid(0) = 0.5")
        w.fresh_is_harmless(prefix)  # `down` cannot matter while `up` is 0
        return 0.5
    up = w.parent_tensor(f"{prefix}.up.weight")  # (C, hidden, 1, ..)
    n_child = w.child[f"{prefix}.down.weight"].shape[0]
    hidden = UnitMap.extended(up.shape[1], n_child, up.abs().sum(dim=[0, *range(2, up.dim())]))
    if hidden.drops_units:
        w.not_preserving(f"{prefix}: SE hidden units {up.shape[1]}->{n_child} dropped")
    w.write_mapped(f"{prefix}.down.weight", out=hidden, in_=width)
    w.write_mapped(f"{prefix}.down.bias", out=hidden)
    w.write_mapped(f"{prefix}.up.weight", out=width, in_=hidden)
    w.write_mapped(f"{prefix}.up.bias", out=width)
    return 1.0


def _depthwise(w: StateWriter, prefix: str, ps: StageSpec, cs: StageSpec, width: UnitMap) -> None:
    """`DilatedReparamBlock`: large kernel + BN and the branches of ``branch_plan``, matched by
    dilation (one branch per dilation in every plan)."""
    lk, lk_how = w.mapped(f"{prefix}.lk.weight", out=width, kernel=True)
    lk_bn = {name: list(pair) for name, pair in w.bn_params(f"{prefix}.lk_bn", width).items()}
    parent_plan = branch_plan(ps.kernel) if ps.rep else ()
    child_plan = branch_plan(cs.kernel) if cs.rep else ()
    parent_by_dilation = {d: p for p, (_, d) in enumerate(parent_plan)}
    matched: set[int] = set()
    for c, (_, d) in enumerate(child_plan):
        key = f"{prefix}.branches.{c}"
        if d not in parent_by_dilation:
            w.zero_bn(f"{key}.1", "zero-init new branch: BN scale and shift 0")
            w.fresh_is_harmless(key)
            continue
        p = parent_by_dilation[d]
        matched.add(p)
        w.write_mapped(f"{key}.0.weight", out=width, source=f"{prefix}.branches.{p}.0.weight", kernel=True)
        w.map_bn(f"{key}.1", width, source=f"{prefix}.branches.{p}.1")
    eps = float(w.module(f"{prefix}.lk_bn").eps)
    lk_scale = lk_bn["weight"][0] / (lk_bn["running_var"][0] + eps).sqrt()  # folding leaves it as is
    folded = []
    for p, (k, d) in enumerate(parent_plan):
        if p in matched:
            continue
        if (k - 1) * d + 1 > cs.kernel:
            w.not_preserving(f"{prefix}: branch ({k}, dilation {d}) wider than kernel {cs.kernel} lost")
            continue
        if lk_scale.abs().min() < _MIN_FOLD_SCALE:
            w.not_preserving(
                f"{prefix}: branch ({k}, dilation {d}) not folded: a large-kernel BN scale is ~0"
            )
            continue
        lk = _fold_branch(w, f"{prefix}.branches.{p}", d, width, lk, lk_scale, lk_bn, eps)
        folded.append(f"({k}, dilation {d})")
    if folded:
        lk_how = ", ".join(h for h in (lk_how, f"parent branches {' '.join(folded)} folded in") if h)
        lk_bn["bias"][1] = ", ".join(h for h in (lk_bn["bias"][1], "folded branches' shifts added") if h)
    w.write(f"{prefix}.lk.weight", lk, lk_how)
    w.write_bn(f"{prefix}.lk_bn", {name: (t, how) for name, (t, how) in lk_bn.items()})


def _fold_branch(
    w: StateWriter,
    branch: str,
    dilation: int,
    width: UnitMap,
    lk: torch.Tensor,
    lk_scale: torch.Tensor,
    lk_bn: dict[str, list],
    eps: float,
) -> torch.Tensor:
    """``lk`` plus a parent branch, through the large kernel's BN (which the sum then passes):
    lk_bn(y) + bn_b(conv_b(x)) = lk_bn(y + conv(F / lk_scale, x)) with F the branch's BN-fused
    dense kernel and lk_scale = gamma / std of lk_bn, once lk_bn's shift also takes the
    branch's fused shift. Adds that shift to ``lk_bn`` in place; returns the new kernel."""
    conv = take_units(w.parent_tensor(f"{branch}.0.weight"), out=width)  # (C, 1, k, ..)
    gamma, beta, mean, var = (take_units(w.parent_tensor(f"{branch}.1.{n}"), out=width) for n in BN_STATS)
    scale = gamma / (var + eps).sqrt()
    spatial = conv.dim() - 2
    dense = dilated_to_dense(conv * scale.reshape(-1, *([1] * (conv.dim() - 1))), dilation, spatial)
    pad = (lk.shape[-1] - dense.shape[-1]) // 2  # both odd: centred
    dense = torch.nn.functional.pad(dense, [pad] * (2 * spatial))
    lk_bn["bias"][0] = lk_bn["bias"][0] + beta - mean * scale
    return lk + dense / lk_scale.reshape(-1, *([1] * (lk.dim() - 1)))
