"""`nas-run export`: one trial of a run as ONNX / int8 ONNX / TorchScript / safetensors, loaded
back and checked (see `compress.export`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["add_export_parser", "export_command"]


def add_export_parser(sub: Any) -> None:
    from compress.export_formats import FORMATS

    e = sub.add_parser(
        "export",
        help="export a trial as ONNX, int8 ONNX, TorchScript or safetensors (loaded back and checked)",
        description=(
            "Export one trial of a run folder in its deploy form (re-parameterisation branches merged, "
            "BatchNorm folded), with its genotype, policy, metrics and input spec. The file is loaded back "
            "in its runtime and checked against the trial's model before it is written; the check is "
            "recorded in the run's store."
        ),
    )
    e.add_argument("dir", metavar="DIR", help="run folder (a search run, or a --model compression run)")
    e.add_argument("--trial", type=int, metavar="N",
                   help="trial number as `nas-run show` prints it (default: the best on the primary objective)")
    e.add_argument("--policy", metavar="ID|LABEL",
                   help="a compressed variant of that trial: policy id (8 hex) or a piece of its label, e.g. structured")
    e.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    e.add_argument("--out", required=True, metavar="PATH", help="the file to write (safetensors also writes PATH.json)")


def export_command(args: argparse.Namespace) -> int:
    from compress.export import export_trial
    from compress.export_formats import ExportCheckError, sidecar_path

    try:
        r = export_trial(args.dir, trial=args.trial, format=args.format, out=args.out, policy=args.policy)
    except ExportCheckError as exc:
        print(f"nas-run: error: {exc}", file=sys.stderr)
        return 1  # the export itself is wrong, not the user's input
    opset = f", opset {r.opset}, dynamic batch axis" if r.opset is not None else ""
    print(f"exported trial {r.trial} as {r.format}{opset}: {r.path}")
    if r.format == "safetensors":
        print(f"  sidecar: {sidecar_path(r.path)} (load with compress.load_model(path))")
    print(f"  genotype: {r.genotype}")
    print(f"  policy:   {r.policy_label}")
    print(f"  check:    passed: {r.check['summary']}")
    for note in r.notes:
        print(f"  note:     {note}")
    print(f"  recorded in the store of {args.dir} (study attribute exports:{r.trial})")
    return 0
