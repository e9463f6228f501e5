"""Overlapping windows and their raised-cosine cross-fades: how a recording longer than the
model's window is extracted in bounded memory."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np

WINDOW_SECONDS = 8.0  # 2x the 4 s training crops; the full-band attention is quadratic in it
OVERLAP_SECONDS = 1.0  # cross-fade length between windows


def plan_windows(n_samples: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """``(start, end)`` of each window: every ``window - overlap`` samples, the last one moved
    back to end at ``n_samples`` (so it is full length and overlaps its neighbour by more)."""
    if not 0 <= overlap < window:
        raise ValueError(f"overlap {overlap} must be in [0, window {window})")
    if n_samples <= window:
        return [(0, n_samples)]
    starts = list(range(0, n_samples - window, window - overlap))
    starts.append(n_samples - window)
    return [(s, s + window) for s in starts]


def fade_in(n: int) -> np.ndarray:
    """Raised-cosine fade-in of ``n`` samples; ``1 - fade_in(n)`` is its fade-out partner, so
    the pair's gains sum to exactly one at every sample."""
    t = (np.arange(n, dtype=np.float64) + 0.5) / n
    return (0.5 - 0.5 * np.cos(np.pi * t)).astype(np.float32)


def overlap_add(
    blocks: Iterable[np.ndarray],
    n_samples: int,
    process: Callable[[np.ndarray], np.ndarray],
    *,
    window: int,
    overlap: int,
) -> Iterator[np.ndarray]:
    """Run ``process`` on overlapping windows of a stream of exactly ``n_samples`` samples and
    yield the cross-faded result as soon as each part is final.

    Holds at most one window of input plus one read block, and one window of output.
    ``process`` maps (n,) to (n,).
    """
    plan = plan_windows(n_samples, window, overlap)
    source = iter(blocks)
    buf, buf_start = np.zeros(0, dtype=np.float32), 0  # input samples [buf_start, ...)
    carry = np.zeros(0, dtype=np.float32)  # previous window's estimate over [start, prev end)
    for k, (start, end) in enumerate(plan):
        while buf_start + buf.shape[0] < end:
            block = next(source, None)
            if block is None:
                raise ValueError(f"the stream ended before sample {end} of {n_samples}")
            buf = np.concatenate([buf, block])
        est = np.array(process(buf[start - buf_start : end - buf_start]), dtype=np.float32)
        if carry.shape[0]:
            gain = fade_in(carry.shape[0])
            est[: carry.shape[0]] = carry * (1.0 - gain) + est[: carry.shape[0]] * gain
        if k + 1 == len(plan):
            yield est
            return
        next_start = plan[k + 1][0]
        yield est[: next_start - start]
        carry = est[next_start - start :]
        buf, buf_start = buf[next_start - buf_start :], next_start
