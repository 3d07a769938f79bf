"""`nas-run export`: every format of every registered space round-trips (written, loaded back in
its runtime, same outputs as the trial's model), a compressed model too; int8 states its
accuracy drop; tampered, truncated or mismatched files are refused; bad input is one line."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from compress.passes.base import PassContext
from compress.policy import Policy
from compress.run import CompressConfig, run_compress
from export import load_model
from export.formats import ExportCheckError, ExportError, load_export, sidecar_path
from export.trial import export_trial, exports_of, verify_export
from nas.config import SearchConfig
from nas.data import load_dataset
from nas.search import open_store, read_config, run_search
from search_spaces import ConfigError, get_space, list_spaces

SPACES = sorted(info.name for info in list_spaces())
FLOAT_FORMATS = ("onnx", "torchscript", "safetensors")
PRUNE = Policy.of(("structured", {"ratio": 0.5}), ("finetune", {"epochs": 1}))
INT8 = Policy.of(("int8", {}))
CELL_OPTIONS = {"cells_per_stage": 1, "init_filters": 4, "reductions": 1}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One tiny finished search (1 trial, 1 epoch, digits) per registered space; the
    large-kernel one is also compressed (structured + fine-tuning, and int8)."""
    root = tmp_path_factory.mktemp("export-runs")
    out = {}
    for space in SPACES:
        # the cell spaces' tiny setting still costs seconds per forward pass on 2 shared cores:
        # smaller still (4 filters, one reduction) keeps this file within a minute
        small = {"tiny": False, "space_options": CELL_OPTIONS} if space in ("darts", "nasnet") else {}
        cfg = SearchConfig(space=space, dataset="digits", strategy="random", trials=1, epochs=1,
                           out=str(root / space), **small)
        run_search(cfg)
        out[space] = root / space
    run_compress(CompressConfig(run=str(out["unireplk"]), top_k=1, policies=(PRUNE.to_str(), INT8.to_str())))
    return out


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def _trial(run: Path, stage: str, policy: str = "") -> dict:
    recs = [r for r in open_store(run, read_only=True).records() if r["stage"] == stage and r["policy"] == policy]
    assert recs and recs[0]["status"] == "complete"
    return recs[0]


def _trained_logits(run: Path, space: str, digits) -> np.ndarray:
    """The oracle: the trial's model rebuilt by hand from its genotype and kept weights."""
    rec = _trial(run, "search")
    cfg = read_config(run)
    sp = get_space(space, **cfg.space_options)
    sp = sp.tiny() if cfg.tiny else sp
    model = sp.build(sp.from_str(rec["genotype"]), digits.input_shape, digits.num_classes)
    model.load_state_dict(load_file(str(run / "weights" / f"{rec['genotype_id']}-s0-e1.safetensors")))
    with torch.no_grad():
        return model.eval()(torch.as_tensor(digits.x_val[:])).numpy()


@pytest.mark.parametrize("space", SPACES)
def test_every_format_round_trips_with_the_trials_outputs(runs, space, digits, tmp_path):
    want = _trained_logits(runs[space], space, digits)
    trial = _trial(runs[space], "search")["number"]
    for fmt in (*FLOAT_FORMATS, "onnx-int8"):
        path = tmp_path / f"model.{fmt}"
        # no --trial: the best one; the large-kernel run also holds compressed trials, which the
        # default may pick (tests/test_export_pick.py), so its architecture is named
        r = export_trial(runs[space], trial=trial if space == "unireplk" else None, format=fmt, out=path)
        assert r.path == path and path.is_file() and r.trial == trial and r.check["passed"]
        loaded = load_export(path)
        meta = loaded.metadata
        assert meta["genotype"] == _trial(runs[space], "search")["genotype"] and meta["space"] == space
        assert meta["input_spec"]["shape"] == ["batch", *digits.input_shape]
        assert len(meta["input_spec"]["standardize"]["mean"]) == digits.input_shape[0]
        assert meta["metrics"]["val_acc"] == pytest.approx(_trial(runs[space], "search")["metrics"]["val_acc"])
        got = loaded.predict(digits.x_val)
        if fmt == "onnx-int8":
            acc = float((got.argmax(1) == digits.y_val).mean())
            assert r.check["val_acc"] == pytest.approx(acc)
            float_acc = float((want.argmax(1) == digits.y_val).mean())
            assert r.check["acc_drop_pts"] == pytest.approx(100 * (float_acc - acc))
            assert "drop" in r.check["summary"] and any("per-channel" in n for n in r.notes)
            assert [p["pass"] for p in json.loads(meta["policy"])["passes"]] == ["int8"]
        else:
            assert np.abs(got - want).max() <= 1e-4, fmt
        if fmt.startswith("onnx"):
            assert r.opset == 17 and meta["opset"] == 17
            assert loaded.model.get_inputs()[0].shape[0] == "batch"  # dynamic batch axis
            assert loaded.predict(digits.x_val[:1]).shape == (1, digits.num_classes)
        if fmt == "safetensors":  # rebuilt without a pickle; BatchNorms after convs folded
            model = load_model(path)
            assert isinstance(model, torch.nn.Module) and not isinstance(model, torch.jit.ScriptModule)
            bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
            assert len(bns) <= 1  # nb201's last BN follows a cell, not a conv
    recorded = exports_of(open_store(runs[space], read_only=True), trial)
    assert [e["format"] for e in recorded][-4:] == [*FLOAT_FORMATS, "onnx-int8"]
    assert all(e["check"]["passed"] for e in recorded)


def test_compressed_model_exports_and_reloads_with_identical_outputs(runs, digits, tmp_path):
    run = runs["unireplk"]
    rec = _trial(run, "compress", PRUNE.to_str())
    # the oracle, by hand: build, replay the records of the policy as applied (pruned in the
    # training form, then merged), load the fine-tuned weights
    sp = get_space("unireplk").tiny()
    base = sp.build(sp.from_str(rec["genotype"]), digits.input_shape, digits.num_classes).eval()
    folder = run / "compressed" / f"{rec['genotype_id']}+{PRUNE.id}"
    kept = json.loads((folder / "policy.json").read_text())
    applied = Policy.from_json(kept["applied"])
    assert [p.name for p in applied.passes] == ["structured", "finetune", "bn_recalib", "merge"]
    model = applied.replay(base, kept["records"], PassContext(data=digits))
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    with torch.no_grad():
        want = model.eval()(torch.as_tensor(digits.x_val[:])).numpy()
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in base.parameters())

    arch = _trial(run, "search")["number"]
    st = export_trial(run, trial=arch, policy="structured", format="safetensors", out=tmp_path / "pruned.safetensors")
    assert st.trial == rec["number"] and st.check["passed"] and "structured" in st.policy_label
    again = load_model(tmp_path / "pruned.safetensors")
    with torch.no_grad():
        assert np.array_equal(again(torch.as_tensor(digits.x_val[:])).numpy(), want)  # identical
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    for fmt in ("onnx", "torchscript"):
        r = export_trial(run, trial=rec["number"], format=fmt, out=tmp_path / f"pruned.{fmt}")
        assert np.abs(load_export(r.path).predict(digits.x_val) - want).max() <= 1e-4
    by_id = export_trial(run, policy=PRUNE.id, format="onnx-int8", out=tmp_path / "pruned-int8.onnx")
    assert by_id.trial == rec["number"] and "drop" in by_id.check["summary"]
    assert [p["pass"] for p in json.loads(by_id.metadata["policy"])["passes"]] == ["structured", "finetune", "int8"]
    applied = json.loads(by_id.metadata["applied_policy"])["passes"]
    assert [p["pass"] for p in applied] == ["structured", "finetune", "bn_recalib", "merge", "int8"]
    assert verify_export(by_id.path)["passed"]  # the int8 record replays to the same model


def test_an_int8_trial_exports_as_its_kept_onnx_with_the_accuracy_drop(runs, tmp_path):
    run = runs["unireplk"]
    rec = _trial(run, "compress", INT8.to_str())
    r = export_trial(run, policy="int8", format="onnx-int8", out=tmp_path / "q.onnx")
    assert r.trial == rec["number"]
    assert r.check["val_acc"] == pytest.approx(rec["metrics"]["val_acc"])  # re-measured in ORT
    assert r.check["acc_drop_pts"] == pytest.approx(rec["metrics"]["acc_drop"])
    assert r.check["max_abs_diff"] == 0.0
    with pytest.raises(ConfigError, match="only as onnx-int8"):
        export_trial(run, trial=rec["number"], format="onnx", out=tmp_path / "f.onnx")


def test_tampered_truncated_and_mismatched_files_are_refused(runs, tmp_path):
    import onnx
    from onnx import numpy_helper

    run = runs["nb201"]
    path = export_trial(run, format="onnx", out=tmp_path / "m.onnx").path
    proto = onnx.load(str(path))
    init = next(i for i in proto.graph.initializer if i.dims and int(np.prod(i.dims)) > 8)
    arr = numpy_helper.to_array(init).copy()
    arr.flat[0] += 1.0
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(proto, str(tmp_path / "edited.onnx"))
    with pytest.raises(ExportError, match="modified after export"):
        load_export(tmp_path / "edited.onnx")
    # a forgery that also rewrote the whole manifest loads (hashes prove integrity, not authorship),
    # but the parity check against the run fails loudly
    from compress.export_manifest import STR_KEYS, onnx_sha256
    from export.formats import _seal

    meta = {p.key: (p.value if p.key in STR_KEYS else json.loads(p.value)) for p in proto.metadata_props}
    _seal(meta, *onnx_sha256(proto))
    for p in proto.metadata_props:
        p.value = meta[p.key] if p.key in STR_KEYS else json.dumps(meta[p.key])
    onnx.save(proto, str(tmp_path / "forged.onnx"))
    load_export(tmp_path / "forged.onnx")
    with pytest.raises(ExportCheckError, match="max abs diff"):
        verify_export(tmp_path / "forged.onnx")
    assert verify_export(path)["passed"]
    data = path.read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match="cut.onnx"):
        load_export(tmp_path / "cut.onnx")

    st = export_trial(run, format="safetensors", out=tmp_path / "w.safetensors").path
    blob = st.read_bytes()
    shutil.copy(sidecar_path(st), sidecar_path(tmp_path / "cut.safetensors"))
    (tmp_path / "cut.safetensors").write_bytes(blob[:-100])
    with pytest.raises(ExportError, match="does not match its sidecar"):
        load_model(tmp_path / "cut.safetensors")
    # a sidecar of another model (another space's export) next to these weights
    other = export_trial(runs["unireplk"], format="safetensors", out=tmp_path / "o.safetensors").path
    shutil.copy(st, tmp_path / "mixed.safetensors")
    shutil.copy(sidecar_path(other), sidecar_path(tmp_path / "mixed.safetensors"))
    with pytest.raises(ExportError, match="does not match its sidecar"):
        load_model(tmp_path / "mixed.safetensors")
    # a sidecar whose genotype alone was edited: its manifest's metadata hash differs
    side = json.loads(sidecar_path(st).read_text())
    sp = get_space("nb201").tiny()
    side["genotype"] = sp.sample(np.random.default_rng(7)).to_str()
    assert side["genotype"] != json.loads(sidecar_path(st).read_text())["genotype"]
    shutil.copy(st, tmp_path / "regen.safetensors")
    sidecar_path(tmp_path / "regen.safetensors").write_text(json.dumps(side))
    with pytest.raises(ExportError, match="metadata were modified"):
        load_model(tmp_path / "regen.safetensors")
    (tmp_path / "lonely.safetensors").write_bytes(blob)
    with pytest.raises(ExportError, match="no sidecar"):
        load_model(tmp_path / "lonely.safetensors")

    ts = export_trial(run, format="torchscript", out=tmp_path / "m.pt").path
    (tmp_path / "cut.pt").write_bytes(ts.read_bytes()[:-200])
    with pytest.raises(ExportError, match="cut.pt"):
        load_model(tmp_path / "cut.pt")


def test_bad_input_is_one_clear_config_error(runs, tmp_path):
    from nas.trial import Candidate, TrialResult
    from search_spaces import Genotype

    run = runs["nb201"]
    with pytest.raises(ConfigError, match="not a run folder"):
        export_trial(tmp_path, format="onnx", out=tmp_path / "x.onnx")
    with pytest.raises(ConfigError, match="no trial 99"):
        export_trial(run, trial=99, format="onnx", out=tmp_path / "x.onnx")
    with pytest.raises(ConfigError, match="unknown export format 'tflite'"):
        export_trial(run, format="tflite", out=tmp_path / "x.onnx")
    (tmp_path / "afile").write_text("")
    with pytest.raises(ConfigError, match="cannot write --out"):
        export_trial(run, format="onnx", out=tmp_path / "afile" / "x.onnx")
    with pytest.raises(ConfigError, match="is a folder"):
        export_trial(run, format="onnx", out=tmp_path)
    with pytest.raises(ConfigError, match="no compression trials"):
        export_trial(run, policy="int8", format="onnx", out=tmp_path / "x.onnx")
    with pytest.raises(ConfigError, match="no compression trial matching --policy 'lowrank'"):
        export_trial(runs["unireplk"], policy="lowrank", format="onnx", out=tmp_path / "x.onnx")
    # a failed and a stopped trial, in a copy of the run
    copy = tmp_path / "copy" / run.name  # the study is named after the folder
    shutil.copytree(run, copy)
    store = open_store(copy)
    g = Genotype.from_str(_trial(copy, "search")["genotype"])
    for status, error in (("failed", "RuntimeError: out of memory"), ("stopped", "")):
        number = store.start(g.to_str(), g.id, 1, "random", 0)
        store.finish(Candidate(g, 1, number), TrialResult(status, {}, (), error, 1.0))
        with pytest.raises(ConfigError, match=f"trial {number} (failed \\(RuntimeError|was stopped)"):
            export_trial(copy, trial=number, format="onnx", out=tmp_path / "x.onnx")
    shutil.rmtree(copy / "weights")
    with pytest.raises(ConfigError, match="no trained weights.*re-run the search, or compress it"):
        export_trial(copy, format="onnx", out=tmp_path / "x.onnx")
    assert not list(tmp_path.glob("x.onnx*")) and not list(tmp_path.glob(".x.onnx*"))


def test_export_command_prints_path_format_opset_and_check(runs, tmp_path, capsys):
    from nas_run.export_cmd import add_export_parser, export_command

    parser = argparse.ArgumentParser()
    add_export_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "m.onnx"
    args = parser.parse_args(["export", str(runs["nb201"]), "--trial", "0", "--format", "onnx", "--out", str(out)])
    assert export_command(args) == 0
    text = capsys.readouterr().out
    assert f"exported trial 0 as onnx, opset 17, dynamic batch axis: {out}" in text
    assert "check:    passed: max abs diff" in text and "recorded in the store" in text


def test_a_failed_check_writes_nothing_and_the_command_exits_1(runs, tmp_path, capsys, monkeypatch):
    import export.trial as export
    from nas_run.export_cmd import add_export_parser, export_command

    def corrupting(loaded, ref, q_bytes, data):  # as if the file had come back different
        return {"passed": False, "summary": "max abs diff 3.1e-01 > 0.0001 on 359 validation samples"}

    monkeypatch.setattr(export, "parity_check", corrupting)
    out = tmp_path / "m.safetensors"
    with pytest.raises(ExportCheckError, match="nothing was written"):
        export_trial(runs["nb201"], format="safetensors", out=out)
    assert list(tmp_path.iterdir()) == []  # neither the file, its sidecar nor a temporary one
    parser = argparse.ArgumentParser()
    add_export_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", str(runs["nb201"]), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert export_command(args) == 1
    assert "export check failed" in capsys.readouterr().err and not (tmp_path / "m.onnx").exists()


def test_cli_export_bad_input_exits_2(runs, tmp_path, capsys):
    from nas_run.cli import build_parser, main

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    if "export" not in sub.choices:
        pytest.skip("nas_run.cli does not wire `export` yet")
    assert main(["export", str(runs["nb201"]), "--trial", "42", "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nas-run: error: ") and "no trial 42" in err and len(err.strip().splitlines()) == 1


def test_fold_batchnorm_folds_only_pairs_it_can_prove_safe():
    from torch import nn

    from export.formats import fold_batchnorm
    from search_spaces.nasnet_ops import FactorizedReduce

    class Both(nn.Sequential):  # its own forward also uses the conv's output: not foldable
        def forward(self, x):
            y = self[0](x)
            return self[1](y) + y

    shared = nn.Conv2d(4, 4, 3, padding=1)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),  # folded
        nn.Sequential(nn.Conv2d(4, 2, 1, bias=False), nn.Conv2d(2, 4, 1)), nn.BatchNorm2d(4),  # low-rank pair: folded
        Both(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)),  # kept
        shared, nn.BatchNorm2d(4), shared,  # a conv used twice: kept
        FactorizedReduce(4, 6),  # its BN split over the two convs: folded
    )
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-1, 1)
    model.eval()
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        want = model(x)
        assert fold_batchnorm(model) == 3
        assert torch.allclose(model(x), want, atol=1e-5)
    kept = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert kept == ["5.1", "7"]


@pytest.mark.slow
def test_a_users_builder_model_exports_and_reloads(tmp_path, digits):
    from safetensors.torch import save_file

    builder = f"{Path(__file__).parent / 'user_models.py'}:resnet_cnn"
    from compress.user_model import load_user_model

    user = load_user_model(builder, None, digits.input_shape, digits.num_classes)
    save_file({k: v.contiguous() for k, v in user.module.state_dict().items()}, str(tmp_path / "w.safetensors"))
    out = tmp_path / "mine"
    run_compress(CompressConfig(model=builder, weights=str(tmp_path / "w.safetensors"), dataset="digits",
                                out=str(out), policies=(PRUNE.to_str(),)))
    r = export_trial(out, format="safetensors", out=tmp_path / "mine.safetensors")
    assert r.check["passed"] and json.loads(sidecar_path(r.path).read_text())["builder"] == builder
    onnx = export_trial(out, policy="structured", format="onnx", out=tmp_path / "mine.onnx")
    x = load_dataset("digits", seed=0, standardize=False).x_val
    assert np.abs(load_export(onnx.path).predict(x) - load_export(r.path).predict(x)).max() <= 1e-4
