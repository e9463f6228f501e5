"""Signal plumbing the metrics share: long-signal segments, blockwise float64 reads and
streaming resampling.

Inputs may be ``np.memmap`` float32 arrays of an hour (173 M samples at 48 kHz; 1.4 GB as one
float64 copy), so nothing here makes a whole-signal float64 copy at the input rate: signals are
read ``BLOCK_SAMPLES`` at a time, cast to float64 one block at a time, and resampled with soxr's
streaming resampler, whose output equals ``soxr.resample`` of the whole float64 signal bit for
bit (checked in ``tests/test_long_metrics.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import soxr

# The metrics that cannot run on a whole long signal (PESQ, STOI, ViSQOL, ASR) run on
# consecutive segments of at most this length: the P.862 C code segfaults on ~300 s.
LONG_SEGMENT_SECONDS = 60.0
# Samples per block of a blockwise pass: 8 MiB as float64, small against any signal that needs
# blocks, large enough that the per-block overhead is nothing.
BLOCK_SAMPLES = 2**20
SOXR_QUALITY = "HQ"  # soxr.resample's default, which every metric used before the streaming

BlockFn = Callable[[np.ndarray], np.ndarray]


def segment_bounds(
    n: int, sample_rate: int, max_seconds: float = LONG_SEGMENT_SECONDS
) -> list[tuple[int, int]]:
    """``n`` samples cut into ``k = ceil(n / (max_seconds * sample_rate))`` consecutive segments
    of (nearly) equal length, the lengths differing by at most one sample, so there is no tiny
    tail. One segment ``(0, n)`` when ``n`` fits (or is 0).

    Shape:
        returns k (start, stop) pairs covering [0, n) in order
    """
    k = max(1, math.ceil(n / (max_seconds * sample_rate)))
    return [(i * n // k, (i + 1) * n // k) for i in range(k)]


def float64_blocks(wave: np.ndarray, block: int | None = None) -> Iterator[np.ndarray]:
    """Consecutive float64 copies of ``block`` (default ``BLOCK_SAMPLES``) samples, the last one
    shorter, of a 1-D signal; none for an empty one.

    Shape:
        wave (T,) -> ceil(T / block) blocks (<= block,)
    """
    block = block or BLOCK_SAMPLES
    for start in range(0, len(wave), block):
        yield np.asarray(wave[start : start + block], dtype=np.float64)


def energy(wave: np.ndarray) -> float:
    """Sum of squares of a 1-D signal of any length, in float64 ``BLOCK_SAMPLES`` blocks (memory
    one block)."""
    return sum(float(np.dot(b, b)) for b in float64_blocks(wave))


def resampled_blocks(
    wave: np.ndarray, sr: int, rate: int, *, before: BlockFn | None = None,
    block: int | None = None,
) -> Iterator[np.ndarray]:
    """``wave`` at ``rate`` in float64 blocks, from input blocks of ``block`` (default
    ``BLOCK_SAMPLES``) samples each passed through ``before`` (an elementwise map, such as a
    gain and a clip) first. Concatenated, the blocks equal
    ``soxr.resample(before(wave.astype(float64)), sr, rate)`` bit for bit (soxr's one-shot call
    streams internally too); no resampling when ``sr == rate``.

    Shape:
        wave (T,) -> blocks whose lengths sum to round(T * rate / sr)
    """
    if np.ndim(wave) != 1:
        raise ValueError(f"expected a mono signal of shape (T,), got {np.shape(wave)}")
    block = block or BLOCK_SAMPLES
    stream = None if sr == rate else soxr.ResampleStream(
        sr, rate, 1, dtype="float64", quality=SOXR_QUALITY)
    n = len(wave)
    for start in range(0, n, block):
        x = np.asarray(wave[start : start + block], dtype=np.float64)
        if before is not None:
            x = before(x)
        yield x if stream is None else stream.resample_chunk(x, last=start + block >= n)


def level_at(wave: np.ndarray, sr: int, rate: int) -> tuple[int, float]:
    """(length, RMS) of ``wave`` resampled to ``rate``, from one streaming pass that keeps
    nothing: what a second pass needs to normalise the level before it stores anything."""
    n_out, energy = 0, 0.0
    for y in resampled_blocks(wave, sr, rate):
        n_out += len(y)
        energy += float(np.dot(y, y))
    return n_out, math.sqrt(energy / n_out) if n_out else 0.0


def resample_into(
    wave: np.ndarray, sr: int, rate: int, dtype: type[np.generic], *,
    before: BlockFn | None = None, after: BlockFn | None = None,
) -> np.ndarray:
    """``after(resample(before(wave)))`` computed blockwise in float64 (``resampled_blocks``)
    and stored as ``dtype``: the only whole-signal array is the result.

    Shape:
        wave (T,) -> (round(T * rate / sr),)
    """
    # soxr returns round(T * rate / sr) samples; the bound is one more, and the untouched tail
    # of np.empty is never written, so it costs no memory.
    out = np.empty(math.ceil(len(wave) * rate / sr) + 1, dtype=dtype)
    filled = 0
    for y in resampled_blocks(wave, sr, rate, before=before):
        if after is not None:
            y = after(y)
        if filled + len(y) > len(out):
            raise RuntimeError(f"soxr returned more than {len(out)} samples for {len(wave)}")
        out[filled : filled + len(y)] = y
        filled += len(y)
    return out[:filled]

