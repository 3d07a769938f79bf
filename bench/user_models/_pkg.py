"""Load one source file of an installed package without running the package's ``__init__``.

The packages benchmarked here (torchcrepe, pesto-pitch, Resemblyzer) import torchaudio, librosa
or webrtcvad at import time, none of which is needed to build their networks (and torchaudio has
no build for this torch). They are installed with ``pip install --no-deps`` (see
bench/user_models.py) and their model files are loaded here by path, with small stand-ins for
the names those files import.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

__all__ = ["load_source", "package_dir"]


def package_dir(name: str) -> Path:
    """The folder of installed package ``name``, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"package {name!r} is not installed; see bench/user_models.py for the pip install --no-deps command"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def load_source(
    package: str, relpath: str, stand_ins: dict[str, Any] | None = None, parent: str | None = None
) -> types.ModuleType:
    """Execute ``<package dir>/<relpath>`` as a private module. ``stand_ins`` maps module names the
    file imports (``import torchcrepe``) to stand-in modules or attribute dicts; they are in
    ``sys.modules`` only while the file runs, so the real package is never shadowed afterwards.
    ``parent``: the package name relative imports (``from .utils import X``) resolve against; give
    it and ``parent + ".utils"`` as stand-ins."""
    path = package_dir(package) / relpath
    name = f"_bench_{package}_{relpath.replace('/', '_').removesuffix('.py')}"
    if name in sys.modules:
        return sys.modules[name]
    saved: dict[str, Any] = {}
    for mod_name, value in (stand_ins or {}).items():
        if isinstance(value, dict):
            mod = types.ModuleType(mod_name)
            mod.__dict__.update(value)
            value = mod
        saved[mod_name] = sys.modules.get(mod_name)
        sys.modules[mod_name] = value
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        if parent is not None:
            module.__package__ = parent
        spec.loader.exec_module(module)
    finally:
        for mod_name, old in saved.items():
            if old is None:
                sys.modules.pop(mod_name, None)
            else:
                sys.modules[mod_name] = old
    sys.modules[name] = module
    return module
