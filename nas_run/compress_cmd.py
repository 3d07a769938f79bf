"""`nas-run compress`: flags -> `CompressConfig`, progress lines and the final table."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

__all__ = ["add_compress_parser", "compress_command"]


def add_compress_parser(sub: Any) -> None:
    c = sub.add_parser(
        "compress",
        help="compress a run's best candidates or your own model (pruning, low-rank, int8)",
        description=(
            "Compress the Pareto candidates of a search run (--run DIR) or your own model (--model SPEC). "
            "Without pass flags or --policy, a built-in set of policies is tried. Each (model, policy) "
            "pair is a trial: compressed, fine-tuned, exported and measured in ONNX Runtime."
        ),
    )
    src = c.add_argument_group("what to compress")
    src.add_argument("--run", metavar="DIR", help="a search run folder: compress its Pareto candidates")
    src.add_argument("--top-k", type=int, help="how many of the run's front (best primary objective first); default 3")
    src.add_argument("--model", metavar="SPEC", help="a TorchScript file, or package.module:callable building the model")
    src.add_argument("--weights", metavar="FILE", help="state dict for --model's builder (.pt/.pth/.safetensors)")
    src.add_argument("--dataset", help="--model: data set name, .npz file or image folder")
    src.add_argument("--standardize", action="store_true", help="--model: standardise the data (default: as stored)")
    src.add_argument("--layout", choices=("NL", "NCL", "NLC", "NHW", "NCHW", "NHWC"),
                     help="--model: the axes of the data's x; turns it channel-first (default: fed as stored)")
    src.add_argument("--out", metavar="DIR", help="--model: folder for the results and compressed models")
    src.add_argument("--loss", metavar="NAME",
                     help="--model: fine-tuning loss: ce, bce (multi-label/sigmoid), mse, l1, or "
                     "package.module:function (default: from the labels: ce, bce for (N, K) rows, mse for floats)")
    src.add_argument("--metric", metavar="NAME",
                     help="--model: what val_acc measures: accuracy, top5, within1, mae, mse, or "
                     "package.module:function (default: accuracy, mae for mse/l1)")
    pol = c.add_argument_group("policy (flags chain into one policy; default: the built-in set)")
    pol.add_argument("--prune", type=float, metavar="RATIO", help="structured channel pruning, e.g. 0.5")
    pol.add_argument("--importance", default="l1", help="structured pruning criterion: l1, l2, taylor, bn_scale")
    pol.add_argument("--sparsity", type=float, help="unstructured magnitude pruning, e.g. 0.8")
    pol.add_argument("--lowrank", metavar="TARGET", help="low-rank SVD: '2x' (2x fewer parameters) or a kept fraction")
    pol.add_argument("--int8", action="store_true", help="ONNX Runtime post-training int8 (last)")
    pol.add_argument("--kd", action="store_true", help="fine-tune by distillation from the uncompressed model")
    pol.add_argument("--finetune-epochs", type=int, help="fine-tuning epochs after pruning/low-rank (default 8)")
    pol.add_argument("--finetune-lr", type=float, help="fine-tuning learning rate (default 3e-3)")
    pol.add_argument("--policy", action="append", metavar="FILE", help="a policy file (JSON/TOML/YAML), repeatable")
    pol.add_argument("--nni-config", metavar="FILE", help="an NNI pruning config_list (JSON/YAML/TOML) as one more policy")
    srch = c.add_argument_group("policy search (instead of a fixed list of policies)")
    srch.add_argument("--search", metavar="STRATEGY",
                      help="search per-layer policies: surrogate (XGBoost-guided), random, grid, genetic, tpe, nsga2")
    srch.add_argument("--budget", type=int, help="policy evaluations per model (default 20)")
    srch.add_argument("--policy-space", metavar="KIND",
                      help="what is searched: int8, prune, lowrank, prune+int8 (default), lowrank+int8, "
                      "depth+prune (drop residual blocks, then prune channels), depth+prune+int8")
    srch.add_argument("--search-seed", type=int, help="the strategy's seed (default --seed, which also splits the data)")
    srch.add_argument("--constraint", action="append", metavar="EXPR",
                      help="e.g. 'acc_drop<=0.5' (points), 'onnx_latency_ms<=1'; repeatable")
    c.add_argument("--objectives", help="comma list of compression metrics (default val_acc,onnx_latency_ms); "
                   "with --run only for --search (a fixed list uses the run's own)")
    c.add_argument("--runner", help="local (default) or ray")
    c.add_argument("--cpus-per-trial", type=float)
    c.add_argument("--gpus-per-trial", type=float)
    c.add_argument("--max-concurrent", type=int)
    c.add_argument("--max-retries", type=int, help="Ray: re-runs of a trial whose worker or node died (default 2)")
    c.add_argument("--ray-address")
    c.add_argument("--seed", type=int)
    c.add_argument("--calib-size", type=int, help="calibration samples held out of the training split")
    c.add_argument("--resume", metavar="DIR", help="continue the compression run in DIR")
    c.add_argument("--quiet", action="store_true")


def _lowrank_target(text: str | None) -> float | None:
    from search_spaces import ConfigError

    if text is None:
        return None
    t = text.strip().lower()
    try:
        value = 1.0 / float(t[:-1]) if t.endswith("x") else float(t)
    except (ValueError, ZeroDivisionError):
        value = -1.0
    if not 0 < value <= 1:
        raise ConfigError(f"--lowrank takes '2x' (2x fewer parameters) or a kept fraction in (0, 1], got {text!r}")
    return value


def compress_command(args: argparse.Namespace) -> int:
    from compress.policy import load_policy_file
    from compress.run import compress_config, policy_from_flags, run_compress
    from search_spaces import ConfigError

    if args.resume:
        flags = ("run", "model", "prune", "sparsity", "lowrank", "policy", "nni_config", "search", "budget",
                 "policy_space", "constraint", "search_seed", "layout", "loss", "metric")
        given = [k for k in flags if getattr(args, k) is not None]
        if given or args.int8:
            raise ConfigError(f"--resume takes its settings from {args.resume}/compress.json; drop {given or ['--int8']}")
    # any other setting given with --resume is checked against the stored one (`resume_config`)
    settings: dict[str, Any] = {}
    for key in ("run", "model", "weights", "dataset", "out", "top_k", "runner", "cpus_per_trial",
                "gpus_per_trial", "max_concurrent", "max_retries", "ray_address", "seed", "calib_size", "finetune_epochs",
                "finetune_lr", "nni_config", "search", "budget", "policy_space", "search_seed", "layout", "loss", "metric"):
        value = getattr(args, key)
        if value is not None:
            settings[key] = value
    if args.standardize:
        settings["standardize"] = True
    if args.constraint:
        settings["constraints"] = tuple(args.constraint)
    if args.objectives:
        if args.run and not args.search:
            raise ConfigError("--objectives goes with --model or --search; a run's fixed-list compression trials "
                              "use the run's objectives")
        settings["objectives"] = tuple(s.strip() for s in args.objectives.split(",") if s.strip())
    epochs = args.finetune_epochs if args.finetune_epochs is not None else 8
    lr = args.finetune_lr if args.finetune_lr is not None else 3e-3
    for name, value in (("--prune", args.prune), ("--sparsity", args.sparsity)):
        if value is not None and not 0 <= value < 1:
            raise ConfigError(f"{name} is a fraction in [0, 1), got {value}")
    flags = policy_from_flags(
        prune=args.prune,
        sparsity=args.sparsity,
        lowrank=_lowrank_target(args.lowrank),
        int8=args.int8,
        kd=args.kd,
        finetune_epochs=epochs,
        importance=args.importance,
        finetune_lr=lr,
    )
    policies = [load_policy_file(p) for p in args.policy or ()]
    if flags is not None:
        policies.append(flags)
    if policies:
        settings["policies"] = tuple(p.to_str() for p in policies)
    config = compress_config(settings, resume=args.resume, source="flags")
    progress = CompressProgress(args.quiet)
    run = run_compress(config, resume=args.resume, on_result=progress.on_result)
    progress.summary(run)
    return 0


class CompressProgress:
    def __init__(self, quiet: bool = False):
        self.quiet, self.start, self.done = quiet, time.perf_counter(), 0

    def on_result(self, cand: Any, result: Any) -> None:
        from compress.policy import Policy
        from report.units import human

        self.done += 1
        if self.quiet:
            return
        m = result.metrics
        label = Policy.from_json(cand.policy).label()
        if result.status == "complete":
            text = (
                f"val_acc={m['val_acc']:.4f} (drop {m['acc_drop']:+.2f} pts) file={human(m['file_bytes'], 'file_bytes')} "
                f"ort={m['onnx_latency_ms']:.3f}ms speedup={m['speedup']:.2f}x"
            )
            if "params" in m:
                text += f" params={m['params']:.0f}"
            # --metric other than accuracy: val_acc is its higher-is-better form; show the plain value too
            for key in (k for k in m if k.startswith("val_") and f"base_{k}" in m and k != "val_acc"):
                text += f" {key}={m[key]:.4g}"
        else:
            text = result.error
        print(
            f"[{self.done:3d}] trial {cand.number:<3d} {result.status:<8} {cand.genotype.id[:8]} {label}: {text} "
            f"({result.duration_s:.1f}s)  [{time.perf_counter() - self.start:.0f}s]",
            flush=True,
        )
        if result.status == "complete":
            from nas.collapse import collapse_message, large_drop_message

            # a destroyed model, or one losing more than the run allows, is said where it happens
            warning = collapse_message(m) or large_drop_message(m)
            if warning:
                print(f"      warning: trial {cand.number} {warning}", flush=True)

    def summary(self, run: Any) -> None:
        df = run.table()
        out = sys.stdout
        if df.empty:
            print("no compression trials", file=out)
            return
        from compress.policy import Policy
        from report.units import human, label

        df = df.copy()
        df["policy_text"] = df["policy"]
        df["policy"] = [Policy.from_json(p).label() for p in df["policy"]]
        df["arch"] = [str(g)[:8] for g in df["genotype_id"]]
        # the constraints the trials were judged against (a policy search's --constraint), if any
        judged = sorted({c for text in df.get("constraints", []) if isinstance(text, str) for c in text.split(",") if c})
        cols = [c for c in ("number", "status", "arch", "val_acc", "acc_drop", "params", "file_bytes",
                            "zip_bytes", "onnx_latency_ms", "speedup", "size_ratio", "violation", "policy")
                if c in df.columns and (c != "violation" or judged)]
        shown = df.copy()  # human units on the console; compress.csv keeps the numbers
        for c in ("params", "file_bytes", "zip_bytes"):
            if c in shown.columns:
                shown[c] = [human(v, c) for v in shown[c]]
        shown = shown.rename(columns={"acc_drop": label("acc_drop")})
        cols = [label("acc_drop") if c == "acc_drop" else c for c in cols]
        print(f"\ncompression: {run.out}   trials: {df['status'].value_counts().to_dict()}", file=out)
        if judged:  # what the violation column was judged against (> 0: broken)
            print(f"constraints: {', '.join(judged)} (violation > 0: broken)", file=out)
        with_pd_options(lambda: print(shown[cols].to_string(index=False, max_colwidth=60), file=out))
        for note in _notes(run.out, df):
            if not note.startswith(("collapsed:", "large drop:")):  # said per trial below
                print(f"note: {note}", file=out)
        from nas.collapse import collapse_warnings, large_drop_warnings

        for line in collapse_warnings(df) + large_drop_warnings(df):
            print(f"warning: {line}", file=out)
        if (df.get("sparsity") is not None) and (df["sparsity"].fillna(0) > 0.05).any():
            print(
                "note: unstructured sparsity shrinks the compressed file (zip_bytes) but gives no "
                "speed-up in a dense runtime (ONNX Runtime, PyTorch)",
                file=out,
            )
        print(f"table: {run.out / 'compress.csv'}   compressed models: {run.out / 'compressed'}/", file=out)


def _notes(out: Any, df: Any) -> list[str]:
    """The passes' remarks (layers left unpruned, settings that did less than asked), from the
    kept artefacts of the trials shown, each once."""
    import json

    from compress.evaluate import artefact_dir
    from compress.policy import Policy
    from search_spaces import Genotype

    seen: list[str] = []
    for genotype, policy in zip(df["genotype"], df["policy_text"], strict=True):
        path = artefact_dir(out / "compressed", Genotype.from_str(genotype), Policy.from_json(policy)) / "policy.json"
        if path.is_file():
            for note in json.loads(path.read_text()).get("notes", []):
                if note not in seen and "no dense-runtime speed-up" not in note:
                    seen.append(note)
    return seen


def with_pd_options(fn: Any) -> None:
    import pandas as pd

    with pd.option_context("display.float_format", "{:.4g}".format, "display.width", 200):
        fn()
