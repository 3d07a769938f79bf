"""Compression passes: one file per pass, each registered by name (see `base`)."""

from .base import Pass, PassContext, QuantizedOnnx, get_pass, list_passes, register_pass

__all__ = ["Pass", "PassContext", "QuantizedOnnx", "get_pass", "list_passes", "register_pass"]
