"""Perceptual contrast stretching (PCS) of an estimate, at 48 kHz.

PCS (Chao et al., 2022, "Perceptual Contrast Stretching on Target Feature for Speech
Enhancement") multiplies every STFT bin's ``log1p`` magnitude by a fixed gain of its frequency,
greatest where the ear is most sensitive, and resynthesises with the original phase. This is
CMGAN / SEMamba's PCS400 (RoyChao19477/SEMamba, MIT, ``models/pcs400.py``), followed closely:
its table of 201 gains for a 400-point, 25 ms Hamming STFT with a 100-sample hop at 16 kHz
(40 Hz bins), the same log1p / expm1 round trip and the original phase.

At another rate the STFT keeps the original's 25 ms window, hop of a quarter window and 40 Hz
bins (at 48 kHz: n_fft 1200, hop 300, 601 bins), so bin ``k`` lies at the frequency of the
original's bin ``k``: bins up to 8 kHz take the original gain, the bins above it gain 1 (the
table ends at its Nyquist frequency). ``log1p`` makes the stretch level-dependent (about a
linear gain for quiet bins, a power law for loud ones), so the magnitudes are divided by
``n_fft / 400`` (3 at 48 kHz) before it and multiplied back after: an unnormalised STFT of the
same sound grows with the window's length in samples, and this keeps every bin at the level
the table was tuned for at 16 kHz.

Unlike the original, the output is *not* divided by its peak: that normalisation would raise a
target-absent estimate (near silence by design) to full scale. A quiet bin is multiplied by at
most the largest gain, 1.4 (+2.9 dB), so near silence stays near silence; loud bins are
expanded and may exceed full scale (the float WAVs that inference.py writes keep them).

PCS is local (an output sample depends only on the input within one ``n_fft`` of it), so
:func:`pcs_stream` applies it to a stream in bounded memory with the same result as
:func:`pcs` on the whole signal.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from dsp.precision import autocast_off

SAMPLE_RATE = 48_000
PCS400_SAMPLE_RATE = 16_000
PCS400_N_FFT = 400  # 25 ms at 16 kHz: 201 bins of 40 Hz
HOPS_PER_WINDOW = 4  # PCS400's hop is 100 samples, a quarter of its window
# SEMamba's PCS400 gains as (first bin, end bin, gain) runs over the 201 bins of 40 Hz
# (``PCS400[3:5] = 1.070175439`` and so on; its last slice, 190:202, runs past the end).
PCS400_RUNS: tuple[tuple[int, int, float], ...] = (
    (0, 3, 1.0),
    (3, 5, 1.070175439),
    (5, 8, 1.182456140),
    (8, 10, 1.287719298),
    (10, 110, 1.4),
    (110, 130, 1.322807018),
    (130, 160, 1.238596491),
    (160, 190, 1.161403509),
    (190, 201, 1.077192982),
)
PCS400_BINS = PCS400_N_FFT // 2 + 1  # 201: 0 to 8 kHz


def pcs400_table() -> np.ndarray:
    """The original PCS400 gains, one per 40 Hz bin from 0 to 8 kHz. Shape: (201,) float64."""
    table = np.ones(PCS400_BINS)
    for first, end, gain in PCS400_RUNS:
        table[first:end] = gain
    return table


def stft_sizes(sr: int) -> tuple[int, int]:
    """``(n_fft, hop)`` with PCS400's 25 ms window, quarter-window hop and 40 Hz bins at
    ``sr`` (1200 and 300 at 48 kHz); ``sr`` must make both whole numbers of samples."""
    n_fft, rem = divmod(sr * PCS400_N_FFT, PCS400_SAMPLE_RATE)
    if rem or n_fft % HOPS_PER_WINDOW or n_fft < HOPS_PER_WINDOW:
        raise ValueError(f"PCS needs a sample rate that is a multiple of "
                         f"{PCS400_SAMPLE_RATE * HOPS_PER_WINDOW // PCS400_N_FFT} Hz, got {sr}")
    return n_fft, n_fft // HOPS_PER_WINDOW


def pcs_gains(sr: int = SAMPLE_RATE) -> np.ndarray:
    """The gain of every bin of the ``stft_sizes(sr)`` STFT: PCS400's up to 8 kHz (bin ``k``
    is at ``40 k`` Hz at any rate), 1 above. Shape: (n_fft // 2 + 1,) float32, (601,) at 48
    kHz."""
    n_fft, _ = stft_sizes(sr)
    gains = np.ones(n_fft // 2 + 1, dtype=np.float32)
    shared = min(PCS400_BINS, gains.shape[0])
    gains[:shared] = pcs400_table()[:shared]
    return gains


def _pcs_tensor(wave: torch.Tensor, sr: int) -> torch.Tensor:
    """:func:`pcs` on a tensor. Shape: (N,) or (B, N) -> the same."""
    if wave.dim() not in (1, 2):
        raise ValueError(f"expected a (N,) or (B, N) waveform, got shape {tuple(wave.shape)}")
    n_fft, hop = stft_sizes(sr)
    n = wave.shape[-1]
    if n == 0:
        return wave.clone()
    # scipy.signal.windows.hamming(400), the original's window, is the symmetric one.
    window = torch.hamming_window(n_fft, periodic=False, dtype=torch.float32, device=wave.device)
    gains = torch.from_numpy(pcs_gains(sr)).to(wave.device)[:, None]  # (F, 1)
    level = n_fft / PCS400_N_FFT  # this STFT's magnitude of a sound / PCS400's (module doc)
    # Zero-pad to a whole number of hops, so the last samples lie under full frames.
    padded = F.pad(wave.to(torch.float32), (0, -n % hop))
    with autocast_off(wave):
        spec = torch.stft(padded, n_fft=n_fft, hop_length=hop, window=window, center=True,
                          pad_mode="constant", return_complex=True)  # (..., F, T)
        stretched = torch.expm1(gains * torch.log1p(spec.abs() / level)) * level
        out = torch.istft(torch.polar(stretched, spec.angle()), n_fft=n_fft, hop_length=hop,
                          window=window, center=True, length=padded.shape[-1])
    return out[..., :n].to(wave.dtype)


def pcs(wave: np.ndarray | torch.Tensor, sr: int = SAMPLE_RATE) -> np.ndarray | torch.Tensor:
    """Perceptual contrast stretching of a waveform (module docstring), without the original's
    peak normalisation. Computed in float32 (on the tensor's device); returned in the input's
    type, dtype and shape, exactly as long.

    Shape:
        wave: (N,) or (B, N) float, numpy or torch -> the same.
    """
    if isinstance(wave, torch.Tensor):
        return _pcs_tensor(wave, sr)
    if not np.issubdtype(wave.dtype, np.floating):
        raise TypeError(f"expected a float waveform, got {wave.dtype}")
    out = _pcs_tensor(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)), sr)
    return out.numpy().astype(wave.dtype, copy=False)


def pcs_stream(blocks: Iterable[np.ndarray], *, sr: int = SAMPLE_RATE) -> Iterator[np.ndarray]:
    """:func:`pcs` of a stream of mono blocks, in bounded memory: the same samples (to float
    rounding) as ``pcs`` of the whole signal, in blocks as they become final.

    Each part is computed on a segment reaching ``n_fft`` samples beyond it on either side,
    whose start lies on the whole signal's frame grid (a multiple of the hop): every frame that
    overlaps the part is then exactly one of the whole signal's frames, and the segment's edge
    frames, which see zero padding, touch only the context that is dropped. Holds one input
    block and ``2 n_fft`` samples of context beyond what it yields.

    Shape:
        blocks: (n,) each -> (m,) each, the same total length.
    """
    n_fft, hop = stft_sizes(sr)
    context = n_fft  # a multiple of the hop
    buf, buf_start = np.zeros(0, dtype=np.float32), 0  # input samples [buf_start, ...)
    done = 0  # samples yielded, always a multiple of the hop until the last part
    for block in blocks:
        buf = np.concatenate([buf, np.asarray(block, dtype=np.float32)])
        ready = (buf_start + buf.shape[0] - context) // hop * hop  # final up to here
        if ready <= done:
            continue
        seg_start = max(0, done - context)
        out = pcs(buf[seg_start - buf_start : ready + context - buf_start], sr)
        yield out[done - seg_start : ready - seg_start]
        done = ready
        keep = max(0, done - context)
        buf, buf_start = buf[keep - buf_start :], keep
    seg_start = max(0, done - context)
    if buf_start + buf.shape[0] > done:
        yield pcs(buf[seg_start - buf_start :], sr)[done - seg_start :]


__all__ = ["pcs", "pcs400_table", "pcs_gains", "pcs_stream", "stft_sizes"]
