"""The ONNX Runtime int8 pass on a small CNN briefly trained on `digits` (one fixture per module)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from helpers import train_briefly  # noqa: E402

from compress.errors import PolicyError  # noqa: E402
from compress.passes.base import PassContext, QuantizedOnnx, get_pass  # noqa: E402
from compress.passes.int8 import (  # noqa: E402
    export_float_onnx,
    onnx_accuracy,
    onnx_latency_ms,
    onnx_logits,
    onnx_node_layers,
)
from compress.policy import Policy  # noqa: E402
from nas.data import load_dataset  # noqa: E402

nn = torch.nn
INT8 = get_pass("int8")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, PassContext, np.ndarray]:
    """(model in eval mode, context, fp32 validation logits): ~0.5 s of Adam on digits."""
    data = load_dataset("digits", seed=0)
    ctx = PassContext(data, seed=0)
    torch.manual_seed(0)
    model = train_briefly(Net(), ctx)
    with torch.no_grad():
        ref = model(torch.from_numpy(data.x_val[:])).numpy()
    assert (ref.argmax(1) == data.y_val).mean() > 0.9  # the fixture really learned the task
    return model, ctx, ref


def _graph(q: QuantizedOnnx) -> onnx.GraphProto:
    return onnx.load_from_string(q.model_bytes).graph


def _ops(q: QuantizedOnnx) -> set[str]:
    return {n.op_type for n in _graph(q).node}


def _rel_error(logits: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(logits - ref).max() / (ref.max() - ref.min()))


def _initializers(q: QuantizedOnnx) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in _graph(q).initializer}


def test_default_int8_keeps_logits_and_accuracy(trained):
    model, ctx, ref = trained
    d = ctx.data
    q, record = INT8.apply(copy.deepcopy(model), INT8.defaults, ctx)
    assert isinstance(q, QuantizedOnnx) and q.float_layers == ()
    assert _rel_error(onnx_logits(q, d.x_val), ref) <= 0.1
    fp32_acc = float((ref.argmax(1) == d.y_val).mean())
    assert onnx_accuracy(q, d.x_val, d.y_val) >= fp32_acc - 0.02
    # the record is plain JSON holding the settings and one [min, max] per calibrated tensor
    assert json.loads(json.dumps(record)) == record
    assert record["settings"] == dict(INT8.defaults)
    assert "input" in record["ranges"] and all(lo <= hi for lo, hi in record["ranges"].values())
    assert record["calib_samples"] == min(INT8.defaults["calib_size"], len(ctx.calibration()[0]))


@pytest.mark.parametrize("fmt", ["qoperator", "qdq"])
def test_the_graph_holds_integer_ops(trained, fmt):
    model, ctx, _ = trained
    q, _ = INT8.apply(copy.deepcopy(model), {**INT8.defaults, "format": fmt}, ctx)
    ops = _ops(q)
    if fmt == "qoperator":
        assert "QLinearConv" in ops and "Conv" not in ops
    else:
        assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
        # every conv's weight arrives through a DequantizeLinear of an int8 initializer
        graph = _graph(q)
        producers = {o: n for n in graph.node for o in n.output}
        inits = _initializers(q)
        for conv in (n for n in graph.node if n.op_type == "Conv"):
            dq = producers[conv.input[1]]
            assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].dtype == np.int8


@pytest.mark.parametrize("fmt", ["qoperator", "qdq"])
@pytest.mark.parametrize("calibration", ["minmax", "entropy", "percentile"])
def test_each_calibration_and_format_runs(trained, calibration, fmt):
    model, ctx, ref = trained
    d = ctx.data
    settings = {**INT8.defaults, "calibration": calibration, "format": fmt, "calib_size": 128}
    q, record = INT8.apply(copy.deepcopy(model), settings, ctx)
    fp32_acc = float((ref.argmax(1) == d.y_val).mean())
    assert onnx_accuracy(q, d.x_val, d.y_val) >= fp32_acc - 0.02
    assert _rel_error(onnx_logits(q, d.x_val), ref) <= 0.2
    if calibration != "minmax":
        # entropy and percentile clip: their ranges lie inside the observed min/max ones
        mm = INT8.apply(copy.deepcopy(model), {**settings, "calibration": "minmax"}, ctx)[1]["ranges"]
        for name, (lo, hi) in record["ranges"].items():
            assert mm[name][0] <= lo <= hi <= mm[name][1]


@pytest.mark.parametrize("fmt", ["qoperator", "qdq"])
def test_mixed_precision_keeps_the_named_layer_float(trained, fmt):
    model, ctx, ref = trained
    settings = {**INT8.defaults, "format": fmt, "float_layers": ["features.3"]}
    q, record = INT8.apply(copy.deepcopy(model), settings, ctx)
    assert q.float_layers == ("features.3",)
    graph = _graph(q)
    inits = _initializers(q)
    mine = [n for n in graph.node if "features.3" in onnx_node_layers(n.name)]
    convs = [n for n in mine if n.op_type == "Conv"]
    assert len(convs) == 1 and convs[0].name in record["excluded_nodes"]
    assert inits[convs[0].input[1]].dtype == np.float32  # the weight is a float initializer
    if fmt == "qoperator":  # the other conv is still an integer op
        assert [n for n in graph.node if n.op_type == "QLinearConv"]
    assert _rel_error(onnx_logits(q, ctx.data.x_val), ref) <= 0.1


def test_a_layer_without_nodes_of_its_own_is_a_note(trained):
    model, ctx, _ = trained
    ctx = PassContext(ctx.data, seed=0)
    q, record = INT8.apply(copy.deepcopy(model), {**INT8.defaults, "float_layers": ["features.1"]}, ctx)
    assert record["excluded_nodes"] == [] and any("features.1" in n for n in ctx.notes)  # BN folded


def test_replay_equals_apply(trained):
    model, ctx, _ = trained
    policy = Policy.of(("int8", {"calibration": "percentile", "float_layers": ["head"], "per_channel": False}))
    done = policy.apply(model, ctx)
    assert done.is_onnx
    records = json.loads(json.dumps(done.records))  # as a trial stores them
    again = policy.replay(copy.deepcopy(model), records, ctx)
    assert again.model_bytes == done.model.model_bytes
    a, b = _initializers(done.model), _initializers(again)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert not ctx.notes


@pytest.mark.parametrize(
    "settings, needle",
    [
        ({"calibration": "distribution"}, "calibration"),
        ({"format": "foo"}, "format"),
        ({"activation_type": "s8", "weight_type": "u8"}, "weight_type"),
        ({"calibration": "entropy", "calib_moving_average": True}, "calib_moving_average"),
        ({"percentile": 0}, "percentile"),
        ({"calib_size": 0}, "calib_size"),
        ({"per_chanel": False}, "per_channel"),
    ],
)
def test_bad_settings_are_policy_errors(settings, needle):
    with pytest.raises(PolicyError, match=needle):
        Policy.of(("int8", settings))


def test_an_unknown_float_layer_is_a_policy_error(trained):
    model, ctx, _ = trained
    with pytest.raises(PolicyError, match="features.33"):
        INT8.apply(copy.deepcopy(model), {**INT8.defaults, "float_layers": ["features.33"]}, ctx)


def test_dynamic_batch(trained):
    model, ctx, _ = trained
    x = ctx.data.x_val[:7]
    q, _ = INT8.apply(copy.deepcopy(model), INT8.defaults, ctx)
    for blob in (q.model_bytes, export_float_onnx(model, ctx.input_shape)):
        sess = QuantizedOnnx(blob).session()
        one = np.concatenate([sess.run(None, {"input": x[i : i + 1]})[0] for i in range(7)])
        seven = sess.run(None, {"input": x})[0]
        assert one.shape == seven.shape == (7, 10)
        np.testing.assert_allclose(one, seven, rtol=1e-5, atol=1e-5)


def test_float_export_and_helpers(trained):
    model, ctx, ref = trained
    blob = export_float_onnx(model, ctx.input_shape)
    np.testing.assert_allclose(onnx_logits(blob, ctx.data.x_val), ref, rtol=1e-4, atol=1e-4)
    assert onnx_accuracy(blob, ctx.data.x_val, ctx.data.y_val) == float((ref.argmax(1) == ctx.data.y_val).mean())
    assert onnx_latency_ms(blob, ctx.input_shape, batch_size=8, warmup=1, repeats=3) > 0
    assert model.training is False  # the exporter restored the mode it found


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # user models may be TorchScript
@pytest.mark.parametrize("kind", ["script", "trace"])
def test_torchscript_models_quantize_and_replay(trained, kind):
    model, ctx, ref = trained
    sm = torch.jit.script(model) if kind == "script" else torch.jit.trace(model, torch.zeros(1, 1, 8, 8))
    export_float_onnx(sm, ctx.input_shape)  # an earlier export must not change what later ones name
    policy = Policy.of(("int8", {"float_layers": ["features.3"]}))
    done = policy.apply(sm, ctx)
    assert done.records[0]["excluded_nodes"] == ["/features/3/Conv"]
    assert "Conv" in _ops(done.model) and "QLinearConv" in _ops(done.model)
    assert _rel_error(onnx_logits(done.model, ctx.data.x_val), ref) <= 0.1
    assert policy.replay(sm, done.records, ctx).model_bytes == done.model.model_bytes


def test_node_names_map_to_layers():
    assert onnx_node_layers("/features/features.3/Conv") == ["features", "features.3"]  # eager
    assert onnx_node_layers("/features/3/Conv_1") == ["features", "features.3"]  # TorchScript
    assert onnx_node_layers("/a/a.a/a.a.b/Gemm") == ["a", "a.a", "a.a.b"]
    assert onnx_node_layers("/Flatten") == []


def test_conv1d_models_quantize(trained):
    """A 1-D (C, L) model: digits rows read as sequences of length 64."""
    import dataclasses

    _, ctx, _ = trained
    d = ctx.data
    seq = dataclasses.replace(
        d, x_train=d.x_train[:].reshape(-1, 1, 64), x_val=d.x_val[:].reshape(-1, 1, 64),
        x_test=d.x_test[:].reshape(-1, 1, 64), input_shape=(1, 64),
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 8, 5, padding=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10)).eval()
    q, _ = INT8.apply(model, INT8.defaults, PassContext(seq, seed=0))
    with torch.no_grad():
        ref = model(torch.from_numpy(seq.x_val[:])).numpy()
    assert "QLinearConv" in _ops(q)
    assert _rel_error(onnx_logits(q, seq.x_val), ref) <= 0.1


# -- mixed precision by op kind, compaction, records from before those settings ---------------------
class GeluNet(nn.Module):
    """A depthwise-separable block with an exact (erf) GELU, as in the large-kernel space."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(1, 16, 1)
        self.act = nn.GELU()
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.head = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.dw(self.act(self.expand(x))), 1))


@pytest.fixture(scope="module")
def gelu_trained(trained) -> tuple[nn.Module, PassContext, np.ndarray]:
    _, ctx, _ = trained
    torch.manual_seed(0)
    model = train_briefly(GeluNet(), ctx)
    with torch.no_grad():
        ref = model(torch.from_numpy(ctx.data.x_val[:])).numpy()
    return model, ctx, ref


@pytest.mark.parametrize("fmt", ["qoperator", "qdq"])
def test_gelu_stays_one_float_node(gelu_trained, fmt):
    model, ctx, ref = gelu_trained
    q, record = INT8.apply(copy.deepcopy(model), {**INT8.defaults, "format": fmt}, ctx)
    graph = _graph(q)
    gelus = [n for n in graph.node if n.op_type == "Gelu"]
    assert len(gelus) == 1 and gelus[0].domain == "com.microsoft" and gelus[0].name == "/act/Gelu"
    assert "Erf" not in _ops(q) and "act" in onnx_node_layers(gelus[0].name)
    # calibrated as one op: no ranges for the GELU's inner tensors (its output keeps the last Mul's name)
    inner = {f"/act/{op}_output_0" for op in ("Div", "Erf", "Add", "Mul")}
    assert not inner & set(record["ranges"]) and "/act/Mul_1_output_0" in record["ranges"]
    assert _rel_error(onnx_logits(q, ctx.data.x_val), ref) <= 0.1
    # without it the GELU's five nodes are quantized one by one (QOperator: QLinearAdd / QLinearMul)
    legacy, _ = INT8.apply(copy.deepcopy(model), {**INT8.defaults, "format": fmt, "float_ops": []}, ctx)
    assert "Erf" in _ops(legacy) and "Gelu" not in _ops(legacy)
    if fmt == "qoperator":
        assert {"QLinearAdd", "QLinearMul"} <= _ops(legacy)


def test_depthwise_float_ops_keep_grouped_convs_float(gelu_trained):
    model, ctx, ref = gelu_trained
    q, record = INT8.apply(copy.deepcopy(model), {**INT8.defaults, "float_ops": ["gelu", "depthwise"]}, ctx)
    assert record["excluded_nodes"] == ["/dw/Conv"]
    convs = [n for n in _graph(q).node if n.op_type == "Conv"]
    assert [n.name for n in convs] == ["/dw/Conv"] and "QLinearConv" in _ops(q)  # the 1x1 conv is int8
    assert _rel_error(onnx_logits(q, ctx.data.x_val), ref) <= 0.1


def test_compact_drops_what_ort_does_not_read_and_computes_the_same(gelu_trained):
    model, ctx, _ = gelu_trained
    x = ctx.data.x_val
    full, _ = INT8.apply(copy.deepcopy(model), {**INT8.defaults, "compact": False}, ctx)
    small, _ = INT8.apply(copy.deepcopy(model), INT8.defaults, ctx)
    assert len(small.model_bytes) < 0.9 * len(full.model_bytes)
    np.testing.assert_array_equal(onnx_logits(small, x), onnx_logits(full, x))  # the same arithmetic
    g, f = _graph(small), _graph(full)
    assert len(f.value_info) > 0 and len(g.value_info) == 0
    assert [n.name for n in g.node] == [n.name for n in f.node]  # node names (module paths) stay
    assert [i.name for i in g.input] == ["input"] and [o.name for o in g.output] == ["output"]
    names = [t.name for t in g.initializer]
    assert all(n.startswith("t") and n[1:].isdigit() for n in names) and len(set(names)) == len(names)
    # one initializer per distinct constant
    keys = [(t.data_type, tuple(t.dims), onnx.numpy_helper.to_array(t).tobytes()) for t in g.initializer]
    assert len(set(keys)) == len(keys) < len(f.initializer)


def test_a_record_from_before_float_ops_and_compact_replays_as_it_was_made(gelu_trained):
    model, ctx, _ = gelu_trained
    old_settings = {k: v for k, v in INT8.defaults.items() if k not in ("float_ops", "compact")}
    q, record = INT8.apply(copy.deepcopy(model), {**old_settings, "float_ops": [], "compact": False}, ctx)
    record = json.loads(json.dumps(record))
    record["settings"] = {k: v for k, v in record["settings"].items() if k not in ("float_ops", "compact")}
    ctx = PassContext(ctx.data, seed=0)
    assert INT8.replay(copy.deepcopy(model), record, ctx).model_bytes == q.model_bytes
    assert not ctx.notes  # its sha1 matched


def test_bad_float_ops_is_a_policy_error():
    with pytest.raises(PolicyError, match="float_ops"):
        Policy.of(("int8", {"float_ops": ["softmax"]}))
    with pytest.raises(PolicyError, match="compact"):
        Policy.of(("int8", {"compact": "yes"}))
