"""Run folders for the report tests, made in well under a second: real stores and configs,
fake (deterministic) evaluators, and compression trials written as `nas-run compress` writes
them (stage "compress", the policy's canonical text, the evaluator's metric names)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from nas.config import SearchConfig
from nas.controller import SearchController
from nas.runners.local import run_local
from nas.search import _store_for, open_store
from nas.strategies.base import make_strategy
from nas.trial import Candidate, StopTrial, TrialResult
from search_spaces import Genotype, get_space

# canonical policy texts as `compress.policy.Policy.to_str()` writes them (settings abridged)
STRUCTURED_KD = json.dumps(
    {"passes": [{"pass": "structured", "settings": {"ratio": 0.5, "importance": "l1"}},
                {"pass": "finetune", "settings": {"epochs": 4, "kd": True}}]},
    sort_keys=True, separators=(",", ":"),
)  # fmt: skip
INT8 = json.dumps(
    {"passes": [{"pass": "int8", "settings": {"format": "qoperator"}}]}, sort_keys=True, separators=(",", ":")
)


@dataclass
class FakeEvaluator:
    """Metrics from the genotype's id; every ``fail_every``-th call raises, the one after it is
    stopped early after one epoch (as an early-stopping scheduler would)."""

    fail_every: int = 0
    # every model scores chance (0.1 of ten balanced classes), flagged as training flags it
    at_chance: bool = False
    calls: list[int] = field(default_factory=list)

    def __call__(self, genotype: Genotype, budget: int, report) -> dict[str, float]:
        self.calls.append(1)
        n, h = len(self.calls), int(genotype.id[:8], 16)
        acc = 0.1 + (h % 100) / 10000 if self.at_chance else 0.5 + (h % 4000) / 10000
        if self.fail_every and n % self.fail_every == 0:
            raise RuntimeError("boom: simulated crash")
        for epoch in range(1, budget + 1):
            report(epoch, {"val_acc": acc * epoch / budget, "train_loss": 2.0 / epoch})
            if self.fail_every and n % self.fail_every == 1 and n > 1:
                raise StopTrial()
        params = 1000.0 + h % 90000
        return {"val_acc": acc, "params": params, "flops": params * 30, "macs": params * 15,
                "latency_ms": 0.2 + (h % 977) / 1000, "test_acc": acc - 0.01,
                "chance_acc": 0.1, "at_chance": float(acc <= 0.1 + 0.02)}  # fmt: skip


def fake_run(
    out: Path,
    space: str = "nb201",
    trials: int = 8,
    strategy: str = "random",
    objectives: str = "val_acc,params",
    constraints: tuple[str, ...] = (),
    fail_every: int = 0,
    seed: int = 0,
    at_chance: bool = False,
) -> Path:
    cfg = SearchConfig(space=space, dataset="digits", strategy=strategy, trials=trials, epochs=2, seed=seed,
                       objectives=tuple(objectives.split(",")), constraints=constraints, out=str(out))  # fmt: skip
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(cfg.to_json(), indent=2))
    store = _store_for(cfg, out)  # a new run's store, as run_search makes it (open_store wants study.db)
    sp = get_space(space).tiny()
    strat = make_strategy(strategy, sp, n_objectives=len(store.objectives), seed=seed)
    ctl = SearchController(
        strat, store, budget=2, n_trials=trials, seed=seed, state_path=out / "strategy_state.json"
    )
    run_local(ctl, FakeEvaluator(fail_every, at_chance))
    return out


def add_compression(
    out: Path,
    top: int = 2,
    policies: tuple[str, ...] = (STRUCTURED_KD, INT8),
    fail_one: bool = True,
    drops: tuple[float, ...] = (1.0, 2.0),
) -> int:
    """Compression trials for the ``top`` most accurate architectures; returns how many. Policy k
    loses ``drops[k]`` points; an int8 model's latency_ms is its ONNX Runtime time (it has no
    PyTorch form), the others' a PyTorch time, as `compress.evaluate` records them."""
    store = open_store(out)
    df = store.dataframe()
    best = df[df.status == "complete"].sort_values("val_acc", ascending=False).head(top)
    n = 0
    for _, row in best.iterrows():
        g = Genotype.from_str(row.genotype)
        for k, policy in enumerate(policies):
            number = store.start(g.to_str(), g.id, 1, "compress", 0, policy=policy, stage="compress")
            cand = Candidate(g, 1, number, policy)
            if fail_one and n == 1:
                store.finish(cand, TrialResult("failed", {}, (), "PolicyError: simulated", 0.1))
                n += 1
                continue
            shrink = 0.5 if k == 0 else 0.27
            base_bytes = row.params * 4 + 900
            int8 = policy == INT8
            m = {"val_acc": row.val_acc - drops[k] / 100, "test_acc": row.val_acc - 0.02, "params": row.params * (1 if int8 else 0.5),
                 "flops": row.flops * (1 if int8 else 0.5), "file_bytes": base_bytes * shrink, "zip_bytes": base_bytes * shrink * 0.9,
                 "base_file_bytes": base_bytes, "onnx_latency_ms": 0.01, "base_onnx_latency_ms": 0.15,
                 "latency_ms": 0.01 if int8 else row.latency_ms * 0.6, "speedup": 1.5, "size_ratio": 1 / shrink,
                 "acc_drop": drops[k], "base_val_acc": row.val_acc}  # fmt: skip
            store.finish(
                cand, TrialResult("complete", m, ({"epoch": 1.0, "val_acc": m["val_acc"]},), "", 0.5)
            )
            n += 1
    return n
