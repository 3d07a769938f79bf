"""The check of an export: the file, loaded back in its runtime, against the trial's model in
PyTorch (`parity_check`), and the same check of an existing export again (`verify_export`).

- float formats: max abs difference of the logits on the validation split (up to
  `PARITY_SAMPLES`) at most `TOLERANCE`;
- ``onnx-int8``: the file's logits equal those of the in-memory quantized model (same tolerance),
  and its accuracy is re-measured on the whole validation split and stated against the float model.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from compress.passes.base import PassContext

from .formats import ExportCheckError, Exported, ExportError, copy_module, deploy_form, load_export
from .reference import Reference, reference
from .run_folder import open_run, select_trial

if TYPE_CHECKING:
    import numpy as np

    from nas.data import Dataset

__all__ = ["PARITY_SAMPLES", "TOLERANCE", "parity_check", "torch_logits", "verify_export"]

TOLERANCE = 1e-4  # max abs logit difference of a float export against the in-memory model
PARITY_SAMPLES = 512  # validation samples the float parity check runs (the int8 accuracy uses all)


def parity_check(loaded: Exported, ref: Reference, q_bytes: bytes | None, data: Dataset) -> dict[str, Any]:
    import numpy as np

    if loaded.format == "onnx-int8":
        from compress.passes.int8 import onnx_logits

        x, y = data.x_val, data.y_val
        got = loaded.predict(x)
        want = onnx_logits(q_bytes, x)  # the in-memory quantized model, same runtime
        diff = float(np.abs(got - want).max()) if len(x) else 0.0
        acc = float((got.argmax(1) == y).mean()) if len(y) else 0.0
        float_acc = ref.float_val_acc
        if float_acc is None and ref.module is not None:
            float_acc = float((torch_logits(ref.module, x).argmax(1) == y).mean())
        drop = None if float_acc is None else 100.0 * (float_acc - acc)
        passed = diff <= TOLERANCE
        summary = (f"int8 val_acc {acc:.4f} in ONNX Runtime on {len(y)} validation samples"
                   + (f"; float {float_acc:.4f}: drop {drop:+.2f} pts" if drop is not None else "")
                   + f"; file vs in-memory int8 model max abs diff {diff:.2e}")
        return {"passed": passed, "kind": "accuracy", "val_acc": acc, "float_val_acc": float_acc,
                "acc_drop_pts": drop, "max_abs_diff": diff, "tolerance": TOLERANCE, "samples": int(len(y)),
                "summary": summary if passed else f"{summary} > {TOLERANCE:g}"}
    x = data.x_val[:PARITY_SAMPLES]
    want = torch_logits(ref.module, x)
    got = loaded.predict(x)
    if got.shape != want.shape:
        return {"passed": False, "kind": "max_abs_diff", "max_abs_diff": float("inf"), "tolerance": TOLERANCE,
                "samples": int(len(x)), "summary": f"output shape {got.shape}, the model's {want.shape}"}
    diff = float(np.abs(got - want).max()) if len(x) else 0.0
    passed = bool(np.isfinite(diff) and diff <= TOLERANCE)
    runtime = {"onnx": "ONNX Runtime", "pt2": "torch.export", "torchscript": "TorchScript",
               "safetensors": "PyTorch (rebuilt)"}[loaded.format]
    summary = (f"max abs diff {diff:.2e} {'<=' if passed else '>'} {TOLERANCE:g} on {len(x)} validation samples "
               f"({runtime} vs the trial's model in PyTorch)")
    return {"passed": passed, "kind": "max_abs_diff", "max_abs_diff": diff, "tolerance": TOLERANCE,
            "samples": int(len(x)), "summary": summary}


def torch_logits(module: Any, x: np.ndarray, batch: int = 256) -> np.ndarray:
    import numpy as np
    import torch

    module.eval()
    with torch.no_grad():
        outs = [module(torch.as_tensor(np.asarray(x[i : i + batch], dtype=np.float32))).numpy()
                for i in range(0, len(x), batch)]
    return np.concatenate(outs)


def verify_export(path: str | os.PathLike[str], run_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Check an existing export again against its trial (``run_dir``, default the run its
    metadata names): loaded (hash checked), then the same parity / accuracy check as at export.
    Returns the check; a failed one is an `ExportError`."""
    loaded = load_export(path, threads=1)
    meta = loaded.metadata
    run = open_run(run_dir if run_dir is not None else meta["run"])
    rec = select_trial(run, int(meta["trial"]), None)
    if rec["genotype"] != meta["genotype"]:
        raise ExportError(f"{str(path)!r} was exported from genotype {meta['genotype']}, trial {rec['number']} is {rec['genotype']}")
    data = run.data()
    ref = reference(run, rec, data)
    q_bytes = None
    if loaded.format == "onnx-int8":
        if ref.onnx is not None:
            q_bytes = ref.onnx
        else:  # quantized at export: replay the int8 record (exact: its ranges, no calibration)
            from compress.passes.base import get_pass

            int8_rec = {k: v for k, v in meta["records"][-1].items() if k != "pass"}
            deploy = deploy_form(copy_module(ref.module))
            q_bytes = get_pass("int8").replay(deploy, int8_rec, PassContext(data=data)).model_bytes
    check = parity_check(loaded, ref, q_bytes, data)
    if not check["passed"]:
        raise ExportCheckError(f"export check failed for {str(path)!r}: {check['summary']}")
    return check


