"""PESTO pitch estimator from the pesto-pitch wheel (pesto-pitch 2.0.1, checkpoint
``pesto/weights/mir-1k.ckpt``), as a builder for
``nas-run compress --model bench/user_models/pesto_mir1k.py:pesto_mir1k --weights <pesto_mir1k.safetensors>``.

The network (pesto/model.py ``Resnet1d``, loaded by path: the package's ``__init__`` imports
torchaudio): LayerNorm over the 264 CQT bins, Conv1d(1->40, k15) + LeakyReLU, a residual
Conv1d(40->40, k15) + LeakyReLU, four 1x1 Conv1d (40->30->30->10->3) with LeakyReLU, flatten,
and a Toeplitz "linear" layer (a Conv1d with one channel and a 1175-tap kernel) to 384 pitch bins
(3 per semitone, 128 semitones). Dropout layers are identity in eval. It has no BatchNorm.

Two user-side changes, both said in the results: the package ends the encoder with a softmax;
the builder leaves it off (`strip_softmax`), so the model returns logits the product's
cross-entropy fine-tuning and distillation expect (the argmax, and so the accuracy, is
unchanged). The checkpoint is a PyTorch-Lightning file with pickled hyper-parameters and was
written by an older PESTO whose residual layers were bare Conv1d (``prefilt_layers.0.weight``);
`convert_weights` writes its encoder tensors, renamed for this code
(``prefilt_layers.0.0.weight``), to a safetensors state dict -- the file given to --weights.

The input is one frame of PESTO's own preprocessing (pesto/data.py): the CQT (fmin 27.5 Hz,
3 bins per semitone, 296 bins, centred bins) of the audio, in dB (20 log10 |CQT|), cropped to
bins 16..280 (pesto CropCQT, max_steps 16): x is (N, 1, 264). `make_data` computes it with the
package's HarmonicCQT on synthetic harmonic tones (bench/user_models/torchcrepe_tiny.py's generator);
the label is the encoder's raw output bin of f0: 3 * MIDI pitch + round(3 * shift), where
``shift`` is the checkpoint's learnt offset (PESTO rolls the activations by it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

try:
    from ._pkg import load_source, package_dir
except ImportError:
    from _pkg import load_source, package_dir  # type: ignore[no-redef]

try:
    from .torchcrepe_tiny import harmonic_tones
except ImportError:
    from torchcrepe_tiny import harmonic_tones  # type: ignore[no-redef]

__all__ = ["convert_weights", "make_data", "pesto_mir1k", "read_checkpoint"]

CHECKPOINT = "weights/mir-1k.ckpt"
ENCODER = {"n_chan_input": 1, "n_chan_layers": [40, 30, 30, 10, 3], "n_prefilt_layers": 2,
           "prefilt_kernel_size": 15, "residual": True, "n_bins_in": 264, "output_dim": 384,
           "activation_fn": "leaky", "a_lrelu": 0.3, "p_dropout": 0.2}  # fmt: skip  # the checkpoint's hparams
CROP = 16  # hparams pitch_shift max_steps: CropCQT keeps bins [16, 296 - 16)
BINS_PER_SEMITONE = 3
SAMPLE_RATE = 16000


def _model_module():  # pesto/model.py imports `.utils` (CropCQT, reduce_activations): stand-ins
    utils = {"CropCQT": object, "reduce_activations": None}
    return load_source("pesto", "model.py", {"_bench_pesto_pkg": {}, "_bench_pesto_pkg.utils": utils},
                       parent="_bench_pesto_pkg")


def strip_softmax(encoder):  # -> torch.nn.Module
    import torch

    encoder.final_norm = torch.nn.Identity()
    return encoder


def pesto_mir1k():  # -> torch.nn.Module
    """PESTO's Resnet1d with the mir-1k hyper-parameters, returning logits (see the docstring)."""
    mod = _model_module()
    return strip_softmax(mod.Resnet1d(**{**ENCODER, "n_chan_layers": list(ENCODER["n_chan_layers"])}))


def read_checkpoint() -> dict:
    """The package's checkpoint (a trusted file of an installed package: it holds pickled
    hyper-parameters, so this read is weights_only=False; the product itself never does that)."""
    import torch

    return torch.load(package_dir("pesto") / CHECKPOINT, map_location="cpu", weights_only=False)


def convert_weights(out: Path) -> tuple[Path, float]:
    """Write the encoder's state dict (renamed for today's code) to ``out`` (.safetensors);
    returns the path and the checkpoint's pitch shift in semitones."""
    from safetensors.torch import save_file

    ckpt = read_checkpoint()
    assert ckpt["hparams"]["encoder"] == ENCODER, ckpt["hparams"]["encoder"]
    state = {}
    for key, value in ckpt["state_dict"].items():
        if not key.startswith("encoder."):
            continue
        key = key.removeprefix("encoder.")
        if key.startswith("prefilt_layers.") and key.count(".") == 2:  # prefilt_layers.0.weight
            head, tail = key.rsplit(".", 1)
            key = f"{head}.0.{tail}"
        state[key] = value.contiguous()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out))
    return out, float(ckpt["state_dict"]["shift"])


def _cqt(sr: int):
    """PESTO's HarmonicCQT with the checkpoint's settings, one frame per call (no centring: the
    frame sees the whole kernel)."""
    cc = load_source("pesto", "utils/cached_conv.py")
    hcqt = load_source("pesto", "utils/hcqt.py", {"pesto": {}, "pesto.utils": {"cached_conv": cc},
                                                   "pesto.utils.cached_conv": cc})  # fmt: skip
    params = read_checkpoint()["hcqt_params"]
    return hcqt.HarmonicCQT(sr=sr, hop_length=1 << 20, center=False, **params)


def cqt_frames(audio: np.ndarray, sr: int = SAMPLE_RATE, batch: int = 64) -> np.ndarray:
    """(N, 1, 264) float32: PESTO's preprocessing of one frame per row of ``audio`` (N, L), L at
    least the longest CQT kernel."""
    import torch

    cqt = _cqt(sr)
    out = []
    with torch.no_grad():
        for i in range(0, len(audio), batch):
            c = torch.view_as_complex(cqt(torch.as_tensor(audio[i : i + batch])).contiguous())  # (B, 1, F, T)
            mag = c[..., 0].abs().clamp(min=torch.finfo(torch.float32).eps).log10().mul(20)  # (B, 1, F)
            out.append(mag[..., CROP:-CROP].numpy().astype(np.float32))
    return np.concatenate(out)


def kernel_width(sr: int = SAMPLE_RATE) -> int:
    return int(_cqt(sr).cqt_kernels[0].kernel_width)


def make_data(n: int, seed: int, shift: float, fmin: float = 60.0, fmax: float = 1000.0) -> tuple[np.ndarray, np.ndarray]:
    """(x, y): n CQT frames (n, 1, 264) of harmonic tones and the encoder's bin of their f0. f0
    is a bin centre (1/3 semitone) drawn evenly from [fmin, fmax], plus up to +-0.45 bin."""
    rng = np.random.default_rng(seed)
    midi = lambda f: 69 + 12 * np.log2(np.asarray(f) / 440.0)  # noqa: E731
    lo, hi = int(np.ceil(midi(fmin) * BINS_PER_SEMITONE)), int(np.floor(midi(fmax) * BINS_PER_SEMITONE)) + 1
    b = np.resize(np.arange(lo, hi), n)
    rng.shuffle(b)
    f0 = 440.0 * 2 ** (((b + rng.uniform(-0.45, 0.45, n)) / BINS_PER_SEMITONE - 69) / 12)
    audio = harmonic_tones(f0, kernel_width(), rng)
    x = cqt_frames(audio)
    y = (b + round(shift * BINS_PER_SEMITONE)) % ENCODER["output_dim"]
    return x, y.astype(np.int64)
