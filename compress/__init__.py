"""Compression: pruning, low-rank decomposition and quantization as replayable policies.

`Policy` (an ordered list of passes with settings, canonical JSON, stable id) is applied to a
model with a `PassContext` (data, seed, teacher) and returns the compressed model plus one
plain-JSON record per pass, which `Policy.replay` turns back into the same model. The passes
live in `compress.passes` (one file each); `compress.run.run_compress` evaluates (model, policy)
pairs as trials of a run's store (the function behind `nas-run compress`).

Imports flow one way: `search_spaces` <- `nas` <- `compress` <- `report`, `export`: `nas` never
imports this package, and this package never imports `report` or `export` (they read what it writes).
Heavy libraries (Torch-Pruning, ONNX Runtime quantization) are imported inside the passes.
"""

from .errors import PolicyError
from .passes import PassContext, QuantizedOnnx, get_pass, list_passes
from .policy import Compressed, PassSpec, Policy, load_policy_file

__all__ = [
    "Compressed",
    "PassContext",
    "PassSpec",
    "Policy",
    "PolicyError",
    "QuantizedOnnx",
    "get_pass",
    "list_passes",
    "load_policy_file",
]
