"""Cost model: parameters, MACs/FLOPs, activation size and measured latency of a `torch.nn.Module`.

Counting (`profile`) runs one forward pass with hooks on the *leaf* modules (modules without
children) and adds up a per-module cost. The rules, per call of a leaf module (shared modules
called twice count twice), for an output `y` and input `x`:

- ConvNd: `y.numel() * (in_channels / groups) * prod(kernel_size)` MACs -- exact; stride,
  padding and dilation act only through `y`'s shape, and groups (depthwise) through the
  per-output fan-in. ConvTransposeNd: `x.numel() * (out_channels / groups) * prod(kernel_size)`.
- Linear: `y.numel() * in_features` MACs -- exact. Bias additions are not counted for either
  (the fvcore/thop convention), so a layer's MACs are the multiplications of its weights.
- Normalisation (BatchNorm, LayerNorm, GroupNorm, InstanceNorm) in eval mode is a per-element
  scale and shift: `y.numel()` MACs.
- Pooling: fixed windows cost `y.numel() * prod(kernel_size)`, adaptive ones `x.numel()` (each input
  element is read once); activations and other elementwise modules cost `y.numel()`. These are
  approximate -- a ReLU is a compare, not a multiply-add -- but they are small next to conv/linear.
- FLOPs are `2 * MACs` throughout.
- Anything a module's `forward` does with functions rather than leaf modules (`x + skip`,
  `F.relu`, `torch.cat`) is not seen; leaf modules of unknown types are listed in
  `ModelStats.uncounted` so an under-count is visible rather than silent.

`params` counts each parameter once, without those only training-only heads hold (DARTS's
auxiliary classifier, `TRAINING_ONLY_MODULES`), as papers report them.

`activations` is the total number of elements in the outputs of all leaf modules except pure
views and no-ops (Identity, Flatten, Unflatten, Dropout): a proxy for the memory traffic of one
forward pass, not peak memory. All counts are for the whole batch (`batch_size` samples).

Latency (`measure_latency`) is wall-clock time of a forward pass in eval mode, in PyTorch or in
ONNX Runtime (CPU). Measure in the runtime a model will be deployed with: the two rank
architectures differently (see shared/BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import math
import operator
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search_spaces.errors import ConfigError, UnknownNameError

if TYPE_CHECKING:
    import torch

__all__ = [
    "RUNTIMES",
    "TRAINING_ONLY_MODULES",
    "Latency",
    "ModelStats",
    "count_params",
    "export_onnx",
    "measure",
    "measure_latency",
    "profile",
]

RUNTIMES = ("onnxruntime", "torch")
ONNX_OPSET = 17


@dataclass(frozen=True)
class ModelStats:
    """Static cost of one forward pass over a batch of `batch_size` inputs of `input_shape`."""

    params: int
    flops: int  # 2 * macs
    macs: int
    activations: int  # elements in leaf-module outputs (see module docstring)
    input_shape: tuple[int, ...]  # one sample, without the batch axis
    batch_size: int
    uncounted: tuple[str, ...] = ()  # leaf module types with no cost rule, sorted

    def as_dict(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "flops": self.flops,
            "macs": self.macs,
            "activations": self.activations,
            "input_shape": list(self.input_shape),
            "batch_size": self.batch_size,
            "uncounted": list(self.uncounted),
        }


@dataclass(frozen=True)
class Latency:
    """Wall-clock forward-pass time over `repeats` timed runs after `warmup` untimed ones."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    repeats: int
    warmup: int
    threads: int | None  # as requested; None = the runtime's default
    batch_size: int
    runtime: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "median_ms": self.median_ms,
            "p90_ms": self.p90_ms,
            "mean_ms": self.mean_ms,
            "repeats": self.repeats,
            "warmup": self.warmup,
            "threads": self.threads,
            "batch_size": self.batch_size,
            "runtime": self.runtime,
        }


# Submodules only training uses, by attribute name: DARTS's auxiliary classifier (see
# search_spaces/nasnet_model.py) adds a loss during training and is never run at inference, and
# DARTS and the papers after it report parameters without it. `profile` leaves their parameters
# out; their FLOPs need no rule, as the forward pass `profile` runs never calls them.
TRAINING_ONLY_MODULES = ("auxiliary_head",)


def count_params(model: torch.nn.Module, trainable_only: bool = False, inference_only: bool = False) -> int:
    """Number of parameter elements; a parameter shared by two modules counts once.
    ``inference_only`` leaves out the parameters that only `TRAINING_ONLY_MODULES` hold."""
    if not inference_only:
        return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
    used: dict[int, torch.nn.Parameter] = {}
    for name, module in model.named_modules(remove_duplicate=False):  # every path of a shared one
        if any(part in TRAINING_ONLY_MODULES for part in name.split(".")):
            continue
        for param in module.parameters(recurse=False):  # a parameter shared with the main net stays
            used[id(param)] = param
    return sum(p.numel() for p in used.values() if p.requires_grad or not trainable_only)


# ---------------------------------------------------------------------------------------------
# counting


def profile(model: torch.nn.Module, input_shape: Sequence[int], batch_size: int = 1) -> ModelStats:
    """Params, MACs, FLOPs and activation count of `model` on a `(batch_size, *input_shape)` input."""
    import torch

    shape = _check_shape(input_shape, batch_size)
    rules = _cost_rules()
    free = _free_modules()
    totals = {"macs": 0, "activations": 0}
    uncounted: set[str] = set()

    def hook(module: torch.nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        out = _first_tensor(output)
        if out is None:
            return
        if not isinstance(module, free):
            totals["activations"] += sum(t.numel() for t in _tensors(output))
        for kinds, rule in rules:
            if isinstance(module, kinds):
                x = _first_tensor(inputs)
                totals["macs"] += int(rule(module, x if x is not None else out, out))
                return
        if not isinstance(module, free):
            uncounted.add(type(module).__name__)

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with _eval_mode(model), torch.no_grad():
            model(_dummy_input(model, shape))
    finally:
        for h in handles:
            h.remove()
    return ModelStats(
        params=count_params(model, inference_only=True),
        flops=2 * totals["macs"],
        macs=totals["macs"],
        activations=totals["activations"],
        input_shape=shape[1:],
        batch_size=batch_size,
        uncounted=tuple(sorted(uncounted)),
    )


def _cost_rules() -> list[tuple[tuple[type, ...], Callable[[Any, Any, Any], int]]]:
    """(module types, MACs(module, x, y)) pairs, first match wins; built lazily to keep torch lazy."""
    from torch import nn

    def conv(m: Any, x: Any, y: Any) -> int:
        return y.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)

    def conv_transpose(m: Any, x: Any, y: Any) -> int:
        # each input element scatters into out_channels/groups * prod(k) outputs
        return x.numel() * (m.out_channels // m.groups) * math.prod(m.kernel_size)

    def linear(m: Any, x: Any, y: Any) -> int:
        return y.numel() * m.in_features

    def window_pool(m: Any, x: Any, y: Any) -> int:
        k = m.kernel_size
        n_dims = y.dim() - 2  # (N, C, *spatial)
        k = (k,) * n_dims if isinstance(k, int) else tuple(k)
        return y.numel() * math.prod(k)

    def per_input(m: Any, x: Any, y: Any) -> int:
        return x.numel()

    def per_output(m: Any, x: Any, y: Any) -> int:
        return y.numel()

    return [
        ((nn.modules.conv._ConvTransposeNd,), conv_transpose),
        ((nn.modules.conv._ConvNd,), conv),
        ((nn.Linear,), linear),
        (
            (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._LPPoolNd),
            window_pool,
        ),
        ((nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd), per_input),
        (
            (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm),
            per_output,
        ),
        (
            (
                nn.ReLU,
                nn.ReLU6,
                nn.LeakyReLU,
                nn.PReLU,
                nn.ELU,
                nn.SELU,
                nn.CELU,
                nn.GELU,
                nn.SiLU,
                nn.Mish,
                nn.Sigmoid,
                nn.Tanh,
                nn.Hardswish,
                nn.Hardsigmoid,
                nn.Hardtanh,
                nn.Softplus,
                nn.Softmax,
                nn.LogSoftmax,
                nn.Softsign,
                nn.Tanhshrink,
                nn.Threshold,
                nn.GLU,
                nn.Upsample,
            ),
            per_output,
        ),
    ]


def _free_modules() -> tuple[type, ...]:
    """Leaf modules that compute nothing: views and no-ops (Dropout is the identity in eval)."""
    from torch import nn

    return (nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _first_tensor(value: Any) -> torch.Tensor | None:
    return next(_tensors(value), None)


# ---------------------------------------------------------------------------------------------
# latency


def measure_latency(
    model: torch.nn.Module,
    input_shape: Sequence[int],
    batch_size: int = 1,
    threads: int | None = None,
    warmup: int = 5,
    repeats: int = 20,
    runtime: str = "torch",
) -> Latency:
    """Time `repeats` forward passes on a `(batch_size, *input_shape)` input, after `warmup` ones.

    `runtime="torch"` times the model itself (on its own device; CUDA is synchronised around
    every pass so the time covers the kernels, not just their launch). `runtime="onnxruntime"`
    exports it to ONNX (opset 17) in a temporary folder and times an `InferenceSession` on the
    CPUExecutionProvider. `threads` sets the intra-op thread count for the measurement only.
    """
    if runtime not in RUNTIMES:
        raise UnknownNameError("runtime", runtime, RUNTIMES)
    shape = _check_shape(input_shape, batch_size)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads must be a positive integer or None, got {threads!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"warmup must be an integer >= 0, got {warmup!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"repeats must be an integer >= 1, got {repeats!r}")

    if runtime == "torch":
        times = _time_torch(model, shape, threads, warmup, repeats)
    else:
        times = _time_onnxruntime(model, shape, threads, warmup, repeats)

    import numpy as np

    ms = np.asarray(times) * 1e3
    return Latency(
        median_ms=float(np.median(ms)),
        p90_ms=float(np.percentile(ms, 90)),
        mean_ms=float(ms.mean()),
        repeats=repeats,
        warmup=warmup,
        threads=threads,
        batch_size=batch_size,
        runtime=runtime,
    )


def _time_torch(
    model: torch.nn.Module, shape: tuple[int, ...], threads: int | None, warmup: int, repeats: int
) -> list[float]:
    import torch

    x = _dummy_input(model, shape)
    on_cuda = x.device.type == "cuda"

    def sync() -> None:
        # CUDA kernels are asynchronous: without a barrier we would time the launch only
        if on_cuda:
            torch.cuda.synchronize(x.device)

    times: list[float] = []
    with _eval_mode(model), _torch_threads(threads), torch.inference_mode():
        for _ in range(warmup):
            model(x)
        sync()
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            sync()
            times.append(time.perf_counter() - start)
    return times


def _time_onnxruntime(
    model: torch.nn.Module, shape: tuple[int, ...], threads: int | None, warmup: int, repeats: int
) -> list[float]:
    import numpy as np
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="nas-cost-") as tmp:
        path = export_onnx(model, shape[1:], Path(tmp) / "model.onnx", batch_size=shape[0])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0  # 0 = ORT's default (one per physical core)
        options.inter_op_num_threads = 1  # a single chain of ops: parallelism is within ops
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # errors only: no per-node warnings in the run log
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    # the session holds the model in memory, so the temporary file can go
    spec = session.get_inputs()[0]
    dtype = {"tensor(double)": np.float64, "tensor(float16)": np.float16}.get(spec.type, np.float32)
    feed = {spec.name: np.random.default_rng(0).standard_normal(shape).astype(dtype)}
    for _ in range(warmup):
        session.run(None, feed)
    times: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return times


def export_onnx(
    model: torch.nn.Module, input_shape: Sequence[int], path: str | Path, batch_size: int = 1
) -> Path:
    """Write `model` (eval mode, fixed input shape `(batch_size, *input_shape)`) to ONNX at `path`.

    The input is named "input" and the first output "output". Uses the TorchScript exporter
    (`dynamo=False`): it is fast and needs nothing beyond torch, whereas the torch.export-based
    one needs `onnxscript`, which is not a dependency. If a future torch drops the TorchScript
    exporter and `onnxscript` is installed, the dynamo exporter is used instead.
    """
    import torch

    shape = _check_shape(input_shape, batch_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = _dummy_input(model, shape)
    kwargs: dict[str, Any] = {
        "input_names": ["input"],
        "output_names": ["output"],
        "opset_version": ONNX_OPSET,
    }
    accepts_dynamo = "dynamo" in inspect.signature(torch.onnx.export).parameters
    with _eval_mode(model), warnings.catch_warnings():
        # the TorchScript exporter announces its own deprecation on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        try:
            extra = {"dynamo": False} if accepts_dynamo else {}
            torch.onnx.export(model, (x,), str(path), **kwargs, **extra)
        except Exception:
            if not accepts_dynamo or importlib.util.find_spec("onnxscript") is None:
                raise
            torch.onnx.export(model, (x,), str(path), **kwargs, dynamo=True, external_data=False)
    return path


# ---------------------------------------------------------------------------------------------
# convenience


def measure(
    model: torch.nn.Module,
    input_shape: Sequence[int],
    batch_size: int = 1,
    threads: int | None = None,
    warmup: int = 5,
    repeats: int = 20,
    runtime: str = "torch",
) -> dict[str, float]:
    """The flat metrics a trainer logs: params, flops, macs, activations, latency_ms (median)."""
    stats = profile(model, input_shape, batch_size)
    latency = measure_latency(model, input_shape, batch_size, threads, warmup, repeats, runtime)
    return {
        "params": float(stats.params),
        "flops": float(stats.flops),
        "macs": float(stats.macs),
        "activations": float(stats.activations),
        "latency_ms": latency.median_ms,
    }


# ---------------------------------------------------------------------------------------------
# helpers


def _check_shape(input_shape: Sequence[int], batch_size: int) -> tuple[int, ...]:
    """`(batch_size, *input_shape)` after checking both hold positive integers."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    try:
        # operator.index accepts ints and numpy integers but not 8.5 or "8"
        shape = tuple(operator.index(d) for d in input_shape)
    except TypeError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise ConfigError(
            f"input_shape must be positive integers without the batch axis, e.g. (1, 28, 28); "
            f"got {input_shape!r}"
        )
    return (batch_size, *shape)


def _dummy_input(model: torch.nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """A seeded random input on the model's device and in its floating dtype."""
    import torch

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    gen = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the duration; restores every submodule's own flag (they may differ, e.g. a
    frozen BatchNorm kept in eval inside a model that trains), which `model.train(flag)` would not."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in modes:
            m.training = flag


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    import torch

    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
