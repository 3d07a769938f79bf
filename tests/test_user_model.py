"""A user's own model: TorchScript, builder + .pt, builder + .safetensors; every bad input is one
clear PolicyError naming the file or callable; the user's files are never modified."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from compress.errors import PolicyError
from compress.user_model import UserModel, check_input, load_user_model, require_eager
from nas.data import load_dataset
from tests.user_models import resnet_cnn

BUILDER = "tests.user_models:resnet_cnn"


def sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


@pytest.fixture
def original() -> torch.nn.Module:
    torch.manual_seed(0)
    model = resnet_cnn()
    with torch.no_grad():  # non-default BN statistics, so loading them is checked too
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def same_outputs(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.equal(a(x), b(x))


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))


# -- happy paths -----------------------------------------------------------------------------------
def test_builder_with_pt_state_dict(tmp_path, original, x, digits) -> None:
    path = tmp_path / "w.pt"
    torch.save(original.state_dict(), path)
    before = sha1(path)
    um = load_user_model(BUILDER, str(path))
    assert isinstance(um, UserModel) and um.kind == "builder" and um.weights == str(path)
    assert not um.module.training
    assert same_outputs(um.module, original, x)
    check_input(um.module, digits)
    require_eager(um, "structured")  # an eager model may be pruned
    with torch.no_grad():  # whatever a pass does to the module afterwards, the file stays as it was
        for p in um.module.parameters():
            p.zero_()
    assert sha1(path) == before


def test_builder_with_safetensors(tmp_path, original, x) -> None:
    path = tmp_path / "w.safetensors"
    save_file(original.state_dict(), str(path))
    before = sha1(path)
    um = load_user_model(BUILDER, str(path))
    assert um.kind == "builder" and same_outputs(um.module, original, x)
    assert sha1(path) == before


def test_torchscript_file(tmp_path, original, x, digits) -> None:
    path = tmp_path / "model.ts"
    torch.jit.save(torch.jit.script(original), str(path))
    before = sha1(path)
    um = load_user_model(str(path))
    assert um.kind == "torchscript" and um.weights is None and not um.module.training
    assert same_outputs(um.module, original, x)
    check_input(um.module, digits)
    assert um.sha1 == load_user_model(str(path)).sha1  # identity from the file
    with pytest.raises(PolicyError, match=r"'structured'.*TorchScript model can only be quantized"):
        require_eager(um, "structured")
    with pytest.raises(PolicyError, match="give a builder \\+ state dict"):
        require_eager(um.module, "lowrank")  # the bare module is recognised too
    holder = SimpleNamespace(module=um.module, kind="torchscript", acc=0.5)  # any record of that shape
    with pytest.raises(PolicyError, match="'unstructured': a TorchScript model"):
        require_eager(holder, "unstructured")
    require_eager(SimpleNamespace(module=original, kind="eager"), "structured")
    assert sha1(path) == before


def test_torchscript_file_with_a_state_dict(tmp_path, original, x) -> None:
    path = tmp_path / "model.pt"
    torch.jit.save(torch.jit.script(resnet_cnn()), str(path))  # other weights than `original`
    weights = tmp_path / "w.safetensors"
    save_file(original.state_dict(), str(weights))
    um = load_user_model(str(path), str(weights))
    assert um.kind == "torchscript" and same_outputs(um.module, original, x)
    assert um.sha1 != load_user_model(str(path)).sha1


def test_builder_from_a_file_path_and_keywords(tmp_path, original, x) -> None:
    src = Path(__file__).with_name("user_models.py")
    um = load_user_model(f"{src}:resnet_cnn_shaped", input_shape=(3, 8, 8), num_classes=4)
    assert um.module.stem[0].in_channels == 3 and um.module.fc.out_features == 4
    # keywords go only to a builder that takes them
    assert (
        load_user_model(f"{src}:fixed_cnn", input_shape=(3, 8, 8), num_classes=4).module.fc.out_features == 10
    )
    assert load_user_model(BUILDER, num_classes=7).module.fc.out_features == 7


def test_identity_depends_on_the_weights(tmp_path, original) -> None:
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(original.state_dict(), a)
    state = original.state_dict()
    state["fc.bias"] = state["fc.bias"] + 1
    torch.save(state, b)
    ids = {load_user_model(BUILDER, str(p)).sha1 for p in (a, b, a)}
    assert len(ids) == 2
    assert load_user_model(BUILDER).sha1 != load_user_model(BUILDER, str(a)).sha1


# -- check_input -----------------------------------------------------------------------------------
def test_check_input_names_the_shapes(digits) -> None:
    with pytest.raises(PolicyError, match=r"returns shape \(8, 3\).*expected \(8, K\) with K >= 10"):
        check_input(resnet_cnn(num_classes=3), digits)
    with pytest.raises(PolicyError, match=r"fails on a batch of digits of shape \(8, 1, 8, 8\)"):
        check_input(resnet_cnn(in_channels=3), digits)


# -- bad input ---------------------------------------------------------------------------------------
def test_spec_file_missing(tmp_path) -> None:
    with pytest.raises(PolicyError, match=r"model file not found: '.*nope\.pt'"):
        load_user_model(str(tmp_path / "nope.pt"))
    with pytest.raises(PolicyError, match=r"builder file not found: '.*nope\.py'"):
        load_user_model(f"{tmp_path / 'nope.py'}:build")


def test_module_cannot_be_imported(tmp_path) -> None:
    with pytest.raises(PolicyError, match=r"cannot import module 'no_such_pkg_xyz\.models'.*No module named"):
        load_user_model("no_such_pkg_xyz.models:build")
    broken = tmp_path / "broken.py"
    broken.write_text("import not_installed_dependency_xyz\n\ndef build():\n    pass\n")
    with pytest.raises(
        PolicyError,
        match=r"broken\.py' failed: ModuleNotFoundError: No module named 'not_installed_dependency_xyz'",
    ):
        load_user_model(f"{broken}:build")
    bad_syntax = tmp_path / "bad_syntax.py"
    bad_syntax.write_text("def build(:\n")
    with pytest.raises(PolicyError, match=r"bad_syntax\.py' failed: SyntaxError"):
        load_user_model(f"{bad_syntax}:build")


def test_no_such_callable() -> None:
    with pytest.raises(
        PolicyError,
        match=r"'tests\.user_models' has no callable 'resnet_cnx' \(did you mean 'resnet_cnn'\?\)",
    ):
        load_user_model("tests.user_models:resnet_cnx")
    with pytest.raises(PolicyError, match="'NOT_CALLABLE' in 'tests.user_models' is a int, not a callable"):
        load_user_model("tests.user_models:NOT_CALLABLE")


def test_builder_raises_or_returns_no_module() -> None:
    with pytest.raises(
        PolicyError, match=r"tests\.user_models:raises.*raised RuntimeError: the builder's own bug"
    ):
        load_user_model("tests.user_models:raises")
    with pytest.raises(PolicyError, match=r"returned a dict, not a torch\.nn\.Module"):
        load_user_model("tests.user_models:not_a_module")


def test_weights_file_missing(tmp_path) -> None:
    with pytest.raises(PolicyError, match=r"weights file not found: '.*w\.pt'"):
        load_user_model(BUILDER, str(tmp_path / "w.pt"))


def test_weights_not_a_state_dict(tmp_path, original) -> None:
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(PolicyError, match=r"tensor\.pt' hold a Tensor, not a state dict"):
        load_user_model(BUILDER, str(tensor))
    checkpoint = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": original.state_dict()}, checkpoint)
    with pytest.raises(PolicyError, match=r"'epoch' is a int, not a tensor.*save checkpoint\['state_dict'\]"):
        load_user_model(BUILDER, str(checkpoint))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_truncated(tmp_path, original, suffix) -> None:
    good = tmp_path / f"good{suffix}"
    if suffix == ".pt":
        torch.save(original.state_dict(), good)
    else:
        save_file(original.state_dict(), str(good))
    data = good.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(PolicyError, match=rf"cut\{suffix}'.*truncated or corrupted"):
        load_user_model(BUILDER, str(cut))


def test_weights_garbage(tmp_path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(PolicyError, match=r"junk\.pt': not a PyTorch state-dict file"):
        load_user_model(BUILDER, str(junk))


def test_pickled_model_is_refused(tmp_path, original) -> None:
    whole = tmp_path / "whole.pt"
    torch.save(original, whole)  # the whole module, pickled: weights_only refuses it
    with pytest.raises(
        PolicyError, match=r"whole\.pt' holds pickled Python objects.*ResNetCNN.*only tensors are accepted"
    ):
        load_user_model(BUILDER, str(whole))
    legacy = tmp_path / "legacy.pth"
    torch.save(original, legacy, _use_new_zipfile_serialization=False)  # pre-1.6 format, no zip
    with pytest.raises(
        PolicyError, match=r"legacy\.pth' holds pickled Python objects.*only tensors are accepted"
    ):
        load_user_model(BUILDER, str(legacy))
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"fc.weight": [[1.0]]}, protocol=2))  # not even a torch file
    with pytest.raises(PolicyError, match=r"plain\.pkl'.*not a PyTorch state-dict file"):
        load_user_model(BUILDER, str(plain))


def test_weights_that_do_not_fit(tmp_path, original) -> None:
    state = original.state_dict()
    fewer = {k: v for k, v in state.items() if not k.startswith("layer2.")}
    path = tmp_path / "fewer.pt"
    torch.save(fewer, path)
    with pytest.raises(
        PolicyError,
        match=r"fewer\.pt' do not fit model 'tests\.user_models:resnet_cnn': missing \d+ key\(s\) 'layer2\.[^']+', '[^']+', '[^']+' \(\+\d+ more\)",
    ):
        load_user_model(BUILDER, str(path))

    extra = {**state, "head.weight": torch.zeros(2)}
    torch.save(extra, path)
    with pytest.raises(PolicyError, match=r"unexpected 1 key\(s\) 'head\.weight'"):
        load_user_model(BUILDER, str(path))

    wrapped = {f"module.{k}": v for k, v in state.items()}
    torch.save(wrapped, path)
    with pytest.raises(PolicyError, match="strip the 'module.' prefix"):
        load_user_model(BUILDER, str(path))

    reshaped = dict(state)
    reshaped["fc.weight"] = torch.zeros(5, 16)
    torch.save(reshaped, path)
    with pytest.raises(
        PolicyError, match=r"'fc\.weight' has shape \(5, 16\) in the file, \(10, 16\) in the model"
    ):
        load_user_model(BUILDER, str(path))


def test_state_dict_given_as_the_model(tmp_path, original) -> None:
    path = tmp_path / "w.pt"
    torch.save(original.state_dict(), path)
    with pytest.raises(PolicyError, match=r"torch\.save file .*not TorchScript.*--weights"):
        load_user_model(str(path))
    st = tmp_path / "w.safetensors"
    save_file(original.state_dict(), str(st))
    with pytest.raises(PolicyError, match=r"safetensors state dict, not a model"):
        load_user_model(str(st))


def test_torchscript_truncated_or_not_a_model(tmp_path, original) -> None:
    good = tmp_path / "m.pt"
    torch.jit.save(torch.jit.script(original), str(good))
    data = good.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(PolicyError, match=r"cut\.pt': truncated or corrupted"):
        load_user_model(str(cut))
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(PolicyError, match=r"notes\.pt': not a TorchScript file"):
        load_user_model(str(text))
    with pytest.raises(PolicyError, match="is a TorchScript model, not a state dict"):
        load_user_model(BUILDER, str(good))


def test_bad_spec_syntax() -> None:
    with pytest.raises(PolicyError, match="a builder is written package.module:callable"):
        load_user_model("tests.user_models:")
    with pytest.raises(PolicyError, match="neither a module name"):
        load_user_model("not a module:build")


def test_messages_are_one_line(tmp_path) -> None:
    bad_syntax = tmp_path / "multi.py"
    bad_syntax.write_text("raise ValueError('first line\\nsecond line')\n")
    with pytest.raises(PolicyError) as info:
        load_user_model(f"{bad_syntax}:build")
    assert "\n" not in str(info.value) and "first line second line" in str(info.value)
