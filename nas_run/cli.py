"""The `nas-run` command line: `search`, `train`, `compress`, `report`, `export`, `verify`, `show` and `list`.

User errors (`NasRunError`: a typo in a name, a bad genotype, a broken data set or config) are
printed as one line and exit with code 2, never with a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nas-run", description="Neural architecture search and model compression."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sub.add_parser("list", help="list search spaces (with presets), data sets and strategies")

    s = sub.add_parser(
        "search",
        help="search architectures (no arguments: the embedded default, a few minutes on 2 CPU cores)",
        description="Run a search. Flags override --config; --resume DIR continues a run from its folder.",
    )
    s.add_argument("--config", metavar="FILE", help="TOML or YAML file with any of the settings below")
    s.add_argument("--space", help="search space name (see `nas-run list`)")
    s.add_argument(
        "--full-size", action="store_true", help="use the space's full macro setting, not its tiny one"
    )
    s.add_argument("--dataset", help="data set name, a .npz file or an image folder")
    s.add_argument("--strategy", help="search strategy (see `nas-run list`)")
    s.add_argument("--trials", type=int, help="number of candidates to train")
    s.add_argument("--epochs", type=int, help="training epochs per candidate (the budget)")
    s.add_argument("--objectives", help="comma list, e.g. val_acc,params or val_acc:max,latency_ms:min")
    s.add_argument("--constraint", action="append", help="e.g. params<=1e6 (repeatable)")
    s.add_argument("--runner", help="local (in-process) or ray (Ray Tune trials)")
    s.add_argument("--cpus-per-trial", type=float)
    s.add_argument("--gpus-per-trial", type=float, help="fractions allowed, e.g. 0.5")
    s.add_argument("--max-concurrent", type=int, help="Ray: trials running at once")
    s.add_argument("--ray-address", help="join an existing Ray cluster (started by `ray start --head`)")
    s.add_argument("--scheduler", help="Ray early stopping: auto, asha, mo-asha or none")
    s.add_argument(
        "--max-retries",
        metavar="N",
        help="Ray: run a trial whose worker or node died again up to N times (default 2), then count it failed",
    )  # read as text: a bad N is one error line (exit 2), not argparse's usage screen
    s.add_argument("--recipe", help="how candidates train: quick (default), standard or darts (see README)")
    s.add_argument(
        "--batch-size", type=int, help="training batch (default: the recipe's, 64 for quick); cut on small data "
        "so that an epoch takes at least 8 steps",
    )
    s.add_argument(
        "--val-fraction", type=float, help="share of the labelled data held out for validation (default 0.2)"
    )
    s.add_argument(
        "--cv", type=int, metavar="K", help="cross-validate each trial on K folds of train+val "
        "(default: 5 below 1,000 samples, else 1; 1 turns it off)",
    )
    s.add_argument("--cache-dir", metavar="DIR", help="data cache for image folders / .npz files (default $XDG_CACHE_HOME/nas-run)")
    s.add_argument("--seed", type=int)
    s.add_argument("--out", metavar="DIR", help="run folder (default results/<space>-<dataset>-...)")
    s.add_argument("--storage", help="Optuna storage URL, e.g. postgresql://... (default: SQLite in DIR)")
    s.add_argument("--resume", metavar="DIR", help="continue the run in DIR (optionally with more --trials)")
    s.add_argument("--quiet", action="store_true", help="no per-trial progress lines")
    s.add_argument(
        "--compress",
        action="store_true",
        help="then compress the run's best candidates with the built-in policies (as `nas-run compress --run DIR`)",
    )
    s.add_argument(
        "--joint",
        action="store_true",
        help="search (architecture, compression policy) pairs together, measured after compression "
        "(default objectives val_acc,onnx_latency_ms,file_bytes)",
    )
    s.add_argument(
        "--joint-policy",
        metavar="KIND",
        help="with --joint: the policy families searched: int8, prune, lowrank, prune+int8 (default), lowrank+int8",
    )
    s.add_argument(
        "--inherit",
        action="store_true",
        help="weight inheritance (EAS/Net2Net): a candidate one or two decisions from a trained one starts "
        "from its weights and trains --inherit-epochs",
    )
    s.add_argument(
        "--inherit-epochs", type=int, metavar="N", help="with --inherit: epochs an inheriting candidate trains "
        "(default: a quarter of --epochs, rounded up)",
    )
    s.add_argument("--report", action="store_true", help="then write the run's report (as `nas-run report DIR`)")
    s.add_argument(
        "--export",
        metavar="FORMAT",
        help="then export the best trial to DIR/export/ (as `nas-run export DIR --format FORMAT`)",
    )
    show = sub.add_parser(
        "show",
        help="a run's trials and Pareto front (while it runs, too)",
        description="Print a run folder's summary.",
    )
    show.add_argument("dir", metavar="DIR", help="run folder")
    show.add_argument("--all", action="store_true", help="also list every trial")
    from .compress_cmd import add_compress_parser
    from .export_cmd import add_export_parser
    from .report_cmd import add_report_parser
    from .train_cmd import add_train_parser
    from .verify_cmd import add_verify_parser

    add_train_parser(sub)
    add_compress_parser(sub)
    add_report_parser(sub)
    add_export_parser(sub)
    add_verify_parser(sub)
    return parser


def _show(args: argparse.Namespace) -> int:
    from pathlib import Path
    from types import SimpleNamespace

    from compress.joint import is_joint_trial
    from nas.controller import SEARCH_STAGES, uses_evaluation
    from nas.search import driver_running, open_store, read_config
    from nas_run.progress import Progress, print_trials

    if not (Path(args.dir) / "config.json").is_file() and (Path(args.dir) / "compress.json").is_file():
        return _show_compression(args)
    config, store = read_config(args.dir), open_store(args.dir, read_only=True)
    if args.all:
        print_trials(store)
    Progress().summary(SimpleNamespace(out=Path(args.dir), config=config, store=store))
    if driver_running(args.dir):
        print("a nas-run process is driving this run now")
    else:
        records = store.records()
        counted = sum(
            uses_evaluation(r["status"], str(r["error"] or ""))
            for r in records
            # a joint run's trials are its (architecture, policy) pairs
            if (is_joint_trial(r) if config.joint else r["stage"] in SEARCH_STAGES)
        )
        for hint in _resume_hints(args.dir, records, counted < config.trials, config.joint):
            print(f"not finished and not running: continue it with {hint}")
    return 0


def _resume_hints(run_dir: str, records: Sequence[dict[str, Any]], short: bool, joint: bool) -> list[str]:
    """The command that continues each stage a dead driver left unfinished: "running" rows of a
    run nobody drives are trials it left behind, and each stage resumes its own (a search's
    --resume does not touch a killed compression, nor a killed `train`)."""
    from compress.joint import is_joint_trial

    running = [r for r in records if r["status"] == "running"]
    hints = []
    if short or any(r["stage"] not in ("compress", "train") or (joint and is_joint_trial(r)) for r in running):
        hints.append(f"nas-run search --resume {run_dir}")
    if any(r["stage"] == "compress" and not (joint and is_joint_trial(r)) for r in running):
        hints.append(f"nas-run compress --resume {run_dir}")
    for r in {(r["budget"], str(r["strategy"] or "")): r for r in running if r["stage"] == "train"}.values():
        recipe = str(r["strategy"] or "").removeprefix("train:") or "standard"  # stored as train:<recipe>
        hints.append(f"nas-run train --run {run_dir} --epochs {r['budget']} --recipe {recipe} --resume "
                     "(and the --trial/--genotype, --train-on and --seeds it was started with)")
    return hints


def _show_compression(args: argparse.Namespace) -> int:
    """`show` on a `nas-run compress --model ... --out DIR` folder: its trials and the note to
    resume it when it is not finished."""
    from pathlib import Path
    from types import SimpleNamespace

    from compress.run import read_compress_config, user_study_name
    from nas.objectives import parse_constraints, parse_objectives
    from nas.search import driver_running
    from nas.store import RunStore
    from nas_run.compress_cmd import CompressProgress
    from nas_run.progress import print_front, print_trials
    from search_spaces import ConfigError

    out = Path(args.dir)
    cfg = read_compress_config(out)
    if cfg.run is not None:  # the compression of a search run, whose own config.json is gone
        raise ConfigError(f"{str(out)!r} is a search run folder without its config.json: the run's configuration is lost")
    if not (out / "study.db").is_file():  # read-only: SQLite would make an empty one
        raise ConfigError(f"{str(out)!r} holds no study.db: nothing was compressed there yet")
    store = RunStore(f"sqlite:///{(out / 'study.db').resolve()}", parse_objectives(cfg.objectives),
                     parse_constraints(cfg.constraints), study_name=user_study_name(out), read_only=True)
    if args.all:
        print_trials(store)
    CompressProgress().summary(SimpleNamespace(out=out, table=store.dataframe))
    print_front(store)
    if driver_running(out):
        print("a nas-run process is driving this run now")
    elif any(r["status"] == "running" for r in store.records()):
        print(f"not finished and not running: continue it with nas-run compress --resume {args.dir}")
    return 0


_FLAG_KEYS = (
    "space",
    "dataset",
    "strategy",
    "trials",
    "epochs",
    "objectives",
    "runner",
    "cpus_per_trial",
    "gpus_per_trial",
    "max_concurrent",
    "ray_address",
    "scheduler",
    "seed",
    "out",
    "storage",
    "recipe",
    "cache_dir",
    "batch_size",
    "val_fraction",
    "cv",
    "inherit_epochs",
)


def _search(args: argparse.Namespace) -> int:
    from nas.config import SearchConfig, load_config_file
    from nas.search import run_search

    settings: dict[str, Any] = load_config_file(args.config) if args.config else {}
    for key in _FLAG_KEYS:
        value = getattr(args, key)
        if value is not None:
            settings[key] = value
    if args.max_retries is not None:
        try:
            settings["max_retries"] = int(args.max_retries)
        except ValueError:
            from search_spaces import ConfigError

            raise ConfigError(f"--max-retries must be an integer >= 0, got {args.max_retries!r}") from None
    if args.constraint:
        settings["constraints"] = list(args.constraint)
    if args.full_size:
        settings["tiny"] = False
    if args.joint:
        settings["joint"] = True
    if args.inherit:
        settings["inherit"] = True
    if args.joint_policy is not None:
        settings["joint_policy"] = args.joint_policy
    if settings.get("joint") and "objectives" not in settings and not args.resume:
        from compress.joint import DEFAULT_OBJECTIVES

        settings["objectives"] = list(DEFAULT_OBJECTIVES)
    if args.resume:
        extra = set(settings) - {"trials"}
        if extra:
            from search_spaces import ConfigError

            raise ConfigError(
                f"--resume takes its settings from the run folder; only --trials may change (got {sorted(extra)})"
            )
        config = SearchConfig.from_mapping(settings) if settings else None
    else:
        config = SearchConfig.from_mapping(settings, source=args.config or "flags")

    if args.export is not None:  # a typo must not cost the whole search first
        from export import FORMATS
        from search_spaces import UnknownNameError

        if args.export not in FORMATS:
            raise UnknownNameError("export format", args.export, FORMATS)

    from nas.search import read_config
    from nas_run.progress import Progress

    joint = read_config(args.resume).joint if args.resume else bool(config and config.joint)
    plan = None
    if joint:  # the CLI hands the joint plan in: `nas` never imports `compress`
        from compress.joint import JointPlan

        plan = JointPlan()
    progress = Progress(quiet=args.quiet, joint=joint)
    run = run_search(config, resume=args.resume, on_result=progress.on_result, plan=plan, on_note=print)
    progress.summary(run)
    if args.compress:
        from compress.run import CompressConfig, run_compress
        from nas_run.compress_cmd import CompressProgress

        print(f"\ncompressing the best candidates of {run.out} (nas-run compress --run {run.out})")
        shown = CompressProgress(args.quiet)
        shown.summary(run_compress(CompressConfig(run=str(run.out)), on_result=shown.on_result))
    return _then_report_and_export(args, run.out)


_EXPORT_NAMES = {"onnx": "model.onnx", "onnx-int8": "model-int8.onnx", "torchscript": "model.pt"}


def _then_report_and_export(args: argparse.Namespace, out: Any) -> int:
    """`search --report --export FORMAT`: the same as the two commands on the run folder."""
    from types import SimpleNamespace

    if args.report:
        from .report_cmd import report_command

        print(f"\nreport of {out} (nas-run report {out})")
        report_command(SimpleNamespace(dirs=[str(out)], out=None, top_k=5, no_png=False))
    if args.export is not None:
        from .export_cmd import export_command

        path = out / "export" / _EXPORT_NAMES.get(args.export, f"model.{args.export}")
        print(f"\nexporting the best trial of {out} (nas-run export {out} --format {args.export} --out {path})")
        return export_command(
            SimpleNamespace(dir=str(out), trial=None, policy=None, format=args.export, out=str(path))
        )
    return 0


def _list() -> int:
    from nas.data import list_datasets
    from nas.strategies.base import get_strategy, list_strategies
    from search_spaces import get_space, list_spaces

    print("search spaces:")
    for info in list_spaces():
        preset = f" (preset of {info.preset_of})" if info.preset_of else ""
        print(f"  {info.name:<12} {info.description}{preset}  [{get_space(info.name).describe()}]")
    print("data sets (or a path to a .npz file or an image folder):")
    for name, desc in list_datasets():
        print(f"  {name:<12} {desc}")
    from compress.passes import list_passes

    print("compression passes (for --policy files and `nas-run compress`):")
    for name, desc in list_passes():
        print(f"  {name:<12} {desc}")
    print("strategies (options with defaults, for `strategy_options` in a config file):")
    for name, desc in list_strategies():
        print(f"  {name:<12} {desc}")
        scalar = {k: v for k, v in get_strategy(name).options().items() if isinstance(v, int | float | str)}
        if scalar:
            print(f"  {'':<12}   {', '.join(f'{k}={v}' for k, v in scalar.items())}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from search_spaces import NasRunError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            return _list()
        if args.command == "search":
            return _search(args)
        if args.command == "show":
            return _show(args)
        if args.command == "train":
            from .train_cmd import train_command

            return train_command(args)
        if args.command == "compress":
            from .compress_cmd import compress_command

            return compress_command(args)
        if args.command == "report":
            from .report_cmd import report_command

            return report_command(args)
        if args.command == "verify":
            from .verify_cmd import verify_command

            return verify_command(args)
        if args.command == "export":
            from .export_cmd import export_command

            return export_command(args)
        parser.print_help()
        return 2
    except NasRunError as exc:
        print(f"nas-run: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `nas-run show DIR | head`: the reader left; nothing to report
        sys.stderr.close()
        return 0
    except KeyboardInterrupt as exc:
        # the stages that can be continued raise with their own command (`nas-run train` needs
        # its flags again); anything else stopped before a run existed or only read one
        how = f"; finished trials are saved; continue with: {exc}" if str(exc) else ""
        print(f"nas-run: interrupted{how}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
