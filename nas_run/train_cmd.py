"""`nas-run train`: train a run's chosen architecture from scratch with a full recipe (see
`nas.final_training`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["add_train_parser", "train_command"]


def add_train_parser(sub: Any) -> None:
    t = sub.add_parser(
        "train",
        help="train a run's chosen architecture from scratch with a full recipe (the final model)",
        description=(
            "Train the run's best feasible architecture (or --trial N / --genotype G) from scratch for "
            "--epochs with a recipe (quick, standard, darts). Checkpoints every epoch; --resume continues "
            "after a crash or kill -9. Recorded in the run's store (stage train); `compress --run` and "
            "`export` then use these weights."
        ),
    )
    t.add_argument("--run", required=True, metavar="DIR", help="a search run folder")
    t.add_argument("--trial", metavar="N", help="the trial whose architecture to train (default: the run's best)")
    t.add_argument("--genotype", metavar="G", help="an architecture of the run's space, as a genotype string")
    t.add_argument("--epochs", required=True, metavar="E", help="training epochs")
    t.add_argument("--recipe", default="standard", help="quick, standard (default) or darts")
    t.add_argument("--train-on", default="train", help="train (default) or trainval (validation rows too)")
    t.add_argument("--seeds", default="1", metavar="K", help="train K seeds (0..K-1), one trial each (default 1)")
    t.add_argument("--resume", action="store_true", help="continue an interrupted train from its last checkpoint")
    t.add_argument("--cache-dir", metavar="DIR", help="data cache folder (default $XDG_CACHE_HOME/nas-run)")
    t.add_argument("--runner", default="local", help="local (default) or ray: the seeds train at once as Ray tasks")
    t.add_argument("--cpus-per-trial", type=float, default=1.0, help="Ray: CPUs per seed")
    t.add_argument("--gpus-per-trial", type=float, default=0.0, help="Ray: GPUs per seed (fractions allowed)")
    t.add_argument("--ray-address", help="join an existing Ray cluster (`auto` for `ray start --head` here)")
    t.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu or cuda[:N]")
    t.add_argument("--threads", metavar="N", help="torch threads (default: the run's cpus_per_trial)")


def _int(flag: str, text: str | None, low: int) -> int | None:
    from search_spaces import ConfigError

    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{flag} must be an integer, got {text!r}") from None
    if value < low:
        raise ConfigError(f"{flag} must be >= {low}, got {value}")
    return value


def train_command(args: argparse.Namespace) -> int:
    from nas_run.progress import format_metric

    def on_epoch(seed: int, epoch: int, m: dict[str, float]) -> None:
        print(
            f"seed {seed} epoch {epoch:3d}/{epochs}  {format_metric('val_acc', m['val_acc'])} "
            f"train_loss={m['train_loss']:.4f} lr={m['lr']:.2e}  {m['images_per_s']:.0f} img/s  "
            f"{m['epoch_s']:.1f} s  peak RSS {m['peak_rss_mb']:.0f} MiB",
            flush=True,
        )

    epochs = _int("--epochs", args.epochs, 1)
    seeds = _int("--seeds", args.seeds, 1)
    try:
        results = _train(args, epochs, seeds, on_epoch)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(resume_command(args)) from None
    for r in results:
        resumed = f" (resumed at epoch {r.resumed_from})" if r.resumed_from else ""
        m = r.metrics
        print(
            f"trial {r.number}: seed {r.seed} trained{resumed}: val_acc={m['val_acc']:.4f} "
            f"test_acc={m['test_acc']:.4f} params={m['params']:.0f}  weights {r.weights}"
        )
    print(f"final weights of {results[0].genotype}: {args.run}/trained/ (used by `nas-run compress --run` and `export`)")
    return 0


def _train(args: argparse.Namespace, epochs: int | None, seeds: int | None, on_epoch: Any) -> Any:
    from nas.final_training import train_final

    return train_final(
        args.run, epochs=epochs, recipe=args.recipe, trial=_int("--trial", args.trial, 0), genotype=args.genotype,
        train_on=args.train_on, seeds=list(range(seeds or 1)), resume=args.resume, cache_dir=args.cache_dir,
        progress=sys.stderr.isatty(), on_epoch=on_epoch, device=args.device, threads=_int("--threads", args.threads, 1),
        runner=args.runner, cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
        ray_address=args.ray_address,
    )  # fmt: skip


def resume_command(args: argparse.Namespace) -> str:
    """The command that continues this train: its own flags (they name its checkpoint), plus --resume."""
    import shlex

    parts = ["nas-run", "train", "--run", args.run, "--epochs", args.epochs]
    for flag, value, default in (("--recipe", args.recipe, "standard"), ("--trial", args.trial, None),
                                 ("--genotype", args.genotype, None), ("--train-on", args.train_on, "train"),
                                 ("--seeds", args.seeds, "1"), ("--cache-dir", args.cache_dir, None)):
        if value is not None and value != default:
            parts += [flag, str(value)]
    return shlex.join([*parts, "--resume"])

