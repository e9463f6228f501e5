"""The evaluation run: the generator in the main process, the metrics in worker processes.

Each sample is loaded (and, with ``lufs``, its mixture loudness-normalised), extracted through
``inference.Extractor`` as inference.py extracts it (whole file: windows, cross-fades, one level
per file) and, with ``chunk``, a second time chunk by chunk as a streaming system would
(``Extractor.extract_chunked``). The metrics, which are CPU-heavy, run in ``jobs`` spawned
worker processes (``evaluation/isolation.py``) while the next sample is extracted. A sample
that cannot be loaded is skipped; a metric that crashes or hangs costs that metric on that row.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyloudnorm
from tqdm import tqdm

from data.audio_utils import SAMPLE_RATE, AudioError
from evaluation.isolation import Failure, Job, WorkerPool, run_alone, write_item
from evaluation.metrics import STREAM_PREFIX, MetricSettings
from evaluation.scoring import UNITS, nan_row, score, units_of
from evaluation.sources import EvalInputError, Sample, SampleSource, Skipped
from inference import Extractor, InferenceError

log = logging.getLogger("evaluate")

# Samples extracted ahead of the metric workers, per worker (their scratch folders wait on disk).
MAX_QUEUED_PER_JOB = 2
SECONDS_PER_MINUTE = 60.0
METRIC_TIMEOUT_S = 600.0  # default time one sample's metrics may take per minute of its audio


@dataclass(frozen=True)
class RunSettings:
    """How samples are prepared and extracted."""

    jobs: int = 1  # metric worker processes; 0 computes them in the main process
    lufs: float | None = None  # loudness-normalise each mixture to this (LUFS) before extraction
    chunk_seconds: float | None = None  # also extract in independent chunks of this length
    chunk_overlap_seconds: float = 0.0
    metric_timeout_s: float = METRIC_TIMEOUT_S  # per started minute of a sample's audio




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


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _merge(row: dict[str, Any], result: dict[str, Any]) -> None:
    row["notes"] += result.pop("notes")
    row.update(result)


def _unit_by_unit(job: Job, failure: Failure) -> dict[str, Any]:
    """A job whose worker died or hung, scored again one unit per fresh process: the units that
    fail again are the culprits (NaN, and a note such as ``pesq: crashed (signal 11,
    SIGSEGV)``); every other unit keeps its columns."""
    merged: dict[str, Any] = {"notes": []}
    units = job.units if job.units is not None else units_of(job.settings)
    log.warning("metric worker %s on %s: scoring it again one metric at a time",
                failure.reason, job.name)
    for unit in units:
        result = run_alone(replace(job, units=(unit,)))
        if isinstance(result, Failure):
            log.warning("%s: %s %s", job.name, unit, result.reason)
            merged["notes"].append(f"{unit}: {result.reason}")
        else:
            _merge(merged, result)
    return merged


def run_samples(
    extractor: Extractor,
    sources: Sequence[SampleSource],
    *,
    settings: RunSettings,
    metrics: MetricSettings,
    scratch: Path,
    on_row: Callable[[int, dict[str, Any]], None],
    on_skip: Callable[[Skipped], None],
    done_ids: Collection[str] = (),
    strict: bool = False,
) -> None:
    """Score every source whose ID is not in ``done_ids``: ``on_row(index, row)`` as soon as a
    row is complete (in completion order), ``on_skip`` for a sample that cannot be loaded or
    extracted (with ``strict``, its error is raised instead).

    The main process loads and extracts; each sample's signals and estimates go to a folder
    under ``scratch`` (deleted when its row is done), where ``settings.jobs`` spawned metric
    workers read them (``evaluation/isolation.py``) while the next samples are extracted. With
    ``jobs`` 0 the samples are scored one at a time and the units that are not ``native`` run
    in the main process (for debugging); the native ones still run in a child. A worker that
    crashes or passes its sample's time (``metric_timeout_s`` per started minute of audio)
    costs only the unit that caused it (``_unit_by_unit``).
    """
    units = units_of(metrics)
    if settings.jobs > 0:
        inline, pooled = (), units
    else:
        inline = tuple(u for u in units if not UNITS[u].native)
        pooled = tuple(u for u in units if UNITS[u].native)
    todo = [(i, s) for i, s in enumerate(sources) if s.id not in done_ids]
    bar = tqdm(total=len(todo), desc="evaluate", unit="sample", disable=None)
    pool = WorkerPool(max(1, settings.jobs)) if pooled and todo else None
    waiting: dict[int, dict[str, Any]] = {}  # rows whose pooled units are queued or running
    queue: deque[Job] = deque()
    max_waiting = 0 if settings.jobs == 0 else settings.jobs + MAX_QUEUED_PER_JOB * settings.jobs

    def finish(index: int, row: dict[str, Any]) -> None:
        row["notes"] = "; ".join(dict.fromkeys(row["notes"]))
        on_row(index, row)
        bar.update()

    def ended(job: Job, result: dict[str, Any] | Failure) -> None:
        row = waiting.pop(job.key)
        _merge(row, _unit_by_unit(job, result) if isinstance(result, Failure) else result)
        shutil.rmtree(job.folder, ignore_errors=True)
        finish(job.key, row)

    def pump(most: int) -> None:
        """Hand queued jobs to idle workers and take finished rows until at most ``most`` rows
        are waiting."""
        assert pool is not None
        while True:
            while queue and pool.idle():
                pool.submit(queue.popleft())
            for job, result in pool.collect(block=len(waiting) > most):
                ended(job, result)
            if len(waiting) <= most and not (queue and pool.idle()):
                return

    try:
        for index, source in todo:
            try:
                sample, base = load_sample(source, settings)
                estimates = extract_all(extractor, sample, settings)
            except (AudioError, EvalInputError, InferenceError) as err:
                if strict:
                    raise
                on_skip(Skipped(source.id, _one_line(err)))
                bar.update()
                continue
            row = {**base, **nan_row(metrics), "notes": []}
            if inline:
                _merge(row, score(estimates, sample, metrics, inline))
            if pool is None:
                finish(index, row)
                continue
            folder = scratch / f"{index:08d}"
            write_item(folder, sample, estimates)
            del sample, estimates  # the worker maps the files; a long sample leaves memory now
            minutes = max(1.0, base["seconds"] / SECONDS_PER_MINUTE)
            waiting[index] = row
            queue.append(Job(index, source.id, folder, metrics,
                             settings.metric_timeout_s * minutes, pooled))
            pump(max_waiting)
        if pool is not None:
            pump(0)
    finally:
        bar.close()
        if pool is not None:
            pool.close()
