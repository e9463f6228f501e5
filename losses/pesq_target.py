"""Normalised wide-band PESQ of training estimates: the metric discriminator's targets.

``(PESQ - 1) / 3.5`` (MetricGAN+, SEMamba) maps PESQ's nominal 1 to 4.5 onto 0 to 1 (a
perfect wide-band score, 4.64, gives 1.04). PESQ is computed on the CPU, on the target and the
estimate resampled to 16 kHz with soxr (wide-band mode), by the ``pesq`` package.

:class:`PesqScorer` runs it in worker processes, so the training step does not wait for it
serially: ``submit`` returns at once and ``Future.result`` waits only for what is not yet done.
Processes, not threads: the ``pesq`` extension holds the GIL while it scores. They are started
with ``spawn``, since a fork of a process holding CUDA state and helper threads (data loading,
NCCL) may deadlock; as with any spawned pool, a script that trains with it must guard its entry
point with ``if __name__ == "__main__":`` (each worker imports the main module once). Starting
them takes a few seconds, once; afterwards, measured on the CPU with the tiny model and 2 x 4 s
items, PESQ was always done before the step needed it (no wait at ``result``).
"""

from __future__ import annotations

import math
import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
import soxr
import torch
from pesq import PesqError, pesq
from torch import Tensor

from dsp.processes import worker_init

PESQ_SAMPLE_RATE = 16_000  # wide-band PESQ is defined at 16 kHz
NB_PESQ_SAMPLE_RATE = 8_000  # narrow-band PESQ (P.862) at 8 kHz
PESQ_OFFSET, PESQ_SPAN = 1.0, 3.5  # (PESQ - 1) / 3.5


def pesq_rate(sample_rate: int, configured: int = PESQ_SAMPLE_RATE) -> int:
    """The rate PESQ runs at for signals at ``sample_rate``: narrow-band at 8 kHz below 16 kHz,
    where wide-band PESQ would score an upsampled narrow band, else ``configured`` (16 kHz, or
    evaluate.py's ``eval.pesq_sr``)."""
    return NB_PESQ_SAMPLE_RATE if sample_rate < PESQ_SAMPLE_RATE else configured


def normalised_pesq(estimate: np.ndarray, target: np.ndarray, sample_rate: int) -> float:
    """``(PESQ(target, estimate) - 1) / 3.5``, wide-band at 16 kHz (narrow-band at 8 kHz for
    signals below 16 kHz: ``pesq_rate``), or NaN where PESQ is undefined: a
    silent target (a target-absent item), a non-finite sample, or an error of ``pesq`` (no
    utterance found, too short a signal).

    Shape:
        estimate, target: (N,) at ``sample_rate``.
    """
    if not target.any() or not (np.isfinite(estimate).all() and np.isfinite(target).all()):
        return math.nan
    rate = pesq_rate(sample_rate)
    if sample_rate != rate:
        target = soxr.resample(target, sample_rate, rate)
        estimate = soxr.resample(estimate, sample_rate, rate)
    try:
        score = pesq(rate, target, estimate, "wb" if rate == PESQ_SAMPLE_RATE else "nb")
    except PesqError:
        return math.nan
    return (score - PESQ_OFFSET) / PESQ_SPAN


class PesqScorer:
    """:func:`normalised_pesq` of every item of a batch in ``workers`` processes, started on
    the first :meth:`submit` (the first step of the GAN phase)."""

    def __init__(self, *, sample_rate: int, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.sample_rate = sample_rate
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self._dispatch: ThreadPoolExecutor | None = None

    def submit(self, estimate: Tensor, target: Tensor) -> Future[np.ndarray]:
        """Start scoring and return at once.

        On CUDA the estimate and the target are copied to pinned host memory asynchronously,
        and a helper thread waits for that copy (a CUDA event) before handing the items to the
        processes: neither the copy nor the scoring blocks the calling thread, which may go on
        queuing work for the device until it needs the result.

        Shape:
            estimate, target: (B, N) -> a future of (B,) float32, NaN where undefined.
        """
        if self._pool is None:
            # The workers ignore the stop signals (train.py stops gracefully, and Ctrl-C
            # reaches the whole process group) and end with it when it is killed.
            self._pool = ProcessPoolExecutor(self.workers,
                                             mp_context=multiprocessing.get_context("spawn"),
                                             initializer=worker_init,
                                             initargs=(os.getpid(),))
            self._dispatch = ThreadPoolExecutor(1, thread_name_prefix="pesq")
        # On the CPU these are the tensors themselves: nothing writes to them afterwards.
        est = estimate.detach().float().to("cpu", non_blocking=True)
        tgt = target.detach().float().to("cpu", non_blocking=True)
        copied = None
        if estimate.is_cuda:
            copied = torch.cuda.Event()
            copied.record()
        return self._dispatch.submit(self._score, est, tgt, copied, estimate.device)

    def _score(self, est: Tensor, tgt: Tensor, copied: torch.cuda.Event | None,
               device: torch.device) -> np.ndarray:
        if copied is not None:
            # The training device: a CUDA call from this thread must not create a context on
            # GPU 0 in every rank's process.
            with torch.cuda.device(device):
                copied.synchronize()
        jobs = [self._pool.submit(normalised_pesq, e, t, self.sample_rate)
                for e, t in zip(est.numpy(), tgt.numpy(), strict=True)]
        return np.array([job.result() for job in jobs], dtype=np.float32)

    def close(self) -> None:
        """Stop the worker processes (a later :meth:`submit` starts them again)."""
        if self._pool is not None:
            self._dispatch.shutdown()
            self._pool.shutdown()
            self._pool = self._dispatch = None


__all__ = ["PESQ_OFFSET", "PESQ_SPAN", "PesqScorer", "normalised_pesq"]
