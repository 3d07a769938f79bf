"""`Policy`: an ordered list of compression passes with their settings — plain data.

Canonical JSON (sorted keys, no spaces, every setting filled in from the pass's defaults)::

    {"passes":[{"pass":"structured","settings":{"ratio":0.5,...}},{"pass":"int8","settings":{...}}]}

so one policy has one text and one id (the SHA-1 prefix of that text), like a genotype. The text
is what a trial stores in its ``policy`` field. `Policy.apply(model, ctx)` runs the passes in
order on a private copy (the original is never modified) and returns a `Compressed` with the
records each pass wrote; `Policy.replay(original, records, ctx)` rebuilds the same model from
those records on a fresh copy. Nothing here pickles a module.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PolicyError
from .passes.base import PassContext, QuantizedOnnx, get_pass

__all__ = ["Compressed", "Policy", "PassSpec", "load_policy_file", "policy_label"]


@dataclass(frozen=True)
class PassSpec:
    name: str
    settings: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"pass": self.name, "settings": _plain(self.settings)}


@dataclass(frozen=True)
class Policy:
    passes: tuple[PassSpec, ...] = ()

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def of(cls, *steps: tuple[str, Mapping[str, Any]] | str) -> Policy:
        """``Policy.of(("structured", {"ratio": 0.5}), "finetune", ("int8", {}))``."""
        specs = []
        for step in steps:
            name, settings = (step, {}) if isinstance(step, str) else step
            specs.append(_spec(name, settings))
        return cls._checked(tuple(specs))

    @classmethod
    def from_json(cls, data: str | Mapping[str, Any] | Sequence[Any]) -> Policy:
        """From the canonical text, a mapping ``{"passes": [...]}`` or a bare list of passes.
        A pass may be written ``{"pass": name, "settings": {...}}`` or ``{"pass": name, k: v}``."""
        if isinstance(data, str):
            if not data.strip():
                return cls()
            try:
                data = json.loads(data)
            except json.JSONDecodeError as exc:
                raise PolicyError(f"a policy is JSON like {{\"passes\": [...]}}; cannot parse it: {exc}") from None
            except RecursionError:  # thousands of nested brackets
                raise PolicyError("a policy is JSON like {\"passes\": [...]}; this one is nested too deeply") from None
        if isinstance(data, Mapping):
            unknown = set(data) - {"passes"}
            if unknown:
                raise PolicyError(f"a policy has one key, 'passes'; got {sorted(unknown)}")
            data = data.get("passes", [])
        if not isinstance(data, Sequence) or isinstance(data, str | bytes):
            raise PolicyError(f"a policy's passes are a list, got {type(data).__name__}")
        specs = []
        for i, item in enumerate(data):
            if isinstance(item, str):
                specs.append(_spec(item, {}))
                continue
            if not isinstance(item, Mapping) or "pass" not in item:
                raise PolicyError(f"pass {i} of the policy must be a table with a 'pass' name, got {item!r}")
            rest = {k: v for k, v in item.items() if k != "pass"}
            if "settings" in rest:
                if set(rest) != {"settings"} or not isinstance(rest["settings"], Mapping):
                    raise PolicyError(f"pass {i} ({item['pass']}): give either 'settings' = {{...}} or the settings inline")
                rest = dict(rest["settings"])
            specs.append(_spec(str(item["pass"]), rest))
        return cls._checked(tuple(specs))

    @classmethod
    def _checked(cls, specs: tuple[PassSpec, ...]) -> Policy:
        for i, spec in enumerate(specs[:-1]):
            if get_pass(spec.name).terminal:
                raise PolicyError(
                    f"pass {spec.name!r} yields an ONNX Runtime model and must be the last pass; "
                    f"it is followed by {[s.name for s in specs[i + 1:]]}"
                )
        return cls(specs)

    # -- identity --------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"passes": [s.to_json() for s in self.passes]}

    def to_str(self) -> str:
        """Canonical text; empty for the empty (identity) policy, as a plain trial stores it."""
        if not self.passes:
            return ""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))

    __str__ = to_str

    @property
    def id(self) -> str:
        return hashlib.sha1(self.to_str().encode()).hexdigest()[:8] if self.passes else "none"

    def label(self) -> str:
        """A short human name: ``structured(ratio=0.5)+finetune(epochs=2)+int8``."""
        if not self.passes:
            return "none"
        parts = []
        for s in self.passes:
            defaults = get_pass(s.name).defaults
            changed = {k: v for k, v in s.settings.items() if defaults.get(k) != v}
            shown = ",".join(f"{k}={_short(v)}" for k, v in sorted(changed.items())[:3])
            parts.append(f"{s.name}({shown})" if shown else s.name)
        return "+".join(parts)

    def names(self) -> tuple[str, ...]:
        """What ``--policy NAME`` accepts for this policy, matched whole (case and spaces aside):
        its id, its label as the console prints it, its label as the report prints it, and its
        passes' names joined by ``+`` (``structured+finetune+int8``). Never a piece of a label:
        ``structured`` must not pick ``unstructured``."""
        return (self.id, self.label(), policy_label(self.to_str()), "+".join(s.name for s in self.passes) or "none")

    def matches(self, name: str) -> bool:
        key = _name_key(name)
        return any(_name_key(n) == key for n in self.names())

    def has_passes(self, name: str) -> bool:
        """``structured`` or ``structured+int8``: each pass named is one of this policy's, by its
        whole name (a looser match than `matches`, which a caller should prefer when both hit)."""
        wanted = [_name_key(n) for n in name.split("+")]
        return all(w in {s.name for s in self.passes} for w in wanted)

    @property
    def terminal(self) -> bool:
        return bool(self.passes) and get_pass(self.passes[-1].name).terminal

    # -- applying ----------------------------------------------------------------------------------
    def apply(self, model: Any, ctx: PassContext) -> Compressed:
        work = copy.deepcopy(model)  # the caller's model is never touched
        records: list[dict[str, Any]] = []
        float_model = None
        for spec in self.passes:
            p = get_pass(spec.name)
            if p.terminal:
                float_model = work  # the torch model the runtime model was made from
            work, record = p.apply(work, spec.settings, ctx)
            records.append({"pass": spec.name, **_plain(record)})
        return Compressed(self, work, records, list(ctx.notes), float_model if self.terminal else work)

    def replay(self, model: Any, records: Sequence[Mapping[str, Any]], ctx: PassContext) -> Any:
        if len(records) != len(self.passes):
            raise PolicyError(f"{len(records)} records for a policy of {len(self.passes)} passes")
        work = copy.deepcopy(model)
        for spec, record in zip(self.passes, records, strict=True):
            if record.get("pass") != spec.name:
                raise PolicyError(f"record of pass {record.get('pass')!r} where the policy has {spec.name!r}")
            body = {k: v for k, v in record.items() if k != "pass"}
            work = get_pass(spec.name).replay(work, body, ctx)
        return work


@dataclass
class Compressed:
    """The outcome of `Policy.apply`: the model (a torch module, or a `QuantizedOnnx` when the
    last pass is terminal), one record per pass, remarks worth showing the user, and the last
    torch model (the one a terminal pass turned into a runtime model; else ``model`` itself)."""

    policy: Policy
    model: Any
    records: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    float_model: Any = None

    @property
    def is_onnx(self) -> bool:
        return isinstance(self.model, QuantizedOnnx)


def _spec(name: str, settings: Mapping[str, Any]) -> PassSpec:
    p = get_pass(name)
    if not isinstance(settings, Mapping):
        raise PolicyError(f"settings of pass {name!r} must be a table, got {settings!r}")
    full = {**dict(p.defaults), **_plain(dict(settings))}
    for key in settings:
        if key not in p.defaults:
            from search_spaces.errors import UnknownNameError

            raise PolicyError(str(UnknownNameError(f"setting of pass {name!r}", key, p.defaults)))
    p.validate(full)
    return PassSpec(name, full)


def _plain(value: Any) -> Any:
    """JSON-plain copy: tuples become lists, mapping keys strings; anything else is an error."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    try:  # numpy scalars
        return value.item()
    except AttributeError:
        raise PolicyError(f"policy settings and records are plain JSON values, got {type(value).__name__}") from None


# the one setting worth showing per pass in a short label (the rest are in the report's policy column)
_KEY_SETTING = {
    "structured": "ratio",
    "unstructured": "sparsity",
    "lowrank": "target",
    "lowbit": "bits",
    "finetune": "epochs",
}


def policy_label(text: str | None) -> str:
    """``structured 0.5 + finetune 4 kd + int8`` from a policy's canonical JSON, ``none`` if empty:
    the report's name of a policy, which ``--policy NAME`` accepts (`Policy.names`). Read from the
    text alone, so a stored policy whose passes changed since still gets a name."""
    if not text:
        return "none"
    try:
        passes = json.loads(text).get("passes", [])
    except (ValueError, AttributeError):
        return "?"
    parts = []
    for p in passes:
        name = str(p.get("pass", "?"))
        settings = p.get("settings", {k: v for k, v in p.items() if k != "pass"})
        bits = [name]
        key = _KEY_SETTING.get(name)
        if key in settings and not isinstance(settings[key], dict | list):
            bits.append(f"{settings[key]:g}" if isinstance(settings[key], float) else str(settings[key]))
        if settings.get("kd"):
            bits.append("kd")
        parts.append(" ".join(bits))
    return " + ".join(parts) or "none"


def _name_key(name: str) -> str:
    return "".join(name.split()).lower()


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, dict | list):
        return f"<{len(v)}>"
    return str(v)


def load_policy_file(path: str | Path) -> Policy:
    """A hand-written policy from JSON or TOML (``[[passes]]`` tables) or YAML."""
    from nas.config import load_config_file, read_text_file

    p = Path(path)
    if p.suffix == ".json" and p.is_file():
        try:
            return Policy.from_json(read_text_file(p))
        except PolicyError as exc:
            raise PolicyError(f"{p}: {exc}") from None
    data = load_config_file(p)
    try:
        return Policy.from_json(data)
    except PolicyError as exc:
        raise PolicyError(f"{p}: {exc}") from None
