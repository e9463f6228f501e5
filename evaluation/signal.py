"""The input step the packaged-model metrics share: a mono float64 signal at the model's rate."""

from __future__ import annotations

import numpy as np
import soxr


def mono_at(wave: np.ndarray, sr: int, rate: int) -> tuple[np.ndarray, float]:
    """``wave`` as float64 at ``rate`` (soxr when ``sr`` differs) and its RMS (0 when empty).

    Shape:
        wave (T,) -> (T * rate / sr,)
    """
    x = np.asarray(wave, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"expected a mono signal of shape (T,), got {x.shape}")
    if sr != rate:
        x = soxr.resample(x, sr, rate)
    return x, float(np.sqrt(np.mean(x**2))) if x.size else 0.0
