"""Read an NNI pruning ``config_list`` into a `Policy` of our passes (nni itself is not needed).

NNI 3.0 (``nni.compression.pruning``) describes pruning as a list of plain dicts, e.g.::

    [{"op_types": ["Conv2d", "Linear"], "sparse_ratio": 0.5},
     {"op_names": ["fc"], "exclude_op_names": [], "sparse_ratio": 0.2, "granularity": "out_channel"},
     {"op_types": ["Conv2d"], "sparse_ratio": 0.6, "global_group_id": "convs", "max_sparse_ratio": 0.9}]

This module gives such a list a meaning with our passes, so an NNI user's file runs unchanged
without nni (whose 3.0 release does not work on current torch: ModelSpeedup fails, the NAS APIs
want pytorch_lightning):

- which layers: NNI's own rule (``nni.compression.base.config.select_modules_by_config``):
  ``op_names`` ∪ ``op_names_re`` (``re.match``), intersected with ``op_types`` when both are
  given, minus ``exclude_op_names`` / ``exclude_op_names_re`` / ``exclude_op_types``. A layer
  picked by several entries takes the last one's settings (NNI extends a module's settings in
  list order). Legacy (NNI 2.x) keys are translated as NNI's ``trans_legacy_config_list`` does:
  ``sparsity``/``sparsity_per_layer`` -> per-layer ``sparse_ratio``, ``total_sparsity`` -> a
  global group of its own, ``max_sparsity_per_layer`` -> ``max_sparse_ratio``,
  ``op_partial_names`` -> ``op_names_re``, and an entry ``{"exclude": true, ...}`` removes its
  layers from every entry. ``op_types: ["default"]`` means every Conv/Linear.
- how: ``granularity`` ``"default"`` (element-wise) -> pass ``unstructured`` with
  ``per_layer`` {layer: ratio}, ``scope = "layer"``; ``"out_channel"`` -> pass ``structured``
  with ``per_layer`` {layer: ratio} (Torch-Pruning's DepGraph prunes coupled layers together,
  which is what NNI's ``dependency_group_id`` asks for, so that key is accepted and needs
  nothing more; the structured pass never prunes the classifier's outputs). Structured runs
  first, then unstructured on what remains.
- global groups (``global_group_id``, or a legacy ``total_sparsity``): the layers of a group
  share one budget: ``sparse_ratio`` of all their weights. We split it the way global magnitude
  pruning does: one threshold on |w| across the group's layers (for ``out_channel``, on each
  output channel's L2 norm, so layers of different fan-in compare), each layer's share clipped
  to its ``[min_sparse_ratio, max_sparse_ratio]``. The resulting per-layer ratios go into the
  policy, so it is plain data that replays without the config -- and depends on the weights of
  the model given, as NNI's allocation does.

Only Conv1d/2d/3d and Linear weights are pruned (the passes' prunable layers). Anything this
module cannot honour -- an unknown key, another granularity, ``sparse_threshold``, layers the
model lacks, an entry that selects no prunable layer -- is a `PolicyError` naming it.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import PolicyError
from .policy import Policy

if TYPE_CHECKING:
    import torch

__all__ = ["PRUNABLE_TYPES", "VALID_KEYS", "policy_from_nni_config"]

PRUNABLE_TYPES = ("Conv1d", "Conv2d", "Conv3d", "Linear")
GRANULARITIES = ("default", "out_channel")
_SELECT = ("op_names", "op_types", "op_names_re", "op_partial_names")
_EXCLUDE = ("exclude_op_names", "exclude_op_types", "exclude_op_names_re")
_RATIO = ("sparse_ratio", "sparsity", "sparsity_per_layer", "total_sparsity")
# settings NNI 3.0 may also nest under target_settings["weight"]
_SETTING = (
    "sparse_ratio",
    "max_sparse_ratio",
    "min_sparse_ratio",
    "global_group_id",
    "granularity",
    "dependency_group_id",
    "apply_method",
)
VALID_KEYS = tuple(
    sorted(
        {
            *_SELECT,
            *_EXCLUDE,
            *_RATIO,
            *_SETTING,
            "exclude",
            "max_sparsity_per_layer",
            "target_names",
            "target_settings",
        }
    )
)
_DIGITS = 6  # ratios are rounded so the policy's canonical text is stable


@dataclass(frozen=True)
class _Entry:
    index: int
    layers: tuple[str, ...]
    ratio: float
    granularity: str
    group: str | None
    low: float
    high: float


def policy_from_nni_config(config_list: Sequence[Mapping[str, Any]], model: torch.nn.Module) -> Policy:
    """The `Policy` (structured and/or unstructured pass) an NNI pruning ``config_list`` asks
    for on ``model``; see the module docstring for the mapping."""
    if isinstance(config_list, str | bytes | Mapping) or not isinstance(config_list, Sequence):
        raise PolicyError(f"an NNI config_list is a list of dicts, got {type(config_list).__name__}")
    modules = {n: m for n, m in model.named_modules() if n}
    types = {n: type(m).__name__ for n, m in modules.items()}
    for i, entry in enumerate(config_list):
        if not isinstance(entry, Mapping):
            raise PolicyError(f"NNI config entry {i} is a dict, got {entry!r}")
        _check_keys(i, entry)

    excluded = _legacy_excluded(config_list, types)
    entries = [_entry(i, e, types, excluded) for i, e in enumerate(config_list) if not _truthy_exclude(i, e)]
    # later entries override earlier ones for the same layer (NNI extends settings in list order)
    final: dict[str, _Entry] = {}
    for e in entries:
        for name in e.layers:
            final[name] = e

    ratios: dict[str, float] = {}
    groups: dict[str, list[str]] = {}
    for name, e in final.items():
        if e.group is None:
            ratios[name] = min(max(e.ratio, e.low), e.high)
        else:
            groups.setdefault(e.group, []).append(name)
    for gid, names in groups.items():
        ratios.update(_allocate_group(gid, names, final, modules))

    structured = {
        n: round(r, _DIGITS) for n, r in ratios.items() if final[n].granularity == "out_channel" and r > 0
    }
    unstructured = {
        n: round(r, _DIGITS) for n, r in ratios.items() if final[n].granularity == "default" and r > 0
    }
    steps: list[tuple[str, Mapping[str, Any]]] = []
    if structured:
        steps.append(("structured", {"per_layer": _ordered(structured, modules)}))
    if unstructured:
        steps.append(("unstructured", {"scope": "layer", "per_layer": _ordered(unstructured, modules)}))
    return Policy.of(*steps)


# -- one entry -----------------------------------------------------------------------------------
def _check_keys(i: int, entry: Mapping[str, Any]) -> None:
    for key in entry:
        if key not in VALID_KEYS:
            close = difflib.get_close_matches(str(key), VALID_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PolicyError(
                f"NNI config entry {i}: unknown or unsupported key {key!r}{hint}; valid: {', '.join(VALID_KEYS)}"
            )


def _truthy_exclude(i: int, entry: Mapping[str, Any]) -> bool:
    value = entry.get("exclude", False)
    if not isinstance(value, bool):
        raise PolicyError(f"NNI config entry {i}: exclude is true or false, got {value!r}")
    return value


def _legacy_excluded(config_list: Sequence[Mapping[str, Any]], types: Mapping[str, str]) -> set[str]:
    """Layers of the ``{"exclude": true, ...}`` entries: NNI removes them from every entry."""
    out: set[str] = set()
    for i, entry in enumerate(config_list):
        if not _truthy_exclude(i, entry):
            continue
        extra = sorted(set(entry) - {"exclude", *_SELECT})
        if extra:
            raise PolicyError(
                f"NNI config entry {i} excludes layers; it takes only {list(_SELECT)}, not {extra}"
            )
        out |= _select(i, entry, types, prunable_only=False)
    return out


def _entry(i: int, raw: Mapping[str, Any], types: Mapping[str, str], excluded: set[str]) -> _Entry:
    entry = _flatten_targets(i, raw)
    given = [k for k in _RATIO if k in entry]
    if len(given) != 1:
        what = "none" if not given else " and ".join(given)
        raise PolicyError(f"NNI config entry {i}: give exactly one of {', '.join(_RATIO)} (got {what})")
    key = given[0]
    ratio = _fraction(i, key, entry[key], upper_open=True)
    group = None
    if key == "total_sparsity":
        group = f"total_sparsity@{i}"  # a legacy total_sparsity entry is a global group of its own
    elif "global_group_id" in entry:
        gid = entry["global_group_id"]
        if isinstance(gid, bool) or not isinstance(gid, int | str):
            raise PolicyError(f"NNI config entry {i}: global_group_id is an int or a string, got {gid!r}")
        group = f"id:{gid}"
    high = entry.get("max_sparse_ratio", entry.get("max_sparsity_per_layer", 1.0))
    if "max_sparse_ratio" in entry and "max_sparsity_per_layer" in entry:
        raise PolicyError(f"NNI config entry {i}: give max_sparse_ratio or max_sparsity_per_layer, not both")
    high = _fraction(i, "max_sparse_ratio", high, upper_open=False)
    low = _fraction(i, "min_sparse_ratio", entry.get("min_sparse_ratio", 0.0), upper_open=True)
    if low > high:
        raise PolicyError(f"NNI config entry {i}: min_sparse_ratio {low} is above max_sparse_ratio {high}")
    granularity = entry.get("granularity", "default")
    if granularity not in GRANULARITIES:
        raise PolicyError(
            f"NNI config entry {i}: granularity {granularity!r} is not supported; valid: {', '.join(GRANULARITIES)} "
            f"(element-wise -> pass unstructured, out_channel -> pass structured)"
        )
    method = entry.get("apply_method", "mul")
    if method != "mul":
        raise PolicyError(
            f"NNI config entry {i}: apply_method {method!r}: pruned weights are set to zero ('mul') only"
        )
    layers = _select(i, entry, types, prunable_only=True) - excluded
    if not layers:
        raise PolicyError(
            f"NNI config entry {i} selects no prunable layer (Conv1d/2d/3d, Linear) of the model"
            + (" once the excluded ones are removed" if excluded else "")
        )
    position = {n: k for k, n in enumerate(types)}  # module order, as named_modules() lists them
    return _Entry(i, tuple(sorted(layers, key=position.__getitem__)), ratio, granularity, group, low, high)


def _flatten_targets(i: int, entry: Mapping[str, Any]) -> dict[str, Any]:
    """NNI 3.0's full form puts the weight's settings under ``target_settings["weight"]``."""
    out = {k: v for k, v in entry.items() if k not in ("target_names", "target_settings")}
    names = entry.get("target_names", ["weight"])
    if not isinstance(names, list | tuple) or "weight" not in names or not set(names) <= {"weight", "bias"}:
        raise PolicyError(
            f"NNI config entry {i}: target_names must name 'weight' (and may name 'bias'); got {names!r}"
        )
    settings = entry.get("target_settings", {})
    if not isinstance(settings, Mapping) or not set(settings) <= set(names):
        raise PolicyError(
            f"NNI config entry {i}: target_settings is a dict keyed by target_names, got {settings!r}"
        )
    for key, value in dict(settings.get("weight", {})).items():
        if key not in _SETTING:
            raise PolicyError(
                f"NNI config entry {i}: target_settings['weight'] key {key!r} is not supported; valid: {', '.join(_SETTING)}"
            )
        if key in out and out[key] != value:
            raise PolicyError(f"NNI config entry {i}: {key} is given twice with different values")
        out[key] = value
    # biases stay dense in unstructured pruning and go with their channel in structured pruning,
    # so a bias setting (NNI aligns it to the weight) needs nothing
    return out


def _select(i: int, entry: Mapping[str, Any], types: Mapping[str, str], prunable_only: bool) -> set[str]:
    """NNI's selection rule (see the module docstring); names and types are checked."""
    lists = {k: _names(i, k, entry.get(k)) for k in (*_SELECT, *_EXCLUDE)}
    if not any(lists[k] for k in _SELECT):
        raise PolicyError(f"NNI config entry {i}: select layers with op_names, op_types or op_names_re")
    for key in ("op_names", "exclude_op_names"):
        for name in lists[key]:
            if name not in types:
                close = difflib.get_close_matches(name, list(types), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise PolicyError(
                    f"NNI config entry {i}: {key} names {name!r}, which the model does not have{hint}"
                )
    type_names = {t for t in types.values()}
    for key in ("op_types", "exclude_op_types"):
        for t in lists[key]:
            if t != "default" and t not in type_names and not _is_torch_module_type(t):
                close = difflib.get_close_matches(t, sorted(type_names | set(PRUNABLE_TYPES)), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise PolicyError(f"NNI config entry {i}: {key} has {t!r}, which is no module type{hint}")
    patterns = [_regex(i, p) for p in lists["op_names_re"]] + [
        _regex(i, f".*{re.escape(p)}.*") for p in lists["op_partial_names"]
    ]

    def expand(ts: list[str]) -> set[str]:
        wanted = {t for t in ts if t != "default"} | (set(PRUNABLE_TYPES) if "default" in ts else set())
        return {n for n, t in types.items() if t in wanted}

    picked = set(lists["op_names"]) | {n for n in types if any(p.match(n) for p in patterns)}
    if lists["op_types"]:
        by_type = expand(lists["op_types"])
        picked = picked & by_type if (lists["op_names"] or patterns) else by_type
    picked -= set(lists["exclude_op_names"])
    ex_patterns = [_regex(i, p) for p in lists["exclude_op_names_re"]]
    picked = {n for n in picked if not any(p.match(n) for p in ex_patterns)}
    picked -= expand(lists["exclude_op_types"])
    if not prunable_only:
        return picked
    # a name or type given explicitly must be prunable; regular expressions naturally also match
    # containers and activations, which are dropped quietly
    for name in lists["op_names"]:
        if name in picked and types[name] not in PRUNABLE_TYPES:
            raise PolicyError(
                f"NNI config entry {i}: layer {name!r} is a {types[name]}; only {', '.join(PRUNABLE_TYPES)} weights are pruned"
            )
    for t in lists["op_types"]:
        if t != "default" and t not in PRUNABLE_TYPES:
            raise PolicyError(
                f"NNI config entry {i}: op_types has {t!r}; only {', '.join(PRUNABLE_TYPES)} weights are pruned"
            )
    return {n for n in picked if types[n] in PRUNABLE_TYPES}


def _names(i: int, key: str, value: Any) -> list[str]:
    if value is None:
        return []
    if (
        isinstance(value, str)
        or not isinstance(value, list | tuple)
        or not all(isinstance(v, str) for v in value)
    ):
        raise PolicyError(f"NNI config entry {i}: {key} is a list of strings, got {value!r}")
    return list(value)


def _regex(i: int, pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise PolicyError(f"NNI config entry {i}: bad regular expression {pattern!r}: {exc}") from None


def _is_torch_module_type(name: str) -> bool:
    from torch import nn

    return isinstance(getattr(nn, name, None), type) and issubclass(getattr(nn, name), nn.Module)


def _fraction(i: int, key: str, value: Any, upper_open: bool) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and value >= 0.0 and (value < 1.0 if upper_open else value <= 1.0)
    if not ok:
        bound = "[0, 1)" if upper_open else "[0, 1]"
        raise PolicyError(f"NNI config entry {i}: {key} is a fraction in {bound}, got {value!r}")
    return float(value)


# -- global groups -------------------------------------------------------------------------------
def _allocate_group(
    gid: str, names: list[str], final: Mapping[str, _Entry], modules: Mapping[str, Any]
) -> dict[str, float]:
    """Per-layer ratios that prune ``ratio`` of the group's weights by one magnitude threshold,
    each layer clipped to its [min, max] (global magnitude pruning with per-layer bounds)."""
    import torch

    entries = {final[n].index: final[n] for n in names}
    targets = {e.ratio for e in entries.values()}
    label = gid.split(":", 1)[1] if gid.startswith("id:") else f"total_sparsity of entry {gid.split('@')[1]}"
    if len(targets) > 1:
        raise PolicyError(
            f"NNI global group {label!r}: its entries {sorted(entries)} give different sparse_ratio {sorted(targets)}"
        )
    if len({e.granularity for e in entries.values()}) > 1:
        raise PolicyError(f"NNI global group {label!r}: its entries {sorted(entries)} mix granularities")
    target = targets.pop()
    scores, sizes = {}, {}
    for n in names:
        w = modules[n].weight.detach().abs().float()
        # out_channel: one score per output channel, its filter's L2 norm (Li et al. 2017 rank
        # filters by norm); under the usual 1/sqrt(fan_in) init scale that norm does not depend
        # on the fan-in, so layers of different widths compare, which L1 sums or means do not
        s = w.reshape(w.shape[0], -1).norm(dim=1) if final[n].granularity == "out_channel" else w.reshape(-1)
        scores[n], sizes[n] = torch.sort(s).values, w.numel()
    total = sum(sizes.values())
    low = sum(sizes[n] * final[n].low for n in names) / total
    high = sum(sizes[n] * final[n].high for n in names) / total
    if not low - 1e-9 <= target <= high + 1e-9:
        raise PolicyError(
            f"NNI global group {label!r}: sparse_ratio {target} cannot be met within the layers' "
            f"min/max_sparse_ratio bounds (reachable: {low:.3f} .. {high:.3f})"
        )

    def shares(t: float) -> dict[str, float]:
        out = {}
        for n in names:
            below = int(torch.searchsorted(scores[n], torch.tensor(t), right=False))
            # the passes keep at least one weight/channel per layer: ratios are below 1
            cap = min(final[n].high, (len(scores[n]) - 1) / len(scores[n]))
            out[n] = min(max(below / len(scores[n]), final[n].low), cap)
        return out

    def pruned(t: float) -> float:
        return sum(sizes[n] * r for n, r in shares(t).items()) / total

    lo_t, hi_t = 0.0, float(max(float(s[-1]) for s in scores.values())) * 2 + 1.0
    for _ in range(64):  # pruned(t) rises with t: bisect for the threshold that meets the target
        mid = (lo_t + hi_t) / 2
        lo_t, hi_t = (mid, hi_t) if pruned(mid) < target else (lo_t, mid)
    return shares(hi_t)


def _ordered(ratios: Mapping[str, float], modules: Mapping[str, Any]) -> dict[str, float]:
    return {n: ratios[n] for n in modules if n in ratios}
