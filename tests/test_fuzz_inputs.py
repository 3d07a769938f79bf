"""Bad input of every kind is one line on stderr and exit 2, never a traceback, and leaves the
run folder as it was: configs, policy files, data files, genotype strings and damaged run
folders, under every verb that reads them.

The cases are generated from a seeded generator (failures reproduce; each is its own test id).
One tiny real run (2 trials of 1 epoch, 1 int8 compression trial) is made once for the module;
every case works on its own copy and hashes the copy's files before and after.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from nas_run.cli import main

RNG = np.random.default_rng(19)  # the number; every generated case derives from it


def _bytes(n: int) -> bytes:
    """Random bytes that are not UTF-8 (a 0xff byte never is)."""
    return b"\xff" + RNG.integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    from compress.policy import Policy
    from compress.run import CompressConfig, run_compress
    from nas.config import SearchConfig
    from nas.search import run_search

    out = tmp_path_factory.mktemp("fuzz") / "run"
    run_search(SearchConfig(space="nb201", dataset="digits", strategy="random", trials=2, epochs=1, out=str(out)))
    run_compress(CompressConfig(run=str(out), top_k=1, policies=(Policy.of(("int8", {})).to_str(),)))
    return out


@pytest.fixture
def run_copy(base_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(base_run, copy)
    return copy


def _digest(folder: Path) -> dict[str, str]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _refused(args: list[str], capsys: pytest.CaptureFixture[str], watched: Path) -> str:
    """Run the CLI in-process; assert exit 2, one line on stderr, ``watched`` unchanged."""
    before = _digest(watched)
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own usage errors exit 2 too, but say more than a line
        code = exc.code
    except BaseException:  # what a user would see as a traceback
        pytest.fail(f"nas-run {' '.join(args)} raised:\n{traceback.format_exc()}")
    err = capsys.readouterr().err
    assert code == 2, f"exit {code}: {err}"
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("nas-run: error:"), err
    assert _digest(watched) == before, f"nas-run {' '.join(args)} changed {watched}"
    return err


# -- config files (`search --config`) ----------------------------------------------------------
GOOD_TOML = 'space = "nb201"\ndataset = "digits"\nstrategy = "random"\ntrials = 2\nepochs = 1\n'


def _truncated_in_a_string(text: str) -> str:
    quotes = [i for i, c in enumerate(text) if c == '"']
    opening = quotes[0::2]
    start = int(RNG.choice(opening))
    return text[: start + 2]  # inside the string: never a valid file


CONFIGS: dict[str, tuple[str, bytes]] = {
    "toml-truncated": (".toml", _truncated_in_a_string(GOOD_TOML).encode()),
    "toml-latin1": (".toml", 'space = "nb201é"\n'.encode("latin-1")),
    "toml-utf16": (".toml", GOOD_TOML.encode("utf-16")),
    "toml-binary": (".toml", _bytes(300)),
    "toml-epochs-1e18": (".toml", GOOD_TOML.replace("epochs = 1", "epochs = 1e18").encode()),
    "toml-epochs-int-huge": (".toml", GOOD_TOML.replace("epochs = 1", "epochs = 1000000000000000000").encode()),
    "toml-trials-negative": (".toml", GOOD_TOML.replace("trials = 2", "trials = -1").encode()),
    "toml-trials-string": (".toml", GOOD_TOML.replace("trials = 2", 'trials = "two"').encode()),
    "toml-unknown-key": (".toml", GOOD_TOML.replace("trials", "trails").encode()),
    "toml-unknown-table": (".toml", (GOOD_TOML + "[nonsense]\na = 1\n").encode()),
    "toml-lr-inf": (".toml", (GOOD_TOML + "lr = inf\n").encode()),
    "toml-cpus-nan": (".toml", (GOOD_TOML + "cpus_per_trial = nan\n").encode()),
    "toml-seed-negative": (".toml", (GOOD_TOML + "seed = -1\n").encode()),
    "toml-val-fraction-1": (".toml", (GOOD_TOML + "val_fraction = 1.0\n").encode()),
    "toml-objectives-number": (".toml", (GOOD_TOML + "objectives = 5\n").encode()),
    "toml-recipe-number": (".toml", (GOOD_TOML + "recipe = 3\n").encode()),
    "toml-space-options-string": (".toml", (GOOD_TOML + 'space_options = "x"\n').encode()),
    "toml-deep-arrays": (".toml", b"x = " + b"[" * 3000 + b"]" * 3000 + b"\n"),
    "yaml-truncated": (".yaml", b"space: nb201\nstrategy_options: {n_init: 2, pool: "),
    "yaml-latin1": (".yaml", "space: nb201é\n".encode("latin-1")),
    "yaml-utf16": (".yaml", "space: nb201\ntrials: 2\n".encode("utf-16")),
    "yaml-binary": (".yaml", _bytes(300)),
    "yaml-epochs-huge": (".yaml", b"space: nb201\nepochs: 1000000000000000000000000\n"),
    "yaml-seed-huge": (".yaml", b"space: nb201\ndataset: digits\nseed: 100000000000000000000000000000\n"),
    "yaml-epochs-list": (".yaml", b"space: nb201\nepochs: [1]\n"),
    "yaml-tiny-string": (".yaml", b"space: nb201\ntiny: yes please\n"),
    "yaml-constraints-numbers": (".yaml", b"space: nb201\nconstraints: [1, 2]\n"),
    "yaml-a-list": (".yaml", b"- space\n- nb201\n"),
    "yaml-python-tag": (".yaml", b"space: !!python/object/apply:os.system ['true']\n"),
    "yaml-deep": (".yaml", b"x: " + b"[" * 3000 + b"]" * 3000 + b"\n"),
    "json-truncated": (".json", b'{"space": "nb201", "trials": '),
    "json-deep": (".json", b"[" * 100000 + b"]" * 100000),
    "json-batch-zero": (".json", b'{"space": "nb201", "batch_size": 0}'),
    "txt-suffix": (".txt", GOOD_TOML.encode()),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_bad_config_file(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    suffix, data = CONFIGS[case]
    path = tmp_path / f"run{suffix}"
    path.write_bytes(data)
    out = tmp_path / "out"
    err = _refused(["search", "--config", str(path), "--out", str(out)], capsys, tmp_path)
    assert not out.exists()
    if case.startswith(("toml-latin1", "toml-utf16", "toml-binary", "yaml-latin1", "yaml-utf16", "yaml-binary")):
        assert "not UTF-8" in err and str(path) in err


# -- policy files (`compress --run DIR --policy FILE`) -------------------------------------------
POLICIES: dict[str, tuple[str, bytes]] = {
    "json-latin1": (".json", '{"passes": ["int8"], "note": "é"}'.encode("latin-1")),
    "json-utf16": (".json", b'{"passes": ["int8"]}'.decode().encode("utf-16")),
    "json-binary": (".json", _bytes(200)),
    "json-truncated": (".json", b'{"passes": [{"pass": "structured", "ratio": 0.'),
    "json-deep": (".json", b"[" * 100000 + b"]" * 100000),
    "json-unknown-pass": (".json", b'{"passes": ["prune_everything"]}'),
    "json-unknown-setting": (".json", b'{"passes": [{"pass": "structured", "rato": 0.5}]}'),
    "json-ratio-string": (".json", b'{"passes": [{"pass": "structured", "ratio": "half"}]}'),
    "json-ratio-2": (".json", b'{"passes": [{"pass": "structured", "ratio": 2.0}]}'),
    "json-ratio-nan": (".json", b'{"passes": [{"pass": "structured", "ratio": NaN}]}'),
    "json-epochs-1e18": (".json", b'{"passes": [{"pass": "finetune", "epochs": 1e18}]}'),
    "json-epochs-negative": (".json", b'{"passes": [{"pass": "finetune", "epochs": -1}]}'),
    "json-int8-not-last": (".json", b'{"passes": ["int8", "finetune"]}'),
    "json-passes-not-list": (".json", b'{"passes": 3}'),
    "json-pass-without-name": (".json", b'{"passes": [{"ratio": 0.5}]}'),
    "json-extra-key": (".json", b'{"passes": ["int8"], "name": "x"}'),
    "toml-latin1": (".toml", '[[passes]]\npass = "int8é"\n'.encode("latin-1")),
    "toml-truncated": (".toml", b'[[passes]]\npass = "struc'),
    "toml-settings-not-table": (".toml", b'[[passes]]\npass = "structured"\nsettings = 5\n'),
    "yaml-utf16": (".yaml", "passes:\n  - int8\n".encode("utf-16")),
    "yaml-binary": (".yaml", _bytes(200)),
    "yaml-list": (".yaml", b"- int8\n- finetune\n"),
    "yaml-sparsity-huge": (".yaml", b"passes:\n  - pass: unstructured\n    sparsity: 1.0e+300\n"),
}


@pytest.mark.parametrize("case", sorted(POLICIES))
def test_bad_policy_file(case: str, run_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    suffix, data = POLICIES[case]
    path = tmp_path / f"policy{suffix}"
    path.write_bytes(data)
    err = _refused(["compress", "--run", str(run_copy), "--policy", str(path)], capsys, run_copy)
    if "utf" in case or "latin1" in case or "binary" in case:
        assert "not UTF-8" in err and str(path) in err


# -- data files (`search --dataset FILE.npz`) ------------------------------------------------------
def _data(kind: str) -> dict[str, np.ndarray] | bytes:
    x = RNG.standard_normal((60, 1, 8, 8)).astype(np.float32)
    y = np.arange(60) % 3
    if kind == "truncated":
        return b"truncated"  # replaced by half of a real file below
    if kind == "wrong-keys":
        return {"a": x, "b": y}
    if kind == "nan-x":
        x[int(RNG.integers(60)), 0, 3, 3] = np.nan
    if kind == "inf-x":
        x[int(RNG.integers(60)), 0, 1, 2] = -np.inf
    if kind == "label-2e9":
        y = y.copy()
        y[int(RNG.integers(60))] = 2_000_000_000
    if kind == "label-negative":
        y = y - 1
    if kind == "label-nan":
        y = y.astype(np.float32)
        y[5] = np.nan
    if kind == "empty":
        x, y = x[:0], y[:0]
    if kind == "object-x":
        return {"x": np.array([{"a": 1}] * 60, dtype=object), "y": y}
    if kind == "string-x":
        return {"x": np.array(["a"] * 60), "y": y}
    if kind == "length-mismatch":
        y = y[:50]
    if kind == "one-class":
        y = np.zeros(60, dtype=np.int64)
    if kind == "x-zero-width":
        x = np.zeros((60, 0), dtype=np.float32)
    return {"x": x, "y": y}


DATA_KINDS = ("truncated", "wrong-keys", "nan-x", "inf-x", "label-2e9", "label-negative", "label-nan", "empty",
              "object-x", "string-x", "length-mismatch", "one-class", "x-zero-width")


@pytest.mark.parametrize("kind", DATA_KINDS)
def test_bad_data_file(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "data.npz"
    arrays = _data(kind)
    if isinstance(arrays, bytes):
        np.savez(path, **_data("good"))  # type: ignore[arg-type]
        whole = path.read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
    else:
        np.savez(path, **arrays)
    out = tmp_path / "out"
    err = _refused(["search", "--space", "nb201", "--dataset", str(path), "--trials", "1", "--epochs", "1",
                    "--out", str(out)], capsys, tmp_path / "none")  # fmt: skip
    assert str(path) in err or "data.npz" in err
    assert not out.exists()


# -- genotype strings (`train --genotype G`) -------------------------------------------------------
GOOD_GENOTYPE = "nb201@1|edges=(avg_pool_3x3,nor_conv_3x3,nor_conv_1x1,skip_connect,skip_connect,none)"


def _genotypes() -> dict[str, str]:
    cut = int(RNG.integers(8, len(GOOD_GENOTYPE) - 1))
    return {
        "truncated": GOOD_GENOTYPE[:cut],
        "empty": "",
        "unknown-op": GOOD_GENOTYPE.replace("avg_pool_3x3", "max_pool_99x99", 1),
        "too-few-edges": "nb201@1|edges=(none,none)",
        "huge-version": GOOD_GENOTYPE.replace("@1", "@" + "9" * 40),
        "other-space": "darts@2|normal=((sep_conv_3x3,0),(sep_conv_3x3,1))",
        "garbage": "".join(chr(int(c)) for c in RNG.integers(33, 0x2FF, 40)),
        "newline": GOOD_GENOTYPE + "\nrm -rf /",
    }


GENOTYPES = _genotypes()


@pytest.mark.parametrize("case", sorted(GENOTYPES))
def test_bad_genotype_string(case: str, run_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _refused(["train", "--run", str(run_copy), "--genotype", GENOTYPES[case], "--epochs", "1"], capsys, run_copy)


# -- damaged run folders, under every verb that reads them -------------------------------------------
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(RNG.integers(1, max(2, len(data) - 1)))])


def _zero(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


def _random(path: Path) -> None:
    path.write_bytes(_bytes(path.stat().st_size))


def _zero_middle(path: Path) -> None:  # the header intact, pages inside damaged
    data = bytearray(path.read_bytes())
    start = len(data) // 3
    data[start : start + len(data) // 3] = bytes(len(data) // 3)
    path.write_bytes(bytes(data))


def _json(value: object) -> Callable[[Path], None]:
    return lambda path: path.write_text(json.dumps(value))


def _edit_json(**changes: object) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        data = json.loads(path.read_text())
        path.write_text(json.dumps({**data, **changes}))

    return edit


DAMAGE: dict[str, tuple[str, Callable[[Path], None] | None]] = {
    "study-truncated": ("study.db", _truncate),
    "study-zeroed": ("study.db", _zero),
    "study-random": ("study.db", _random),
    "study-empty": ("study.db", lambda p: p.write_bytes(b"")),
    "study-pages-zeroed": ("study.db", _zero_middle),
    "study-missing": ("study.db", None),
    "config-truncated": ("config.json", _truncate),
    "config-binary": ("config.json", _random),
    "config-a-list": ("config.json", _json([1, 2])),
    "config-trials-string": ("config.json", _edit_json(trials="many")),
    "config-unknown-key": ("config.json", _edit_json(colour="blue")),
    "config-missing": ("config.json", None),
    "compress-truncated": ("compress.json", _truncate),
    "compress-a-string": ("compress.json", _json("x")),
    "compress-calib-string": ("compress.json", _edit_json(calib_size="lots")),
    "compress-top-k-float": ("compress.json", _edit_json(top_k=2.5)),
    "state-truncated": ("strategy_state.json", _truncate),
    "state-wrong-shape": ("strategy_state.json", _json({"strategy": 1, "told": "x"})),
}

ALL_VERBS = ("show", "report", "export", "search-resume", "compress-resume", "compress-run", "train")
VERBS = {
    "study": ALL_VERBS,
    "config": ALL_VERBS,
    # compress.json is read by the compression verbs and by export (its calibration settings)
    "compress": ("compress-resume", "compress-run", "export"),
    "state": ("search-resume",),
}


def _args(verb: str, run: Path, tmp: Path) -> list[str]:
    return {
        "show": ["show", str(run), "--all"],
        "report": ["report", str(run), "--no-png", "--out", str(tmp / "report")],
        "export": ["export", str(run), "--format", "onnx", "--out", str(tmp / "model.onnx")],
        "search-resume": ["search", "--resume", str(run), "--quiet"],
        "compress-resume": ["compress", "--resume", str(run), "--quiet"],
        "compress-run": ["compress", "--run", str(run), "--top-k", "1", "--int8", "--quiet"],
        "train": ["train", "--run", str(run), "--epochs", "1"],
    }[verb]


CASES = [(damage, verb) for damage in sorted(DAMAGE) for verb in VERBS[damage.split("-")[0]]]


@pytest.mark.parametrize(("damage", "verb"), CASES, ids=[f"{d}-{v}" for d, v in CASES])
def test_damaged_run_folder(damage: str, verb: str, run_copy: Path, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    name, hurt = DAMAGE[damage]
    target = run_copy / name
    if hurt is None:
        target.unlink()
    else:
        hurt(target)
    err = _refused(_args(verb, run_copy, tmp_path), capsys, run_copy)
    if hurt is not None and not damage.endswith(("unknown-key", "string", "float", "wrong-shape")):
        assert name in err  # the damaged file is named
    assert not (tmp_path / "model.onnx").exists() and not (tmp_path / "report").exists()


# -- hints and settings that used to be ignored -----------------------------------------------------
def _left_running(run: Path, stage: str, **extra: object) -> None:
    """A trial row a killed driver of ``stage`` leaves behind (RUNNING, nobody drives the run)."""
    from nas.search import open_store

    store = open_store(run)
    rec = next(r for r in store.records() if r["stage"] == "search")
    store.start(rec["genotype"], rec["genotype_id"], budget=int(extra.get("budget", 1)),  # type: ignore[call-overload]
                strategy=str(extra.get("strategy", stage)), seed=0, policy=str(extra.get("policy", "")), stage=stage)


def test_show_names_the_resume_command_of_the_stage_that_was_killed(run_copy: Path, capsys) -> None:
    from compress.policy import Policy

    _left_running(run_copy, "compress", policy=Policy.of(("int8", {"per_channel": False})).to_str())
    assert main(["show", str(run_copy)]) == 0
    out = capsys.readouterr().out
    assert f"nas-run compress --resume {run_copy}" in out
    assert "nas-run search --resume" not in out  # which would do nothing for a compression
    _left_running(run_copy, "train", budget=3, strategy="train:quick")
    assert main(["show", str(run_copy)]) == 0
    out = capsys.readouterr().out
    assert f"nas-run train --run {run_copy} --epochs 3 --recipe quick --resume" in out
    assert "nas-run search --resume" not in out


def test_an_interrupted_train_names_its_own_flags() -> None:
    from nas_run.cli import build_parser
    from nas_run.train_cmd import resume_command

    args = build_parser().parse_args(["train", "--run", "r un", "--epochs", "30", "--recipe", "darts", "--seeds", "2"])
    assert resume_command(args) == "nas-run train --run 'r un' --epochs 30 --recipe darts --seeds 2 --resume"


def test_another_calib_size_on_a_rerun_or_resume_is_refused_naming_both(run_copy: Path, capsys) -> None:
    err = _refused(["compress", "--resume", str(run_copy), "--calib-size", "64"], capsys, run_copy)
    assert "calib_size" in err and "256" in err and "64" in err
    err = _refused(["compress", "--run", str(run_copy), "--int8", "--top-k", "1", "--calib-size", "64"], capsys, run_copy)
    assert "calib_size" in err and "256" in err
    err = _refused(["compress", "--resume", str(run_copy), "--seed", "3"], capsys, run_copy)
    assert "seed" in err


def test_a_rerun_keeps_the_stored_settings_and_a_copied_folder_resumes_itself(
    base_run: Path, run_copy: Path, capsys
) -> None:
    from compress.run import read_compress_config

    stored = json.loads((run_copy / "compress.json").read_text())
    (run_copy / "compress.json").write_text(json.dumps({**stored, "calib_size": 128}))
    original = _digest(base_run)
    # compress.json names the folder the run was made in; the copy is what --resume continues
    assert main(["compress", "--resume", str(run_copy), "--quiet", "--max-concurrent", "1"]) == 0
    # a re-run without --calib-size measures as the finished trials were measured
    assert main(["compress", "--run", str(run_copy), "--int8", "--top-k", "1", "--quiet"]) == 0
    assert "no compression trials" not in capsys.readouterr().out
    assert read_compress_config(run_copy).calib_size == 128
    assert _digest(base_run) == original


def test_policy_names_are_matched_whole() -> None:
    from compress.policy import Policy, policy_label

    structured = Policy.of(("structured", {"ratio": 0.5}), ("finetune", {"epochs": 4, "kd": True}))
    unstructured = Policy.of(("unstructured", {"sparsity": 0.5}), ("finetune", {"epochs": 4}))
    for name in (structured.id, structured.label(), policy_label(structured.to_str()), "structured+finetune",
                 " Structured + FineTune "):
        assert structured.matches(name), name
        assert not unstructured.matches(name), name
    assert not structured.matches("structured")  # a piece of a label is not its name ...
    assert structured.has_passes("structured") and not unstructured.has_passes("structured")  # ... but a pass's
    assert unstructured.has_passes("unstructured") and not structured.has_passes("structured+int8")
    assert not structured.matches("unstructured+finetune") and unstructured.matches("unstructured+finetune")
    assert unstructured.matches(policy_label(unstructured.to_str()))  # "unstructured 0.5 + finetune 4"
