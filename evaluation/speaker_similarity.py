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

from evaluation.signal import mono_at

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
    average over 1.6 s partial windows.
    """
    x, rms = mono_at(wave, sr, ENCODER_SR)
    if rms < SILENT_RMS:
        return None
    # Scaled to -30 dBFS RMS a speech signal peaks well below full scale; the clip only guards
    # the int16 conversion inside the VAD against rare impulsive inputs.
    x = np.clip(x * (TARGET_RMS / rms), -1.0, 1.0).astype(np.float32)
    trimmed = _resemblyzer().trim_long_silences(x)
    return trimmed if trimmed.size >= MIN_TRIMMED_SECONDS * ENCODER_SR else x


def speaker_embedding(wave: np.ndarray, sr: int) -> np.ndarray:
    """Unit-norm GE2E d-vector of a mono float signal at any sample rate.

    Args:
        wave: (T,) float signal in [-1, 1] at ``sr`` Hz; any level (it is normalised).
        sr: its sample rate; resampled to 16 kHz with soxr.

    Returns:
        (256,) float32 embedding of unit L2 norm (all entries >= 0: the encoder ends in a ReLU),
        the L2-normalised mean over 1.6 s windows of the trimmed signal. For a silent input (RMS
        below -100 dBFS) every entry is NaN, so any similarity with it is NaN.
    """
    x = _prepare(wave, sr)
    if x is None:
        return np.full(EMBEDDING_DIM, np.nan, dtype=np.float32)
    return _get_encoder().embed_utterance(x)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of the angle between two embeddings, in [-1, 1] (NaN if either holds a NaN or is 0).

    Args:
        a, b: (D,) embeddings; they need not be normalised.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.dot(a, b) / norm) if norm > 0 else float("nan")
