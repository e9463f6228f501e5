"""Speaker similarity with an independent speaker encoder: Resemblyzer's GE2E ``VoiceEncoder``.

The encoder (Wan et al., "Generalized End-to-End Loss for Speaker Verification", ICASSP 2018;
the speaker encoder of Real-Time-Voice-Cloning: 3-layer LSTM, 256-dimensional d-vectors) and its
weights ship inside the ``resemblyzer`` wheel (``resemblyzer/pretrained.pt``), so nothing is
downloaded.
It shares no weights or training with the extraction model's reference encoder, so it can judge
whether an estimate sounds like the enrolled speaker without rewarding the model for matching its
own embedding space.

    sim = cosine_similarity(speaker_embedding(estimate, 48_000), speaker_embedding(ref, 48_000))

Before the encoder, each signal is resampled to 16 kHz with soxr, scaled to an RMS of -30 dBFS and
has its long pauses removed by Resemblyzer's own WebRTC VAD trimming (see ``_prepare``).

Long signals: the result is Resemblyzer's (``VoiceEncoder.embed_utterance`` after
``trim_long_silences``), computed so that memory grows only by the 16 kHz float32 signal (4 bytes
per sample, 230 MB for an hour): the resampling and the level run blockwise
(``evaluation.signal``), the VAD converts its 16-bit input a block at a time (Resemblyzer's
``struct.pack`` of the whole signal holds one Python int per sample, ~36 bytes each), and the
mel spectrograms and the encoder run on ``PARTIALS_PER_BATCH`` partial windows at a time
(``embed_utterance`` runs every window of the signal in one batch).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import sys
import types
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from evaluation.signal import level_at, resample_into

if TYPE_CHECKING:
    from resemblyzer import VoiceEncoder

ENCODER_SR = 16_000  # resemblyzer.hparams.sampling_rate: the rate of the encoder's mel front end
EMBEDDING_DIM = 256  # resemblyzer.hparams.model_embedding_size
TARGET_RMS = 10.0 ** (-30.0 / 20.0)  # resemblyzer.hparams.audio_norm_target_dBFS
# Below this RMS (-100 dBFS, under the noise floor of 16-bit audio) a signal holds nothing to
# embed: scaling it to -30 dBFS would only amplify rounding noise, so its embedding is NaN.
SILENT_RMS = 1e-5
# Resemblyzer's trimming can keep nothing (it drops white noise or a steady tone entirely, and
# could drop speech it misses); under a quarter of a second kept, the whole signal is embedded
# instead, so that a bad estimate still gets a (low) similarity rather than vanishing from the
# average as NaN.
MIN_TRIMMED_SECONDS = 0.25
# VoiceEncoder.embed_utterance's defaults: 1.3 partial windows (1.6 s each) per second, the last
# one kept when the signal covers at least 75 % of it.
PARTIALS_PER_SECOND = 1.3
MIN_COVERAGE = 0.75
# Partial windows per encoder call: (64, 160, 40) float32 mels, 1.6 MB, whatever the length.
PARTIALS_PER_BATCH = 64
INT16_MAX = 2**15 - 1  # resemblyzer.audio.int16_max: the VAD reads 16-bit PCM
VAD_WINDOWS_PER_BLOCK = 4096  # 30 ms VAD windows converted to 16 bits at a time (2 minutes)


@contextlib.contextmanager
def _pkg_resources_for_webrtcvad() -> Iterator[None]:
    """Lets ``import webrtcvad`` succeed where setuptools no longer ships ``pkg_resources``.

    Resemblyzer imports webrtcvad (its VAD) at import time, and webrtcvad 2.0.10 (2017, the last
    release) reads its own version with ``pkg_resources.get_distribution``, which setuptools
    removed in release 81. For the length of the import only, a stand-in module answers that
    one call from ``importlib.metadata``; it is gone from ``sys.modules`` afterwards, so no
    other library ever sees it. Where the real ``pkg_resources`` exists it is used instead.
    """
    if "pkg_resources" in sys.modules or importlib.util.find_spec("pkg_resources") is not None:
        yield
        return
    shim = types.ModuleType("pkg_resources")
    shim.get_distribution = lambda name: types.SimpleNamespace(  # type: ignore[attr-defined]
        version=importlib.metadata.version(name)
    )
    sys.modules["pkg_resources"] = shim
    try:
        yield
    finally:
        del sys.modules["pkg_resources"]


@functools.cache
def _resemblyzer() -> types.ModuleType:
    """The ``resemblyzer`` package, imported on first use: with librosa and numba behind it the
    import takes seconds, which a process that never computes the metric should not pay."""
    with _pkg_resources_for_webrtcvad(), warnings.catch_warnings():
        # resemblyzer/audio.py imports binary_dilation from scipy.ndimage.morphology, a namespace
        # deprecated since SciPy 1.8 and announced for removal in SciPy 2.0.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="resemblyzer")
        import resemblyzer
    return resemblyzer


@functools.cache
def _get_encoder() -> VoiceEncoder:
    """The process's encoder, built on first use (5.7 MB of weights) on the CPU."""
    return _resemblyzer().VoiceEncoder(device="cpu", verbose=False)


def _trim_long_silences(wav: np.ndarray) -> np.ndarray:
    """Resemblyzer's ``audio.trim_long_silences`` (Apache-2.0), followed step for step with the
    same output: the signal cut to whole 30 ms windows, a WebRTC VAD (mode 3) on each, the flags
    smoothed by a moving average of ``vad_moving_average_width`` windows and rounded, the voiced
    runs dilated by ``vad_max_silence_length`` windows, the other windows dropped. Only the
    16-bit conversion differs: ``VAD_WINDOWS_PER_BLOCK`` windows at a time with ``tobytes``
    (the same native-endian bytes as Resemblyzer's ``struct.pack`` of the whole signal, without
    its Python int per sample).

    Shape:
        wav (T,) float32 at 16 kHz -> (T',) with T' <= T
    """
    from scipy.ndimage import binary_dilation

    hp = _resemblyzer().hparams
    import webrtcvad  # importable once _resemblyzer() has imported it with its shim

    window = hp.vad_window_length * hp.sampling_rate // 1000  # samples per VAD window
    n_windows = len(wav) // window
    vad = webrtcvad.Vad(mode=3)
    flags = np.zeros(n_windows)  # (W,) 1.0 where the VAD hears speech
    for first in range(0, n_windows, VAD_WINDOWS_PER_BLOCK):
        last = min(first + VAD_WINDOWS_PER_BLOCK, n_windows)
        pcm = np.round(wav[first * window : last * window] * INT16_MAX).astype(np.int16).tobytes()
        step = 2 * window  # bytes per window
        for i in range(last - first):
            flags[first + i] = vad.is_speech(pcm[i * step : (i + 1) * step],
                                             sample_rate=hp.sampling_rate)
    width = hp.vad_moving_average_width
    padded = np.concatenate((np.zeros((width - 1) // 2), flags, np.zeros(width // 2)))
    # Sums of 0/1 flags are exact, so this equals Resemblyzer's cumulative-sum average.
    mask = np.round(np.convolve(padded, np.ones(width), mode="valid") / width).astype(bool)
    mask = binary_dilation(mask, np.ones(hp.vad_max_silence_length + 1))
    return wav[: n_windows * window].reshape(n_windows, window)[mask].ravel()  # (W, window)


def _prepare(wave: np.ndarray, sr: int) -> np.ndarray | None:
    """The 16 kHz float32 signal the encoder sees, or None for a silent input.

    Resemblyzer's ``preprocess_wav`` is the pipeline its encoder was trained with (volume to
    -30 dBFS, increase only; pauses longer than ~0.2 s cut by a WebRTC VAD). It is reproduced
    here with two changes: soxr replaces librosa's resampler (the same resampler as the rest of
    the evaluation), and the level is set to -30 dBFS in both directions. The encoder's input is
    a *power* (not log) mel spectrogram, so its embedding depends on the level; a TSE estimate's
    gain is arbitrary, and a louder-than -30 dBFS estimate must not score differently from the
    same estimate played more quietly. The pause trimming is kept: it is what the encoder saw
    in training and it stops long silences (or residual noise in them) from diluting the
    average over 1.6 s partial windows. Two blockwise passes (the level at 16 kHz, then the
    scaled signal), so the only whole-signal array is the float32 result.
    """
    _, rms = level_at(wave, sr, ENCODER_SR)
    if rms < SILENT_RMS:
        return None
    gain = TARGET_RMS / rms
    # Scaled to -30 dBFS RMS a speech signal peaks well below full scale; the clip only guards
    # the int16 conversion inside the VAD against rare impulsive inputs.
    x = resample_into(wave, sr, ENCODER_SR, np.float32,
                      after=lambda y: np.clip(y * gain, -1.0, 1.0))
    trimmed = _trim_long_silences(x)
    return trimmed if trimmed.size >= MIN_TRIMMED_SECONDS * ENCODER_SR else x


def _zero_extended(wav: np.ndarray, start: int, stop: int) -> np.ndarray:
    """``wav[start:stop]`` where indices outside [0, T) read zeros.

    Shape:
        wav (T,) -> (stop - start,)
    """
    out = np.zeros(stop - start, dtype=wav.dtype)
    lo, hi = max(start, 0), min(stop, len(wav))
    if hi > lo:
        out[lo - start : hi - start] = wav[lo:hi]
    return out


def _embed(wav: np.ndarray) -> np.ndarray:
    """GE2E embedding of a prepared signal: Resemblyzer's ``VoiceEncoder.embed_utterance``
    (Apache-2.0) followed step for step, in batches. The same partial windows
    (``compute_partial_slices`` at ``PARTIALS_PER_SECOND`` and ``MIN_COVERAGE``), the same
    power mel spectrogram (librosa, 25 ms Hann frames every 10 ms, 40 bands, the signal
    extended with zeros on both sides as librosa's centred STFT and ``embed_utterance``'s end
    padding do), the partial embeddings averaged and L2-normalised; only the spectrogram of
    ``PARTIALS_PER_BATCH`` windows and their encoder pass exist at once, not the whole
    signal's. Equal to ``embed_utterance`` to float32 rounding (tested).

    Shape:
        wav (T,) float32 at 16 kHz -> (EMBEDDING_DIM,) float32
    """
    import librosa  # Resemblyzer's own dependency, loaded by _resemblyzer() already

    hp = _resemblyzer().hparams
    encoder = _get_encoder()
    hop = int(hp.sampling_rate * hp.mel_window_step / 1000)
    n_fft = int(hp.sampling_rate * hp.mel_window_length / 1000)
    _, mel_slices = encoder.compute_partial_slices(len(wav), PARTIALS_PER_SECOND, MIN_COVERAGE)
    total = np.zeros(EMBEDDING_DIM)  # float64 sum of the unit-norm partial embeddings
    for first in range(0, len(mel_slices), PARTIALS_PER_BATCH):
        batch = mel_slices[first : first + PARTIALS_PER_BATCH]
        f0, f1 = batch[0].start, batch[-1].stop
        # Frame f of a centred STFT covers samples [f hop - n_fft / 2, f hop + n_fft / 2).
        chunk = _zero_extended(wav, f0 * hop - n_fft // 2, (f1 - 1) * hop + n_fft // 2)
        mel = librosa.feature.melspectrogram(
            y=chunk, sr=hp.sampling_rate, n_fft=n_fft, hop_length=hop,
            n_mels=hp.mel_n_channels, center=False,
        ).astype(np.float32).T  # (f1 - f0, n_mels)
        mels = np.stack([mel[s.start - f0 : s.stop - f0] for s in batch])  # (B, 160, n_mels)
        with torch.no_grad():
            total += encoder(torch.from_numpy(mels)).sum(dim=0).double().numpy()
    raw = total / len(mel_slices)
    return (raw / np.linalg.norm(raw)).astype(np.float32)


def speaker_embedding(wave: np.ndarray, sr: int) -> np.ndarray:
    """Unit-norm GE2E d-vector of a mono float signal at any sample rate.

    Args:
        wave: (T,) float signal in [-1, 1] at ``sr`` Hz; any level (it is normalised).
        sr: its sample rate; resampled to 16 kHz with soxr.

    Returns:
        (256,) float32 embedding of unit L2 norm (all entries >= 0: the encoder ends in a ReLU),
        the L2-normalised mean over 1.6 s windows of the trimmed signal. For a silent input (RMS
        below -100 dBFS) every entry is NaN, so any similarity with it is NaN.

    Cost: flat memory beyond the 16 kHz float32 signal (see the module docstring); the whole
    signal is one utterance, however long.
    """
    x = _prepare(wave, sr)
    if x is None:
        return np.full(EMBEDDING_DIM, np.nan, dtype=np.float32)
    return _embed(x)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of the angle between two embeddings, in [-1, 1] (NaN if either holds a NaN or is 0).

    Args:
        a, b: (D,) embeddings; they need not be normalised.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.dot(a, b) / norm) if norm > 0 else float("nan")
