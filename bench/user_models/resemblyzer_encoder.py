"""Resemblyzer's speaker encoder from its wheel (Resemblyzer 0.1.4, ``resemblyzer/pretrained.pt``),
as a builder for ``nas-run compress --model bench/user_models/resemblyzer_encoder.py:voice_encoder
--weights <resemblyzer_encoder.safetensors>``.

The network (resemblyzer/voice_encoder.py ``VoiceEncoder``, loaded by path: the package's
``__init__`` and its audio module import librosa and webrtcvad): LSTM(40 -> 256, 3 layers), the
last layer's final hidden state -> Linear(256 -> 256) -> ReLU -> L2 normalisation. A 256-d
speaker embedding, not a classifier. Input: (N, 160, 40), 160 frames (1.6 s) of a 40-band power
mel spectrogram (librosa.feature.melspectrogram of 16 kHz audio, 25 ms window, 10 ms hop, Slaney
mel filters, power 2; no log), after Resemblyzer's volume normalisation to -30 dBFS.

The checkpoint holds the step count, the optimiser state and two training-only scalars
(``similarity_weight``/``bias``) beside the model's tensors; `convert_weights` writes the
model's own tensors to a safetensors state dict -- the file given to --weights.

`make_data` synthesises speech-like audio (a rough source-filter vocoder: harmonics of a
drifting f0 shaped by moving formants of a few vowels, fricative noise between syllables, per
"speaker" f0, formant scale and tilt) and computes the mel input as librosa does (re-implemented
in numpy here; librosa is not installed). The task's targets are the **uncompressed model's own
embeddings** (regression), measured by the mean cosine similarity between the compressed
model's embedding and that target (`cosine_similarity`; 1.0 for the uncompressed model by
construction).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

try:
    from ._pkg import load_source, package_dir
except ImportError:
    from _pkg import load_source, package_dir  # type: ignore[no-redef]

__all__ = ["convert_weights", "cosine_similarity", "make_audio", "mel_frames", "voice_encoder"]

SAMPLE_RATE = 16000
N_FFT = 400  # 25 ms
HOP = 160  # 10 ms
N_MELS = 40
FRAMES = 160  # one partial utterance, 1.6 s


def voice_encoder():  # -> torch.nn.Module
    """Resemblyzer's VoiceEncoder on the CPU (its constructor also reads the package's weights)."""
    hparams = load_source("resemblyzer", "hparams.py")
    mod = load_source("resemblyzer", "voice_encoder.py",
                      {"resemblyzer": {"audio": None, "hparams": hparams}, "resemblyzer.hparams": hparams})  # fmt: skip
    return mod.VoiceEncoder(device="cpu", verbose=False)


def convert_weights(out: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    ckpt = torch.load(package_dir("resemblyzer") / "pretrained.pt", map_location="cpu", weights_only=True)
    state = {k: v.contiguous() for k, v in ckpt["model_state"].items() if not k.startswith("similarity_")}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out))
    return out


def cosine_similarity(outputs: np.ndarray, targets: np.ndarray) -> float:
    """Mean cosine similarity of output and target embeddings (rows); higher is better."""
    o = np.asarray(outputs, dtype=np.float64).reshape(len(outputs), -1)
    t = np.asarray(targets, dtype=np.float64).reshape(len(targets), -1)
    num = (o * t).sum(1)
    den = np.linalg.norm(o, axis=1) * np.linalg.norm(t, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-12)))


# -- audio -------------------------------------------------------------------------------------------
VOWELS = np.array([[730, 1090, 2440], [530, 1840, 2480], [270, 2290, 3010], [570, 840, 2410],
                   [300, 870, 2240], [660, 1720, 2410], [490, 1350, 1690]], dtype=np.float64)  # fmt: skip


def make_audio(n: int, seed: int, n_speakers: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """(audio (n, samples) float32 at 16 kHz, speaker id (n,)): speech-like utterances, 1.6 s."""
    rng = np.random.default_rng(seed)
    length = (FRAMES - 1) * HOP
    n_ctl = FRAMES  # control points: one per 10 ms
    spk = rng.integers(0, n_speakers, n)
    srng = np.random.default_rng(1000 + seed)
    base_f0 = srng.uniform(85, 240, n_speakers)
    fscale = srng.uniform(0.85, 1.2, n_speakers)
    tilt = srng.uniform(0.6, 1.4, n_speakers)
    out = np.zeros((n, length), dtype=np.float32)
    t_ctl = np.arange(n_ctl)
    t_smp = np.arange(length) / HOP
    for i in range(n):
        s = spk[i]
        # syllables: a vowel for 80-250 ms, then 0-80 ms of fricative noise or silence
        formants = np.zeros((n_ctl, 3))
        voiced = np.zeros(n_ctl)
        fric = np.zeros(n_ctl)
        pos = 0
        while pos < n_ctl:
            dur = int(rng.integers(8, 26))
            formants[pos : pos + dur] = VOWELS[rng.integers(len(VOWELS))] * fscale[s] * rng.uniform(0.95, 1.05, 3)
            voiced[pos : pos + dur] = 1.0
            pos += dur
            gap = int(rng.integers(0, 9))
            if gap and pos < n_ctl:
                formants[pos : pos + gap] = formants[pos - 1]
                fric[pos : pos + gap] = rng.uniform(0, 1) < 0.6
                pos += gap
        kernel = np.hanning(7) / np.hanning(7).sum()
        formants = np.stack([np.convolve(np.pad(formants[:, j], 3, mode="edge"), kernel, "valid") for j in range(3)], 1)
        voiced = np.convolve(np.pad(voiced, 3, mode="edge"), kernel, "valid")
        f0 = base_f0[s] * (1.1 - 0.2 * t_ctl / n_ctl) * np.exp(0.08 * np.cumsum(rng.normal(0, 0.15, n_ctl)) / 3)
        f0 = np.clip(f0, 60, 400)
        f0_s = np.interp(t_smp, t_ctl, f0)
        phase = 2 * np.pi * np.cumsum(f0_s) / SAMPLE_RATE
        n_harm = int(7600 // f0.min())
        k = np.arange(1, n_harm + 1)
        # harmonic amplitudes at control points: resonance peaks at the formants, spectral tilt
        fk = f0[:, None] * k[None, :]  # (n_ctl, H)
        env = np.zeros_like(fk)
        for j, bw in enumerate((90.0, 110.0, 160.0)):
            env += (1.0 / (j + 1)) / (1 + ((fk - formants[:, j : j + 1]) / bw) ** 2)
        env *= (k[None, :] ** -tilt[s]) * (fk < 7600) * voiced[:, None]
        sig = np.zeros(length)
        for h in range(n_harm):  # amplitudes interpolated to samples
            sig += np.interp(t_smp, t_ctl, env[:, h]) * np.sin((h + 1) * phase + rng.uniform(0, 2 * np.pi))
        noise = rng.standard_normal(length)
        noise = np.diff(noise, prepend=0.0)  # high-passed: fricative-like
        sig += 0.05 * np.interp(t_smp, t_ctl, fric) * noise + 0.002 * rng.standard_normal(length)
        # Resemblyzer's normalize_volume(wav, -30 dBFS, increase_only=True)
        dbfs = 10 * np.log10(np.mean(sig**2) + 1e-12)
        gain = 10 ** ((-30 - dbfs) / 20)
        out[i] = sig * max(gain, 1.0)
    return out, spk


def _mel_filters() -> np.ndarray:
    """librosa.filters.mel(sr=16000, n_fft=400, n_mels=40): Slaney mel scale and area norm."""

    def hz_to_mel(f: np.ndarray) -> np.ndarray:
        f = np.asarray(f, dtype=np.float64)
        lin = f / (200.0 / 3)
        logstep = np.log(6.4) / 27.0
        return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / logstep, lin)

    def mel_to_hz(m: np.ndarray) -> np.ndarray:
        m = np.asarray(m, dtype=np.float64)
        logstep = np.log(6.4) / 27.0
        return np.where(m >= 15.0, 1000.0 * np.exp(logstep * (m - 15.0)), (200.0 / 3) * m)

    fft_freqs = np.linspace(0, SAMPLE_RATE / 2, 1 + N_FFT // 2)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(SAMPLE_RATE / 2), N_MELS + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    weights = np.zeros((N_MELS, len(fft_freqs)))
    for i in range(N_MELS):
        lower = -ramps[i] / fdiff[i]
        upper = ramps[i + 2] / fdiff[i + 1]
        weights[i] = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2 : N_MELS + 2] - mel_f[:N_MELS]))[:, None]
    return weights


def mel_frames(audio: np.ndarray) -> np.ndarray:
    """(n, 160, 40) float32: librosa.feature.melspectrogram(y, sr=16000, n_fft=400, hop_length=160,
    n_mels=40) (centred frames, zero padding, periodic Hann window, power 2), transposed."""
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)
    fb = _mel_filters()
    out = np.zeros((len(audio), FRAMES, N_MELS), dtype=np.float32)
    for i, wav in enumerate(audio):
        padded = np.pad(wav.astype(np.float64), N_FFT // 2)
        idx = np.arange(FRAMES)[:, None] * HOP + np.arange(N_FFT)[None, :]
        spec = np.abs(np.fft.rfft(padded[idx] * window, axis=1)) ** 2  # (frames, 201)
        out[i] = (spec @ fb.T).astype(np.float32)
    return out
