"""The "merge" pass and where the compression stage puts it: pruning runs on the training form
(with BNs and branches), everything that replaces layers or ships sees the merged form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from compress.evaluate import deploy_policy
from compress.passes.base import PassContext
from compress.policy import Policy
from nas.data import load_dataset
from search_spaces import get_space


@pytest.fixture(scope="module")
def ctx() -> PassContext:
    return PassContext(load_dataset("digits", seed=0), seed=0)


def _unireplk(seed: int, rep: bool = True) -> torch.nn.Module:
    space = get_space("unireplk").tiny()
    g = space.sample(np.random.default_rng(seed))
    torch.manual_seed(seed)
    model = space.build(g, (1, 8, 8), 10)
    for m in model.modules():  # non-trivial BN statistics, so merging has something to fold
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_merge_goes_before_the_first_pass_that_needs_the_deploy_form():
    names = lambda p: [s.name for s in p.passes]  # noqa: E731
    p = Policy.of(("structured", {"ratio": 0.5}), "finetune", ("lowrank", {"target": 0.5}), "int8")
    assert names(deploy_policy(p, True, recalibrate=False)) == ["structured", "finetune", "merge", "lowrank", "int8"]
    # BN statistics re-estimated once after each run of passes that change the model, before merge folds them
    assert names(deploy_policy(p, True)) == ["structured", "finetune", "bn_recalib", "merge", "lowrank", "bn_recalib",
                                             "int8"]
    assert names(deploy_policy(Policy.of(("unstructured", {"sparsity": 0.5})), True)) == ["unstructured", "bn_recalib",
                                                                                        "merge"]
    assert names(deploy_policy(Policy.of("int8"), True)) == ["merge", "int8"]
    assert names(deploy_policy(Policy.of("merge", ("structured", {"ratio": 0.5})), True)) == ["merge", "structured",
                                                                                            "bn_recalib"]
    assert deploy_policy(p, False, recalibrate=False) == p  # nothing to merge: as written
    # without a merge in between, pruning, fine-tuning and low-rank are one run: one re-estimation
    assert names(deploy_policy(p, False)) == ["structured", "finetune", "lowrank", "bn_recalib", "int8"]
    named = Policy.of(("structured", {"ratio": 0.5}), "bn_recalib", "finetune")
    assert deploy_policy(named, False) == named  # a policy naming bn_recalib is taken as written


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prune_the_training_form_then_merge_computes_what_its_onnx_export_computes(seed, ctx, tmp_path):
    import onnxruntime as ort

    from nas.cost import export_onnx, profile

    model = _unireplk(seed)
    applied = deploy_policy(Policy.of(("structured", {"ratio": 0.5})), True)
    out = applied.apply(model, ctx)
    pruned = out.model.eval()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in pruned.modules())  # merged
    assert profile(pruned, (1, 8, 8)).params < profile(model, (1, 8, 8)).params
    x = torch.randn(5, 1, 8, 8)
    path = export_onnx(pruned, (1, 8, 8), tmp_path / "m.onnx", batch_size=5)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - pruned(x).numpy()).max() <= 1e-4
    # replay on a fresh copy of the original rebuilds the same merged, pruned model
    again = applied.replay(model, out.records, ctx)
    a, b = pruned.state_dict(), again.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_merge_alone_keeps_the_function_and_is_the_identity_without_branches(ctx):
    model = _unireplk(3)
    merged = Policy.of("merge").apply(model, ctx).model
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(model(x), merged(x), atol=1e-4)
    plain = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(144, 10)).eval()
    same = Policy.of("merge").apply(plain, ctx).model
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in plain.state_dict().items())
