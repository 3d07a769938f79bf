"""`nas-run compress --model`: a user's own model, as builder + state dict and as TorchScript,
compressed through the CLI; the user's files are never modified; bad input exits 2."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from nas_run.cli import main

BUILDER = f"{Path(__file__).parent / 'user_models.py'}:resnet_cnn"


def _sha(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    import sys

    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).parent))
    from user_models import resnet_cnn

    torch.manual_seed(0)
    model = resnet_cnn(num_classes=10, in_channels=1)
    path = tmp_path_factory.mktemp("user") / "cnn.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_builder_and_state_dict_pruned_and_nni_config(weights, tmp_path, capsys):
    before = _sha(weights)
    nni = tmp_path / "nni.json"
    nni.write_text(json.dumps([{"op_types": ["Conv2d"], "sparse_ratio": 0.5}]))
    out = tmp_path / "out"
    args = ["compress", "--model", BUILDER, "--weights", str(weights), "--dataset", "digits", "--out", str(out),
            "--prune", "0.5", "--finetune-epochs", "1", "--nni-config", str(nni), "--quiet"]
    assert main(args) == 0, capsys.readouterr().err
    table = pd.read_csv(out / "compress.csv")
    assert len(table) == 2 and set(table.status) == {"complete"}
    pruned = table[table.policy.str.contains('"structured"')].iloc[0]
    assert pruned.params < pruned.base_params and pruned.flops > 0
    sparse = table[table.policy.str.contains('"unstructured"')].iloc[0]
    assert sparse.sparsity > 0.3  # NNI's element-wise 0.5 on the convs, of all weights
    assert "no speed-up" in capsys.readouterr().out  # said, not hidden
    assert _sha(weights) == before  # the user's weights are never modified
    # resume of a finished compression run: nothing to do, nothing repeated
    assert main(["compress", "--resume", str(out), "--quiet"]) == 0
    assert len(pd.read_csv(out / "compress.csv")) == 2


def test_torchscript_model_int8_and_pruned_through_its_graph(weights, tmp_path, capsys):
    import sys

    from safetensors.torch import load_file

    sys.path.insert(0, str(Path(__file__).parent))
    from user_models import resnet_cnn

    model = resnet_cnn(num_classes=10, in_channels=1)
    model.load_state_dict(load_file(str(weights)))
    ts = tmp_path / "cnn.pt"
    torch.jit.save(torch.jit.script(model.eval()), str(ts))
    before = _sha(ts)
    out = tmp_path / "ts"
    assert main(["compress", "--model", str(ts), "--dataset", "digits", "--out", str(out), "--int8", "--quiet"]) == 0
    row = pd.read_csv(out / "compress.csv").iloc[0]
    assert row.status == "complete" and row.file_bytes < row.base_file_bytes
    assert (out / "compressed").is_dir()
    # structured pruning of a TorchScript file: its graph becomes an eager module first
    pruned = tmp_path / "ts2"
    args = ["compress", "--model", str(ts), "--dataset", "digits", "--out", str(pruned), "--prune", "0.5",
            "--finetune-epochs", "1", "--quiet"]
    assert main(args) == 0, capsys.readouterr().err
    row = pd.read_csv(pruned / "compress.csv").iloc[0]
    assert row.status == "complete" and row.params < row.base_params and row.flops > 0
    assert _sha(ts) == before
    # an op the converter does not know: one line naming it, nothing written
    capsys.readouterr()
    odd = tmp_path / "topk.pt"
    torch.jit.save(torch.jit.script(_TopK().eval()), str(odd))
    refused = tmp_path / "ts3"
    assert main(["compress", "--model", str(odd), "--dataset", "digits", "--out", str(refused), "--prune", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "TopK" in err and err.count("\n") == 0
    assert not refused.exists()


class _TopK(torch.nn.Module):
    """Logits through a sort-like op (TopK), which the ONNX-to-eager converter refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.topk(self.conv(x).flatten(1), 10).values


def test_a_data_set_the_model_rejects_is_one_line(weights, tmp_path, capsys):
    out = tmp_path / "o"
    # mnist1d is (1, 40): a 2-D CNN cannot take it
    code = main(["compress", "--model", BUILDER, "--weights", str(weights), "--dataset", "mnist1d", "--out", str(out), "--int8"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nas-run: error" in err
    assert not out.exists()
