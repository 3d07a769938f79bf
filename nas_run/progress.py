"""Progress lines during a search and the closing summary (Pareto front, where things are)."""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["Progress", "constraints_text", "format_metric", "print_front", "print_trials"]


def format_metric(name: str, value: float) -> str:
    if name.endswith("acc"):
        return f"{name}={value:.4f}"
    if name in ("params", "flops", "macs", "activations"):
        for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
            if abs(value) >= div:
                return f"{name}={value / div:.2f}{unit}"
        return f"{name}={value:.0f}"
    if name.endswith("_ms"):  # fixed decimals: "1.00" reads as a latency, "1" looked like a count
        return f"{name}={value:.3f}" if abs(value) < 10 else f"{name}={value:.1f}"
    return f"{name}={value:.3g}"


TRIAL_COLUMNS = (
    "number",
    "status",
    "val_acc",
    "params",
    "latency_ms",
    "gpu",
    "duration_s",
    "error",
    "genotype",
)
COMPRESSED_COLUMNS = ("onnx_latency_ms", "file_bytes", "trained")


def constraints_text(store: Any) -> str:
    """"; constraints: a<=1, b>=2" for a front's heading, "" for a run without any."""
    texts = [str(c) for c in store.constraints]
    return f"; constraints: {', '.join(texts)}" if texts else ""


def print_front(store: Any, stream: Any = None) -> None:
    """A compression run's feasible Pareto front (`RunStore.pareto`: constraint violations as
    recorded), best primary first, with the drop against the float base and the policy by name
    (what `nas-run show` prints for a `compress --model` folder)."""
    out = stream or sys.stdout
    front = store.pareto()
    print(f"Pareto front ({', '.join(str(o) for o in store.objectives)}{constraints_text(store)}):", file=out)
    if front.empty:
        print("  (no completed feasible trial)", file=out)
        return
    wanted = ["number", *(o.metric for o in store.objectives), "acc_drop", "file_bytes", "speedup", "policy"]
    cols = [c for c in dict.fromkeys(wanted) if c in front.columns]
    shown = front[cols].copy()
    if "policy" in shown.columns:
        from compress.policy import Policy

        shown["policy"] = [Policy.from_json(p).label() if isinstance(p, str) and p else "none" for p in shown["policy"]]
    import pandas as pd

    with pd.option_context("display.float_format", "{:.4g}".format, "display.width", 200):
        print(shown.to_string(index=False, max_colwidth=90), file=out)


def print_trials(store: Any, stream: Any = None) -> None:
    """Every trial of a run, one line each (what `nas-run show --all` prints)."""
    df = store.dataframe()
    if df.empty:
        print("(no trials yet)", file=stream or sys.stdout)
        return
    cols = [c for c in TRIAL_COLUMNS if c in df.columns]
    if "stage" in df.columns and df["stage"].eq("compress").any():
        # compression / joint trials: what was measured after compression, and the policy by name
        from compress.policy import Policy

        df = df.assign(policy=[Policy.from_json(p).label() if isinstance(p, str) and p else "none"
                               for p in df.get("policy", [""] * len(df))])
        extra = [c for c in COMPRESSED_COLUMNS if c in df.columns]
        rest = [c for c in cols if c not in extra]
        at = rest.index("val_acc") + 1 if "val_acc" in rest else len(rest)  # next to the accuracy
        cols = rest[:at] + extra + rest[at:] + ["policy"]
    print(df[cols].to_string(index=False, max_colwidth=70), file=stream or sys.stdout)


class Progress:
    def __init__(self, quiet: bool = False, stream: Any = None, joint: bool = False):
        self.quiet = quiet
        # a joint run's trials are compressed pairs: show what was measured after compression
        self.shown = ("val_acc", "onnx_latency_ms", "file_bytes", "trained") if joint else ("val_acc", "params", "latency_ms")
        self.stream = stream or sys.stdout
        self.start = time.perf_counter()
        self.done = 0
        self.best: float | None = None

    def on_result(self, cand: Any, result: Any) -> None:
        self.done += 1
        acc = result.metrics.get("val_acc")
        if result.status == "complete" and acc is not None:
            self.best = acc if self.best is None else max(self.best, acc)
        if self.quiet:
            return
        shown = " ".join(
            format_metric(k, result.metrics[k])
            for k in self.shown
            if k in result.metrics
        )
        err = f" error: {result.error}" if result.error else ""
        best = f" | best val_acc={self.best:.4f}" if self.best is not None else ""
        print(
            f"[{self.done:>3}] trial {cand.number:<3} {result.status:<8} {shown} "
            f"({result.duration_s:.1f}s){err}{best}  [{time.perf_counter() - self.start:.0f}s]",
            file=self.stream,
            flush=True,
        )
        if result.status == "complete" and result.metrics.get("at_chance"):
            print(
                f"      warning: trial {cand.number} is at chance level (val_acc={acc:.4f}, majority class "
                f"{result.metrics.get('chance_acc', float('nan')):.4f}): it learned nothing measurable",
                file=self.stream,
                flush=True,
            )

    def _final_training(self, trained: Any, store: Any) -> None:
        """`nas-run train`'s trials: recipe, epochs and the test accuracy measured once at the end."""
        attrs = {t.number: t.user_attrs for t in store.study.get_trials(deepcopy=False)}
        shown = trained.assign(
            recipe=[(attrs[n].get("recipe") or {}).get("name", "") for n in trained["number"]],
            train_on=[attrs[n].get("train_on", "") for n in trained["number"]],
        )
        cols = [c for c in ("number", "status", "seed", "budget", "recipe", "train_on", "val_acc", "test_acc", "params",
                            "duration_s", "genotype") if c in shown.columns]
        print("final training (nas-run train; budget = epochs):", file=self.stream)
        print(shown[cols].to_string(index=False, max_colwidth=70), file=self.stream)

    def summary(self, run: Any) -> None:
        df = run.store.dataframe()
        if getattr(run.config, "joint", False) and not df.empty:  # its trials are the pairs
            from compress.joint import is_joint_trial

            search = df[[is_joint_trial({"proposal": p}) for p in df["proposal"]]]
        else:
            search = df[df["stage"].isin(["search"]) | df["stage"].isna()] if not df.empty else df
        counts = search["status"].value_counts().to_dict() if not search.empty else {}
        trained = df[df["stage"] == "train"] if not df.empty else df
        compressed = len(df) - len(search) - len(trained)
        front = run.store.pareto()
        cols = [
            c
            for c in ("number", "val_acc", "test_acc", "params", "flops", "latency_ms", "onnx_latency_ms", "file_bytes",
                      "genotype", "policy")
            if c in front.columns and (c != "policy" or front[c].astype(bool).any())
        ]
        extra = f", and {compressed} compression trials" if compressed else ""
        print(
            f"\nrun folder: {run.out}   trials: {counts} (of {run.config.trials} requested){extra}",
            file=self.stream,
        )
        print(f"Pareto front ({', '.join(str(o) for o in run.store.objectives)}{constraints_text(run.store)}):",
              file=self.stream)
        if front.empty:
            print("  (no completed feasible trial)", file=self.stream)
        else:
            shown = front[cols].copy()
            if "policy" in shown.columns:  # (architecture, policy) pairs: the policy's short name
                from compress.policy import Policy

                shown["policy"] = [Policy.from_json(p).label() if p else "" for p in shown["policy"]]
            print(shown.to_string(index=False, max_colwidth=90), file=self.stream)
        if not trained.empty:
            self._final_training(trained, run.store)
        done = search[search["status"] == "complete"] if not search.empty else search
        if "at_chance" in done.columns and len(done):
            stuck = int((done["at_chance"].fillna(0) > 0).sum())
            if stuck > len(done) / 2:  # most candidates learned nothing: the budget, not the architectures
                print(
                    f"warning: {stuck} of {len(done)} trials ended at chance level: too few steps? (batch size, epochs)",
                    file=self.stream,
                )
        from nas.collapse import collapse_warnings, large_drop_warnings

        # compression trials of this run that destroyed their model or lost more than it allows
        for line in collapse_warnings(df) + large_drop_warnings(df):
            print(f"warning: {line}", file=self.stream)
        tables = [run.out / "trials.csv", run.out / "pareto.csv"]
        if all(t.exists() for t in tables):  # written when a search ends (or is interrupted)
            print(f"tables: {tables[0]}, {tables[1]}", file=self.stream)
        if run.config.storage is None:
            print(
                f"dashboard: optuna-dashboard sqlite:///{(run.out / 'study.db').resolve()}", file=self.stream
            )
