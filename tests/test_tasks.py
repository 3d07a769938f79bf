"""Tasks: losses, distillation and metrics other than cross-entropy/accuracy, on real models and
data; probability outputs are detected and not squashed twice; a user's loss and metric are the
ones used; bad names exit 2 with one line; --loss bce --metric within1 end to end."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from compress.errors import PolicyError
from compress.passes.base import PassContext
from compress.passes.finetune import state_dict_sha1, train
from compress.passes.int8 import export_float_onnx, onnx_accuracy, onnx_logits
from compress.policy import Policy
from compress.tasks import detect_outputs, make_metric, make_task
from nas.data import load_dataset
from nas_run.cli import main
from search_spaces.errors import UnknownNameError

HERE = Path(__file__).parent
USER = HERE / "user_tasks.py"


def _user():
    import sys

    sys.path.insert(0, str(HERE))
    import user_tasks

    return user_tasks


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def _outputs(model: nn.Module, x) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(x))).numpy()


def _ctx(data, loss: str = "ce", metric: str | None = None, outputs: str = "auto") -> PassContext:
    return PassContext(data=data, seed=0, task=make_task(loss, metric, outputs=outputs))


@pytest.fixture(scope="module")
def sigmoid_teacher(digits):
    model = _user().SigmoidCNN(width=16)
    train(model, _ctx(digits, "bce"), epochs=8, lr=3e-2)  # ~0.9 accuracy
    return model


# -- names -------------------------------------------------------------------------------------
def test_defaults_follow_the_loss_and_bad_names_name_the_valid_ones() -> None:
    assert make_task().name == "ce" and make_task().metric.name == "accuracy"
    assert make_task("bce").metric.name == "accuracy"
    assert make_task("mse").metric.name == "mae" and not make_task("l1").metric.higher_is_better
    assert make_task("bce", "within2").metric.name == "within2"
    with pytest.raises(UnknownNameError, match=r"unknown loss 'bc' \(did you mean 'bce'\?\); valid: bce, ce, l1, mse"):
        make_task("bc")
    with pytest.raises(UnknownNameError, match="did you mean 'accuracy'"):
        make_metric("acuracy")
    with pytest.raises(UnknownNameError, match="top<K>"):
        make_metric("top0")
    with pytest.raises(PolicyError, match=r"^--loss 'no_such_pkg\.mod:fn': cannot import"):
        make_task("no_such_pkg.mod:fn")
    with pytest.raises(PolicyError, match=r"^--metric .*has no callable 'nope'"):
        make_metric(f"{USER}:nope")


def test_metrics_on_known_outputs() -> None:
    out = np.array([[0.1, 0.7, 0.2, 0.0], [0.5, 0.1, 0.3, 0.1], [0.0, 0.1, 0.2, 0.7]], np.float32)
    labels = np.array([1, 2, 2])  # argmax 1, 0, 3
    assert make_metric("accuracy")(out, labels) == pytest.approx(1 / 3) == make_metric("top1")(out, labels)
    assert make_metric("accuracy")(out, np.eye(4, dtype=np.float32)[labels] * 0.9) == pytest.approx(1 / 3)
    assert make_metric("top2")(out, labels) == 1.0  # each label is first or second
    assert make_metric("top2")(out, np.array([1, 3, 2])) == pytest.approx(2 / 3)  # 3 is last in row 1
    assert make_metric("top9")(out, np.array([1, 3, 0])) == 1.0
    assert make_metric("within1")(out, labels) == pytest.approx(2 / 3)  # 0 vs 2 is off by two
    assert make_metric("within2")(out, labels) == 1.0
    mae = make_metric("mae")
    assert mae(np.array([[1.0], [3.0]]), np.array([2.0, 2.0])) == 1.0 and mae.signed(1.0) == -1.0
    assert make_metric("mse")(np.array([[1.0], [4.0]]), np.array([2.0, 2.0])) == 2.5
    with pytest.raises(PolicyError, match="use --metric mae"):
        make_metric("accuracy")(out, np.array([0.3, 1.7, 2.2]))


def test_outputs_are_told_apart() -> None:
    z = torch.randn(256, 10) * 3
    assert detect_outputs(z) == "logits"
    assert detect_outputs(torch.sigmoid(z)) == "sigmoid"
    assert detect_outputs(torch.softmax(z, 1)) == "softmax"
    assert detect_outputs(torch.relu(z)) == "logits"  # unbounded above


def test_losses_on_probabilities_equal_the_losses_on_their_logits() -> None:
    torch.manual_seed(0)
    z, zt = torch.randn(64, 10) * 2, torch.randn(64, 10) * 2
    y = torch.randint(0, 10, (64,))
    for loss, squash, kind in (("ce", lambda a: torch.softmax(a, 1), "softmax"), ("bce", torch.sigmoid, "sigmoid")):
        on_logits, on_probs = make_task(loss, outputs="logits"), make_task(loss, outputs=kind)
        assert on_probs.loss(squash(z), y) == pytest.approx(float(on_logits.loss(z, y)), rel=1e-4)
        for t in (1.0, 4.0):
            kd = on_logits.kd_loss(z, zt, t)
            assert on_probs.kd_loss(squash(z), squash(zt), t) == pytest.approx(float(kd), rel=1e-3)
    # a sigmoid output under ce: the NLL of the outputs renormalised to sum to 1
    p = torch.sigmoid(z)
    want = -torch.log(p / p.sum(1, keepdim=True))[torch.arange(64), y].mean()
    assert make_task("ce", outputs="sigmoid").loss(p, y) == pytest.approx(float(want), rel=1e-5)


# -- fine-tuning by the task --------------------------------------------------------------------
@pytest.mark.parametrize(("cls", "loss", "kind", "epochs", "lr"), [
    ("SigmoidCNN", "bce", "sigmoid", 4, 3e-2), ("SigmoidCNN", "ce", "sigmoid", 3, 1e-2),
    ("SoftmaxCNN", "ce", "softmax", 3, 1e-2)])
def test_a_probability_model_learns_and_is_said_to_be_one(digits, cls, loss, kind, epochs, lr) -> None:
    torch.manual_seed(0)
    model = getattr(_user(), cls)()
    acc = make_metric("accuracy")
    before = acc(_outputs(model, digits.x_val), digits.y_val)
    ctx = _ctx(digits, loss)
    out = train(model, ctx, epochs=epochs, lr=lr)
    after = acc(_outputs(model, digits.x_val), digits.y_val)
    assert after > before + 0.3, (before, after)
    assert np.isfinite(out["train_loss"])
    assert ctx.task.outputs == kind
    assert len(ctx.notes) == 1 and f"already {kind} probabilities" in ctx.notes[0]


@pytest.mark.parametrize(("cls", "loss"), [("SigmoidCNN", "bce"), ("SoftmaxCNN", "ce")])
def test_training_on_probabilities_is_training_on_their_logits(digits, cls, loss) -> None:
    """The squashed model trains as its logits twin does under the same loss: nothing squashed twice."""
    class Twin(getattr(_user(), cls)):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.features(x))

    probs, twin = getattr(_user(), cls)(), Twin()
    twin.load_state_dict(probs.state_dict())
    a = train(probs, _ctx(digits, loss), epochs=1, lr=1e-2)
    b = train(twin, _ctx(digits, loss), epochs=1, lr=1e-2)
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    agree = (_outputs(probs, digits.x_val).argmax(1) == _outputs(twin, digits.x_val).argmax(1)).mean()
    assert agree > 0.99


def test_bce_distillation_moves_the_student_to_the_teacher(digits, sigmoid_teacher) -> None:
    x = digits.x_val
    target = _outputs(sigmoid_teacher, x)
    torch.manual_seed(1)
    student = _user().SigmoidCNN(width=8)
    gap = float(np.abs(_outputs(student, x) - target).mean())
    agree = float((_outputs(student, x).argmax(1) == target.argmax(1)).mean())
    train(student, _ctx(digits, "bce"), epochs=4, lr=3e-2, teacher=sigmoid_teacher, alpha=1.0, temperature=2.0)
    out = _outputs(student, x)
    assert float(np.abs(out - target).mean()) < 0.3 * gap
    assert float((out.argmax(1) == target.argmax(1)).mean()) > agree + 0.15
    assert not sigmoid_teacher.training


def test_alpha_1_distillation_ignores_the_labels_for_every_loss(digits, sigmoid_teacher) -> None:
    shuffled = SimpleNamespace(**{**vars(digits), "y_train": np.random.default_rng(0).permutation(digits.y_train)})
    for loss in ("bce", "mse"):
        a, b = _user().SigmoidCNN(), _user().SigmoidCNN()
        b.load_state_dict(a.state_dict())
        train(a, _ctx(digits, loss), epochs=1, lr=1e-2, teacher=sigmoid_teacher, alpha=1.0)
        train(b, _ctx(shuffled, loss), epochs=1, lr=1e-2, teacher=sigmoid_teacher, alpha=1.0)
        assert state_dict_sha1(a) == state_dict_sha1(b), loss


def _regression(seed: int = 0, n: int = 600, k: int = 8) -> SimpleNamespace:
    """y = x . w + noise: a tiny real regression set, split like a data set."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, k)).astype(np.float32)
    y = (x @ rng.standard_normal(k) + 0.05 * rng.standard_normal(n)).astype(np.float32)
    cut = (n * 3 // 5, n * 4 // 5)
    return SimpleNamespace(name="linear", x_train=x[:cut[0]], y_train=y[:cut[0]], x_val=x[cut[0]:cut[1]],
                           y_val=y[cut[0]:cut[1]], input_shape=(k,), num_classes=1)


@pytest.mark.parametrize("loss", ["mse", "l1"])
def test_regression_losses_fit_and_distil(loss) -> None:
    data = _regression()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    task = make_task(loss)
    before = task.metric(_outputs(model, data.x_val), data.y_val)
    train(model, _ctx(data, loss), epochs=30, lr=1e-2, batch_size=32)
    after = task.metric(_outputs(model, data.x_val), data.y_val)
    assert task.metric.name == "mae" and after < 0.3 * before, (before, after)
    # distillation alone: the student's outputs come to the teacher's
    student = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    gap = float(np.abs(_outputs(student, data.x_val) - _outputs(model, data.x_val)).mean())
    train(student, _ctx(data, loss), epochs=30, lr=1e-2, batch_size=32, teacher=model, alpha=1.0)
    assert float(np.abs(_outputs(student, data.x_val) - _outputs(model, data.x_val)).mean()) < 0.3 * gap


# -- a user's loss and metric -------------------------------------------------------------------
def test_user_loss_and_metric_are_the_ones_used(digits) -> None:
    user = _user()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    out = train(model, _ctx(digits, f"{USER}:offset_ce"), epochs=2, lr=1e-2)
    assert out["train_loss"] > 10.0  # the +10 of the user's loss
    blob = export_float_onnx(model, tuple(digits.input_shape))
    acc = onnx_accuracy(blob, digits.x_val, digits.y_val)
    assert acc > 0.8
    task = make_task("ce", f"{USER}:error_rate")
    assert task.metric.name == "error_rate" and not task.metric.higher_is_better
    err = onnx_accuracy(blob, digits.x_val, digits.y_val, metric=task.metric)
    assert err == pytest.approx(1.0 - acc) and task.metric.signed(err) < 0
    # the default metric through the same path gives the batched count's number
    assert onnx_accuracy(blob, digits.x_val, digits.y_val, metric=make_metric("accuracy")) == pytest.approx(acc)
    with pytest.raises(PolicyError, match="without a gradient"):
        train(user.SigmoidCNN(), _ctx(digits, f"{USER}:no_grad_loss"), epochs=1)


def test_int8_calibration_of_a_sigmoid_model(digits, sigmoid_teacher) -> None:
    ctx = _ctx(digits, "bce", "within1")
    q = Policy.of(("int8", {})).apply(sigmoid_teacher, ctx).model
    out = onnx_logits(q, digits.x_val)
    assert out.min() >= -0.01 and out.max() <= 1.01  # still probabilities after quantisation
    metric = ctx.task.metric
    float_score = metric(_outputs(sigmoid_teacher, digits.x_val), digits.y_val)
    assert onnx_accuracy(q, digits.x_val, digits.y_val, metric=metric) >= float_score - 0.05 > 0.5


# -- the CLI ------------------------------------------------------------------------------------
def test_bad_loss_or_metric_exits_2_with_one_line(tmp_path, capsys) -> None:
    base = ["compress", "--model", f"{USER}:sigmoid_cnn", "--dataset", "digits", "--int8"]
    assert main([*base, "--out", str(tmp_path / "a"), "--loss", "bc"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and all(name in err for name in ("bce", "ce", "l1", "mse", "module:function"))
    assert main([*base, "--out", str(tmp_path / "b"), "--metric", "no_such_pkg.m:f"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--metric 'no_such_pkg.m:f'" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_compress_a_sigmoid_model_with_bce_and_within1(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    args = ["compress", "--model", f"{USER}:sigmoid_cnn", "--dataset", "digits", "--out", str(out), "--prune", "0.3",
            "--kd", "--finetune-epochs", "1", "--loss", "bce", "--metric", "within1"]
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    row = pd.read_csv(out / "compress.csv").iloc[0]
    assert row.status == "complete"
    assert row.val_acc == row.val_within1 and 0 <= row.val_within1 <= 1 and "base_val_within1" in row
    assert row.acc_drop == pytest.approx(100 * (row.base_val_within1 - row.val_within1))
    assert "val_within1=" in printed and "already sigmoid probabilities" in printed
    cfg = json.loads((out / "compress.json").read_text())
    assert (cfg["loss"], cfg["metric"]) == ("bce", "within1")  # --resume measures the same way
    (kept,) = (out / "compressed").iterdir()
    notes = json.loads((kept / "policy.json").read_text())["notes"]
    assert any("BCE on them as they are" in n for n in notes)


# -- float labels through the CLI (nas.data: (N, K) rows are multi-label, non-integer floats regression)
def _npz(path: Path, kind: str, n: int = 1500) -> Path:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 16)).astype(np.float32)
    w = rng.standard_normal((16, 5))
    y = (x @ w > 0).astype(np.float32) if kind == "multilabel" else (x @ w[:, 0] + 0.1).astype(np.float32)
    np.savez(path, x=x, y=y)
    return path


def test_multilabel_rows_default_to_bce_with_a_user_metric(tmp_path, capsys) -> None:
    out = tmp_path / "ml"
    args = ["compress", "--model", f"{USER}:sigmoid_mlp", "--dataset", str(_npz(tmp_path / "ml.npz", "multilabel")),
            "--out", str(out), "--prune", "0.25", "--finetune-epochs", "5", "--finetune-lr", "1e-2", "--metric", f"{USER}:hamming", "--quiet"]
    assert main(args) == 0, capsys.readouterr().err
    assert "fine-tuning loss: bce" in capsys.readouterr().out
    assert json.loads((out / "compress.json").read_text())["loss"] == "bce"  # resolved, kept for --resume
    row = pd.read_csv(out / "compress.csv").iloc[0]
    # an untrained model is near 0.5 per target; fine-tuning with bce on the rows learns them
    assert row.status == "complete" and row.val_acc == row.val_hamming > row.base_val_hamming + 0.2


def test_regression_targets_default_to_mse_measured_by_mae(tmp_path, capsys) -> None:
    out = tmp_path / "reg"
    args = ["compress", "--model", f"{USER}:regression_mlp", "--dataset", str(_npz(tmp_path / "reg.npz", "regression")),
            "--out", str(out), "--prune", "0.25", "--kd", "--finetune-epochs", "3", "--quiet"]
    assert main(args) == 0, capsys.readouterr().err
    row = pd.read_csv(out / "compress.csv").iloc[0]
    assert row.status == "complete" and row.val_mae > 0 and row.val_acc == -row.val_mae
    assert row.acc_drop == pytest.approx(100 * (row.val_mae - row.base_val_mae))


def test_taylor_importance_takes_the_task_loss_on_multilabel_rows() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    y = (x @ rng.standard_normal((16, 5)) > 0).astype(np.float32)
    data = SimpleNamespace(name="rows", x_train=x, y_train=y, input_shape=(16,), num_classes=5)
    ctx = _ctx(data, "bce")
    model = _user().sigmoid_mlp((16,), 5)
    pruned = Policy.of(("structured", {"ratio": 0.25, "importance": "taylor"})).apply(model, ctx).model
    assert pruned[0].out_features < model[0].out_features
    assert ctx.task.outputs == "sigmoid" and any("sigmoid" in n for n in ctx.notes)  # probed, said once
