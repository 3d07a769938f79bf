"""`SearchConfig`: every setting of a search run, typed, frozen and strictly validated.

Loaded from flags, a TOML or YAML file (``--config``), or a run folder's ``config.json`` (resume).
An unknown key is an error naming the closest valid key; a wrong type names the expected one.
Nothing is ever evaluated as code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from search_spaces import ConfigError, UnknownNameError

__all__ = ["SearchConfig", "load_config_file", "read_json_file", "read_text_file", "RUNNERS", "SCHEDULERS"]

RUNNERS = ("local", "ray")
SCHEDULERS = ("auto", "asha", "mo-asha", "none")
# trials and epochs above this are typos (1e18 from a YAML/TOML file), not budgets: refused
# before a search starts what would never end
MAX_COUNT = 1_000_000


@dataclass(frozen=True)
class SearchConfig:
    # what to search
    space: str = "unireplk"
    space_options: Mapping[str, Any] = field(default_factory=dict)
    tiny: bool = True  # the space's small macro setting (fast on 2 CPU cores)
    dataset: str = "mnist1d"
    # how to search
    strategy: str = "surrogate"
    strategy_options: Mapping[str, Any] = field(default_factory=dict)
    trials: int = 24
    epochs: int = 8
    objectives: tuple[str, ...] = ("val_acc", "params")
    constraints: tuple[str, ...] = ()
    seed: int = 0
    # joint architecture x compression search (`compress.joint`): a candidate is a pair
    # (architecture, compression policy of the `joint_policy` families), measured after compression
    joint: bool = False
    joint_policy: str = "prune+int8"
    joint_options: Mapping[str, Any] = field(default_factory=dict)
    # weight inheritance (EAS / Net2Net, `nas.inherit`): a proposal one or two decisions from a
    # trained trial starts from its weights and trains `inherit_epochs` (None: a quarter of `epochs`)
    inherit: bool = False
    inherit_epochs: int | None = None
    # training: a recipe by name (quick, standard, darts) or a table ({base = "standard", lr = 0.05, ...});
    # batch_size / lr, when given, override the recipe's (quick: 64, 3e-3)
    recipe: str | Mapping[str, Any] = "quick"
    batch_size: int | None = None
    lr: float | None = None
    # small data (#22): the share of the labelled pool held out for validation, and the folds each
    # trial is cross-validated on (None: 5 below 1,000 train+val samples, else 1; resolved and
    # written to config.json when the run is made, so a resume and later verbs use the same)
    val_fraction: float = 0.2
    cv: int | None = None
    cache_dir: str | None = None  # where image folders and .npz files are decoded (default $XDG_CACHE_HOME/nas-run)
    # the axes of a user's x (nas.data.LAYOUTS) where the rule cannot read them and no .npz
    # `layout` key says (an x.npy folder); a search turns it channel-first
    layout: str | None = None
    # execution
    runner: str = "local"
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int = 2
    ray_address: str | None = None
    scheduler: str = "auto"  # auto: ASHA for one objective, MO-ASHA for several
    grace_period: int = 1
    reduction_factor: int = 2
    # Ray: times a trial lost to a dead worker or node is run again before it counts as failed
    max_retries: int = 2
    # where results go
    out: str | None = None  # default: results/<space>-<dataset>-<strategy>-<time>
    storage: str | None = None  # any SQLAlchemy URL; default: sqlite:///<out>/study.db

    def __post_init__(self) -> None:
        _positive("trials", self.trials, MAX_COUNT)
        _positive("epochs", self.epochs, MAX_COUNT)
        if self.batch_size is not None:
            _positive("batch_size", self.batch_size)
        if self.cv is not None:
            _positive("cv", self.cv)
        if self.inherit_epochs is not None:
            _positive("inherit_epochs", self.inherit_epochs, MAX_COUNT)
            if not self.inherit:
                raise ConfigError("inherit_epochs is set but inherit is off: add --inherit (inherit = true)")
        if self.inherit and self.joint:
            raise ConfigError("inherit applies to architecture searches, not to --joint runs")
        if self.inherit and self.cv is not None and self.cv > 1:
            raise ConfigError(f"inherit needs cv = 1 (a parent trained on one split; got cv = {self.cv})")
        v = self.val_fraction
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < 1:
            raise ConfigError(f"val_fraction must be a number strictly between 0 and 1, got {v!r}")
        _positive("max_concurrent", self.max_concurrent)
        _positive("grace_period", self.grace_period)
        if type(self.max_retries) is not int or self.max_retries < 0:  # bool is an int, not a count
            raise ConfigError(f"max_retries must be an integer >= 0, got {self.max_retries!r}")
        if self.reduction_factor < 2:
            raise ConfigError(f"reduction_factor must be >= 2, got {self.reduction_factor}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        from .recipes import get_recipe

        get_recipe(self.recipe)  # an unknown recipe or setting names the valid ones now
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            raise ConfigError(
                f"cpus_per_trial must be > 0 and gpus_per_trial >= 0, got {self.cpus_per_trial}, {self.gpus_per_trial}"
            )
        if self.runner not in RUNNERS:
            raise UnknownNameError("runner", self.runner, RUNNERS)
        if self.scheduler not in SCHEDULERS:
            raise UnknownNameError("scheduler", self.scheduler, SCHEDULERS)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "config") -> SearchConfig:
        """Strict: unknown keys and wrong types are `ConfigError`s that say what is valid."""
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            norm = str(key).replace("-", "_")
            if norm not in known:
                raise UnknownNameError(f"key in {source}", key, known)
            kwargs[norm] = _coerce(norm, value, cls.__dataclass_fields__[norm].default, source)
        return cls(**kwargs)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    def replace(self, **changes: Any) -> SearchConfig:
        return dataclasses.replace(self, **changes)


def _positive(name: str, value: int, most: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if most is not None and value > most:
        raise ConfigError(f"{name} must be at most {most:,}, got {value:,}")


def _finite(value: Any) -> bool:
    """A real, finite number (not a bool; an int too large for a float is not one)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _coerce(key: str, value: Any, default: Any, source: str) -> Any:
    """Check a value against the field's default type; lists become tuples."""
    if key in ("objectives", "constraints"):
        if isinstance(value, str):
            return tuple(s.strip() for s in value.split(",") if s.strip())
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"{key} in {source} must be a list of strings, got {value!r}")
    if key == "recipe":
        if isinstance(value, str):
            return value
        if isinstance(value, Mapping):
            return dict(value)
        raise ConfigError(f"recipe in {source} must be a name (quick, standard, darts) or a table, got {value!r}")
    if key in ("batch_size", "cv", "inherit_epochs") and value is not None:
        _positive(key, value)
        return value
    if key == "lr" and value is not None:
        if _finite(value):
            return float(value)
        raise ConfigError(f"lr in {source} must be a number, got {value!r}")
    if key in ("space_options", "strategy_options", "joint_options"):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} in {source} must be a table/mapping, got {value!r}")
        return {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
    if default is None:  # optional strings
        if value is None or isinstance(value, str):
            return value
        raise ConfigError(f"{key} in {source} must be a string, got {value!r}")
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} in {source} must be true or false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} in {source} must be an integer, got {value!r}")
    if isinstance(default, float):
        # nan/inf (YAML .nan, JSON 1e999) pass every `<` check and fail later, deep inside
        if _finite(value):
            return float(value)
        raise ConfigError(f"{key} in {source} must be a finite number, got {value!r}")
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} in {source} must be a string, got {value!r}")
    return value


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (.toml), YAML (.yaml/.yml) or JSON (.json) file into a plain mapping."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    text = read_text_file(p)
    try:
        if p.suffix == ".toml":
            data: Any = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif p.suffix == ".json":
            data = json.loads(text)
        else:
            raise UnknownNameError("config file type", p.suffix, [".toml", ".yaml", ".yml", ".json"])
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot parse {p}: {exc}") from None
    except RecursionError:  # a file of thousands of nested brackets: the parsers recurse
        raise ConfigError(f"cannot parse {p}: nested too deeply") from None
    except Exception as exc:
        if type(exc).__module__.startswith("yaml"):
            raise ConfigError(f"cannot parse {p}: {_yaml_problem(exc)}") from None
        raise
    if not isinstance(data, Mapping):
        raise ConfigError(f"{p} must hold a table of settings, got {type(data).__name__}")
    return dict(data)


def read_text_file(path: str | Path) -> str:
    """A settings file's text: UTF-8 (the encoding TOML requires and JSON/YAML files use), or a
    `ConfigError` naming the file (a UTF-16 or latin-1 file, binary bytes, a folder)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {p}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{p} is not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r}); save it as UTF-8"
        ) from None
    return text.removeprefix("\ufeff")  # a UTF-8 byte-order mark (some editors write one) is not a setting


def read_json_file(path: str | Path, what: str = "settings") -> dict[str, Any]:
    """A JSON object from a file the project wrote (a run folder's config.json, compress.json):
    damaged, truncated or edited into something else, it is a `ConfigError` naming the file."""
    p = Path(path)
    text = read_text_file(p)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{p} is damaged (not JSON: {exc}); it should hold the run's {what}") from None
    except RecursionError:
        raise ConfigError(f"{p} is damaged (nested too deeply); it should hold the run's {what}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p} is damaged: it holds a JSON {type(data).__name__}, not the run's {what}")
    return data


def _yaml_problem(exc: Exception) -> str:
    """PyYAML's message on one line: what is wrong, and where (its own text quotes the line
    and draws a caret under it, on three more lines)."""
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None)
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if problem is None:
        return " ".join(str(exc).split())
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{problem}{where}"
