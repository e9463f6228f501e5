"""Full-reference quality at 48 kHz: ViSQOL v3 in audio mode (Chinen et al., QoMEX 2020).

ViSQOL compares gammatone spectrogram patches (32 bands, 50 Hz-15 kHz) of the degraded signal and
the reference with a neurogram similarity (NSIM) and maps the per-band similarities to a MOS-LQO
with the support vector regression model of Google's release (``libsvm_nu_svr_model.txt``). In
audio mode the scale tops out at about 4.73, the score of any signal against itself (Google's
conformance value ``kConformanceCastanetsIdentity`` = 4.7321). The implementation is
``visqol-python``, a Python port that ships that model; on Google's conformance files it gives
the C++ scores to 1e-13 (5 pairs), 1.2e-4 (contrabassoon, 24 kb/s AAC) and 3e-3 (the CA01 speech
pair scored in audio mode).

On speech the audio mode uses little of its range: on RAVDESS sentences, running-tap noise at
0 dB SNR scores 3.45-3.95 and another speaker saying the same words 3.27-3.93.

Cost: about 0.2 s of CPU per second of signal. With numba installed (librosa brings it) the
package JIT-compiles its kernels once into its ``__pycache__`` (15-30 s, the first call after
installing) and runs them over ``numba.get_num_threads()`` threads; a metric worker that must
stay on one core starts with ``NUMBA_NUM_THREADS=1``. Importing the package sets
``NUMBA_THREADING_LAYER=workqueue`` in ``os.environ`` unless it is set: one more reason the
import waits for the first call.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
import soxr

from evaluation.signal import segment_bounds

if TYPE_CHECKING:
    from visqol import VisqolApi

VISQOL_SR = 48_000  # audio mode's rate; its SVR model was trained on 48 kHz signals


@functools.cache
def _get_api() -> VisqolApi:
    """The process's ViSQOL instance in audio mode with the bundled SVR model, built on first
    use (the import of visqol and numba takes seconds)."""
    from visqol import VisqolApi

    api = VisqolApi()
    api.create(mode="audio")
    return api


def visqol_audio(estimate: np.ndarray, target: np.ndarray, sr: int) -> float:
    """ViSQOL v3 audio-mode MOS-LQO of ``estimate`` (degraded) against ``target`` (reference).

    Args:
        estimate, target: (T,) mono float signals at ``sr`` Hz. ViSQOL aligns them and scales
            the estimate to the target's sound pressure level, so a gain error costs nothing.
        sr: their sample rate; resampled to 48 kHz with soxr otherwise.

    Returns:
        MOS-LQO, from about 1 (unrelated) to 4.7321 (identical).

    Long signals: scored on the ``segment_bounds`` segments (consecutive, equal, at most
    ``LONG_SEGMENT_SECONDS``), each converted to float64 and resampled alone, the mean of their
    MOS-LQO weighted by segment length; up to 60 s one segment, the whole-file score. Memory is
    that of one segment's ViSQOL, whatever the length.
    """
    shapes = [np.shape(s) for s in (estimate, target)]
    if any(len(s) != 1 or s[0] == 0 for s in shapes):
        raise ValueError(f"expected two non-empty mono signals, got {shapes}")
    scores, weights = [], []
    for start, stop in segment_bounds(len(target), sr):
        signals = [np.asarray(s[start:stop], dtype=np.float64) for s in (estimate, target)]
        if sr != VISQOL_SR:
            signals = [soxr.resample(s, sr, VISQOL_SR) for s in signals]
        degraded, reference = signals
        result = _get_api().measure_from_arrays(reference, degraded, sample_rate=VISQOL_SR)
        scores.append(float(result.moslqo))
        weights.append(stop - start)
    total = sum(weights)
    # Weights normalised first, so a single segment's score comes back bit for bit.
    return float(sum(s * (w / total) for s, w in zip(scores, weights, strict=True)))
