"""Compression (pruning, low-rank decomposition, quantization) — not implemented yet.

This package exists so the import direction `search_spaces <- nas <- compress` is fixed from
the start; its passes and policies land with the compression issue.
"""

__all__: list[str] = []
