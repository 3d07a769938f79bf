"""`nas-run export`: one trial of a run as ONNX / int8 ONNX / TorchScript / safetensors, loaded
back and checked (see the `export` package)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["add_export_parser", "export_command"]


def add_export_parser(sub: Any) -> None:
    from export import FORMATS

    e = sub.add_parser(
        "export",
        help="export a trial as ONNX, int8 ONNX, pt2 (torch.export), TorchScript (older runtimes) or safetensors, loaded back and checked",
        description=(
            "Export one trial of a run folder in its deploy form (re-parameterisation branches merged, "
            "BatchNorm folded), with its genotype, policy, metrics and input spec. The file is loaded back "
            "in its runtime and checked against the trial's model before it is written; the check is "
            "recorded in the run's store."
        ),
    )
    e.add_argument("dir", metavar="DIR", help="run folder (a search run, or a --model compression run)")
    e.add_argument("--trial", type=int, metavar="N",
                   help="trial number as `nas-run show` prints it (default: what --pick picks)")
    e.add_argument("--pick", metavar="RULE",
                   help="how to choose the trial without --trial, among architectures and compressed trials that "
                   "meet the run's constraints: 'best' (default: the run's objectives in order), 'min METRIC', "
                   "'max METRIC' or 'knee', optionally with 'where METRIC<=X, ...', "
                   "e.g. 'min onnx_latency_ms where acc_drop<=0.5'")
    e.add_argument("--strict", action="store_true",
                   help="refuse (exit 2, nothing written) when the exported model's accuracy is further below its "
                   "float base than the run's acc_drop constraint (default 1 point) allows; without it, a warning")
    e.add_argument("--policy", metavar="ID|LABEL",
                   help="a compressed variant of that trial: its policy id (8 hex), its label as `show` or the report "
                   "prints it, or its passes joined by + (e.g. structured+finetune+int8)")
    e.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    e.add_argument("--out", required=True, metavar="PATH", help="the file to write (safetensors also writes PATH.json)")


def export_command(args: argparse.Namespace) -> int:
    from export.formats import ExportCheckError, sidecar_path
    from export.trial import export_trial

    try:
        # getattr: `search --export` calls this with the flags it has
        r = export_trial(args.dir, trial=args.trial, format=args.format, out=args.out, policy=args.policy,
                         pick=getattr(args, "pick", None), strict=getattr(args, "strict", False))
    except ExportCheckError as exc:
        print(f"nas-run: error: {exc}", file=sys.stderr)
        return 1  # the export itself is wrong, not the user's input
    opset = f", opset {r.opset}, dynamic batch axis" if r.opset is not None else ""
    if r.picked:
        print(r.picked)
    print(f"exported trial {r.trial} as {r.format}{opset}: {r.path}")
    if r.format == "safetensors":
        print(f"  sidecar: {sidecar_path(r.path)} (load with export.load_model(path))")
    print(f"  genotype: {r.genotype}")
    print(f"  policy:   {r.policy_label}")
    print(f"  check:    passed: {r.check['summary']}")
    print(f"  accuracy: {r.against_base['line']}")
    for note in r.notes:
        print(f"  note:     {note}")
    print(f"  recorded in the store of {args.dir} (study attribute exports:{r.trial})")
    if r.warning:
        print(f"warning: {r.warning} (--strict refuses such an export)")
    return 0
