"""Joint architecture x compression search (SimQ-NAS style): a candidate is a pair
(architecture genotype, compression policy), searched together and measured after compression,
in ONNX Runtime, the runtime the model ships in.

Decisions:

* `JointSpace` is one `SearchSpace`: the architecture space's dimensions followed by a few
  compression dimensions (``c_*``) that mean the same on every architecture — a uniform
  structured-pruning ratio, a low-rank parameter target, int8 on/off with its calibration and
  granularity. So every strategy searches pairs unchanged; evolution's mutation changes one
  decision, i.e. either part of the pair. Per-layer policies need a trained model's layer table
  (`compress.policy_space`); they are the job of a policy search on the joint front afterwards.
* A joint trial trains the architecture (reporting every epoch, so ASHA / MO-ASHA can stop it
  early) unless its trained weights are already in the run's ``weights/``: one trained
  architecture is compressed under several policies without training it again (the ``trained``
  metric says which trials paid for training).
* Its row is a compression trial (stage "compress": the architecture, the policy's text, the
  proposal), so `nas-run report`, `nas-run export` and `nas-run compress --run DIR` read a joint
  run like any compressed one, and resume after kill -9 is the search controller's.
* The surrogate sees the architecture's encoding, the policy's one-hot and the statistics
  ``log10`` params / FLOPs before and (estimated) after compression, and estimated bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nas.strategies.base import Strategy
from nas.trial import Candidate, Reporter
from search_spaces import (
    ConfigError,
    Dimension,
    Genotype,
    GenotypeError,
    SearchSpace,
    UnknownNameError,
    get_space,
)

from .controller import COMPRESS_STAGE
from .evaluate import CompressionEvaluator
from .policy import Policy
from .policy_space import CALIBRATIONS, KINDS

if TYPE_CHECKING:
    import torch

    from nas.config import SearchConfig

__all__ = ["JOINT_METRICS", "JointEvaluator", "JointPlan", "JointRows", "JointSpace", "ReuseTrained", "is_joint_trial"]

JOINT_SPACE = "joint"


def is_joint_trial(record: Mapping[str, Any]) -> bool:
    """Whether a store record is a pair of a joint search (not a later `compress --run` trial)."""
    return str(record.get("proposal") or "").startswith(f"{JOINT_SPACE}@")


# what a joint trial reports: the compression metrics, and whether it trained its architecture
JOINT_METRICS = (
    "val_acc", "acc_drop", "onnx_latency_ms", "onnx_latency_rel", "latency_ms", "speedup", "file_bytes", "zip_bytes",
    "size_ratio", "params", "flops", "macs", "sparsity", "base_val_acc", "base_onnx_latency_ms",
    "base_file_bytes", "trained",
)
DEFAULT_OBJECTIVES = ("val_acc", "onnx_latency_ms", "file_bytes")
_INT8 = ("float", "int8")
_GRANULARITIES = ("per_channel", "per_tensor")
_INT8_SETTINGS = ("c_calibration", "c_granularity")


class JointSpace(SearchSpace):
    """Architectures of ``arch_space`` x the compression choices of ``kind`` (`KINDS`)."""

    version = 1
    default_options: Mapping[str, Any] = {
        "arch_space": "unireplk",
        "arch_options": {},  # the architecture space's options, resolved (tiny or full)
        "kind": "prune+int8",
        "prune_ratios": (0.0, 0.3, 0.5),  # the built-in policies' moderate ratios (compress/run.py)
        "rank_targets": (1.0, 0.5, 0.25),  # low-rank: fraction of parameters kept
        "calibrations": ("minmax", "entropy", "percentile-99.99"),
        "granularities": _GRANULARITIES,
        "finetune": {"epochs": 2, "lr": 3e-3, "kd": True},  # after pruning / low rank
        "importance": "l1",
        "round_to": 8,  # channel multiple kept by pruning (see the structured pass)
    }

    def __init__(self, name: str = JOINT_SPACE, **options: Any):
        merged = {**self.default_options, **options}
        # built first: `dimensions` (called by the base class) starts with the architecture's
        self.architectures = get_space(str(merged["arch_space"]), **dict(merged["arch_options"]))
        super().__init__(name, **options)

    @property
    def families(self) -> tuple[str, ...]:
        kind = str(self.options["kind"])
        if kind not in KINDS:
            raise UnknownNameError("joint policy kind (joint_policy)", kind, KINDS)
        return tuple(kind.split("+"))

    def policy_dims(self) -> list[Dimension]:
        fams, o = self.families, self.options
        dims: list[Dimension] = []
        if "prune" in fams:
            dims.append(Dimension("c_prune", _floats("prune_ratios", o["prune_ratios"], 0.0, 0.95)))
        if "lowrank" in fams:
            dims.append(Dimension("c_rank", _floats("rank_targets", o["rank_targets"], 0.01, 1.0)))
        if "int8" in fams:
            for calib in o["calibrations"]:
                if str(calib).split("-")[0] not in {c.split("-")[0] for c in CALIBRATIONS}:
                    raise UnknownNameError("int8 calibration", str(calib), CALIBRATIONS)
            for gran in o["granularities"]:
                if gran not in _GRANULARITIES:
                    raise UnknownNameError("int8 granularity", str(gran), _GRANULARITIES)
            dims += [
                Dimension("c_int8", _INT8),
                Dimension("c_calibration", tuple(o["calibrations"])),
                Dimension("c_granularity", tuple(o["granularities"])),
            ]
        return dims

    def dimensions(self) -> Sequence[Dimension]:
        arch = list(self.architectures.dims)
        self._policy = tuple(self.policy_dims())  # kept: asked on every split of a genotype
        clash = {d.name for d in arch} & {d.name for d in self._policy}
        if clash:
            raise ConfigError(f"architecture space {self.architectures.name!r} has decisions named like the policy's: {sorted(clash)}")
        return arch + list(self._policy)

    @property
    def policy_decisions(self) -> tuple[Dimension, ...]:
        """The compression decisions (``c_*``), after the architecture's."""
        return self._policy

    def _split(self, values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Decisions -> (architecture's, policy's)."""
        names = {d.name for d in self._policy}
        return {k: v for k, v in values.items() if k not in names}, {k: v for k, v in values.items() if k in names}

    # A joint genotype holds the architecture genotype's own fields (whose values are always
    # valid genotype text, unlike some spaces' flat decisions) followed by the policy's.
    def to_dims(self, g: Genotype) -> dict[str, Any]:
        _, pol = self._split(g.as_dict())
        return {**self.architectures.to_dims(self.architecture(g)), **pol}

    def from_dims(self, values: Mapping[str, Any]) -> Genotype:
        arch_values, pol = self._split(values)
        arch = self.architectures.from_dims(arch_values)
        if pol.get("c_int8") == "float":  # canonical: no int8 settings on a float pair
            pol["c_calibration"] = self.options["calibrations"][0]
            pol["c_granularity"] = self.options["granularities"][0]
        return Genotype(self.name, self.version, arch.fields + tuple((d.name, pol[d.name]) for d in self._policy))

    def build(self, g: Genotype, input_shape: Sequence[int], num_classes: int) -> torch.nn.Module:
        return self.architectures.build(self.architecture(g), input_shape, num_classes)

    # -- the pair ------------------------------------------------------------------------------
    def architecture(self, g: Genotype) -> Genotype:
        names = {d.name for d in self._policy}
        arch = tuple((k, v) for k, v in g.fields if k not in names)
        return self.architectures.validate(Genotype(self.architectures.name, self.architectures.version, arch))

    def architecture_text(self, g: Genotype) -> str:
        return self.architecture(g).to_str()

    def policy(self, g: Genotype) -> Policy:
        _, v = self._split(self.to_dims(self.validate(g)))
        o = self.options
        steps: list[tuple[str, dict[str, Any]]] = []
        if float(v.get("c_prune", 0.0)) > 0:
            steps.append(("structured", {"ratio": float(v["c_prune"]), "importance": o["importance"],
                                         "round_to": int(o["round_to"])}))
        if float(v.get("c_rank", 1.0)) < 1.0:
            steps.append(("lowrank", {"target": float(v["c_rank"]), "allocation": "optimal"}))
        ft = dict(o["finetune"])
        if steps and int(ft.get("epochs", 0)) > 0:
            steps.append(("finetune", ft))
        if v.get("c_int8") == "int8":
            calib = str(v["c_calibration"])
            int8: dict[str, Any] = {"format": "qoperator", "calibration": calib.split("-")[0],
                                    "per_channel": v["c_granularity"] == "per_channel"}
            if calib.startswith("percentile-"):
                int8["percentile"] = float(calib.split("-", 1)[1])
            steps.append(("int8", int8))
        return Policy.of(*steps)

    def float_values(self) -> dict[str, Any] | None:
        """The policy decisions of no compression (the trained float model as it ships), or None
        where the configured choices cannot express it (e.g. no pruning ratio 0)."""
        identity = {"c_prune": 0.0, "c_rank": 1.0, "c_int8": "float"}
        values = {d.name: identity.get(d.name, d.choices[0]) for d in self._policy}
        if any(d.name in identity and values[d.name] not in d.choices for d in self._policy):
            return None
        return values

    def policy_variants(self, g: Genotype) -> list[Genotype]:
        """Every distinct pair of ``g``'s architecture (the surrogate's `variants`)."""
        return self.pairs_of(self.architecture(g))

    def pairs_of(self, arch: Genotype) -> list[Genotype]:
        """Every distinct pair of an architecture: each policy the decisions can express."""
        import itertools

        names = [d.name for d in self._policy]
        out: dict[str, Genotype] = {}
        for values in itertools.product(*(d.choices for d in self._policy)):
            pair = self.pair(arch, dict(zip(names, values, strict=True)))
            out.setdefault(pair.to_str(), pair)
        return list(out.values())

    def pair(self, architecture: Genotype, policy_values: Mapping[str, Any]) -> Genotype:
        """The joint genotype of an architecture and policy decisions (``c_*`` values)."""
        return self.validate(self.from_dims({**self.architectures.to_dims(architecture), **policy_values}))

    # -- surrogate features --------------------------------------------------------------------
    @property
    def encoding_size(self) -> int:
        return self.architectures.encoding_size + sum(len(d.choices) for d in self._policy)

    def encode(self, g: Genotype) -> np.ndarray:
        values = self.to_dims(g)
        parts = [self.architectures.encode(self.architecture(g))]
        for d in self._policy:
            onehot = np.zeros(len(d.choices), dtype=np.float32)
            onehot[d.choices.index(values[d.name])] = 1.0
            parts.append(onehot)
        return np.concatenate(parts).astype(np.float32)

    def kept_fractions(self, g: Genotype) -> tuple[float, float, float]:
        """Rough (parameters, FLOPs, bytes per parameter) after the policy: pruning a layer's
        outputs also thins the next layer's inputs (~(1 - r)^2); low rank keeps its target of
        the parameters; int8 stores a byte per weight instead of four."""
        v = self.to_dims(g)
        kept = (1.0 - float(v.get("c_prune", 0.0))) ** 2 * float(v.get("c_rank", 1.0))
        return kept, kept, (1.0 if v.get("c_int8") == "int8" else 4.0)


def _floats(name: str, values: Sequence[Any], low: float, high: float) -> tuple[float, ...]:
    out = tuple(float(v) for v in values)
    if not out or any(not low <= v <= high for v in out) or len(set(out)) != len(out):
        raise ConfigError(f"joint_options.{name}: distinct numbers in [{low}, {high}], got {list(values)}")
    return out


class JointRows:
    """Proposals are joint genotypes; rows are compression trials (architecture, policy text),
    with the joint genotype kept as the row's ``proposal``."""

    stages = (COMPRESS_STAGE,)

    def __init__(self, space: JointSpace):
        self.space = space

    def row(self, proposal: Genotype) -> tuple[str, str, str]:
        arch = self.space.architecture(proposal)
        return arch.to_str(), arch.id, self.space.policy(proposal).to_str()

    def candidate(self, proposal: Genotype, budget: int, number: int) -> Candidate:
        return Candidate(self.space.architecture(proposal), budget, number, self.space.policy(proposal).to_str())

    def proposal(self, record: Mapping[str, Any]) -> Genotype | None:
        text = str(record.get("proposal") or "")
        if record.get("stage") != COMPRESS_STAGE or not text.startswith(f"{self.space.name}@"):
            return None  # a `nas-run compress --run DIR` trial on the joint run's models
        try:
            return self.space.from_str(text)
        except GenotypeError:
            return None


class ReuseTrained(Strategy):
    """Any strategy over a `JointSpace`, made to reuse trained weights: once a pair with a new
    architecture has run, the next asks include ``per_architecture - 1`` other policies on that
    same architecture — compression only, no training. The first is the float pair (no
    compression) unless the architecture's first pair was float already: it costs an export and
    a timing, and it is the architecture's most accurate shippable point — without it the
    accurate end of the front is left to chance (the sequential baseline ships every searched
    architecture's float model; tiny digits runs lost on latency where joint runs lacked them).
    The others are chosen by the inner strategy's `rank` where it has one (the XGBoost surrogate
    predicts which policy suits this architecture), else at random. Everything is told to the
    inner strategy, so it learns from every pair.

    An architecture with a pair on the run's current Pareto front once its follow-ups have run
    gets ``per_architecture - 1`` more (``promote``): the front is made of a few architectures'
    compressed forms, and the sequential baseline wins where it runs every policy on its top
    architectures while a joint run gave each architecture the same few.

    Follow-ups wait until the architecture's first pair has finished (and are dropped if it
    failed): under Ray, two trials of one untrained architecture would both train it."""

    def __init__(self, inner: Strategy, per_architecture: int = 3, promote: bool = True):
        if not isinstance(inner.space, JointSpace):
            raise TypeError("ReuseTrained searches a JointSpace")
        super().__init__(inner.space, inner.n_objectives, inner.seed)
        self.inner, self.per_architecture = inner, max(1, int(per_architecture))
        self.promote = promote
        self.promoted: set[str] = set()  # architectures given more follow-ups (front members)
        self.name = inner.name  # the store's strategy column names the search, not the wrapper
        self.tried: dict[str, int] = {}  # architecture text -> pairs asked on it
        self.ready: list[str] = []  # architectures whose first pair ran: follow-ups may go
        self.told_archs: set[str] = set()

    @property
    def jspace(self) -> JointSpace:
        assert isinstance(self.space, JointSpace)
        return self.space

    def ask(self) -> Genotype:
        while self.ready:
            arch_text = self.ready[0]
            follow = self._follow_up(arch_text)
            if follow is None or self.tried[arch_text] + 1 >= self._cap(arch_text):
                self.ready.pop(0)  # its last follow-up (or none left)
            if follow is not None:
                self.tried[arch_text] += 1
                self.inner.asked.append(follow.to_str())
                self.asked.append(follow.to_str())
                return follow
        g = self.inner.ask()
        arch_text = self.jspace.architecture(g).to_str()
        self.tried[arch_text] = self.tried.get(arch_text, 0) + 1
        self.asked.append(g.to_str())
        return g

    def _follow_up(self, arch_text: str) -> Genotype | None:
        space = self.jspace
        arch = space.architectures.from_str(arch_text)
        asked = set(self.inner.asked)
        options, tried = [], set()
        for g in space.pairs_of(arch):
            if g.to_str() in asked:
                tried.add(self._kind(g))
            else:
                options.append(g)
        if not options:
            return None
        floats = space.float_values()
        if floats is not None and (float_pair := space.pair(arch, floats)) in options:
            return float_pair  # not asked yet on this architecture
        # a follow-up is there to see how the architecture compresses: a new kind (pruning ratio,
        # rank, int8 on/off) first; another calibration of a kind it already ran lands next to
        # that point (the first full-size digits runs spent follow-ups on int8 x calibrations)
        options = [g for g in options if self._kind(g) not in tried] or options
        rank = getattr(self.inner, "rank", None)
        if rank is not None:
            return rank(options)[0]
        return options[int(self.rng.integers(len(options)))]

    def _kind(self, g: Genotype) -> tuple[Any, ...]:
        """The policy's coarse kind: every compression decision but int8's settings."""
        values = self.jspace.to_dims(g)
        return tuple(values[d.name] for d in self.jspace.policy_decisions if d.name not in _INT8_SETTINGS)

    def _cap(self, arch_text: str) -> int:
        """Pairs asked on an architecture at most: ``per_architecture - 1`` more once promoted."""
        return 2 * self.per_architecture - 1 if arch_text in self.promoted else self.per_architecture

    def tell(self, genotype: Genotype, losses: Sequence[float] | None, violation: float = 0.0) -> None:
        self.inner.tell(genotype, losses, violation)
        self.history = self.inner.history
        arch_text = self.jspace.architecture(genotype).to_str()
        self.tried.setdefault(arch_text, 1)
        first = arch_text not in self.told_archs
        self.told_archs.add(arch_text)
        if first and losses is not None and self.tried[arch_text] < self.per_architecture:
            self.ready.append(arch_text)
        elif (self.promote and self.per_architecture > 1 and losses is not None and arch_text not in self.promoted
              and arch_text not in self.ready and self.tried[arch_text] >= self.per_architecture
              and self._on_front(arch_text)):
            self.promoted.add(arch_text)
            self.ready.append(arch_text)

    def _on_front(self, arch_text: str) -> bool:
        """Whether a pair of this architecture is on the front of every finished pair."""
        from nas.pareto import pareto_mask

        done = self.inner.finished()
        losses = np.array([y for _, y, _ in done], dtype=np.float64).reshape(len(done), self.n_objectives)
        feasible = np.array([v <= 0 for _, _, v in done])
        mask = pareto_mask(losses, feasible)
        return any(mask[i] and self.jspace.architecture(g).to_str() == arch_text for i, (g, _, _) in enumerate(done))

    def _propose(self) -> Genotype:  # ask is overridden: never called
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"strategy": self.name, "reuse": {"inner": self.inner.state_dict(), "tried": self.tried,
                "ready": list(self.ready), "told": sorted(self.told_archs), "asked": list(self.asked),
                "promoted": sorted(self.promoted),
                "rng": self.rng.bit_generator.state}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        reuse = state["reuse"]
        self.inner.load_state_dict(reuse["inner"])
        self.history = self.inner.history
        self.tried = {str(k): int(v) for k, v in reuse["tried"].items()}
        self.ready = list(reuse["ready"])
        self.told_archs = set(reuse["told"])
        self.promoted = set(reuse.get("promoted", ()))  # absent in runs from before promotion
        self.asked = list(reuse["asked"])
        self.rng.bit_generator.state = reuse["rng"]


def _no_report(epoch: int, metrics: Mapping[str, float]) -> None:
    return None


@dataclass(frozen=True)
class JointEvaluator:
    """Train (or reuse the trained weights of) the architecture, then compress and measure it."""

    compression: CompressionEvaluator

    def data(self) -> Any:
        return self.compression.data()

    def __call__(self, genotype: Genotype, budget: int, report: Reporter, policy: str = "") -> dict[str, float]:
        trainer = self.compression.trainer()
        path = trainer.weights_path(genotype, budget)
        trained = 0.0
        if path is None or not path.is_file():
            # training reports every epoch (the float model's val_acc): early stopping decides here;
            # the trainer keeps the weights and their artefact
            trainer(genotype, budget, report)
            trained = 1.0
        metrics = self.compression(genotype, budget, _no_report, policy=policy)
        metrics["trained"] = trained
        metrics["epochs"] = float(budget)
        return metrics


class JointPlan:
    """The `nas.search.RunPlan` of a joint run (handed to `run_search` by the CLI)."""

    metrics = JOINT_METRICS

    def space(self, cfg: SearchConfig, architectures: SearchSpace) -> JointSpace:
        options = _options(cfg.joint_options)
        options.pop(PER_ARCHITECTURE, None)
        return JointSpace(arch_space=cfg.space, arch_options=dict(architectures.options), kind=cfg.joint_policy,
                          **options)

    def strategy(self, cfg: SearchConfig, strategy: Strategy) -> Strategy:
        per = cfg.joint_options.get(PER_ARCHITECTURE, DEFAULT_PER_ARCHITECTURE)
        if isinstance(per, bool) or not isinstance(per, int) or per < 1:
            raise ConfigError(f"joint_options.{PER_ARCHITECTURE} must be an integer >= 1, got {per!r}")
        return ReuseTrained(strategy, per) if per > 1 else strategy

    def evaluator(self, cfg: SearchConfig, out: Path, architectures: SearchSpace) -> JointEvaluator:
        from .run import search_run_evaluator

        return JointEvaluator(search_run_evaluator(cfg, out, architectures, cpus_per_trial=cfg.cpus_per_trial))

    def rows(self, space: SearchSpace) -> JointRows:
        assert isinstance(space, JointSpace)
        return JointRows(space)

    def parse(self, cfg: SearchConfig, architectures: SearchSpace) -> Callable[[str], Genotype]:
        from nas.runners.ray_tune import SpaceParser

        return SpaceParser(cfg.space, dict(architectures.options))

    def surrogate_options(self, space: SearchSpace, evaluator: Any) -> dict[str, Any]:
        assert isinstance(space, JointSpace)
        # an architecture is judged by its best predicted policy, not the one it was drawn with
        # (variants); its initial design counts architectures: the first n_init are random, each
        # with its follow-ups (n_init pairs would be ~n_init / per architectures, after which it
        # mutates its best — full-size digits runs spent 5 of 8 architectures on near-copies)
        return {"stats_fn": self._stats_fn(space, evaluator), "variants": space.policy_variants,
                "design_key": space.architecture_text}

    def _stats_fn(self, space: JointSpace, evaluator: Any) -> Callable[[Genotype], np.ndarray]:
        trainer = evaluator.compression.trainer()
        cache: dict[str, tuple[float, float]] = {}

        def stats(g: Genotype) -> np.ndarray:
            arch = space.architecture(g)
            if arch.id not in cache:  # one model build per architecture, not per pair
                m = trainer.static_metrics(arch)
                cache[arch.id] = (float(m["params"]), float(m["flops"]))
            params, flops = cache[arch.id]
            kp, kf, bytes_per = space.kept_fractions(g)
            return np.log10(1.0 + np.array([params, flops, params * kp, flops * kf, params * kp * bytes_per]))

        return stats


# pairs tried per trained architecture (1: every pair trains its own; see `ReuseTrained`)
PER_ARCHITECTURE = "policies_per_architecture"
DEFAULT_PER_ARCHITECTURE = 3
_OPTION_KEYS = (*(k for k in JointSpace.default_options if k not in ("arch_space", "arch_options", "kind")),
                PER_ARCHITECTURE)


def _options(given: Mapping[str, Any]) -> dict[str, Any]:
    unknown = [k for k in given if k not in _OPTION_KEYS]
    if unknown:
        raise UnknownNameError("key in joint_options", unknown[0], _OPTION_KEYS)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}

