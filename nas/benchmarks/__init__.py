"""Tabular benchmarks: architecture -> recorded results, for testing strategies without training.

`NB201Table` needs the optional extra ``pip install 'nas-run[bench]'`` for the full data; a
300-cell CIFAR-10 fixture (`FIXTURE`) ships with the package for tests.
"""

from __future__ import annotations

from .nb201_table import DATASETS, FIXTURE, NB201Table, TabularEvaluator

__all__ = ["DATASETS", "FIXTURE", "NB201Table", "TabularEvaluator"]
