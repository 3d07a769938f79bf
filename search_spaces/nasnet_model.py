"""The network a NASNet-cell genotype describes: stacked normal and reduction cells.

Layout (Zoph et al., 2018, Fig. 2, CIFAR form; DARTS's ``NetworkCIFAR`` is the same)::

    stem 3x3 conv (3 C channels) -> [N normal] -> reduce -> [N normal] -> ... -> [ReLU], avg pool, linear
                                                            `-> auxiliary head (optional, DARTS)

with C doubled at each reduction cell. Each cell reads the outputs of the two cells before it
(s0 = c_{k-2}, s1 = c_{k-1}), maps both to C channels (a 1x1 ReLU-conv-BN, or a factorized
reduce when s0 still has twice s1's resolution because the previous cell was a reduction), then
runs its blocks and concatenates all of them (DARTS) or its loose ends (NASNet); see
`search_spaces.nasnet_cell` for the genotype form and the two sets of rules.

With DARTS's CIFAR-10 setting (C=36, N=6, i.e. 20 cells, stem multiplier 3) DARTS-V2 has
3.35M parameters without the auxiliary head, DARTS's published 3.3M
(tests/test_darts_space.py checks this).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .nasnet_cell import STEMS, concat_nodes
from .nasnet_ops import OPS, FactorizedReduce, ReLUConvBN

__all__ = ["AuxiliaryHead", "NASNetCell", "NASNetNetwork", "drop_path"]

BlockSpec = tuple[int, str, int, str]  # (in1, op1, in2, op2), e.g. a `nasnet_cell.Block`
STEM_MULTIPLIER = 3  # the default: the stem has 3 C channels, as in DARTS' CIFAR network


def drop_path(x: torch.Tensor, prob: float) -> torch.Tensor:
    """Zero whole samples of one path with probability ``prob``, scale the kept ones by
    1 / (1 - prob) so the expectation is unchanged (NASNet's DropPath, per sample)."""
    keep = 1.0 - prob
    mask = torch.empty(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(keep)  # (N,1,1,1)
    return x * mask / keep


class NASNetCell(nn.Module):
    """One cell: (s0, s1) -> concat of its blocks, (N, len(concat) * C, H', W').

    ``reduction``: the ops on inputs 0 and 1 use stride 2, so H' = ceil(H / 2) of s1.
    ``reduction_prev``: s0 has twice s1's resolution and is reduced while preprocessed.
    ``concat``: ``"all"`` blocks (DARTS) or the ``"loose_ends"`` nothing consumes (NASNet).
    """

    def __init__(
        self,
        blocks: Sequence[BlockSpec],
        C_pp: int,
        C_p: int,
        C: int,
        reduction: bool,
        reduction_prev: bool,
        concat: str = "loose_ends",
    ):
        super().__init__()
        self.reduction = reduction
        self.blocks = tuple(tuple(block) for block in blocks)
        if not self.blocks:
            raise ValueError("a cell needs at least one block")
        for b, (in1, op1, in2, op2) in enumerate(self.blocks):
            for i in (in1, in2):
                if not 0 <= i < 2 + b:
                    raise ValueError(
                        f"block {b} input {i} must be in 0..{1 + b} (cell inputs or earlier blocks)"
                    )
            for op in (op1, op2):
                if op not in OPS:
                    raise ValueError(f"unknown op {op!r}; valid: {', '.join(sorted(OPS))}")
        # s0: (N, C_pp, 2H or H, ...) -> (N, C, H, W); s1: (N, C_p, H, W) -> (N, C, H, W)
        self.preprocess0 = FactorizedReduce(C_pp, C) if reduction_prev else ReLUConvBN(C_pp, C, 1, 1)
        self.preprocess1 = ReLUConvBN(C_p, C, 1, 1)
        # ops[2b], ops[2b + 1] are block b's op1, op2; only cell inputs get the reduction stride
        self.ops = nn.ModuleList(
            OPS[op](C, C, 2 if reduction and i < 2 else 1, True)
            for in1, op1, in2, op2 in self.blocks
            for i, op in ((in1, op1), (in2, op2))
        )
        self.concat = concat_nodes(self.blocks, concat)  # block indices j, as DARTS's concat - 2
        self.out_channels = len(self.concat) * C
        self.drop_prob = 0.0  # set by NASNetNetwork.set_drop_path_progress

    def _path(self, k: int, x: torch.Tensor) -> torch.Tensor:
        op = self.ops[k]
        h = op(x)
        # A pure identity is not dropped: DropPath regularises the ops with weights (as DARTS).
        if self.training and self.drop_prob > 0.0 and not isinstance(op, nn.Identity):
            h = drop_path(h, self.drop_prob)
        return h

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        states = [self.preprocess0(s0), self.preprocess1(s1)]  # each (N, C, H, W)
        for b, (in1, _, in2, _) in enumerate(self.blocks):
            states.append(self._path(2 * b, states[in1]) + self._path(2 * b + 1, states[in2]))
        return torch.cat([states[2 + j] for j in self.concat], dim=1)  # (N, len(concat) * C, H', W')


class AuxiliaryHead(nn.Module):
    """DARTS's ``AuxiliaryHeadCIFAR`` (after Szegedy et al.'s auxiliary towers): ReLU, 5x5 avg
    pool stride 3, 1x1 conv to 128, BN, ReLU, 2x2 conv to 768, BN, ReLU, linear.
    (N, C, H, W) -> (N, num_classes).

    DARTS assumes an 8x8 input (CIFAR after two reductions), pooled to 2x2; other sizes are
    average-pooled to 2x2 adaptively, so the head works at any resolution (no parameters change).
    """

    def __init__(self, C: int, num_classes: int):
        super().__init__()
        self.reduce = nn.Sequential(
            nn.Conv2d(C, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(inplace=False)
        )
        self.conv = nn.Sequential(
            nn.Conv2d(128, 768, 2, bias=False), nn.BatchNorm2d(768), nn.ReLU(inplace=False)
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        if tuple(x.shape[-2:]) == (8, 8):
            x = F.avg_pool2d(x, 5, stride=3, count_include_pad=False)  # (N, C, 2, 2), as DARTS
        else:
            x = F.adaptive_avg_pool2d(x, 2)  # (N, C, 2, 2)
        x = self.conv(self.reduce(x))  # (N, 768, 1, 1)
        return self.classifier(x.flatten(1))


class NASNetNetwork(nn.Module):
    """Stem, stages of ``cells_per_stage`` normal cells separated by ``reductions`` reduction
    cells, then [ReLU ->] global average pool -> linear. (N, in_channels, H, W) -> (N, num_classes).

    ``auxiliary``: DARTS's auxiliary head reads the output of the last reduction cell (cell
    2L/3 of L in DARTS); `forward_with_aux` returns its logits too (DARTS weighs their loss 0.4).
    Its parameters are named ``auxiliary_head.*``, so counts can leave them out as DARTS does.

    ScheduledDropPath (Zoph et al., 2018, Sec. 4): in training each op path is dropped with
    probability ``drop_path_prob * progress``; the trainer calls `set_drop_path_progress` with the
    fraction of training done (0 until it does, so a model that is never told drops nothing).
    """

    def __init__(
        self,
        normal: Sequence[BlockSpec],
        reduce: Sequence[BlockSpec],
        in_channels: int,
        num_classes: int,
        init_filters: int = 16,
        cells_per_stage: int = 2,
        reductions: int = 2,
        stem: str = "conv3x3",
        drop_path_prob: float = 0.0,
        concat: str = "loose_ends",
        head_relu: bool = True,
        stem_multiplier: int = STEM_MULTIPLIER,
        auxiliary: bool = False,
    ):
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; valid: {', '.join(STEMS)}")
        if not 0.0 <= drop_path_prob < 1.0:
            raise ValueError(f"drop_path_prob must be in [0, 1), got {drop_path_prob!r}")
        self.drop_path_prob = drop_path_prob
        self.drop_path_progress = 0.0
        C_stem = stem_multiplier * init_filters
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, C_stem, 3, STEMS[stem], 1, bias=False),  # (N, 3C, H/s, W/s)
            nn.BatchNorm2d(C_stem),
        )
        C_pp, C_p, C = C_stem, C_stem, init_filters
        cells: list[NASNetCell] = []
        for stage in range(reductions + 1):
            kinds = ([True] if stage > 0 else []) + [False] * cells_per_stage
            for reduction in kinds:
                C = 2 * C if reduction else C
                reduction_prev = bool(cells) and cells[-1].reduction
                cell = NASNetCell(
                    reduce if reduction else normal, C_pp, C_p, C, reduction, reduction_prev, concat
                )
                cells.append(cell)
                C_pp, C_p = C_p, cell.out_channels
        self.cells = nn.ModuleList(cells)
        # the auxiliary head reads the last reduction cell (DARTS: cell 2L/3, the same for 2 reductions)
        reduction_cells = [k for k, cell in enumerate(cells) if cell.reduction]
        self.aux_at = reduction_cells[-1] if reduction_cells else 2 * len(cells) // 3
        C_aux = cells[self.aux_at].out_channels
        self.auxiliary_head = AuxiliaryHead(C_aux, num_classes) if auxiliary else None
        # NASNet: ReLU first, since cells end in un-activated BN sums; DARTS pools them directly
        self.head = nn.Sequential(
            *([nn.ReLU(inplace=False)] if head_relu else []),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),  # (N, C_p)
            nn.Linear(C_p, num_classes),
        )

    def set_drop_path_progress(self, progress: float) -> None:
        """Set the fraction of training done, in [0, 1]; paths then drop with prob max * progress."""
        if not (isinstance(progress, (int, float)) and math.isfinite(progress) and 0.0 <= progress <= 1.0):
            raise ValueError(f"drop-path progress must be in [0, 1], got {progress!r}")
        self.drop_path_progress = float(progress)
        for cell in self.cells:
            cell.drop_prob = self.drop_path_prob * self.drop_path_progress

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_aux(x, with_aux=False)[0]

    def forward_with_aux(
        self, x: torch.Tensor, with_aux: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, auxiliary logits or None when the network has no auxiliary head)."""
        aux = None
        s0 = s1 = self.stem(x)
        for k, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1)
            if with_aux and k == self.aux_at and self.auxiliary_head is not None:
                aux = self.auxiliary_head(s1)
        return self.head(s1), aux
