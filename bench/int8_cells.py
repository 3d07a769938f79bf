"""int8 on cell models (#19 item 4): how many points does the int8 pass's default lose on DARTS
cell networks, why, and what does the new default (``float_ops`` with ``"shared_relu"``) lose?

Per model: trained here with the product's own trainer (`nas.training.TrainingEvaluator`, the
``quick`` recipe), then the int8 pass with the old default (``float_ops = ["gelu"]``, what
``int8`` meant before) and the new one, each calibrated on the calibration rows of the training
split (`PassContext`), scored on the validation split in ONNX Runtime. The float model is its
own ONNX export, scored and timed the same way. Models:

- DARTS-V2 (`darts_genotypes`) in the darts space's tiny setting (C=8, one normal cell per
  stage) and its default one (C=16, two per stage) on digits (8x8), and tiny on mnist5k (28x28);
- three genotypes sampled from the darts space (rng seeds 0-2), tiny, on digits;
- controls that are no cell networks: the ResNet-style CNN of bench/compress.py on mnist5k and a
  large-kernel (unireplk) model on mnist1d (merged first, as the compression stage does): their
  int8 file should be byte-identical under both defaults.

Then the diagnosis on DARTS-V2 (mnist5k): with the old default's ranges, every node of one op
type kept in float at a time (which type, left in float, gives the accuracy back?).

Latency: ORT CPU, 1 intra-op thread, batch 1, in interleaved rounds (float, old, new of one model
per round, shuffled), median of the per-round medians.

Run from the repository root::

    python bench/int8_cells.py                 # writes results/int8_cells.md (~8 min on 2 cores)
    python bench/int8_cells.py --quick         # fewer epochs and models, to try the bench
"""

from __future__ import annotations

import argparse
import collections
import datetime
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

OLD_DEFAULT = {"float_ops": ["gelu"]}  # the int8 pass's default before #19 item 4
LARGE_KERNEL = "unireplk@1|s0=(2,128,13,0,1,4)|s1=(3,24,3,1,0,3)|s2=(1,32,11,0,0,2)|s3=(1,16,3,1,1,3)"  # searched #2


@dataclass
class Trained:
    name: str
    dataset: str
    genotype: str
    model: Any
    data: Any
    epochs: int
    train_s: float
    merge: bool = False  # re-parameterise first (large-kernel), as the compression stage does


@dataclass
class Row:
    name: str
    dataset: str
    genotype: str
    params: int
    epochs: int
    train_s: float
    float_acc: float = 0.0
    accs: dict[str, float] = field(default_factory=dict)  # variant -> val acc in ORT
    sizes: dict[str, int] = field(default_factory=dict)  # variant -> bytes
    latency: dict[str, float] = field(default_factory=dict)  # variant -> ms, batch 1
    kept_float: list[str] = field(default_factory=list)  # ONNX nodes the new default keeps float
    identical: bool = False  # old and new int8 files are the same bytes


# -- models ---------------------------------------------------------------------------------------
def train_space(space: str, genotype: Any, options: dict[str, Any], dataset: str, epochs: int) -> tuple[Any, Any, float]:
    """(trained eval-mode model, its data, seconds) through the search's own trainer."""
    from nas.training import TrainingEvaluator

    ev = TrainingEvaluator(space=space, space_options=options, dataset=dataset, recipe="quick", measure_latency=False)
    start = time.perf_counter()
    model, _, _ = ev.train_model(genotype, epochs)
    return model.cpu().eval(), ev.data(), time.perf_counter() - start


def train_resnet(work: Path, epochs: int) -> tuple[Any, Any, float]:
    """bench/compress.py's ResNet-style CNN on mnist5k as stored ([0, 1], not standardised)."""
    from safetensors.torch import load_file

    from bench.compress import train_cnn
    from bench.resnet_cnn import resnet_cnn
    from nas.data import load_dataset

    path = work / "resnet_cnn.safetensors"
    start = time.perf_counter()
    train_cnn(path, epochs)
    seconds = time.perf_counter() - start
    data = load_dataset("mnist5k", seed=0, standardize=False)
    model = resnet_cnn(data.num_classes, data.input_shape)
    model.load_state_dict(load_file(str(path)))
    return model.eval(), data, seconds


def models(quick: bool, work: Path) -> list[Trained]:
    """The cell networks, then the controls, trained."""
    from search_spaces import get_space
    from search_spaces.darts_genotypes import named_genotype

    tiny = dict(get_space("darts").tiny_options)
    e_digits, e_5k = (6, 2) if quick else (20, 6)
    out: list[Trained] = []

    def darts(name: str, options: dict[str, Any], dataset: str, epochs: int, g: Any = None) -> None:
        space = get_space("darts", **options)
        g = g if g is not None else named_genotype("DARTS_V2", space)
        print(f"training {name} on {dataset} ({epochs} epochs) ...", flush=True)
        model, data, s = train_space("darts", g, options, dataset, epochs)
        out.append(Trained(name, dataset, str(g), model, data, epochs, s))

    darts("DARTS-V2 tiny", tiny, "digits", e_digits)
    if not quick:
        darts("DARTS-V2 C=16 N=2", {}, "digits", e_digits)
    darts("DARTS-V2 tiny", tiny, "mnist5k", e_5k)
    space = get_space("darts", **tiny)
    for seed in range(1 if quick else 3):
        darts(f"sampled darts #{seed}", tiny, "digits", e_digits, space.sample(np.random.default_rng(seed)))
    print("training the ResNet CNN on mnist5k ...", flush=True)
    e_cnn = 2 if quick else 4
    model, data, s = train_resnet(work, e_cnn)
    out.append(Trained("ResNet CNN (control)", "mnist5k", "bench/resnet_cnn.py", model, data, e_cnn, s))
    if not quick:
        lk = get_space("unireplk")
        print("training the large-kernel model on mnist1d ...", flush=True)
        model, data, s = train_space("unireplk", lk.from_str(LARGE_KERNEL), {}, "mnist1d", 8)
        out.append(Trained("large-kernel #2 (control)", "mnist1d", LARGE_KERNEL, model, data, 8, s, merge=True))
    return out


# -- measurements ---------------------------------------------------------------------------------
def quantize(model: Any, data: Any, settings: dict[str, Any], merge: bool) -> tuple[bytes, dict[str, Any]]:
    from compress.passes.base import PassContext
    from compress.policy import Policy

    steps: list[Any] = (["merge"] if merge else []) + [("int8", settings)]
    done = Policy.of(*steps).apply(model, PassContext(data, seed=0))
    return done.model.model_bytes, done.records[-1]


def float_onnx(model: Any, data: Any, merge: bool) -> bytes:
    import copy

    from compress.passes.base import PassContext, get_pass
    from compress.passes.int8 import export_float_onnx

    if merge:
        model, _ = get_pass("merge").apply(copy.deepcopy(model), {}, PassContext(data))
    return export_float_onnx(model, data.input_shape)


VARIANTS = ("float", "old", "new")


def time_rounds(
    files: dict[tuple[str, str], bytes], shapes: dict[str, tuple[int, ...]], rounds: int
) -> dict[str, dict[str, float]]:
    """Per model: each variant's median ms at batch 1, ``float/new`` (speed-up) and ``new/old``
    (what keeping the ReLUs float costs), each the median of per-round ratios. Each round times
    a model's three files back to back in a shuffled order, so the machine's other load (2
    shared cores) hits the pair a ratio compares alike."""
    from compress.passes.int8 import onnx_latency_ms

    models = sorted({key for key, _ in files})
    seen: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    rng = random.Random(0)
    for _ in range(rounds):
        for model in rng.sample(models, len(models)):
            for variant in rng.sample(VARIANTS, len(VARIANTS)):
                ms = onnx_latency_ms(files[(model, variant)], shapes[model], batch_size=1, threads=1, repeats=30)
                seen[(model, variant)].append(ms)
    out = {}
    for model in models:
        t = {v: seen[(model, v)] for v in VARIANTS}
        out[model] = {v: statistics.median(t[v]) for v in VARIANTS} | {
            "float/new": statistics.median(f / n for f, n in zip(t["float"], t["new"], strict=True)),
            "new/old": statistics.median(n / o for n, o in zip(t["new"], t["old"], strict=True)),
        }
    return out


SHARED_ROW = "Relu, shared input only"  # the op-type probe's last row
SCALE_KEY = "DARTS-V2 at DARTS's CIFAR-10 setting (C=36, 20 cells), untrained / 3x32x32"


def at_scale() -> dict[str, bytes]:
    """variant -> ONNX file of DARTS-V2 at DARTS's own size, untrained, calibrated on 64 Gaussian
    inputs: does int8 pay at a size where compute, not call overhead, dominates? (Latency and
    size only: untrained weights say nothing about accuracy.) Through the pass's own steps,
    since a context needs a data set."""
    from compress.passes import int8 as int8_pass
    from compress.passes.base import PassContext
    from compress.passes.int8 import INT8, export_float_onnx
    from nas.data import load_dataset
    from search_spaces.darts_genotypes import darts_v2

    shape = (3, 32, 32)
    model = darts_v2(10, shape).eval()
    x = np.random.default_rng(0).standard_normal((64, *shape)).astype(np.float32)
    notes = PassContext(load_dataset("digits", seed=0))  # only its notes list is used
    out = {"float": export_float_onnx(model, shape)}
    for variant, settings in (("old", {**INT8.defaults, **OLD_DEFAULT}), ("new", dict(INT8.defaults))):
        prepared = int8_pass._prepared_onnx(model, shape, settings["float_ops"])
        ranges = int8_pass._calibrate(prepared, settings, x)
        excluded = int8_pass._excluded_nodes(prepared, [], notes, settings["float_ops"], settings["format"])
        out[variant] = int8_pass._quantize(prepared, settings, ranges, excluded)
    return out


def row_key(row: Row) -> str:
    return f"{row.name} / {row.dataset}"


def kept_summary(nodes: list[str]) -> str:
    """``cells.*.ops.0.0.0 Relu x3``: the torch layers the kept nodes lie in, cells folded."""
    import re

    from compress.passes.int8 import onnx_node_layers

    counts: collections.Counter[str] = collections.Counter()
    for n in nodes:
        layers = onnx_node_layers(n)
        where = re.sub(r"^cells\.\d+", "cells.*", layers[-1]) if layers else "(top)"
        counts[f"{where} {n.rsplit('/', 1)[-1]}"] += 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) or "none"


def op_type_probe(model: Any, data: Any) -> tuple[float, float, list[tuple[str, int, float]]]:
    """(float acc, old default acc, [(op type, nodes, acc with that op type kept float)]) with the
    old default's ranges: which kind of node, left in float, gives the accuracy back."""
    import onnx

    from compress.passes import int8 as int8_pass
    from compress.passes.base import PassContext
    from compress.passes.int8 import onnx_accuracy

    ctx = PassContext(data, seed=0)
    s = {**int8_pass.INT8.defaults, **OLD_DEFAULT}
    prepared = int8_pass._prepared_onnx(model, ctx.input_shape, s["float_ops"])
    ranges = int8_pass._calibrate(prepared, s, ctx.calibration()[0][: s["calib_size"]])
    graph = onnx.load_from_string(prepared).graph
    x, y = data.x_val[:], data.y_val
    out = []
    for op in sorted({n.op_type for n in graph.node}):
        names = [n.name for n in graph.node if n.op_type == op]
        out.append((op, len(names), onnx_accuracy(int8_pass._quantize(prepared, s, ranges, names), x, y)))
    shared = int8_pass.shared_clipping_nodes(graph)
    out.append((SHARED_ROW, len(shared), onnx_accuracy(int8_pass._quantize(prepared, s, ranges, shared), x, y)))
    return onnx_accuracy(prepared, x, y), onnx_accuracy(int8_pass._quantize(prepared, s, ranges, []), x, y), out


# -- report ---------------------------------------------------------------------------------------
def findings(rows: list[Row], probe: list[tuple[str, int, float]], scale: dict[str, float]) -> list[str]:
    """The summary the tables back, from their numbers."""
    cells = [r for r in rows if "control" not in r.name]
    controls = [r for r in rows if "control" in r.name]

    def span(values: list[float], fmt: str) -> str:
        lo, hi = min(values), max(values)
        return format(lo, fmt) if f"{lo:{fmt}}" == f"{hi:{fmt}}" else f"{lo:{fmt}} to {hi:{fmt}}"

    old = [100 * (r.float_acc - r.accs["old"]) for r in cells]
    new = [100 * (r.float_acc - r.accs["new"]) for r in cells]
    cost = [r.latency["new/old"] for r in cells]
    speed = [r.latency["float/new"] for r in cells]
    growth = [100 * (r.sizes["new"] / r.sizes["old"] - 1) for r in cells]
    smaller = [r.sizes["float"] / r.sizes["new"] for r in cells]
    nodes = {op: n for op, n, _ in probe}
    out = [
        "Findings:",
        "",
        f"- **The old default lost {span(old, '.1f')} points on the {len(cells)} cell models; the new one "
        f"loses {span(new, '+.2f')}** (goal: at most 1).",
        "- **Root cause: ORT's QOperator quantizer deletes ReLUs it cannot fold.** After a quantized tensor it "
        "removes every ReLU/Clip (`QLinearActivation.QuantizeClipRelu`), relying on `adjust_tensor_ranges` "
        "having given the producer the ReLU's [0, max] range; that happens only when the ReLU is its input's sole "
        "reader. In a DARTS cell each ReLU-Conv-BN op opens with a ReLU on a cell state that a skip connection, "
        "pool, node sum or the concat also reads: those ReLUs vanish and negative activations flow into the "
        "next convs. Keeping just them in float restores the accuracy (the op-type table below: the "
        f"{nodes.get(SHARED_ROW, 0)} shared ReLUs of {nodes.get('Relu', 0)} do it all; keeping every Conv or Add "
        "float does not). QDQ, whose quantizer checks for a sole "
        "reader, was right all along. Not a calibration or per-layer sensitivity problem: no layer needed float.",
        f"- Cost: {span(cost, '.2f')}x the old int8 latency at batch 1 (median of paired per-round ratios), "
        f"files {span(growth, '.1f')}% larger (ORT fuses each kept ReLU at load into a DequantizeLinear/QuantizeLinear "
        "requantization).",
        f"- Controls ({', '.join(r.name.replace(' (control)', '') for r in controls)}): "
        + ("byte-identical int8 files under both defaults (no ReLU there shares its input), so their "
           "results/compress.md rows stand." if all(r.identical for r in controls) else "**files differ**: see the table."),
        f"- Unchanged by this fix, worth knowing: on these small cell models int8 is slower than float at batch 1 "
        f"({span(speed, '.2f')}x; ~80 QLinearConvs of 8-64 channels are call-overhead-bound, float convs run "
        f"in ORT's NCHWc kernels); it still makes the file {span(smaller, '.1f')}x smaller.",
    ]
    if scale:
        out.append(f"- At DARTS's own size (3.35M parameters, 3x32x32, untrained) int8 runs {scale['float/new']:.2f}x "
                   f"float's speed at batch 1 and the kept ReLUs cost {scale['new/old']:.2f}x.")
    return out


def report(
    rows: list[Row],
    probe: tuple[str, tuple[float, float, list[tuple[str, int, float]]]],
    scale: dict[str, float],
    cmd: str,
    meta: dict[str, Any],
) -> str:
    lines = [
        "# int8 on cell models (#19 item 4)",
        "",
        f"Command: `{cmd}`" + (f" ({meta['provenance']})" if meta.get("provenance") else ""),
        "",
        f"Date: {meta['date']}. Machine: {meta['machine']}. Load average (1 min) before / after the timing: "
        f"{meta['load'][0]:.2f} / {meta['load'][1]:.2f} (2 cores shared with other engineers). Runtime {meta['runtime']:.1f} min.",
        "",
        "int8 = the int8 pass (static, QOperator, U8 activations / S8 per-channel weights, MinMax on 256 "
        "calibration rows of the training split, compacted). **old** = its default before this change "
        "(`float_ops = [\"gelu\"]`), **new** = today's default (`float_ops = [\"gelu\", \"shared_relu\"]`: "
        "every ReLU/Clip whose input another node also reads stays float in the QOperator format). "
        "Accuracy: validation split, in ONNX Runtime (float = the model's own ONNX export). Drop in points "
        "against float. Latency: ORT CPU, 1 thread, batch 1, median of "
        f"{meta['rounds']} interleaved rounds of 30 runs. 'kept float': the nodes the new default keeps in "
        "float beyond the old one (torch layer, `cells.N` folded to `cells.*`; op). Training: the `quick` "
        "recipe (AdamW, one-cycle), epochs as listed.",
        "",
        *findings(rows, probe[1][2], scale),
        "",
        "| model | data | params | epochs / train s | float acc | int8 old | drop old | int8 new | drop new "
        "| float ms | old ms | new ms | speed-up new | new/old ms | float kB | old kB | new kB | kept float (new) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d_old, d_new = 100 * (r.float_acc - r.accs["old"]), 100 * (r.float_acc - r.accs["new"])
        kept = "identical file" if r.identical else kept_summary(r.kept_float)
        lines.append(
            f"| {r.name} | {r.dataset} | {r.params / 1e3:.1f}k | {r.epochs} / {r.train_s:.0f} "
            f"| {r.float_acc:.4f} | {r.accs['old']:.4f} | {d_old:+.2f} | {r.accs['new']:.4f} | {d_new:+.2f} "
            f"| {r.latency['float']:.3f} | {r.latency['old']:.3f} | {r.latency['new']:.3f} "
            f"| {r.latency['float/new']:.2f}x | {r.latency['new/old']:.2f} "
            f"| {r.sizes['float'] / 1e3:.1f} | {r.sizes['old'] / 1e3:.1f} | {r.sizes['new'] / 1e3:.1f} | {kept} |"
        )
    lines += ["", "Genotypes:", ""]
    lines += [f"- {r.name} / {r.dataset}: `{r.genotype}`" for r in rows]
    name, (f_acc, old_acc, per_op) = probe
    lines += [
        "",
        f"## Which nodes lose it: {name}, old default, one op type kept float at a time",
        "",
        f"Float {f_acc:.4f}, old default int8 {old_acc:.4f} ({100 * (f_acc - old_acc):+.2f} points). Same "
        "calibrated ranges throughout; only `nodes_to_exclude` changes.",
        "",
        "| kept float | nodes | int8 acc | drop (pts) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {op} | {n} | {acc:.4f} | {100 * (f_acc - acc):+.2f} |" for op, n, acc in per_op]
    if scale:
        lines += [
            "",
            f"## Latency at DARTS's size: {SCALE_KEY}",
            "",
            "Untrained weights, calibrated on 64 Gaussian inputs: latency and size only. Same timing rounds as above. "
            "On this shared machine the absolute times of this model moved by up to 2x between runs (7-20 ms for int8, "
            "9-20 ms for float, with other engineers' jobs on both cores); the paired ratios below moved far less.",
            "",
            "| variant | ORT b1 ms | file kB |",
            "|---|---|---|",
        ]
        lines += [f"| {v} | {scale[v]:.2f} | {scale[f'{v} bytes'] / 1e3:.0f} |" for v in VARIANTS]
        lines += ["", f"Speed-up of new over float {scale['float/new']:.2f}x; new/old {scale['new/old']:.2f} "
                      "(medians of per-round ratios)."]
    return "\n".join(lines) + "\n"


def measure(quick: bool, work: Path) -> dict[str, Any]:
    """Train, quantize (old and new default), score; the op-type probe; DARTS's size. Everything
    the timing and the report need, as plain data (pickled into ``work`` for ``--timing-only``)."""
    from compress.passes.int8 import INT8, onnx_accuracy

    rows: list[Row] = []
    files: dict[tuple[str, str], bytes] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    probe_model = None
    for t in models(quick, work):
        row = Row(t.name, t.dataset, t.genotype, sum(p.numel() for p in t.model.parameters()), t.epochs, t.train_s)
        key = row_key(row)
        fl = float_onnx(t.model, t.data, t.merge)
        old, old_record = quantize(t.model, t.data, {**INT8.defaults, **OLD_DEFAULT}, t.merge)
        new, record = quantize(t.model, t.data, dict(INT8.defaults), t.merge)
        row.kept_float = [n for n in record["excluded_nodes"] if n not in old_record["excluded_nodes"]]
        row.identical = old == new
        x, y = t.data.x_val[:], t.data.y_val
        row.float_acc = onnx_accuracy(fl, x, y)
        for variant, b in (("float", fl), ("old", old), ("new", new)):
            row.sizes[variant] = len(b)
            if variant != "float":
                row.accs[variant] = onnx_accuracy(b, x, y)
            files[(key, variant)] = b
        shapes[key] = tuple(t.data.input_shape)
        print(f"  {key}: float {row.float_acc:.4f} old {row.accs['old']:.4f} new {row.accs['new']:.4f} "
              f"({len(row.kept_float)} nodes kept float)", flush=True)
        rows.append(row)
        if t.name == "DARTS-V2 tiny" and t.dataset == "mnist5k":
            probe_model = (key, t.model, t.data)
    assert probe_model is not None
    print("op-type probe ...", flush=True)
    probe = (probe_model[0], op_type_probe(probe_model[1], probe_model[2]))
    if not quick:
        print("DARTS-V2 at DARTS's size ...", flush=True)
        for variant, b in at_scale().items():
            files[(SCALE_KEY, variant)] = b
        shapes[SCALE_KEY] = (3, 32, 32)
    return {"rows": rows, "files": files, "shapes": shapes, "probe": probe}


def main() -> None:
    import os
    import pickle
    import shlex

    import onnxruntime
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "results" / "int8_cells.md"))
    ap.add_argument("--work", default="/tmp/int8_cells")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="fewer epochs and models (a smoke run)")
    ap.add_argument("--timing-only", action="store_true",
                    help="re-time and re-report what the last run in --work measured (no training)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    state = work / "measured.pkl"
    if args.timing_only:
        measured = pickle.loads(state.read_bytes())
    else:
        measured = measure(args.quick, work)
        measured["made"] = {"cmd": shlex.join(["python", "bench/int8_cells.py", *sys.argv[1:]]),
                            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                            "minutes": (time.perf_counter() - start) / 60}
        state.write_bytes(pickle.dumps(measured))
    rows, files = measured["rows"], measured["files"]
    load_before = os.getloadavg()[0]
    print("timing ...", flush=True)
    timing = time_rounds(files, measured["shapes"], args.rounds)
    for row in rows:
        row.latency = timing[row_key(row)]
    scale = {**timing[SCALE_KEY], **{f"{v} bytes": len(files[(SCALE_KEY, v)]) for v in VARIANTS}} if SCALE_KEY in timing else {}
    meta = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch "
                   f"{torch.__version__}, onnxruntime {onnxruntime.__version__}",
        "load": (load_before, os.getloadavg()[0]),
        "runtime": (time.perf_counter() - start) / 60,
        "rounds": args.rounds,
    }
    cmd = shlex.join(["python", "bench/int8_cells.py", *sys.argv[1:]])
    if args.timing_only:
        made = measured["made"]
        meta["provenance"] = (f"re-timing only; the models were trained, quantized and scored by `{made['cmd']}` "
                              f"at {made['date']}, {made['minutes']:.1f} min, the same code")
    text = report(rows, measured["probe"], scale, cmd, meta)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
