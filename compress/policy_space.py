"""`PolicySpace`: the compression choices of one model as a search space of declarative
`Dimension`s, so every strategy of the architecture search (random, evolution, TPE, NSGA-II,
the XGBoost surrogate, and grid as the exhaustive product) searches policies unchanged.

A point of the space is a policy *genotype* (``policy@1|int8_calibration=entropy|...``);
`PolicySpace.policy` turns it into the `Policy` a trial applies. Decisions:

* per layer group (see `group_layers`), where they matter: a structured-pruning ratio
  (``prune_g<i>``) and a kept-rank fraction for low-rank decomposition (``rank_g<i>``);
* per removable block (``depth`` kinds, up to `MAX_BLOCKS` of them, the first that
  `remove_blocks` would remove by its default ranking): keep or drop it (``drop_b<i>``), the first stage of N2N learning
  (Ashok et al., ICLR 2018: remove layers, then shrink the rest) with the search strategy in
  place of its policy-gradient controller; the width ratios then apply to what is left;
* global, where they do not: Quantune's five int8 dimensions — calibration (with the
  percentile folded into its value), scheme (activation/weight types and symmetry), format,
  granularity, and mixed precision as which model ends stay in float (the first layer, the last,
  both: the layers that int8 hurts most in practice).

Which families are searched is the space's ``kind``: ``int8``, ``prune``, ``lowrank``,
``prune+int8``, ``lowrank+int8``, ``depth+prune`` or ``depth+prune+int8``. Block removal comes
first, then pruning / low-rank, then a fine-tuning pass (settings fixed by the space, KD by
default); int8 comes last.

The space is plain data: its options hold the layer table (type, channels, kernel, MACs, weight
statistics) and the cheap sensitivity probes measured on the trained model (`describe_model`),
so it is saved next to a run as JSON and rebuilt without the model (a benchmark replays a
stored grid with it). `encode` appends model-aware features to the one-hot decisions (the share
of MACs and parameters each policy removes or keeps in float, sensitivity-weighted ratios, model
totals), so the XGBoost surrogate sees what a policy does to *this* model, in units that mean
the same on another model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from search_spaces import ConfigError, Dimension, Genotype, GenotypeError, SearchSpace, UnknownNameError

from .policy import Policy

if TYPE_CHECKING:
    import torch

    from nas.data import Dataset

__all__ = ["KINDS", "PolicySpace", "describe_model", "group_layers"]

KINDS = ("int8", "prune", "lowrank", "prune+int8", "lowrank+int8", "depth+prune", "depth+prune+int8")
PRUNE_RATIOS = (0.0, 0.25, 0.5, 0.7)
RANK_KEPT = (1.0, 0.5, 0.25)
CALIBRATIONS = ("minmax", "entropy", "percentile-99.99", "percentile-99.999")
# (activation type, weight type, symmetric activations, symmetric weights): the pairings ORT
# accepts (S8 activations with U8 weights it refuses)
SCHEMES: Mapping[str, tuple[str, str, bool, bool]] = {
    "u8s8": ("u8", "s8", False, True),
    "s8s8": ("s8", "s8", True, True),
    "u8u8": ("u8", "u8", False, False),
}
FORMATS = ("qoperator", "qdq")
GRANULARITIES = ("per_channel", "per_tensor")
FLOAT_ENDS = ("none", "first", "last", "both")
MAX_GROUPS = 8
# keep/drop decisions: the first blocks by remove_blocks' default ranking only (a deep net's 20+
# blocks would make a space no 20-evaluation search can cover; the costly ones per compute they
# save are rarely worth dropping)
MAX_BLOCKS = 8
BLOCK_CHOICES = ("keep", "drop")
_PROBE_SAMPLES = 256


class PolicySpace(SearchSpace):
    version = 1
    default_options: Mapping[str, Any] = {
        "kind": "prune+int8",
        "groups": (),  # ((group name, (layer names ...)), ...) for the per-group decisions
        "group_sensitivity": (),  # accuracy points lost by pruning each group alone by half
        "blocks": (),  # ((block name, (conv/linear layers it removes ...)), ...), forward order
        "block_sensitivity": (),  # accuracy points lost by removing each block alone
        "layers": (),  # layer table of `describe_model`: dicts, in forward order
        "ends": ("", ""),  # (first, last) layer of the deploy form, for int8 mixed precision
        "model": {},  # model totals: params, macs, layers, depthwise MAC share
        "finetune": {"epochs": 2, "lr": 1e-3, "kd": True},
        "importance": "l1",
        "round_to": 8,  # channel multiple kept by pruning (see the structured pass)
        "prune_ratios": PRUNE_RATIOS,
        "rank_kept": RANK_KEPT,
        "calibrations": CALIBRATIONS,
        "reduce_range": False,  # on for pre-VNNI x86 only; not searched by default
    }

    def __init__(self, name: str = "policy", **options: Any):
        super().__init__(name, **options)

    # -- decisions ---------------------------------------------------------------------------
    @property
    def families(self) -> tuple[str, ...]:
        kind = str(self.options["kind"])
        if kind not in KINDS:
            raise UnknownNameError("policy space kind", kind, KINDS)
        return tuple(kind.split("+"))

    def dimensions(self) -> Sequence[Dimension]:
        fams = self.families
        groups = self.options["groups"]
        dims: list[Dimension] = []
        if "depth" in fams:
            dims += [Dimension(f"drop_b{i}", BLOCK_CHOICES) for i in range(len(self.options["blocks"]))]
        if "prune" in fams:
            dims += [Dimension(f"prune_g{i}", tuple(self.options["prune_ratios"])) for i in range(len(groups))]
        if "lowrank" in fams:
            dims += [Dimension(f"rank_g{i}", tuple(self.options["rank_kept"])) for i in range(len(groups))]
        if "int8" in fams:
            dims += [
                Dimension("int8_calibration", tuple(self.options["calibrations"])),
                Dimension("int8_scheme", tuple(SCHEMES)),
                Dimension("int8_format", FORMATS),
                Dimension("int8_granularity", GRANULARITIES),
                Dimension("int8_float", FLOAT_ENDS),
            ]
        if not dims:
            raise ConfigError("the policy space has no decisions: the model has no prunable layer groups")
        return dims

    def to_dims(self, g: Genotype) -> dict[str, Any]:
        return g.as_dict()

    def from_dims(self, values: Mapping[str, Any]) -> Genotype:
        return Genotype(self.name, self.version, tuple((d.name, values[d.name]) for d in self.dims))

    def build(self, g: Genotype, input_shape: Sequence[int], num_classes: int) -> torch.nn.Module:
        raise GenotypeError("a policy genotype is applied to a trained model (PolicySpace.policy), not built")

    # -- genotype -> policy --------------------------------------------------------------------
    def policy(self, g: Genotype) -> Policy:
        values = self.to_dims(self.validate(g))
        groups = self.options["groups"]
        layers = {d["name"]: d for d in self.options["layers"]}
        steps: list[tuple[str, dict[str, Any]]] = []
        dropped = self._dropped(values)
        if dropped:
            steps.append(("remove_blocks", {"blocks": [name for name, _ in dropped]}))
        gone = {layer for _, layers in dropped for layer in layers}  # no ratio for a layer that is gone
        per_layer = {
            layer: float(values[f"prune_g{i}"])
            for i, (_, members) in enumerate(groups)
            if f"prune_g{i}" in values and values[f"prune_g{i}"] > 0
            for layer in members
            if layer not in gone
        }
        if per_layer:
            steps.append(("structured", {"ratio": 0.0, "per_layer": per_layer, "importance": self.options["importance"],
                                         "round_to": int(self.options["round_to"])}))
        ranks: dict[str, int] = {}
        for i, (_, members) in enumerate(groups):
            kept = float(values.get(f"rank_g{i}", 1.0))
            if kept >= 1.0:
                continue
            for layer in members:
                full = layers.get(layer, {}).get("full_rank", 0)
                if full > 1 and layers[layer].get("kind") != "depthwise":
                    ranks[layer] = max(1, int(round(kept * full)))
        if ranks:
            steps.append(("lowrank", {"ranks": ranks}))
        ft = dict(self.options["finetune"])
        if steps and int(ft.get("epochs", 0)) > 0:
            steps.append(("finetune", ft))
        if "int8_calibration" in values:
            steps.append(("int8", self._int8_settings(values)))
        return Policy.of(*steps)

    def _dropped(self, values: Mapping[str, Any]) -> list[tuple[str, tuple[str, ...]]]:
        """(block, its layers) for every block the point drops, in forward order."""
        return [(str(name), tuple(layers)) for i, (name, layers) in enumerate(self.options["blocks"])
                if values.get(f"drop_b{i}") == "drop"]

    def _int8_settings(self, values: Mapping[str, Any]) -> dict[str, Any]:
        calib = str(values["int8_calibration"])
        settings: dict[str, Any] = {"calibration": calib.split("-")[0], "reduce_range": bool(self.options["reduce_range"])}
        if calib.startswith("percentile-"):
            settings["percentile"] = float(calib.split("-", 1)[1])
        act, weight, sym_act, sym_w = SCHEMES[str(values["int8_scheme"])]
        settings.update(
            activation_type=act, weight_type=weight, symmetric_activations=sym_act, symmetric_weights=sym_w,
            format=str(values["int8_format"]), per_channel=values["int8_granularity"] == "per_channel",
        )
        first, last = self.options["ends"]
        keep = {"none": [], "first": [first], "last": [last], "both": [first, last]}[str(values["int8_float"])]
        settings["float_layers"] = sorted({n for n in keep if n})
        return settings

    def uniform_points(self) -> list[Genotype]:
        """The policies a user tries by hand before a per-layer search: every group pruned by the
        same ratio (each nonzero ratio, mildest first), every group at the same kept-rank fraction
        (each one below 1) — the surrogate's default initial design. Global int8 decisions take
        their first values. Empty for a space without per-group decisions."""
        dims = {d.name: d for d in self.dims}
        per_group = [(prefix, values) for prefix, values in (
            ("prune_g", [r for r in self.options["prune_ratios"] if float(r) > 0]),
            ("rank_g", [k for k in self.options["rank_kept"] if float(k) < 1]),
        ) if any(n.startswith(prefix) for n in dims)]
        points = []
        for prefix, values in per_group:
            mildest_first = sorted(values, key=lambda v: abs(float(v) - (0.0 if prefix == "prune_g" else 1.0)))
            for value in mildest_first:
                chosen = {n: value if n.startswith(prefix) else d.choices[0] for n, d in dims.items()}
                points.append(self.validate(self.from_dims(chosen)))
        return points

    # -- features for the surrogate ------------------------------------------------------------
    FEATURES = (
        "macs_kept", "params_kept", "max_ratio", "prune_sensitivity", "rank_kept_share",
        "float_macs_share", "int8_sensitivity", "int8_on", "log_macs", "log_params", "n_layers", "dw_share",
    )

    @property
    def encoding_size(self) -> int:
        return super().encoding_size + len(self.FEATURES)

    def encode(self, g: Genotype) -> np.ndarray:
        # the base class sizes its one-hot by `encoding_size`, which here includes the features
        onehot = super().encode(g)[: super().encoding_size]
        return np.concatenate([onehot, self.features(g)]).astype(np.float32)

    def features(self, g: Genotype) -> np.ndarray:
        """What the policy does to this model, in model-independent units (shares of the
        model's MACs / parameters, probe sensitivities), then the model's own totals."""
        values = self.to_dims(g)
        layers = {d["name"]: d for d in self.options["layers"]}
        total_macs = max(1.0, sum(float(d["macs"]) for d in layers.values()))
        total_params = max(1.0, sum(float(d["params"]) for d in layers.values()))
        macs_kept = params_kept = 1.0
        max_ratio = prune_sens = rank_share = 0.0
        # a dropped block takes its layers' whole share (and its probe's points) with it
        dropped = self._dropped(values)
        gone = {n for _, members in dropped for n in members}
        macs_kept -= sum(float(layers[n]["macs"]) for n in gone if n in layers) / total_macs
        params_kept -= sum(float(layers[n]["params"]) for n in gone if n in layers) / total_params
        block_sens = dict(zip((name for name, _ in self.options["blocks"]), self.options["block_sensitivity"],
                              strict=False))
        prune_sens += sum(max(0.0, float(block_sens.get(name, 0.0))) for name, _ in dropped)
        for i, (_, members) in enumerate(self.options["groups"]):
            ratio = float(values.get(f"prune_g{i}", 0.0))
            kept_rank = float(values.get(f"rank_g{i}", 1.0))
            members = [n for n in members if n not in gone]
            if not members:  # the group went with its blocks: its ratio decides nothing
                continue
            share_m = sum(float(layers[n]["macs"]) for n in members if n in layers) / total_macs
            share_p = sum(float(layers[n]["params"]) for n in members if n in layers) / total_params
            # pruning a group's outputs also thins the next group's inputs: ~quadratic in (1 - r)
            macs_kept -= share_m * (1 - (1 - ratio) ** 2)
            params_kept -= share_p * (1 - (1 - ratio) ** 2)
            max_ratio = max(max_ratio, ratio)
            sens = self.options["group_sensitivity"]
            prune_sens += ratio * (float(sens[i]) if i < len(sens) else 0.0)
            rank_share += share_p * (1.0 - kept_rank)
        float_share = int8_sens = int8_on = 0.0
        if "int8_float" in values:
            int8_on = 1.0
            kept = self._int8_settings(values)["float_layers"]
            float_share = sum(float(layers[n]["macs"]) for n in kept if n in layers) / total_macs
            int8_sens = sum(float(d.get("int8_sensitivity", 0.0)) for n, d in layers.items() if n not in kept)
        model = self.options["model"]
        return np.array(
            [
                macs_kept, params_kept, max_ratio, prune_sens, rank_share, float_share, int8_sens, int8_on,
                math.log10(max(1.0, float(model.get("macs", total_macs)))),
                math.log10(max(1.0, float(model.get("params", total_params)))),
                float(len(layers)), float(model.get("dw_share", 0.0)),
            ],
            dtype=np.float32,
        )

    # -- plain data ----------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "options": _plain(self.options)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PolicySpace:
        opts = dict(data["options"])
        opts["groups"] = tuple((str(n), tuple(m)) for n, m in opts.get("groups", ()))
        opts["ends"] = tuple(opts.get("ends", ("", "")))
        opts["blocks"] = tuple((str(n), tuple(m)) for n, m in opts.get("blocks", ()))
        for key in ("layers", "prune_ratios", "rank_kept", "calibrations", "group_sensitivity", "block_sensitivity"):
            if key in opts:
                opts[key] = tuple(opts[key])
        return cls(str(data.get("name", "policy")), **opts)

    @classmethod
    def for_model(
        cls,
        module: torch.nn.Module,
        deploy: torch.nn.Module,
        data: Dataset,
        kind: str = "prune+int8",
        probes: bool = True,
        **options: Any,
    ) -> PolicySpace:
        """The space of ``module`` (the form pruning starts from) whose int8 choices name layers
        of ``deploy`` (the form int8 quantizes; the same object when nothing merges)."""
        if kind not in KINDS:
            raise UnknownNameError("policy space kind", kind, KINDS)
        deploy_table, totals = describe_model(deploy, data, probes=probes and "int8" in kind)
        if deploy is not module:  # the training form's layers are what pruning names
            table, totals = describe_model(module, data, probes=False)
        else:  # nothing merges: one description serves both
            table = [dict(d) for d in deploy_table]
        known = {d["name"] for d in table}
        table += [d for d in deploy_table if d["name"] not in known]
        for d in table:
            match = next((x for x in deploy_table if x["name"] == d["name"]), None)
            if match is not None and "int8_sensitivity" in match:
                d["int8_sensitivity"] = match["int8_sensitivity"]
        prunable = [d["name"] for d in table if d.get("prunable")]
        ends = (deploy_table[0]["name"], deploy_table[-1]["name"]) if deploy_table else ("", "")
        groups = group_layers(prunable)
        sensitivity: tuple[float, ...] = ()
        if probes and kind != "int8":
            sensitivity = tuple(_prune_probe(module, members, data) for _, members in groups)
        blocks: tuple[tuple[str, tuple[str, ...]], ...] = ()
        block_sensitivity: tuple[float, ...] = ()
        if kind.startswith("depth"):
            blocks, block_sensitivity = _block_decisions(module, data)
        return cls(
            kind=kind,
            groups=groups,
            group_sensitivity=sensitivity,
            blocks=blocks,
            block_sensitivity=block_sensitivity,
            layers=tuple(table),
            ends=ends,
            model=totals,
            **options,
        )


def group_layers(names: Sequence[str], max_groups: int = MAX_GROUPS) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Layers grouped by their module path: the deepest prefix length that gives at most
    ``max_groups`` groups (one group per layer when few; stages of a deep network otherwise),
    in forward order. Pruning ratios and ranks are decided per group."""
    if not names:
        return ()
    def by_prefix(d: int) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for n in names:
            groups.setdefault(".".join(n.split(".")[:d]), []).append(n)
        return groups

    depth = max(len(n.split(".")) for n in names)
    fitting = [d for d in range(1, depth + 1) if len(by_prefix(d)) <= max_groups]
    if fitting:
        best = max(fitting, key=lambda d: (len(by_prefix(d)), -d))  # most groups, shortest names
        return tuple((k, tuple(v)) for k, v in by_prefix(best).items())
    # fewer prefixes than layers yet still too many: consecutive runs of equal size
    chunk = math.ceil(len(names) / max_groups)
    return tuple((f"{names[i]}..", tuple(names[i : i + chunk])) for i in range(0, len(names), chunk))


def describe_model(
    module: torch.nn.Module, data: Dataset, probes: bool = True
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """One row per conv/linear layer in forward order (kind, channels, kernel, MACs, params,
    weight statistics, full rank, whether its outputs may be pruned) and model totals. With
    ``probes``: each layer's int8 sensitivity, the relative logit error on a few validation
    samples when only its weights are rounded to int8 (one forward pass per layer)."""
    import torch
    from torch import nn

    from .passes.structured import _classifiers

    module = module.cpu().eval()
    x = torch.as_tensor(data.x_val[:_PROBE_SAMPLES])
    names = dict(module.named_modules())
    order: list[str] = []
    out_numel: dict[str, int] = {}

    def hook(mod: Any, inputs: Any, output: Any, name: str) -> None:
        if name not in out_numel:
            order.append(name)
            out_numel[name] = int(output[0].numel())  # per sample

    layer_types = (nn.Conv1d, nn.Conv2d, nn.Linear)
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: hook(mod, i, o, n)) for n, m in names.items() if isinstance(m, layer_types)]
    try:
        with torch.no_grad():
            logits = module(x)
    finally:
        for h in handles:
            h.remove()
    heads = set(_classifiers(module, x[:2]))
    rows: list[dict[str, Any]] = []
    for name in order:
        m = names[name]
        w = m.weight.detach().double()
        if isinstance(m, nn.Linear):
            kind, cin, cout, k, groups = "linear", m.in_features, m.out_features, 1, 1
        else:
            k = int(np.prod(m.kernel_size))
            cin, cout, groups = m.in_channels, m.out_channels, m.groups
            kind = "depthwise" if groups == cin and groups > 1 else "conv"
        macs = out_numel[name] * (cin // groups) * k
        std = float(w.std()) if w.numel() > 1 else 0.0
        rows.append({
            "name": name, "kind": kind, "in": cin, "out": cout, "kernel": k, "groups": groups,
            "params": int(sum(p.numel() for p in m.parameters(recurse=False))), "macs": int(macs),
            "weight_std": std, "outlier": float(w.abs().max()) / std if std > 0 else 0.0,
            "full_rank": int(min(cout, (cin // groups) * k)) if kind != "depthwise" else 1,
            "prunable": name not in heads,
        })
    totals = {
        "params": float(sum(p.numel() for p in module.parameters())),
        "macs": float(sum(r["macs"] for r in rows)),
        "layers": float(len(rows)),
        "dw_share": sum(r["macs"] for r in rows if r["kind"] == "depthwise") / max(1, sum(r["macs"] for r in rows)),
    }
    if probes:
        for r in rows:
            r["int8_sensitivity"] = _int8_probe(module, names[r["name"]], x, logits)
    return rows, totals


def _int8_probe(module: Any, layer: Any, x: Any, logits: Any) -> float:
    """Relative logit error when only ``layer``'s weights are rounded to symmetric per-tensor
    int8 (the coarsest granularity the space offers)."""
    import torch

    w = layer.weight.data
    scale = w.abs().max() / 127.0
    if float(scale) == 0.0:
        return 0.0
    saved = w.clone()
    try:
        w.copy_(torch.round(w / scale).clamp(-127, 127) * scale)
        with torch.no_grad():
            out = module(x)
    finally:
        w.copy_(saved)
    return float((out - logits).norm() / logits.norm().clamp_min(1e-12))


def _prune_probe(module: Any, layers: Sequence[str], data: Any) -> float:
    """Accuracy points (on a few validation samples) lost when the structured pass prunes the
    group's ``layers`` alone by half, without fine-tuning: a cheap sensitivity probe."""
    import copy

    import torch

    from .passes.base import PassContext, get_pass

    x = torch.as_tensor(data.x_val[:_PROBE_SAMPLES])
    y = torch.as_tensor(data.y_val[:_PROBE_SAMPLES])
    settings = Policy.of(("structured", {"per_layer": dict.fromkeys(layers, 0.5)})).passes[0].settings
    module = module.cpu().eval()
    try:
        with torch.no_grad():
            base = float((module(x).argmax(1) == y).double().mean())
        model, _ = get_pass("structured").apply(copy.deepcopy(module), settings, PassContext(data=data))
        with torch.no_grad():
            acc = float((model.eval()(x).argmax(1) == y).double().mean())
    except Exception:  # noqa: BLE001 - a group the pruner cannot handle has no probe, not a crash
        return 0.0
    return 100.0 * (base - acc)


def _block_decisions(module: Any, data: Any) -> tuple[tuple[tuple[str, tuple[str, ...]], ...], tuple[float, ...]]:
    """The blocks a depth space decides on: the first `MAX_BLOCKS` removable blocks of ``module``
    in the order ``remove_blocks`` would remove them with its default ``rank`` / ``cost`` (the
    probe on the calibration rows: fewest points lost per share of compute saved beyond what
    width pruning would save, see `compress.passes.remove_blocks`), in forward order, each with
    the layers it removes, and their probe's points lost. The width ratios searched beside them
    are what makes the pass's default the right order here: a block worth a keep/drop decision
    is one that saves compute channel pruning cannot. A model without blocks is a `PolicyError`."""
    from .blocks import find_blocks
    from .errors import PolicyError
    from .passes.base import PassContext
    from .passes.remove_blocks import REMOVE_BLOCKS, block_order, block_scores, drop_floor, refusal

    module = module.cpu().eval()
    search = find_blocks(module, data.input_shape)
    if not search.blocks:
        raise PolicyError(refusal(module, search).replace("remove_blocks:", "policy space depth+prune:", 1))
    ctx = PassContext(data=data)
    rank, cost = REMOVE_BLOCKS.defaults["rank"], REMOVE_BLOCKS.defaults["cost"]
    scores = block_scores(module, search, ctx, latency=rank == "drop_per_cost" and cost.startswith("latency"))
    order = block_order([b.name for b in search.blocks], scores, rank, cost, drop_floor(ctx))
    chosen = sorted(order[:MAX_BLOCKS])
    blocks = tuple((search.blocks[i].name, search.blocks[i].layers) for i in chosen)
    return blocks, tuple(float(scores[name]["drop"]) for name, _ in blocks)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
