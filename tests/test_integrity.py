"""Integrity: every file a run writes carries a SHA-256 and every load checks it; every model a stage
produces is an artefact (`nas.artefact`: the model file and a manifest hashing every file of it,
loaded through `compress.artefact_model.load_artefact`); every export format carries a manifest
(weights, graph/code, metadata). Flipped bytes, truncation and edited metadata are refused by the
loaders and by `nas-run verify`, as one line and exit 2, with the store left as it was. One tiny
run (nb201, digits, 1 trial, 1 epoch; compressed; trained 1 epoch) is shared by the whole file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.artefact_model import load_artefact
from compress.model_spec import ModelSpec
from compress.policy import Policy
from compress.run import CompressConfig, run_compress
from export import load_model
from export.formats import FORMATS, ExportError, load_export, sidecar_path
from export.trial import export_trial
from nas.artefact import MANIFEST_SUFFIX, manifest_path, open_artefact
from nas.config import SearchConfig
from nas.data import load_dataset
from nas.final_training import train_final
from nas.integrity import IntegrityError, digest_path, verify_file, write_digest
from nas.search import open_store, run_search
from nas_run.cli import main
from search_spaces import NasRunError

PRUNE = Policy.of(("structured", {"ratio": 0.5}), ("finetune", {"epochs": 1}))
INT8 = Policy.of(("int8", {}))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("integrity")
    out = root / "run"
    run_search(SearchConfig(space="nb201", dataset="digits", strategy="random", trials=1, epochs=1, out=str(out)))
    run_compress(CompressConfig(run=str(out), top_k=1, policies=(PRUNE.to_str(), INT8.to_str())))
    train_final(out, epochs=1, recipe="quick")
    return out


@pytest.fixture(scope="module")
def exports(run, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    return {fmt: export_trial(run, format=fmt, out=root / f"m.{fmt}", record=False).path for fmt in FORMATS}


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "c" / run.name  # the study is named after the folder
    shutil.copytree(run, dst)
    return dst


def _flip(p: Path, at: float = 0.7) -> None:
    data = bytearray(p.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    p.write_bytes(bytes(data))


def _cut(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _one_error_line(capsys, name: str) -> str:
    """Asserts one error line naming ``name`` (notes may precede it), no traceback; returns stdout."""
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    errors = [line for line in err if line.startswith("nas-run: error:")]
    assert len(errors) == 1 and name in errors[0] and "Traceback" not in cap.err, err
    return cap.out


def _stage_models(run: Path) -> dict[str, Path]:
    """The model file of every stage's artefact: search trial, compression trials (float, int8),
    `nas-run train`'s seed and its published copy."""
    comp = sorted((run / "compressed").iterdir())
    return {
        "trial": next((run / "weights").glob("*.safetensors")),
        "compressed": next(d for d in comp if PRUNE.id in d.name) / "model.safetensors",
        "int8": next(d for d in comp if INT8.id in d.name) / "model.onnx",
        "final": next((run / "train").rglob("model.safetensors")),
        "trained": next((run / "trained").glob("*.safetensors")),
    }


def _artefacts(run: Path) -> dict[str, Path]:
    models = _stage_models(run)
    return {
        "trial weights": models["trial"],
        "trial manifest": manifest_path(models["trial"]),
        "compressed weights": models["compressed"],
        "compressed records": models["compressed"].with_name("policy.json"),
        "compressed manifest": manifest_path(models["compressed"]),
        "int8 model": models["int8"],
        "int8 manifest": manifest_path(models["int8"]),
        "trained weights": models["trained"],
        "trained manifest": manifest_path(models["trained"]),
        "checkpoint": next((run / "train").rglob("checkpoint.safetensors")),
        "final weights": models["final"],
        "final manifest": manifest_path(models["final"]),
    }


def test_every_artefact_has_a_digest_that_matches(run, capsys):
    for kind, p in _artefacts(run).items():
        assert digest_path(p).is_file(), kind
        assert verify_file(p) is True
        assert digest_path(p).read_text().split()[0] == _sha(p)
    assert main(["verify", str(run)]) == 0
    out = capsys.readouterr().out
    manifests = list(run.rglob(f"*{MANIFEST_SUFFIX}"))
    assert out.count("artefact OK") == len(manifests) == 5 and "MISMATCH" not in out
    assert out.count("sha256 OK") + len(manifests) == len(list(run.rglob("*.sha256"))) >= 12


@pytest.mark.parametrize("damage", ["flip", "cut"])
def test_damaged_run_artefacts_are_refused_by_every_reader(run, tmp_path, capsys, damage):
    for kind, orig in _artefacts(run).items():
        copy = _copy(run, tmp_path / kind.replace(" ", "-"))
        p = copy / orig.relative_to(run)
        (_flip if damage == "flip" else _cut)(p)
        db = _sha(copy / "study.db")
        with pytest.raises(IntegrityError, match=p.name):
            verify_file(p)
        capsys.readouterr()
        assert main(["verify", str(p)]) == 2
        shown = "artefact MISMATCH" if p.name.endswith(MANIFEST_SUFFIX) else "sha256 MISMATCH"
        assert shown in _one_error_line(capsys, p.name)
        out = tmp_path / f"{kind}.onnx"
        if kind.startswith(("trial ", "final ")):
            # export: the search trial's weights (--trial 0), or by default the final-trained model's
            args = ["--trial", "0"] if kind.startswith("trial ") else []
            assert main(["export", str(copy), *args, "--format", "onnx", "--out", str(out)]) == 2
            _one_error_line(capsys, p.name)
        elif kind.startswith("trained "):  # what compress starts from when the run has a trained model
            assert main(["compress", "--run", str(copy), "--top-k", "1"]) == 2
            _one_error_line(capsys, p.name)
        elif kind == "checkpoint":
            (p.parent / "model.safetensors").unlink()  # as if the train had been killed
            assert main(["train", "--run", str(copy), "--epochs", "1", "--recipe", "quick", "--resume"]) == 2
            _one_error_line(capsys, p.name)
        else:
            policy = INT8.id if kind.startswith("int8 ") else PRUNE.id
            fmt = "onnx-int8" if kind.startswith("int8 ") else "onnx"
            assert main(["export", str(copy), "--policy", policy, "--format", fmt, "--out", str(out)]) == 2
            _one_error_line(capsys, p.name)
        assert not out.exists() and _sha(copy / "study.db") == db, kind


def test_an_artefact_from_before_digests_loads_with_a_note(run, tmp_path, capsys):
    copy = _copy(run, tmp_path)
    p = _artefacts(copy)["trial weights"]
    digest_path(p).unlink()
    capsys.readouterr()
    assert verify_file(p) is False
    assert verify_file(p) is False  # noted once per file
    err = capsys.readouterr().err
    assert err.count("no recorded SHA-256") == 1 and p.name in err
    r = export_trial(copy, trial=0, format="onnx", out=tmp_path / "m.onnx", record=False)
    assert r.check["passed"]


# -- artefacts: every stage's model, one noun, one loader ------------------------------------


def _record_of(run: Path, stage: str) -> dict:
    records = [r for r in open_store(run, read_only=True).records() if r["status"] == "complete"]
    wanted = {"trial": ("search", ""), "compressed": ("compress", PRUNE.to_str()), "int8": ("compress", INT8.to_str()),
              "final": ("train", ""), "trained": ("train", "")}[stage]
    (rec,) = [r for r in records if (r["stage"], r["policy"]) == wanted]
    return rec


def test_every_stage_writes_an_artefact_that_loads_as_its_trial(run):
    """The manifest says what the model is (kind, genotype, the trial's metrics, the hash of each
    file), and the loader rebuilds the model the trial measured: its validation accuracy again."""
    data = load_dataset("digits", seed=0)
    kinds = {"trial": "trial", "compressed": "compressed", "int8": "compressed", "final": "train", "trained": "train"}
    for stage, path in _stage_models(run).items():
        rec, art = _record_of(run, stage), open_artefact(path)
        assert art.kind == kinds[stage] and not art.legacy, stage
        assert art.manifest["files"][path.name] == _sha(path) and art.genotype == rec["genotype"], stage
        assert art.metrics == pytest.approx(rec["metrics"]), stage
        assert ModelSpec.from_json(art.model).to_json()["genotype_id"] == rec["genotype_id"]
        assert art.manifest["input_spec"]["standardize"]["mean"] == pytest.approx(list(data.mean))
        loaded = load_artefact(path)
        if stage == "int8":
            assert loaded.module is None and loaded.onnx == path.read_bytes()
            continue
        with torch.no_grad():
            acc = float((loaded.module(torch.as_tensor(data.x_val[:])).argmax(1).numpy() == data.y_val).mean())
        # one or two argmax ties may fall the other way between the runtimes that measured it
        assert abs(acc - rec["metrics"]["val_acc"]) <= 2 / len(data.y_val), stage
    compressed = open_artefact(_stage_models(run)["compressed"])
    assert "policy.json" in compressed.manifest["files"] and compressed.manifest["policy"] == PRUNE.to_str()
    assert open_artefact(_stage_models(run)["trained"]).manifest["source"].startswith("train/")


@pytest.mark.parametrize("resealed", [False, True], ids=["as-is", "own-sidecar-rewritten"])
def test_every_file_of_every_artefact_is_refused_when_changed(run, tmp_path, resealed):
    """Each file of each stage's artefact, a byte flipped at three places or cut in half: refused by
    the loader with one line naming the file — also when the file's own ``.sha256`` was rewritten
    to match it (then only the manifest can tell). A manifest is refused by its digest."""
    copy = _copy(run, tmp_path)
    refused = 0
    for path in _stage_models(copy).values():
        files = [path, manifest_path(path)] + ([path.with_name("policy.json")] if path.parent.parent.name == "compressed" else [])
        for f in files:
            if resealed and f.name.endswith(MANIFEST_SUFFIX):
                continue  # a manifest and its own digest both rewritten is a new manifest: integrity, not authenticity
            kept, side = f.read_bytes(), digest_path(f).read_bytes()
            for damage in (0.05, 0.5, 0.95, "cut"):
                _cut(f) if damage == "cut" else _flip(f, damage)
                if resealed:
                    write_digest(f)
                with pytest.raises(IntegrityError) as caught:
                    load_artefact(path)
                assert f.name in str(caught.value) and "\n" not in str(caught.value), (f, damage)
                refused += 1
                f.write_bytes(kept)
                digest_path(f).write_bytes(side)
            load_artefact(path)  # restored: loads again
    assert refused == 4 * (7 if resealed else 12)  # 12 files in 5 artefacts, 7 of them not manifests


def test_an_edited_manifest_value_or_a_moved_manifest_is_refused(run, tmp_path, capsys):
    copy = _copy(run, tmp_path)
    models = _stage_models(copy)
    m = manifest_path(models["compressed"])
    edited = json.loads(m.read_text())
    edited["metrics"]["val_acc"] = 0.99  # valid JSON, one value changed
    m.write_text(json.dumps(edited))
    with pytest.raises(IntegrityError, match=m.name):
        open_artefact(models["compressed"])
    capsys.readouterr()
    assert main(["verify", str(m)]) == 2 and "artefact MISMATCH" in _one_error_line(capsys, m.name)
    # the pruned model's manifest (and its digest) next to the int8 model: it describes another file
    q = manifest_path(models["int8"])
    shutil.copy(manifest_path(_stage_models(run)["compressed"]), q)
    shutil.copy(digest_path(manifest_path(_stage_models(run)["compressed"])), digest_path(q))
    with pytest.raises(IntegrityError, match="model.safetensors"):
        open_artefact(models["int8"])


def test_a_run_made_before_artefacts_still_exports_with_a_note(run, tmp_path, capsys):
    copy = _copy(run, tmp_path)
    for m in list(copy.rglob(f"*{MANIFEST_SUFFIX}")):
        m.unlink()
        digest_path(m).unlink()
    models = _stage_models(copy)
    cases = {"trial": (["--trial", "0"], "onnx"), "compressed": (["--policy", PRUNE.id], "safetensors"),
             "int8": (["--policy", INT8.id], "onnx-int8"), "final": ([], "onnx")}
    capsys.readouterr()
    for stage, (args, fmt) in cases.items():
        out = tmp_path / f"{stage}.{fmt}"
        assert main(["export", str(copy), *args, "--format", fmt, "--out", str(out)]) == 0, stage
        err = capsys.readouterr().err
        assert "written before artefacts kept a manifest" in err and models[stage].name in err, stage
        assert out.is_file()
    # the files' own digests still guard them
    _flip(models["compressed"].with_name("policy.json"))
    assert main(["export", str(copy), "--policy", PRUNE.id, "--format", "onnx", "--out", str(tmp_path / "x.onnx")]) == 2
    _one_error_line(capsys, "policy.json")


# -- exports -----------------------------------------------------------------------------------


def _rewrite_zip(src: Path, dst: Path, edit) -> None:
    """A copy of a torch archive with ``edit(name, data) -> data`` applied to each record."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, edit(info.filename.split("/", 1)[-1], zin.read(info)))


def _edit_meta(meta: dict) -> dict:
    meta = json.loads(json.dumps(meta))
    meta["metrics"]["val_acc"] = 0.99
    meta["input_spec"]["standardize"]["mean"][0] += 0.5
    return meta


def _tamper(path: Path, fmt: str, how: str, dst: Path) -> Path:
    """A damaged copy of an export: ``weights`` (a byte of a weight flipped), ``cut`` (truncated),
    ``metadata`` (metrics and input statistics edited), ``code`` (the graph or code edited)."""
    if fmt == "safetensors":
        shutil.copy(sidecar_path(path), sidecar_path(dst))
    if how == "cut":
        dst.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif fmt.startswith("onnx"):
        import onnx
        from onnx import numpy_helper

        proto = onnx.load(str(path))
        if how == "weights":
            init = next(i for i in proto.graph.initializer if i.dims and int(np.prod(i.dims)) > 8)
            arr = numpy_helper.to_array(init).copy()
            arr.flat[0] = arr.flat[0] + 1 if arr.dtype.kind == "f" else arr.flat[0] ^ 1
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
        elif how == "metadata":
            props = {p.key: p for p in proto.metadata_props}
            meta = _edit_meta({"metrics": json.loads(props["metrics"].value), "input_spec": json.loads(props["input_spec"].value)})
            props["metrics"].value, props["input_spec"].value = json.dumps(meta["metrics"]), json.dumps(meta["input_spec"])
        else:  # code: an op swapped
            node = next(n for n in proto.graph.node if n.op_type == "Relu")
            node.op_type = "Sigmoid"
        onnx.save(proto, str(dst))
    elif fmt in ("torchscript", "pt2"):
        def edit(name: str, data: bytes) -> bytes:
            if how == "weights" and name.startswith("data/") and len(data) > 64 and not name.endswith(".json"):
                return data[:32] + bytes([data[32] ^ 0xFF]) + data[33:]
            if how == "metadata" and name == "extra/nas_run.json":
                return json.dumps(_edit_meta(json.loads(data))).encode()
            if how == "code" and ((name.startswith("code/") and name.endswith(".py")) or name == "models/model.json"):
                edited = data.replace(b"relu", b"sigmoid")  # a changed op where there is one
                return edited if edited != data else data + b"\n"
            return data

        _rewrite_zip(path, dst, edit)
    else:  # safetensors
        if how == "weights":
            dst.write_bytes(path.read_bytes())
            _flip(dst, 0.9)
        else:  # metadata (code: a safetensors export holds none; its structure is in the sidecar)
            shutil.copy(path, dst)
            side = json.loads(sidecar_path(path).read_text())
            if how == "code":
                side["records"] = [{"pass": "bogus"}]
            sidecar_path(dst).write_text(json.dumps(_edit_meta(side) if how == "metadata" else side))
    return dst


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_export_verifies_and_every_edit_is_refused(exports, fmt, tmp_path, capsys):
    path = exports[fmt]
    assert main(["verify", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"format {fmt} (export format version 2)" in out and "weights   OK" in out and "metadata  OK" in out
    load_model(path)
    for how in ("weights", "cut", "metadata", "code"):
        bad = _tamper(path, fmt, how, tmp_path / f"{how}-{path.name}")
        before = sorted(os.listdir(tmp_path))
        with pytest.raises(ExportError, match=bad.name):
            load_export(bad)
        with pytest.raises(ExportError):
            load_model(bad)
        capsys.readouterr()
        assert main(["verify", str(bad)]) == 2, (fmt, how)
        _one_error_line(capsys, bad.name)
        assert sorted(os.listdir(tmp_path)) == before  # nothing written


def test_edited_torchscript_code_and_pt2_graph_are_refused_as_user_models(exports, tmp_path):
    from compress.user_model import load_user_model

    digits = load_dataset("digits", seed=0)
    x = torch.as_tensor(digits.x_val[:16])
    for fmt in ("torchscript", "pt2"):
        user = load_user_model(str(exports[fmt]))
        assert user.kind == fmt
        with torch.no_grad():
            want = load_export(exports[fmt]).predict(digits.x_val[:16])
            assert np.abs(user.module(x).numpy() - want).max() <= 1e-5
        for how in ("code", "metadata", "weights"):
            bad = _tamper(exports[fmt], fmt, how, tmp_path / f"{how}.{fmt}")
            with pytest.raises(NasRunError, match="modified after export"):
                load_user_model(str(bad))


def test_pt2_is_accepted_by_compress_model(exports, tmp_path):
    out = tmp_path / "fromp2"
    run = run_compress(CompressConfig(model=str(exports["pt2"]), dataset="digits", out=str(out),
                                      policies=(INT8.to_str(),)))
    (rec,) = [r for r in run.store.records() if r["status"] == "complete"]
    m = rec["metrics"]  # the pt2 graph evaluated as the base, then quantised to int8 in ONNX Runtime
    # (the run's data are fed unstandardised, as a user's model gets them: accuracy is not the point)
    assert m["base_val_acc"] > m["chance_acc"] and m["file_bytes"] < m["base_file_bytes"]
    assert m["acc_drop"] == pytest.approx(100 * (m["base_val_acc"] - m["val_acc"]))


def test_pt2_has_a_dynamic_batch(exports):
    loaded = load_export(exports["pt2"])
    digits = load_dataset("digits", seed=0)
    for n in (1, 3, 40):
        assert loaded.predict(digits.x_val[:n]).shape == (n, digits.num_classes)
    assert loaded.metadata["format"] == "pt2" and set(loaded.metadata["manifest"]) == {
        "weights_sha256", "graph_sha256", "metadata_sha256"}


def test_builder_paths_are_stored_resolvable_from_anywhere(tmp_path, monkeypatch):
    from compress.user_model import check_builder, portable_builder

    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "x.py").write_text("import torch\n\ndef f():\n    return torch.nn.Linear(2, 3)\n")
    monkeypatch.chdir(tmp_path)
    stored, sha = portable_builder("pkg/x.py:f")
    assert stored == f"{(pkg / 'x.py').resolve()}:f" and sha == _sha(pkg / "x.py")
    assert portable_builder("compress.user_model:load_user_model")[0] == "compress.user_model:load_user_model"
    monkeypatch.chdir(Path(__file__).parent)  # another folder: the stored path still resolves
    check_builder(stored, sha)
    (pkg / "x.py").write_text("import torch\n\ndef f():\n    return torch.nn.Linear(2, 4)\n")
    with pytest.raises(NasRunError, match="changed since the export"):
        check_builder(stored, sha)


def test_a_format_1_export_still_loads_with_a_note(exports, tmp_path, capsys):
    """An export written before manifests (format 1: the hash of the weights only)."""
    import onnx

    proto = onnx.load(str(exports["onnx"]))
    props = {p.key: p for p in proto.metadata_props}
    props["format_version"].value = "1"
    from compress.export_manifest import onnx_sha256

    props["weights_sha256"].value = onnx_sha256(proto)[0]  # format 1 hashed the graph only
    old = [p for p in proto.metadata_props if p.key != "manifest"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(old)
    onnx.save(proto, str(tmp_path / "v1.onnx"))
    capsys.readouterr()
    load_export(tmp_path / "v1.onnx")
    assert "format-1 export" in capsys.readouterr().err
    assert main(["verify", str(tmp_path / "v1.onnx")]) == 0
    assert "weights   OK" in capsys.readouterr().out
