"""`CompressionEvaluator`: one policy evaluation as a trial — load, compress, fine-tune, export,
measure in ONNX Runtime.

Called by `run_trial` as ``evaluator(genotype, budget, report, policy=text)``. The uncompressed
model comes either from a search run (the genotype is built and its trained weights are read
from the run's ``weights/`` folder; a run made before weights were kept is re-trained with its
recorded seed and budget, and those weights are kept from then on) or from a user's own model
(`compress.user_model`). Models of the large-kernel space are compressed in their
re-parameterised (merged) form: it is what ships, and it has fewer, plainer layers to prune.

Every measurement happens in the runtime the model ships in: accuracy and latency of the
float and int8 models in ONNX Runtime (batch 1, ``latency_threads`` threads), file size of the
ONNX file. Every latency is timed interleaved run for run with a fixed reference model
(`compress.latency_reference`), which gives ``onnx_latency_rel`` (it survives a loaded host). What
"accuracy" means follows the run's task (`compress.tasks`, ``--loss`` / ``--metric`` of a user's
model): ``val_acc``, ``test_acc``, ``base_val_acc`` and ``acc_drop`` keep their names and hold the
task's metric, higher is better (``-mae`` for mae), and a metric other than accuracy is also
recorded plainly as ``val_<metric>``, ``test_<metric>`` and ``base_val_<metric>``.

The compressed model and the records that rebuild it are kept under
``artefacts_dir/<genotype id>+<policy id>/`` as an artefact (`nas.artefact`): the model file,
``policy.json`` (records, notes, metrics) and the manifest hashing both. The uncompressed model is
read through the same loader (`compress.artefact_model.load_artefact`).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas.collapse import DROP_LIMIT, collapse_message, large_drop_message, large_drop_metrics
from nas.trial import Reporter
from search_spaces import Genotype

from .passes.base import PassContext
from .policy import Compressed, Policy

if TYPE_CHECKING:
    from torch import nn

    from nas.data import Dataset

    from .artefact_model import LoadedArtefact
    from .tasks import Task

__all__ = ["BaseModel", "CompressionEvaluator", "check_policy", "needs_eager", "TRAINING_FORM_PASSES", "RECALIBRATE_AFTER", "deploy_policy", "USER_MODEL_SPACE", "artefact_dir", "user_genotype"]

# what a TorchScript model goes through as it is; for any other pass its graph is first converted
# to an eager module (`CompressionEvaluator.as_eager`)
TORCHSCRIPT_PASSES = ("int8", "finetune")


def needs_eager(policy: Policy) -> bool:
    return any(s.name not in TORCHSCRIPT_PASSES for s in policy.passes)
USER_MODEL_SPACE = "model"  # genotype space name of a user's own model: model@1|sha1=h<hex>


def user_genotype(sha1: str) -> Genotype:
    """The identity of a user's model in the store: the SHA-1 of its file(s)."""
    return Genotype(USER_MODEL_SPACE, 1, (("sha1", "h" + sha1[:16]),))


def artefact_dir(root: str | Path, genotype: Genotype, policy: Policy) -> Path:
    return Path(root) / f"{genotype.id}+{policy.id}"


@dataclass
class BaseModel:
    """The uncompressed model: ``module`` in its training form (what the passes start from, and
    the distillation teacher) and ``deploy`` in the form it ships in (large-kernel branches and BNs
    merged; the same object when there is nothing to merge). What it scores is measured with the
    compressed model, in the same runtime (`measure`)."""

    module: nn.Module
    kind: str  # "eager" or "torchscript"
    retrained: bool = False
    deploy: nn.Module | None = None

    def __post_init__(self) -> None:
        if self.deploy is None:
            self.deploy = self.module


# passes that keep every layer's type, so they can run on the training form (with its BNs and
# branches) and be merged afterwards; anything else sees the merged (deploy) form. Removing a
# block leaves the others as they were, and the depth+prune space names the training form's layers
TRAINING_FORM_PASSES = ("remove_blocks", "structured", "unstructured", "finetune")


# passes after which BatchNorm running statistics are stale (structure or weights changed)
RECALIBRATE_AFTER = ("structured", "lowrank", "unstructured", "finetune", "remove_blocks")


def deploy_policy(policy: Policy, mergeable: bool, recalibrate: bool = True) -> Policy:
    """The policy as applied: for a model with re-parameterisable blocks a "merge" pass inserted
    before the first pass that needs the deploy form, or appended (the shipped model is always
    merged); a policy that names "merge" itself is taken as written. Pruning the training form
    and merging afterwards keeps far more accuracy than pruning the merged model
    (`compress.passes.merge`).

    With ``recalibrate``, a "bn_recalib" pass (`compress.passes.bn_recalib`) goes after every run
    of consecutive passes in `RECALIBRATE_AFTER`, i.e. before the next pass that reads the model's
    eval-mode outputs (merge folds BNs, int8 calibrates on them) or at the end: once per run, since
    a pass in between (fine-tuning trains in train mode) does not read the running statistics. A
    policy that names "bn_recalib" itself is taken as written there too. The trial's policy (its
    id, its artefact folder) stays the user's; this one and its records are what policy.json keeps."""
    names = [s.name for s in policy.passes]
    passes = policy.passes
    if mergeable and "merge" not in names:
        at = next((i for i, n in enumerate(names) if n not in TRAINING_FORM_PASSES), len(names))
        passes = passes[:at] + Policy.of("merge").passes + passes[at:]
    if recalibrate and "bn_recalib" not in names:
        recalib = Policy.of("bn_recalib").passes[0]
        out, pending = [], False
        for spec in passes:
            if pending and spec.name not in RECALIBRATE_AFTER:
                out.append(recalib)
            pending = spec.name in RECALIBRATE_AFTER
            out.append(spec)
        passes = (*out, recalib) if pending else tuple(out)
    return policy if passes == policy.passes else Policy._checked(tuple(passes))


@functools.lru_cache(maxsize=2)
def _dataset(
    name: str, seed: int, standardize: bool, cache_dir: str | None = None, val_fraction: float = 0.2,
    layout: str | None = None, for_model: bool = False, num_classes: int | None = None,
) -> Dataset:
    from nas.data import load_dataset

    return load_dataset(name, seed=seed, standardize=standardize, cache_dir=cache_dir, val_fraction=val_fraction,
                        layout=layout, for_model=for_model, num_classes=num_classes)


@dataclass(frozen=True)
class CompressionEvaluator:
    dataset: str
    artefacts_dir: str
    data_seed: int = 0
    val_fraction: float = 0.2  # a search run's validation share (its config's): the same split
    standardize: bool = True  # a search run's data are standardised; a user's model gets them as stored
    seed: int = 0
    # a search run's architecture (space options as sorted items: the evaluator stays hashable)
    space: str | None = None
    space_options: tuple[tuple[str, Any], ...] = ()
    weights_dir: str | None = None
    # `nas-run train`'s final weights (<genotype id>.safetensors): used instead of the search's when there
    final_weights_dir: str | None = None
    train_epochs: int = 8
    # the search run's training (re-training a model whose weights are missing): recipe name or JSON table
    recipe: str = "quick"
    lr: float | None = None
    batch_size: int | None = None
    cache_dir: str | None = None
    # a user's own model
    model_spec: str | None = None
    model_weights: str | None = None
    # its data: fed as stored unless a layout (`nas.data.LAYOUTS`) turns them channel-first; at
    # least `num_classes` classes (the width of the model's output, probed by `prepare_compress`)
    layout: str | None = None
    num_classes: int | None = None
    # measuring
    calib_size: int = 256
    threads: int | None = 1
    latency_threads: int = 1
    latency_repeats: int = 30
    device: str = "auto"
    # what fine-tuning minimises and the metric measured (`compress.tasks`): a user's model may name
    # others; a search run's models are classifiers (cross-entropy on logits, accuracy)
    loss: str = "ce"
    metric: str | None = None
    # points of acc_drop above which a trial is flagged large_drop (`nas.collapse`): the run's
    # acc_drop constraint when it has one (`compress.run.prepare_compress`)
    drop_limit: float = DROP_LIMIT

    def task(self) -> Task:
        """The task of this run; a user's model's outputs are probed (they may be probabilities)."""
        from .tasks import make_task

        return make_task(self.loss, self.metric, outputs="auto" if self.model_spec else "logits")

    def data(self) -> Dataset:
        return _dataset(self.dataset, self.data_seed, self.standardize, self.cache_dir, self.val_fraction,
                        self.layout, self.model_spec is not None, self.num_classes)

    # -- the uncompressed model ------------------------------------------------------------------
    def trainer(self) -> Any:
        """The search run's `TrainingEvaluator` (same data, seed and training settings)."""
        from nas.training import TrainingEvaluator

        return TrainingEvaluator(
            space=str(self.space),
            space_options=dict(self.space_options),
            dataset=self.dataset,
            data_seed=self.data_seed,
            val_fraction=self.val_fraction,
            seed=self.seed,
            recipe=json.loads(self.recipe) if self.recipe.startswith("{") else self.recipe,
            batch_size=self.batch_size,
            lr=self.lr,
            cache_dir=self.cache_dir,
            layout=self.layout,
            threads=self.threads,
            device=self.device,
            weights_dir=self.weights_dir,
        )

    def load_base(self, genotype: Genotype) -> BaseModel:
        """The trained, uncompressed model (training and deploy form, eval mode, CPU)."""
        data = self.data()
        retrained = False
        if genotype.space == USER_MODEL_SPACE:
            from .user_model import FIXED_GRAPH, load_user_model

            user = load_user_model(str(self.model_spec), self.model_weights, data.input_shape, data.num_classes)
            # BaseModel.kind is "eager" or "torchscript" (a fixed graph: TorchScript or pt2); a builder's model is eager
            module, kind = user.module, ("torchscript" if user.kind in FIXED_GRAPH else "eager")
        else:
            trainer = self.trainer()
            path = self.base_weights(genotype)
            if path is not None and path.is_file():
                module = self.base_artefact(genotype, path).module  # verified: edited or truncated is one line
            else:  # a run from before weights were kept: train again, seeded as the search did
                from nas.artefact import keep_trial_artefact
                from nas.training import save_weights

                module, _, _ = trainer.train_model(genotype, self.train_epochs)
                module = module.cpu()
                if path is not None:
                    save_weights(module, path)
                    keep_trial_artefact(trainer, genotype, self.train_epochs, {})
                retrained = True
            kind = "eager"
        module = module.cpu().eval()
        deploy = module
        if self.mergeable:
            import copy

            from search_spaces.large_kernel import reparameterize

            deploy = reparameterize(copy.deepcopy(module).eval())
        return BaseModel(module, kind, retrained, deploy)

    def base_weights(self, genotype: Genotype) -> Path | None:
        """Where the trained, uncompressed model's weights are: the final-trained ones when there
        are any, else the search trial's (None for a user's model; the file may not exist)."""
        if genotype.space == USER_MODEL_SPACE:
            return None
        return self.final_weights(genotype) or self.trainer().weights_path(genotype, self.train_epochs)

    def verify_base(self, genotype: Genotype) -> None:
        """Check the kept model (its artefact) before a compression run opens its store."""
        from nas.artefact import open_artefact

        path = self.base_weights(genotype)
        if path is not None and path.is_file():
            open_artefact(path, legacy=self._legacy_base(genotype, path))

    def base_artefact(self, genotype: Genotype, path: Path) -> LoadedArtefact:
        """The trained model's artefact at ``path`` (a search trial's or `nas-run train`'s), loaded
        through the one loader; it must hold this genotype of this space."""
        from .artefact_model import load_artefact

        loaded = load_artefact(path, legacy=self._legacy_base(genotype, path))
        spec = loaded.spec
        if spec.genotype != genotype.to_str() or spec.space != self.space:
            from search_spaces import ConfigError

            raise ConfigError(f"the artefact {str(path)!r} holds {spec.genotype} of space {spec.space!r}, "
                              f"not {genotype.to_str()} of {self.space!r}: it is another model's")
        return loaded

    def _legacy_base(self, genotype: Genotype, path: Path) -> dict[str, Any] | None:
        """How a model file from before artefacts (no manifest) is read: as this run describes it."""
        from nas.artefact import has_manifest

        return None if has_manifest(path) else self.base_model(genotype)

    def base_model(self, genotype: Genotype) -> dict[str, Any]:
        """The manifest fields of the uncompressed model, as this run describes it: what a compressed
        artefact starts from, and a model file from before artefacts is read as (``legacy``)."""
        from nas.artefact import describe_model

        data = self.data()
        if genotype.space != USER_MODEL_SPACE:
            model = describe_model(genotype, data.input_shape, data.num_classes, self.space, dict(self.space_options))
        else:  # a builder is stored resolvable from any folder; a TorchScript file by its absolute path
            from .user_model import portable_builder

            model = describe_model(genotype, data.input_shape, data.num_classes)
            spec = str(self.model_spec)
            if ":" in spec and not Path(spec).is_file():
                model["builder"], model["builder_sha256"] = portable_builder(spec)
            else:
                model["base_model"] = str(Path(spec).expanduser().resolve())
        return {"kind": "trial", "model": model}

    def final_weights(self, genotype: Genotype) -> Path | None:
        """The architecture's final-trained weights (`nas-run train`), if it has any."""
        if self.final_weights_dir is None:
            return None
        path = Path(self.final_weights_dir) / f"{genotype.id}.safetensors"
        return path if path.is_file() else None

    def as_eager(self, base: BaseModel) -> BaseModel:
        """A TorchScript model as an eager fx module with real Conv/BN/Linear layers (through its
        ONNX graph, checked to compute the same outputs), so the passes that rebuild layers can
        work on it; an op the converter does not know is a `PolicyError` naming it."""
        from .onnx_to_torch import to_eager

        module = to_eager(base.module, tuple(self.data().input_shape)).eval()
        return BaseModel(module, "eager", base.retrained)

    @property
    def mergeable(self) -> bool:
        """Whether this run's models have training branches to merge (the large-kernel space)."""
        return self.space == "unireplk"

    def context(self, base: BaseModel) -> PassContext:
        import torch

        device = "cuda" if self.device == "auto" and torch.cuda.is_available() else self.device
        device = "cpu" if device == "auto" else device
        return PassContext(
            data=self.data(),
            seed=self.seed,
            calib_size=self.calib_size,
            device=device,
            teacher=base.module,
            threads=self.threads,
            task=self.task(),
        )

    # -- the evaluation --------------------------------------------------------------------------
    def __call__(
        self, genotype: Genotype, budget: int, report: Reporter, policy: str = ""
    ) -> dict[str, float]:
        import torch

        if self.threads is not None:
            torch.set_num_threads(self.threads)
        pol = Policy.from_json(policy)
        base = self.load_base(genotype)
        if base.kind == "torchscript" and needs_eager(pol):
            base = self.as_eager(base)
        ctx = self.context(base)
        torch.manual_seed(self.seed)
        out = deploy_policy(pol, self.mergeable).apply(base.module, ctx)
        metrics = self.measure(base, out)
        metrics.update(self.collapse(out, metrics))
        # every task, a regression or custom metric too: chance is far below what a user accepts
        metrics.update(large_drop_metrics(metrics["acc_drop"], self.drop_limit))
        message = collapse_message(metrics) or large_drop_message(metrics)  # collapsed says more
        if message:
            out.notes.append(message)
        metrics["retrained"] = float(base.retrained)
        metrics["final_trained"] = float(self.final_weights(genotype) is not None)
        metrics["gpu"] = float(ctx.device.startswith("cuda"))
        self._keep(genotype, pol, out, metrics)
        report(1, {"val_acc": metrics["val_acc"]})
        return metrics

    def measure(self, base: BaseModel, out: Compressed) -> dict[str, float]:
        """The task's metric, size and ORT latency of the compressed model against the base model.

        ``val_acc``, ``test_acc``, ``base_val_acc`` and ``acc_drop`` keep their names and hold the
        task's metric oriented higher-is-better (``-mae`` for mae); a metric other than accuracy is
        also recorded as it is, as ``val_<metric>``, ``test_<metric>``, ``base_val_<metric>``
        (`compress.tasks`)."""
        from nas.cost import profile

        from .latency_reference import paired_latency_ms, reference_onnx
        from .passes.int8 import export_float_onnx, onnx_accuracy

        data = self.data()
        shape = tuple(data.input_shape)
        base_bytes = export_float_onnx(base.deploy, shape)
        if out.is_onnx:
            model_bytes = out.model.model_bytes
            torch_model = None
        else:
            torch_model = out.model.cpu().eval()
            model_bytes = export_float_onnx(torch_model, shape)
        # each model's runs interleaved with a fixed reference's: its ratio survives host load
        lat = functools.partial(
            paired_latency_ms, reference=reference_onnx(shape), input_shape=shape, threads=self.latency_threads,
            warmup=5, repeats=self.latency_repeats,
        )
        (base_ms, base_ref_ms), (ms, ref_ms) = lat(base_bytes), lat(model_bytes)
        metric = self.task().metric
        # accuracy keeps the batched count it always had; any other metric sees all outputs at once
        score = functools.partial(onnx_accuracy, metric=None if metric.name == "accuracy" else metric)
        plain = {
            "val": score(model_bytes, data.x_val, data.y_val),
            "test": score(model_bytes, data.x_test, data.y_test),
            "base_val": score(base_bytes, data.x_val, data.y_val),
        }
        val_acc = metric.signed(plain["val"])
        m: dict[str, float] = {
            "val_acc": val_acc,
            "test_acc": metric.signed(plain["test"]),
            "base_val_acc": metric.signed(plain["base_val"]),
            "onnx_latency_ms": ms,
            "base_onnx_latency_ms": base_ms,
            "onnx_latency_rel": ms / ref_ms,
            "reference_latency_ms": ref_ms,
            # over the reference timed beside each: load that changed between the two timings cancels
            "speedup": (base_ms / base_ref_ms) / (ms / ref_ms) if ms > 0 else float("nan"),
            "file_bytes": float(len(model_bytes)),
            "zip_bytes": float(len(zlib.compress(model_bytes, 9))),
            "base_file_bytes": float(len(base_bytes)),
        }
        m["acc_drop"] = 100.0 * (m["base_val_acc"] - val_acc)  # in points
        if metric.name != "accuracy":
            m.update({f"{split}_{metric.name}": value for split, value in plain.items()})
        m["size_ratio"] = m["base_file_bytes"] / m["file_bytes"]
        # an int8 candidate's params/FLOPs are those of the float model it quantised
        stats_model = out.float_model if out.float_model is not None else base.deploy
        if stats_model is not None and base.kind == "eager":
            stats = profile(stats_model, shape)
            m.update(params=float(stats.params), flops=float(stats.flops), macs=float(stats.macs))
            m["sparsity"] = _sparsity(stats_model)
            base_stats = profile(base.deploy, shape)
            m["base_params"] = float(base_stats.params)
        if torch_model is not None and base.kind == "eager":
            from nas.cost import measure_latency

            m["latency_ms"] = measure_latency(torch_model, shape, 1, self.latency_threads, 3, 15).median_ms
        else:
            # an int8 model has no PyTorch form: its latency is the one it ships with (ORT)
            m["latency_ms"] = ms
        return m

    def collapse(self, out: Compressed, metrics: dict[str, float]) -> dict[str, float]:
        """The collapse guard (`nas.collapse`): flagged when the compressed model scores near chance
        while the uncompressed one did not, with the likely causes checked on the float model."""

        from nas.collapse import collapse_metrics

        data = self.data()
        # chance is a majority-class share: it means something for class labels scored by accuracy only
        if data.label_kind != "classes" or self.metric not in (None, "accuracy") or self.loss in ("mse", "l1"):
            return {}
        # fine-tuning's optimisation steps, as its records counted them (None: no fine-tuning to blame)
        done = [int(r["steps"]) for r in out.records if r.get("pass") == "finetune" and r.get("steps")]
        steps = sum(done) if done else None
        recalibrated = any(r.get("pass") == "bn_recalib" and r.get("bn_layers") for r in out.records)
        return collapse_metrics(metrics["val_acc"], data.y_val, base_acc=metrics.get("base_val_acc"),
                                model=out.float_model, x=data.x_val[:64], steps=steps, recalibrated=recalibrated)

    def _keep(self, genotype: Genotype, policy: Policy, out: Compressed, metrics: dict[str, float]) -> None:
        """The compressed model and its records, written atomically into its own folder."""
        policy_text = policy.to_str()
        final = artefact_dir(self.artefacts_dir, genotype, policy)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        from nas.integrity import write_digest

        if out.is_onnx:
            model_file = tmp / "model.onnx"
            model_file.write_bytes(out.model.model_bytes)
            write_digest(model_file)
        else:
            from nas.training import save_weights

            model_file = tmp / "model.safetensors"
            save_weights(out.model, model_file)  # with its digest
        (tmp / "policy.json").write_text(
            json.dumps(
                {
                    "genotype": genotype.to_str(),
                    # the trial's policy, and the one applied (a "merge" pass added where the
                    # model has training branches): the records are those of the applied one
                    "policy": Policy.from_json(policy_text).to_json(),
                    "policy_id": Policy.from_json(policy_text).id,
                    "applied": out.policy.to_json(),
                    "records": out.records,
                    "notes": out.notes,
                    "metrics": metrics,
                },
                indent=1,
            )
        )
        write_digest(tmp / "policy.json")  # its records rebuild the model: checked like the weights
        self._write_manifest(genotype, policy, out, metrics, model_file, tmp / "policy.json")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)

    def _write_manifest(self, genotype: Genotype, policy: Policy, out: Compressed, metrics: dict[str, float],
                        model_file: Path, records_file: Path) -> None:
        """The compressed model as an artefact (`nas.artefact`): the model file, policy.json, and the
        manifest that rebuilds it: the base model's description with the applied policy's records."""
        from nas.artefact import input_spec, write_artefact

        from .artefact_model import describe_compressed

        base = self.base_model(genotype)["model"]
        path = self.base_weights(genotype)
        write_artefact(
            model_file, "compressed", describe_compressed(base, out), extra_files=[records_file],
            policy=policy.to_str(), input_spec=input_spec(self.data(), self.standardize),
            data={"dataset": self.dataset, "seed": self.data_seed, "val_fraction": self.val_fraction,
                  "layout": self.layout, "standardize": self.standardize},
            # where the uncompressed model came from: its artefact (in the run folder), or the user's files
            base=_provenance(path, Path(self.artefacts_dir).parent) if path is not None
            else {"model": self.model_spec, "weights": self.model_weights},
            metrics=dict(metrics),
        )


def _provenance(path: Path, run_dir: Path) -> dict[str, Any]:
    """The base artefact's model file, relative to the run folder where it lies inside it."""
    try:
        return {"artefact": str(path.resolve().relative_to(run_dir.resolve()))}
    except ValueError:
        return {"artefact": str(path)}


def _sparsity(model: nn.Module) -> float:
    import torch

    total = zeros = 0
    for mod in model.modules():
        if isinstance(mod, torch.nn.Conv1d | torch.nn.Conv2d | torch.nn.Linear):
            total += mod.weight.numel()
            zeros += int((mod.weight == 0).sum())
    return zeros / max(total, 1)


def check_policy(policy: Policy, model: nn.Module) -> None:
    """Layer names a policy mentions must exist in the model: checked before any trial opens,
    so a typo is one line and nothing in the store."""
    from .passes.base import resolve_layers

    for spec in policy.passes:
        for key in ("per_layer", "ranks", "ignore", "layers", "float_layers", "blocks"):
            value = spec.settings.get(key)
            if value:
                resolve_layers(model, list(value), f"pass {spec.name!r} setting {key!r}")


