"""The evaluation run: the generator in the main process, the metrics in worker processes.

Each sample is loaded (and, with ``lufs``, its mixture loudness-normalised), extracted through
``inference.Extractor`` as inference.py extracts it (whole file: windows, cross-fades, one level
per file) and, with ``chunk``, a second time chunk by chunk as a streaming system would
(``Extractor.extract_chunked``). The metrics, which are CPU-heavy, run in ``jobs`` spawned
worker processes while the next sample is extracted.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyloudnorm
import torch
from tqdm import tqdm

from data.audio_utils import SAMPLE_RATE
from evaluation.metrics import STREAM_PREFIX, MetricSettings, score
from evaluation.sources import Sample, SampleSource
from inference import Extractor

MAX_IN_FLIGHT_PER_JOB = 4  # estimates waiting for a metric worker; bounds the memory they hold


@dataclass(frozen=True)
class RunSettings:
    """How samples are prepared and extracted."""

    jobs: int = 1  # metric worker processes; 0 computes them in the main process
    lufs: float | None = None  # loudness-normalise each mixture to this (LUFS) before extraction
    chunk_seconds: float | None = None  # also extract in independent chunks of this length
    chunk_overlap_seconds: float = 0.0


def mixture_loudness(mix: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """Integrated loudness of the mixture in LUFS, ITU-R BS.1770-4 (K-weighting, 400 ms gating
    blocks with 75 % overlap, -70 LUFS absolute and -10 LU relative gates), by ``pyloudnorm``.
    -inf when every block is gated out (silence); a signal shorter than one 400 ms block is
    an error from pyloudnorm."""
    return float(pyloudnorm.Meter(sample_rate).integrated_loudness(
        np.asarray(mix, dtype=np.float64)))


def load_sample(source: SampleSource, settings: RunSettings) -> tuple[Sample, dict[str, Any]]:
    """The sample of ``source`` as the model will see it, and the row fields that describe
    it. With ``settings.lufs`` the mixture, and everything compared with it, are scaled so that
    the mixture's integrated loudness is ``lufs`` (the reference keeps its own level)."""
    sample = source.load()
    row = {
        "id": sample.id,
        "condition": sample.condition,
        "n_interferers": sample.meta.get("n_interferers"),
        "snr_db": sample.meta.get("snr_db"),
        "ref_noisy": sample.meta.get("ref_noisy"),
        "seconds": len(sample.mix) / SAMPLE_RATE,
    }
    if settings.lufs is not None:
        loudness = mixture_loudness(sample.mix)
        row["mix_lufs"] = loudness
        if math.isfinite(loudness):  # a silent mixture stays as it is
            sample = sample.scaled(10 ** ((settings.lufs - loudness) / 20))
    return sample, row


def extract_all(extractor: Extractor, sample: Sample,
                settings: RunSettings) -> dict[str, np.ndarray]:
    """The estimates of ``sample``: "" the whole-file one, ``stream_`` the chunked one.

    Shape:
        returns: prefix -> (N,) float32 with N = len(sample.mix)
    """
    name = f"{sample.id} (reference)"
    out = {"": extractor.extract_array(sample.mix, sample.ref, ref_name=name)}
    if settings.chunk_seconds is not None:
        out[STREAM_PREFIX] = extractor.extract_chunked(
            sample.mix, sample.ref, chunk_seconds=settings.chunk_seconds,
            overlap_seconds=settings.chunk_overlap_seconds, ref_name=name)
    return out


def _init_worker() -> None:
    # One thread per worker: the workers are the parallelism, and the generator in the main
    # process needs the remaining cores (NUMBA_NUM_THREADS: ViSQOL's numba kernels, read when
    # numba is first imported).
    torch.set_num_threads(1)
    os.environ["NUMBA_NUM_THREADS"] = "1"


def run_samples(
    extractor: Extractor,
    sources: Sequence[SampleSource],
    *,
    settings: RunSettings,
    metrics: MetricSettings,
) -> list[dict[str, Any]]:
    """One row per source, in the sources' order: conditions and metrics.

    ``settings.jobs`` worker processes (spawned: safe after CUDA and OpenMP are initialised)
    compute the metrics while the main process extracts the next samples; 0 computes them in
    the main process (for debugging).
    """
    jobs = settings.jobs
    rows: list[dict[str, Any]] = [{} for _ in sources]
    bar = tqdm(total=len(sources), desc="evaluate", unit="sample", disable=None)
    pool = (
        ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                            initializer=_init_worker)
        if jobs > 0
        else None
    )
    pending: dict[Future[dict[str, Any]], int] = {}

    def collect(done: set[Future[dict[str, Any]]]) -> None:
        for fut in done:
            rows[pending.pop(fut)].update(fut.result())
            bar.update()

    try:
        for i, source in enumerate(sources):
            sample, rows[i] = load_sample(source, settings)
            args = (extract_all(extractor, sample, settings), sample, metrics)
            if pool is None:
                rows[i].update(score(*args))
                bar.update()
                continue
            pending[pool.submit(score, *args)] = i
            if len(pending) >= MAX_IN_FLIGHT_PER_JOB * jobs:
                collect(wait(pending, return_when=FIRST_COMPLETED).done)
        while pending:
            collect(wait(pending, return_when=FIRST_COMPLETED).done)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return rows
