"""Export: one trial of a run as a deployable file, loaded back and checked (``nas-run export``),
and loading such a file again (``load_model``, ``load_export``, ``verify_export``).

- `export.trial`: `export_trial` — choose the trial, load its model, write the deploy form,
  load it back in its runtime, check it against the trial's model, record the check;
- `export.reference`: the trial's model — its artefact (`nas.artefact`), located from its record
  and loaded through `compress.artefact_model.load_artefact`;
- `export.check`: the parity check, and `verify_export` (the same check of an existing export);
- `export.run_folder`: a run folder as export reads it, and which trial ``--trial``/``--policy``
  name;
- `export.pick`: the ``--pick`` rules (the run's objectives and constraints by default);
- `export.formats`: the formats (ONNX, int8 ONNX, pt2, TorchScript, safetensors), their metadata
  and manifest, the deploy form, and the checked loader.

The package sits above what it reads (``search_spaces <- nas <- compress <- export``); nothing
below imports it. The manifest of an exported file is defined in `compress.export_manifest`:
``nas-run compress --model`` checks a nas-run export it is given, so compress needs it too.

Importing this package is light (the CLI reads `FORMATS` at start-up): the rest is imported on
first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FORMATS", "export_trial", "load_export", "load_model", "verify_export"]

# what ``--format`` accepts; `export.formats` writes and loads each
FORMATS = ("onnx", "onnx-int8", "pt2", "torchscript", "safetensors")

_LAZY = {"export_trial": "trial", "verify_export": "trial", "load_export": "formats", "load_model": "formats"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
